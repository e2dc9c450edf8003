//! CUDA probes. Driver (`libcuda`) allocations and frees are counted like the heap's, in their
//! own slot table; runtime (`libcudart`) allocations only annotate the driver calls inside them.
//! Non-allocating driver calls (VMM, capture, graphs, pools, IPC, registration, context and
//! module loads) are emitted at return with their arguments, their CUresult and what they wrote.

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_probe_read_user},
    macros::{uprobe, uretprobe},
    programs::{ProbeContext, RetProbeContext},
};
use tracer_common::{CudaCallEvent, CudaCallSlot, drop_cause, event_kind, out_mode};

use crate::{
    alloc::{emit_free, finish_call},
    arch::first_stack_argument,
    diag,
    inflight::{CallKind, Entry, attach_cookie, claim, enter, held_slot, my_slot, release},
    maps::{CALL_INFLIGHT, CALL_SCRATCH, scratch},
    stack::{StackBudget, StackStart, emit_with_stack},
};

// ---- Allocations ----

/// CUDA driver allocations with an out-pointer first argument and the size second:
/// cuMemAlloc_v2, cuMemAllocHost_v2, cuMemHostAlloc, cuMemAllocManaged, cuMemAllocAsync(_ptsz).
#[uprobe]
pub fn cuda_enter_out0_size1(ctx: ProbeContext) -> u32 {
    let out_ptr: u64 = ctx.arg(0).unwrap_or(0);
    let size: u64 = ctx.arg(1).unwrap_or(0);
    let entry = Entry {
        out_ptr,
        ..Entry::new(attach_cookie(&ctx), size)
    };
    enter(CallKind::Cuda, entry)
}

/// cuMemAllocPitch_v2(CUdeviceptr *dptr, size_t *pPitch, size_t width, size_t height, unsigned
/// elementSize): `*pPitch × height` bytes, both known at return.
#[uprobe]
pub fn cuda_enter_pitch(ctx: ProbeContext) -> u32 {
    let out_ptr: u64 = ctx.arg(0).unwrap_or(0);
    let size_ptr: u64 = ctx.arg(1).unwrap_or(0);
    let height: u64 = ctx.arg(3).unwrap_or(0);
    let entry = Entry {
        out_ptr,
        size_ptr,
        ..Entry::new(attach_cookie(&ctx), height)
    };
    enter(CallKind::Cuda, entry)
}

/// cuMemAllocFromPoolAsync(_ptsz)(CUdeviceptr *dptr, size_t size, CUmemoryPool pool, CUstream):
/// the pool goes with the event.
#[uprobe]
pub fn cuda_enter_from_pool(ctx: ProbeContext) -> u32 {
    let out_ptr: u64 = ctx.arg(0).unwrap_or(0);
    let size: u64 = ctx.arg(1).unwrap_or(0);
    let pool: u64 = ctx.arg(2).unwrap_or(0);
    let entry = Entry {
        out_ptr,
        aux: pool,
        ..Entry::new(attach_cookie(&ctx), size)
    };
    enter(CallKind::Cuda, entry)
}

/// cuGraphAddMemAllocNode(CUgraphNode *node, CUgraph graph, deps, n, CUDA_MEM_ALLOC_NODE_PARAMS
/// *params): `params->bytesize` is an input, `params->dptr` the output.
#[uprobe]
pub fn cuda_enter_mem_node(ctx: ProbeContext) -> u32 {
    /// Offsets in CUDA_MEM_ALLOC_NODE_PARAMS.
    const BYTESIZE: u64 = 104;
    const DPTR: u64 = 112;
    let graph: u64 = ctx.arg(1).unwrap_or(0);
    let params: u64 = ctx.arg(4).unwrap_or(0);
    if params == 0 {
        return 0;
    }
    // SAFETY: bpf_probe_read_user checks the user address.
    let size = unsafe { bpf_probe_read_user((params + BYTESIZE) as *const u64) }.unwrap_or(0);
    let entry = Entry {
        out_ptr: params + DPTR,
        aux: graph,
        ..Entry::new(attach_cookie(&ctx), size)
    };
    enter(CallKind::Cuda, entry)
}

