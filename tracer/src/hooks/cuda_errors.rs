//! Names of CUDA error codes, as failures show them.

/// Name of a cudaError_t (cuda_runtime_api.h), as failures show it.
pub fn runtime_error_name(code: i32) -> String {
    match code {
        1 => "cudaErrorInvalidValue".into(),
        2 => "cudaErrorMemoryAllocation".into(),
        3 => "cudaErrorInitializationError".into(),
        35 => "cudaErrorInsufficientDriver".into(),
        100 => "cudaErrorNoDevice".into(),
        101 => "cudaErrorInvalidDevice".into(),
        999 => "cudaErrorUnknown".into(),
        n => format!("cudaError {n}"),
    }
}

/// Name of a CUresult (cuda.h), as failures show it.
pub fn cuda_error_name(code: i32) -> String {
    match code {
        1 => "CUDA_ERROR_INVALID_VALUE".into(),
        2 => "CUDA_ERROR_OUT_OF_MEMORY".into(),
        3 => "CUDA_ERROR_NOT_INITIALIZED".into(),
        4 => "CUDA_ERROR_DEINITIALIZED".into(),
        100 => "CUDA_ERROR_NO_DEVICE".into(),
        101 => "CUDA_ERROR_INVALID_DEVICE".into(),
        201 => "CUDA_ERROR_INVALID_CONTEXT".into(),
        999 => "CUDA_ERROR_UNKNOWN".into(),
        n => format!("CUresult {n}"),
    }
}
