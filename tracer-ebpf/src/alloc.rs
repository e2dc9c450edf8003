//! The two ends of an allocation that user space counts, heap or CUDA: the return of the call
//! (`AllocEvent`, with the stack of its caller) and the release of a block (`FreeEvent`).

use aya_ebpf::{helpers::bpf_probe_read_user, programs::RetProbeContext};
use tracer_common::{
    AllocEvent, EnclosingCalls, FreeEvent, InflightCall, StackRecord, drop_cause, event_kind,
    ledger_stat,
};

use crate::{
    diag,
    heap_ledger::{self, Held, Released},
    inflight::{self, CallKind, call_in_flight},
    maps::{
        CALL_INFLIGHT, HEAP_FULL_SAMPLE_ALWAYS, HEAP_FULL_SAMPLE_MEAN, RUNTIME_INFLIGHT, SCRATCH,
        global, scratch,
    },
    ring::{Wakeup, output_event, output_record, try_output_record},
    stack::{StackBudget, StackStart, capture, emit_with_stack, ring_fuller_than},
};

const ENOMEM: i32 = 12;

/// `a * b`, saturated at u64::MAX (BPF has no 128-bit multiply for `saturating_mul`); an
/// overflowing calloc fails with ENOMEM and is reported as a failure of that size.
#[inline(always)]
pub fn mul_saturating(a: u64, b: u64) -> u64 {
    // Schoolbook multiply on 32-bit halves: LLVM turns the usual overflow checks into a 128-bit
    // multiply that BPF cannot call.
    let (ah, al, bh, bl) = (a >> 32, a & 0xffff_ffff, b >> 32, b & 0xffff_ffff);
    if ah != 0 && bh != 0 {
        return u64::MAX;
    }
    let cross = ah * bl + al * bh;
    if cross >> 32 != 0 {
        return u64::MAX;
    }
    let low = al * bl;
    let product = (cross << 32).wrapping_add(low);
    if product < low { u64::MAX } else { product }
}

/// What a returned allocation call produced.
struct Outcome {
    /// The block; 0 when the call failed.
    addr: u64,
    size: u64,
    /// 0, an errno, or the CUresult / cudaError_t.
    err: i32,
}

/// The outcome of `call`, which returned `ret`: a pointer, or (with an out-pointer) a status
/// code and the block written through the out-pointer.
#[inline(always)]
fn outcome(ret: u64, call: &InflightCall) -> Outcome {
    let failed = |err| Outcome {
        addr: 0,
        size: call.size,
        err,
    };
    if call.out_ptr == 0 {
        return if ret == 0 {
            failed(ENOMEM)
        } else {
            Outcome {
                addr: ret,
                size: call.size,
                err: 0,
            }
        };
    }
    let rc = ret as i32;
    if rc != 0 {
        return failed(rc);
    }
    let size = if call.size_ptr != 0 {
        // SAFETY: bpf_probe_read_user checks the user address.
        let pitch = unsafe { bpf_probe_read_user(call.size_ptr as *const u64) }.unwrap_or(0);
        mul_saturating(call.size, pitch)
    } else {
        call.size
    };
    // SAFETY: bpf_probe_read_user checks the user address.
    match unsafe { bpf_probe_read_user(call.out_ptr as *const u64) } {
        Ok(addr) => Outcome { addr, size, err: 0 },
        Err(_) => {
            diag::lost(drop_cause::READ_FAILED, "allocation return");
            Outcome {
                addr: 0,
                size,
                err: ENOMEM,
            }
        }
    }
}

/// The event's `origin`: realloc's old block; for a CUDA call, the runtime call it is made from
/// (its failure is named after both) and the non-allocating driver call around it, a graph
/// instantiation, a module load (what it allocates is attributed to it).
#[inline(always)]
fn origin(kind: CallKind, call: &InflightCall) -> u64 {
    match kind {
        CallKind::Cuda => EnclosingCalls {
            runtime: call_in_flight(&RUNTIME_INFLIGHT),
            driver: call_in_flight(&CALL_INFLIGHT),
        }
        .pack(),
        CallKind::Heap | CallKind::Runtime => call.old_block,
    }
}

