//! Kernel side of alloctrace: uprobes on the C allocator.
//!
//! Allocation entries save their arguments per thread; the matching return emits one event with
//! the result and the user stack. `free` emits at entry. Nested calls (glibc's realloc calls malloc
//! and free itself) are folded into the outer call. Nothing is aggregated here: user space keeps the
//! ledger, so the kernel side stays a few map operations per call.
#![no_std]
#![no_main]

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_F_USER_STACK, BPF_RB_NO_WAKEUP},
    helpers::{bpf_get_attach_cookie, bpf_get_current_pid_tgid, bpf_probe_read_user},
    macros::{map, uprobe, uretprobe},
    maps::{HashMap, PerCpuArray, RingBuf, StackTrace},
    programs::{ProbeContext, RetProbeContext, tracing::StackIdContext as _},
};
use tracer_common::{HeapAllocEvent, HeapFn, HeapFreeEvent, InflightCall, drop_cause, event_kind};

const ENOMEM: i32 = 12;
const EEXIST: i32 = 17;

/// Events to user space. Sized by user space at load time (`--ring-size`).
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(16 << 20, 0);

/// User stacks by id. Sized by user space at load time (`--stack-storage-size`).
#[map]
static STACKS: StackTrace = StackTrace::with_max_entries(16384, 0);

/// Arguments of allocation calls in flight, keyed by `pid_tgid` (one per thread).
#[map]
static INFLIGHT: HashMap<u64, InflightCall> = HashMap::with_max_entries(32768, 0);

/// Lost events and lost stacks by `drop_cause`.
#[map]
static DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(drop_cause::COUNT, 0);

#[inline(always)]
fn count_drop(cause: u32) {
    if let Some(slot) = DROPS.get_ptr_mut(cause) {
        // Per-CPU slot: no other writer while this program runs.
        unsafe { *slot += 1 };
    }
}

#[inline(always)]
fn cookie_fn<C: EbpfContext>(ctx: &C) -> u32 {
    // SAFETY: the helper only reads the attach cookie of the running program.
    unsafe { bpf_get_attach_cookie(ctx.as_ptr()) as u32 }
}

#[inline(always)]
fn enter(func: u32, size: u64, old_addr: u64, memptr: u64) -> u32 {
    let key = bpf_get_current_pid_tgid();
    if let Some(call) = INFLIGHT.get_ptr_mut(&key) {
        // A hooked function called from inside another one on this thread: part of the outer call.
        unsafe { (*call).depth += 1 };
        return 0;
    }
    let call = InflightCall {
        size,
        old_addr,
        memptr,
        func,
        depth: 0,
    };
    if INFLIGHT.insert(&key, &call, 0).is_err() {
        count_drop(drop_cause::INFLIGHT_FULL);
    }
    0
}

