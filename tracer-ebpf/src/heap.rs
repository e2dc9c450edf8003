//! The C allocator's probes: malloc and friends save their arguments at entry, emit at return
//! (`alloc::finish_call`); `free` emits at entry. Nested calls (glibc's realloc calls malloc
//! and free itself) are folded into the outer call.

use aya_ebpf::{
    EbpfContext,
    helpers::{bpf_get_current_pid_tgid, bpf_get_func_ip, bpf_get_prandom_u32},
    macros::{uprobe, uretprobe},
    programs::{ProbeContext, RetProbeContext},
};
use tracer_common::{HeapFn, heap_ledger::BlockKey, heap_sample, heap_window, ledger_stat};

use crate::{
    alloc::{emit_free, finish_call, mul_saturating},
    heap_ledger::{self, Released},
    inflight::{CallKind, Entry, attach_cookie, enter_thread, holds, thread_slot},
    maps::{
        HEAP_DUTY_CYCLED, HEAP_SAMPLE_MEAN, HEAP_SYSTEMWIDE, HEAP_WINDOW, INFLIGHT, SAMPLE_EXP,
        SAMPLED, global,
    },
};

/// `--heap-sample`: whether to record an allocation of `size` bytes, and its probability `p`
/// as a fraction of 2^32 (`heap_sample::ALWAYS`: certain; 0: not sampling, every call).
#[inline(always)]
fn sample(size: u64) -> Option<u32> {
    match global(&HEAP_SAMPLE_MEAN) {
        0 => Some(0),
        mean => sample_at(size, mean),
    }
}

/// Whether to record an allocation of `size` bytes sampled at `mean` bytes (not 0), and its
/// probability `p` as a fraction of 2^32 (`heap_sample::ALWAYS`: certain).
/// `p = 1 − exp(−size / mean)`, `exp` interpolated between the entries of `SAMPLE_EXP`.
#[inline(always)]
pub fn sample_at(size: u64, mean: u32) -> Option<u32> {
    let mean = u64::from(mean);
    if size >= mean * heap_sample::ALWAYS_AT_MEANS {
        return Some(heap_sample::ALWAYS);
    }
    // size / mean in units of 1/64, with 16 bits of fraction (size < 2^36: no overflow).
    let t = (size << 22) / mean;
    let (i, f) = ((t >> 16) as u32, t & 0xffff);
    let entry = |i: u32| SAMPLE_EXP.get(i).copied().map(u64::from);
    let (Some(e0), Some(e1)) = (entry(i), entry(i + 1)) else {
        return Some(heap_sample::ALWAYS);
    };
    let e = e0 - (((e0 - e1) * f) >> 16);
    let p = (u64::from(u32::MAX) - e.min(u64::from(u32::MAX))) as u32;
    // SAFETY: the helper only returns a pseudo-random number.
    let draw = unsafe { bpf_get_prandom_u32() };
    (draw < p).then_some(p)
}

/// The block at `addr` of process `tgid` in the sampled set.
#[inline(always)]
fn sampled_block(tgid: u32, addr: u64) -> BlockKey {
    BlockKey {
        tgid,
        _pad: 0,
        addr,
    }
}

/// The calling process's tgid.
#[inline(always)]
fn current_tgid() -> u32 {
    (bpf_get_current_pid_tgid() >> 32) as u32
}

/// Whether `addr` is a recorded block of a sampled heap in process `tgid`.
#[inline(always)]
fn is_sampled(tgid: u32, addr: u64) -> bool {
    // SAFETY: a lookup of a plain value.
    unsafe { SAMPLED.get(&sampled_block(tgid, addr)) }.is_some()
}

/// Whether `addr` was a recorded block of a sampled heap (it is no longer in the set); true
/// when not sampling.
#[inline(always)]
fn take_sampled(tgid: u32, addr: u64) -> bool {
    if global(&HEAP_SAMPLE_MEAN) == 0 {
        return true;
    }
    let key = sampled_block(tgid, addr);
    // SAFETY: a lookup of a plain value.
    if unsafe { SAMPLED.get(&key) }.is_none() {
        return false;
    }
    let _ = SAMPLED.remove(&key);
    true
}

/// `--heap-sample`: a recorded block's address goes into the sampled set before its event is
/// emitted; false if the set is full (the block is then not recorded, and counted lost).
#[inline(always)]
pub fn remember_sampled(tgid: u32, addr: u64) -> bool {
    global(&HEAP_SAMPLE_MEAN) == 0 || SAMPLED.insert(&sampled_block(tgid, addr), &1, 0).is_ok()
}

/// `--heap-sample`: forgets a block the recorded call released (realloc's old block).
#[inline(always)]
pub fn forget_sampled(tgid: u32, addr: u64) {
    if global(&HEAP_SAMPLE_MEAN) != 0 && addr != 0 {
        let _ = SAMPLED.remove(&sampled_block(tgid, addr));
    }
}

