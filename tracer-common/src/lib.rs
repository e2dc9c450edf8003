//! Types shared by the eBPF programs and user space: events, in-flight call state, drop causes,
//! hook cookies (`cookie`), the stack area of records (`stack`), the names of the object's
//! load-time globals (`global`).
//!
//! Every type is `#[repr(C)]` with explicit padding so that both sides agree on the layout and
//! `aya::Pod` is sound (no implicit padding bytes).
#![cfg_attr(not(test), no_std)]

use core::mem::size_of;

mod cookie;
pub mod python;
mod stack;

pub use cookie::{Cookie, EnclosingCalls, HeapFn};
pub use stack::{
    MAX_FRAMES, PY_FRAMES_AT_MOST, STACK_AREA_WORDS, STACK_COPY, STACK_COPY_MAX,
    STACK_SP_CANDIDATE, STACK_TRUNCATED, StackArea, StackCopyHeader, StackEvent, StackRecord,
};

/// Event kinds, the first `u32` of every ring-buffer record.
pub mod event_kind {
    /// `AllocEvent`: a heap or CUDA allocation call returned.
    pub const ALLOC: u32 = 1;
    /// `FreeEvent`: a heap or CUDA block was released.
    pub const FREE: u32 = 2;
    pub const MAP: u32 = 3;
    pub const PROC: u32 = 4;
    pub const FAULT: u32 = 5;
    pub const CUDA_CALL: u32 = 6;
    /// `TorchEvent`: an event of PyTorch's CUDA caching allocator.
    pub const TORCH: u32 = 7;
    /// `AllocEvent` layout: the stack of a heap stack key the kernel's heap ledger counts
    /// (`heap_ledger`), with the call that first made it; counts nothing itself.
    pub const HEAP_STACK: u32 = 8;
}

/// PyTorch's caching-allocator actions (`TraceEntry::Action`, the same values in every version
/// since 2.1), as passed to `DeviceCachingAllocator::record_trace`.
pub mod torch_action {
    /// A tensor block handed out: block address, requested size.
    pub const ALLOC: u32 = 0;
    /// A tensor block released by its owner (still held while other streams use it).
    pub const FREE_REQUESTED: u32 = 1;
    /// The block is back in the cache.
    pub const FREE_COMPLETED: u32 = 2;
    /// A segment obtained from the driver: address, size.
    pub const SEGMENT_ALLOC: u32 = 3;
    /// A segment given back to the driver.
    pub const SEGMENT_FREE: u32 = 4;
    /// Expandable segments: a range mapped into the segment.
    pub const SEGMENT_MAP: u32 = 5;
    /// Expandable segments: a range unmapped.
    pub const SEGMENT_UNMAP: u32 = 6;
    pub const SNAPSHOT: u32 = 7;
    /// An allocation the device could not hold: free device bytes, requested size.
    pub const OOM: u32 = 8;
    /// Not PyTorch's: the `cudaMallocAsync` backend's `mallocAsync` was entered (requested size,
    /// device, stream; the block is the driver allocation this thread makes next of that size).
    pub const ASYNC_MALLOC: u32 = 100;
    /// Not PyTorch's: the `cudaMallocAsync` backend's `freeAsync` (the block's address).
    pub const ASYNC_FREE: u32 = 101;
    /// Not PyTorch's: the pinned host caching allocator handed a block to a tensor (address,
    /// the block's size; `stream` holds the `HostBlock*`).
    pub const PINNED_ALLOC: u32 = 102;
    /// Not PyTorch's: a tensor released its pinned block (the same fields).
    pub const PINNED_FREE: u32 = 103;
}

/// PyTorch's pinned host `HostBlock` (torch 2.4–2.15): where its size and address lie.
pub mod host_block {
    /// `size_t size_`, the block's (rounded) size.
    pub const SIZE_AT: u64 = 0x28;
    /// `void* ptr_`, its memory.
    pub const PTR_AT: u64 = 0x30;
    /// In the `at::DataPtr` the allocator returns: the context (the `HostBlock*`).
    pub const DATA_PTR_CTX_AT: u64 = 0x10;
}

/// An event of PyTorch's CUDA caching allocator, read at the entry of `record_trace` (or of the
/// `cudaMallocAsync` backend's `mallocAsync`/`freeAsync`), with the stack of the allocator's
/// caller for the actions that create something (`nframes` addresses follow); none for the
/// others.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct TorchEvent {
    /// `event_kind::TORCH`.
    pub kind: u32,
    pub tgid: u32,
    /// `torch_action`.
    pub action: u32,
    /// The device index (a signed char or int in the allocator).
    pub device: i32,
    pub addr: u64,
    pub size: u64,
    /// The CUDA stream (an opaque pointer).
    pub stream: u64,
    /// The memory pool (`MempoolId_t`): {0, 0} for the default pools, else a CUDA graph's or a
    /// user's private pool. Zero where the form of `record_trace` does not pass it.
    pub pool: [u64; 2],
    /// The calling thread.
    pub tid: u32,
    pub nframes: u16,
    pub stack_flags: u16,
    /// The calling thread's phase (`phase`), 0 for none.
    pub phase: u32,
    pub _pad: u32,
}

