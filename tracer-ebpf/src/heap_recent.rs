//! The kernel heap ledger's recent blocks (`RECENT_BLOCKS`): a direct-mapped table, by process
//! and address, that a new block goes into when one of its address's two slots is empty, and
//! leaves at its free. Most heap blocks die young (a malloc and its free a few calls apart):
//! for them a pair costs two array slots and three atomic operations, where `HELD_BLOCKS`, a
//! hash table, costs an insert, a lookup and a delete (about 250 ns a pair, docs/performance.md).
//! A block never moves between the two tables: it is in exactly one of them from its
//! allocation to its free, so that a free looks here first and then there, and no race can
//! hide it from both. Each pair of slots counts its blocks that went to `HELD_BLOCKS` for want
//! of room (`spilled`): while none did, a block's allocation and free skip that table.
//!
//! A slot's `owner` word says who may touch the rest (`RecentBlock`). A program claims a slot
//! by a compare-and-exchange of `owner` to `RECENT_BUSY`, and hands it on by an exchange to the
//! new owner: both are fully ordered, and every access to the fields between them is volatile
//! (kept in program order by the compiler), so whoever claims the slot next sees the fields as
//! they were written. A slot another program holds is tried once more, never waited for.
//!
//! `put`, `take` and `mark_reallocating` are BPF subprograms (`#[inline(never)]`): inlined at
//! their call sites in the allocation return, their branches multiplied the verifier's states
//! past its limit of a million instructions once `--debug-bpf` adds its log sites.

use core::intrinsics::{AtomicOrdering, atomic_cxchg, atomic_xadd, atomic_xchg};

use tracer_common::heap_ledger::{HeldBlock, RECENT_BUSY, RECENT_EMPTY, RecentBlock};

use crate::maps::{HEAP_RECENT_SLOTS, RECENT_BLOCKS, global};

/// Whether the ledger keeps recent blocks in this recording.
#[inline(always)]
pub fn enabled() -> bool {
    global(&HEAP_RECENT_SLOTS) != 0
}

/// The first of the two slots the block at `addr` of `tgid` may be in (the other is next).
#[inline(always)]
fn first_slot(tgid: u32, addr: u64) -> u32 {
    let h = (addr ^ u64::from(tgid) << 32).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    (h >> 32) as u32 & global(&HEAP_RECENT_SLOTS).wrapping_sub(1) & !1
}

/// The count of blocks hashing to the slot pair of `tgid`'s `addr` that `HELD_BLOCKS` holds
/// (`RecentBlock::spilled`, in the pair's first slot).
#[inline(always)]
fn spilled(tgid: u32, addr: u64) -> Option<*mut u32> {
    let slot = RECENT_BLOCKS.get_ptr_mut(first_slot(tgid, addr))?;
    // SAFETY: a map value, valid while this program runs.
    Some(unsafe { &raw mut (*slot).spilled })
}

/// Whether `HELD_BLOCKS` may hold a block of `tgid` at `addr`: false when it holds none of
/// the block's slot pair, as for most blocks, which then skip its lookups.
#[inline(always)]
pub fn may_be_spilled(tgid: u32, addr: u64) -> bool {
    if !enabled() {
        return true;
    }
    // SAFETY: a map value (`spilled`), valid while this program runs.
    spilled(tgid, addr).is_none_or(|count| unsafe { core::ptr::read_volatile(count) } != 0)
}

/// A block of `tgid` at `addr` goes into `HELD_BLOCKS` (`into`), or left it. Counted before the
/// insert, so that no free of the block can find its pair's count at 0 while it is there.
#[inline(always)]
pub fn count_spilled(tgid: u32, addr: u64, into: bool) {
    if !enabled() {
        return;
    }
    if let Some(count) = spilled(tgid, addr) {
        let n = if into { 1 } else { u32::MAX };
        // SAFETY: a map value (4-byte aligned), valid while this program runs.
        unsafe { atomic_xadd::<u32, u32, { AtomicOrdering::Relaxed }>(count, n) };
    }
}

/// `owner` of `slot` as it is now.
#[inline(always)]
fn owner(slot: *mut RecentBlock) -> u64 {
    // SAFETY: a map value, valid while this program runs.
    unsafe { core::ptr::read_volatile(&raw const (*slot).owner) }
}

/// Claims `slot` if its owner is still `seen`.
#[inline(always)]
fn claim(slot: *mut RecentBlock, seen: u64) -> bool {
    // SAFETY: a map value (8-byte aligned), valid while this program runs.
    unsafe {
        atomic_cxchg::<u64, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(
            &raw mut (*slot).owner,
            seen,
            RECENT_BUSY,
        )
    }
    .1
}

