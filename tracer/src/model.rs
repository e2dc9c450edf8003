//! The data model shared by the ledger, the recording and the views.
//!
//! The ledger produces these values while tracing; the recording stores them; the report and the
//! flamegraph read them back. Keeping one model makes the JSON contract (docs/recording.md) and the
//! database schema two views of the same thing.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The page size the mapping ledger and fault counts use (x86-64 base pages).
pub const PAGE: u64 = 4096;

/// How memory was obtained. The flamegraph's root frames and the report's totals are per class.
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Class {
    /// C allocator blocks (malloc and friends) at their requested size; without heap tracing,
    /// the program break's growth.
    Heap,
    /// Anonymous private mappings.
    Mmap,
    /// Shared anonymous mappings and shared memory files.
    MmapShared,
    /// File-backed mappings (reported apart: not leaks in the usual sense).
    MmapFile,
    /// Thread stacks (MAP_STACK mappings).
    ThreadStack,
    /// CPython's object allocator arenas (pymalloc), recognized by the caller of their mmap.
    PythonArena,
    /// Device memory from the CUDA driver (cuMemAlloc).
    Cuda,
    /// Stream-ordered allocations from a CUDA memory pool (cuMemAllocAsync).
    CudaPool,
    /// Page-locked host memory from the CUDA driver (cuMemAllocHost, cuMemHostAlloc).
    CudaPinned,
    /// Unified memory (cuMemAllocManaged).
    CudaManaged,
    /// Physical memory of CUDA VMM handles (cuMemCreate) while referenced or mapped; address
    /// reservations are not memory.
    CudaVmm,
    /// Device memory obtained while the allocating thread was capturing a CUDA graph, or by a
    /// graph memory node (cuGraphAddMemAllocNode).
    CudaGraph,
    /// Device memory of another process opened through CUDA IPC (cuIpcOpenMemHandle): mapped
    /// here, owned there; never part of this process's device total.
    CudaIpc,
    /// Host ranges page-locked with cuMemHostRegister: already counted as heap or mmap, so
    /// marked here and never added to anything.
    CudaRegistered,
    /// GPU memory the driver reports (NVML) beyond the traced device classes, charged to the
    /// opaque driver call (context creation, module load, graph instantiation...) after which it
    /// appeared; `unattributed` stack when no such call was in the window.
    GpuUntraced,
    /// PyTorch's caching allocator: live tensor blocks (at their requested size), charged to the
    /// stack that allocated the tensor. A view inside the device classes (the segments they lie
    /// in are `cuda` or `cuda-vmm` bytes): never added to a device total.
    Torch,
    /// PyTorch's caching allocator: reserved but not allocated (cached) bytes of its segments,
    /// charged to the stack that grew the segment. A view inside the device classes, like `torch`.
    TorchCached,
    /// PyTorch's pinned host caching allocator: blocks held by tensors (at the block's size),
    /// charged to the stack that allocated the tensor. A view inside `cuda-pinned`, never added.
    TorchPinned,
    /// PyTorch's pinned host caching allocator: blocks no tensor holds (cached, or waiting on
    /// their CUDA events), charged to the stack that made the block. A view inside `cuda-pinned`.
    TorchPinnedCached,
}

