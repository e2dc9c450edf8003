//! Request phases (`record --phase NAME=LIB:SYMBOL`): an entry probe on a rule's function pushes
//! its phase on the calling thread's phase stack (`THREAD_PHASES`) with where the call's return
//! address lies; the phase lasts while the call runs, which the thread's stack pointer and that
//! slot tell at every event (`ThreadPhases`): no return probe. Every allocation, free and mapping
//! record carries the thread's innermost phase; the kernel's heap ledger keys its stacks by it and
//! counts each held block's free by (allocated-in, freed-in) phase (`PHASE_FREES`). Until a rule
//! is attached (`PHASES_ON` 0) each read is one array lookup.
//!
//! Idle: a thread outside every rule's call is in phase `IDLE` when its process showed no
//! activity (`LAST_ACTIVITY`: a rule's entry, an event of a thread inside a phase, PyTorch
//! allocator traffic) for the idle threshold, once it showed some: what a server allocates with
//! no request in flight. Before the first activity (start-up, loading) it is in none.

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_user},
    macros::uprobe,
    programs::ProbeContext,
};
use tracer_common::phase::{IDLE, IDLE_MS, IDS, MAX_DEPTH, ON, ThreadPhases, predicate};

use crate::{
    arch::UserRegs,
    inflight::attach_cookie,
    maps::{
        LAST_ACTIVITY, PHASE_ENTRIES, PHASE_FREES, PHASE_PREDICATES, PHASES_ON, TARGETS,
        THREAD_PHASES,
    },
    stack::forget_value,
};

/// Whether phase rules are attached in this recording.
#[inline(always)]
pub fn enabled() -> bool {
    PHASES_ON.get(ON).is_some_and(|on| *on != 0)
}

/// The calling thread's process shows activity now (phases on): its idle phase starts over.
#[inline(always)]
pub fn note_activity() {
    if enabled() {
        touch_activity();
    }
}

/// `note_activity` where phases are known to be on.
#[inline(always)]
fn touch_activity() {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let _ = LAST_ACTIVITY.insert(&tgid, &now, 0);
}

/// Phase `IDLE` when the calling thread's process has shown no activity for the idle threshold
/// (and showed some before), else none.
#[inline(always)]
fn idle_or_none() -> u32 {
    let Some(ms) = PHASES_ON.get(IDLE_MS).map(|ms| u64::from(*ms)) else {
        return 0;
    };
    if ms == 0 {
        return 0;
    }
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    // SAFETY: a lookup of a plain value.
    let Some(last) = (unsafe { LAST_ACTIVITY.get(&tgid) }).copied() else {
        return 0;
    };
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    if now.saturating_sub(last) >= ms * 1_000_000 {
        IDLE
    } else {
        0
    }
}

/// Whether the call entered with return address `ret` at stack slot `slot` still runs when the
/// thread's stack pointer is `sp`: `sp` is at or below the slot (`inclusive`; a function it
/// tail-called runs there too) and the slot still holds `ret`.
#[inline(always)]
fn still_running(slot: u64, ret: u64, sp: u64, inclusive: bool) -> bool {
    let below = if inclusive { sp <= slot } else { sp < slot };
    // SAFETY: bpf_probe_read_user checks the user address.
    below && unsafe { bpf_probe_read_user(slot as *const u64) }.is_ok_and(|r| r == ret)
}

/// Drops the entries of `phases` whose calls have returned, innermost first, as seen from stack
/// pointer `sp` (`inclusive`: whether a call whose slot is at `sp` may still run).
#[inline(always)]
fn drop_returned(phases: &mut ThreadPhases, sp: u64, inclusive: bool) {
    for _ in 0..MAX_DEPTH {
        let depth = phases.depth as usize;
        if depth == 0 {
            return;
        }
        let i = (depth - 1) & (MAX_DEPTH - 1);
        if still_running(phases.sp[i], phases.ret[i], sp, inclusive) {
            return;
        }
        phases.depth -= 1;
    }
}

/// The calling thread's innermost phase, 0 for none.
#[inline(always)]
pub fn current() -> u32 {
    if !enabled() {
        return 0;
    }
    let tid = bpf_get_current_pid_tgid() as u32;
    let Some(phases) = THREAD_PHASES.get_ptr_mut(&tid) else {
        return idle_or_none();
    };
    // SAFETY: a map value, valid while this program runs; only this thread writes it.
    let phases = unsafe { &mut *phases };
    if let Some(regs) = UserRegs::of_current_task() {
        drop_returned(phases, regs.sp, true);
    }
    match phases.depth as usize {
        0 => idle_or_none(),
        d => {
            // A request in flight is activity, however long it runs without a new entry.
            touch_activity();
            phases.ids[(d - 1) & (MAX_DEPTH - 1)] & (IDS as u32 - 1)
        }
    }
}

/// A rule's function was entered: its phase (the attach cookie) becomes the thread's until the
/// call returns.
#[uprobe]
pub fn phase_enter(ctx: ProbeContext) -> u32 {
    // At the entry, the stack pointer is the slot of the return address.
    let sp = UserRegs::of_probe(&ctx).sp;
    enter(&ctx, sp, sp)
}