/// A hooked CUDA driver call that is not an allocation (VMM map/unmap/release, capture, graphs,
/// pools, IPC, host registration, context and module loads), emitted at its return with its first
/// five arguments, its CUresult and the user stack (`nframes` addresses follow in the ring).
/// `func` is the attach cookie.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct CudaCallEvent {
    /// `event_kind::CUDA_CALL`.
    pub kind: u32,
    pub tgid: u32,
    pub func: u32,
    /// The calling thread (capture state is per thread).
    pub tid: u32,
    pub args: [u64; 5],
    /// What the call wrote through its out-pointer when it returned 0 (`OutMode`), else 0.
    pub out: u64,
    /// The CUresult.
    pub ret: i32,
    pub nframes: u16,
    pub stack_flags: u16,
}

/// What a CUDA call's return probe reads through the out-pointer saved at entry.
pub mod out_mode {
    /// Nothing.
    pub const NONE: u32 = 0;
    /// The u64 it points to (a handle, a device pointer).
    pub const READ_U64: u32 = 1;
    /// A 64-bit fingerprint of the 64 bytes it points to (a CUipcMemHandle).
    pub const FINGERPRINT_64_BYTES: u32 = 2;
}

/// A CUDA call in flight between its entry and return probes (one slot per thread).
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct CudaCallSlot {
    /// `pid_tgid` of the thread holding the slot; 0 when free.
    pub owner: u64,
    pub args: [u64; 5],
    /// Address read at return (`out_mode`), 0 for none.
    pub out_ptr: u64,
    pub func: u32,
    pub out_mode: u32,
}

/// A sampled page fault that brought a new page in (page not present), with the stack that
/// touched it. Followed in the ring by `nframes` stack addresses. `weight` faults are behind one
/// sample.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct FaultEvent {
    /// `event_kind::FAULT`.
    pub kind: u32,
    pub tgid: u32,
    pub nframes: u16,
    pub stack_flags: u16,
    pub weight: u32,
    pub address: u64,
}

/// `ProcEvent::op`.
pub mod proc_op {
    /// A traced process forked a child (not a thread); the child is traced from its birth.
    pub const FORK: u32 = 1;
    /// A traced process replaced its image.
    pub const EXEC: u32 = 2;
    /// A traced process's main thread exited.
    pub const EXIT: u32 = 3;
}

/// A process-tree change of a traced process.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct ProcEvent {
    /// `event_kind::PROC`.
    pub kind: u32,
    /// `proc_op`.
    pub op: u32,
    /// The process the event is about (the child, for FORK).
    pub pid: u32,
    /// FORK: the parent; otherwise 0.
    pub parent: u32,
}

/// Memory syscalls traced with tracepoints (`MapEvent::op`): the x86-64 syscall numbers.
pub mod map_op {
    pub const MMAP: u32 = 9;
    pub const MPROTECT: u32 = 10;
    pub const MUNMAP: u32 = 11;
    pub const BRK: u32 = 12;
    pub const MREMAP: u32 = 25;
    pub const MADVISE: u32 = 28;
}

/// `MapEvent::flags`: the syscall was made from inside a hooked allocator call (heap tracing on),
/// so its memory is the allocator's arena, already counted block by block in class `heap`.
pub const MAP_FROM_ALLOCATOR: u32 = 1;

/// Arguments of a memory syscall saved at entry until its exit, keyed by `pid_tgid`.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct SyscallArgs {
    pub args: [u64; 5],
    pub op: u32,
    pub flags: u32,
}

/// A completed memory syscall. Followed in the ring by `nframes` stack addresses, like
/// `AllocEvent`.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct MapEvent {
    /// `event_kind::MAP`.
    pub kind: u32,
    pub tgid: u32,
    pub tid: u32,
    pub nframes: u16,
    pub stack_flags: u16,
    /// `map_op`.
    pub op: u32,
    /// `MAP_FROM_ALLOCATOR`.
    pub flags: u32,
    /// The syscall's return value (the mapping's address, the new break, or 0).
    pub ret: u64,
    /// The syscall's arguments: mmap (addr, len, prot, flags, fd), munmap (addr, len),
    /// mprotect (addr, len, prot), mremap (old_addr, old_len, new_len, flags, new_addr), brk (brk),
    /// madvise (addr, len, advice).
    pub args: [u64; 5],
    /// The calling thread's phase (`phase`), 0 for none.
    pub phase: u32,
    pub _pad: u32,
}

