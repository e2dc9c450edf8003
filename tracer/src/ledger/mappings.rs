//! The mapping layer: an interval ledger of each process's memory mappings, fed by the memory
//! syscalls (mmap, munmap, mremap, mprotect, brk) and credited to the ledger's cells.
//!
//! Rules (docs/accounting.md, "Mappings"):
//! - a new mapping's class comes from its mmap flags (`mmap_class`): stacks, shared memory
//!   (anonymous shared, /dev/shm files, memfds), files, else anonymous `mmap`;
//! - a mapping's live bytes are its accessible (not PROT_NONE) pages; a reservation counts nothing
//!   until mprotect opens part of it, which then counts in the reservation's own cell;
//! - munmap removes exactly the unmapped pages; a mapping's block count drops when none of its
//!   pages remain (a mapping split in two by a middle munmap is still one block);
//! - MAP_FIXED over existing mappings first removes the overlapped pages from their cells;
//! - mremap removes the old range and counts the whole new range at the mremap's stack, in the
//!   class of the mapping it moved;
//! - program-break growth counts page-aligned bytes in class `heap`, shrinking gives the top back;
//! - mappings that existed before attach are unknown: unmapping them changes nothing;
//! - a mapping made inside a hooked allocator call (heap tracing on) is allocator arena: tracked
//!   here so that unmaps and remaps stay exact, but credited to no cell, since class `heap`
//!   already counts its bytes block by block.

use std::{collections::BTreeMap, path::Path};

use rustc_hash::FxHashMap;

use crate::{
    ledger::{CellRef, Ledger},
    model::Class,
};

pub use crate::model::PAGE;

pub fn page_up(x: u64) -> u64 {
    x.saturating_add(PAGE - 1) & !(PAGE - 1)
}

const MAP_SHARED: u64 = 0x01;
const MAP_ANONYMOUS: u64 = 0x20;
const MAP_STACK: u64 = 0x20000;

/// The class of a new mapping from its mmap `flags` and descriptor `fd`. `file` says what the
/// mapped file is (asked only for a shared file mapping): /dev/shm files and memfds are shared
/// memory, not files.
pub fn mmap_class<P: AsRef<Path>>(flags: u64, fd: i32, file: impl FnOnce() -> Option<P>) -> Class {
    let shared = flags & MAP_SHARED != 0;
    if flags & MAP_STACK != 0 {
        Class::ThreadStack
    } else if flags & MAP_ANONYMOUS != 0 || fd < 0 {
        if shared {
            Class::MmapShared
        } else {
            Class::Mmap
        }
    } else if shared && file().is_some_and(|f| is_shared_memory_file(f.as_ref())) {
        Class::MmapShared
    } else {
        Class::MmapFile
    }
}

/// Whether a mapped file is shared memory: a POSIX shared-memory object or a memfd.
fn is_shared_memory_file(path: &Path) -> bool {
    let path = path.to_string_lossy();
    path.starts_with("/dev/shm/") || path.starts_with("/memfd:")
}

/// One contiguous piece of a mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Piece {
    end: u64,
    /// Whether the pages are accessible (count as live).
    accessible: bool,
    /// Index of the mapping (`Origin`) this piece belongs to.
    origin: u32,
}

/// A mapping call: its cell (none for allocator arena) and how many pieces of it remain.
#[derive(Clone, Copy, Debug)]
struct Origin {
    cell: Option<u32>,
    class: Class,
    pieces: u32,
}

#[derive(Default)]
struct Space {
    /// Pieces by start address; they never overlap.
    pieces: BTreeMap<u64, Piece>,
    /// The program break as last seen (page-aligned), and the origins of its growth, in order.
    brk: Option<u64>,
    brk_origins: Vec<(u64, u32)>,
}

#[derive(Default)]
pub struct MappingLedger {
    spaces: FxHashMap<u32, Space>,
    origins: Vec<Origin>,
    /// Origins whose last piece is gone, for reuse.
    free_origins: Vec<u32>,
}

impl MappingLedger {
    pub fn new() -> MappingLedger {
        MappingLedger::default()
    }

    fn new_origin(&mut self, origin: Origin) -> u32 {
        match self.free_origins.pop() {
            Some(i) => {
                self.origins[i as usize] = origin;
                i
            }
            None => {
                self.origins.push(origin);
                (self.origins.len() - 1) as u32
            }
        }
    }

