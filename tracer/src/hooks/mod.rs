//! The hook table: every hooked symbol, where it lives, its argument layout, what it records and
//! its class. Attach code, tests and docs/hooks.md are generated from this one table: the common
//! types are here, one table a library (`libc_heap`, `cuda_driver`, `cuda_runtime`,
//! `torch_allocator`), the kernel
//! tracepoints (`tracepoints`), CUDA error names (`cuda_errors`) and the document (`markdown`).

mod cuda_driver;
mod cuda_errors;
mod cuda_runtime;
mod libc_heap;
mod markdown;
mod phase_profiles;
mod torch_allocator;
mod tracepoints;

pub use cuda_driver::{CUDA_HOOKS, cuda_hook};
pub use cuda_errors::{cuda_error_name, runtime_error_name};
pub use cuda_runtime::{RUNTIME_HOOKS, runtime_hook};
pub use libc_heap::HOOKS;
pub use markdown::markdown;
pub use phase_profiles::{PROFILES, Profile, ProfileRule, releases_of};
pub use torch_allocator::{TORCH_HOOKS, has_record_trace, torch_hook};
pub use tracepoints::{PROCESS_TRACEPOINTS, SYSCALL_TRACEPOINTS, Tracepoint};
use tracer_common::HeapFn;

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
    /// PyTorch's caching allocator: every event it has (tensor blocks, segments, OOM), its
    /// action and figures read at entry.
    TorchTrace,
    /// PyTorch's `cudaMallocAsync` backend allocates a tensor: its size and stack; the block is
    /// the driver allocation made inside.
    TorchAsyncMalloc,
    /// The backend frees a tensor.
    TorchAsyncFree,
    /// PyTorch's pinned host caching allocator hands a block to a tensor: a plain probe on the
    /// `ret` of its `at::Allocator::allocate` override (the function's last byte), where the
    /// returned `DataPtr` is read.
    TorchPinnedAlloc,
    /// A tensor lets its pinned block go (the blocks' deleter).
    TorchPinnedFree,
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
            Records::TorchTrace => {
                "every allocator event: tensor blocks handed out and returned, segments obtained, \
                 mapped and released, OOM (action, address, size, stream, device at entry)"
            }
            Records::TorchAsyncMalloc => {
                "a tensor (size, device, stream, stack at entry); its block is the driver \
                 allocation this thread makes next inside the call, of that size"
            }
            Records::TorchAsyncFree => "the tensor at the pointer freed",
            Records::TorchPinnedAlloc => {
                "a pinned block handed to a tensor: probed at the function's one `ret` (its last \
                 byte), the returned DataPtr's data and HostBlock (its size at +0x28)"
            }
            Records::TorchPinnedFree => "the tensor's pinned block back to the cache (HostBlock*)",
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

/// When an entry probe goes live relative to the others of its object. Probes attach one at a
/// time (a tenth of a second each, the kernel patches every mapping of the file), and a block
/// whose creation was seen but whose release went unseen would stay live in the ledger forever
/// (`missed_free`, a phantom peak). So what can release or move a block is live first, what
/// creates one last: every block seen created has its release watched. Frees of blocks created
/// before their creator's probe was live are counted as unmatched, which changes no total.
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum AttachStage {
    /// free, realloc (which releases its old block), cuMemFree, cuMemRelease, cuMemUnmap, ...
    Releases,
    /// Calls that neither create nor release memory the ledger holds.
    Neutral,
    /// malloc and friends, cuMemAlloc, cuMemCreate, cuMemMap, ...
    Creates,
}

impl Records {
    /// The stage of a CUDA hook's entry probe.
    pub fn attach_stage(self) -> AttachStage {
        match self {
            Records::Free
            | Records::VmmRelease
            | Records::VmmUnmap
            | Records::GraphMemFree
            | Records::GraphDestroy
            | Records::PoolDestroy
            | Records::PoolTrim
            | Records::HostUnregister
            | Records::IpcClose
            | Records::TorchAsyncFree
            | Records::TorchPinnedFree => AttachStage::Releases,
            Records::Alloc
            | Records::VmmCreate
            | Records::VmmRetain
            | Records::VmmMap
            | Records::HostRegister
            | Records::IpcOpen
            | Records::TorchAsyncMalloc
            | Records::TorchPinnedAlloc => AttachStage::Creates,
            _ => AttachStage::Neutral,
        }
    }
}

impl Hook {
    /// The stage of a heap hook's entry probe: realloc moves (releases) its old block.
    pub fn attach_stage(&self) -> AttachStage {
        match self.func {
            HeapFn::Free | HeapFn::Realloc | HeapFn::Reallocarray => AttachStage::Releases,
            _ => AttachStage::Creates,
        }
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

/// A hooked CUDA entry point: a driver call (`libcuda.so.1`, the counting point: the runtime's
/// calls reach it, whether the runtime is shared or linked statically) or a runtime call
/// (`libcudart`, annotation only).
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
