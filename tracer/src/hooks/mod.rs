//! The hook table: every hooked symbol, where it lives, its argument layout, what it records and
//! its class. Attach code, tests and docs/hooks.md are generated from this one table.

use tracer_common::{Cookie, HeapFn};

use crate::model::Class;

/// Which loaded object provides a hooked symbol.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Library {
    /// The C library the target maps (glibc `libc.so.6`, musl), or the executable itself when the
    /// allocator is linked in statically.
    Libc,
}

impl Library {
    pub fn describe(self) -> &'static str {
        match self {
            Library::Libc => "libc (as mapped by the target)",
        }
    }
}

/// What a hook records.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Records {
    /// An allocation: arguments at entry, result and stack at return.
    Alloc,
    /// A release of a block: its address at entry. No return probe, no stack.
    Free,
    /// cuMemCreate: a physical allocation handle (out-pointer) of `size` bytes.
    VmmCreate,
    /// cuMemRetainAllocationHandle: one more reference to the handle mapped at an address.
    VmmRetain,
    /// cuMemRelease(handle): one reference less.
    VmmRelease,
    /// cuMemMap(ptr, size, offset, handle): the handle mapped at a device range.
    VmmMap,
    /// cuMemUnmap(ptr, size): the mappings in a device range unmapped.
    VmmUnmap,
    /// cuMemAddressReserve / cuMemAddressFree: address space, never memory (counted calls).
    AddressRange,
    /// cuStreamBeginCapture*: the calling thread starts capturing a CUDA graph.
    CaptureBegin,
    /// cuStreamEndCapture*: the capture ends.
    CaptureEnd,
    /// cuGraphAddMemFreeNode: the graph frees the block of a memory node (5th argument).
    GraphMemFree,
    /// cuGraphInstantiate*: a graph executable (out-pointer) from a graph.
    GraphInstantiate,
    /// cuGraphUpload*: the executable's resources are made resident.
    GraphUpload,
    /// cuGraphLaunch*: a replay; the first one of an executable may back its memory nodes.
    GraphLaunch,
    /// cuGraphExecDestroy / cuGraphDestroy.
    GraphDestroy,
    /// cuMemPoolCreate: a memory pool (out-pointer).
    PoolCreate,
    /// cuMemPoolDestroy.
    PoolDestroy,
    /// cuMemPoolTrimTo(pool, minBytesToKeep): the pool gives memory back to the device.
    PoolTrim,
    /// cuMemHostRegister: a host range page-locked (marked, not added).
    HostRegister,
    /// cuMemHostUnregister.
    HostUnregister,
    /// cuIpcGetMemHandle: an exported device block, known by its handle's fingerprint.
    IpcExport,
    /// cuIpcOpenMemHandle*: another process's block mapped here.
    IpcOpen,
    /// cuIpcCloseMemHandle.
    IpcClose,
    /// Context creation and release, module and library loads: the driver allocates device
    /// memory of its own that no API returns.
    Opaque,
}

impl Records {
    /// For docs/hooks.md.
    pub fn describe(self) -> &'static str {
        match self {
            Records::Alloc => {
                "allocation (out-pointer read when the CUresult is 0; else a failure with its name)"
            }
            Records::Free => "free of the pointer (0 ignored)",
            Records::VmmCreate => {
                "physical handle of `size` bytes, live while referenced or mapped"
            }
            Records::VmmRetain => "one more reference to the handle (out-pointer)",
            Records::VmmRelease => "one reference less",
            Records::VmmMap => "the handle mapped at a device range",
            Records::VmmUnmap => "every mapping in the range unmapped (one call may cover many)",
            Records::AddressRange => "address space reserved or freed: counted, never memory",
            Records::CaptureBegin => {
                "the thread captures: its allocations are phase `graph-capture`, CUDA ones class \
                 `cuda-graph`"
            }
            Records::CaptureEnd => "the capture ends",
            Records::GraphMemFree => "the node's block is freed by the graph",
            Records::GraphInstantiate => {
                "a graph executable; its allocations are phase `graph-capture`"
            }
            Records::GraphUpload => "the executable's resources made resident",
            Records::GraphLaunch => "a replay (counted; the first of each executable samples NVML)",
            Records::GraphDestroy => "graph or executable destroyed",
            Records::PoolCreate => "a memory pool (its allocations are `cuda-pool`)",
            Records::PoolDestroy => "the pool destroyed",
            Records::PoolTrim => "the pool trimmed to `minBytesToKeep`",
            Records::HostRegister => {
                "the host range marked page-locked (not added: already counted)"
            }
            Records::HostUnregister => "the mark removed",
            Records::IpcExport => "the block behind an IPC handle (by the handle's fingerprint)",
            Records::IpcOpen => {
                "another process's block mapped here (size from its exporter if traced)"
            }
            Records::IpcClose => "the imported block unmapped",
            Records::Opaque => {
                "the driver's own memory (context, code images), not returned by any call"
            }
        }
    }

    /// Calls after which the driver may hold memory no API returned: NVML is sampled right after
    /// them and a jump in `gpu-untraced` is charged to them.
    pub fn samples_gpu(self) -> bool {
        matches!(
            self,
            Records::Opaque
                | Records::CaptureEnd
                | Records::GraphInstantiate
                | Records::GraphUpload
                | Records::GraphDestroy
                | Records::PoolDestroy
                | Records::PoolTrim
        )
    }
}