impl Class {
    pub const ALL: [Class; 19] = [
        Class::Heap,
        Class::Mmap,
        Class::MmapShared,
        Class::MmapFile,
        Class::ThreadStack,
        Class::PythonArena,
        Class::Cuda,
        Class::CudaPool,
        Class::CudaPinned,
        Class::CudaManaged,
        Class::CudaVmm,
        Class::CudaGraph,
        Class::CudaIpc,
        Class::CudaRegistered,
        Class::GpuUntraced,
        Class::Torch,
        Class::TorchCached,
        Class::TorchPinned,
        Class::TorchPinnedCached,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Class::Heap => "heap",
            Class::Mmap => "mmap",
            Class::MmapShared => "mmap-shared",
            Class::MmapFile => "mmap-file",
            Class::ThreadStack => "thread-stack",
            Class::PythonArena => "python-arena",
            Class::Cuda => "cuda",
            Class::CudaPool => "cuda-pool",
            Class::CudaPinned => "cuda-pinned",
            Class::CudaManaged => "cuda-managed",
            Class::CudaVmm => "cuda-vmm",
            Class::CudaGraph => "cuda-graph",
            Class::CudaIpc => "cuda-ipc",
            Class::CudaRegistered => "cuda-registered",
            Class::GpuUntraced => "gpu-untraced",
            Class::Torch => "torch",
            Class::TorchCached => "torch-cached",
            Class::TorchPinned => "torch-pinned",
            Class::TorchPinnedCached => "torch-pinned-cached",
        }
    }

    /// Memory there by construction, not grown by work: loaded files' code and data, thread
    /// stacks reserved (mostly not resident). Reported apart from what can grow.
    pub fn is_static(self) -> bool {
        matches!(self, Class::MmapFile | Class::ThreadStack)
    }

    /// Whether the class's live bytes are memory the traced processes hold and could leak:
    /// not file mappings and thread stacks reserved at start (static), not the views inside
    /// other classes (PyTorch's, host registration), not another process's memory (IPC).
    pub fn can_leak(self) -> bool {
        !matches!(
            self,
            Class::MmapFile
                | Class::ThreadStack
                | Class::CudaIpc
                | Class::CudaRegistered
                | Class::Torch
                | Class::TorchCached
                | Class::TorchPinned
                | Class::TorchPinnedCached
        )
    }

    pub fn from_name(name: &str) -> Option<Class> {
        Self::ALL.into_iter().find(|c| c.name() == name)
    }
}

/// The phase of memory allocated outside every phase (`record --phase`), and of everything
/// when no phase rule is given.
pub const PHASE_NONE: &str = "none";

/// A thread outside every phase of a process that showed no activity (a rule's entry, work
/// inside a phase, PyTorch allocator traffic) for `record --idle-after` ms, once it showed some.
pub const PHASE_IDLE: &str = "idle";

/// Memory a process attached to by PID already held when the recorder attached: no probe saw it
/// made (the GPU's from the first NVML sample; the host's, resident anonymous memory, from the
/// first /proc sample).
pub const PHASE_PRE_ATTACH: &str = "pre-attach";

/// Index of a stack in the recording's stack table (dense, from 0).
pub type StackIndex = u32;

/// A symbolized user stack, innermost frame first.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stack {
    pub index: StackIndex,
    /// Function names, innermost first, demangled; `[unknown]`-style placeholders (see
    /// `symbolize`) where a frame could not be resolved.
    pub frames: Vec<String>,
}

/// Counters of one (class, phase, stack) cell of the ledger.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StackCounters {
    pub live_bytes: u64,
    pub live_count: u64,
    pub allocated_bytes: u64,
    pub allocated_count: u64,
    pub freed_bytes: u64,
    pub freed_count: u64,
}

impl StackCounters {
    pub fn add(&mut self, other: &StackCounters) {
        self.live_bytes += other.live_bytes;
        self.live_count += other.live_count;
        self.allocated_bytes += other.allocated_bytes;
        self.allocated_count += other.allocated_count;
        self.freed_bytes += other.freed_bytes;
        self.freed_count += other.freed_count;
    }
}

/// Per-class totals.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClassTotals {
    pub live_bytes: u64,
    pub live_count: u64,
    /// Highest `live_bytes` seen at any event during the recording.
    pub peak_bytes: u64,
    pub allocated_bytes: u64,
    pub allocated_count: u64,
    pub freed_count: u64,
}

/// Key of a ledger cell.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct CellKey {
    pub class: Class,
    /// The process the memory belongs to.
    pub pid: u32,
    pub phase: String,
    /// `None`: the stack could not be captured (the cause is in `lost_events`).
    pub stack: Option<StackIndex>,
}

/// Failed allocation calls, grouped by (class, function, size, error, stack).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct FailureKey {
    pub class: Class,
    pub pid: u32,
    pub function: String,
    pub size: u64,
    /// Error name, e.g. `ENOMEM`, `EINVAL`.
    pub error: String,
    pub stack: Option<StackIndex>,
}

