//! Types shared by the eBPF programs and user space: events, in-flight call state, drop causes.
//!
//! Every type is `#[repr(C)]` with explicit padding so that both sides agree on the layout and
//! `aya::Pod` is sound (no implicit padding bytes).
#![no_std]

use core::mem::size_of;

pub mod python;

/// Event kinds, the first `u32` of every ring-buffer record.
pub mod event_kind {
    pub const HEAP_ALLOC: u32 = 1;
    pub const HEAP_FREE: u32 = 2;
    pub const MAP: u32 = 3;
    pub const PROC: u32 = 4;
    pub const FAULT: u32 = 5;
    pub const CUDA_CALL: u32 = 6;
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

/// Scratch for one CUDA call record with room for the longest stack.
#[repr(C)]
#[derive(Copy, Clone)]
pub struct CudaCallRecord {
    pub event: CudaCallEvent,
    pub ips: StackArea,
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

/// Scratch for one fault record with room for the longest stack.
#[repr(C)]
#[derive(Copy, Clone)]
pub struct FaultRecord {
    pub event: FaultEvent,
    pub ips: StackArea,
}

/// Global `FAULT_SAMPLE` of the eBPF object: record one of every N page faults; 0 disables.
pub const FAULT_SAMPLE_GLOBAL: &str = "FAULT_SAMPLE";

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

/// Global `FOLLOW_CHILDREN` of the eBPF object: 1 to trace the children of traced processes.
pub const FOLLOW_CHILDREN_GLOBAL: &str = "FOLLOW_CHILDREN";

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
/// `HeapAllocEvent`.
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
}

/// Scratch for one mapping record with room for the longest stack.
#[repr(C)]
#[derive(Copy, Clone)]
pub struct MapRecord {
    pub event: MapEvent,
    pub ips: StackArea,
}

/// Heap functions, in the order of user space's hook table. Carried as the uprobe cookie.
#[repr(u32)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum HeapFn {
    Malloc = 0,
    Calloc = 1,
    Realloc = 2,
    Reallocarray = 3,
    Free = 4,
    PosixMemalign = 5,
    AlignedAlloc = 6,
    Memalign = 7,
    Valloc = 8,
    Pvalloc = 9,
}

impl HeapFn {
    pub const ALL: [HeapFn; 10] = [
        HeapFn::Malloc,
        HeapFn::Calloc,
        HeapFn::Realloc,
        HeapFn::Reallocarray,
        HeapFn::Free,
        HeapFn::PosixMemalign,
        HeapFn::AlignedAlloc,
        HeapFn::Memalign,
        HeapFn::Valloc,
        HeapFn::Pvalloc,
    ];

    pub fn from_u32(v: u32) -> Option<HeapFn> {
        Self::ALL.get(v as usize).copied()
    }

    pub fn name(self) -> &'static str {
        match self {
            HeapFn::Malloc => "malloc",
            HeapFn::Calloc => "calloc",
            HeapFn::Realloc => "realloc",
            HeapFn::Reallocarray => "reallocarray",
            HeapFn::Free => "free",
            HeapFn::PosixMemalign => "posix_memalign",
            HeapFn::AlignedAlloc => "aligned_alloc",
            HeapFn::Memalign => "memalign",
            HeapFn::Valloc => "valloc",
            HeapFn::Pvalloc => "pvalloc",
        }
    }
}

/// Most user frames an event carries (frame-pointer walk in the eBPF program).
pub const MAX_FRAMES: usize = 64;

/// `stack_flags`: the record carries a copy of the user stack (`StackCopyHeader` then `len`
/// bytes) instead of frame addresses; user space unwinds it with the modules' call-frame
/// information (DWARF stack mode).
pub const STACK_COPY: u16 = 4;

/// The most user-stack bytes a record can carry (`--stack-copy`).
pub const STACK_COPY_MAX: usize = 32768;

/// The registers and length of a stack copy; the `len` bytes from `sp` up follow it.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct StackCopyHeader {
    pub ip: u64,
    pub sp: u64,
    pub bp: u64,
    pub len: u64,
}

/// Words of a scratch record's stack area: `MAX_FRAMES` addresses in frame-pointer mode, or a
/// `StackCopyHeader` and up to `STACK_COPY_MAX` bytes, with room past the end for the
/// verifier's view of a page-sized copy at any offset below `STACK_COPY_MAX`.
pub const STACK_AREA_WORDS: usize = (32 + STACK_COPY_MAX + 8192) / 8;

/// Bytes of the stack area after which Python frames still fit.
pub const PY_FRAMES_AT_MOST: usize = 8 * STACK_AREA_WORDS - 16 * python::MAX_PY_FRAMES;

/// The stack area of a scratch record.
pub type StackArea = [u64; STACK_AREA_WORDS];

