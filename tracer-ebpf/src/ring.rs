//! Writing records into the `EVENTS` ring buffer; a full ring loses the record, counted.

use core::mem::size_of;

use aya_ebpf::bindings::BPF_RB_NO_WAKEUP;
use tracer_common::{StackRecord, drop_cause};

use crate::{diag, maps::EVENTS};

/// When user space hears of a record.
#[derive(Copy, Clone)]
pub enum Wakeup {
    /// At its next poll (every 10 ms): no event pays for a wake-up.
    AtPoll,
    /// Now: process-tree events, which user space acts on (attach to a new child).
    Now,
}

/// Copies a fixed-size event into the ring.
#[inline(always)]
pub fn output_event<T>(event: &T, wakeup: Wakeup, site: &'static str) {
    let flags = match wakeup {
        Wakeup::AtPoll => BPF_RB_NO_WAKEUP as u64,
        Wakeup::Now => 0,
    };
    if EVENTS.output::<T>(event, flags).is_err() {
        diag::lost(drop_cause::RINGBUF_FULL, site);
    }
}

/// Copies the used part of a scratch record into the ring: its event and the first
/// `stack_bytes` bytes of its stack area. A full ring loses it, counted.
#[inline(always)]
pub fn output_record<E>(record: &StackRecord<E>, stack_bytes: usize) {
    if !try_output_record(record, stack_bytes) {
        diag::lost(drop_cause::RINGBUF_FULL, "stack record");
    }
}

/// `output_record` for a record that is sent again later if the ring has no room now (the heap
/// ledger's stacks): whether it went in; nothing is counted lost.
#[inline(always)]
pub fn try_output_record<E>(record: &StackRecord<E>, stack_bytes: usize) -> bool {
    let len = size_of::<E>() + (stack_bytes & 0xffff);
    let len = if len > size_of::<StackRecord<E>>() {
        size_of::<StackRecord<E>>()
    } else {
        len
    };
    // SAFETY: `record` is `len` readable bytes (bounded above for the verifier).
    let bytes =
        unsafe { core::slice::from_raw_parts((record as *const StackRecord<E>).cast::<u8>(), len) };
    EVENTS
        .output::<[u8]>(bytes, BPF_RB_NO_WAKEUP as u64)
        .is_ok()
}