/// Return of the CUDA allocation calls: a CUresult, the block in `*out` when it is 0.
#[uretprobe]
pub fn cuda_return(ctx: RetProbeContext) -> u32 {
    finish_call(&ctx, CallKind::Cuda)
}

/// CUDA runtime allocations with an out-pointer first argument and the size second: cudaMalloc,
/// cudaMallocAsync, cudaMallocHost, cudaHostAlloc, cudaMallocManaged.
#[uprobe]
pub fn cudart_enter_out0_size1(ctx: ProbeContext) -> u32 {
    let out_ptr: u64 = ctx.arg(0).unwrap_or(0);
    let size: u64 = ctx.arg(1).unwrap_or(0);
    let entry = Entry {
        out_ptr,
        ..Entry::new(attach_cookie(&ctx), size)
    };
    enter(CallKind::Runtime, entry)
}

#[uretprobe]
pub fn cudart_return(ctx: RetProbeContext) -> u32 {
    finish_call(&ctx, CallKind::Runtime)
}

/// CUDA frees of the pointer in the first argument: cuMemFree_v2, cuMemFreeHost,
/// cuMemFreeAsync(_ptsz).
#[uprobe]
pub fn cuda_free_arg0(ctx: ProbeContext) -> u32 {
    let addr: u64 = ctx.arg(0).unwrap_or(0);
    if addr == 0 {
        return 0; // cuMemFree(0) initializes the context; nothing is freed
    }
    let key = bpf_get_current_pid_tgid();
    emit_free((key >> 32) as u32, addr)
}

// ---- Non-allocating driver calls ----

/// Saves a non-allocating driver call's first five arguments, and where and how to read what
/// it writes (`out_mode`), in the thread's `CALL_INFLIGHT` slot.
#[inline(always)]
fn call_enter(ctx: &ProbeContext, out_ptr: u64, mode: u32) -> u32 {
    let args = [
        ctx.arg(0).unwrap_or(0),
        ctx.arg(1).unwrap_or(0),
        ctx.arg(2).unwrap_or(0),
        ctx.arg(3).unwrap_or(0),
        ctx.arg(4).unwrap_or(0),
    ];
    call_enter_with(attach_cookie(ctx), args, out_ptr, mode)
}

#[inline(always)]
fn call_enter_with(func: u32, args: [u64; 5], out_ptr: u64, mode: u32) -> u32 {
    let Some((slot, key)) = my_slot(&CALL_INFLIGHT) else {
        return 0;
    };
    let previous = claim(slot, key);
    if previous != 0 {
        // A driver entry point called by another one on this thread is part of it; another
        // thread in the same slot is a lost call.
        if previous != key {
            diag::lost(drop_cause::INFLIGHT_BUSY, "driver call entry");
        }
        return 0;
    }
    // SAFETY: the slot is ours until the return probe releases it.
    unsafe {
        (*slot).args = args;
        (*slot).out_ptr = out_ptr;
        (*slot).func = func;
        (*slot).out_mode = mode;
    }
    0
}

/// A non-allocating driver call whose arguments are all the ledger needs (cuMemRelease,
/// cuMemMap, cuMemUnmap, capture begin, graph launch/upload/destroy, pool destroy/trim, host
/// (un)registration, IPC close, module unload).
#[uprobe]
pub fn cuda_call_enter(ctx: ProbeContext) -> u32 {
    call_enter(&ctx, 0, out_mode::NONE)
}

/// As `cuda_call_enter`, and the u64 written through the first argument (pool create, graph
/// instantiate, context create/retain, module load: the new object).
#[uprobe]
pub fn cuda_call_enter_out0(ctx: ProbeContext) -> u32 {
    let out: u64 = ctx.arg(0).unwrap_or(0);
    call_enter(&ctx, out, out_mode::READ_U64)
}