/// Whether process `tgid`, the caller, is not traced: only possible when the probes are
/// attached for every process mapping the allocator (`HEAP_SYSTEMWIDE`, children followed from
/// birth).
#[inline(always)]
fn untraced_caller(tgid: u32) -> bool {
    global(&HEAP_SYSTEMWIDE) != 0 && crate::traced::traced(tgid).is_none()
}

/// Duty-cycled heap: whether the `which` window (`heap_window`) is closed; the probes then
/// record nothing until they are detached.
#[inline(always)]
fn window_closed(which: u32) -> bool {
    global(&HEAP_DUTY_CYCLED) != 0 && HEAP_WINDOW.get(which).is_none_or(|open| *open == 0)
}

/// Counts a heap call in `stat` (`HEAP_CALLS`, `FREE_CALLS`, `HELD_FREED`) for a duty-cycled
/// heap's budget and graces (`heap_duty.rs` reads the counts); nothing reads them otherwise, so
/// nothing is counted: a branch on a load-time constant, pruned by the verifier.
#[inline(always)]
fn count_call(stat: u32) {
    if global(&HEAP_DUTY_CYCLED) != 0 {
        heap_ledger::count(stat);
    }
}

/// A heap call of `size` bytes, as its entry saves it; whether its return has anything to do
/// (false: an untraced caller, a closed window or an unsampled call, whose return finds no
/// saved call and emits nothing).
#[inline(always)]
fn enter_heap(cookie: u32, size: u64, old_block: u64, out_ptr: u64) -> bool {
    // Sampling (never duty-cycled), the draw comes first: most calls are done with before the
    // traced-set lookup. An untraced caller's old block is in no sampled set (keyed by process).
    let sampling = global(&HEAP_SAMPLE_MEAN) != 0;
    // The calling thread, read once (the helper costs as much as an array lookup).
    let thread = if sampling {
        0
    } else {
        bpf_get_current_pid_tgid()
    };
    if !sampling && (untraced_caller((thread >> 32) as u32) || window_closed(heap_window::ALLOC)) {
        return false;
    }
    count_call(ledger_stat::HEAP_CALLS);
    let Some(p) = sample(size) else {
        // Not recorded. A realloc still releases its old block: if that one was recorded,
        // its release is (the realloc may grow it in place, with no free inside).
        if old_block != 0 {
            let tgid = current_tgid();
            if take_sampled(tgid, old_block) {
                emit_free(tgid, old_block);
            }
        }
        return false;
    };
    // Sampling, the thread is read only now, for a recorded call.
    let thread = if sampling {
        bpf_get_current_pid_tgid()
    } else {
        thread
    };
    let tgid = (thread >> 32) as u32;
    if sampling && untraced_caller(tgid) {
        return false;
    }
    // A realloc of a block that was not recorded is, for the ledger, a new allocation.
    let old_block = if p != 0 && old_block != 0 && !is_sampled(tgid, old_block) {
        0
    } else {
        old_block
    };
    if old_block != 0 && crate::heap_ledger::enabled() {
        crate::heap_ledger::mark_reallocating(tgid, old_block, true);
    }
    let entry = Entry {
        old_block,
        out_ptr,
        aux: u64::from(p),
        ..Entry::new(cookie, size)
    };
    enter_thread(thread, CallKind::Heap, entry);
    true
}

/// Every allocation function's entry, one program for all, so that a window's allocation
/// entries are one multi-uprobe link: the hook's cookie (`HeapFn`) says which arguments hold
/// the size, the old block (realloc) and where the block is written (posix_memalign).
#[uprobe]
pub fn heap_enter(ctx: ProbeContext) -> u32 {
    enter_allocation(&ctx);
    0
}

/// Sampled heap on a kernel with uprobe sessions (Linux 6.13): one program at each allocation
/// function's entry and, unless its entry run returned 1, at its return. An unsampled call
/// returns 1: the kernel sets no return probe for it, and it costs its entry trap alone.
#[uprobe]
pub fn heap_session(ctx: ProbeContext) -> u32 {
    // The entry run is at the probed address, which the kernel gives as the function's; the
    // return run at the return trampoline.
    // SAFETY: the helper reads the running probe's address; the registers are the probe's.
    let (probed, ip) = unsafe { (bpf_get_func_ip(ctx.as_ptr()), (*ctx.regs).rip) };
    if ip != probed {
        return finish_call(&RetProbeContext::new(ctx.as_ptr()), CallKind::Heap);
    }
    if enter_allocation(&ctx) { 0 } else { 1 }
}