/// Claims `slot` if it holds a block at `addr`. A slot another program holds (to look at its
/// process, or to fill it) is tried once more: it is handed on a few instructions later.
#[inline(always)]
fn claim_block(slot: *mut RecentBlock, addr: u64) -> bool {
    for _ in 0..2 {
        let seen = owner(slot);
        if seen == addr {
            if claim(slot, addr) {
                return true;
            }
        } else if seen != RECENT_BUSY {
            return false;
        }
    }
    false
}

/// Hands a claimed `slot` on to `owner`, its fields written.
#[inline(always)]
fn hand_on(slot: *mut RecentBlock, owner: u64) {
    // SAFETY: as in `claim`.
    unsafe { atomic_xchg::<u64, { AtomicOrdering::SeqCst }>(&raw mut (*slot).owner, owner) };
}

/// The process and block in a claimed `slot`.
#[inline(always)]
fn read(slot: *mut RecentBlock) -> (u32, HeldBlock) {
    // SAFETY: a map value, ours while claimed.
    unsafe {
        (
            core::ptr::read_volatile(&raw const (*slot).tgid),
            core::ptr::read_volatile(&raw const (*slot).block),
        )
    }
}

/// Writes `block` of `tgid` into a claimed `slot`.
#[inline(always)]
fn write(slot: *mut RecentBlock, tgid: u32, block: &HeldBlock) {
    // SAFETY: a map value, ours while claimed.
    unsafe {
        core::ptr::write_volatile(&raw mut (*slot).tgid, tgid);
        core::ptr::write_volatile(&raw mut (*slot).block, *block);
    }
}

/// What `put` did with a block.
pub enum Put {
    /// It is held here.
    Kept,
    /// It is held here, in place of a block of the same process at the same address, which it
    /// returns: that block's free was not seen (or a realloc in flight freed it inside).
    Replaced(HeldBlock),
    /// Both its slots hold other blocks (or other programs hold them): `HELD_BLOCKS` keeps it.
    NoRoom,
}

/// Keeps `block`, made at `addr` by `tgid`, here if one of its slots is empty or holds the
/// block it replaces.
#[inline(never)]
pub fn put(tgid: u32, addr: u64, block: &HeldBlock) -> Put {
    let first = first_slot(tgid, addr);
    // The empty slot, by its offset from the first (2: none).
    let mut empty = 2;
    for i in 0..2 {
        let Some(slot) = RECENT_BLOCKS.get_ptr_mut(first | i) else {
            continue;
        };
        let seen = owner(slot);
        if seen == RECENT_EMPTY && empty == 2 {
            empty = i;
        } else if seen == addr && claim(slot, addr) {
            let (here, old) = read(slot);
            if here == tgid {
                write(slot, tgid, block);
                hand_on(slot, addr);
                return Put::Replaced(old);
            }
            hand_on(slot, addr);
        }
    }
    match RECENT_BLOCKS.get_ptr_mut(first | empty) {
        Some(slot) if empty < 2 && claim(slot, RECENT_EMPTY) => {
            write(slot, tgid, block);
            hand_on(slot, addr);
            Put::Kept
        }
        _ => Put::NoRoom,
    }
}

/// The slot holding the block at `addr` of `tgid`, claimed (the caller hands it on); None if
/// it is not here.
#[inline(always)]
fn claim_mine(tgid: u32, addr: u64) -> Option<*mut RecentBlock> {
    let first = first_slot(tgid, addr);
    for i in 0..2 {
        let Some(slot) = RECENT_BLOCKS.get_ptr_mut(first | i) else {
            continue;
        };
        if !claim_block(slot, addr) {
            continue;
        }
        if read(slot).0 == tgid {
            return Some(slot);
        }
        // Another process's block at the same address.
        hand_on(slot, addr);
    }
    None
}

/// Takes the block at `addr` of `tgid` out, if it is here (and, with `reallocating_only`,
/// marked reallocating).
#[inline(never)]
pub fn take(tgid: u32, addr: u64, reallocating_only: bool) -> Option<HeldBlock> {
    let slot = claim_mine(tgid, addr)?;
    let (_, block) = read(slot);
    if reallocating_only && block.reallocating == 0 {
        hand_on(slot, addr);
        return None;
    }
    hand_on(slot, RECENT_EMPTY);
    Some(block)
}

/// Marks the block at `addr` of `tgid` as being reallocated (or no longer); whether it is here.
#[inline(never)]
pub fn mark_reallocating(tgid: u32, addr: u64, reallocating: bool) -> bool {
    let Some(slot) = claim_mine(tgid, addr) else {
        return false;
    };
    let (_, mut block) = read(slot);
    block.reallocating = u16::from(reallocating);
    write(slot, tgid, &block);
    hand_on(slot, addr);
    true
}
