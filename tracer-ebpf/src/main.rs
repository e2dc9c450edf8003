//! Kernel side of alloctrace: uprobes on the C allocator.
//!
//! Allocation entries save their arguments per thread; the matching return emits one event with
//! the result and the user stack. `free` emits at entry. Nested calls (glibc's realloc calls malloc
//! and free itself) are folded into the outer call. Nothing is aggregated here: user space keeps the
//! ledger, so the kernel side stays a few map operations per call.
#![no_std]
#![no_main]
// The bpf target has no `AtomicU64::compare_exchange`; the intrinsic lowers to BPF_CMPXCHG (v3).
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod python;

use core::intrinsics::{AtomicOrdering, atomic_cxchg};

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_NO_WAKEUP, BPF_RB_RING_SIZE, pt_regs},
    helpers::{
        bpf_get_attach_cookie, bpf_get_current_pid_tgid, bpf_probe_read_kernel,
        bpf_probe_read_user,
        generated::{bpf_get_current_task_btf, bpf_task_pt_regs},
    },
    macros::{map, tracepoint, uprobe, uretprobe},
    maps::{Array, HashMap, PerCpuArray, RingBuf},
    programs::{ProbeContext, RetProbeContext, TracePointContext},
};
use core::mem::size_of;

use tracer_common::{
    CudaCallEvent, CudaCallRecord, CudaCallSlot, FaultEvent, FaultRecord, HeapAllocEvent,
    HeapAllocRecord, HeapFn, HeapFreeEvent, INFLIGHT_SLOTS, InflightCall, MAP_FROM_ALLOCATOR,
    MAX_FRAMES, MapEvent, MapRecord, PY_FRAMES_AT_MOST, ProcEvent, STACK_COPY, STACK_COPY_MAX,
    STACK_SP_CANDIDATE, STACK_TRUNCATED, StackArea, StackCopyHeader, SyscallArgs, drop_cause,
    event_kind, map_op, out_mode, proc_op,
    python::{MAX_PY_FRAMES, PY_FRAMES_SHIFT, PyRawFrame, PythonOffsets},
    stack_stat,
};

const ENOMEM: i32 = 12;

/// Events to user space. Sized by user space at load time (`--ring-size`).
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(16 << 20, 0);

/// Arguments of allocation calls in flight, one slot per thread (`tid % INFLIGHT_SLOTS`). An array
/// slot costs a few nanoseconds where a hash-map insert and delete cost hundreds.
#[map]
static INFLIGHT: Array<InflightCall> = Array::with_max_entries(INFLIGHT_SLOTS, 0);

/// Scratch records hold a stack copy of up to 32 KiB, more than a per-CPU map value may hold:
/// they are arrays with one slot per possible CPU (user space sets the size at load), indexed by
/// the current CPU (programs run with migration disabled).
const SCRATCH_SLOTS: u32 = 1024;

#[inline(always)]
fn cpu_slot() -> u32 {
    // SAFETY: the helper has no preconditions.
    unsafe { aya_ebpf::helpers::generated::bpf_get_smp_processor_id() }
}

/// Per-CPU scratch where an allocation record is assembled before its used part is copied out.
#[map]
static SCRATCH: Array<HeapAllocRecord> = Array::with_max_entries(SCRATCH_SLOTS, 0);

/// Processes whose memory syscalls are traced (tgid → 1). Tracepoints fire for every process on
/// the machine; this filter is their first instruction.
#[map]
static TARGETS: HashMap<u32, u32> = HashMap::with_max_entries(4096, 0);

/// Arguments of memory syscalls in flight, by `pid_tgid`.
#[map]
static SYSCALL_ARGS: HashMap<u64, SyscallArgs> = HashMap::with_max_entries(16384, 0);

/// Per-CPU scratch for a mapping record.
#[map]
static MAP_SCRATCH: Array<MapRecord> = Array::with_max_entries(SCRATCH_SLOTS, 0);

/// Stack captures by `stack_stat`.
#[map]
static STACK_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(stack_stat::COUNT, 0);

#[inline(always)]
fn count_stack(stat: u32) {
    if let Some(slot) = STACK_STATS.get_ptr_mut(stat) {
        // Per-CPU slot: no other writer while this program runs.
        unsafe { *slot += 1 };
    }
}

/// Lost events by `drop_cause`.
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

/// CUDA driver allocation calls in flight, apart from the heap's: the driver mallocs for itself
/// inside its calls, and those are heap allocations of their own, not part of the CUDA call.
#[map]
static CUDA_INFLIGHT: Array<InflightCall> = Array::with_max_entries(INFLIGHT_SLOTS, 0);

/// CUDA runtime (libcudart) allocation calls in flight: the driver call nested in one is
/// annotated with it; the runtime call itself counts nothing (the driver does), but its failure
/// is recorded when the driver did not fail first.
#[map]
static RUNTIME_INFLIGHT: Array<InflightCall> = Array::with_max_entries(INFLIGHT_SLOTS, 0);

/// The calling thread's slot and its `pid_tgid`.
#[inline(always)]
fn my_slot() -> Option<(*mut InflightCall, u64)> {
    slot_in(&INFLIGHT)
}

