//! The CUDA runtime entry points (`libcudart`): annotation of the driver calls they make.

use tracer_common::Cookie;

use super::{CudaHook, Records};
use crate::model::Class;

const RT_RET: Option<&str> = Some("cudart_return");

/// CUDA runtime (`libcudart`) entry points: annotation only. The driver call they make is what
/// counts; its failures are named after both, and a runtime call that fails without any driver
/// failure (no driver, no device) is a failure of its own.
pub const RUNTIME_HOOKS: &[CudaHook] = &[
    CudaHook {
        symbol: "cudaMalloc",
        prototype: "cudaError_t cudaMalloc(void **devPtr, size_t size)",
        entry_program: "cudart_enter_out0_size1",
        return_program: RT_RET,
        records: Records::Alloc,
        class: Class::Cuda,
    },
    CudaHook {
        symbol: "cudaMallocAsync",
        prototype: "cudaError_t cudaMallocAsync(void **devPtr, size_t size, cudaStream_t stream)",
        entry_program: "cudart_enter_out0_size1",
        return_program: RT_RET,
        records: Records::Alloc,
        class: Class::CudaPool,
    },
    CudaHook {
        symbol: "cudaMallocAsync_ptsz",
        prototype: "cudaError_t cudaMallocAsync_ptsz(void **devPtr, size_t size, cudaStream_t stream)",
        entry_program: "cudart_enter_out0_size1",
        return_program: RT_RET,
        records: Records::Alloc,
        class: Class::CudaPool,
    },
    CudaHook {
        symbol: "cudaMallocFromPoolAsync",
        prototype: "cudaError_t cudaMallocFromPoolAsync(void **ptr, size_t size, cudaMemPool_t \
                    memPool, cudaStream_t stream)",
        entry_program: "cudart_enter_out0_size1",
        return_program: RT_RET,
        records: Records::Alloc,
        class: Class::CudaPool,
    },
    CudaHook {
        symbol: "cudaMallocHost",
        prototype: "cudaError_t cudaMallocHost(void **ptr, size_t size)",
        entry_program: "cudart_enter_out0_size1",
        return_program: RT_RET,
        records: Records::Alloc,
        class: Class::CudaPinned,
    },
    CudaHook {
        symbol: "cudaHostAlloc",
        prototype: "cudaError_t cudaHostAlloc(void **pHost, size_t size, unsigned int flags)",
        entry_program: "cudart_enter_out0_size1",
        return_program: RT_RET,
        records: Records::Alloc,
        class: Class::CudaPinned,
    },
    CudaHook {
        symbol: "cudaMallocManaged",
        prototype: "cudaError_t cudaMallocManaged(void **devPtr, size_t size, unsigned int flags)",
        entry_program: "cudart_enter_out0_size1",
        return_program: RT_RET,
        records: Records::Alloc,
        class: Class::CudaManaged,
    },
];

/// The runtime hook behind an event's function code (`Cookie::Runtime(index)`), if it is one.
pub fn runtime_hook(func: u32) -> Option<&'static CudaHook> {
    match Cookie::decode(func)? {
        Cookie::Runtime(index) => RUNTIME_HOOKS.get(index as usize),
        _ => None,
    }
}
