//! The ledger of live allocations: what is live right now, by block and by (class, phase, stack).
//!
//! Heap accounting rules (docs/accounting.md):
//! - a block counts at its requested size from the successful return of its allocation call until
//!   the `free` of its address;
//! - `realloc`/`reallocarray` of a non-NULL block is a free of the old block and an allocation of the
//!   new one at the realloc's stack, also when the block did not move;
//! - `realloc(p, 0)` returning NULL frees `p` (glibc semantics) and is not a failure;
//! - a failed call (NULL, or a non-zero posix_memalign result) is a failure, never live memory;
//! - a free of an address the ledger never saw (allocated before attach) is an unmatched free and
//!   changes no total;
//! - an allocation at an address that is still live means its free was lost: the old block is
//!   retired and counted under `missed_free`.

pub mod kernel_heap;
pub mod mappings;
pub mod torch;

use std::collections::{BTreeMap, HashMap};

use rustc_hash::FxHashMap;
use tracer_common::heap_ledger::StackTotals;

use crate::model::{
    CellKey, Class, ClassTotals, CudaCalls, FailureKey, LedgerState, PHASE_NONE, SeriesPoint,
    StackCounters, StackIndex,
};

/// Lost-event cause counted by the ledger itself (see module docs).
pub const MISSED_FREE: &str = "missed_free";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct LiveBlock {
    size: u64,
    cell: u32,
}

/// Live blocks by (pid, address), packed into 16 bytes per block (address key + `size | cell <<
/// 40`): a million live blocks cost about 34 MB instead of 70. Blocks of 1 TiB or more, or in cell
/// 2^24 and above, go to a side table.
#[derive(Default)]
struct LiveBlocks {
    by_pid: FxHashMap<u32, FxHashMap<u64, u64>>,
    wide: FxHashMap<(u32, u64), LiveBlock>,
    len: usize,
}

const SIZE_BITS: u32 = 40;

impl LiveBlocks {
    /// Removes and returns every block of `pid`.
    fn take_pid(&mut self, pid: u32) -> Vec<LiveBlock> {
        let mut out: Vec<LiveBlock> = self
            .by_pid
            .remove(&pid)
            .unwrap_or_default()
            .into_values()
            .map(|packed| LiveBlock {
                size: packed & ((1 << SIZE_BITS) - 1),
                cell: (packed >> SIZE_BITS) as u32,
            })
            .collect();
        let wide: Vec<(u32, u64)> = self
            .wide
            .keys()
            .filter(|(p, _)| *p == pid)
            .copied()
            .collect();
        out.extend(wide.into_iter().filter_map(|k| self.wide.remove(&k)));
        self.len -= out.len();
        out
    }

    fn insert(&mut self, pid: u32, addr: u64, block: LiveBlock) -> Option<LiveBlock> {
        let old = self.remove(pid, addr);
        if block.size < 1 << SIZE_BITS && block.cell < 1 << (64 - SIZE_BITS) {
            let packed = block.size | (u64::from(block.cell) << SIZE_BITS);
            self.by_pid.entry(pid).or_default().insert(addr, packed);
        } else {
            self.wide.insert((pid, addr), block);
        }
        self.len += 1;
        old
    }

    fn get(&self, pid: u32, addr: u64) -> Option<u64> {
        match self.by_pid.get(&pid).and_then(|m| m.get(&addr)) {
            Some(packed) => Some(packed & ((1 << SIZE_BITS) - 1)),
            None => self.wide.get(&(pid, addr)).map(|b| b.size),
        }
    }

    fn remove(&mut self, pid: u32, addr: u64) -> Option<LiveBlock> {
        let found = match self.by_pid.get_mut(&pid).and_then(|m| m.remove(&addr)) {
            Some(packed) => Some(LiveBlock {
                size: packed & ((1 << SIZE_BITS) - 1),
                cell: (packed >> SIZE_BITS) as u32,
            }),
            None => self.wide.remove(&(pid, addr)),
        };
        if found.is_some() {
            self.len -= 1;
        }
        found
    }
}

/// Interned phase name (index into the ledger's phase table; 0 is `none`).
pub type PhaseId = u16;