#[inline(always)]
fn slot_in(slots: &Array<InflightCall>) -> Option<(*mut InflightCall, u64)> {
    let key = bpf_get_current_pid_tgid();
    let slot = slots.get_ptr_mut((key as u32) % INFLIGHT_SLOTS)?;
    Some((slot, key))
}

/// Claims an in-flight slot (its `owner` word) for `key` if it is free; returns the previous
/// owner (0: claimed). Atomic: two threads with equal `tid % INFLIGHT_SLOTS` on two CPUs must not
/// both take it.
#[inline(always)]
fn claim(owner: *mut u64, key: u64) -> u64 {
    // SAFETY: `owner` is in a map value: 8-byte aligned, lives as long as the map.
    unsafe {
        atomic_cxchg::<u64, { AtomicOrdering::Relaxed }, { AtomicOrdering::Relaxed }>(owner, 0, key)
            .0
    }
}

#[inline(always)]
fn release(owner: *mut u64) {
    // A plain store suffices: only the owner releases, and an aligned 8-byte store is atomic.
    // (LLVM's BPF backend cannot select an atomic store.)
    // SAFETY: as in `claim`.
    unsafe { core::ptr::write_volatile(owner, 0) }
}

#[inline(always)]
fn enter(func: u32, size: u64, old_addr: u64, memptr: u64) -> u32 {
    enter_in(&INFLIGHT, func, size, old_addr, memptr)
}

#[inline(always)]
fn enter_in(slots: &Array<InflightCall>, func: u32, size: u64, old_addr: u64, memptr: u64) -> u32 {
    enter_cuda(slots, func, size, old_addr, memptr, 0, 0)
}

