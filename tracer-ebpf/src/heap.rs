//! The C allocator's probes: malloc and friends save their arguments at entry, emit at return
//! (`alloc::finish_call`); `free` emits at entry. Nested calls (glibc's realloc calls malloc
//! and free itself) are folded into the outer call.

use aya_ebpf::{
    helpers::bpf_get_current_pid_tgid,
    macros::{uprobe, uretprobe},
    programs::{ProbeContext, RetProbeContext},
};

use crate::{
    alloc::{emit_free, finish_call, mul_saturating},
    inflight::{CallKind, Entry, attach_cookie, enter, holds, my_slot},
    maps::{HEAP_SYSTEMWIDE, INFLIGHT, TARGETS, global},
};

/// Whether the calling process is not traced: only possible when the probes are attached for
/// every process mapping the allocator (`HEAP_SYSTEMWIDE`, children followed from birth).
#[inline(always)]
fn untraced_caller() -> bool {
    global(&HEAP_SYSTEMWIDE) != 0
        && TARGETS
            .get_ptr((bpf_get_current_pid_tgid() >> 32) as u32)
            .is_none()
}

/// A heap call of `size` bytes, as its entry saves it. (Its return finds no saved call for an
/// untraced caller, and emits nothing.)
#[inline(always)]
fn enter_heap(ctx: &ProbeContext, size: u64, old_block: u64, out_ptr: u64) -> u32 {
    if untraced_caller() {
        return 0;
    }
    let entry = Entry {
        old_block,
        out_ptr,
        ..Entry::new(attach_cookie(ctx), size)
    };
    enter(CallKind::Heap, entry)
}

/// malloc, valloc, pvalloc: `(size)`.
#[uprobe]
pub fn heap_enter_size0(ctx: ProbeContext) -> u32 {
    let size: u64 = ctx.arg(0).unwrap_or(0);
    enter_heap(&ctx, size, 0, 0)
}

/// aligned_alloc, memalign: `(alignment, size)`.
#[uprobe]
pub fn heap_enter_size1(ctx: ProbeContext) -> u32 {
    let size: u64 = ctx.arg(1).unwrap_or(0);
    enter_heap(&ctx, size, 0, 0)
}

/// calloc: `(nmemb, size)`.
#[uprobe]
pub fn heap_enter_calloc(ctx: ProbeContext) -> u32 {
    let n: u64 = ctx.arg(0).unwrap_or(0);
    let size: u64 = ctx.arg(1).unwrap_or(0);
    enter_heap(&ctx, mul_saturating(n, size), 0, 0)
}

/// realloc: `(ptr, size)`.
#[uprobe]
pub fn heap_enter_realloc(ctx: ProbeContext) -> u32 {
    let old: u64 = ctx.arg(0).unwrap_or(0);
    let size: u64 = ctx.arg(1).unwrap_or(0);
    enter_heap(&ctx, size, old, 0)
}

/// reallocarray: `(ptr, nmemb, size)`.
#[uprobe]
pub fn heap_enter_reallocarray(ctx: ProbeContext) -> u32 {
    let old: u64 = ctx.arg(0).unwrap_or(0);
    let n: u64 = ctx.arg(1).unwrap_or(0);
    let size: u64 = ctx.arg(2).unwrap_or(0);
    enter_heap(&ctx, mul_saturating(n, size), old, 0)
}

/// posix_memalign: `(void **memptr, alignment, size)`; the block is read from `*memptr` at return.
#[uprobe]
pub fn heap_enter_posix_memalign(ctx: ProbeContext) -> u32 {
    let memptr: u64 = ctx.arg(0).unwrap_or(0);
    let size: u64 = ctx.arg(2).unwrap_or(0);
    enter_heap(&ctx, size, 0, memptr)
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
    if addr == 0 || untraced_caller() {
        return 0;
    }
    let Some((slot, key)) = my_slot(&INFLIGHT) else {
        return 0;
    };
    if holds(slot, key) {
        // realloc freeing its old block: the realloc event accounts for it.
        return 0;
    }
    emit_free((key >> 32) as u32, addr)
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