/// Metadata of the traced target.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetInfo {
    pub pids: Vec<u32>,
    /// The command line, arguments separated by spaces.
    pub command: String,
    /// Attached to by PID (`-p`): it ran before the recorder, and what it held then was
    /// allocated where no probe saw it (`pre-attach`). False for a launched command.
    #[serde(default)]
    pub attached: bool,
}

/// The ledger's state at one moment: everything a report needs. The recorder writes one of these
/// (as a delta, see `recording`) every second and a last one when it finalizes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LedgerState {
    pub totals: BTreeMap<Class, ClassTotals>,
    pub cells: BTreeMap<CellKey, StackCounters>,
    pub failures: BTreeMap<FailureKey, u64>,
    /// Frees (and realloc sources) of blocks never seen allocated, e.g. allocated before attach.
    pub unmatched_frees: u64,
    /// Sampled page faults that brought pages in, by (pid, stack): the number of faults they
    /// stand for (samples × the sampling period). Each is a page of RSS growth.
    pub faults: AmountsByStack,
    /// Bytes released with madvise (MADV_DONTNEED, MADV_FREE, MADV_REMOVE) by (pid, stack):
    /// pages given back to the kernel while the mapping stays (RSS shrinks, live mapped bytes do
    /// not).
    pub released: AmountsByStack,
    /// Non-allocating CUDA driver calls (graphs, pools, IPC, registration, contexts, modules) by
    /// (pid, function, stack).
    pub cuda_calls: CudaCalls,
    /// Lost events and stacks by cause (`tracer_common::drop_cause::NAMES`, plus user-space causes).
    pub lost_events: BTreeMap<String, u64>,
}

/// An amount (page faults, bytes) by (pid, stack): `LedgerState::faults` and
/// `LedgerState::released`, which the recording writes, reads and merges alike.
pub type AmountsByStack = BTreeMap<(u32, Option<StackIndex>), u64>;

/// How the recording's stacks were taken (`record --stack`), and how that went.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StackCapture {
    /// `auto`, `fp` or `dwarf`.
    pub mode: String,
    /// Bytes copied per stack copy.
    pub copy_bytes: u32,
    /// Stacks copied in the kernel and unwound with DWARF CFI.
    pub copies: u64,
    /// Of those, unwinds that did not reach the outermost frame (marked `[truncated]`).
    pub truncated: u64,
    /// Stacks that were to be copied but were walked by frame pointers because the ring buffer
    /// was a quarter full (a burst of events).
    pub fp_under_pressure: u64,
    /// `--heap-sample`: mean bytes between recorded heap allocations (0: every one; heap
    /// bytes are then exact, else unbiased estimates).
    #[serde(default)]
    pub heap_sample_bytes: u64,
    /// Stacks whose heap blocks the kernel held and counted (exact `--heap`, frame-pointer heap
    /// stacks); 0 when the kernel kept no heap ledger.
    #[serde(default)]
    pub kernel_heap_stacks: u64,
    /// Heap blocks that went to user space through the ring because the kernel's ledger was
    /// full (still counted exactly, at the cost of a ring record each).
    #[serde(default)]
    pub kernel_heap_full: u64,
    /// Of those, blocks left out: past a quarter-full ring only a byte-sampled share of them
    /// went through it (`heap_ledger::FULL_SAMPLE_MEAN`), each counted as `size / p` bytes; their
    /// frees reach user space as frees of blocks it never saw.
    #[serde(default)]
    pub kernel_heap_sampled_out: u64,
    /// Duty-cycled heap (`--heap-budget`, `--heap-duty`): how the windows went; None when the
    /// heap probes were on for the whole recording.
    #[serde(default)]
    pub heap_duty: Option<HeapDuty>,
    /// `--max-memory`: the limit, and what the recorder gave up to stay within it; None
    /// without a limit.
    #[serde(default)]
    pub memory_limit: Option<MemoryLimit>,
}

