//! User stacks: the frame-pointer walk, the stack copy for DWARF unwinding in user space, the
//! Python frames after either, and `emit_with_stack`, which every event with a stack goes
//! through (registers → capture → Python frames → ring).

use core::mem::{MaybeUninit, size_of};

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_RING_SIZE},
    helpers::bpf_probe_read_user,
};
use tracer_common::{
    MAX_FRAMES, STACK_COPY, STACK_COPY_MAX, STACK_SP_CANDIDATE, STACK_TRUNCATED, StackArea,
    StackCopyHeader, StackEvent, StackRecord, stack_stat,
};

use crate::{
    arch::{FrameRecord, UserRegs},
    diag,
    maps::{EVENTS, LAUNDRY, STACK_COPY_ALWAYS, STACK_COPY_HEAP, STACK_COPY_OTHER, global},
    python,
    ring::output_record,
};

/// Which stack-copy size applies to an event (`--stack`).
#[derive(Copy, Clone)]
pub enum StackBudget {
    /// Heap events and sampled faults: many, so the cheaper stack unless asked otherwise.
    Heap,
    /// Mappings, CUDA calls, failures: few, and what a postmortem needs most.
    Other,
}

impl StackBudget {
    /// Bytes to copy; 0: the frame-pointer walk.
    #[inline(always)]
    fn copy_bytes(self) -> u32 {
        match self {
            StackBudget::Heap => global(&STACK_COPY_HEAP),
            StackBudget::Other => global(&STACK_COPY_OTHER),
        }
    }
}

/// Where a stack starts.
#[derive(Copy, Clone)]
pub struct StackStart {
    regs: UserRegs,
    /// Record the word at the stack pointer as a candidate second frame (`walk_user_stack`).
    sp_candidate: bool,
    /// Look for the thread's Python frames (false: its process is known to run no CPython).
    python: bool,
    /// Native frames to walk at most (`MAX_FRAMES` unless fewer are needed).
    native_frames: usize,
}

impl StackStart {
    /// At a uprobe or return probe: the context's registers.
    #[inline(always)]
    pub fn at_probe<C: EbpfContext>(ctx: &C) -> StackStart {
        StackStart {
            regs: UserRegs::of_probe(ctx),
            sp_candidate: false,
            python: true,
            native_frames: MAX_FRAMES,
        }
    }

    /// The same start, looking for Python frames only if `python`.
    #[inline(always)]
    pub fn with_python(self, python: bool) -> StackStart {
        StackStart { python, ..self }
    }

    /// The same start, walking at most `frames` native frames (a heap stack key that covers
    /// fewer: the frames past them would be read for nothing).
    #[inline(always)]
    pub fn with_native_frames(self, frames: usize) -> StackStart {
        StackStart {
            native_frames: frames,
            ..self
        }
    }

    /// At a function's entry (a uprobe that emits there): the stack as it will be at the
    /// function's return, from the return address on top of the stack — the frame pointer is
    /// still the caller's, so the frame chain alone would skip the caller.
    #[inline(always)]
    pub fn at_entry<C: EbpfContext>(ctx: &C) -> StackStart {
        let regs = UserRegs::of_probe(ctx);
        // SAFETY: bpf_probe_read_user checks the user address.
        let ret = unsafe { bpf_probe_read_user(regs.sp as *const u64) }.unwrap_or(0);
        StackStart {
            regs: UserRegs {
                ip: ret,
                sp: regs.sp + 8,
                bp: regs.bp,
            },
            sp_candidate: false,
            python: true,
            native_frames: MAX_FRAMES,
        }
    }

    /// At a tracepoint: the task's saved user registers, with the stack-pointer candidate (the
    /// syscall may come from a leaf wrapper, the fault from a leaf such as memset: no frame).
    #[inline(always)]
    pub fn at_tracepoint() -> Option<StackStart> {
        Some(StackStart {
            regs: UserRegs::of_current_task()?,
            sp_candidate: true,
            python: true,
            native_frames: MAX_FRAMES,
        })
    }
}

/// Emits `record`, whose event is filled in, with the stack from `start` (`capture`).
#[inline(always)]
pub fn emit_with_stack<E: StackEvent>(
    record: &mut StackRecord<E>,
    start: StackStart,
    budget: StackBudget,
) {
    let bytes = capture(record, start, budget);
    output_record(record, bytes);
}

