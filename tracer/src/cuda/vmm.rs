//! The CUDA VMM layer: physical allocation handles (cuMemCreate) and their device mappings.
//!
//! A handle's bytes are live while it is referenced (created or retained, not yet released) or
//! mapped. llama.cpp releases a handle right after mapping it, so a release alone frees nothing;
//! one cuMemUnmap may cover many mappings (a pool destroyed in one call); vLLM's sleep unmaps and
//! releases, its wake creates and maps again at the same address. Address reservations are
//! address space, not memory: they are not counted (docs/accounting.md).

use std::collections::BTreeMap;

use rustc_hash::FxHashMap;

use crate::ledger::{CellRef, Ledger};

#[derive(Clone, Copy, Debug)]
struct Handle {
    size: u64,
    cell: u32,
    refs: u32,
    maps: u32,
}

#[derive(Default)]
pub struct VmmLedger {
    handles: FxHashMap<(u32, u64), Handle>,
    /// Device mappings by process: start → (end, handle).
    maps: FxHashMap<u32, BTreeMap<u64, (u64, u64)>>,
}

impl VmmLedger {
    pub fn new() -> VmmLedger {
        VmmLedger::default()
    }

    /// cuMemCreate returned `handle` for `size` bytes.
    pub fn create(&mut self, ledger: &mut Ledger, pid: u32, handle: u64, size: u64, at: CellRef) {
        let cell = ledger.credit(at, size, true);
        if let Some(old) = self.handles.insert(
            (pid, handle),
            Handle {
                size,
                cell,
                refs: 1,
                maps: 0,
            },
        ) {
            // A handle value reused while we thought it alive: its end was lost.
            ledger.debit(old.cell, old.size, true);
        }
    }

    /// cuMemRetainAllocationHandle returned `handle`.
    pub fn retain(&mut self, pid: u32, handle: u64) {
        if let Some(h) = self.handles.get_mut(&(pid, handle)) {
            h.refs += 1;
        }
    }

    pub fn release(&mut self, ledger: &mut Ledger, pid: u32, handle: u64) {
        if let Some(h) = self.handles.get_mut(&(pid, handle)) {
            h.refs = h.refs.saturating_sub(1);
        }
        self.retire_if_unused(ledger, pid, handle);
    }

    pub fn map(&mut self, pid: u32, ptr: u64, size: u64, handle: u64) {
        if let Some(h) = self.handles.get_mut(&(pid, handle)) {
            h.maps += 1;
            self.maps
                .entry(pid)
                .or_default()
                .insert(ptr, (ptr.saturating_add(size), handle));
        }
    }

    /// Unmaps every mapping that starts in `[ptr, ptr + size)`.
    pub fn unmap(&mut self, ledger: &mut Ledger, pid: u32, ptr: u64, size: u64) {
        let Some(maps) = self.maps.get_mut(&pid) else {
            return;
        };
        let end = ptr.saturating_add(size);
        let starts: Vec<u64> = maps.range(ptr..end).map(|(&s, _)| s).collect();
        let mut unmapped = Vec::with_capacity(starts.len());
        for s in starts {
            if let Some((_, handle)) = maps.remove(&s) {
                unmapped.push(handle);
            }
        }
        for handle in unmapped {
            if let Some(h) = self.handles.get_mut(&(pid, handle)) {
                h.maps = h.maps.saturating_sub(1);
            }
            self.retire_if_unused(ledger, pid, handle);
        }
    }

    fn retire_if_unused(&mut self, ledger: &mut Ledger, pid: u32, handle: u64) {
        if let Some(h) = self.handles.get(&(pid, handle))
            && h.refs == 0
            && h.maps == 0
        {
            ledger.debit(h.cell, h.size, true);
            self.handles.remove(&(pid, handle));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Class;

    const MIB: u64 = 1 << 20;

    fn at(stack: u32) -> CellRef {
        CellRef::new(1, Class::CudaVmm, Some(stack))
    }

    fn live(l: &Ledger) -> u64 {
        l.totals(Class::CudaVmm).live_bytes
    }

    #[test]
    fn release_after_map_keeps_the_memory_until_unmapped() {
        let (mut l, mut v) = (Ledger::new(), VmmLedger::new());
        for i in 0..4 {
            v.create(&mut l, 1, 0x10 + i, 2 * MIB, at(0));
            v.map(1, 0x7000_0000 + i * 2 * MIB, 2 * MIB, 0x10 + i);
            v.release(&mut l, 1, 0x10 + i);
        }
        assert_eq!(live(&l), 8 * MIB);
        // One unmap over the whole pool.
        v.unmap(&mut l, 1, 0x7000_0000, 8 * MIB);
        assert_eq!(live(&l), 0);
        assert_eq!(l.totals(Class::CudaVmm).freed_count, 4);
    }

    #[test]
    fn sleep_and_wake_at_the_same_address() {
        let (mut l, mut v) = (Ledger::new(), VmmLedger::new());
        v.create(&mut l, 1, 7, 16 * MIB, at(0));
        v.map(1, 0x9000_0000, 16 * MIB, 7);
        v.unmap(&mut l, 1, 0x9000_0000, 16 * MIB);
        v.release(&mut l, 1, 7);
        assert_eq!(live(&l), 0);
        v.create(&mut l, 1, 8, 16 * MIB, at(1));
        v.map(1, 0x9000_0000, 16 * MIB, 8);
        assert_eq!(live(&l), 16 * MIB);
    }

    #[test]
    fn retained_handles_outlive_their_first_release() {
        let (mut l, mut v) = (Ledger::new(), VmmLedger::new());
        v.create(&mut l, 1, 9, 4 * MIB, at(0));
        v.map(1, 0xa000_0000, 4 * MIB, 9);
        v.retain(1, 9);
        v.release(&mut l, 1, 9);
        v.unmap(&mut l, 1, 0xa000_0000, 4 * MIB);
        assert_eq!(live(&l), 4 * MIB, "still referenced once");
        v.release(&mut l, 1, 9);
        assert_eq!(live(&l), 0);
    }
}