/// How `alloctrace check` judges the growth of the traced live memory over its batches (meta
/// `check`: the recording was made by it).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Thresholds {
    /// Growth from the first batches' mean to the last ones', in percent, above which the
    /// memory leaks.
    pub growth_percent: f64,
    /// Noise (the batches' spread around their trend, percent of their mean) above which
    /// nothing is concluded unless the growth is more than twice it.
    pub noise_percent: f64,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            growth_percent: 10.0,
            noise_percent: 5.0,
        }
    }
}

/// A moment a recording's driver marked (`alloctrace check`: the end of each batch of load): the
/// traced live memory then, every record the ring held applied (meta `marks`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Mark {
    pub label: String,
    /// Seconds from the start of the recording.
    pub t_s: f64,
    /// Live bytes of the classes that can grow (`Class::can_leak`), all traced processes.
    pub traced_live: u64,
    /// The target's resident memory (VmRSS), if it could be read.
    pub rss: Option<u64>,
    /// The live bytes of each cell of those classes with any.
    pub cells: Vec<MarkCell>,
}

/// A cell's live bytes at a mark.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MarkCell {
    pub key: CellKey,
    pub live_bytes: u64,
}

/// `record --phase`: the rules, how often each phase was entered, and which phase freed what
/// another allocated (meta `phases`, docs/recording.md).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Phases {
    /// The built-in profiles in use (a rule of theirs matched or was attached): `vLLM`, ...
    #[serde(default)]
    pub profiles: Vec<String>,
    /// The user's rules, then the profiles' in use.
    pub rules: Vec<PhaseRuleFigures>,
    /// Frees by (class, allocated-in, freed-in phase), in that order.
    pub frees: Vec<PhaseFrees>,
}

/// Failed allocations of one second (`failure_seconds`): which call, how it failed, how many.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailureSecond {
    pub t_s: u64,
    pub class: Class,
    pub function: String,
    pub error: String,
    pub count: u64,
}

/// Entries of a phase in one second (`phase_activity`): the requests a serving phase saw then.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PhaseActivity {
    pub t_s: u64,
    pub phase: String,
    pub entries: u64,
}

/// Phases in which a server serves requests (the built-in profiles' and the usual rule names):
/// growth there scales with traffic. In order of preference for counting requests: a phase
/// entered once a request first (llama.cpp's decode is entered once a token).
pub const SERVING_PHASES: [&str; 4] = ["request", "serve", "prefill", "decode"];

/// The serving phase whose entries count the requests: the first of `SERVING_PHASES` that was
/// entered at all.
pub fn request_phase(activity: &[PhaseActivity]) -> Option<&'static str> {
    (SERVING_PHASES.iter())
        .find(|p| activity.iter().any(|a| a.phase == **p && a.entries > 0))
        .copied()
}

/// Where the leak suspects' judged part begins.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Warmup {
    /// This many seconds into the recording.
    Seconds(f64),
    /// After this many requests (entries of `request_phase`): the end of the second in which
    /// they were reached.
    Requests(u64),
}

impl Warmup {
    /// In seconds, for a recording with `activity`; `Err` says why requests cannot tell it.
    pub fn seconds(self, activity: &[PhaseActivity], duration_s: f64) -> Result<f64, String> {
        let n = match self {
            Warmup::Seconds(s) => return Ok(s),
            Warmup::Requests(n) => n,
        };
        let phase = request_phase(activity).ok_or(
            "--warmup-requests: the recording counted no requests (no entries of a serving \
             phase: record with --phase serve=LIB:FUNCTION, or a built-in profile's server)",
        )?;
        let mut seen = 0;
        for a in activity.iter().filter(|a| a.phase == phase) {
            seen += a.entries;
            if seen >= n {
                return Ok((a.t_s + 1) as f64);
            }
        }
        // Never reached: nothing is judged (the warm-up covers the whole recording).
        Ok(duration_s.max(0.0) + 1.0)
    }
}

