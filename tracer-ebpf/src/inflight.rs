//! In-flight call slots: a call's arguments wait in its thread's slot (`tid % INFLIGHT_SLOTS`)
//! from the entry probe to the return probe. A slot is claimed atomically through its owner
//! word, so that two threads with the same slot on two CPUs never both take it.

use core::intrinsics::{AtomicOrdering, atomic_cxchg};

use aya_ebpf::{
    EbpfContext,
    helpers::{bpf_get_attach_cookie, bpf_get_current_pid_tgid},
    maps::Array,
};
use tracer_common::{CudaCallSlot, INFLIGHT_SLOTS, InflightCall, drop_cause};

use crate::{
    diag,
    maps::{CUDA_INFLIGHT, INFLIGHT, RUNTIME_INFLIGHT},
};

/// A slot type whose first field is the `owner` word (`pid_tgid` of the thread holding it, 0
/// when free; asserted in tracer-common).
pub trait Slot {
    /// The cookie of the hook whose call holds the slot.
    fn func(&self) -> u32;
}

impl Slot for InflightCall {
    #[inline(always)]
    fn func(&self) -> u32 {
        self.func
    }
}

impl Slot for CudaCallSlot {
    #[inline(always)]
    fn func(&self) -> u32 {
        self.func
    }
}

#[inline(always)]
fn owner_of<T: Slot>(slot: *mut T) -> *mut u64 {
    slot.cast()
}

/// The calling thread's slot in `slots` and its `pid_tgid`.
#[inline(always)]
pub fn my_slot<T: Slot>(slots: &Array<T>) -> Option<(*mut T, u64)> {
    thread_slot(slots, bpf_get_current_pid_tgid())
}

/// The slot in `slots` of the thread whose `pid_tgid` is `thread` (the caller's, known).
#[inline(always)]
pub fn thread_slot<T: Slot>(slots: &Array<T>, thread: u64) -> Option<(*mut T, u64)> {
    let slot = slots.get_ptr_mut((thread as u32) % INFLIGHT_SLOTS)?;
    Some((slot, thread))
}

/// Whether thread `key` holds `slot`.
#[inline(always)]
pub fn holds<T: Slot>(slot: *mut T, key: u64) -> bool {
    // SAFETY: reading the slot's owner word; a slot owned by this thread is only written by it.
    unsafe { *owner_of(slot) == key }
}

/// The calling thread's slot in `slots` and its `pid_tgid`, if the thread holds the slot (is
/// inside such a call).
#[inline(always)]
pub fn held_slot<T: Slot>(slots: &Array<T>) -> Option<(*mut T, u64)> {
    let (slot, key) = my_slot(slots)?;
    holds(slot, key).then_some((slot, key))
}

/// The call the current thread is in, in `slots`, as its hook's cookie (0: none).
#[inline(always)]
pub fn call_in_flight<T: Slot>(slots: &Array<T>) -> u32 {
    match held_slot(slots) {
        // SAFETY: reading the slot; a slot owned by this thread is only written by it.
        Some((slot, _)) => unsafe { (*slot).func() },
        None => 0,
    }
}

/// The attach cookie of the running program: the hook's `Cookie`, encoded (0: none).
#[inline(always)]
pub fn attach_cookie<C: EbpfContext>(ctx: &C) -> u32 {
    // SAFETY: the helper only reads the attach cookie of the running program.
    unsafe { bpf_get_attach_cookie(ctx.as_ptr()) as u32 }
}

/// Claims `slot` for `key` if it is free; returns the previous owner (0: claimed).
#[inline(always)]
pub fn claim<T: Slot>(slot: *mut T, key: u64) -> u64 {
    // SAFETY: the owner word is in a map value: 8-byte aligned, lives as long as the map.
    unsafe {
        atomic_cxchg::<u64, { AtomicOrdering::Relaxed }, { AtomicOrdering::Relaxed }>(
            owner_of(slot),
            0,
            key,
        )
        .0
    }
}