/// A cheap, copyable cell address used on the hot path; `CellKey` is its spelled-out form.
#[derive(Clone, Copy, Debug)]
pub struct CellRef {
    pub class: Class,
    pub pid: u32,
    pub phase: PhaseId,
    pub stack: Option<StackIndex>,
    /// Not part of the address: the allocating thread's phase (the kernel's, from native
    /// rules), which the free matrix counts blocks by; `phase` may come from Python frames
    /// instead, which a free cannot be told by.
    pub thread_phase: PhaseId,
}

impl PartialEq for CellRef {
    fn eq(&self, other: &CellRef) -> bool {
        (self.class, self.pid, self.phase, self.stack)
            == (other.class, other.pid, other.phase, other.stack)
    }
}

impl Eq for CellRef {}

impl std::hash::Hash for CellRef {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        (self.class, self.pid, self.phase, self.stack).hash(state);
    }
}

impl CellRef {
    pub fn new(pid: u32, class: Class, stack: Option<StackIndex>) -> CellRef {
        CellRef {
            class,
            pid,
            phase: 0,
            stack,
            thread_phase: 0,
        }
    }
}

pub struct Ledger {
    live: LiveBlocks,
    cells: Vec<(CellKey, StackCounters)>,
    /// Each cell's allocating thread's phase (`CellRef::thread_phase`), for the free matrix.
    cell_phases: Vec<PhaseId>,
    cell_index: HashMap<CellRef, u32>,
    phases: Vec<String>,
    /// Cells whose live figures changed since the last `take_series`.
    dirty: Vec<u32>,
    dirty_flag: Vec<bool>,
    totals: BTreeMap<Class, ClassTotals>,
    failures: HashMap<FailureKey, u64>,
    unmatched_frees: u64,
    missed_frees: u64,
    /// Duty-cycled heap: frees happen while the probes are off, so a live address allocated
    /// again is a block freed unseen (`freed_unseen`), not a lost event.
    duty_cycled: bool,
    freed_unseen: u64,
    kernel_unmatched_frees: u64,
    faults: BTreeMap<(u32, Option<StackIndex>), u64>,
    released: BTreeMap<(u32, Option<StackIndex>), u64>,
    cuda_calls: CudaCalls,
    /// `record --phase`: frees by (class, allocated-in, freed-in thread phase): bytes and
    /// blocks. Counted only when phases are (`count_phase_frees`).
    phase_frees: Option<BTreeMap<PhaseFree, (u64, u64)>>,
}

/// A cell of the phase free matrix: (class, allocated-in phase, freed-in phase).
pub type PhaseFree = (Class, PhaseId, PhaseId);
/// `PhaseFree` with the phases by name.
pub type PhaseFreeNamed<'a> = (Class, &'a str, &'a str);

impl Default for Ledger {
    fn default() -> Self {
        Ledger {
            live: LiveBlocks::default(),
            cells: Vec::new(),
            cell_phases: Vec::new(),
            cell_index: HashMap::new(),
            phases: vec![PHASE_NONE.to_string()],
            dirty: Vec::new(),
            dirty_flag: Vec::new(),
            totals: BTreeMap::new(),
            failures: HashMap::new(),
            unmatched_frees: 0,
            missed_frees: 0,
            duty_cycled: false,
            freed_unseen: 0,
            kernel_unmatched_frees: 0,
            faults: BTreeMap::new(),
            released: BTreeMap::new(),
            cuda_calls: BTreeMap::new(),
            phase_frees: None,
        }
    }
}

impl Ledger {
    pub fn new() -> Ledger {
        Ledger::default()
    }

    /// Declares a class as traced, so that its totals are reported (as zeros) even when nothing
    /// of it was seen.
    pub fn track(&mut self, class: Class) {
        self.totals.entry(class).or_default();
    }

    /// Phase rules are given: frees are counted by the allocating and the freeing thread's
    /// phase.
    pub fn count_phase_frees(&mut self) {
        self.phase_frees.get_or_insert_default();
    }