    /// Sets the program break known at attach (the end of `[heap]`), so later brk calls count
    /// only their growth.
    pub fn set_initial_brk(&mut self, pid: u32, brk: u64) {
        self.spaces.entry(pid).or_default().brk = Some(page_up(brk));
    }

    /// Removes `[start, end)` from `pid`'s pieces; returns the removed parts (start, piece) after
    /// splitting the pieces that straddle the bounds.
    fn carve(&mut self, pid: u32, start: u64, end: u64) -> Vec<(u64, Piece)> {
        let Some(space) = self.spaces.get_mut(&pid) else {
            return Vec::new();
        };
        // The piece that starts before `start` may reach into the range.
        let first = space
            .pieces
            .range(..start)
            .next_back()
            .map(|(&s, _)| s)
            .unwrap_or(start);
        let starts: Vec<u64> = space.pieces.range(first..end).map(|(&s, _)| s).collect();
        let mut removed = Vec::new();
        for s in starts {
            let piece = space.pieces.remove(&s).expect("listed piece");
            if piece.end <= start {
                space.pieces.insert(s, piece);
                continue;
            }
            if s < start {
                space.pieces.insert(
                    s,
                    Piece {
                        end: start,
                        ..piece
                    },
                );
                self.origins[piece.origin as usize].pieces += 1;
            }
            if piece.end > end {
                space.pieces.insert(end, piece);
                self.origins[piece.origin as usize].pieces += 1;
            }
            removed.push((
                s.max(start),
                Piece {
                    end: piece.end.min(end),
                    ..piece
                },
            ));
        }
        removed
    }

    /// Gives back the bytes of removed pieces; retires origins left without pieces.
    fn release(&mut self, ledger: &mut Ledger, removed: Vec<(u64, Piece)>) {
        for (s, piece) in removed {
            let origin = &mut self.origins[piece.origin as usize];
            origin.pieces -= 1;
            let gone = origin.pieces == 0;
            let bytes = if piece.accessible { piece.end - s } else { 0 };
            if let Some(cell) = origin.cell {
                ledger.debit(cell, bytes, gone);
            }
            if gone {
                self.free_origins.push(piece.origin);
            }
        }
    }

    /// A new mapping of `len` bytes at `addr` (MAP_FIXED semantics: replaces what was there).
    /// `at: None` tracks it without counting it (allocator arena).
    pub fn map(
        &mut self,
        ledger: &mut Ledger,
        pid: u32,
        (addr, len): (u64, u64),
        accessible: bool,
        class: Class,
        at: Option<CellRef>,
    ) {
        let end = addr.saturating_add(page_up(len));
        if end <= addr {
            return;
        }
        let removed = self.carve(pid, addr, end);
        self.release(ledger, removed);
        let cell = at.map(|at| ledger.credit(at, if accessible { end - addr } else { 0 }, true));
        let origin = self.new_origin(Origin {
            cell,
            class,
            pieces: 1,
        });
        self.spaces.entry(pid).or_default().pieces.insert(
            addr,
            Piece {
                end,
                accessible,
                origin,
            },
        );
    }

    pub fn unmap(&mut self, ledger: &mut Ledger, pid: u32, addr: u64, len: u64) {
        let end = addr.saturating_add(page_up(len));
        let removed = self.carve(pid, addr, end);
        self.release(ledger, removed);
    }

    /// mprotect: pages becoming accessible start counting in their mapping's cell, pages
    /// becoming PROT_NONE stop.
    pub fn protect(
        &mut self,
        ledger: &mut Ledger,
        pid: u32,
        addr: u64,
        len: u64,
        accessible: bool,
    ) {
        let end = addr.saturating_add(page_up(len));
        let pieces = self.carve(pid, addr, end);
        let Some(space) = self.spaces.get_mut(&pid) else {
            return;
        };
        for (s, piece) in pieces {
            if piece.accessible != accessible
                && let Some(cell) = self.origins[piece.origin as usize].cell
            {
                let bytes = piece.end - s;
                if accessible {
                    ledger.credit_existing(cell, bytes);
                } else {
                    ledger.debit(cell, bytes, false);
                }
            }
            space.pieces.insert(
                s,
                Piece {
                    accessible,
                    ..piece
                },
            );
        }
    }