/// Frees a slot its owner is done with.
#[inline(always)]
pub fn release<T: Slot>(slot: *mut T) {
    // A plain store suffices: only the owner releases, and an aligned 8-byte store is atomic.
    // (LLVM's BPF backend cannot select an atomic store.)
    // SAFETY: as in `claim`.
    unsafe { core::ptr::write_volatile(owner_of(slot), 0) }
}

/// Which allocation calls a slot table holds.
#[derive(Copy, Clone, PartialEq, Eq)]
pub enum CallKind {
    /// The C allocator (`INFLIGHT`).
    Heap,
    /// CUDA driver allocations (`CUDA_INFLIGHT`).
    Cuda,
    /// CUDA runtime allocations (`RUNTIME_INFLIGHT`).
    Runtime,
}

impl CallKind {
    #[inline(always)]
    pub fn slots(self) -> &'static Array<InflightCall> {
        match self {
            CallKind::Heap => &INFLIGHT,
            CallKind::Cuda => &CUDA_INFLIGHT,
            CallKind::Runtime => &RUNTIME_INFLIGHT,
        }
    }
}

/// What an allocation call's entry saves for its return.
#[derive(Copy, Clone)]
pub struct Entry {
    /// The hook's cookie.
    pub func: u32,
    /// Requested bytes (cuMemAllocPitch: the height).
    pub size: u64,
    /// realloc/reallocarray: the block passed in.
    pub old_block: u64,
    /// Where the call writes the block (posix_memalign's `memptr`, a CUDA out-pointer); 0 when
    /// the block is the return value.
    pub out_ptr: u64,
    /// CUDA: copied into the event's `aux` (a pool, a graph).
    pub aux: u64,
    /// cuMemAllocPitch: where the call writes the pitch the size is scaled by.
    pub size_ptr: u64,
}

impl Entry {
    /// A call of `func` for `size` bytes, returning its block; the other fields are 0.
    #[inline(always)]
    pub fn new(func: u32, size: u64) -> Entry {
        Entry {
            func,
            size,
            old_block: 0,
            out_ptr: 0,
            aux: 0,
            size_ptr: 0,
        }
    }
}

/// Saves `entry` in the calling thread's slot of `kind`. A hooked function called from inside
/// another one on this thread is part of the outer call (its depth is counted); another thread
/// in the same slot is a lost call.
#[inline(always)]
pub fn enter(kind: CallKind, entry: Entry) -> u32 {
    enter_thread(bpf_get_current_pid_tgid(), kind, entry)
}

/// `enter` for the calling thread, whose `pid_tgid` is `thread`.
#[inline(always)]
pub fn enter_thread(thread: u64, kind: CallKind, entry: Entry) -> u32 {
    let Some((slot, key)) = thread_slot(kind.slots(), thread) else {
        return 0;
    };
    match claim(slot, key) {
        // SAFETY: the slot is ours until the return probe releases it.
        0 => unsafe {
            (*slot).size = entry.size;
            (*slot).old_block = entry.old_block;
            (*slot).out_ptr = entry.out_ptr;
            (*slot).aux = entry.aux;
            (*slot).size_ptr = entry.size_ptr;
            (*slot).func = entry.func;
            (*slot).depth = 0;
        },
        // SAFETY: only this thread writes a slot it owns.
        current if current == key => unsafe { (*slot).depth += 1 },
        _ => diag::lost(drop_cause::INFLIGHT_BUSY, "allocation entry"),
    }
    0
}

/// At an allocation call's return: the call saved in the calling thread's slot of `kind`, and
/// the thread's `pid_tgid`; the slot is released. `None` when there is nothing to emit: the call
/// was entered before attach or found the slot busy, or it is a nested call.
#[inline(always)]
pub fn leave(kind: CallKind) -> Option<(InflightCall, u64)> {
    let (slot, key) = my_slot(kind.slots())?;
    // SAFETY: only this thread writes a slot it owns.
    let call = unsafe {
        if (*slot).owner != key {
            return None; // entered before attach, or the slot was busy
        }
        if (*slot).depth > 0 {
            (*slot).depth -= 1;
            return None;
        }
        *slot
    };
    release(slot);
    Some((call, key))
}