/// A completed allocation call (successful or failed), heap or CUDA, emitted at the function's
/// return. In the ring buffer it is followed by its user stack (`StackEvent`: `nframes`
/// addresses, innermost first: the return address into the allocator's caller, then the
/// frame-pointer chain; or a stack copy).
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct AllocEvent {
    /// `event_kind::ALLOC`.
    pub kind: u32,
    pub tgid: u32,
    pub tid: u32,
    /// Valid entries of the stack.
    pub nframes: u16,
    /// `STACK_TRUNCATED`, `STACK_SP_CANDIDATE`, `STACK_COPY`, the Python frame count.
    pub stack_flags: u16,
    /// The returned block, 0 when the call failed (or when `realloc(p, 0)` freed `p`).
    pub addr: u64,
    /// Requested bytes (`nmemb * size` for calloc/reallocarray; saturated on overflow).
    pub size: u64,
    /// Where the block comes from, by the kind of call: `old_block` for realloc/reallocarray,
    /// `enclosing_calls` for CUDA allocations; 0 for none.
    pub origin: u64,
    /// 0 on success; an errno for failures (posix_memalign's return value, else ENOMEM); a
    /// CUresult / cudaError_t for CUDA calls.
    pub err: i32,
    /// The hook's `Cookie`, encoded.
    pub func: u32,
    /// CUDA: the pool of cuMemAllocFromPoolAsync, the graph of cuGraphAddMemAllocNode; 0 else.
    pub aux: u64,
    /// `event_kind::HEAP_STACK`: the key the kernel's heap ledger counts this stack under;
    /// 0 else.
    pub stack_key: u64,
    /// The calling thread's phase (`phase`) when the call was made, 0 for none; a
    /// `HEAP_STACK`'s is its key's.
    pub phase: u32,
    pub _pad: u32,
}

impl AllocEvent {
    /// realloc/reallocarray: the block passed in (0 for the other heap functions).
    pub const fn old_block(&self) -> u64 {
        self.origin
    }

    /// CUDA allocations: the runtime and driver calls in flight around this one.
    pub const fn enclosing_calls(&self) -> EnclosingCalls {
        EnclosingCalls::unpack(self.origin)
    }
}

/// A release of a non-NULL block (`free`, a CUDA free), emitted at entry.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct FreeEvent {
    /// `event_kind::FREE`.
    pub kind: u32,
    pub tgid: u32,
    pub addr: u64,
    /// The freeing thread's phase (`phase`), 0 for none.
    pub phase: u32,
    pub _pad: u32,
}

/// Slots of the in-flight call table: a thread uses slot `tid % INFLIGHT_SLOTS`.
pub const INFLIGHT_SLOTS: u32 = 65536;

/// Arguments saved at an allocation's entry until its return, in the slot of the calling thread.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct InflightCall {
    /// `pid_tgid` of the thread holding the slot; 0 when free.
    pub owner: u64,
    pub size: u64,
    /// realloc/reallocarray: the block passed in (the event's `origin`).
    pub old_block: u64,
    /// Where the call writes the block, read at return: posix_memalign's `void **memptr`, a
    /// CUDA call's out-pointer; 0 for pointer-returning functions.
    pub out_ptr: u64,
    /// Copied into the event's `aux`.
    pub aux: u64,
    /// cuMemAllocPitch: the `size_t *pPitch` written by the call; the size is `size` (the
    /// height) times the pitch. 0 otherwise.
    pub size_ptr: u64,
    pub func: u32,
    /// Nested calls of hooked functions inside this one (glibc's realloc calls malloc and free
    /// internally); they are not separate allocations.
    pub depth: u32,
}

/// How stacks were taken, counted per CPU in `STACK_STATS`.
pub mod stack_stat {
    /// Stacks copied for DWARF unwinding.
    pub const COPIES: u32 = 0;
    /// Stacks that were to be copied but got the frame-pointer walk because the ring buffer was
    /// a quarter full.
    pub const FP_UNDER_PRESSURE: u32 = 1;
    pub const COUNT: u32 = 2;
}

/// Why an event or a part of it was lost. Index into the per-CPU `DROPS` array.
pub mod drop_cause {
    /// The ring buffer had no room: the event is gone.
    pub const RINGBUF_FULL: u32 = 0;
    /// Another thread (same `tid % INFLIGHT_SLOTS`) was inside an allocation call at the same
    /// moment: this call was not traced.
    pub const INFLIGHT_BUSY: u32 = 1;
    /// posix_memalign's result pointer could not be read from user memory: event kept as failure.
    pub const READ_FAILED: u32 = 2;
    /// `--heap-sample`: the kernel's set of sampled live blocks was full; the block was not
    /// recorded (its free could not have been matched).
    pub const SAMPLED_SET_FULL: u32 = 3;
    /// The kernel's heap ledger saw an allocation at an address it held live: the free of
    /// the block that lived there was not seen (the user-space ledger counts its own alike).
    pub const MISSED_FREE: u32 = 4;
    pub const COUNT: u32 = 5;

