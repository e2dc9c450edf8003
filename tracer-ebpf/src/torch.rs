//! PyTorch's CUDA caching allocator: one entry probe on `DeviceCachingAllocator::record_trace`,
//! which the allocator calls for every event it has (tensor blocks handed out and returned,
//! segments obtained and released, OOM), whether or not its own history recording is on; and the
//! entries of the `cudaMallocAsync` backend's `mallocAsync` and `freeAsync`, which has no
//! `record_trace`.
//!
//! Entry probes only, never a return probe: these functions throw C++ exceptions (an OOM is
//! `OutOfMemoryError`), and an exception unwinding through a return probe's trampoline finds no
//! unwind information for it and terminates the process.

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_probe_read_user},
    macros::uprobe,
    programs::ProbeContext,
};
use tracer_common::{TorchEvent, event_kind, host_block, torch_action};

use crate::{
    arch::{UserRegs, first_stack_argument},
    maps::{TORCH_SCRATCH, scratch},
    ring::{Wakeup, output_event},
    stack::{StackBudget, StackStart, emit_with_stack},
};

/// `record_trace(this, action, addr, size, stream, device, ...)` (torch 2.2 and later): the
/// first six arguments are in registers in every form; what follows (pool id, context) is not
/// read. Blocks and segments handed out, and OOMs, carry the stack of the allocator's caller;
/// releases need none.
#[uprobe]
pub fn torch_record_trace(ctx: ProbeContext) -> u32 {
    emit(&ctx, [0, 0])
}

/// The forms (torch 2.8 on) whose seventh argument is the pool (`MempoolId_t`, two words passed
/// in memory, above the return address).
#[uprobe]
pub fn torch_record_trace_pool(ctx: ProbeContext) -> u32 {
    let at = first_stack_argument(&ctx);
    // SAFETY: bpf_probe_read_user checks the user addresses.
    let pool = unsafe {
        [
            bpf_probe_read_user(at as *const u64).unwrap_or(0),
            bpf_probe_read_user((at + 8) as *const u64).unwrap_or(0),
        ]
    };
    emit(&ctx, pool)
}

/// `mallocAsync(void** devPtr, DeviceIndex device, size_t size, cudaStream_t stream)`: the
/// tensor's size, device and stream and its allocating stack; the block itself is the driver
/// allocation (`cuMemAllocAsync`) this thread makes next inside it, matched in user space.
#[uprobe]
pub fn torch_async_malloc(ctx: ProbeContext) -> u32 {
    let args = [
        torch_action::ASYNC_MALLOC as u64,
        ctx.arg(1).unwrap_or(0),
        ctx.arg(0).unwrap_or(0),
        ctx.arg(2).unwrap_or(0),
        ctx.arg(3).unwrap_or(0),
    ];
    send(&ctx, args, [0, 0])
}

/// `freeAsync(void* ptr)`.
#[uprobe]
pub fn torch_async_free(ctx: ProbeContext) -> u32 {
    let addr: u64 = ctx.arg(0).unwrap_or(0);
    if addr == 0 {
        return 0;
    }
    send(
        &ctx,
        [torch_action::ASYNC_FREE as u64, 0, addr, 0, 0],
        [0, 0],
    )
}

/// The pinned host allocator's `at::Allocator::allocate` override, at its one `ret` (a plain
/// probe there: no return trampoline for an exception to meet): `rax` is the `DataPtr` it
/// returns, whose data is the block's memory and whose context is the `HostBlock`.
#[uprobe]
pub fn torch_pinned_alloc(ctx: ProbeContext) -> u32 {
    let data_ptr = UserRegs::rax(&ctx);
    // SAFETY: bpf_probe_read_user checks the user addresses.
    let (data, block) = unsafe {
        (
            bpf_probe_read_user(data_ptr as *const u64).unwrap_or(0),
            bpf_probe_read_user((data_ptr + host_block::DATA_PTR_CTX_AT) as *const u64)
                .unwrap_or(0),
        )
    };
    if block == 0 {
        return 0; // nothing allocated (0 bytes asked)
    }
    // SAFETY: as above.
    let size =
        unsafe { bpf_probe_read_user((block + host_block::SIZE_AT) as *const u64) }.unwrap_or(0);
    send(
        &ctx,
        [torch_action::PINNED_ALLOC as u64, 0, data, size, block],
        [0, 0],
    )
}

/// The pinned blocks' deleter, `raw_local_deleter(void* ctx)`: the tensor lets its block go.
#[uprobe]
pub fn torch_pinned_free(ctx: ProbeContext) -> u32 {
    let block: u64 = ctx.arg(0).unwrap_or(0);
    if block == 0 {
        return 0;
    }
    // SAFETY: bpf_probe_read_user checks the user addresses.
    let (data, size) = unsafe {
        (
            bpf_probe_read_user((block + host_block::PTR_AT) as *const u64).unwrap_or(0),
            bpf_probe_read_user((block + host_block::SIZE_AT) as *const u64).unwrap_or(0),
        )
    };
    send(
        &ctx,
        [torch_action::PINNED_FREE as u64, 0, data, size, block],
        [0, 0],
    )
}

#[inline(always)]
fn emit(ctx: &ProbeContext, pool: [u64; 2]) -> u32 {
    let args = [
        ctx.arg(1).unwrap_or(u64::MAX),
        ctx.arg(5).unwrap_or(0),
        ctx.arg(2).unwrap_or(0),
        ctx.arg(3).unwrap_or(0),
        ctx.arg(4).unwrap_or(0),
    ];
    send(ctx, args, pool)
}

/// Emits the event of `[action, device, addr, size, stream]`, with the caller's stack for the
/// actions that create something.
#[inline(always)]
fn send(ctx: &ProbeContext, [action, device, addr, size, stream]: [u64; 5], pool: [u64; 2]) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    // PyTorch allocator traffic is activity: the process is not idle (`phase.rs`).
    crate::phase::note_activity();
    let event = TorchEvent {
        kind: event_kind::TORCH,
        tgid: (pid_tgid >> 32) as u32,
        action: action as u32,
        // A signed char or an int, sign-extended by the caller or not: the low byte is it.
        device: device as u8 as i8 as i32,
        addr,
        size,
        stream,
        pool,
        tid: pid_tgid as u32,
        nframes: 0,
        stack_flags: 0,
        phase: crate::phase::current(),
        _pad: 0,
    };
    let with_stack = matches!(
        event.action,
        torch_action::ALLOC
            | torch_action::SEGMENT_ALLOC
            | torch_action::SEGMENT_MAP
            | torch_action::OOM
            | torch_action::ASYNC_MALLOC
            | torch_action::PINNED_ALLOC
    );
    if !with_stack {
        output_event(&event, Wakeup::AtPoll, "torch allocator event");
        return 0;
    }
    let Some(record) = scratch(&TORCH_SCRATCH) else {
        return 0;
    };
    // SAFETY: the per-CPU scratch is ours until this program returns.
    let record = unsafe { &mut *record };
    record.event = event;
    emit_with_stack(record, StackStart::at_entry(ctx), StackBudget::Other);
    0
}