    /// Frees by (class, allocated-in, freed-in phase) so far, phases by name: (bytes, blocks).
    pub fn phase_frees(&self) -> Vec<(PhaseFreeNamed<'_>, (u64, u64))> {
        let name = |id: PhaseId| self.phases[id as usize].as_str();
        (self.phase_frees.iter().flatten())
            .map(|(&(class, a, f), &n)| ((class, name(a), name(f)), n))
            .collect()
    }

    /// The name of phase `id`.
    pub fn phase_name(&self, id: PhaseId) -> &str {
        self.phases
            .get(id as usize)
            .map_or(PHASE_NONE, String::as_str)
    }

    /// The id of a phase name, interning it on first use.
    pub fn phase(&mut self, name: &str) -> PhaseId {
        match self.phases.iter().position(|p| p == name) {
            Some(i) => i as PhaseId,
            None => {
                self.phases.push(name.to_string());
                (self.phases.len() - 1) as PhaseId
            }
        }
    }

    fn cell(&mut self, at: CellRef) -> u32 {
        if let Some(&i) = self.cell_index.get(&at) {
            return i;
        }
        let i = self.cells.len() as u32;
        let key = CellKey {
            class: at.class,
            pid: at.pid,
            phase: self.phases[at.phase as usize].clone(),
            stack: at.stack,
        };
        self.cells.push((key, StackCounters::default()));
        self.cell_phases.push(at.thread_phase);
        self.dirty_flag.push(false);
        self.cell_index.insert(at, i);
        i
    }

    fn mark_dirty(&mut self, cell: u32) {
        if !self.dirty_flag[cell as usize] {
            self.dirty_flag[cell as usize] = true;
            self.dirty.push(cell);
        }
    }

    /// Adds `bytes` to a cell; `new_block` also counts one more live block (an allocation or a
    /// mapping call, as opposed to the growth of an existing one). Returns the cell's index, which
    /// layers keep to give the bytes back with `debit`.
    pub fn credit(&mut self, at: CellRef, bytes: u64, new_block: bool) -> u32 {
        let cell = self.cell(at);
        let n = u64::from(new_block);
        let counters = &mut self.cells[cell as usize].1;
        counters.live_bytes += bytes;
        counters.live_count += n;
        counters.allocated_bytes += bytes;
        counters.allocated_count += n;
        let totals = self.totals.entry(at.class).or_default();
        totals.live_bytes += bytes;
        totals.live_count += n;
        totals.allocated_bytes += bytes;
        totals.allocated_count += n;
        totals.peak_bytes = totals.peak_bytes.max(totals.live_bytes);
        self.mark_dirty(cell);
        cell
    }

    /// Adds `bytes` to a cell that already counts the block (a mapping's pages made accessible).
    pub fn credit_existing(&mut self, cell: u32, bytes: u64) {
        let class = self.cells[cell as usize].0.class;
        let counters = &mut self.cells[cell as usize].1;
        counters.live_bytes += bytes;
        counters.allocated_bytes += bytes;
        let totals = self.totals.entry(class).or_default();
        totals.live_bytes += bytes;
        totals.allocated_bytes += bytes;
        totals.peak_bytes = totals.peak_bytes.max(totals.live_bytes);
        self.mark_dirty(cell);
    }

    /// Takes `bytes` back from a cell; `block_gone` also retires one live block.
    pub fn debit(&mut self, cell: u32, bytes: u64, block_gone: bool) {
        let n = u64::from(block_gone);
        let (key, counters) = &mut self.cells[cell as usize];
        counters.live_bytes -= bytes;
        counters.live_count -= n;
        counters.freed_bytes += bytes;
        counters.freed_count += n;
        let totals = self.totals.entry(key.class).or_default();
        totals.live_bytes -= bytes;
        totals.live_count -= n;
        totals.freed_count += n;
        self.mark_dirty(cell);
    }

