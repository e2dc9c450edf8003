//! Request phases (`record --phase NAME=LIB:SYMBOL`): an entry probe on a rule's function pushes
//! its phase on the calling thread's phase stack (`THREAD_PHASES`), the return probe pops it.
//! Every allocation, free and mapping record carries the thread's innermost phase; the kernel's
//! heap ledger keys its stacks by it and counts each held block's free by (allocated-in,
//! freed-in) phase (`PHASE_FREES`). Without rules (`PHASES` 0) each read is a branch on a
//! load-time constant, pruned by the verifier: no cost.

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{
    helpers::bpf_get_current_pid_tgid,
    macros::{uprobe, uretprobe},
    programs::{ProbeContext, RetProbeContext},
};
use tracer_common::phase::{IDS, MAX_DEPTH, ThreadPhases};

use crate::{
    inflight::attach_cookie,
    maps::{PHASE_ENTRIES, PHASE_FREES, PHASES, TARGETS, THREAD_PHASES, global},
};

/// Whether phase rules are attached in this recording.
#[inline(always)]
pub fn enabled() -> bool {
    global(&PHASES) != 0
}

/// The calling thread's innermost phase, 0 for none.
#[inline(always)]
pub fn current() -> u32 {
    if !enabled() {
        return 0;
    }
    let tid = bpf_get_current_pid_tgid() as u32;
    // SAFETY: a lookup of a plain value.
    unsafe { THREAD_PHASES.get(tid) }.map_or(0, |p| p.current() & (IDS as u32 - 1))
}

/// A rule's function was entered: its phase (the attach cookie) becomes the thread's.
#[uprobe]
pub fn phase_enter(ctx: ProbeContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    // Attached for every process mapping the file: only traced processes have phases.
    // SAFETY: a lookup of a plain value.
    if unsafe { TARGETS.get((pid_tgid >> 32) as u32) }.is_none() {
        return 0;
    }
    let id = attach_cookie(&ctx) & (IDS as u32 - 1);
    let tid = pid_tgid as u32;
    if THREAD_PHASES.get_ptr_mut(&tid).is_none() {
        let _ = THREAD_PHASES.insert(&tid, &ThreadPhases::default(), 0);
    }
    let Some(phases) = THREAD_PHASES.get_ptr_mut(&tid) else {
        return 0;
    };
    // SAFETY: a map value, valid while this program runs; only this thread writes it.
    let phases = unsafe { &mut *phases };
    let depth = phases.depth as usize;
    if depth < MAX_DEPTH {
        phases.ids[depth & (MAX_DEPTH - 1)] = id;
        phases.depth += 1;
    } else {
        phases.overflow += 1;
    }
    if let Some(entries) = PHASE_ENTRIES.get_ptr_mut(id) {
        // SAFETY: per-CPU slot: no other writer while this program runs.
        unsafe { *entries += 1 };
    }
    0
}

/// A rule's function returned: the thread is back in the phase it was in before.
#[uretprobe]
pub fn phase_exit(_ctx: RetProbeContext) -> u32 {
    let tid = bpf_get_current_pid_tgid() as u32;
    let Some(phases) = THREAD_PHASES.get_ptr_mut(&tid) else {
        return 0;
    };
    // SAFETY: a map value, valid while this program runs; only this thread writes it.
    let phases = unsafe { &mut *phases };
    if phases.overflow > 0 {
        phases.overflow -= 1;
    } else if phases.depth > 0 {
        phases.depth -= 1;
    }
    if phases.depth == 0 && phases.overflow == 0 {
        let _ = THREAD_PHASES.remove(&tid);
    }
    0
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