    pub const NAMES: [&str; COUNT as usize] = [
        "ringbuf_full",
        "inflight_slot_busy",
        "user_read_failed",
        "sampled_set_full",
        "missed_free",
    ];
}

/// The kernel's heap ledger (exact `--heap` with frame-pointer heap stacks): every heap block
/// stays in the kernel, keyed by process and address, and is counted in its stack's totals
/// (keyed by a hash of the stack); its free is matched there. The ring carries each stack once
/// (`event_kind::HEAP_STACK`, retried until the ring takes it), failures, and what the kernel
/// could not hold; user space reads each stack's totals once a second: no call rate can outrun
/// it. The kernel also keeps the heap's live bytes and exact peak at every call.
pub mod heap_ledger {
    /// A traced process (`TARGETS`, by tgid): its image generation (1 + the execs seen since
    /// it was traced), which its heap stacks' keys and totals include. It also caches what
    /// user space set for the process in other maps (`KEY_FRAMES`, `PY_OFFSETS`), read again
    /// when `SETTINGS_VERSION` moves (`settings`: the kernel's own encoding, 0 until first
    /// read). Heap calls read it through a per-CPU cache (`tracer-ebpf/src/traced.rs`).
    #[repr(C)]
    #[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
    pub struct TracedProcess {
        pub generation: u32,
        pub _pad: u32,
        pub settings: u64,
    }

    impl TracedProcess {
        /// A process from the moment it is traced: its first image.
        pub const NEW: TracedProcess = TracedProcess {
            generation: 1,
            _pad: 0,
            settings: 0,
        };
    }

    /// A live block's key in `HELD_BLOCKS`.
    #[repr(C)]
    #[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Hash)]
    pub struct BlockKey {
        pub tgid: u32,
        pub _pad: u32,
        pub addr: u64,
    }

    /// A live block the kernel holds: its size, its stack's key in `STACK_TOTALS`, and the
    /// image generation of its process when it was made.
    #[repr(C)]
    #[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
    pub struct HeldBlock {
        pub size: u64,
        pub stack_key: u64,
        pub generation: u32,
        /// 1 while a realloc of the block is in flight: the realloc may free it inside, and
        /// another thread's allocation may get the address before the realloc returns.
        pub reallocating: u16,
        /// The phase it was allocated in (`phase`): its free is counted in `PHASE_FREES`.
        pub phase: u16,
    }

    /// A slot of `RECENT_BLOCKS`: a block held there, out of `HELD_BLOCKS`, from its
    /// allocation to its free (most heap blocks die young; a slot costs two array reads and
    /// three atomic operations a pair, the hash table an insert, a lookup and a delete).
    /// `owner` says who may touch the rest: `RECENT_EMPTY`, `RECENT_BUSY` while one program
    /// fills, changes or empties it, else the address of the block it holds. `spilled`, in
    /// the first slot of a pair, is outside that: how many blocks hashing to the pair
    /// `HELD_BLOCKS` holds, counted atomically (while it is 0, a block's allocation and free
    /// need not look there).
    #[repr(C)]
    #[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
    pub struct RecentBlock {
        pub owner: u64,
        pub tgid: u32,
        pub spilled: u32,
        pub block: HeldBlock,
    }

    /// `RecentBlock::owner` of an empty slot.
    pub const RECENT_EMPTY: u64 = 0;
    /// `RecentBlock::owner` of a slot a program is filling, changing or emptying (no heap
    /// block's address: blocks are aligned).
    pub const RECENT_BUSY: u64 = 1;
    /// `RECENT_BLOCKS` slots at most.
    pub const RECENT_SLOTS_MAX: u32 = 1 << 16;

    /// Slots of `RECENT_BLOCKS` for a ledger of `blocks` blocks at most: a sixteenth of them,
    /// a power of two (blocks hash to a pair of slots), at most `RECENT_SLOTS_MAX`; 0 (none)
    /// for a ledger of under 32 blocks. `HELD_BLOCKS` holds the rest, so that the kernel holds
    /// `blocks` at most all told.
    pub fn recent_slots(blocks: u32) -> u32 {
        let slots = (blocks / 16).min(RECENT_SLOTS_MAX);
        if slots < 2 {
            return 0;
        }
        1 << (31 - slots.leading_zeros())
    }

    /// Live heap bytes of the traced processes as the kernel counts them at every call, and
    /// their highest value (`HEAP_LIVE`): the heap's exact peak.
    #[repr(C)]
    #[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
    pub struct HeapLive {
        pub live: u64,
        pub peak: u64,
        /// 1 once a block found `HELD_BLOCKS` full (user space then holds blocks the kernel
        /// does not know: frees it does not know must reach user space).
        pub full: u64,
    }

