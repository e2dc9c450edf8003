//! Every map and load-time global of the object, in one place: what each holds and who sizes it.
//! User space (`alloctrace::probes`) finds them by these names.

use aya_ebpf::bindings::BPF_F_NO_PREALLOC;
use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
};
use tracer_common::{
    AllocEvent, CudaCallEvent, CudaCallSlot, FaultEvent, INFLIGHT_SLOTS, InflightCall, MapEvent,
    StackRecord, SyscallArgs, TorchEvent, drop_cause, heap_ledger,
    heap_ledger::{BlockKey, HeapLive, HeldBlock, RecentBlock, StackTotals, TracedProcess},
    heap_sample, heap_window, ledger_stat,
    phase::{self, PhaseFrees, PhasePredicate, ThreadPhases},
    python::PythonOffsets,
    stack_stat,
};

use crate::traced::CachedProcess;

// ---- Maps ----

/// Events to user space. Sized by user space at load time (`--ring-size`).
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(16 << 20, 0);

/// Arguments of heap allocation calls in flight, one slot per thread (`tid % INFLIGHT_SLOTS`).
/// An array slot costs a few nanoseconds where a hash-map insert and delete cost hundreds.
#[map]
pub static INFLIGHT: Array<InflightCall> = Array::with_max_entries(INFLIGHT_SLOTS, 0);

/// CUDA driver allocation calls in flight, apart from the heap's: the driver mallocs for itself
/// inside its calls, and those are heap allocations of their own, not part of the CUDA call.
#[map]
pub static CUDA_INFLIGHT: Array<InflightCall> = Array::with_max_entries(INFLIGHT_SLOTS, 0);

/// CUDA runtime (libcudart) allocation calls in flight: the driver call nested in one is
/// annotated with it; the runtime call itself counts nothing (the driver does), but its failure
/// is recorded when the driver did not fail first.
#[map]
pub static RUNTIME_INFLIGHT: Array<InflightCall> = Array::with_max_entries(INFLIGHT_SLOTS, 0);

/// Non-allocating CUDA driver calls in flight (VMM, capture, graphs, pools, IPC, registration,
/// context and module loads), one slot per thread: their arguments until the CUresult is known.
#[map]
pub static CALL_INFLIGHT: Array<CudaCallSlot> = Array::with_max_entries(INFLIGHT_SLOTS, 0);

/// Scratch records hold a stack copy of up to 32 KiB, more than a per-CPU map value may hold:
/// they are arrays with one slot per possible CPU (user space sets the size at load), indexed by
/// the current CPU (programs run with migration disabled).
const SCRATCH_SLOTS: u32 = 1024;

/// Per-CPU scratch where an allocation record is assembled before its used part is copied out.
#[map]
pub static SCRATCH: Array<StackRecord<AllocEvent>> = Array::with_max_entries(SCRATCH_SLOTS, 0);

/// Per-CPU scratch for a mapping record.
#[map]
pub static MAP_SCRATCH: Array<StackRecord<MapEvent>> = Array::with_max_entries(SCRATCH_SLOTS, 0);

/// Per-CPU scratch for a non-allocating CUDA call record.
#[map]
pub static CALL_SCRATCH: Array<StackRecord<CudaCallEvent>> =
    Array::with_max_entries(SCRATCH_SLOTS, 0);

/// Per-CPU scratch for a PyTorch caching-allocator record.
#[map]
pub static TORCH_SCRATCH: Array<StackRecord<TorchEvent>> =
    Array::with_max_entries(SCRATCH_SLOTS, 0);

/// Per-CPU scratch for a page-fault record.
#[map]
pub static FAULT_SCRATCH: Array<StackRecord<FaultEvent>> =
    Array::with_max_entries(SCRATCH_SLOTS, 0);

/// Traced processes, by tgid: their image generation and cached settings (`TracedProcess`).
/// Tracepoints fire for every process on the machine; this filter is their first instruction.
/// User space only inserts (never over an entry); the kernel writes the values.
#[map]
pub static TARGETS: HashMap<u32, TracedProcess> = HashMap::with_max_entries(4096, 0);

/// Moved on by the kernel each time a `TARGETS` entry it had stops being true (an exec moves a
/// generation on, an exit removes a process): every CPU's `TRACED_CACHE` entry read before it
/// moved is then stale (one entry). User space's inserts need not move it: the caches hold
/// only processes that were traced.
#[map]
pub static TARGETS_EPOCH: Array<u64> = Array::with_max_entries(1, 0);

/// The traced process a heap call on this CPU last looked up (`traced.rs`), so that the
/// calls of one process skip the `TARGETS` lookup (one entry).
#[map]
pub static TRACED_CACHE: PerCpuArray<CachedProcess> = PerCpuArray::with_max_entries(1, 0);