/// Where the entry probe is placed.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Site {
    /// The function's first instruction.
    Entry,
    /// The first instruction past a leading `if (ptr == NULL) return;` when it is a cheap,
    /// emulated `push` (glibc free: about 20 times cheaper than its entry, see docs/performance.md);
    /// the entry otherwise.
    AfterNullCheck,
}

#[derive(Copy, Clone, Debug)]
pub struct Hook {
    pub symbol: &'static str,
    pub library: Library,
    /// The C prototype, for the docs.
    pub prototype: &'static str,
    /// eBPF program run at the entry site (its argument layout is in its name).
    pub entry_program: &'static str,
    /// eBPF program run at return, if any.
    pub return_program: Option<&'static str>,
    pub site: Site,
    pub records: Records,
    pub class: Class,
    /// Passed to the programs as the attach cookie.
    pub func: HeapFn,
    /// How the ledger reads the call.
    pub accounting: &'static str,
}

const RET: Option<&str> = Some("heap_return");

pub const HOOKS: &[Hook] = &[
    Hook {
        symbol: "malloc",
        library: Library::Libc,
        prototype: "void *malloc(size_t size)",
        entry_program: "heap_enter_size0",
        return_program: RET,
        site: Site::Entry,
        records: Records::Alloc,
        class: Class::Heap,
        func: HeapFn::Malloc,
        accounting: "`size` bytes live at the returned block; NULL is a failure",
    },
    Hook {
        symbol: "calloc",
        library: Library::Libc,
        prototype: "void *calloc(size_t nmemb, size_t size)",
        entry_program: "heap_enter_calloc",
        return_program: RET,
        site: Site::Entry,
        records: Records::Alloc,
        class: Class::Heap,
        func: HeapFn::Calloc,
        accounting: "`nmemb * size` bytes (saturated on overflow); NULL is a failure",
    },
    Hook {
        symbol: "realloc",
        library: Library::Libc,
        prototype: "void *realloc(void *ptr, size_t size)",
        entry_program: "heap_enter_realloc",
        return_program: RET,
        site: Site::Entry,
        records: Records::Alloc,
        class: Class::Heap,
        func: HeapFn::Realloc,
        accounting: "frees `ptr` and allocates `size` at the realloc's stack (also in place); \
                     `realloc(p, 0)` returning NULL frees `p`; other NULL results are failures \
                     and leave `ptr` live",
    },
    Hook {
        symbol: "reallocarray",
        library: Library::Libc,
        prototype: "void *reallocarray(void *ptr, size_t nmemb, size_t size)",
        entry_program: "heap_enter_reallocarray",
        return_program: RET,
        site: Site::Entry,
        records: Records::Alloc,
        class: Class::Heap,
        func: HeapFn::Reallocarray,
        accounting: "as realloc with `nmemb * size` bytes",
    },
    Hook {
        symbol: "free",
        library: Library::Libc,
        prototype: "void free(void *ptr)",
        entry_program: "heap_free",
        return_program: None,
        site: Site::AfterNullCheck,
        records: Records::Free,
        class: Class::Heap,
        func: HeapFn::Free,
        accounting: "the block at `ptr` is no longer live; unknown blocks count as unmatched frees",
    },
    Hook {
        symbol: "posix_memalign",
        library: Library::Libc,
        prototype: "int posix_memalign(void **memptr, size_t alignment, size_t size)",
        entry_program: "heap_enter_posix_memalign",
        return_program: RET,
        site: Site::Entry,
        records: Records::Alloc,
        class: Class::Heap,
        func: HeapFn::PosixMemalign,
        accounting: "`size` bytes at `*memptr` when it returns 0; a non-zero result is a failure \
                     with that errno",
    },
    Hook {
        symbol: "aligned_alloc",
        library: Library::Libc,
        prototype: "void *aligned_alloc(size_t alignment, size_t size)",
        entry_program: "heap_enter_size1",
        return_program: RET,
        site: Site::Entry,
        records: Records::Alloc,
        class: Class::Heap,
        func: HeapFn::AlignedAlloc,
        accounting: "`size` bytes; NULL is a failure",
    },
    Hook {
        symbol: "memalign",
        library: Library::Libc,
        prototype: "void *memalign(size_t alignment, size_t size)",
        entry_program: "heap_enter_size1",
        return_program: RET,
        site: Site::Entry,
        records: Records::Alloc,
        class: Class::Heap,
        func: HeapFn::Memalign,
        accounting: "`size` bytes; NULL is a failure",
    },
    Hook {
        symbol: "valloc",
        library: Library::Libc,
        prototype: "void *valloc(size_t size)",
        entry_program: "heap_enter_size0",
        return_program: RET,
        site: Site::Entry,
        records: Records::Alloc,
        class: Class::Heap,
        func: HeapFn::Valloc,
        accounting: "`size` bytes (the request, not the page-rounded block); NULL is a failure",
    },
    Hook {
        symbol: "pvalloc",
        library: Library::Libc,
        prototype: "void *pvalloc(size_t size)",
        entry_program: "heap_enter_size0",
        return_program: RET,
        site: Site::Entry,
        records: Records::Alloc,
        class: Class::Heap,
        func: HeapFn::Pvalloc,
        accounting: "`size` bytes (the request, not the page-rounded block); NULL is a failure",
    },
];