    /// What another layer counted for a cell's blocks (the kernel's heap ledger, `kernel_heap`):
    /// `delta` allocated and freed since the last time, applied as one change of its live figures.
    pub fn apply_counts(&mut self, cell: u32, delta: &StackTotals) {
        if *delta == StackTotals::default() {
            return;
        }
        let (key, counters) = &mut self.cells[cell as usize];
        counters.live_bytes = (counters.live_bytes + delta.allocated_bytes) - delta.freed_bytes;
        counters.live_count = (counters.live_count + delta.allocated_count) - delta.freed_count;
        counters.allocated_bytes += delta.allocated_bytes;
        counters.allocated_count += delta.allocated_count;
        counters.freed_bytes += delta.freed_bytes;
        counters.freed_count += delta.freed_count;
        let totals = self.totals.entry(key.class).or_default();
        totals.live_bytes = (totals.live_bytes + delta.allocated_bytes) - delta.freed_bytes;
        totals.live_count = (totals.live_count + delta.allocated_count) - delta.freed_count;
        totals.allocated_bytes += delta.allocated_bytes;
        totals.allocated_count += delta.allocated_count;
        totals.freed_count += delta.freed_count;
        totals.peak_bytes = totals.peak_bytes.max(totals.live_bytes);
        self.mark_dirty(cell);
    }

    /// The peak of `class` as a layer that saw every call counted it (the kernel's heap
    /// ledger).
    pub fn set_peak(&mut self, class: Class, bytes: u64) {
        self.totals.entry(class).or_default().peak_bytes = bytes;
    }

    /// The cell of `at`, made if new: where a layer that counts blocks elsewhere puts them.
    pub fn cell_of(&mut self, at: CellRef) -> u32 {
        self.cell(at)
    }

    /// A successful allocation of `size` bytes at `addr` in process `pid`.
    pub fn alloc(&mut self, pid: u32, addr: u64, size: u64, at: CellRef) {
        let cell = self.credit(at, size, true);
        if let Some(old) = self.live.insert(pid, addr, LiveBlock { size, cell }) {
            // The free of the block that lived here was lost (dropped event), or made while a
            // duty-cycled heap's probes were off.
            if self.duty_cycled {
                self.freed_unseen += 1;
            } else {
                self.missed_frees += 1;
            }
            self.debit(old.cell, old.size, true);
        }
    }

    /// The heap probes are attached in windows: frees are seen only inside them.
    pub fn set_duty_cycled(&mut self) {
        self.duty_cycled = true;
    }

    /// Whether the heap probes are attached in windows.
    pub fn duty_cycled(&self) -> bool {
        self.duty_cycled
    }

    /// Unmatched frees the kernel's heap ledger counted itself (a running total).
    pub fn set_kernel_unmatched_frees(&mut self, frees: u64) {
        self.kernel_unmatched_frees = frees;
    }

    /// Duty-cycled heap: blocks found freed while the probes were off.
    pub fn freed_unseen(&self) -> u64 {
        self.freed_unseen
    }

    /// The process replaced its image (exec): its blocks are gone with the old address space.
    pub fn forget_process(&mut self, pid: u32) {
        for block in self.live.take_pid(pid) {
            self.debit(block.cell, block.size, true);
        }
    }

    /// A free of `addr` in process `pid`, in no phase. Returns false for an unmatched free.
    pub fn free(&mut self, pid: u32, addr: u64) -> bool {
        self.free_in(pid, addr, 0)
    }

    /// A free of `addr` in process `pid` made in phase `freed_in`. Returns false for an
    /// unmatched free.
    pub fn free_in(&mut self, pid: u32, addr: u64, freed_in: PhaseId) -> bool {
        match self.live.remove(pid, addr) {
            Some(block) => {
                if let Some(frees) = self.phase_frees.as_mut() {
                    let (key, _) = &self.cells[block.cell as usize];
                    let allocated_in = self.cell_phases[block.cell as usize];
                    let n = frees
                        .entry((key.class, allocated_in, freed_in))
                        .or_default();
                    n.0 += block.size;
                    n.1 += 1;
                }
                self.debit(block.cell, block.size, true);
                true
            }
            None => {
                self.unmatched_frees += 1;
                false
            }
        }
    }

    /// A successful realloc: `old` (may be 0) is replaced by `addr` of `size` bytes (the old
    /// block freed in the realloc's phase).
    pub fn realloc(&mut self, pid: u32, old: u64, addr: u64, size: u64, at: CellRef) {
        if old != 0 {
            self.free_in(pid, old, at.thread_phase);
        }
        self.alloc(pid, addr, size, at);
    }