/// `a * b`, saturated at u64::MAX (BPF has no 128-bit multiply for `saturating_mul`); an
/// overflowing calloc fails with ENOMEM and is reported as a failure of that size.
#[inline(always)]
fn mul_saturating(a: u64, b: u64) -> u64 {
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

/// malloc, valloc, pvalloc: `(size)`.
#[uprobe]
pub fn heap_enter_size0(ctx: ProbeContext) -> u32 {
    let size: u64 = ctx.arg(0).unwrap_or(0);
    enter(cookie_fn(&ctx), size, 0, 0)
}

/// aligned_alloc, memalign: `(alignment, size)`.
#[uprobe]
pub fn heap_enter_size1(ctx: ProbeContext) -> u32 {
    let size: u64 = ctx.arg(1).unwrap_or(0);
    enter(cookie_fn(&ctx), size, 0, 0)
}

/// calloc: `(nmemb, size)`.
#[uprobe]
pub fn heap_enter_calloc(ctx: ProbeContext) -> u32 {
    let n: u64 = ctx.arg(0).unwrap_or(0);
    let size: u64 = ctx.arg(1).unwrap_or(0);
    enter(cookie_fn(&ctx), mul_saturating(n, size), 0, 0)
}

/// realloc: `(ptr, size)`.
#[uprobe]
pub fn heap_enter_realloc(ctx: ProbeContext) -> u32 {
    let old: u64 = ctx.arg(0).unwrap_or(0);
    let size: u64 = ctx.arg(1).unwrap_or(0);
    enter(cookie_fn(&ctx), size, old, 0)
}

/// reallocarray: `(ptr, nmemb, size)`.
#[uprobe]
pub fn heap_enter_reallocarray(ctx: ProbeContext) -> u32 {
    let old: u64 = ctx.arg(0).unwrap_or(0);
    let n: u64 = ctx.arg(1).unwrap_or(0);
    let size: u64 = ctx.arg(2).unwrap_or(0);
    enter(cookie_fn(&ctx), mul_saturating(n, size), old, 0)
}

/// posix_memalign: `(void **memptr, alignment, size)`; the block is read from `*memptr` at return.
#[uprobe]
pub fn heap_enter_posix_memalign(ctx: ProbeContext) -> u32 {
    let memptr: u64 = ctx.arg(0).unwrap_or(0);
    let size: u64 = ctx.arg(2).unwrap_or(0);
    enter(cookie_fn(&ctx), size, 0, memptr)
}

/// Return of every allocation function: emits the completed call.
#[uretprobe]
pub fn heap_return(ctx: RetProbeContext) -> u32 {
    let key = bpf_get_current_pid_tgid();
    let Some(slot) = INFLIGHT.get_ptr_mut(&key) else {
        return 0;
    };
    // SAFETY: the pointer into the map value is valid until the element is deleted below.
    let call = unsafe {
        if (*slot).depth > 0 {
            (*slot).depth -= 1;
            return 0;
        }
        *slot
    };
    let _ = INFLIGHT.remove(&key);

    let ret: u64 = ctx.ret();
    let (addr, err) = if call.memptr != 0 {
        let rc = ret as i32;
        if rc != 0 {
            (0, rc)
        } else {
            // SAFETY: bpf_probe_read_user checks the user address.
            match unsafe { bpf_probe_read_user(call.memptr as *const u64) } {
                Ok(p) => (p, 0),
                Err(_) => {
                    count_drop(drop_cause::READ_FAILED);
                    (0, ENOMEM)
                }
            }
        }
    } else if ret == 0 {
        (0, ENOMEM)
    } else {
        (ret, 0)
    };

    // realloc(p, 0) returning NULL freed p: no stack needed for a free.
    let is_free = addr == 0 && call.size == 0 && call.old_addr != 0;
    let stack_id = if is_free {
        -1
    } else {
        match ctx.get_stackid(&STACKS, BPF_F_USER_STACK as u64) {
            Ok(id) => id as i32,
            Err(e) => {
                count_drop(if e == -EEXIST {
                    drop_cause::STACK_COLLISION
                } else {
                    drop_cause::STACK_FAILED
                });
                e
            }
        }
    };

    let event = HeapAllocEvent {
        kind: event_kind::HEAP_ALLOC,
        tgid: (key >> 32) as u32,
        tid: key as u32,
        stack_id,
        addr,
        size: call.size,
        old_addr: call.old_addr,
        err,
        func: call.func,
    };
    if EVENTS
        .output::<HeapAllocEvent>(&event, BPF_RB_NO_WAKEUP as u64)
        .is_err()
    {
        count_drop(drop_cause::RINGBUF_FULL);
    }
    0
}

/// free: `(ptr)`. Attached after glibc's `free(NULL)` early exit where that site is cheaper.
#[uprobe]
pub fn heap_free(ctx: ProbeContext) -> u32 {
    let addr: u64 = ctx.arg(0).unwrap_or(0);
    if addr == 0 {
        return 0;
    }
    let key = bpf_get_current_pid_tgid();
    if INFLIGHT.get_ptr(&key).is_some() {
        // realloc freeing its old block: the realloc event accounts for it.
        return 0;
    }
    let event = HeapFreeEvent {
        kind: event_kind::HEAP_FREE,
        tgid: (key >> 32) as u32,
        addr,
    };
    if EVENTS
        .output::<HeapFreeEvent>(&event, BPF_RB_NO_WAKEUP as u64)
        .is_err()
    {
        count_drop(drop_cause::RINGBUF_FULL);
    }
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

// Keep the HeapFn type referenced so its discriminants stay in sync with user space's table.
const _: u32 = HeapFn::Pvalloc as u32;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