    /// The class of the mapping at `addr`, if known.
    pub fn class_at(&self, pid: u32, addr: u64) -> Option<Class> {
        let space = self.spaces.get(&pid)?;
        let (_, piece) = space.pieces.range(..=addr).next_back()?;
        (piece.end > addr).then(|| self.origins[piece.origin as usize].class)
    }

    /// mremap: the old range goes, the new one counts at the mremap's stack in the class of the
    /// mapping that moved (`fallback` when the old range was unknown). Returns that class.
    #[allow(clippy::too_many_arguments)]
    pub fn remap(
        &mut self,
        ledger: &mut Ledger,
        pid: u32,
        old: u64,
        old_len: u64,
        new: u64,
        new_len: u64,
        fallback: Class,
        at: impl FnOnce(Class) -> Option<CellRef>,
    ) -> Class {
        let class = self.class_at(pid, old).unwrap_or(fallback);
        // Arena stays arena: an allocator remapping its own block is still not a new mapping.
        let counted = self.origin_at(pid, old).is_none_or(|o| o.cell.is_some());
        let old_end = old.saturating_add(page_up(old_len));
        let removed = self.carve(pid, old, old_end);
        let accessible = removed.first().is_none_or(|(_, p)| p.accessible);
        self.release(ledger, removed);
        let at = if counted { at(class) } else { None };
        self.map(ledger, pid, (new, new_len), accessible, class, at);
        class
    }

    fn origin_at(&self, pid: u32, addr: u64) -> Option<Origin> {
        let space = self.spaces.get(&pid)?;
        let (_, piece) = space.pieces.range(..=addr).next_back()?;
        (piece.end > addr).then(|| self.origins[piece.origin as usize])
    }

    /// brk returned `new_brk`: growth is credited at `at` (none: allocator arena), shrinking
    /// gives back the most recent growth first.
    pub fn brk(&mut self, ledger: &mut Ledger, pid: u32, new_brk: u64, at: Option<CellRef>) {
        let new_brk = page_up(new_brk);
        let space = self.spaces.entry(pid).or_default();
        let Some(old) = space.brk.replace(new_brk) else {
            return;
        };
        if new_brk > old {
            let cell = at.map(|at| ledger.credit(at, new_brk - old, true));
            let origin = self.new_origin(Origin {
                cell,
                class: Class::Heap,
                pieces: 1,
            });
            self.spaces
                .get_mut(&pid)
                .expect("space")
                .brk_origins
                .push((new_brk - old, origin));
        } else {
            let mut to_give = old - new_brk;
            while to_give > 0 {
                let space = self.spaces.get_mut(&pid).expect("space");
                let Some((bytes, origin)) = space.brk_origins.pop() else {
                    break;
                };
                let take = bytes.min(to_give);
                to_give -= take;
                let cell = self.origins[origin as usize].cell;
                let gone = take == bytes;
                if gone {
                    self.free_origins.push(origin);
                } else {
                    self.spaces
                        .get_mut(&pid)
                        .expect("space")
                        .brk_origins
                        .push((bytes - take, origin));
                }
                if let Some(cell) = cell {
                    ledger.debit(cell, take, gone);
                }
            }
        }
    }

    /// A forked child starts with its parent's program break (its mappings are copies, unknown
    /// to the ledger: unmapping them changes nothing).
    pub fn fork(&mut self, parent: u32, child: u32) {
        let brk = self.spaces.get(&parent).and_then(|s| s.brk);
        self.spaces.entry(child).or_default().brk = brk;
    }

    /// The process replaced its image (exec): every mapping and the break go with it.
    pub fn forget_process(&mut self, ledger: &mut Ledger, pid: u32) {
        let Some(space) = self.spaces.remove(&pid) else {
            return;
        };
        let pieces: Vec<(u64, Piece)> = space.pieces.into_iter().collect();
        self.release(ledger, pieces);
        for (bytes, origin) in space.brk_origins {
            if let Some(cell) = self.origins[origin as usize].cell {
                ledger.debit(cell, bytes, true);
            }
            self.free_origins.push(origin);
        }
    }

