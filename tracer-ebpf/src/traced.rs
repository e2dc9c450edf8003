//! Whether a heap call's process is traced, with its image generation and settings, through a
//! per-CPU cache of the last traced process looked up: most calls on a CPU are one process's,
//! and a hit costs a few loads where the `TARGETS` lookup costs a hash (three per
//! malloc/free pair otherwise).
//!
//! An entry is true while `TARGETS_EPOCH` and `SETTINGS_VERSION` have not moved since it was
//! read: the kernel moves the epoch whenever a `TARGETS` entry stops being true (exec, exit),
//! and user space moves the version whenever a process's settings change. The epoch is read
//! before the `TARGETS` lookup that fills an entry, so that a change in between leaves the
//! entry stale rather than wrong.

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use crate::{
    heap_ledger::{self, Settings},
    maps::{SETTINGS_VERSION, TARGETS, TARGETS_EPOCH, TRACED_CACHE},
};

/// A traced process as a heap call needs it.
#[derive(Copy, Clone)]
pub struct Traced {
    /// Its image generation (`TracedProcess::generation`).
    pub generation: u32,
    /// What user space set for it (`heap_ledger::settings`).
    pub settings: Settings,
}

/// `TRACED_CACHE`'s value. Another task's program may run on this CPU between two loads of
/// it (uprobe programs are preemptible), so `id` is written last, after being cleared, and
/// read before and after the rest: an entry whose `id` reads the same twice was written whole
/// for that process.
#[repr(C)]
pub struct CachedProcess {
    /// tgid (high half) and image generation (low half); 0: empty.
    id: u64,
    /// `TARGETS_EPOCH` when it was read.
    epoch: u64,
    /// `SETTINGS_VERSION` (high half) and the settings (`Settings::encode`).
    settings: u64,
}

/// The current value of `TARGETS_EPOCH`.
#[inline(always)]
fn epoch() -> u64 {
    TARGETS_EPOCH
        .get_ptr(0)
        // SAFETY: the map's one value, valid while this program runs.
        .map_or(0, |e| unsafe { core::ptr::read_volatile(e) })
}

/// The current value of `SETTINGS_VERSION`.
#[inline(always)]
fn version() -> u32 {
    // SAFETY: a lookup of a plain value.
    unsafe { SETTINGS_VERSION.get(0) }.copied().unwrap_or(0)
}

/// Process `tgid` if it is traced; None if not.
#[inline(always)]
pub fn traced(tgid: u32) -> Option<Traced> {
    let now = (epoch(), version());
    let slot = TRACED_CACHE.get_ptr_mut(0);
    if let Some(hit) = slot.and_then(|slot| cached(slot, tgid, now)) {
        return Some(hit);
    }
    let found = look_up(tgid, now.1)?;
    if let Some(slot) = slot {
        fill(slot, tgid, now, found);
    }
    Some(found)
}

/// Process `tgid` as this CPU's `slot` has it, if the slot holds it whole and read at the
/// current `(epoch, version)`.
#[inline(always)]
fn cached(slot: *mut CachedProcess, tgid: u32, (epoch, version): (u64, u32)) -> Option<Traced> {
    // SAFETY: this CPU's value, valid while this program runs; loads of aligned words.
    let (id, cached_epoch, settings, id_again) = unsafe {
        (
            core::ptr::read_volatile(&raw const (*slot).id),
            core::ptr::read_volatile(&raw const (*slot).epoch),
            core::ptr::read_volatile(&raw const (*slot).settings),
            core::ptr::read_volatile(&raw const (*slot).id),
        )
    };
    let hit = id != 0
        && id == id_again
        && (id >> 32) as u32 == tgid
        && cached_epoch == epoch
        && (settings >> 32) as u32 == version;
    hit.then(|| Traced {
        generation: id as u32,
        settings: Settings::decode(settings as u32),
    })
}

/// Writes `found`, process `tgid` looked up at `(epoch, version)`, into this CPU's `slot`: its
/// id cleared first and written last (`CachedProcess`).
#[inline(always)]
fn fill(slot: *mut CachedProcess, tgid: u32, (epoch, version): (u64, u32), found: Traced) {
    // SAFETY: this CPU's value, valid while this program runs.
    unsafe {
        core::ptr::write_volatile(&raw mut (*slot).id, 0);
        core::ptr::write_volatile(&raw mut (*slot).epoch, epoch);
        core::ptr::write_volatile(
            &raw mut (*slot).settings,
            u64::from(version) << 32 | u64::from(found.settings.encode()),
        );
        core::ptr::write_volatile(
            &raw mut (*slot).id,
            u64::from(tgid) << 32 | u64::from(found.generation),
        );
    }
}

/// Process `tgid` as `TARGETS` has it, its settings read at `version`; None if not traced.
#[inline(always)]
fn look_up(tgid: u32, version: u32) -> Option<Traced> {
    let process = TARGETS.get_ptr_mut(tgid)?;
    // SAFETY: a map value, valid while this program runs.
    let generation = unsafe { core::ptr::read_volatile(&raw const (*process).generation) };
    Some(Traced {
        generation,
        settings: heap_ledger::settings((tgid, process), version),
    })
}

/// A `TARGETS` entry stopped being true (its process exec'd or exited): every cached entry
/// read before now is stale.
#[inline(always)]
pub fn targets_changed() {
    if let Some(e) = TARGETS_EPOCH.get_ptr_mut(0) {
        // SAFETY: the map's one value (8-byte aligned), valid while this program runs.
        unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(e, 1) };
    }
}
