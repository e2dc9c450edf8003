//! The heap blocks the kernel holds (`tracer-ebpf/src/heap_ledger.rs`): with exact `--heap` and
//! frame-pointer heap stacks, every block stays in the kernel, counted in its stack key's totals,
//! and each stack comes through the ring once with its key. This layer maps keys to ledger cells
//! and, once a second and at the end, applies what the totals grew by since it last read them;
//! at the end, keys whose stacks never arrived are counted under one frame that says so. The accounting rules are the ledger's own (module
//! `ledger`): a block counts from its allocation to its free, at its allocation's stack.
//! The heap's peak is the kernel's, kept at every call over every block it knew.

use rustc_hash::FxHashMap;
use tracer_common::heap_ledger::StackTotals;

use super::Ledger;
use crate::model::Class;

/// Where the kernel's totals are read and its keys removed (the `STACK_TOTALS` map; a fake in
/// tests).
pub trait KernelTotals: Send {
    /// What the kernel counted for `key`, if it counts it.
    fn read(&self, key: u64) -> Option<StackTotals>;
    /// Stops the kernel counting `key` (its image is gone).
    fn forget(&mut self, key: u64);
    /// The heap's peak live bytes as the kernel counted them at every call.
    fn heap_peak(&self) -> Option<u64>;
    /// Every key the kernel counts, with its totals.
    fn all(&self) -> Vec<(u64, StackTotals)>;
}

/// A stack the kernel counts: its ledger cell and what was applied of its totals.
struct HeldStack {
    pid: u32,
    cell: u32,
    applied: StackTotals,
}

/// Keys of the stacks the kernel counts, by key.
#[derive(Default)]
pub struct KernelHeap {
    stacks: FxHashMap<u64, HeldStack>,
}

impl KernelHeap {
    /// The block of a new stack arrived with `key`: later blocks there are counted in `cell`.
    pub fn register(&mut self, key: u64, pid: u32, cell: u32) {
        self.stacks.entry(key).or_insert(HeldStack {
            pid,
            cell,
            applied: StackTotals::default(),
        });
    }

    /// Number of stacks the kernel counts.
    pub fn stacks(&self) -> usize {
        self.stacks.len()
    }

    /// Applies what the kernel counted since the last read; `complete`: the kernel knew every
    /// block (none went past a full ledger).
    pub fn sync(&mut self, ledger: &mut Ledger, kernel: &dyn KernelTotals, complete: bool) {
        for (&key, held) in &mut self.stacks {
            if let Some(now) = kernel.read(key) {
                ledger.apply_counts(held.cell, &now.since(&held.applied));
                held.applied = now;
            }
        }
        // Read once a second, the totals cannot tell the peak; the kernel kept it at every
        // call. Past a full ledger it missed blocks: the higher of the two then.
        match kernel.heap_peak() {
            Some(peak) if complete => ledger.set_peak(Class::Heap, peak),
            Some(peak) => {
                let ours = ledger.totals(Class::Heap).peak_bytes;
                ledger.set_peak(Class::Heap, peak.max(ours));
            }
            None => {}
        }
    }

    /// At the end: the keys the kernel counts whose stacks never arrived are registered at
    /// `cell_of(pid)` and their totals applied, so that no byte stays in the kernel.
    pub fn adopt_undelivered(
        &mut self,
        kernel: &dyn KernelTotals,
        cell_of: &mut dyn FnMut(u32) -> u32,
    ) {
        for (key, totals) in kernel.all() {
            if !self.stacks.contains_key(&key) {
                self.register(key, totals.tgid, cell_of(totals.tgid));
            }
        }
    }