    /// Accessible bytes of `pid`'s allocator arena: mappings and brk growth made inside allocator
    /// calls, which no cell counts (for the RSS reconciliation).
    pub fn arena_bytes(&self, pid: u32) -> u64 {
        let Some(space) = self.spaces.get(&pid) else {
            return 0;
        };
        let uncounted = |origin: u32| self.origins[origin as usize].cell.is_none();
        let mapped: u64 = space
            .pieces
            .iter()
            .filter(|(_, p)| p.accessible && uncounted(p.origin))
            .map(|(s, p)| p.end - s)
            .sum();
        let brk: u64 = space
            .brk_origins
            .iter()
            .filter(|(_, o)| uncounted(*o))
            .map(|(b, _)| b)
            .sum();
        mapped + brk
    }

    /// Resident bytes of `pid`'s traced mappings, from its VMAs' `(start, end, rss)`: a VMA's
    /// resident bytes are shared among the traced pieces inside it in proportion to their size
    /// (the kernel merges adjacent mappings into one VMA). Returns (counted, arena): pieces
    /// credited to a cell of class mmap, thread-stack or python-arena, and allocator arena.
    pub fn resident(&self, pid: u32, vmas: &[(u64, u64, u64)]) -> (u64, u64) {
        let Some(space) = self.spaces.get(&pid) else {
            return (0, 0);
        };
        let share = |rss: u64, overlap: u64, len: u64| {
            (u128::from(rss) * u128::from(overlap) / u128::from(len)) as u64
        };
        // The break's traced growth that is allocator arena: the top of [heap].
        let brk_arena: u64 = space
            .brk_origins
            .iter()
            .filter(|(_, o)| self.origins[*o as usize].cell.is_none())
            .map(|(b, _)| b)
            .sum();
        let brk_range = space.brk.map(|top| (top.saturating_sub(brk_arena), top));
        let (mut counted, mut arena) = (0u64, 0u64);
        for &(start, end, rss) in vmas {
            if rss == 0 || end <= start {
                continue;
            }
            if let Some((lo, hi)) = brk_range {
                arena += share(rss, hi.min(end).saturating_sub(lo.max(start)), end - start);
            }
            let first = space
                .pieces
                .range(..start)
                .next_back()
                .map(|(&s, _)| s)
                .unwrap_or(start);
            for (&s, piece) in space.pieces.range(first..end) {
                let overlap = piece.end.min(end).saturating_sub(s.max(start));
                if overlap == 0 || !piece.accessible {
                    continue;
                }
                let part = share(rss, overlap, end - start);
                let origin = self.origins[piece.origin as usize];
                match origin.cell {
                    None => arena += part,
                    Some(_)
                        if matches!(
                            origin.class,
                            Class::Mmap | Class::ThreadStack | Class::PythonArena
                        ) =>
                    {
                        counted += part
                    }
                    Some(_) => {}
                }
            }
        }
        (counted, arena)
    }