    /// What the kernel counted for one stack; the counters only ever grow, so that user space
    /// applies the difference since its last read.
    #[repr(C)]
    #[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
    pub struct StackTotals {
        pub allocated_bytes: u64,
        pub allocated_count: u64,
        pub freed_bytes: u64,
        pub freed_count: u64,
        /// The process whose stack it is.
        pub tgid: u32,
        /// 1 once the stack went to user space (`event_kind::HEAP_STACK`); until then every
        /// block at it tries again.
        pub delivered: u32,
        /// The process's image generation (`TracedProcess`): an exec takes the old image's
        /// live bytes out of `HEAP_LIVE` by summing its stacks' totals.
        pub generation: u32,
        pub _pad: u32,
    }

    impl StackTotals {
        /// The counts of `self` beyond `earlier` (an earlier read of the same stack); the
        /// process, delivery and generation fields zero.
        pub fn since(&self, earlier: &StackTotals) -> StackTotals {
            StackTotals {
                allocated_bytes: self.allocated_bytes.wrapping_sub(earlier.allocated_bytes),
                allocated_count: self.allocated_count.wrapping_sub(earlier.allocated_count),
                freed_bytes: self.freed_bytes.wrapping_sub(earlier.freed_bytes),
                freed_count: self.freed_count.wrapping_sub(earlier.freed_count),
                ..StackTotals::default()
            }
        }

        /// Bytes and blocks live: allocated and not freed.
        pub fn live(&self) -> (u64, u64) {
            (
                self.allocated_bytes.saturating_sub(self.freed_bytes),
                self.allocated_count.saturating_sub(self.freed_count),
            )
        }
    }

    /// Live blocks the kernel holds at most by default (`record --heap-ledger-blocks`); past
    /// that, blocks go through the ring (counted, `ledger_stat::BLOCKS_FULL`).
    pub const DEFAULT_BLOCKS: u32 = 1 << 20;
    /// Distinct stacks (per process and image) the kernel counts at most; past that, a new
    /// stack's blocks go through the ring (counted, `ledger_stat::STACKS_FULL`).
    pub const STACKS: u32 = 1 << 17;
    /// Mean bytes between the blocks a full kernel ledger still sends through a filling ring
    /// (`global::HEAP_FULL_SAMPLE_MEAN`): the bench's `--heap-sample`, a few hundred blocks a
    /// second at PyTorch's malloc rates.
    pub const FULL_SAMPLE_MEAN: u32 = 512 << 10;
}

/// Request phases (`record --phase NAME=LIB:SYMBOL`): a label on each thread, set by an entry
/// probe on a function and ended when that call has returned, carried by every allocation, free
/// and mapping the thread makes. Phase 0 is none; rule `i` (in the order given) is phase `i + 1`.
pub mod phase {
    /// Phases nested in one thread at most; deeper entries are not tracked.
    pub const MAX_DEPTH: usize = 8;
    /// Rules at most (phase ids 1 to `MAX_RULES`).
    pub const MAX_RULES: usize = 30;
    /// Phase ids: none, the rules, and `IDLE` (which makes the table a power of two).
    pub const IDS: usize = 32;
    /// The phase of a thread outside every rule's call in a process that saw no activity (a
    /// rule's entry, an event inside a phase, PyTorch allocator traffic) for the idle threshold
    /// (`PHASES_ON[IDLE_MS]`), once it saw some.
    pub const IDLE: u32 = IDS as u32 - 1;
    /// `PHASES_ON` slots: whether a rule is attached, and the idle threshold in ms (0: no idle
    /// phase).
    pub const ON: u32 = 0;
    pub const IDLE_MS: u32 = 1;
    /// Cells of the free matrix (`PhaseFrees`): a (allocated-in, freed-in) pair each.
    pub const MATRIX_CELLS: usize = IDS * IDS;

    /// The phases a thread entered (`THREAD_PHASES`, by tid), innermost last. No return probe
    /// ends a phase (its trampoline would hide the caller from every stack walk, and a C++
    /// exception unwinding through it ends the process): a call is known to be running while
    /// the thread's stack pointer is at or below the slot its return address was pushed to
    /// (`sp`) and that slot still holds it (`ret`); past that, it has returned (or was unwound).
    #[repr(C)]
    #[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
    pub struct ThreadPhases {
        /// Entries in use (at most `MAX_DEPTH`).
        pub depth: u32,
        pub _pad: u32,
        pub ids: [u32; MAX_DEPTH],
        /// The stack pointer at each call's entry: where its return address lies.
        pub sp: [u64; MAX_DEPTH],
        /// The return address each call was entered with.
        pub ret: [u64; MAX_DEPTH],
    }

    impl ThreadPhases {
        /// The innermost phase, 0 for none.
        pub fn current(&self) -> u32 {
            match self.depth as usize {
                0 => 0,
                d => self.ids[(d - 1) & (MAX_DEPTH - 1)],
            }
        }
    }