    /// A sampled page fault standing for `weight` faults at `stack` in `pid`.
    pub fn fault(&mut self, pid: u32, stack: Option<StackIndex>, weight: u64) {
        *self.faults.entry((pid, stack)).or_default() += weight;
    }

    /// `bytes` released with madvise at `stack` in `pid`.
    pub fn released(&mut self, pid: u32, stack: Option<StackIndex>, bytes: u64) {
        *self.released.entry((pid, stack)).or_default() += bytes;
    }

    /// A non-allocating CUDA call of `function` at `stack` in `pid`, failed or not.
    pub fn cuda_call(&mut self, pid: u32, function: &str, stack: Option<StackIndex>, ok: bool) {
        let counts = self
            .cuda_calls
            .entry((pid, function.to_string(), stack))
            .or_default();
        counts.calls += 1;
        counts.failed += u64::from(!ok);
    }

    /// A failed allocation call.
    pub fn failure(&mut self, key: FailureKey) {
        *self.failures.entry(key).or_default() += 1;
    }

    /// The cells of the classes `which` selects with live bytes, and those bytes.
    pub fn live_cells(&self, which: impl Fn(Class) -> bool) -> Vec<(CellKey, u64)> {
        (self.cells.iter())
            .filter(|(k, c)| c.live_bytes > 0 && which(k.class))
            .map(|(k, c)| (k.clone(), c.live_bytes))
            .collect()
    }

    /// Live bytes of process `pid` in the classes `which` selects.
    pub fn live_of(&self, pid: u32, which: impl Fn(Class) -> bool) -> u64 {
        self.cells
            .iter()
            .filter(|(k, _)| k.pid == pid && which(k.class))
            .map(|(_, c)| c.live_bytes)
            .sum()
    }

    /// The size of the block live at `addr` in `pid`, if one is.
    pub fn block_size(&self, pid: u32, addr: u64) -> Option<u64> {
        self.live.get(pid, addr)
    }

    /// Number of blocks live now.
    pub fn live_blocks(&self) -> usize {
        self.live.len
    }

    pub fn totals(&self, class: Class) -> ClassTotals {
        self.totals.get(&class).copied().unwrap_or_default()
    }

    /// Live figures of the cells that changed since the last call, stamped with `t_s`.
    pub fn take_series(&mut self, t_s: u64) -> Vec<SeriesPoint> {
        let dirty = std::mem::take(&mut self.dirty);
        dirty
            .into_iter()
            .map(|cell| {
                self.dirty_flag[cell as usize] = false;
                let (key, counters) = &self.cells[cell as usize];
                SeriesPoint {
                    t_s,
                    key: key.clone(),
                    live_bytes: counters.live_bytes,
                    live_count: counters.live_count,
                }
            })
            .collect()
    }