/// Arguments of memory syscalls in flight, by `pid_tgid`.
#[map]
pub static SYSCALL_ARGS: HashMap<u64, SyscallArgs> = HashMap::with_max_entries(16384, 0);

/// Where the CPython interpreter of a traced process keeps its frames, by tgid (user space
/// detects it and fills this in).
#[map]
pub static PY_OFFSETS: HashMap<u32, PythonOffsets> = HashMap::with_max_entries(1024, 0);

/// Stack captures by `stack_stat`.
#[map]
pub static STACK_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(stack_stat::COUNT, 0);

/// Lost events by `drop_cause`.
#[map]
pub static DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(drop_cause::COUNT, 0);

/// Per-CPU count of faults seen, for sampling.
#[map]
pub static FAULT_COUNT: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// One slot through which a value passes to lose what the verifier knows of it
/// (`stack::forget_value`).
#[map]
pub static LAUNDRY: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// `--heap-sample`: the live blocks recorded, by process and address, so that only their frees
/// are emitted. Sized by user space (1 entry when not sampling).
#[map]
pub static SAMPLED: HashMap<BlockKey, u32> = HashMap::with_max_entries(1 << 18, 0);

/// The kernel's heap ledger (`heap_ledger.rs`): live blocks whose stacks user space knows.
/// Sized by user space (1 entry when the kernel keeps no ledger); allocated as it fills.
#[map]
pub static HELD_BLOCKS: HashMap<BlockKey, HeldBlock> =
    HashMap::with_max_entries(heap_ledger::DEFAULT_BLOCKS, BPF_F_NO_PREALLOC);

/// The kernel's heap ledger's recent blocks (`heap_recent.rs`): a direct-mapped table by
/// process and address. Sized by user space (`heap_ledger::recent_slots`; 1 entry when
/// unused).
#[map]
pub static RECENT_BLOCKS: Array<RecentBlock> = Array::with_max_entries(1, 0);

/// The kernel's heap ledger: what was allocated and freed per stack key, for the stacks user
/// space was sent. User space reads it once a second and removes a process image's keys when
/// the image goes (exec).
#[map]
pub static STACK_TOTALS: HashMap<u64, StackTotals> =
    HashMap::with_max_entries(heap_ledger::STACKS, BPF_F_NO_PREALLOC);

/// The kernel's heap ledger: native frames a stack key covers, by tgid (user space sets it for
/// a process whose frame-pointer walks run into code built without frame pointers, where every
/// frame past the first is whatever the stack held: keys would never repeat). Absent: all.
#[map]
pub static KEY_FRAMES: HashMap<u32, u32> = HashMap::with_max_entries(4096, 0);

/// Moved on by user space after each change to `KEY_FRAMES` or `PY_OFFSETS` (one entry): a
/// heap call then reads its process's entries in them again, and caches them in its `TARGETS`
/// value (`heap_ledger::settings`) until the next move; two hash lookups a call saved.
#[map]
pub static SETTINGS_VERSION: Array<u32> = Array::with_max_entries(1, 0);

/// The kernel's heap ledger: live heap bytes of every traced process together, and their peak
/// (one entry).
#[map]
pub static HEAP_LIVE: Array<HeapLive> = Array::with_max_entries(1, 0);

/// Duty-cycled heap: whether the allocation and free probes' windows are open, by
/// `heap_window` (user space writes it).
#[map]
pub static HEAP_WINDOW: Array<u32> = Array::with_max_entries(heap_window::COUNT, 0);

/// The heap probes' counters, by `ledger_stat`.
#[map]
pub static LEDGER_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(ledger_stat::COUNT, 0);

/// `--heap-sample`: `exp(−i / 64)` as a fraction of 2^32 (`tracer_common::heap_sample`), filled
/// by user space at load.
#[map]
pub static SAMPLE_EXP: Array<u32> = Array::with_max_entries(heap_sample::TABLE_LEN, 0);

/// `record --phase`: the phases each thread is in, by tid (`phase.rs`). LRU: a thread that
/// exits inside a phase leaves its entry behind.
#[map]
pub static THREAD_PHASES: LruHashMap<u32, ThreadPhases> = LruHashMap::with_max_entries(1 << 16, 0);

/// `record --phase`: slot `phase::ON` is 1 once a native phase rule is attached (user space sets
/// it then, which may be late: a server library mapped after start); records carry their
/// thread's phase from then on. Slot `phase::IDLE_MS`: the idle threshold (`--idle-after`). A
/// map, not a load-time global: one array read per event while 0.
#[map]
pub static PHASES_ON: Array<u32> = Array::with_max_entries(2, 0);