    /// The kernel's heap ledger's frees by (allocated-in, freed-in) phase: bytes and blocks,
    /// cell `allocated * IDS + freed` (`PHASE_FREES`, one value; user space reads it whole).
    #[repr(C)]
    #[derive(Copy, Clone, Debug, PartialEq, Eq)]
    pub struct PhaseFrees {
        pub bytes: [u64; MATRIX_CELLS],
        pub count: [u64; MATRIX_CELLS],
    }

    /// Entries of each phase (`PHASE_ENTRIES`, per CPU): the requests a serving phase saw.
    pub const ENTRIES: u32 = IDS as u32;

    /// A condition on a rule's call, checked at its entry: the call is in the rule's phase only
    /// when it holds (`PHASE_PREDICATES`, by phase id). llama.cpp's `llama_decode` with more
    /// than one token in its batch is a prefill: `sp+8:i32 > 1`.
    #[repr(C)]
    #[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
    pub struct PhasePredicate {
        /// `predicate::NONE` (always holds), `ARG` or `STACK`.
        pub kind: u32,
        /// `predicate::GT` ... `predicate::NE`.
        pub op: u32,
        /// ARG: the integer argument's number from 0 (rdi, rsi, rdx, rcx, r8, r9); STACK: the
        /// byte offset from the stack pointer at entry (8: the first argument passed in memory).
        pub at: u32,
        /// The value's size in bytes: 4 or 8.
        pub width: u32,
        /// 1: compared as a signed integer.
        pub signed: u32,
        pub _pad: u32,
        pub value: i64,
    }

    pub mod predicate {
        pub const NONE: u32 = 0;
        pub const ARG: u32 = 1;
        pub const STACK: u32 = 2;
        pub const GT: u32 = 0;
        pub const GE: u32 = 1;
        pub const LT: u32 = 2;
        pub const LE: u32 = 3;
        pub const EQ: u32 = 4;
        pub const NE: u32 = 5;
    }

    impl PhasePredicate {
        /// Whether the condition holds for `raw`, the 8 bytes read at its place (of which
        /// `width` count).
        #[inline(always)]
        pub fn holds(&self, raw: u64) -> bool {
            let ordering = if self.signed != 0 {
                let v = if self.width == 4 {
                    raw as u32 as i32 as i64
                } else {
                    raw as i64
                };
                v.cmp(&self.value)
            } else {
                let v = if self.width == 4 {
                    raw as u32 as u64
                } else {
                    raw
                };
                v.cmp(&(self.value as u64))
            };
            use core::cmp::Ordering::*;
            match self.op {
                predicate::GT => ordering == Greater,
                predicate::GE => ordering != Less,
                predicate::LT => ordering == Less,
                predicate::LE => ordering != Greater,
                predicate::EQ => ordering == Equal,
                _ => ordering != Equal,
            }
        }
    }
}

/// Duty-cycled heap: which of the heap probes' windows are open (`HEAP_WINDOW`, 1: open),
/// set by user space. The probes stay attached a little longer than their window (detaching
/// takes the kernel tens of milliseconds each); the flags make the window's edges exact.
pub mod heap_window {
    /// The allocation probes record.
    pub const ALLOC: u32 = 0;
    /// The free probe records.
    pub const FREE: u32 = 1;
    pub const COUNT: u32 = 2;
}

/// The heap probes' own counters. Index into the per-CPU `LEDGER_STATS` array.
pub mod ledger_stat {
    /// Blocks that went through the ring because `HELD_BLOCKS` was full.
    pub const BLOCKS_FULL: u32 = 0;
    /// Blocks that went through the ring because `STACK_TOTALS` was full.
    pub const STACKS_FULL: u32 = 1;
    /// Duty-cycled heap: blocks found freed while the probes were off (their address was
    /// allocated again in a later window).
    pub const FREED_UNSEEN: u32 = 2;
    /// Heap calls of traced processes the probes saw (allocations and frees): the call rate
    /// that prices heap tracing. Counted by a duty-cycled heap's probes and by the count-only
    /// probe `record -p PID --heap` attaches first; not by exact or sampled heap probes.
    pub const HEAP_CALLS: u32 = 3;
    /// Frees of blocks the kernel's heap ledger never knew (allocated before it knew the
    /// process, or between a duty-cycled heap's windows), counted there and not sent: while it
    /// never was full, user space does not know them either.
    pub const UNMATCHED_FREES: u32 = 4;
    /// The frees among `HEAP_CALLS`: a duty-cycled heap's unit of the traced processes' work,
    /// counted alike while every probe is on and in the grace with the free probe alone, so
    /// that the CPU time a free costs in each tells what a trap costs them (`heap_duty.rs`).
    pub const FREE_CALLS: u32 = 5;
    /// Blocks the kernel's heap ledger had no room for, left out by the byte-sampled share
    /// that goes through the ring while the ring is filling (`heap_ledger::FULL_SAMPLE_MEAN`).
    pub const FULL_SAMPLED_OUT: u32 = 6;
    /// Duty-cycled heap: frees of blocks the kernel's ledger held (a window's blocks dying).
    /// A grace ends once they stop (`heap_duty.rs`): what it is there to see has been seen.
    pub const HELD_FREED: u32 = 7;
    pub const COUNT: u32 = 8;
}

