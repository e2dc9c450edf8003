//! Memory syscalls of traced processes, with syscall tracepoints: every caller is seen (libc, raw
//! `syscall()`, runtimes that bypass libc). The entry saves the arguments, the exit emits the
//! completed call with the caller's stack.

use aya_ebpf::{
    helpers::bpf_get_current_pid_tgid, macros::tracepoint, programs::TracePointContext,
};
use tracer_common::{MAP_FROM_ALLOCATOR, MapEvent, SyscallArgs, drop_cause, event_kind, map_op};

use crate::{
    diag,
    inflight::held_slot,
    maps::{CUDA_INFLIGHT, INFLIGHT, MAP_SCRATCH, SYSCALL_ARGS, TARGETS, scratch},
    stack::{StackBudget, StackStart, emit_with_stack},
};

/// Where a syscall tracepoint's record holds the arguments (sys_enter, after the common header
/// and the syscall number) or the return value (sys_exit).
const SYSCALL_ARGS_AT: usize = 16;
const SYSCALL_RET_AT: usize = 16;

const MADV_DONTNEED: u64 = 4;
const MADV_FREE: u64 = 8;
const MADV_REMOVE: u64 = 9;

/// Entry of a traced memory syscall: saves its first `nargs` arguments.
#[inline(always)]
fn syscall_enter(ctx: &TracePointContext, op: u32, nargs: usize) -> u32 {
    let key = bpf_get_current_pid_tgid();
    if TARGETS.get_ptr((key >> 32) as u32).is_none() {
        return 0;
    }
    let mut saved = SyscallArgs {
        args: [0; 5],
        op,
        flags: 0,
    };
    let mut i = 0;
    while i < nargs && i < 5 {
        // SAFETY: reads the tracepoint record's argument slots.
        saved.args[i] = unsafe { ctx.read_at::<u64>(SYSCALL_ARGS_AT + 8 * i) }.unwrap_or(0);
        i += 1;
    }
    // Inside a hooked allocator call (malloc's arenas) or a CUDA driver allocation (its pinned
    // host mappings): those bytes are counted by that layer, not again as mappings.
    if held_slot(&INFLIGHT).is_some() || held_slot(&CUDA_INFLIGHT).is_some() {
        saved.flags = MAP_FROM_ALLOCATOR;
    }
    if SYSCALL_ARGS.insert(key, saved, 0).is_err() {
        diag::lost(drop_cause::INFLIGHT_BUSY, "syscall entry");
    }
    0
}

#[tracepoint]
pub fn mmap_enter(ctx: TracePointContext) -> u32 {
    syscall_enter(&ctx, map_op::MMAP, 5)
}

#[tracepoint]
pub fn munmap_enter(ctx: TracePointContext) -> u32 {
    syscall_enter(&ctx, map_op::MUNMAP, 2)
}

#[tracepoint]
pub fn mprotect_enter(ctx: TracePointContext) -> u32 {
    syscall_enter(&ctx, map_op::MPROTECT, 3)
}

#[tracepoint]
pub fn mremap_enter(ctx: TracePointContext) -> u32 {
    syscall_enter(&ctx, map_op::MREMAP, 5)
}

#[tracepoint]
pub fn brk_enter(ctx: TracePointContext) -> u32 {
    syscall_enter(&ctx, map_op::BRK, 1)
}

#[tracepoint]
pub fn madvise_enter(ctx: TracePointContext) -> u32 {
    // Only the advice values that release pages matter (the third argument).
    // SAFETY: reads the tracepoint record.
    let advice = unsafe { ctx.read_at::<u64>(SYSCALL_ARGS_AT + 16) }.unwrap_or(0);
    if !matches!(advice, MADV_DONTNEED | MADV_FREE | MADV_REMOVE) {
        return 0;
    }
    syscall_enter(&ctx, map_op::MADVISE, 3)
}

/// Exit of every traced memory syscall: emits the completed call with its user stack.
#[tracepoint]
pub fn syscall_exit(ctx: TracePointContext) -> u32 {
    let key = bpf_get_current_pid_tgid();
    let Some(saved) = (unsafe { SYSCALL_ARGS.get(key) }).copied() else {
        return 0;
    };
    let _ = SYSCALL_ARGS.remove(key);
    // SAFETY: sys_exit tracepoints hold `long ret`.
    let ret = unsafe { ctx.read_at::<i64>(SYSCALL_RET_AT) }.unwrap_or(-1);
    if (-4095..0).contains(&ret) {
        return 0; // failed: nothing changed
    }
    let Some(record) = scratch(&MAP_SCRATCH) else {
        return 0;
    };
    // SAFETY: the per-CPU scratch is ours until this program returns.
    let record = unsafe { &mut *record };
    record.event = MapEvent {
        kind: event_kind::MAP,
        tgid: (key >> 32) as u32,
        tid: key as u32,
        nframes: 0,
        stack_flags: 0,
        op: saved.op,
        flags: saved.flags,
        ret: ret as u64,
        args: saved.args,
        phase: crate::phase::current(),
        _pad: 0,
    };
    let Some(start) = StackStart::at_tracepoint() else {
        return 0;
    };
    emit_with_stack(record, start, StackBudget::Other);
    0
}