/// A hooked CUDA driver entry point (`libcuda.so.1`, the counting point: the runtime's calls
/// reach it, whether the runtime is shared or linked statically).
#[derive(Copy, Clone, Debug)]
pub struct CudaHook {
    pub symbol: &'static str,
    pub prototype: &'static str,
    pub entry_program: &'static str,
    pub return_program: Option<&'static str>,
    pub records: Records,
    /// The class of what it allocates (frees find their block's class in the ledger).
    pub class: Class,
}

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

/// The CUDA hook behind an event's function code, if it is one.
pub fn cuda_hook(func: u32) -> Option<&'static CudaHook> {
    match Cookie::decode(func)? {
        Cookie::Cuda(index) => CUDA_HOOKS.get(index as usize),
        _ => None,
    }
}

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

/// The runtime hook behind an event's function code, if it is one.
pub fn runtime_hook(func: u32) -> Option<&'static CudaHook> {
    match Cookie::decode(func)? {
        Cookie::Runtime(index) => RUNTIME_HOOKS.get(index as usize),
        _ => None,
    }
}

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

/// A kernel tracepoint alloctrace attaches to (no uprobe trap).
#[derive(Copy, Clone, Debug)]
pub struct Tracepoint {
    /// Tracefs category.
    pub category: &'static str,
    /// For `syscalls`, the syscall (`sys_enter_NAME` runs `program`, `sys_exit_NAME` runs
    /// `syscall_exit`); otherwise the tracepoint's name.
    pub name: &'static str,
    pub program: &'static str,
    /// What it records, and into which classes.
    pub records: &'static str,
}

/// Memory syscalls, traced for every traced process whatever calls them (libc, raw `syscall()`,
/// static code, runtimes that never touch libc). Rules in docs/accounting.md, "Mappings".
pub const SYSCALL_TRACEPOINTS: &[Tracepoint] = &[
    Tracepoint {
        category: "syscalls",
        name: "mmap",
        program: "mmap_enter",
        records: "a new mapping: `mmap`, `mmap-shared`, `mmap-file`, `thread-stack`, \
                  `python-arena` by its flags and caller; allocator arena with --heap",
    },
    Tracepoint {
        category: "syscalls",
        name: "munmap",
        program: "munmap_enter",
        records: "pages unmapped from the mappings they belong to",
    },
    Tracepoint {
        category: "syscalls",
        name: "mprotect",
        program: "mprotect_enter",
        records: "pages becoming accessible (counted) or PROT_NONE (not counted)",
    },
    Tracepoint {
        category: "syscalls",
        name: "mremap",
        program: "mremap_enter",
        records: "a mapping moved, grown or shrunk: the new range at the mremap's stack",
    },
    Tracepoint {
        category: "syscalls",
        name: "brk",
        program: "brk_enter",
        records: "program-break growth: class `heap` (allocator arena with --heap)",
    },
    Tracepoint {
        category: "syscalls",
        name: "madvise",
        program: "madvise_enter",
        records: "pages released (DONTNEED, FREE, REMOVE) by stack, mappings kept",
    },
];

/// Process-tree and RSS tracepoints.
pub const PROCESS_TRACEPOINTS: &[Tracepoint] = &[
    Tracepoint {
        category: "task",
        name: "task_newtask",
        program: "task_newtask",
        records: "a child (not a thread) of a traced process joins the traced set before it runs",
    },
    Tracepoint {
        category: "sched",
        name: "sched_process_exec",
        program: "process_exec",
        records: "exec: the old image's blocks and mappings are retired",
    },
    Tracepoint {
        category: "sched",
        name: "sched_process_exit",
        program: "process_exit",
        records: "a traced process exited: it keeps its figures at exit",
    },
    Tracepoint {
        category: "exceptions",
        name: "page_fault_user",
        program: "page_fault_user",
        records: "sampled faults that bring a page in, by stack (`page_faults`)",
    },
];