/// Names of the eBPF object's load-time globals (`u32` statics that user space sets at load).
pub mod global {
    /// 1 to trace the children of traced processes.
    pub const FOLLOW_CHILDREN: &str = "FOLLOW_CHILDREN";
    /// Record one of every N page faults; 0 disables.
    pub const FAULT_SAMPLE: &str = "FAULT_SAMPLE";
    /// User-stack bytes copied per heap event and sampled fault (high rate); 0: frame pointers.
    pub const STACK_COPY_HEAP: &str = "STACK_COPY_HEAP";
    /// User-stack bytes copied per other event (mappings, CUDA calls, failures); 0: frame
    /// pointers.
    pub const STACK_COPY_OTHER: &str = "STACK_COPY_OTHER";
    /// 1 to copy stacks even when the ring buffer is a quarter full.
    pub const STACK_COPY_ALWAYS: &str = "STACK_COPY_ALWAYS";
    /// 1 to read Python frames of processes with offsets in `PY_OFFSETS`.
    pub const PYTHON_FRAMES: &str = "PYTHON_FRAMES";
    /// 1 to log why the programs skip events (aya-log, `record --debug-bpf`).
    pub const DEBUG_LOG: &str = "DEBUG_LOG";
    /// 1 when the heap probes are attached for every process mapping the allocator (children
    /// from their first instruction): their programs keep only the processes in `TARGETS`.
    pub const HEAP_SYSTEMWIDE: &str = "HEAP_SYSTEMWIDE";
    /// `--heap-sample`: the mean bytes between sampled heap allocations; 0 records every one.
    pub const HEAP_SAMPLE_MEAN: &str = "HEAP_SAMPLE_MEAN";
    /// 1: heap blocks with known stacks are held and counted in the kernel (`heap_ledger`).
    pub const HEAP_KERNEL_LEDGER: &str = "HEAP_KERNEL_LEDGER";
    /// Slots of `RECENT_BLOCKS` (`heap_ledger::recent_slots`, a power of two; 0: none).
    pub const HEAP_RECENT_SLOTS: &str = "HEAP_RECENT_SLOTS";
    /// 1: the heap probes are attached in windows (`--heap-budget`, `--heap-duty`): a block
    /// live at an address allocated again was freed while they were off, not a lost event.
    pub const HEAP_DUTY_CYCLED: &str = "HEAP_DUTY_CYCLED";
    /// With the kernel's heap ledger: the mean bytes between the blocks it has no room for that
    /// still go through the ring while the ring is over a quarter full (`heap_sample`'s draw);
    /// 0: every one.
    pub const HEAP_FULL_SAMPLE_MEAN: &str = "HEAP_FULL_SAMPLE_MEAN";
    /// 1: those blocks are sampled whatever the ring holds (tests of the sampled share).
    pub const HEAP_FULL_SAMPLE_ALWAYS: &str = "HEAP_FULL_SAMPLE_ALWAYS";
}

/// Byte-sampled heap tracing (`record --heap-sample MEAN`): an allocation of `size` bytes is
/// recorded with probability `p = 1 − exp(−size / MEAN)` (as tcmalloc's and pprof's samplers,
/// per allocation), drawn in the kernel; its event carries `p` as a 32-bit fraction, and user
/// space counts it as `size / p` bytes: an unbiased estimate of the live bytes of each stack.
pub mod heap_sample {
    /// Entries of the `exp(−x)` table (`SAMPLE_EXP`): x from 0 to 16 in steps of 1/64.
    pub const TABLE_LEN: u32 = 16 * 64 + 1;
    /// At and above this many means, an allocation is always recorded (`p` = `ALWAYS`).
    pub const ALWAYS_AT_MEANS: u64 = 16;
    /// `p` for an allocation recorded with certainty (its size is the estimate).
    pub const ALWAYS: u32 = u32::MAX;

    /// The bytes a recorded allocation of `size` bytes stands for, given its `p` (0: not
    /// sampled mode, the size itself).
    pub fn estimate(size: u64, p: u32) -> u64 {
        if p == 0 || p == ALWAYS {
            return size;
        }
        ((u128::from(size) << 32) / u128::from(p)).min(u128::from(u64::MAX)) as u64
    }
}

/// Name of the eBPF object's aya-log ring buffer (declared by aya-log-ebpf).
pub const LOG_RING: &str = "AYA_LOGS";