/// One `--phase` rule and how often its function was entered (requests, for a serving phase).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PhaseRuleFigures {
    pub name: String,
    /// As given: `NAME=LIB:SYMBOL` or `NAME=py:MODULE:QUALNAME`.
    pub rule: String,
    /// The file its native function is in; None for a Python function.
    pub file: Option<String>,
    /// Calls of its native function; None for a Python function (told from stacks, not
    /// counted).
    pub entries: Option<u64>,
}

/// Blocks of a class allocated in one phase and freed in another (or the same).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PhaseFrees {
    pub class: Class,
    pub allocated_in: String,
    pub freed_in: String,
    pub bytes: u64,
    pub count: u64,
}

/// The tracer's own memory limit (`record --max-memory`) and what it cost the recording.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryLimit {
    pub limit_bytes: u64,
    /// Times the tracer's caches (unwind tables, symbols) were dropped to stay within it.
    pub caches_dropped: u64,
    /// Events recorded without their stack (under one `[stack not kept ...]` frame) once
    /// dropping caches was not enough; every byte is still counted.
    pub stacks_not_kept: u64,
}

/// Windows whose start a recording keeps (`HeapDuty::window_starts_s`): a day and more of
/// windows every ten seconds, in 100 KB or so of the JSON report.
pub const MAX_WINDOW_STARTS: usize = 10_000;

/// A duty-cycled heap: the allocation probes are attached for a window, the free probes for
/// the window and a grace period, then both detached until the next window. The heap's figures
/// are those of the blocks allocated inside windows; `live` are those that outlived their window
/// and grace: the long-lived candidates, whose steady growth across windows is a leak.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct HeapDuty {
    /// `--heap-budget`, percent of the traced processes' time; None with a fixed `--heap-duty`.
    pub budget_percent: Option<f64>,
    /// Share of the time the allocation probes were meant to be on (the last one chosen).
    pub duty: f64,
    /// Seconds a window was meant to last, and of grace after it at most (`--heap-grace`).
    pub window_s: f64,
    pub grace_s: f64,
    /// Seconds the last graces lasted (their median; `grace_s` before one ended): a grace ends
    /// once the window's blocks stop dying, and a cycle is priced at it.
    #[serde(default)]
    pub grace_taken_s: f64,
    /// Windows opened.
    pub windows: u64,
    /// Seconds the allocation probes were on, all windows together (attaching and detaching
    /// included): what a stack's leak rate is estimated over.
    pub on_s: f64,
    /// Heap calls per second of the traced processes while the probes were on (last window).
    pub calls_per_s: f64,
    /// Share of the traced processes' CPU time the probes took while on (the last windows: the
    /// kernel's count of the programs' run time, and a trap per traced run at `trap_ns`;
    /// docs/accounting.md).
    pub probe_share: f64,
    /// The same share while a window's allocation probes are detached: their traps alone.
    #[serde(default)]
    pub detach_probe_share: f64,
    /// The same share for the free probe alone, in the last graces (what a grace costs).
    #[serde(default)]
    pub free_probe_share: f64,
    /// Seconds detaching a window's allocation probes took (the last one timed).
    #[serde(default)]
    pub detach_s: f64,
    /// What a trap cost the traced processes, in nanoseconds, as measured on them (a window
    /// against its grace; `heap_duty::trap_cost`), or as assumed until a grace measured it.
    #[serde(default)]
    pub trap_ns: f64,
    /// When each window opened, seconds since the recording started (the first
    /// `MAX_WINDOW_STARTS`): which windows a stack's survivors came from.
    #[serde(default)]
    pub window_starts_s: Vec<f64>,
    /// Blocks found freed while the probes were off (their address was allocated again in a
    /// later window): no longer live, not lost.
    pub freed_unseen: u64,
}

/// Non-allocating CUDA calls by (pid, function, stack).
pub type CudaCalls = BTreeMap<(u32, String, Option<StackIndex>), CallCounts>;

/// How often a call ran, and how often it failed (a non-zero CUresult).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallCounts {
    pub calls: u64,
    pub failed: u64,
}

