//! User stacks: the frame-pointer walk, the stack copy for DWARF unwinding in user space, the
//! Python frames after either, and `emit_with_stack`, which every event with a stack goes
//! through (registers → capture → Python frames → ring).

use core::mem::size_of;

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
}

impl StackStart {
    /// At a uprobe or return probe: the context's registers.
    #[inline(always)]
    pub fn at_probe<C: EbpfContext>(ctx: &C) -> StackStart {
        StackStart {
            regs: UserRegs::of_probe(ctx),
            sp_candidate: false,
            python: true,
        }
    }

    /// The same start, looking for Python frames only if `python`.
    #[inline(always)]
    pub fn with_python(self, python: bool) -> StackStart {
        StackStart { python, ..self }
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
        let n = walk_user_stack(ip, sp, bp, area, flags);
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

/// Walks the frame-pointer chain from `(ip, bp)` into `ips`; returns the number of frames and
/// sets `STACK_TRUNCATED` in `flags` when the chain went on past `MAX_FRAMES`. With `sp`, the word
/// at the stack pointer comes second, flagged `STACK_SP_CANDIDATE`: at a syscall made by a leaf
/// wrapper (libc's mmap, munmap, syscall()) it is the return address into the wrapper's caller,
/// which the frame-pointer chain would skip; user space keeps it only if a call precedes it.
#[inline(always)]
fn walk_user_stack(
    ip: u64,
    sp: Option<u64>,
    mut bp: u64,
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
    while n < MAX_FRAMES {
        if bp == 0 {
            return n;
        }
        // SAFETY: bpf_probe_read_user checks the user address.
        let Ok(frame) = (unsafe { bpf_probe_read_user(bp as *const FrameRecord) }) else {
            return n;
        };
        let [saved_bp, return_address] = frame;
        if return_address == 0 {
            return n;
        }
        ips[n] = return_address;
        n += 1;
        // Frames live at increasing addresses; anything else is not a frame chain.
        if saved_bp <= bp {
            return n;
        }
        bp = saved_bp;
    }
    if bp != 0 {
        *flags |= STACK_TRUNCATED;
    }
    MAX_FRAMES
}