/// An allocation function's entry; whether its return has anything to do.
#[inline(always)]
fn enter_allocation(ctx: &ProbeContext) -> bool {
    let arg = |i: usize| -> u64 { ctx.arg::<u64>(i).unwrap_or(0) };
    let cookie = attach_cookie(ctx);
    let (size, old_block, out_ptr) = match HeapFn::from_u32(cookie) {
        // malloc, valloc, pvalloc: `(size)`.
        Some(HeapFn::Malloc | HeapFn::Valloc | HeapFn::Pvalloc) => (arg(0), 0, 0),
        // aligned_alloc, memalign: `(alignment, size)`.
        Some(HeapFn::AlignedAlloc | HeapFn::Memalign) => (arg(1), 0, 0),
        // calloc: `(nmemb, size)`.
        Some(HeapFn::Calloc) => (mul_saturating(arg(0), arg(1)), 0, 0),
        // realloc: `(ptr, size)`.
        Some(HeapFn::Realloc) => (arg(1), arg(0), 0),
        // reallocarray: `(ptr, nmemb, size)`.
        Some(HeapFn::Reallocarray) => (mul_saturating(arg(1), arg(2)), arg(0), 0),
        // posix_memalign: `(void **memptr, alignment, size)`; the block is read from
        // `*memptr` at return.
        Some(HeapFn::PosixMemalign) => (arg(2), 0, arg(0)),
        Some(HeapFn::Free) | None => return false,
    };
    enter_heap(cookie, size, old_block, out_ptr)
}

/// Return of every allocation function: emits the completed call with its user stack.
#[uretprobe]
pub fn heap_return(ctx: RetProbeContext) -> u32 {
    finish_call(&ctx, CallKind::Heap)
}

/// free: `(ptr)`. Attached after glibc's `free(NULL)` early exit where that site is cheaper.
#[uprobe]
pub fn heap_free(ctx: ProbeContext) -> u32 {
    let addr: u64 = ctx.arg(0).unwrap_or(0);
    if addr == 0 {
        return 0;
    }
    let thread = bpf_get_current_pid_tgid();
    let tgid = (thread >> 32) as u32;
    // A sampled heap's frees are mostly of blocks it did not record: done with first, before
    // the traced-set lookup (only traced processes' blocks are in the set).
    if global(&HEAP_SAMPLE_MEAN) != 0 && !is_sampled(tgid, addr) {
        return 0;
    }
    // The caller's process, looked up once: whether it is traced, and (kernel ledger) its
    // image generation and heap share.
    let ledger = heap_ledger::enabled();
    let process = if ledger || global(&HEAP_SYSTEMWIDE) != 0 {
        heap_ledger::process(tgid)
    } else {
        None
    };
    if (global(&HEAP_SYSTEMWIDE) != 0 && process.is_none()) || window_closed(heap_window::FREE) {
        return 0;
    }
    count_call(ledger_stat::HEAP_CALLS);
    count_call(ledger_stat::FREE_CALLS);
    let Some((slot, key)) = thread_slot(&INFLIGHT, thread) else {
        return 0;
    };
    if holds(slot, key) {
        // realloc freeing its old block: the realloc event accounts for it.
        return 0;
    }
    if !take_sampled(tgid, addr) {
        return 0; // a block that was not recorded
    }
    if ledger {
        match heap_ledger::release((tgid, process), addr) {
            Released::Kernel => {
                // Counted in the kernel's ledger.
                count_call(ledger_stat::HELD_FREED);
                return 0;
            }
            Released::Unknown if !heap_ledger::ever_full() => {
                // Nobody knows this block: an unmatched free, counted here.
                heap_ledger::count(ledger_stat::UNMATCHED_FREES);
                return 0;
            }
            _ => {}
        }
    }
    emit_free(tgid, addr)
}

/// malloc's entry, for a moment before the heap probes go on (`record -p PID --heap`): counts
/// the calls, so that the recorder can say what tracing each of them will cost.
#[uprobe]
pub fn heap_count(_ctx: ProbeContext) -> u32 {
    heap_ledger::count(ledger_stat::HEAP_CALLS);
    0
}

/// Empty programs at the same attach points: the benchmark's floor (trap cost alone).
#[uprobe]
pub fn floor_enter(_ctx: ProbeContext) -> u32 {
    0
}

#[uretprobe]
pub fn floor_return(_ctx: RetProbeContext) -> u32 {
    0
}

/// The floor of a sampled heap on uprobe sessions: the entry trap alone (returning 1 sets no
/// return probe).
#[uprobe]
pub fn floor_session(_ctx: ProbeContext) -> u32 {
    1
}

/// Loaded for a multi-uprobe link and linked to nothing: whether the kernel makes such links
/// (`tracer/src/probes/uprobe_multi.rs`).
#[uprobe]
pub fn multi_link_probe(_ctx: ProbeContext) -> u32 {
    0
}