/// `enter_in` with the CUDA-only fields: `aux` goes into the event, `size_ptr` scales the size.
#[inline(always)]
fn enter_cuda(
    slots: &Array<InflightCall>,
    func: u32,
    size: u64,
    old_addr: u64,
    memptr: u64,
    aux: u64,
    size_ptr: u64,
) -> u32 {
    let Some((slot, key)) = slot_in(slots) else {
        return 0;
    };
    // SAFETY: the slot is a map value.
    match claim(unsafe { core::ptr::addr_of_mut!((*slot).owner) }, key) {
        0 => unsafe {
            (*slot).size = size;
            (*slot).old_addr = old_addr;
            (*slot).memptr = memptr;
            (*slot).aux = aux;
            (*slot).size_ptr = size_ptr;
            (*slot).func = func;
            (*slot).depth = 0;
        },
        // A hooked function called from inside another one on this thread: part of the outer call.
        current if current == key => unsafe { (*slot).depth += 1 },
        _ => count_drop(drop_cause::INFLIGHT_BUSY),
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

/// Return of every allocation function: emits the completed call with its user stack.
#[uretprobe]
pub fn heap_return(ctx: RetProbeContext) -> u32 {
    finish_call(&ctx, &INFLIGHT)
}

/// CUDA driver allocations with an out-pointer first argument and the size second:
/// cuMemAlloc_v2, cuMemAllocHost_v2, cuMemHostAlloc, cuMemAllocManaged, cuMemAllocAsync(_ptsz).
#[uprobe]
pub fn cuda_enter_out0_size1(ctx: ProbeContext) -> u32 {
    let memptr: u64 = ctx.arg(0).unwrap_or(0);
    let size: u64 = ctx.arg(1).unwrap_or(0);
    enter_in(&CUDA_INFLIGHT, cookie_fn(&ctx), size, 0, memptr)
}

/// Return of the CUDA allocation calls: a CUresult, the block in `*out` when it is 0.
#[uretprobe]
pub fn cuda_return(ctx: RetProbeContext) -> u32 {
    finish_call(&ctx, &CUDA_INFLIGHT)
}

/// CUDA runtime allocations with an out-pointer first argument and the size second: cudaMalloc,
/// cudaMallocAsync, cudaMallocHost, cudaHostAlloc, cudaMallocManaged.
#[uprobe]
pub fn cudart_enter_out0_size1(ctx: ProbeContext) -> u32 {
    let memptr: u64 = ctx.arg(0).unwrap_or(0);
    let size: u64 = ctx.arg(1).unwrap_or(0);
    enter_in(&RUNTIME_INFLIGHT, cookie_fn(&ctx), size, 0, memptr)
}

#[uretprobe]
pub fn cudart_return(ctx: RetProbeContext) -> u32 {
    finish_call(&ctx, &RUNTIME_INFLIGHT)
}

/// The runtime call the current thread is in, as its cookie (0: none).
#[inline(always)]
fn runtime_call_in_flight() -> u64 {
    match slot_in(&RUNTIME_INFLIGHT) {
        // SAFETY: reading the slot; a slot owned by this thread is only written by it.
        Some((slot, key)) if unsafe { (*slot).owner } == key => u64::from(unsafe { (*slot).func }),
        _ => 0,
    }
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

/// Emits the release of the block at `addr` (heap free, CUDA free).
#[inline(always)]
fn emit_free(tgid: u32, addr: u64) -> u32 {
    let event = HeapFreeEvent {
        kind: event_kind::HEAP_FREE,
        tgid,
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

/// Non-allocating CUDA driver calls in flight (VMM, capture, graphs, pools, IPC, registration,
/// context and module loads), one slot per thread: their arguments until the CUresult is known.
#[map]
static CALL_INFLIGHT: Array<CudaCallSlot> = Array::with_max_entries(INFLIGHT_SLOTS, 0);

#[map]
static CALL_SCRATCH: Array<CudaCallRecord> = Array::with_max_entries(SCRATCH_SLOTS, 0);

#[inline(always)]
fn call_enter(ctx: &ProbeContext, out_ptr: u64, mode: u32) -> u32 {
    let args = [
        ctx.arg(0).unwrap_or(0),
        ctx.arg(1).unwrap_or(0),
        ctx.arg(2).unwrap_or(0),
        ctx.arg(3).unwrap_or(0),
        ctx.arg(4).unwrap_or(0),
    ];
    call_enter_with(cookie_fn(ctx), args, out_ptr, mode)
}

#[inline(always)]
fn call_enter_with(func: u32, args: [u64; 5], out_ptr: u64, mode: u32) -> u32 {
    let key = bpf_get_current_pid_tgid();
    let Some(slot) = CALL_INFLIGHT.get_ptr_mut((key as u32) % INFLIGHT_SLOTS) else {
        return 0;
    };
    // SAFETY: the slot is a map value.
    let previous = claim(unsafe { core::ptr::addr_of_mut!((*slot).owner) }, key);
    if previous != 0 {
        // A driver entry point called by another one on this thread is part of it; another
        // thread in the same slot is a lost call.
        if previous != key {
            count_drop(drop_cause::INFLIGHT_BUSY);
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
/// handle is passed by value, in memory above the return address on x86-64; its fingerprint goes
/// into the second argument's place (the flags are in the first integer register after pdptr).
#[uprobe]
pub fn cuda_ipc_open_enter(ctx: ProbeContext) -> u32 {
    let pdptr: u64 = ctx.arg(0).unwrap_or(0);
    let flags: u64 = ctx.arg(1).unwrap_or(0);
    let regs = ctx.as_ptr() as *const pt_regs;
    // SAFETY: the context of a uprobe program is the user pt_regs.
    let sp = unsafe { (*regs).rsp };
    let print = fingerprint_at(sp + 8).unwrap_or(0);
    call_enter_with(
        cookie_fn(&ctx),
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

/// Return of every non-allocating driver call: emits it with its CUresult, what it wrote and
/// the stack of its caller.
#[uretprobe]
pub fn cuda_call_return(ctx: RetProbeContext) -> u32 {
    let key = bpf_get_current_pid_tgid();
    let Some(slot) = CALL_INFLIGHT.get_ptr_mut((key as u32) % INFLIGHT_SLOTS) else {
        return 0;
    };
    // SAFETY: reading the slot; a slot owned by this thread is only written by it.
    let call = unsafe {
        if (*slot).owner != key {
            return 0;
        }
        *slot
    };
    let ret = ctx.ret::<u64>() as i32;
    let out = if ret != 0 || call.out_ptr == 0 {
        0
    } else if call.out_mode == out_mode::FINGERPRINT_64_BYTES {
        fingerprint_at(call.out_ptr).unwrap_or(0)
    } else {
        // SAFETY: bpf_probe_read_user checks the user address.
        unsafe { bpf_probe_read_user(call.out_ptr as *const u64) }.unwrap_or(0)
    };
    // SAFETY: the slot is a map value.
    release(unsafe { core::ptr::addr_of_mut!((*slot).owner) });
    if call.func == 0 {
        return 0;
    }
    let Some(record) = CALL_SCRATCH.get_ptr_mut(cpu_slot()) else {
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
    let regs = ctx.as_ptr() as *const pt_regs;
    // SAFETY: the context of a uprobe program is the user pt_regs (the caller's, at return).
    let (ip, sp, bp) = unsafe { ((*regs).rip, (*regs).rsp, (*regs).rbp) };
    let mut flags = 0u16;
    let (nframes, bytes) = capture_stack(
        (ip, sp, bp),
        false,
        copy_bytes(&STACK_COPY_OTHER),
        &mut record.ips,
        &mut flags,
    );
    record.event.nframes = nframes;
    let bytes = finish_stack(&mut record.ips, bytes, &mut flags);
    record.event.stack_flags = flags;
    output_record(record, size_of::<CudaCallEvent>(), bytes);
    0
}

/// The non-allocating driver call the current thread is in, as its cookie (0: none): a graph
/// instantiation, a module load, ... The allocations it makes are attributed to it.
#[inline(always)]
fn driver_call_in_flight() -> u64 {
    let key = bpf_get_current_pid_tgid();
    match CALL_INFLIGHT.get_ptr_mut((key as u32) % INFLIGHT_SLOTS) {
        // SAFETY: reading the slot; a slot owned by this thread is only written by it.
        Some(slot) if unsafe { (*slot).owner } == key => u64::from(unsafe { (*slot).func }),
        _ => 0,
    }
}

/// cuMemAllocPitch_v2(CUdeviceptr *dptr, size_t *pPitch, size_t width, size_t height, unsigned
/// elementSize): `*pPitch × height` bytes, both known at return.
#[uprobe]
pub fn cuda_enter_pitch(ctx: ProbeContext) -> u32 {
    let memptr: u64 = ctx.arg(0).unwrap_or(0);
    let pitch_ptr: u64 = ctx.arg(1).unwrap_or(0);
    let height: u64 = ctx.arg(3).unwrap_or(0);
    enter_cuda(
        &CUDA_INFLIGHT,
        cookie_fn(&ctx),
        height,
        0,
        memptr,
        0,
        pitch_ptr,
    )
}

/// cuMemAllocFromPoolAsync(_ptsz)(CUdeviceptr *dptr, size_t size, CUmemoryPool pool, CUstream):
/// the pool goes with the event.
#[uprobe]
pub fn cuda_enter_from_pool(ctx: ProbeContext) -> u32 {
    let memptr: u64 = ctx.arg(0).unwrap_or(0);
    let size: u64 = ctx.arg(1).unwrap_or(0);
    let pool: u64 = ctx.arg(2).unwrap_or(0);
    enter_cuda(&CUDA_INFLIGHT, cookie_fn(&ctx), size, 0, memptr, pool, 0)
}

/// cuGraphAddMemAllocNode(CUgraphNode *node, CUgraph graph, deps, n, CUDA_MEM_ALLOC_NODE_PARAMS
/// *params): `params->bytesize` (offset 104) is an input, `params->dptr` (offset 112) the output.
#[uprobe]
pub fn cuda_enter_mem_node(ctx: ProbeContext) -> u32 {
    let graph: u64 = ctx.arg(1).unwrap_or(0);
    let params: u64 = ctx.arg(4).unwrap_or(0);
    if params == 0 {
        return 0;
    }
    // SAFETY: bpf_probe_read_user checks the user address.
    let size = unsafe { bpf_probe_read_user((params + 104) as *const u64) }.unwrap_or(0);
    enter_cuda(
        &CUDA_INFLIGHT,
        cookie_fn(&ctx),
        size,
        0,
        params + 112,
        graph,
        0,
    )
}

/// The return of an allocation call in `slots`: emits the completed call with its user stack.
#[inline(always)]
fn finish_call(ctx: &RetProbeContext, slots: &Array<InflightCall>) -> u32 {
    let Some((slot, key)) = slot_in(slots) else {
        return 0;
    };
    // SAFETY: `slot` points into the INFLIGHT array; only this thread writes a slot it owns.
    let call = unsafe {
        if (*slot).owner != key {
            return 0; // entered before attach, or the slot was busy
        }
        if (*slot).depth > 0 {
            (*slot).depth -= 1;
            return 0;
        }
        *slot
    };
    // SAFETY: the slot is a map value.
    release(unsafe { core::ptr::addr_of_mut!((*slot).owner) });

    let ret: u64 = ctx.ret();
    let mut size = call.size;
    let (addr, err) = if call.memptr != 0 {
        let rc = ret as i32;
        if rc != 0 {
            (0, rc)
        } else {
            if call.size_ptr != 0 {
                // SAFETY: bpf_probe_read_user checks the user address.
                let pitch =
                    unsafe { bpf_probe_read_user(call.size_ptr as *const u64) }.unwrap_or(0);
                size = mul_saturating(size, pitch);
            }
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

    let Some(record) = SCRATCH.get_ptr_mut(cpu_slot()) else {
        return 0;
    };
    // SAFETY: the per-CPU scratch is ours until this program returns.
    let record = unsafe { &mut *record };
    let event = &mut record.event;
    event.kind = event_kind::HEAP_ALLOC;
    event.tgid = (key >> 32) as u32;
    event.tid = key as u32;
    event.addr = addr;
    event.size = size;
    event.aux = call.aux;
    // A CUDA call made from inside a runtime call carries the runtime call's cookie, so that
    // its failure is named after both, and the non-allocating driver call around it, so that
    // allocations made by a graph instantiation belong to it (CUDA calls have no old block).
    event.old_addr = if core::ptr::eq(slots, &CUDA_INFLIGHT) {
        runtime_call_in_flight() | (driver_call_in_flight() << 32)
    } else {
        call.old_addr
    };
    event.err = err;
    event.func = call.func;
    event.stack_flags = 0;
    // realloc(p, 0) returning NULL freed p: a free needs no stack.
    let is_free = addr == 0 && size == 0 && call.old_addr != 0;
    let (nframes, bytes) = if is_free {
        (0, 0)
    } else {
        // At a return probe the registers are the caller's: `rip` is the return address into the
        // function that called the allocator, `rsp` and `rbp` its stack and frame.
        let regs = ctx.as_ptr() as *const pt_regs;
        // SAFETY: the context of a uprobe program is the user pt_regs.
        let (ip, sp, bp) = unsafe { ((*regs).rip, (*regs).rsp, (*regs).rbp) };
        // Heap calls are many: they get the cheaper stack unless asked otherwise; CUDA calls and
        // failures are few and get the best one.
        let copy = if core::ptr::eq(slots, &INFLIGHT) && addr != 0 {
            copy_bytes(&STACK_COPY_HEAP)
        } else {
            copy_bytes(&STACK_COPY_OTHER)
        };
        let mut flags = 0u16;
        let (nframes, bytes) =
            capture_stack((ip, sp, bp), false, copy, &mut record.ips, &mut flags);
        record.event.nframes = nframes;
        let bytes = finish_stack(&mut record.ips, bytes, &mut flags);
        record.event.stack_flags = flags;
        (nframes, bytes)
    };
    record.event.nframes = nframes;
    output_record(record, size_of::<HeapAllocEvent>(), bytes);
    0
}

/// Walks the frame-pointer chain from `(ip, bp)` into `ips`; returns the number of frames and
/// sets `STACK_TRUNCATED` in `flags` when the chain went on past `MAX_FRAMES`. With `sp`, the word
/// at the stack pointer comes second, flagged `STACK_SP_CANDIDATE`: at a syscall made by a leaf
/// wrapper (libc's mmap, munmap, syscall()) it is the return address into the wrapper's caller,
/// which the frame-pointer chain would skip; user space keeps it only if a call precedes it.
#[inline(always)]
fn walk_user_stack(
    ip: u64,
    sp: Option<u64>,
    mut bp: u64,
    ips: &mut StackArea,
    flags: &mut u16,
) -> usize {
    ips[0] = ip;
    let mut n = 1usize;
    if let Some(sp) = sp
        // SAFETY: bpf_probe_read_user checks the user address.
        && let Ok(ret) = unsafe { bpf_probe_read_user(sp as *const u64) }
    {
        ips[1] = ret;
        n = 2;
        *flags |= STACK_SP_CANDIDATE;
    }
    while n < MAX_FRAMES {
        if bp == 0 {
            return n;
        }
        // SAFETY: bpf_probe_read_user checks the user address; [saved rbp, return address].
        let Ok(frame) = (unsafe { bpf_probe_read_user(bp as *const [u64; 2]) }) else {
            return n;
        };
        if frame[1] == 0 {
            return n;
        }
        ips[n] = frame[1];
        n += 1;
        // Frames live at increasing addresses; anything else is not a frame chain.
        if frame[0] <= bp {
            return n;
        }
        bp = frame[0];
    }
    if bp != 0 {
        *flags |= STACK_TRUNCATED;
    }
    MAX_FRAMES
}

/// Set by user space (`--stack`, `--stack-copy`): bytes of user stack copied into heap events
/// and into the others (mappings, CUDA calls, failures); 0: a frame-pointer walk instead.
#[unsafe(no_mangle)]
static STACK_COPY_HEAP: u32 = 0;
#[unsafe(no_mangle)]
static STACK_COPY_OTHER: u32 = 0;
/// Set by user space for the benchmark (`--stack-copy-always`): copy even when the ring is full,
/// to measure what a copy costs.
#[unsafe(no_mangle)]
static STACK_COPY_ALWAYS: u32 = 0;

#[inline(always)]
fn copy_bytes(global: &u32) -> u32 {
    // SAFETY: volatile read of a global set at load time.
    unsafe { core::ptr::read_volatile(global) }
}

/// Where the CPython interpreter of a traced process keeps its frames, by tgid (user space
/// detects it and fills this in).
#[map]
static PY_OFFSETS: HashMap<u32, PythonOffsets> = HashMap::with_max_entries(1024, 0);

/// Set by user space: 1 to record Python frames (`record --no-python-frames` clears it).
#[unsafe(no_mangle)]
static PYTHON_FRAMES: u32 = 0;

/// Appends the current thread's Python frames (if it runs CPython) at byte `at` of the stack
/// area; their number goes into `flags`. Returns the bytes added.
#[inline(always)]
fn append_python(area: &mut StackArea, at: usize, flags: &mut u16) -> usize {
    if copy_bytes(&PYTHON_FRAMES) == 0 || at > PY_FRAMES_AT_MOST || at % 8 != 0 {
        return 0;
    }
    let key = bpf_get_current_pid_tgid();
    // SAFETY: the value is only read while this program runs.
    let Some(offsets) = (unsafe { PY_OFFSETS.get(&((key >> 32) as u32)) }) else {
        return 0;
    };
    let Some(tstate) = python::find_tstate(offsets, key as u32) else {
        return 0;
    };
    // SAFETY: `at` is 8-byte aligned (stacks are whole words) and leaves room for the frames.
    let out = unsafe {
        &mut *area
            .as_mut_ptr()
            .cast::<u8>()
            .add(at)
            .cast::<[PyRawFrame; MAX_PY_FRAMES]>()
    };
    let n = python::walk(offsets, tstate, out);
    *flags |= (n as u16) << PY_FRAMES_SHIFT;
    n * size_of::<PyRawFrame>()
}

/// One slot through which a value passes to lose what the verifier knows of it.
#[map]
static LAUNDRY: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// `value`, as a number the verifier knows nothing about. After a stack walk, the stack's
/// length differs on every path; the Python walk after it would be verified once per length.
#[inline(always)]
fn forget_value(value: usize) -> usize {
    let Some(slot) = LAUNDRY.get_ptr_mut(0) else {
        return value;
    };
    // SAFETY: per-CPU slot, ours while this program runs.
    unsafe {
        core::ptr::write_volatile(slot, value as u64);
        core::ptr::read_volatile(slot) as usize
    }
}

/// After `capture_stack` filled `bytes` of the area: appends the Python frames of a CPython
/// thread. Returns the bytes of the area to output.
#[inline(always)]
fn finish_stack(area: &mut StackArea, bytes: usize, flags: &mut u16) -> usize {
    let at = forget_value(bytes);
    at + append_python(area, at, flags)
}

/// Fills a record's stack area from the user registers `(ip, sp, bp)`: with `copy` > 0, a
/// `StackCopyHeader` and up to `copy` bytes of the stack from `sp` up (`STACK_COPY`), unwound in
/// user space; else the frame-pointer walk (with the stack-pointer candidate if asked). Returns
/// (frames, bytes of the area used); `finish_stack` adds the Python frames.
#[inline(always)]
fn capture_stack(
    (ip, sp, bp): (u64, u64, u64),
    sp_candidate: bool,
    copy: u32,
    area: &mut StackArea,
    flags: &mut u16,
) -> (u16, usize) {
    // A copy is thousands of bytes: when the ring is a quarter full (a burst of events), this
    // event gets the frame-pointer walk instead, counted, rather than filling the ring.
    let pressed = copy != 0 && copy_bytes(&STACK_COPY_ALWAYS) == 0 && {
        let used = EVENTS.query(BPF_RB_AVAIL_DATA as u64);
        let size = EVENTS.query(BPF_RB_RING_SIZE as u64);
        used > size / 4
    };
    if pressed {
        count_stack(stack_stat::FP_UNDER_PRESSURE);
    }
    if copy == 0 || pressed {
        let sp = if sp_candidate { Some(sp) } else { None };
        let n = walk_user_stack(ip, sp, bp, area, flags);
        return (n as u16, 8 * n);
    }
    count_stack(stack_stat::COPIES);
    let len = copy_user_stack(sp, copy, area);
    let header = StackCopyHeader { ip, sp, bp, len };
    // SAFETY: the area is 8-byte aligned and longer than the header.
    unsafe { core::ptr::write_unaligned(area.as_mut_ptr().cast::<StackCopyHeader>(), header) };
    *flags |= STACK_COPY;
    (0, size_of::<StackCopyHeader>() + len as usize)
}

/// Copies up to `max` bytes of user stack from `sp` into `area` after the copy header, a page at
/// a time so that a stack ending before `max` bytes still gives what it has (one read across its
/// end would fail whole). Returns the bytes copied.
#[inline(always)]
fn copy_user_stack(sp: u64, max: u32, area: &mut StackArea) -> u64 {
    const PAGE: u64 = 4096;
    let max = (max as u64).min(STACK_COPY_MAX as u64);
    // SAFETY: the bytes after the header lie inside `area` (see STACK_AREA_WORDS).
    let base = unsafe {
        area.as_mut_ptr()
            .cast::<u8>()
            .add(size_of::<StackCopyHeader>())
    };
    let mut copied: u64 = 0;
    let mut chunk = PAGE - (sp & (PAGE - 1));
    for _ in 0..(STACK_COPY_MAX as u64 / PAGE + 1) {
        if copied >= max {
            break;
        }
        if chunk > max - copied {
            chunk = max - copied;
        }
        // Bounds the verifier can see: offset below STACK_COPY_MAX, length at most 8 KiB.
        let off = copied & (STACK_COPY_MAX as u64 - 1);
        let len = chunk & 0x1fff;
        // SAFETY: `base + off .. + len` lies inside `area`; the helper checks the user address.
        let rc = unsafe {
            aya_ebpf::helpers::generated::bpf_probe_read_user(
                base.add(off as usize).cast(),
                len as u32,
                (sp + copied) as *const core::ffi::c_void,
            )
        };
        if rc != 0 {
            break;
        }
        copied += len;
        chunk = PAGE;
    }
    copied
}

/// Copies the used part of a scratch record (`header` bytes + `area_bytes` of its stack area)
/// into the ring.
#[inline(always)]
fn output_record<R>(record: &R, header: usize, area_bytes: usize) {
    let len = header + (area_bytes & 0xffff);
    let len = if len > size_of::<R>() {
        size_of::<R>()
    } else {
        len
    };
    // SAFETY: `record` is `len` readable bytes (bounded above for the verifier).
    let bytes = unsafe { core::slice::from_raw_parts((record as *const R).cast::<u8>(), len) };
    if EVENTS
        .output::<[u8]>(bytes, BPF_RB_NO_WAKEUP as u64)
        .is_err()
    {
        count_drop(drop_cause::RINGBUF_FULL);
    }
}

/// Entry of a traced memory syscall: saves its arguments (syscall tracepoints hold them from
/// offset 16 on, after the common header and the syscall number).
#[inline(always)]
fn syscall_enter(ctx: &TracePointContext, op: u32, nargs: usize) -> u32 {
    let key = bpf_get_current_pid_tgid();
    if TARGETS.get_ptr(&((key >> 32) as u32)).is_none() {
        return 0;
    }
    let mut saved = SyscallArgs {
        args: [0; 5],
        op,
        flags: 0,
    };
    let mut i = 0;
    while i < nargs && i < 5 {
        // SAFETY: reads the tracepoint record's argument slots.
        saved.args[i] = unsafe { ctx.read_at::<u64>(16 + 8 * i) }.unwrap_or(0);
        i += 1;
    }
    // Inside a hooked allocator call (malloc's arenas) or a CUDA driver allocation (its pinned
    // host mappings): those bytes are counted by that layer, not again as mappings.
    let inside = |slots: &Array<InflightCall>| {
        // SAFETY: reading the slot's owner word.
        slot_in(slots).is_some_and(|(slot, _)| unsafe { (*slot).owner } == key)
    };
    if inside(&INFLIGHT) || inside(&CUDA_INFLIGHT) {
        saved.flags = MAP_FROM_ALLOCATOR;
    }
    if SYSCALL_ARGS.insert(&key, &saved, 0).is_err() {
        count_drop(drop_cause::INFLIGHT_BUSY);
    }
    0
}

#[tracepoint]
pub fn mmap_enter(ctx: TracePointContext) -> u32 {
    syscall_enter(&ctx, map_op::MMAP, 5)
}

#[tracepoint]
pub fn munmap_enter(ctx: TracePointContext) -> u32 {
    syscall_enter(&ctx, map_op::MUNMAP, 2)
}

#[tracepoint]
pub fn mprotect_enter(ctx: TracePointContext) -> u32 {
    syscall_enter(&ctx, map_op::MPROTECT, 3)
}

#[tracepoint]
pub fn mremap_enter(ctx: TracePointContext) -> u32 {
    syscall_enter(&ctx, map_op::MREMAP, 5)
}

#[tracepoint]
pub fn brk_enter(ctx: TracePointContext) -> u32 {
    syscall_enter(&ctx, map_op::BRK, 1)
}

#[tracepoint]
pub fn madvise_enter(ctx: TracePointContext) -> u32 {
    // Only the advice values that release pages matter (the argument at offset 32).
    // SAFETY: reads the tracepoint record.
    let advice = unsafe { ctx.read_at::<u64>(32) }.unwrap_or(0);
    if !matches!(advice, MADV_DONTNEED | MADV_FREE | MADV_REMOVE) {
        return 0;
    }
    syscall_enter(&ctx, map_op::MADVISE, 3)
}

const MADV_DONTNEED: u64 = 4;
const MADV_FREE: u64 = 8;
const MADV_REMOVE: u64 = 9;

/// Set by user space: follow the children of traced processes.
#[unsafe(no_mangle)]
static FOLLOW_CHILDREN: u32 = 0;

const CLONE_THREAD: u64 = 0x0001_0000;

#[inline(always)]
fn emit_proc(op: u32, pid: u32, parent: u32) {
    let event = ProcEvent {
        kind: event_kind::PROC,
        op,
        pid,
        parent,
    };
    if EVENTS.output::<ProcEvent>(&event, 0).is_err() {
        count_drop(drop_cause::RINGBUF_FULL);
    }
}

/// task:task_newtask runs in the parent while it creates a task (`pid` at offset 8,
/// `clone_flags` at 32): a new process of a traced parent is traced before it runs.
#[tracepoint]
pub fn task_newtask(ctx: TracePointContext) -> u32 {
    // SAFETY: volatile read of a global set at load time.
    if unsafe { core::ptr::read_volatile(&FOLLOW_CHILDREN) } == 0 {
        return 0;
    }
    let parent = (bpf_get_current_pid_tgid() >> 32) as u32;
    if TARGETS.get_ptr(&parent).is_none() {
        return 0;
    }
    // SAFETY: reads the tracepoint record.
    let (child, flags) = unsafe {
        (
            ctx.read_at::<u32>(8).unwrap_or(0),
            ctx.read_at::<u64>(32).unwrap_or(0),
        )
    };
    if child == 0 || flags & CLONE_THREAD != 0 {
        return 0;
    }
    if TARGETS.insert(&child, &1, 0).is_err() {
        count_drop(drop_cause::INFLIGHT_BUSY);
    }
    emit_proc(proc_op::FORK, child, parent);
    0
}

/// sched:sched_process_exec, in the process after its new image is loaded.
#[tracepoint]
pub fn process_exec(_ctx: TracePointContext) -> u32 {
    let pid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if TARGETS.get_ptr(&pid).is_some() {
        emit_proc(proc_op::EXEC, pid, 0);
    }
    0
}

/// sched:sched_process_exit, for each exiting thread: reports the main thread's.
#[tracepoint]
pub fn process_exit(_ctx: TracePointContext) -> u32 {
    let key = bpf_get_current_pid_tgid();
    let (pid, tid) = ((key >> 32) as u32, key as u32);
    if pid == tid && TARGETS.get_ptr(&pid).is_some() {
        let _ = TARGETS.remove(&pid);
        emit_proc(proc_op::EXIT, pid, 0);
    }
    0
}

/// Set by user space: record one of every N not-present page faults of traced processes; 0: off.
#[unsafe(no_mangle)]
static FAULT_SAMPLE: u32 = 0;

#[map]
static FAULT_SCRATCH: Array<FaultRecord> = Array::with_max_entries(SCRATCH_SLOTS, 0);

/// Per-CPU count of faults seen, for sampling.
#[map]
static FAULT_COUNT: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// exceptions:page_fault_user (`address` at 8, `error_code` at 24): which stacks make RSS grow,
/// without any uprobe.
#[tracepoint]
pub fn page_fault_user(ctx: TracePointContext) -> u32 {
    // SAFETY: volatile read of a global set at load time.
    let every = unsafe { core::ptr::read_volatile(&FAULT_SAMPLE) };
    if every == 0 {
        return 0;
    }
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if TARGETS.get_ptr(&tgid).is_none() {
        return 0;
    }
    // SAFETY: reads the tracepoint record.
    let error_code = unsafe { ctx.read_at::<u64>(24) }.unwrap_or(1);
    if error_code & 1 != 0 {
        return 0; // protection fault on a present page: no new memory
    }
    let Some(count) = FAULT_COUNT.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: per-CPU slot, no concurrent writer.
    let n = unsafe {
        *count += 1;
        *count
    };
    if n % u64::from(every) != 0 {
        return 0;
    }
    let Some(record) = FAULT_SCRATCH.get_ptr_mut(cpu_slot()) else {
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
        address: unsafe { ctx.read_at::<u64>(8) }.unwrap_or(0),
    };
    // A leaf function (memset, memcpy) touching the page has no frame: the stack-pointer
    // candidate recovers its caller.
    // Sampled faults can still be many (a large memset): the cheaper stack unless asked.
    let Some((n, bytes, flags)) = current_user_stack(&mut record.ips, copy_bytes(&STACK_COPY_HEAP))
    else {
        return 0;
    };
    record.event.nframes = n;
    record.event.stack_flags = flags;
    output_record(record, size_of::<FaultEvent>(), bytes);
    0
}

/// The user stack of the current task from its saved user registers (at a tracepoint, where the
/// context holds no registers), with the stack-pointer candidate: (frames, stack flags).
#[inline(always)]
fn current_user_stack(area: &mut StackArea, copy: u32) -> Option<(u16, usize, u16)> {
    // SAFETY: the current task's user pt_regs, read with bpf_probe_read_kernel.
    let regs = unsafe { bpf_task_pt_regs(bpf_get_current_task_btf()) } as *const pt_regs;
    let regs = unsafe { bpf_probe_read_kernel(regs) }.ok()?;
    let mut flags = 0u16;
    let (n, bytes) = capture_stack((regs.rip, regs.rsp, regs.rbp), true, copy, area, &mut flags);
    // (n goes back with the area filled: the Python frames' walk is verified once.)
    let n = forget_value(n as usize) as u16;
    let bytes = finish_stack(area, bytes, &mut flags);
    Some((n, bytes, flags))
}

/// Exit of every traced memory syscall: emits the completed call with its user stack.
#[tracepoint]
pub fn syscall_exit(ctx: TracePointContext) -> u32 {
    let key = bpf_get_current_pid_tgid();
    let Some(saved) = (unsafe { SYSCALL_ARGS.get(&key) }).copied() else {
        return 0;
    };
    let _ = SYSCALL_ARGS.remove(&key);
    // SAFETY: sys_exit tracepoints hold `long ret` at offset 16.
    let ret = unsafe { ctx.read_at::<i64>(16) }.unwrap_or(-1);
    if (-4095..0).contains(&ret) {
        return 0; // failed: nothing changed
    }
    let Some(record) = MAP_SCRATCH.get_ptr_mut(cpu_slot()) else {
        return 0;
    };
    // SAFETY: the per-CPU scratch is ours until this program returns.
    let record = unsafe { &mut *record };
    record.event = MapEvent {
        kind: event_kind::MAP,
        tgid: (key >> 32) as u32,
        tid: key as u32,
        nframes: 0,
        stack_flags: 0,
        op: saved.op,
        flags: saved.flags,
        ret: ret as u64,
        args: saved.args,
    };
    // The user registers of the syscall: its return address and the caller's frame pointer.
    let Some((n, bytes, flags)) =
        current_user_stack(&mut record.ips, copy_bytes(&STACK_COPY_OTHER))
    else {
        return 0;
    };
    record.event.nframes = n;
    record.event.stack_flags = flags;
    output_record(record, size_of::<MapEvent>(), bytes);
    0
}

/// free: `(ptr)`. Attached after glibc's `free(NULL)` early exit where that site is cheaper.
#[uprobe]
pub fn heap_free(ctx: ProbeContext) -> u32 {
    let addr: u64 = ctx.arg(0).unwrap_or(0);
    if addr == 0 {
        return 0;
    }
    let Some((slot, key)) = my_slot() else {
        return 0;
    };
    // SAFETY: reading the slot's owner word.
    if unsafe { (*slot).owner } == key {
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