/// Fills the stack of `record` from `start` (copied or walked as `budget` says) and the Python
/// frames of the thread; returns the bytes of its stack area used.
#[inline(always)]
pub fn capture<E: StackEvent>(
    record: &mut StackRecord<E>,
    start: StackStart,
    budget: StackBudget,
) -> usize {
    let mut flags = 0u16;
    let (nframes, bytes) = capture_stack(start, budget.copy_bytes(), &mut record.stack, &mut flags);
    // Stored now rather than kept in a register: the Python walk after it is then verified
    // once, not once per frame count.
    record.event.set_nframes(nframes);
    let bytes = finish_stack(&mut record.stack, bytes, &mut flags, start.python);
    record.event.set_stack_flags(flags);
    bytes
}

/// `value`, as a number the verifier knows nothing about. After a stack walk, the stack's
/// length differs on every path; the Python walk after it would be verified once per length.
#[inline(always)]
pub fn forget_value(value: usize) -> usize {
    let Some(slot) = LAUNDRY.get_ptr_mut(0) else {
        return value;
    };
    // SAFETY: per-CPU slot, ours while this program runs.
    unsafe {
        core::ptr::write_volatile(slot, value as u64);
        core::ptr::read_volatile(slot) as usize
    }
}

/// After `capture_stack` filled `bytes` of the area: appends the Python frames of a CPython
/// thread (with `python`). Returns the bytes of the area to output, laundered either way: what
/// comes after is then verified once, not once per stack length.
#[inline(always)]
fn finish_stack(area: &mut StackArea, bytes: usize, flags: &mut u16, python: bool) -> usize {
    let at = forget_value(bytes);
    if !python {
        return at;
    }
    at + python::append_frames(area, at, flags)
}

/// Whether the ring holds more than `size / divisor` bytes not yet read.
#[inline(always)]
pub fn ring_fuller_than(divisor: u64) -> bool {
    EVENTS.query(BPF_RB_AVAIL_DATA as u64) > EVENTS.query(BPF_RB_RING_SIZE as u64) / divisor
}

/// Whether the ring is over a quarter full (a burst of events): a stack copy, thousands of
/// bytes, would fill it; the event gets the frame-pointer walk instead, counted.
#[inline(always)]
fn ring_under_pressure() -> bool {
    let used = EVENTS.query(BPF_RB_AVAIL_DATA as u64);
    let size = EVENTS.query(BPF_RB_RING_SIZE as u64);
    let pressed = used > size / 4;
    if pressed {
        diag::count_stack(stack_stat::FP_UNDER_PRESSURE);
        diag::stack_copy_skipped(used, size);
    }
    pressed
}

/// Fills a record's stack area from `start`: with `copy` > 0, a `StackCopyHeader` and up to
/// `copy` bytes of the stack from `sp` up (`STACK_COPY`), unwound in user space; else the
/// frame-pointer walk. Returns (frames, bytes of the area used); `finish_stack` adds the Python
/// frames.
#[inline(always)]
fn capture_stack(
    start: StackStart,
    copy: u32,
    area: &mut StackArea,
    flags: &mut u16,
) -> (u16, usize) {
    let UserRegs { ip, sp, bp } = start.regs;
    let pressed = copy != 0 && global(&STACK_COPY_ALWAYS) == 0 && ring_under_pressure();
    if copy == 0 || pressed {
        let sp = if start.sp_candidate { Some(sp) } else { None };
        let n = walk_user_stack((ip, sp, bp), start.native_frames, area, flags);
        return (n as u16, 8 * n);
    }
    diag::count_stack(stack_stat::COPIES);
    let len = copy_user_stack(sp, copy, area);
    if len == 0 {
        diag::stack_copy_empty(sp);
    }
    let header = StackCopyHeader { ip, sp, bp, len };
    // SAFETY: the area is 8-byte aligned and longer than the header.
    unsafe { core::ptr::write_unaligned(area.as_mut_ptr().cast::<StackCopyHeader>(), header) };
    *flags |= STACK_COPY;
    (0, size_of::<StackCopyHeader>() + len as usize)
}