/// The return of an allocation call of `kind`: emits the completed call with its user stack,
/// or, for a heap block the kernel's ledger holds, nothing.
#[inline(always)]
pub fn finish_call(ctx: &RetProbeContext, kind: CallKind) -> u32 {
    let Some((call, key)) = inflight::leave(kind) else {
        return 0;
    };
    let done = outcome(ctx.ret(), &call);
    let tgid = (key >> 32) as u32;
    if kind == CallKind::Heap {
        // --heap-sample: the recorded block joins the sampled set (its free is then emitted),
        // realloc's old one leaves it.
        crate::heap::forget_sampled(tgid, call.old_block);
        if done.addr != 0 && !crate::heap::remember_sampled(tgid, done.addr) {
            diag::lost(drop_cause::SAMPLED_SET_FULL, "sampled heap block");
            return 0;
        }
    }
    // The kernel's heap ledger: a realloc that released its old block (moved, grew in place,
    // or freed it with size 0) releases it here if it is held here.
    let ledger = kind == CallKind::Heap && heap_ledger::enabled();
    let process = if ledger {
        heap_ledger::process(tgid)
    } else {
        None
    };
    let releases_old = call.old_block != 0 && (done.addr != 0 || done.size == 0);
    let old_held = ledger
        && releases_old
        && heap_ledger::release_reallocated((tgid, process), call.old_block) == Released::Kernel;
    if ledger && call.old_block != 0 && !releases_old {
        // The realloc failed: its block stays as it was.
        heap_ledger::mark_reallocating(tgid, call.old_block, false);
    }
    let Some(record) = scratch(&SCRATCH) else {
        return 0;
    };
    // SAFETY: the per-CPU scratch is ours until this program returns.
    let record = unsafe { &mut *record };
    record.event = AllocEvent {
        kind: event_kind::ALLOC,
        tgid,
        tid: key as u32,
        nframes: 0,
        stack_flags: 0,
        addr: done.addr,
        size: done.size,
        // User space releases realloc's old block, unless the kernel did.
        origin: if old_held { 0 } else { origin(kind, &call) },
        err: done.err,
        func: call.func,
        aux: call.aux,
        stack_key: 0,
        phase: crate::phase::current(),
        _pad: 0,
    };
    // realloc(p, 0) returning NULL freed p: a free needs no stack.
    if done.addr == 0 && done.size == 0 && call.old_block != 0 {
        if !old_held {
            output_record(record, 0);
        }
        return 0;
    }
    // Heap calls are many: they get the cheaper stack unless asked otherwise; CUDA calls and
    // failures are few and get the best one.
    let start = StackStart::at_probe(ctx);
    if kind != CallKind::Heap || done.addr == 0 {
        emit_with_stack(record, start, StackBudget::Other);
    } else if ledger {
        hold_or_emit(record, start, process);
    } else {
        emit_with_stack(record, start, StackBudget::Heap);
    }
    0
}

/// A heap block, with the kernel's ledger on: held and counted there; its stack sent to user
/// space the first time (and again while the ring has no room); through the ring as an event
/// when the ledger is full.
#[inline(always)]
fn hold_or_emit(
    record: &mut StackRecord<AllocEvent>,
    start: StackStart,
    process: heap_ledger::Process,
) {
    let settings = heap_ledger::settings_of((record.event.tgid, process));
    // The walk stops at the frames the key covers: user space keeps no more of them.
    let start = start
        .with_python(settings.python)
        .with_native_frames(settings.key_frames);
    let bytes = capture(record, start, StackBudget::Heap);
    let ev = &mut record.event;
    let generation = heap_ledger::generation(process);
    let covered = settings.key_frames;
    let frames = (usize::from(ev.nframes), bytes);
    let key = heap_ledger::stack_key(
        (ev.tgid, generation),
        (ev.stack_flags, ev.phase),
        &record.stack,
        frames,
        covered,
    );
    let held = heap_ledger::hold((ev.tgid, process), ev.addr, ev.size, (key, ev.phase));
    if held != Held::Full && ev.origin != 0 {
        // A realloc of a block the kernel did not hold: its release goes to user space.
        emit_free(ev.tgid, ev.origin);
    }
    match held {
        Held::Yes => {}
        // Stacks wait while the ring is half full: the events that cannot wait (failures,
        // mappings, frees user space holds) keep their room.
        Held::Undelivered if !ring_fuller_than(2) => {
            ev.kind = event_kind::HEAP_STACK;
            ev.stack_key = key;
            // The native frames the key covers: user space keeps only those.
            ev.aux = covered as u64;
            if try_output_record(record, bytes) {
                heap_ledger::delivered(key);
            }
        }
        Held::Undelivered => {}
        Held::Full => match full_ledger_sample(ev.size) {
            Some(p) => {
                ev.aux = u64::from(p);
                output_record(record, bytes);
            }
            None => {
                heap_ledger::count(ledger_stat::FULL_SAMPLED_OUT);
                if ev.origin != 0 {
                    // realloc's old block is released all the same.
                    emit_free(ev.tgid, ev.origin);
                }
            }
        },
    }
}

/// A block the kernel's ledger has no room for goes through the ring: every one while the ring
/// is at most a quarter full; past that, a byte-sampled share (Poisson at
/// `HEAP_FULL_SAMPLE_MEAN`, as `--heap-sample`), each standing for `size / p` bytes, so that a
/// full ledger degrades to sampling rather than to a full ring. Its probability (0: exact), or
/// None: left out.
#[inline(always)]
fn full_ledger_sample(size: u64) -> Option<u32> {
    let mean = global(&HEAP_FULL_SAMPLE_MEAN);
    if mean == 0 || (global(&HEAP_FULL_SAMPLE_ALWAYS) == 0 && !ring_fuller_than(4)) {
        return Some(0);
    }
    crate::heap::sample_at(size, mean)
}

/// Emits the release of the block at `addr` (heap free, CUDA free).
#[inline(always)]
pub fn emit_free(tgid: u32, addr: u64) -> u32 {
    let event = FreeEvent {
        kind: event_kind::FREE,
        tgid,
        addr,
        phase: crate::phase::current(),
        _pad: 0,
    };
    output_event(&event, Wakeup::AtPoll, "free");
    0
}