    /// Live mapped pieces of a process (for tests and the RSS reconciliation).
    pub fn piece_count(&self, pid: u32) -> usize {
        self.spaces.get(&pid).map_or(0, |s| s.pieces.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{CellKey, PHASE_NONE, StackCounters};

    fn at(stack: u32) -> Option<CellRef> {
        Some(CellRef::new(1, Class::Mmap, Some(stack)))
    }

    #[test]
    fn classifies_mmaps_by_flags_and_file() {
        let no_file = || -> Option<&str> { panic!("the file is asked only for shared file maps") };
        let private_anon = MAP_ANONYMOUS | 0x02;
        assert_eq!(mmap_class(private_anon, -1, no_file), Class::Mmap);
        assert_eq!(mmap_class(0x02, -1, no_file), Class::Mmap);
        assert_eq!(
            mmap_class(MAP_ANONYMOUS | MAP_SHARED, -1, no_file),
            Class::MmapShared
        );
        assert_eq!(
            mmap_class(private_anon | MAP_STACK, -1, no_file),
            Class::ThreadStack
        );
        assert_eq!(mmap_class(0x02, 3, no_file), Class::MmapFile);
        let shared_file = |path: &'static str| mmap_class(MAP_SHARED, 3, || Some(path));
        assert_eq!(shared_file("/dev/shm/torch_123"), Class::MmapShared);
        assert_eq!(shared_file("/memfd:cuda (deleted)"), Class::MmapShared);
        assert_eq!(shared_file("/data/weights.bin"), Class::MmapFile);
        // A descriptor that cannot be read (the process is gone): a file.
        assert_eq!(mmap_class(MAP_SHARED, 3, || None::<&str>), Class::MmapFile);
    }

    fn cell(l: &Ledger, class: Class, stack: u32) -> StackCounters {
        let key = CellKey {
            class,
            pid: 1,
            phase: PHASE_NONE.into(),
            stack: Some(stack),
        };
        l.state(&Default::default())
            .cells
            .get(&key)
            .copied()
            .unwrap_or_default()
    }

    fn live(l: &Ledger, stack: u32) -> (u64, u64) {
        let c = cell(l, Class::Mmap, stack);
        (c.live_bytes, c.live_count)
    }

    #[test]
    fn middle_unmap_splits_without_losing_the_block() {
        let (mut l, mut m) = (Ledger::new(), MappingLedger::new());
        m.map(&mut l, 1, (0x10000, 4 * PAGE), true, Class::Mmap, at(0));
        m.unmap(&mut l, 1, 0x10000 + PAGE, PAGE);
        assert_eq!(live(&l, 0), (3 * PAGE, 1));
        assert_eq!(m.piece_count(1), 2);
        m.unmap(&mut l, 1, 0x10000, PAGE);
        assert_eq!(live(&l, 0), (2 * PAGE, 1));
        m.unmap(&mut l, 1, 0x10000 + 2 * PAGE, 2 * PAGE);
        assert_eq!(live(&l, 0), (0, 0));
        assert_eq!(l.totals(Class::Mmap).freed_count, 1);
    }

    #[test]
    fn fixed_mapping_replaces_the_overlap() {
        let (mut l, mut m) = (Ledger::new(), MappingLedger::new());
        m.map(&mut l, 1, (0x10000, 8 * PAGE), true, Class::Mmap, at(0));
        m.map(
            &mut l,
            1,
            (0x10000 + 2 * PAGE, 3 * PAGE),
            true,
            Class::Mmap,
            at(1),
        );
        assert_eq!(live(&l, 0), (5 * PAGE, 1));
        assert_eq!(live(&l, 1), (3 * PAGE, 1));
        assert_eq!(l.totals(Class::Mmap).live_bytes, 8 * PAGE);
    }

    #[test]
    fn remap_moves_the_whole_range_to_the_remap_stack() {
        let (mut l, mut m) = (Ledger::new(), MappingLedger::new());
        m.map(&mut l, 1, (0x10000, 2 * PAGE), true, Class::Mmap, at(0));
        let class = m.remap(
            &mut l,
            1,
            0x10000,
            2 * PAGE,
            0x80000,
            6 * PAGE,
            Class::Mmap,
            |c| Some(CellRef::new(1, c, Some(1))),
        );
        assert_eq!(class, Class::Mmap);
        assert_eq!(live(&l, 0), (0, 0));
        assert_eq!(live(&l, 1), (6 * PAGE, 1));
    }

    #[test]
    fn reservations_count_only_what_mprotect_opens() {
        let (mut l, mut m) = (Ledger::new(), MappingLedger::new());
        m.map(&mut l, 1, (0x100000, 16 * PAGE), false, Class::Mmap, at(0));
        assert_eq!(live(&l, 0), (0, 1));
        m.protect(&mut l, 1, 0x100000 + 4 * PAGE, 4 * PAGE, true);
        assert_eq!(live(&l, 0), (4 * PAGE, 1));
        m.protect(&mut l, 1, 0x100000 + 4 * PAGE, PAGE, false);
        assert_eq!(live(&l, 0), (3 * PAGE, 1));
        m.unmap(&mut l, 1, 0x100000, 16 * PAGE);
        assert_eq!(live(&l, 0), (0, 0));
    }

    #[test]
    fn huge_sparse_reservation_is_not_live() {
        let (mut l, mut m) = (Ledger::new(), MappingLedger::new());
        m.map(
            &mut l,
            1,
            (0x7000_0000_0000, 2 << 40),
            false,
            Class::Mmap,
            at(0),
        );
        assert_eq!(live(&l, 0), (0, 1));
    }

    #[test]
    fn unknown_ranges_change_nothing() {
        let (mut l, mut m) = (Ledger::new(), MappingLedger::new());
        m.unmap(&mut l, 1, 0x10000, PAGE);
        m.protect(&mut l, 1, 0x10000, PAGE, true);
        assert_eq!(l.totals(Class::Mmap).live_bytes, 0);
    }

    #[test]
    fn brk_growth_and_shrink() {
        let (mut l, mut m) = (Ledger::new(), MappingLedger::new());
        let heap = |s| Some(CellRef::new(1, Class::Heap, Some(s)));
        m.set_initial_brk(1, 0x5000_0123);
        m.brk(&mut l, 1, 0x5000_0123 + 16 * PAGE, heap(0));
        m.brk(&mut l, 1, 0x5000_0123 + 20 * PAGE, heap(1));
        assert_eq!(cell(&l, Class::Heap, 0).live_bytes, 16 * PAGE);
        assert_eq!(cell(&l, Class::Heap, 1).live_bytes, 4 * PAGE);
        m.brk(&mut l, 1, 0x5000_0123 + 10 * PAGE, heap(2));
        assert_eq!(cell(&l, Class::Heap, 1).live_bytes, 0);
        assert_eq!(cell(&l, Class::Heap, 0).live_bytes, 10 * PAGE);
        assert_eq!(l.totals(Class::Heap).live_bytes, 10 * PAGE);
    }

    #[test]
    fn allocator_arena_is_tracked_but_not_counted() {
        let (mut l, mut m) = (Ledger::new(), MappingLedger::new());
        m.map(&mut l, 1, (0x10000, 64 * PAGE), true, Class::Mmap, None);
        assert_eq!(l.totals(Class::Mmap).live_bytes, 0);
        // A later fixed mapping over the arena is counted; the arena's part just goes away.
        m.map(&mut l, 1, (0x10000, PAGE), true, Class::Mmap, at(0));
        assert_eq!(live(&l, 0), (PAGE, 1));
        m.unmap(&mut l, 1, 0x10000, 64 * PAGE);
        assert_eq!(l.totals(Class::Mmap).live_bytes, 0);
    }

    #[test]
    fn exec_forgets_the_old_image_and_fork_inherits_the_break() {
        let (mut l, mut m) = (Ledger::new(), MappingLedger::new());
        let heap = |s| Some(CellRef::new(1, Class::Heap, Some(s)));
        m.map(&mut l, 1, (0x10000, 4 * PAGE), true, Class::Mmap, at(0));
        m.set_initial_brk(1, 0x5000_0000);
        m.brk(&mut l, 1, 0x5000_0000 + 8 * PAGE, heap(1));
        m.fork(1, 2);
        // The child's first brk grows from the inherited break.
        m.brk(
            &mut l,
            2,
            0x5000_0000 + 10 * PAGE,
            Some(CellRef::new(2, Class::Heap, Some(2))),
        );
        assert_eq!(l.totals(Class::Heap).live_bytes, 8 * PAGE + 2 * PAGE);
        m.forget_process(&mut l, 1);
        assert_eq!(l.totals(Class::Mmap).live_bytes, 0);
        assert_eq!(
            l.totals(Class::Heap).live_bytes,
            2 * PAGE,
            "only the child's growth is left"
        );
        assert_eq!(m.piece_count(1), 0);
    }

    #[test]
    fn resident_bytes_are_shared_among_pieces_of_a_vma() {
        let (mut l, mut m) = (Ledger::new(), MappingLedger::new());
        // Two adjacent traced mappings the kernel merged into one VMA, and an arena piece.
        m.map(&mut l, 1, (0x10000, 4 * PAGE), true, Class::Mmap, at(0));
        m.map(
            &mut l,
            1,
            (0x10000 + 4 * PAGE, 4 * PAGE),
            true,
            Class::Mmap,
            at(1),
        );
        m.map(&mut l, 1, (0x100000, 2 * PAGE), true, Class::Mmap, None);
        let vmas = [
            (0x10000, 0x10000 + 8 * PAGE, 6 * PAGE),
            (0x100000, 0x100000 + 2 * PAGE, PAGE),
        ];
        assert_eq!(m.resident(1, &vmas), (6 * PAGE, PAGE));
        assert_eq!(m.resident(2, &vmas), (0, 0));
    }
}
