//! Sampled page faults of traced processes: which stacks make RSS grow, without any uprobe.

use aya_ebpf::{
    helpers::bpf_get_current_pid_tgid, macros::tracepoint, programs::TracePointContext,
};
use tracer_common::{FaultEvent, event_kind};

use crate::{
    maps::{FAULT_COUNT, FAULT_SAMPLE, FAULT_SCRATCH, TARGETS, global, scratch},
    stack::{StackBudget, StackStart, emit_with_stack},
};

/// exceptions:page_fault_user's record: the faulting address, and the error code.
const FAULT_ADDRESS_AT: usize = 8;
const FAULT_ERROR_CODE_AT: usize = 24;

/// Whether this fault is one of every `every` counted on this CPU.
#[inline(always)]
fn sampled(every: u32) -> bool {
    let Some(count) = FAULT_COUNT.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: per-CPU slot, no concurrent writer.
    let n = unsafe {
        *count += 1;
        *count
    };
    n % u64::from(every) == 0
}

/// exceptions:page_fault_user: one of every `FAULT_SAMPLE` not-present faults, with its stack.
#[tracepoint]
pub fn page_fault_user(ctx: TracePointContext) -> u32 {
    let every = global(&FAULT_SAMPLE);
    if every == 0 {
        return 0;
    }
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if TARGETS.get_ptr(tgid).is_none() {
        return 0;
    }
    // SAFETY: reads the tracepoint record.
    let error_code = unsafe { ctx.read_at::<u64>(FAULT_ERROR_CODE_AT) }.unwrap_or(1);
    if error_code & 1 != 0 {
        return 0; // protection fault on a present page: no new memory
    }
    if !sampled(every) {
        return 0;
    }
    let Some(record) = scratch(&FAULT_SCRATCH) else {
        return 0;
    };
    // SAFETY: the per-CPU scratch is ours until this program returns.
    let record = unsafe { &mut *record };
    record.event = FaultEvent {
        kind: event_kind::FAULT,
        tgid,
        nframes: 0,
        stack_flags: 0,
        weight: every,
        // SAFETY: reads the tracepoint record.
        address: unsafe { ctx.read_at::<u64>(FAULT_ADDRESS_AT) }.unwrap_or(0),
    };
    // A leaf function (memset, memcpy) touching the page has no frame: the stack-pointer
    // candidate recovers its caller. Sampled faults can still be many (a large memset): the
    // cheaper stack unless asked.
    let Some(start) = StackStart::at_tracepoint() else {
        return 0;
    };
    emit_with_stack(record, start, StackBudget::Heap);
    0
}