    /// The full state; `lost` holds the drop counters gathered outside the ledger.
    pub fn state(&self, lost: &BTreeMap<String, u64>) -> LedgerState {
        let mut lost_events = lost.clone();
        if self.missed_frees > 0 {
            *lost_events.entry(MISSED_FREE.to_string()).or_default() += self.missed_frees;
        }
        LedgerState {
            totals: self.totals.clone(),
            cells: self.cells.iter().cloned().collect(),
            failures: self.failures.iter().map(|(k, v)| (k.clone(), *v)).collect(),
            unmatched_frees: self.unmatched_frees + self.kernel_unmatched_frees,
            faults: self.faults.clone(),
            released: self.released.clone(),
            cuda_calls: self.cuda_calls.clone(),
            lost_events,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(stack: u32) -> CellRef {
        CellRef::new(1, Class::Heap, Some(stack))
    }

    fn cell(l: &Ledger, stack: u32) -> StackCounters {
        let key = CellKey {
            class: Class::Heap,
            pid: 1,
            phase: PHASE_NONE.into(),
            stack: Some(stack),
        };
        l.state(&BTreeMap::new()).cells[&key]
    }

    #[test]
    fn alloc_and_free_balance_to_zero() {
        let mut l = Ledger::new();
        for i in 0..100 {
            l.alloc(1, 0x1000 + i * 64, 48, key(0));
        }
        for i in 0..100 {
            assert!(l.free(1, 0x1000 + i * 64));
        }
        let t = l.totals(Class::Heap);
        assert_eq!((t.live_bytes, t.live_count), (0, 0));
        assert_eq!(
            (t.allocated_bytes, t.allocated_count, t.freed_count),
            (4800, 100, 100)
        );
        assert_eq!(t.peak_bytes, 4800);
        assert_eq!(l.live_blocks(), 0);
    }

    #[test]
    fn realloc_moves_bytes_between_stacks() {
        let mut l = Ledger::new();
        l.alloc(1, 0xa0, 100, key(0));
        l.realloc(1, 0xa0, 0xb0, 300, key(1)); // moved
        l.realloc(1, 0xb0, 0xb0, 200, key(1)); // in place, shrunk
        assert_eq!(cell(&l, 0).live_bytes, 0);
        assert_eq!(cell(&l, 1).live_bytes, 200);
        assert_eq!(cell(&l, 1).live_count, 1);
        assert_eq!(cell(&l, 1).allocated_count, 2);
        let t = l.totals(Class::Heap);
        assert_eq!((t.live_bytes, t.live_count, t.peak_bytes), (200, 1, 300));
    }

    #[test]
    fn realloc_of_unknown_block_counts_unmatched() {
        let mut l = Ledger::new();
        l.realloc(1, 0xdead, 0xb0, 64, key(0));
        let s = l.state(&BTreeMap::new());
        assert_eq!(s.unmatched_frees, 1);
        assert_eq!(s.totals[&Class::Heap].live_bytes, 64);
    }

    #[test]
    fn unmatched_free_changes_no_total() {
        let mut l = Ledger::new();
        l.alloc(1, 0x10, 8, key(0));
        assert!(!l.free(1, 0x20));
        assert!(!l.free(2, 0x10)); // same address, other process
        let s = l.state(&BTreeMap::new());
        assert_eq!(s.unmatched_frees, 2);
        assert_eq!(s.totals[&Class::Heap].live_bytes, 8);
    }

    #[test]
    fn reused_live_address_retires_old_block_as_missed_free() {
        let mut l = Ledger::new();
        l.alloc(1, 0x10, 8, key(0));
        l.alloc(1, 0x10, 16, key(1));
        let s = l.state(&BTreeMap::new());
        assert_eq!(s.totals[&Class::Heap].live_bytes, 16);
        assert_eq!(s.lost_events[MISSED_FREE], 1);
        assert_eq!(cell(&l, 0).live_count, 0);
    }

    #[test]
    fn series_reports_changed_cells_once() {
        let mut l = Ledger::new();
        l.alloc(1, 0x10, 8, key(0));
        l.alloc(1, 0x20, 8, key(0));
        l.alloc(1, 0x30, 8, key(1));
        let s = l.take_series(1);
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].live_bytes, 16);
        assert!(l.take_series(2).is_empty());
        l.free(1, 0x10);
        let s = l.take_series(3);
        assert_eq!((s.len(), s[0].live_bytes, s[0].t_s), (1, 8, 3));
    }

    #[test]
    fn huge_blocks_and_other_processes_are_kept_apart() {
        let mut l = Ledger::new();
        l.alloc(1, 0x10, 1 << 45, key(0)); // 32 TiB: side table
        l.alloc(2, 0x10, 8, key(0)); // same address, other process
        assert_eq!(l.live_blocks(), 2);
        assert!(l.free(1, 0x10));
        assert_eq!(l.totals(Class::Heap).live_bytes, 8);
        assert!(l.free(2, 0x10));
        assert_eq!(l.live_blocks(), 0);
        assert_eq!(l.totals(Class::Heap).live_bytes, 0);
    }

    #[test]
    fn failures_group_by_key() {
        let mut l = Ledger::new();
        let f = FailureKey {
            class: Class::Heap,
            pid: 1,
            function: "malloc".into(),
            size: 1 << 50,
            error: "ENOMEM".into(),
            stack: Some(3),
        };
        l.failure(f.clone());
        l.failure(f.clone());
        let s = l.state(&BTreeMap::new());
        assert_eq!(s.failures[&f], 2);
        assert!(s.totals.is_empty());
    }
}