/// The table as the Markdown document docs/hooks.md (kept in sync by a test).
pub fn markdown() -> String {
    let mut out = String::from(
        "# Hooked functions\n\n\
         Generated from `tracer/src/hooks.rs` by `alloctrace hooks`; a test keeps this file in \
         sync.\n\n\
         | symbol | library | prototype | entry site | probes | records | class | accounting |\n\
         |---|---|---|---|---|---|---|---|\n",
    );
    for h in HOOKS {
        let site = match h.site {
            Site::Entry => "entry",
            Site::AfterNullCheck => "after the NULL check (entry if none)",
        };
        let probes = match h.return_program {
            Some(ret) => format!("`{}` + `{}`", h.entry_program, ret),
            None => format!("`{}`", h.entry_program),
        };
        let records = match h.records {
            Records::Alloc => "allocation",
            Records::Free => "free",
            _ => "call",
        };
        out.push_str(&format!(
            "| `{}` | {} | `{}` | {} | {} | {} | `{}` | {} |\n",
            h.symbol,
            h.library.describe(),
            h.prototype,
            site,
            probes,
            records,
            h.class.name(),
            h.accounting
        ));
    }
    out.push_str(
        "\n## CUDA driver (`libcuda.so.1`, hooked in every traced process that maps it, also when \
         it is loaded after attach)\n\n\
         | symbol | prototype | probes | records | class |\n|---|---|---|---|---|\n",
    );
    for h in CUDA_HOOKS {
        let probes = match h.return_program {
            Some(ret) => format!("`{}` + `{}`", h.entry_program, ret),
            None => format!("`{}`", h.entry_program),
        };
        let records = if h.records.samples_gpu() {
            format!("{}; NVML sampled right after", h.records.describe())
        } else {
            h.records.describe().to_string()
        };
        out.push_str(&format!(
            "| `{}` | `{}` | {probes} | {records} | `{}` |\n",
            h.symbol,
            h.prototype,
            h.class.name()
        ));
    }
    out.push_str(
        "\n## CUDA runtime (`libcudart.so*` when shared; annotation only)\n\n\
         Never counted: the driver call they make is. A driver failure inside one is named after \
         both (`cudaMalloc → cuMemAlloc_v2`); a runtime call that fails without a driver failure \
         (no driver, no device) is a failure of its own, with its `cudaError_t` name.\n\n\
         | symbol | prototype | probes | class |\n|---|---|---|---|\n",
    );
    for h in RUNTIME_HOOKS {
        out.push_str(&format!(
            "| `{}` | `{}` | `{}` + `{}` | `{}` |\n",
            h.symbol,
            h.prototype,
            h.entry_program,
            h.return_program.unwrap_or("-"),
            h.class.name()
        ));
    }
    out.push_str(
        "\n## Tracepoints\n\nNo uprobe trap; filtered by process in the kernel.\n\n\
         | tracepoint | program | records |\n|---|---|---|\n",
    );
    for tp in SYSCALL_TRACEPOINTS.iter().chain(PROCESS_TRACEPOINTS) {
        let name = match tp.category {
            "syscalls" => format!("`syscalls:sys_enter_{n}` + `sys_exit_{n}`", n = tp.name),
            _ => format!("`{}:{}`", tp.category, tp.name),
        };
        out.push_str(&format!("| {name} | `{}` | {} |\n", tp.program, tp.records));
    }
    out.push_str(
        "\nSymbols that are aliases of each other (same file offset, e.g. glibc 2.36's \
         `aligned_alloc` and `memalign`) get one probe, named after both in table order (`aligned_alloc/memalign`), \
         so no call is counted twice.\n",
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_heap_function_has_exactly_one_hook_in_cookie_order() {
        assert_eq!(HOOKS.len(), HeapFn::ALL.len());
        for (i, h) in HOOKS.iter().enumerate() {
            assert_eq!(h.func as usize, i, "{} out of order", h.symbol);
            assert_eq!(h.func.name(), h.symbol);
            assert_eq!(h.records == Records::Free, h.return_program.is_none());
        }
    }

    #[test]
    fn docs_hooks_md_is_generated_from_the_table() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/hooks.md");
        let on_disk = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            on_disk == markdown(),
            "docs/hooks.md is out of date: run `cargo run -p tracer -- hooks > docs/hooks.md`"
        );
    }
}