/// Resident memory of a traced process at one second, from /proc/PID/status (bytes), with the
/// allocator arena the mapping layer saw (mapped, accessible bytes made inside allocator calls).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RssSample {
    pub t_s: u64,
    pub pid: u32,
    /// VmRSS = anon + file + shmem.
    pub rss: u64,
    pub anon: u64,
    pub file: u64,
    pub shmem: u64,
    pub swap: u64,
    /// Allocator arena traced since attach (brk growth and mmaps made inside malloc calls when
    /// heap tracing is on).
    pub arena: u64,
    /// Resident bytes of the traced anonymous mappings (classes mmap, thread-stack,
    /// python-arena), from /proc/PID/smaps.
    pub traced_resident: u64,
    /// Resident bytes of the traced allocator arena, from /proc/PID/smaps.
    pub arena_resident: u64,
}

/// GPU memory of a traced process at one second: what the driver reports (NVML) and what the
/// device classes traced.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuSample {
    pub t_s: u64,
    pub pid: u32,
    /// Bytes the driver reports for the process.
    pub used: u64,
    /// Live bytes of its device classes (cuda, cuda-pool, cuda-vmm, cuda-graph, cuda-managed).
    pub traced: u64,
}

impl Class {
    /// Device memory the process obtained itself through traced calls: what NVML's per-process
    /// figure is reconciled against.
    pub fn is_device(self) -> bool {
        matches!(
            self,
            Class::Cuda | Class::CudaPool | Class::CudaVmm | Class::CudaGraph | Class::CudaManaged
        )
    }
}

/// The figures of one device's PyTorch caching allocator at one moment (`ledger::torch`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllocatorFigures {
    pub pid: u32,
    pub device: i32,
    /// Served by the `cudaMallocAsync` backend: no segments of its own, tensors only.
    pub async_backend: bool,
    /// Segment bytes unmapped at the driver while the allocator holds them (vLLM's sleep mode).
    pub sleeping: u64,
    /// Bytes of the segments (what the allocator holds from the driver).
    pub reserved: u64,
    /// Requested bytes of the live tensor blocks.
    pub allocated: u64,
    /// Requested bytes of blocks freed by their owner, still in use on another stream.
    pub pending: u64,
    pub segments: u64,
    pub blocks: u64,
    /// Free holes: count, bytes in them, the largest.
    pub holes: u64,
    pub hole_bytes: u64,
    pub largest_hole: u64,
    /// Private pools (CUDA graphs' and users' `MempoolId_t` other than {0, 0}) with segments, and
    /// their share of `reserved` and `allocated` (torch 2.8 on; 0 where the pool is not passed).
    pub private_pools: u64,
    pub private_reserved: u64,
    pub private_allocated: u64,
}

impl AllocatorFigures {
    /// Reserved, neither allocated nor pending.
    pub fn cached(&self) -> u64 {
        self.reserved
            .saturating_sub(self.allocated)
            .saturating_sub(self.pending)
    }

    /// `1 − largest hole / bytes in holes`, in thousandths rounded down (0 without holes).
    pub fn fragmentation_permille(&self) -> u64 {
        if self.hole_bytes == 0 {
            return 0;
        }
        // (A recording is input: a largest hole over the total reads as no fragmentation.)
        let outside_largest = u128::from(self.hole_bytes.saturating_sub(self.largest_hole));
        (outside_largest * 1000 / u128::from(self.hole_bytes)) as u64
    }
}

/// An allocation the device could not hold.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllocatorOom {
    /// Seconds from the start of the recording (the second it was committed in).
    pub t_s: u64,
    /// Requested bytes.
    pub requested: u64,
    /// Free device bytes the allocator saw.
    pub device_free: u64,
    pub stack: Option<StackIndex>,
    /// The allocator's figures right before the failure.
    pub figures: AllocatorFigures,
}

/// A caching allocator's figures at a second they changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllocatorSample {
    pub t_s: u64,
    pub figures: AllocatorFigures,
}

/// One point of the time series: live bytes of a (class, phase, stack) cell at a second.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeriesPoint {
    /// Seconds since the recording started.
    pub t_s: u64,
    pub key: CellKey,
    pub live_bytes: u64,
    pub live_count: u64,
}