/// Copies up to `max` bytes of user stack from `sp` into `area` after the copy header, a page at
/// a time so that a stack ending before `max` bytes still gives what it has (one read across its
/// end would fail whole). Returns the bytes copied.
#[inline(always)]
fn copy_user_stack(sp: u64, max: u32, area: &mut StackArea) -> u64 {
    const PAGE: u64 = 4096;
    let max = (max as u64).min(STACK_COPY_MAX as u64);
    // SAFETY: the bytes after the header lie inside `area` (see STACK_AREA_WORDS).
    let base = unsafe {
        area.as_mut_ptr()
            .cast::<u8>()
            .add(size_of::<StackCopyHeader>())
    };
    let mut copied: u64 = 0;
    let mut chunk = PAGE - (sp & (PAGE - 1));
    for _ in 0..(STACK_COPY_MAX as u64 / PAGE + 1) {
        if copied >= max {
            break;
        }
        if chunk > max - copied {
            chunk = max - copied;
        }
        // Bounds the verifier can see: offset below STACK_COPY_MAX, length at most 8 KiB.
        let off = copied & (STACK_COPY_MAX as u64 - 1);
        let len = chunk & 0x1fff;
        // SAFETY: `base + off .. + len` lies inside `area`; the helper checks the user address.
        let rc = unsafe {
            aya_ebpf::helpers::generated::bpf_probe_read_user(
                base.add(off as usize).cast(),
                len as u32,
                (sp + copied) as *const core::ffi::c_void,
            )
        };
        if rc != 0 {
            break;
        }
        copied += len;
        chunk = PAGE;
    }
    copied
}

/// Walks the frame-pointer chain from `(ip, bp)` into `ips`, `max_frames` frames at most;
/// returns the number of frames and sets `STACK_TRUNCATED` in `flags` when the chain went on
/// past `MAX_FRAMES`. With `sp`, the word
/// at the stack pointer comes second, flagged `STACK_SP_CANDIDATE`: at a syscall made by a leaf
/// wrapper (libc's mmap, munmap, syscall()) it is the return address into the wrapper's caller,
/// which the frame-pointer chain would skip; user space keeps it only if a call precedes it.
#[inline(always)]
fn walk_user_stack(
    (ip, sp, bp): (u64, Option<u64>, u64),
    max_frames: usize,
    ips: &mut StackArea,
    flags: &mut u16,
) -> usize {
    ips[0] = ip;
    let mut n = 1usize;
    if let Some(sp) = sp
        // SAFETY: bpf_probe_read_user checks the user address.
        && let Ok(ret) = unsafe { bpf_probe_read_user(sp as *const u64) }
    {
        ips[1] = ret;
        n = 2;
        *flags |= STACK_SP_CANDIDATE;
    }
    let mut walk = FpWalk {
        ips,
        // Laundered: known exactly, the count would make every turn a state of its own, and
        // the loop would be verified once per frame.
        n: forget_value(n) as u64,
        max: max_frames as u64,
        bp,
        // Set below: LLVM zeroes two adjacent words with a call to a `memset` subprogram.
        chunk_at: u64::MAX,
        chunk_words: u64::MAX,
        // Left unwritten (zeroing it cost a `memset` call a walk): a word is read only after
        // `read_chunk` filled it.
        chunk: MaybeUninit::uninit(),
    };
    // SAFETY: plain stores into a local.
    unsafe {
        core::ptr::write_volatile(&raw mut walk.chunk_at, 0);
        core::ptr::write_volatile(&raw mut walk.chunk_words, 0);
    }
    // The first frames inline: most heap stacks the kernel ledger keys are a few frames from
    // one or two reads, and each `bpf_loop` turn is a subprogram call (a return thunk on CPUs
    // that mitigate return misprediction).
    if fp_turn(&mut walk) == 0 && fp_turn(&mut walk) == 0 && walk_goes_on(&walk) {
        // SAFETY: `fp_walk_turn` has the callback's signature; `walk` outlives the call.
        unsafe {
            aya_ebpf::helpers::generated::bpf_loop(
                MAX_FRAMES as u32,
                fp_walk_turn as *mut core::ffi::c_void,
                (&mut walk as *mut FpWalk).cast(),
                0,
            )
        };
    }
    let n = (walk.n as usize).min(MAX_FRAMES);
    if n == MAX_FRAMES && walk.bp != 0 {
        *flags |= STACK_TRUNCATED;
    }
    n
}

/// Stack words one user read brings in. Frame records close together (a small function's
/// caller a few dozen bytes up) come from one read: each `bpf_probe_read_user` costs about
/// 40 ns whatever its length up to this (docs/performance.md).
const CHUNK_WORDS: usize = 8;