/// As `cuda_call_enter`, and the u64 written through the second argument (cuStreamEndCapture:
/// the captured graph).
#[uprobe]
pub fn cuda_call_enter_out1(ctx: ProbeContext) -> u32 {
    let out: u64 = ctx.arg(1).unwrap_or(0);
    call_enter(&ctx, out, out_mode::READ_U64)
}

/// cuIpcGetMemHandle(CUipcMemHandle *handle, CUdeviceptr dptr): the handle's fingerprint at return.
#[uprobe]
pub fn cuda_ipc_get_enter(ctx: ProbeContext) -> u32 {
    let out: u64 = ctx.arg(0).unwrap_or(0);
    call_enter(&ctx, out, out_mode::FINGERPRINT_64_BYTES)
}

/// cuIpcOpenMemHandle_v2(CUdeviceptr *pdptr, CUipcMemHandle handle, unsigned flags): the 64-byte
/// handle is passed by value, in memory; its fingerprint goes into the second argument's place
/// (the flags are in the first integer register after pdptr).
#[uprobe]
pub fn cuda_ipc_open_enter(ctx: ProbeContext) -> u32 {
    let pdptr: u64 = ctx.arg(0).unwrap_or(0);
    let flags: u64 = ctx.arg(1).unwrap_or(0);
    let print = fingerprint_at(first_stack_argument(&ctx)).unwrap_or(0);
    call_enter_with(
        attach_cookie(&ctx),
        [pdptr, print, flags, 0, 0],
        pdptr,
        out_mode::READ_U64,
    )
}

/// FNV-1a over the 8 words of a 64-byte user buffer (a CUipcMemHandle): the same handle read in
/// the exporting and in the importing process gives the same value.
#[inline(always)]
fn fingerprint_at(addr: u64) -> Option<u64> {
    // SAFETY: bpf_probe_read_user checks the user address.
    let words = unsafe { bpf_probe_read_user(addr as *const [u64; 8]) }.ok()?;
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for w in words {
        h = (h ^ w).wrapping_mul(0x0000_0100_0000_01b3);
    }
    Some(h)
}

/// What a successful call wrote through its out-pointer, as its `out_mode` says (0: nothing).
#[inline(always)]
fn written_out(call: &CudaCallSlot) -> u64 {
    if call.out_ptr == 0 {
        0
    } else if call.out_mode == out_mode::FINGERPRINT_64_BYTES {
        fingerprint_at(call.out_ptr).unwrap_or(0)
    } else {
        // SAFETY: bpf_probe_read_user checks the user address.
        unsafe { bpf_probe_read_user(call.out_ptr as *const u64) }.unwrap_or(0)
    }
}

/// Return of every non-allocating driver call: emits it with its CUresult, what it wrote and
/// the stack of its caller.
#[uretprobe]
pub fn cuda_call_return(ctx: RetProbeContext) -> u32 {
    let Some((slot, key)) = held_slot(&CALL_INFLIGHT) else {
        return 0;
    };
    // SAFETY: a slot owned by this thread is only written by it.
    let call = unsafe { *slot };
    let ret = ctx.ret::<u64>() as i32;
    let out = if ret == 0 { written_out(&call) } else { 0 };
    release(slot);
    if call.func == 0 {
        return 0; // attached without a cookie
    }
    let Some(record) = scratch(&CALL_SCRATCH) else {
        return 0;
    };
    // SAFETY: the per-CPU scratch is ours until this program returns.
    let record = unsafe { &mut *record };
    record.event = CudaCallEvent {
        kind: event_kind::CUDA_CALL,
        tgid: (key >> 32) as u32,
        func: call.func,
        tid: key as u32,
        args: call.args,
        out,
        ret,
        nframes: 0,
        stack_flags: 0,
    };
    emit_with_stack(record, StackStart::at_probe(&ctx), StackBudget::Other);
    0
}