/// A rule's USDT probe fired: its phase becomes the thread's until the function around the
/// probe returns. That function keeps a frame pointer (checked at attach): its return address
/// is just above the saved frame pointer.
#[uprobe]
pub fn phase_enter_usdt(ctx: ProbeContext) -> u32 {
    let regs = UserRegs::of_probe(&ctx);
    enter(&ctx, regs.bp.wrapping_add(8), regs.sp)
}

/// The function around a rule's USDT probe is entered: a phase its earlier call set has ended,
/// though the new call's return address lies in the same slot (a loop calling it from one
/// site) until the probe fires again.
#[uprobe]
pub fn phase_call(ctx: ProbeContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    if !traced(pid_tgid) {
        return 0;
    }
    let Some(phases) = THREAD_PHASES.get_ptr_mut(&(pid_tgid as u32)) else {
        return 0;
    };
    // SAFETY: a map value, valid while this program runs; only this thread writes it.
    let phases = unsafe { &mut *phases };
    drop_returned(phases, UserRegs::of_probe(&ctx).sp, false);
    0
}

/// Whether the thread `pid_tgid` is of a traced process: the phase probes are attached for
/// every process mapping the file, and only traced ones have phases.
#[inline(always)]
fn traced(pid_tgid: u64) -> bool {
    // SAFETY: a lookup of a plain value.
    unsafe { TARGETS.get((pid_tgid >> 32) as u32) }.is_some()
}

/// Pushes the probe's phase (the attach cookie) on the calling thread's phase stack, for the
/// call whose return address is at stack slot `slot`; `sp` is the stack pointer now.
#[inline(always)]
fn enter(ctx: &ProbeContext, slot: u64, sp: u64) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    if !traced(pid_tgid) {
        return 0;
    }
    let id = attach_cookie(ctx) & (IDS as u32 - 1);
    let tid = pid_tgid as u32;
    if slot < sp || !predicate_holds(ctx, id, sp) {
        return 0;
    }
    // SAFETY: bpf_probe_read_user checks the user address.
    let Ok(ret) = (unsafe { bpf_probe_read_user(slot as *const u64) }) else {
        return 0;
    };
    if THREAD_PHASES.get_ptr_mut(&tid).is_none() {
        let _ = THREAD_PHASES.insert(&tid, &ThreadPhases::default(), 0);
    }
    let Some(phases) = THREAD_PHASES.get_ptr_mut(&tid) else {
        return 0;
    };
    // SAFETY: a map value, valid while this program runs; only this thread writes it.
    let phases = unsafe { &mut *phases };
    // A call whose slot is at or below this one's cannot enclose it: it has returned (the same
    // call site calling again, in a loop, finds its own return address there; a USDT probe
    // firing again in the same call replaces its own entry).
    drop_returned(phases, slot, false);
    // Laundered: the loop above pins the depth on each of its paths, and the compiler drops
    // a mask the bound makes redundant; the verifier needs the bound it sees checked.
    let depth = forget_value(phases.depth as usize);
    if depth < MAX_DEPTH {
        let i = depth & (MAX_DEPTH - 1);
        phases.ids[i] = id;
        phases.sp[i] = slot;
        phases.ret[i] = ret;
        phases.depth += 1;
    }
    touch_activity();
    if let Some(entries) = PHASE_ENTRIES.get_ptr_mut(id) {
        // SAFETY: per-CPU slot: no other writer while this program runs.
        unsafe { *entries += 1 };
    }
    0
}

/// Whether rule `id`'s condition on the call (if any) holds at its entry, `sp` the stack
/// pointer there. A value that cannot be read fails it.
#[inline(always)]
fn predicate_holds(ctx: &ProbeContext, id: u32, sp: u64) -> bool {
    let Some(p) = PHASE_PREDICATES.get(id) else {
        return true;
    };
    let raw: Option<u64> = match p.kind {
        predicate::NONE => return true,
        predicate::ARG => match p.at {
            0 => ctx.arg(0),
            1 => ctx.arg(1),
            2 => ctx.arg(2),
            3 => ctx.arg(3),
            4 => ctx.arg(4),
            _ => ctx.arg(5),
        },
        // SAFETY: bpf_probe_read_user checks the user address.
        _ => unsafe { bpf_probe_read_user((sp + u64::from(p.at)) as *const u64) }.ok(),
    };
    raw.is_some_and(|raw| p.holds(raw))
}

/// A block of `size` bytes allocated in phase `allocated_in` is freed by the calling thread:
/// counted in the (allocated-in, freed-in) cell of `PHASE_FREES`.
#[inline(always)]
pub fn count_free(allocated_in: u32, size: u64) {
    if !enabled() {
        return;
    }
    let cell = ((allocated_in as usize & (IDS - 1)) * IDS + (current() as usize & (IDS - 1)))
        & (IDS * IDS - 1);
    let Some(frees) = PHASE_FREES.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: the map's one value, valid while this program runs; the index is masked within
    // the arrays; other CPUs add too, hence the atomic adds.
    unsafe {
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&raw mut (*frees).bytes[cell], size);
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&raw mut (*frees).count[cell], 1);
    }
}