/// The frame-pointer walk's state, passed to each `bpf_loop` turn (the verifier checks one
/// turn once, not once per frame on every path to the walk).
#[repr(C)]
struct FpWalk {
    ips: *mut StackArea,
    /// Frames in `ips`, and the most it is to hold.
    n: u64,
    max: u64,
    /// The next frame record's address; 0: the chain ended (not cut at `MAX_FRAMES`).
    bp: u64,
    /// The user address `chunk` was read from (0: none yet), and its words read.
    chunk_at: u64,
    chunk_words: u64,
    /// One word more than read, so that a record's second word is in bounds wherever the
    /// verifier sees its first.
    chunk: MaybeUninit<[u64; CHUNK_WORDS + 1]>,
}

/// A `bpf_loop` turn of the walk: one frame; 1 stops it.
#[inline(never)]
extern "C" fn fp_walk_turn(_index: u32, ctx: *mut core::ffi::c_void) -> i64 {
    // SAFETY: `ctx` is the `FpWalk` that `walk_user_stack` passed to bpf_loop.
    fp_turn(unsafe { &mut *ctx.cast::<FpWalk>() })
}

/// Whether the walk has a frame record left to read: the chain goes on and neither bound
/// (`MAX_FRAMES`, the caller's `max`) is reached.
#[inline(always)]
fn walk_goes_on(walk: &FpWalk) -> bool {
    walk.bp != 0 && (walk.n as usize) < MAX_FRAMES && walk.n < walk.max
}

/// One frame of the walk; 1 stops it (`walk.bp` is then 0 unless it was cut at a bound).
#[inline(always)]
fn fp_turn(walk: &mut FpWalk) -> i64 {
    if !walk_goes_on(walk) {
        return 1;
    }
    let (n, bp) = (walk.n as usize, walk.bp);
    let Some([saved_bp, return_address]) = frame_record(walk, bp) else {
        walk.bp = 0;
        return 1;
    };
    if return_address == 0 {
        walk.bp = 0;
        return 1;
    }
    // SAFETY: `ips` outlives the loop; `n` is below MAX_FRAMES.
    unsafe { (*walk.ips)[n] = return_address };
    walk.n += 1;
    // Frames live at increasing addresses; anything else is not a frame chain.
    walk.bp = if saved_bp > bp { saved_bp } else { 0 };
    0
}

/// The frame record at `bp`: from the chunk last read if it holds it, else from a new chunk
/// read at `bp`. None if `bp` cannot be read.
#[inline(always)]
fn frame_record(walk: &mut FpWalk, bp: u64) -> Option<FrameRecord> {
    let mut off = bp.wrapping_sub(walk.chunk_at);
    // `bp` below the chunk wraps to a large offset, past its end.
    let inside = walk.chunk_at != 0
        && off.is_multiple_of(8)
        && walk.chunk_words >= 2
        && off <= 8 * (walk.chunk_words - 2);
    if !inside {
        read_chunk(walk, bp)?;
        off = 0;
    }
    let k = (off / 8) as usize & (CHUNK_WORDS - 1);
    let words = walk.chunk.as_ptr().cast::<u64>();
    // SAFETY: `off` lies in the chunk read: words `k` and `k + 1` were written by the read.
    Some(unsafe { [*words.add(k), *words.add(k + 1)] })
}

/// Reads the chunk at `bp`: `CHUNK_WORDS` words, or the frame record's two alone when the
/// longer read fails across a page boundary (the last frame near the stack's top).
#[inline(always)]
fn read_chunk(walk: &mut FpWalk, bp: u64) -> Option<()> {
    const PAGE: u64 = 4096;
    let read = |walk: &mut FpWalk, words: usize| -> bool {
        // SAFETY: `chunk` holds more than `words` words; the helper checks the user address.
        unsafe {
            aya_ebpf::helpers::generated::bpf_probe_read_user(
                walk.chunk.as_mut_ptr().cast(),
                (8 * words) as u32,
                bp as *const core::ffi::c_void,
            ) == 0
        }
    };
    let words = if read(walk, CHUNK_WORDS) {
        CHUNK_WORDS
    } else if (bp & (PAGE - 1)) + 8 * CHUNK_WORDS as u64 > PAGE && read(walk, 2) {
        2
    } else {
        return None;
    };
    walk.chunk_at = bp;
    walk.chunk_words = words as u64;
    Some(())
}
