//! The CUDA driver entry points (`libcuda.so.1`): the counting point of device memory.

use tracer_common::Cookie;

use super::{CudaHook, Records};
use crate::model::Class;

const fn cu(
    symbol: &'static str,
    prototype: &'static str,
    entry_program: &'static str,
    records: Records,
    class: Class,
) -> CudaHook {
    let return_program = match records {
        Records::Free => None,
        Records::Alloc | Records::VmmCreate | Records::VmmRetain => Some("cuda_return"),
        _ => Some("cuda_call_return"),
    };
    CudaHook {
        symbol,
        prototype,
        entry_program,
        return_program,
        records,
        class,
    }
}

const ALLOC: &str = "cuda_enter_out0_size1";
const CALL: &str = "cuda_call_enter";
const CALL_OUT0: &str = "cuda_call_enter_out0";
const FREE: &str = "cuda_free_arg0";

pub const CUDA_HOOKS: &[CudaHook] = {
    use Class::{
        Cuda as C, CudaGraph as G, CudaIpc as I, CudaManaged as M, CudaPinned as P,
        CudaPool as Pool, CudaRegistered as R, CudaVmm as V, GpuUntraced as U,
    };
    use Records::*;
    &[
        cu(
            "cuMemAlloc_v2",
            "CUresult cuMemAlloc_v2(CUdeviceptr *dptr, size_t bytesize)",
            ALLOC,
            Alloc,
            C,
        ),
        cu(
            "cuMemAllocPitch_v2",
            "CUresult cuMemAllocPitch_v2(CUdeviceptr *dptr, size_t *pPitch, size_t WidthInBytes, \
         size_t Height, unsigned int ElementSizeBytes)",
            "cuda_enter_pitch",
            Alloc,
            C,
        ),
        cu(
            "cuMemAllocAsync",
            "CUresult cuMemAllocAsync(CUdeviceptr *dptr, size_t bytesize, CUstream hStream)",
            ALLOC,
            Alloc,
            Pool,
        ),
        cu(
            "cuMemAllocAsync_ptsz",
            "CUresult cuMemAllocAsync_ptsz(CUdeviceptr *dptr, size_t bytesize, CUstream hStream)",
            ALLOC,
            Alloc,
            Pool,
        ),
        cu(
            "cuMemAllocFromPoolAsync",
            "CUresult cuMemAllocFromPoolAsync(CUdeviceptr *dptr, size_t bytesize, CUmemoryPool pool, \
         CUstream hStream)",
            "cuda_enter_from_pool",
            Alloc,
            Pool,
        ),
        cu(
            "cuMemAllocFromPoolAsync_ptsz",
            "CUresult cuMemAllocFromPoolAsync_ptsz(CUdeviceptr *dptr, size_t bytesize, CUmemoryPool \
         pool, CUstream hStream)",
            "cuda_enter_from_pool",
            Alloc,
            Pool,
        ),
        cu(
            "cuMemAllocHost_v2",
            "CUresult cuMemAllocHost_v2(void **pp, size_t bytesize)",
            ALLOC,
            Alloc,
            P,
        ),
        cu(
            "cuMemHostAlloc",
            "CUresult cuMemHostAlloc(void **pp, size_t bytesize, unsigned int Flags)",
            ALLOC,
            Alloc,
            P,
        ),
        cu(
            "cuMemAllocManaged",
            "CUresult cuMemAllocManaged(CUdeviceptr *dptr, size_t bytesize, unsigned int flags)",
            ALLOC,
            Alloc,
            M,
        ),
        cu(
            "cuMemCreate",
            "CUresult cuMemCreate(CUmemGenericAllocationHandle *handle, size_t size, \
         const CUmemAllocationProp *prop, unsigned long long flags)",
            ALLOC,
            VmmCreate,
            V,
        ),
        cu(
            "cuMemRetainAllocationHandle",
            "CUresult cuMemRetainAllocationHandle(CUmemGenericAllocationHandle *handle, void *addr)",
            ALLOC,
            VmmRetain,
            V,
        ),
        cu(
            "cuMemRelease",
            "CUresult cuMemRelease(CUmemGenericAllocationHandle handle)",
            CALL,
            VmmRelease,
            V,
        ),
        cu(
            "cuMemMap",
            "CUresult cuMemMap(CUdeviceptr ptr, size_t size, size_t offset, \
         CUmemGenericAllocationHandle handle, unsigned long long flags)",
            CALL,
            VmmMap,
            V,
        ),
        cu(
            "cuMemUnmap",
            "CUresult cuMemUnmap(CUdeviceptr ptr, size_t size)",
            CALL,
            VmmUnmap,
            V,
        ),
        cu(
            "cuMemAddressReserve",
            "CUresult cuMemAddressReserve(CUdeviceptr *ptr, size_t size, size_t alignment, \
             CUdeviceptr addr, unsigned long long flags)",
            CALL_OUT0,
            AddressRange,
            V,
        ),
        cu(
            "cuMemAddressFree",
            "CUresult cuMemAddressFree(CUdeviceptr ptr, size_t size)",
            CALL,
            AddressRange,
            V,
        ),
        cu(
            "cuMemFree_v2",
            "CUresult cuMemFree_v2(CUdeviceptr dptr)",
            FREE,
            Free,
            C,
        ),
        cu(
            "cuMemFreeAsync",
            "CUresult cuMemFreeAsync(CUdeviceptr dptr, CUstream hStream)",
            FREE,
            Free,
            Pool,
        ),
        cu(
            "cuMemFreeAsync_ptsz",
            "CUresult cuMemFreeAsync_ptsz(CUdeviceptr dptr, CUstream hStream)",
            FREE,
            Free,
            Pool,
        ),
        cu(
            "cuMemFreeHost",
            "CUresult cuMemFreeHost(void *p)",
            FREE,
            Free,
            P,
        ),
        cu(
            "cuMemPoolCreate",
            "CUresult cuMemPoolCreate(CUmemoryPool *pool, const CUmemPoolProps *poolProps)",
            CALL_OUT0,
            PoolCreate,
            Pool,
        ),
        cu(
            "cuMemPoolDestroy",
            "CUresult cuMemPoolDestroy(CUmemoryPool pool)",
            CALL,
            PoolDestroy,
            Pool,
        ),
        cu(
            "cuMemPoolTrimTo",
            "CUresult cuMemPoolTrimTo(CUmemoryPool pool, size_t minBytesToKeep)",
            CALL,
            PoolTrim,
            Pool,
        ),
        cu(
            "cuMemHostRegister_v2",
            "CUresult cuMemHostRegister_v2(void *p, size_t bytesize, unsigned int Flags)",
            CALL,
            HostRegister,
            R,
        ),
        cu(
            "cuMemHostUnregister",
            "CUresult cuMemHostUnregister(void *p)",
            CALL,
            HostUnregister,
            R,
        ),
        cu(
            "cuIpcGetMemHandle",
            "CUresult cuIpcGetMemHandle(CUipcMemHandle *pHandle, CUdeviceptr dptr)",
            "cuda_ipc_get_enter",
            IpcExport,
            I,
        ),
        cu(
            "cuIpcOpenMemHandle_v2",
            "CUresult cuIpcOpenMemHandle_v2(CUdeviceptr *pdptr, CUipcMemHandle handle, unsigned int Flags)",
            "cuda_ipc_open_enter",
            IpcOpen,
            I,
        ),
        cu(
            "cuIpcOpenMemHandle",
            "CUresult cuIpcOpenMemHandle(CUdeviceptr *pdptr, CUipcMemHandle handle, unsigned int Flags)",
            "cuda_ipc_open_enter",
            IpcOpen,
            I,
        ),
        cu(
            "cuIpcCloseMemHandle",
            "CUresult cuIpcCloseMemHandle(CUdeviceptr dptr)",
            CALL,
            IpcClose,
            I,
        ),
        cu(
            "cuStreamBeginCapture_v2",
            "CUresult cuStreamBeginCapture_v2(CUstream hStream, CUstreamCaptureMode mode)",
            CALL,
            CaptureBegin,
            G,
        ),
        cu(
            "cuStreamBeginCapture_v2_ptsz",
            "CUresult cuStreamBeginCapture_v2_ptsz(CUstream hStream, CUstreamCaptureMode mode)",
            CALL,
            CaptureBegin,
            G,
        ),
        cu(
            "cuStreamBeginCapture",
            "CUresult cuStreamBeginCapture(CUstream hStream)",
            CALL,
            CaptureBegin,
            G,
        ),
        cu(
            "cuStreamBeginCapture_ptsz",
            "CUresult cuStreamBeginCapture_ptsz(CUstream hStream)",
            CALL,
            CaptureBegin,
            G,
        ),
        cu(
            "cuStreamBeginCaptureToGraph",
            "CUresult cuStreamBeginCaptureToGraph(CUstream hStream, CUgraph hGraph, \
         const CUgraphNode *dependencies, const CUgraphEdgeData *dependencyData, \
         size_t numDependencies, CUstreamCaptureMode mode)",
            CALL,
            CaptureBegin,
            G,
        ),
        cu(
            "cuStreamBeginCaptureToGraph_ptsz",
            "CUresult cuStreamBeginCaptureToGraph_ptsz(CUstream hStream, CUgraph hGraph, \
         const CUgraphNode *dependencies, const CUgraphEdgeData *dependencyData, \
         size_t numDependencies, CUstreamCaptureMode mode)",
            CALL,
            CaptureBegin,
            G,
        ),
        cu(
            "cuStreamEndCapture",
            "CUresult cuStreamEndCapture(CUstream hStream, CUgraph *phGraph)",
            "cuda_call_enter_out1",
            CaptureEnd,
            G,
        ),
        cu(
            "cuStreamEndCapture_ptsz",
            "CUresult cuStreamEndCapture_ptsz(CUstream hStream, CUgraph *phGraph)",
            "cuda_call_enter_out1",
            CaptureEnd,
            G,
        ),
        cu(
            "cuGraphAddMemAllocNode",
            "CUresult cuGraphAddMemAllocNode(CUgraphNode *phGraphNode, CUgraph hGraph, \
         const CUgraphNode *dependencies, size_t numDependencies, \
         CUDA_MEM_ALLOC_NODE_PARAMS *nodeParams)",
            "cuda_enter_mem_node",
            Alloc,
            G,
        ),
        cu(
            "cuGraphAddMemFreeNode",
            "CUresult cuGraphAddMemFreeNode(CUgraphNode *phGraphNode, CUgraph hGraph, \
         const CUgraphNode *dependencies, size_t numDependencies, CUdeviceptr dptr)",
            CALL,
            GraphMemFree,
            G,
        ),
        cu(
            "cuGraphInstantiateWithFlags",
            "CUresult cuGraphInstantiateWithFlags(CUgraphExec *phGraphExec, CUgraph hGraph, \
         unsigned long long flags)",
            CALL_OUT0,
            GraphInstantiate,
            G,
        ),
        cu(
            "cuGraphInstantiateWithParams",
            "CUresult cuGraphInstantiateWithParams(CUgraphExec *phGraphExec, CUgraph hGraph, \
         CUDA_GRAPH_INSTANTIATE_PARAMS *instantiateParams)",
            CALL_OUT0,
            GraphInstantiate,
            G,
        ),
        cu(
            "cuGraphInstantiateWithParams_ptsz",
            "CUresult cuGraphInstantiateWithParams_ptsz(CUgraphExec *phGraphExec, CUgraph hGraph, \
         CUDA_GRAPH_INSTANTIATE_PARAMS *instantiateParams)",
            CALL_OUT0,
            GraphInstantiate,
            G,
        ),
        cu(
            "cuGraphInstantiate",
            "CUresult cuGraphInstantiate(CUgraphExec *phGraphExec, CUgraph hGraph, CUgraphNode \
         *phErrorNode, char *logBuffer, size_t bufferSize)",
            CALL_OUT0,
            GraphInstantiate,
            G,
        ),
        cu(
            "cuGraphInstantiate_v2",
            "CUresult cuGraphInstantiate_v2(CUgraphExec *phGraphExec, CUgraph hGraph, CUgraphNode \
         *phErrorNode, char *logBuffer, size_t bufferSize)",
            CALL_OUT0,
            GraphInstantiate,
            G,
        ),
        cu(
            "cuGraphUpload",
            "CUresult cuGraphUpload(CUgraphExec hGraphExec, CUstream hStream)",
            CALL,
            GraphUpload,
            G,
        ),
        cu(
            "cuGraphUpload_ptsz",
            "CUresult cuGraphUpload_ptsz(CUgraphExec hGraphExec, CUstream hStream)",
            CALL,
            GraphUpload,
            G,
        ),
        cu(
            "cuGraphLaunch",
            "CUresult cuGraphLaunch(CUgraphExec hGraphExec, CUstream hStream)",
            CALL,
            GraphLaunch,
            G,
        ),
        cu(
            "cuGraphLaunch_ptsz",
            "CUresult cuGraphLaunch_ptsz(CUgraphExec hGraphExec, CUstream hStream)",
            CALL,
            GraphLaunch,
            G,
        ),
        cu(
            "cuGraphExecDestroy",
            "CUresult cuGraphExecDestroy(CUgraphExec hGraphExec)",
            CALL,
            GraphDestroy,
            G,
        ),
        cu(
            "cuGraphDestroy",
            "CUresult cuGraphDestroy(CUgraph hGraph)",
            CALL,
            GraphDestroy,
            G,
        ),
        cu(
            "cuDevicePrimaryCtxRetain",
            "CUresult cuDevicePrimaryCtxRetain(CUcontext *pctx, CUdevice dev)",
            CALL_OUT0,
            Opaque,
            U,
        ),
        cu(
            "cuDevicePrimaryCtxRelease_v2",
            "CUresult cuDevicePrimaryCtxRelease_v2(CUdevice dev)",
            CALL,
            Opaque,
            U,
        ),
        cu(
            "cuDevicePrimaryCtxReset_v2",
            "CUresult cuDevicePrimaryCtxReset_v2(CUdevice dev)",
            CALL,
            Opaque,
            U,
        ),
        cu(
            "cuCtxCreate_v2",
            "CUresult cuCtxCreate_v2(CUcontext *pctx, unsigned int flags, CUdevice dev)",
            CALL_OUT0,
            Opaque,
            U,
        ),
        cu(
            "cuCtxCreate_v3",
            "CUresult cuCtxCreate_v3(CUcontext *pctx, CUexecAffinityParam *paramsArray, \
         int numParams, unsigned int flags, CUdevice dev)",
            CALL_OUT0,
            Opaque,
            U,
        ),
        cu(
            "cuCtxCreate_v4",
            "CUresult cuCtxCreate_v4(CUcontext *pctx, CUctxCreateParams *ctxCreateParams, \
         unsigned int flags, CUdevice dev)",
            CALL_OUT0,
            Opaque,
            U,
        ),
        cu(
            "cuCtxDestroy_v2",
            "CUresult cuCtxDestroy_v2(CUcontext ctx)",
            CALL,
            Opaque,
            U,
        ),
        cu(
            "cuModuleLoad",
            "CUresult cuModuleLoad(CUmodule *module, const char *fname)",
            CALL_OUT0,
            Opaque,
            U,
        ),
        cu(
            "cuModuleLoadData",
            "CUresult cuModuleLoadData(CUmodule *module, const void *image)",
            CALL_OUT0,
            Opaque,
            U,
        ),
        cu(
            "cuModuleLoadDataEx",
            "CUresult cuModuleLoadDataEx(CUmodule *module, const void *image, unsigned int \
         numOptions, CUjit_option *options, void **optionValues)",
            CALL_OUT0,
            Opaque,
            U,
        ),
        cu(
            "cuModuleLoadFatBinary",
            "CUresult cuModuleLoadFatBinary(CUmodule *module, const void *fatCubin)",
            CALL_OUT0,
            Opaque,
            U,
        ),
        cu(
            "cuModuleUnload",
            "CUresult cuModuleUnload(CUmodule hmod)",
            CALL,
            Opaque,
            U,
        ),
        cu(
            "cuLibraryLoadData",
            "CUresult cuLibraryLoadData(CUlibrary *library, const void *code, CUjit_option \
         *jitOptions, void **jitOptionsValues, unsigned int numJitOptions, CUlibraryOption \
         *libraryOptions, void **libraryOptionValues, unsigned int numLibraryOptions)",
            CALL_OUT0,
            Opaque,
            U,
        ),
        cu(
            "cuLibraryLoadFromFile",
            "CUresult cuLibraryLoadFromFile(CUlibrary *library, const char *fileName, CUjit_option \
         *jitOptions, void **jitOptionsValues, unsigned int numJitOptions, CUlibraryOption \
         *libraryOptions, void **libraryOptionValues, unsigned int numLibraryOptions)",
            CALL_OUT0,
            Opaque,
            U,
        ),
        cu(
            "cuLibraryUnload",
            "CUresult cuLibraryUnload(CUlibrary library)",
            CALL,
            Opaque,
            U,
        ),
    ]
};

/// The CUDA hook behind an event's function code (`Cookie::Cuda(index)`), if it is one.
pub fn cuda_hook(func: u32) -> Option<&'static CudaHook> {
    match Cookie::decode(func)? {
        Cookie::Cuda(index) => CUDA_HOOKS.get(index as usize),
        _ => None,
    }
}