/// Globals of the eBPF object: user-stack bytes copied per event (0: frame pointers), for heap
/// events (`STACK_COPY_HEAP`: high rate) and for the others (`STACK_COPY_OTHER`: mappings,
/// CUDA calls, failures).
pub const STACK_COPY_HEAP_GLOBAL: &str = "STACK_COPY_HEAP";
pub const STACK_COPY_OTHER_GLOBAL: &str = "STACK_COPY_OTHER";
/// Global of the eBPF object: 1 to copy stacks even when the ring buffer is a quarter full.
pub const STACK_COPY_ALWAYS_GLOBAL: &str = "STACK_COPY_ALWAYS";

/// `HeapAllocEvent::stack_flags`: the walk stopped at `MAX_FRAMES` with more frames above.
pub const STACK_TRUNCATED: u16 = 1;

/// `stack_flags`: the second address was read from the stack pointer, not from the frame chain;
/// it is a real frame only if the instruction before it is a call (see `walk_user_stack`).
pub const STACK_SP_CANDIDATE: u16 = 2;

/// A completed allocation call (successful or failed), emitted at the function's return. In the
/// ring buffer it is followed by `nframes` user stack addresses (`u64`, innermost first: the
/// return address into the allocator's caller, then the frame-pointer chain).
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct HeapAllocEvent {
    /// `event_kind::HEAP_ALLOC`.
    pub kind: u32,
    pub tgid: u32,
    pub tid: u32,
    /// Valid entries of `ips`.
    pub nframes: u16,
    /// `STACK_TRUNCATED`.
    pub stack_flags: u16,
    /// The returned block, 0 when the call failed (or when `realloc(p, 0)` freed `p`).
    pub addr: u64,
    /// Requested bytes (`nmemb * size` for calloc/reallocarray; saturated on overflow).
    pub size: u64,
    /// realloc/reallocarray: the block passed in. CUDA allocations: the cookie of the runtime
    /// call they are made from (low 32 bits) and of the non-allocating driver call in flight on
    /// the thread, e.g. a graph instantiation (high 32 bits); 0 for none.
    pub old_addr: u64,
    /// 0 on success; an errno for failures (posix_memalign's return value, else ENOMEM); a
    /// CUresult / cudaError_t for CUDA calls.
    pub err: i32,
    /// `HeapFn` as u32, or the CUDA hook's cookie.
    pub func: u32,
    /// CUDA: the pool of cuMemAllocFromPoolAsync, the graph of cuGraphAddMemAllocNode; 0 else.
    pub aux: u64,
}

/// The eBPF program's scratch space for one allocation record: the event and room for the
/// longest stack. Only `size_of::<HeapAllocEvent>() + 8 * nframes` bytes go into the ring.
#[repr(C)]
#[derive(Copy, Clone)]
pub struct HeapAllocRecord {
    pub event: HeapAllocEvent,
    pub ips: StackArea,
}

/// A `free` of a non-NULL pointer, emitted at entry.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct HeapFreeEvent {
    /// `event_kind::HEAP_FREE`.
    pub kind: u32,
    pub tgid: u32,
    pub addr: u64,
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
    pub old_addr: u64,
    /// posix_memalign's `void **memptr`; 0 for pointer-returning functions.
    pub memptr: u64,
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
    pub const COUNT: u32 = 3;

    pub const NAMES: [&str; COUNT as usize] =
        ["ringbuf_full", "inflight_slot_busy", "user_read_failed"];
}

const _: () = assert!(size_of::<HeapAllocEvent>() == 56);
const _: () = assert!(size_of::<HeapAllocRecord>() == 56 + 8 * STACK_AREA_WORDS);
const _: () = assert!(size_of::<StackCopyHeader>() == 32);
const _: () = assert!(8 * STACK_AREA_WORDS >= 32 + STACK_COPY_MAX + 8192);
const _: () = assert!(size_of::<HeapFreeEvent>() == 16);
const _: () = assert!(size_of::<MapEvent>() == 72);
const _: () = assert!(size_of::<ProcEvent>() == 16);
const _: () = assert!(size_of::<FaultEvent>() == 24);
const _: () = assert!(size_of::<CudaCallEvent>() == 72);
const _: () = assert!(size_of::<CudaCallSlot>() == 64);
const _: () = assert!(size_of::<SyscallArgs>() == 48);
const _: () = assert!(size_of::<InflightCall>() == 56);

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: plain #[repr(C)] integers without implicit padding (sizes asserted above).
    unsafe impl aya::Pod for HeapAllocEvent {}
    unsafe impl aya::Pod for HeapFreeEvent {}
    unsafe impl aya::Pod for InflightCall {}
    unsafe impl aya::Pod for MapEvent {}
    unsafe impl aya::Pod for SyscallArgs {}
}