const _: () = assert!(size_of::<AllocEvent>() == 72);
const _: () = assert!(size_of::<StackRecord<AllocEvent>>() == 72 + 8 * STACK_AREA_WORDS);
const _: () = assert!(size_of::<heap_ledger::BlockKey>() == 16);
const _: () = assert!(size_of::<heap_ledger::HeldBlock>() == 24);
const _: () = assert!(size_of::<heap_ledger::HeapLive>() == 24);
const _: () = assert!(size_of::<heap_ledger::RecentBlock>() == 40);
const _: () = assert!(size_of::<heap_ledger::TracedProcess>() == 16);
const _: () = assert!(size_of::<heap_ledger::StackTotals>() == 48);
const _: () = assert!(size_of::<StackRecord<MapEvent>>() == 80 + 8 * STACK_AREA_WORDS);
const _: () = assert!(size_of::<StackRecord<FaultEvent>>() == 24 + 8 * STACK_AREA_WORDS);
const _: () = assert!(size_of::<StackRecord<CudaCallEvent>>() == 72 + 8 * STACK_AREA_WORDS);
const _: () = assert!(size_of::<StackCopyHeader>() == 32);
const _: () = assert!(8 * STACK_AREA_WORDS >= 32 + STACK_COPY_MAX + 8192);
const _: () = assert!(size_of::<FreeEvent>() == 24);
const _: () = assert!(size_of::<MapEvent>() == 80);
const _: () = assert!(size_of::<ProcEvent>() == 16);
const _: () = assert!(size_of::<FaultEvent>() == 24);
const _: () = assert!(size_of::<CudaCallEvent>() == 72);
const _: () = assert!(size_of::<TorchEvent>() == 72);
const _: () = assert!(size_of::<StackRecord<TorchEvent>>() == 72 + 8 * STACK_AREA_WORDS);
const _: () = assert!(size_of::<CudaCallSlot>() == 64);
const _: () = assert!(size_of::<phase::ThreadPhases>() == 168);
const _: () = assert!(phase::MAX_DEPTH.is_power_of_two() && phase::IDS.is_power_of_two());
const _: () = assert!(phase::MAX_RULES < phase::IDS);
const _: () = assert!(size_of::<SyscallArgs>() == 48);
const _: () = assert!(size_of::<InflightCall>() == 56);
// The in-flight slots' owner word comes first: the programs claim it through a pointer to it.
const _: () = assert!(core::mem::offset_of!(InflightCall, owner) == 0);
const _: () = assert!(core::mem::offset_of!(CudaCallSlot, owner) == 0);

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: plain #[repr(C)] integers without implicit padding (sizes asserted above).
    unsafe impl aya::Pod for AllocEvent {}
    unsafe impl aya::Pod for FreeEvent {}
    unsafe impl aya::Pod for MapEvent {}
    unsafe impl aya::Pod for FaultEvent {}
    unsafe impl aya::Pod for CudaCallEvent {}
    unsafe impl aya::Pod for TorchEvent {}
    unsafe impl aya::Pod for ProcEvent {}
    unsafe impl aya::Pod for StackCopyHeader {}
    unsafe impl aya::Pod for InflightCall {}
    unsafe impl aya::Pod for SyscallArgs {}
    unsafe impl aya::Pod for heap_ledger::BlockKey {}
    unsafe impl aya::Pod for heap_ledger::HeldBlock {}
    unsafe impl aya::Pod for heap_ledger::StackTotals {}
    unsafe impl aya::Pod for heap_ledger::HeapLive {}
    unsafe impl aya::Pod for heap_ledger::TracedProcess {}
    unsafe impl aya::Pod for heap_ledger::RecentBlock {}
    unsafe impl aya::Pod for phase::ThreadPhases {}
    unsafe impl aya::Pod for phase::PhaseFrees {}
    unsafe impl aya::Pod for phase::PhasePredicate {}
}

#[cfg(test)]
mod sample_tests {
    use super::heap_sample::*;

    #[test]
    fn a_recorded_block_stands_for_its_size_over_its_probability() {
        assert_eq!(estimate(1000, 0), 1000, "not sampling");
        assert_eq!(estimate(1000, ALWAYS), 1000, "certain");
        assert_eq!(estimate(1000, 1 << 31), 2000, "p = 1/2");
        assert_eq!(estimate(1000, 1 << 24), 256_000, "p = 1/256");
        assert_eq!(estimate(u64::MAX, 1), u64::MAX, "saturated");
    }
}

#[cfg(test)]
mod recent_slot_tests {
    use super::heap_ledger::*;

    #[test]
    fn recent_slots_are_a_sixteenth_of_the_ledger_a_power_of_two_and_capped() {
        assert_eq!(recent_slots(16), 0, "under 32 blocks: none");
        assert_eq!(recent_slots(31), 0);
        assert_eq!(recent_slots(32), 2, "a pair at least");
        assert_eq!(recent_slots(512), 32);
        assert_eq!(recent_slots(1000), 32, "62 rounded down to a power of two");
        assert_eq!(recent_slots(DEFAULT_BLOCKS), RECENT_SLOTS_MAX);
        assert_eq!(recent_slots(u32::MAX), RECENT_SLOTS_MAX);
    }
}