/// `record --phase`: when each traced process (by tgid) last showed activity (ns since boot):
/// the idle phase begins the idle threshold after it.
#[map]
pub static LAST_ACTIVITY: LruHashMap<u32, u64> = LruHashMap::with_max_entries(1 << 12, 0);

/// `record --phase`: each rule's condition on its call (by phase id; none: always).
#[map]
pub static PHASE_PREDICATES: Array<PhasePredicate> = Array::with_max_entries(phase::IDS as u32, 0);

/// `record --phase`: entries of each phase (by phase id), per CPU.
#[map]
pub static PHASE_ENTRIES: PerCpuArray<u64> = PerCpuArray::with_max_entries(phase::ENTRIES, 0);

/// `record --phase`: the kernel's heap ledger's frees by (allocated-in, freed-in) phase (one
/// value).
#[map]
pub static PHASE_FREES: Array<PhaseFrees> = Array::with_max_entries(1, 0);

// ---- Load-time globals (set by user space, `tracer_common::global`; read with `global`) ----

/// 1: follow the children of traced processes.
#[unsafe(no_mangle)]
pub static FOLLOW_CHILDREN: u32 = 0;

/// Record one of every N not-present page faults of traced processes; 0: off.
#[unsafe(no_mangle)]
pub static FAULT_SAMPLE: u32 = 0;

/// `--stack`, `--stack-copy`: bytes of user stack copied into heap events (and sampled faults)
/// and into the others (mappings, CUDA calls, failures); 0: a frame-pointer walk instead.
#[unsafe(no_mangle)]
pub static STACK_COPY_HEAP: u32 = 0;
#[unsafe(no_mangle)]
pub static STACK_COPY_OTHER: u32 = 0;

/// For the benchmark (`--stack-copy-always`): copy even when the ring is full, to measure what a
/// copy costs.
#[unsafe(no_mangle)]
pub static STACK_COPY_ALWAYS: u32 = 0;

/// 1 to record Python frames (`record --no-python-frames` clears it).
#[unsafe(no_mangle)]
pub static PYTHON_FRAMES: u32 = 0;

/// 1 to log why events or parts of them are skipped (`record --debug-bpf`). 0 by default: each
/// log site is then one branch on a read-only constant, which the verifier prunes.
#[unsafe(no_mangle)]
pub static DEBUG_LOG: u32 = 0;

/// `--heap-sample`: mean bytes between recorded heap allocations; 0: every one is recorded.
#[unsafe(no_mangle)]
pub static HEAP_SAMPLE_MEAN: u32 = 0;

/// 1: the heap probes fire for every process mapping the allocator; only traced ones count.
#[unsafe(no_mangle)]
pub static HEAP_SYSTEMWIDE: u32 = 0;

/// 1: heap blocks whose stacks user space knows are held and counted in the kernel
/// (`heap_ledger.rs`): exact heap tracing with frame-pointer heap stacks.
#[unsafe(no_mangle)]
pub static HEAP_KERNEL_LEDGER: u32 = 0;

/// Slots of `RECENT_BLOCKS`: a power of two, 0 when the kernel keeps no recent blocks.
#[unsafe(no_mangle)]
pub static HEAP_RECENT_SLOTS: u32 = 0;

/// 1: the heap probes are attached in windows (duty-cycled heap): a held block found live at an
/// address allocated again was freed while the probes were off.
#[unsafe(no_mangle)]
pub static HEAP_DUTY_CYCLED: u32 = 0;

/// With the kernel's heap ledger: the mean bytes between the blocks it has no room for that
/// still go through the ring once the ring is over a quarter full; 0: every one.
#[unsafe(no_mangle)]
pub static HEAP_FULL_SAMPLE_MEAN: u32 = 0;

/// 1: those blocks are sampled whatever the ring holds (tests).
#[unsafe(no_mangle)]
pub static HEAP_FULL_SAMPLE_ALWAYS: u32 = 0;

/// The value user space gave a global at load.
#[inline(always)]
pub fn global(value: &u32) -> u32 {
    // SAFETY: volatile read of a global set at load time (volatile: the compiler must not fold
    // the initializer in).
    unsafe { core::ptr::read_volatile(value) }
}

/// The current CPU's scratch record in `map`: the running program's until it returns
/// (programs run with migration disabled, one at a time per CPU).
#[inline(always)]
pub fn scratch<E>(map: &Array<StackRecord<E>>) -> Option<*mut StackRecord<E>> {
    // SAFETY: the helper has no preconditions.
    let cpu = unsafe { aya_ebpf::helpers::generated::bpf_get_smp_processor_id() };
    map.get_ptr_mut(cpu)
}