    /// Process `pid` replaced its image (exec): what the kernel counted for it is read a last
    /// time, its live blocks retired with the old address space, and its keys forgotten on both
    /// sides.
    pub fn forget_process(&mut self, ledger: &mut Ledger, pid: u32, kernel: &mut dyn KernelTotals) {
        let keys: Vec<u64> = (self.stacks.iter())
            .filter(|(_, held)| held.pid == pid)
            .map(|(&key, _)| key)
            .collect();
        for key in keys {
            let Some(mut held) = self.stacks.remove(&key) else {
                continue;
            };
            if let Some(now) = kernel.read(key) {
                ledger.apply_counts(held.cell, &now.since(&held.applied));
                held.applied = now;
            }
            // Gone with the old address space, as `Ledger::forget_process` counts its blocks.
            let (freed_bytes, freed_count) = held.applied.live();
            let gone = StackTotals {
                freed_bytes,
                freed_count,
                ..StackTotals::default()
            };
            ledger.apply_counts(held.cell, &gone);
            kernel.forget(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::ledger::CellRef;

    #[derive(Default)]
    struct Fake(HashMap<u64, StackTotals>, Option<u64>);

    impl KernelTotals for Fake {
        fn read(&self, key: u64) -> Option<StackTotals> {
            self.0.get(&key).copied()
        }
        fn forget(&mut self, key: u64) {
            self.0.remove(&key);
        }
        fn heap_peak(&self) -> Option<u64> {
            self.1
        }
        fn all(&self) -> Vec<(u64, StackTotals)> {
            self.0.iter().map(|(k, v)| (*k, *v)).collect()
        }
    }

    fn totals(ab: u64, ac: u64, fb: u64, fc: u64) -> StackTotals {
        StackTotals {
            allocated_bytes: ab,
            allocated_count: ac,
            freed_bytes: fb,
            freed_count: fc,
            tgid: 7,
            delivered: 1,
            ..StackTotals::default()
        }
    }

    #[test]
    fn each_read_applies_what_grew_since_the_last() {
        let mut ledger = Ledger::new();
        let cell = ledger.credit(CellRef::new(7, Class::Heap, Some(3)), 100, true);
        let (mut heap, mut kernel) = (KernelHeap::default(), Fake::default());
        heap.register(42, 7, cell);
        kernel.0.insert(42, totals(1000, 10, 400, 4));
        heap.sync(&mut ledger, &kernel, true);
        heap.sync(&mut ledger, &kernel, true); // nothing new: nothing applied twice
        let t = ledger.totals(Class::Heap);
        assert_eq!((t.live_bytes, t.live_count), (100 + 600, 1 + 6));
        assert_eq!(
            (t.allocated_bytes, t.allocated_count, t.freed_count),
            (1100, 11, 4)
        );
        kernel.0.insert(42, totals(1000, 10, 1000, 10));
        heap.sync(&mut ledger, &kernel, true);
        let t = ledger.totals(Class::Heap);
        assert_eq!((t.live_bytes, t.live_count), (100, 1));
        // Without the kernel's peak, the highest reading; not the sum of the allocations.
        assert_eq!(t.peak_bytes, 700);
        // The kernel's, when it knew every block; else the higher of the two.
        kernel.1 = Some(900);
        heap.sync(&mut ledger, &kernel, true);
        assert_eq!(ledger.totals(Class::Heap).peak_bytes, 900);
        kernel.1 = Some(650);
        heap.sync(&mut ledger, &kernel, true);
        assert_eq!(ledger.totals(Class::Heap).peak_bytes, 650);
        kernel.1 = Some(640);
        ledger.set_peak(Class::Heap, 660);
        heap.sync(&mut ledger, &kernel, false);
        assert_eq!(ledger.totals(Class::Heap).peak_bytes, 660);
    }

    #[test]
    fn an_exec_retires_the_old_images_blocks_and_keys() {
        let mut ledger = Ledger::new();
        let cell = ledger.credit(CellRef::new(7, Class::Heap, Some(3)), 0, false);
        let other = ledger.credit(CellRef::new(8, Class::Heap, Some(4)), 0, false);
        let (mut heap, mut kernel) = (KernelHeap::default(), Fake::default());
        heap.register(1, 7, cell);
        heap.register(2, 8, other);
        kernel.0.insert(1, totals(300, 3, 0, 0));
        kernel.0.insert(2, totals(50, 1, 0, 0));
        heap.forget_process(&mut ledger, 7, &mut kernel);
        let t = ledger.totals(Class::Heap);
        // Counted as allocated (read a last time), then gone; the other process untouched.
        assert_eq!((t.allocated_bytes, t.live_bytes, t.live_count), (300, 0, 0));
        assert_eq!(t.freed_count, 3);
        assert!(!kernel.0.contains_key(&1) && heap.stacks() == 1);
        heap.sync(&mut ledger, &kernel, true);
        assert_eq!(ledger.totals(Class::Heap).live_bytes, 50);
    }

    #[test]
    fn stacks_that_never_arrived_are_counted_at_the_end_under_their_process() {
        let mut ledger = Ledger::new();
        let known = ledger.cell_of(CellRef::new(7, Class::Heap, Some(1)));
        let unknown = ledger.cell_of(CellRef::new(9, Class::Heap, Some(2)));
        let mut heap = KernelHeap::default();
        heap.register(1, 7, known);
        let totals = |tgid, bytes| StackTotals {
            allocated_bytes: bytes,
            allocated_count: 1,
            tgid,
            ..StackTotals::default()
        };
        let kernel = Fake(
            HashMap::from([(1, totals(7, 100)), (2, totals(9, 40))]),
            None,
        );
        let mut asked = Vec::new();
        heap.adopt_undelivered(&kernel, &mut |pid| {
            asked.push(pid);
            unknown
        });
        assert_eq!(
            asked,
            [9],
            "only the key whose stack never came, by its process"
        );
        heap.sync(&mut ledger, &kernel, true);
        assert_eq!(ledger.totals(Class::Heap).live_bytes, 140);
        assert_eq!(ledger.live_of(9, |c| c == Class::Heap), 40);
    }
}
