//! The PyTorch caching-allocator layer: what PyTorch's CUDA allocator does inside the device
//! memory the driver layer counts, from its own events (`DeviceCachingAllocator::record_trace`).
//!
//! Accounting rules (docs/accounting.md):
//! - The driver classes (`cuda`, `cuda-vmm`) stay the device truth: a segment's bytes are counted
//!   there, at the stack that called the driver. This layer splits the same bytes into two views
//!   that are never added to a device total: `torch`, the live tensor blocks at their requested
//!   size, charged to the stack that allocated each tensor; and `torch-cached`, the rest of each
//!   segment (free blocks and rounding), charged to the stack that grew the segment.
//! - A tensor is live from `ALLOC` to `FREE_REQUESTED`. Until `FREE_COMPLETED` (other streams
//!   still use it) its bytes are `pending`: in neither view, still not reusable. So for every
//!   device, `torch` + `torch-cached` + pending = reserved, to the byte, for the segments seen.
//! - Fragmentation: the free holes of each segment, the gaps between its blocks, each block taken
//!   at its size rounded up to 512 bytes (the allocator's smallest block); expandable segments'
//!   mapped ranges that touch are one span. `1 − largest hole / free in holes` near 1 means the
//!   free memory is in pieces too small for a large request.
//! - The `cudaMallocAsync` backend has no segments of its own: each tensor is a driver
//!   allocation from the device's CUDA memory pool, which the driver layer counts (`cuda` at the
//!   driver call's stack); here it is a `torch` block at the stack that called `mallocAsync`.
//!   What the CUDA pool keeps beyond its live blocks is the driver's (`gpu-untraced`).
//! - Sleeping memory: segment bytes unmapped at the driver (`cuMemUnmap`) while the allocator
//!   still holds the segment, as vLLM's sleep mode does (its `CuMemAllocator` releases the
//!   physical memory behind PyTorch's back and maps new memory at the same addresses on wake).
//!   Those bytes are named `sleeping` in the figures: held by PyTorch, backed by nothing, not a
//!   leak. The driver classes already count them as gone.

use std::collections::{BTreeMap, HashMap};

use tracer_common::{TorchEvent, torch_action};

use super::{CellRef, Ledger, PhaseId};
use crate::model::{AllocatorFigures, AllocatorOom, Class, StackIndex};

/// Where something was allocated: process, stack, pool, phase.
type Origin = (u32, Option<StackIndex>, [u64; 2], PhaseId);

/// The caching allocator's smallest block: every block size is a multiple of it.
const MIN_BLOCK: u64 = 512;

/// A segment (or, with expandable segments, a mapped range of one).
#[derive(Debug)]
struct Segment {
    size: u64,
    /// Bytes of blocks (live or pending) inside it.
    used: u64,
    /// Its `torch-cached` cell.
    cached_cell: u32,
    /// A mapped range of an expandable segment (`SEGMENT_MAP`).
    expandable: bool,
    /// Its pool ({0, 0}: the default pools).
    pool: [u64; 2],
    /// The segment it is (a piece of, after partial unmaps): its cell counts one live block for
    /// all its pieces.
    origin: u64,
}

#[derive(Debug)]
struct Block {
    size: u64,
    /// Its `torch` cell.
    cell: u32,
    /// Freed by its owner, still in use on another stream.
    pending: bool,
    /// The segments it lies in and its bytes in each (start address, bytes).
    parts: Vec<(u64, u64)>,
    pool: [u64; 2],
}

/// The allocator of one device in one process.
#[derive(Debug, Default)]
struct DeviceCache {
    /// Served by the `cudaMallocAsync` backend (no segments of its own).
    async_backend: bool,
    /// Segment ranges unmapped at the driver while the allocator holds them (start → end).
    sleeping: BTreeMap<u64, u64>,
    segments: BTreeMap<u64, Segment>,
    blocks: BTreeMap<u64, Block>,
    reserved: u64,
    allocated: u64,
    pending: u64,
    /// Live pieces of each segment (`Segment::origin`), and the next origin.
    pieces: HashMap<u64, u32>,
    next_origin: u64,
    /// Changed since the last sample.
    dirty: bool,
}

/// A block of the pinned host caching allocator (`HostBlock`).
#[derive(Debug)]
struct PinnedBlock {
    ptr: u64,
    size: u64,
    /// Its `torch-pinned-cached` cell: the stack that made it (the first seen to get it).
    cached_cell: u32,
    /// Its `torch-pinned` cell while a tensor holds it.
    live_cell: Option<u32>,
}

/// The pinned host caching allocator of one process: blocks by `HostBlock` address, and by the
/// memory they hold (what the driver frees).
#[derive(Debug, Default)]
struct PinnedCache {
    blocks: HashMap<u64, PinnedBlock>,
    by_ptr: HashMap<u64, u64>,
}

/// A `mallocAsync` call whose block is the driver allocation its thread makes next.
#[derive(Debug)]
struct AsyncCall {
    pid: u32,
    device: i32,
    size: u64,
    stack: Option<StackIndex>,
    phase: PhaseId,
}

/// The caching-allocator layer of every traced process.
#[derive(Default)]
pub struct TorchLayer {
    devices: BTreeMap<(u32, i32), DeviceCache>,
    /// `mallocAsync` calls in flight, by thread.
    async_calls: HashMap<u32, AsyncCall>,
    /// Pinned host caching allocators by process.
    pinned: HashMap<u32, PinnedCache>,
    /// OOMs since the last `take_ooms`.
    ooms: Vec<AllocatorOom>,
    /// Frees of blocks never seen allocated (attached after they were made).
    pub unmatched_frees: u64,
}

impl TorchLayer {
    pub fn new() -> TorchLayer {
        TorchLayer::default()
    }

    /// Applies one allocator event; `stack` is the allocator caller's (creating actions only).
    pub fn apply(&mut self, ledger: &mut Ledger, ev: &TorchEvent, stack: Option<StackIndex>) {
        self.apply_in(ledger, ev, stack, 0);
    }

    /// `apply` of an event made in `phase`: what it creates is in that phase.
    pub fn apply_in(
        &mut self,
        ledger: &mut Ledger,
        ev: &TorchEvent,
        stack: Option<StackIndex>,
        phase: PhaseId,
    ) {
        let pid = ev.tgid;
        match ev.action {
            torch_action::ASYNC_MALLOC => {
                let call = AsyncCall {
                    pid,
                    device: ev.device,
                    size: ev.size,
                    stack,
                    phase,
                };
                self.async_calls.insert(ev.tid, call);
                return;
            }
            torch_action::ASYNC_FREE => {
                let seen = self.free_async(ledger, pid, ev.addr);
                self.unmatched_frees += u64::from(!seen);
                return;
            }
            torch_action::PINNED_ALLOC => {
                let at = (pid, stack, phase);
                self.pinned.entry(pid).or_default().alloc(ledger, at, ev);
                return;
            }
            torch_action::PINNED_FREE => {
                let seen = self.pinned.entry(pid).or_default().release(ledger, ev);
                self.unmatched_frees += u64::from(!seen);
                return;
            }
            _ => {}
        }
        let dev = self.devices.entry((pid, ev.device)).or_default();
        dev.dirty = true;
        match ev.action {
            torch_action::SEGMENT_ALLOC | torch_action::SEGMENT_MAP => {
                let expandable = ev.action == torch_action::SEGMENT_MAP;
                let at = (pid, stack, ev.pool, phase);
                dev.add_segment(ledger, at, ev.addr, ev.size, expandable);
            }
            torch_action::SEGMENT_FREE | torch_action::SEGMENT_UNMAP => {
                dev.remove_range(ledger, ev.addr, ev.size);
            }
            torch_action::ALLOC => {
                dev.alloc(ledger, (pid, stack, ev.pool, phase), ev.addr, ev.size);
            }
            torch_action::FREE_REQUESTED => {
                let seen = dev.free_requested(ledger, ev.addr);
                self.unmatched_frees += u64::from(!seen);
            }
            torch_action::FREE_COMPLETED => dev.free_completed(ledger, ev.addr),
            torch_action::OOM => {
                let figures = dev.figures(pid, ev.device);
                self.ooms.push(AllocatorOom {
                    t_s: 0,
                    requested: ev.size,
                    device_free: ev.addr,
                    stack,
                    figures,
                });
            }
            _ => {}
        }
    }

    /// A driver allocation returned `addr` (`size` bytes) on thread `tid`: the block of the
    /// `mallocAsync` call the thread is in, if it is in one and asked for that size.
    pub fn driver_allocated(&mut self, ledger: &mut Ledger, tid: u32, addr: u64, size: u64) {
        let Some(call) = self.async_calls.remove(&tid) else {
            return;
        };
        if call.size != size {
            // Not the tensor (mallocAsync allocates it first): another call's.
            self.async_calls.insert(tid, call);
            return;
        }
        let dev = self.devices.entry((call.pid, call.device)).or_default();
        dev.async_backend = true;
        dev.dirty = true;
        dev.alloc(
            ledger,
            (call.pid, call.stack, [0, 0], call.phase),
            addr,
            size,
        );
    }

    /// The allocators of process `pid`, one per device.
    fn devices_of(&mut self, pid: u32) -> impl Iterator<Item = &mut DeviceCache> {
        (self.devices.range_mut((pid, i32::MIN)..=(pid, i32::MAX))).map(|(_, dev)| dev)
    }

    /// `freeAsync` of the tensor at `addr`; false if it was never seen allocated.
    fn free_async(&mut self, ledger: &mut Ledger, pid: u32, addr: u64) -> bool {
        for dev in self.devices_of(pid) {
            if dev.blocks.contains_key(&addr) {
                dev.dirty = true;
                dev.free_completed(ledger, addr);
                return true;
            }
        }
        false
    }

    /// The driver unmapped `[addr, addr + size)` in process `pid`: what of it the allocator
    /// holds as segment memory is sleeping.
    pub fn driver_unmapped(&mut self, pid: u32, addr: u64, size: u64) {
        for dev in self.devices_of(pid) {
            for start in dev.segments_overlapping(addr, size) {
                let seg_end = start + dev.segments[&start].size;
                let from = addr.max(start);
                let to = addr.saturating_add(size).min(seg_end);
                dev.dirty |= add_range(&mut dev.sleeping, from, to);
            }
        }
    }

    /// The driver freed (or unregistered) the host memory at `addr` in process `pid`: a cached
    /// pinned block there is gone.
    pub fn driver_freed(&mut self, ledger: &mut Ledger, pid: u32, addr: u64) {
        if let Some(cache) = self.pinned.get_mut(&pid) {
            cache.driver_freed(ledger, addr);
        }
    }

    /// Whether any process has a pinned host caching allocator (frees are looked at).
    pub fn has_pinned(&self) -> bool {
        !self.pinned.is_empty()
    }

    /// The driver mapped memory at `[addr, addr + size)` in process `pid`: it sleeps no more.
    pub fn driver_mapped(&mut self, pid: u32, addr: u64, size: u64) {
        for dev in self.devices_of(pid) {
            dev.dirty |= remove_range(&mut dev.sleeping, addr, addr.saturating_add(size));
        }
    }

    /// The figures of every device whose allocator changed since the last call.
    pub fn take_changed(&mut self) -> Vec<AllocatorFigures> {
        self.devices
            .iter_mut()
            .filter(|(_, d)| d.dirty)
            .map(|(&(pid, device), d)| {
                d.dirty = false;
                d.figures(pid, device)
            })
            .collect()
    }

    /// The figures of every device now.
    pub fn figures(&self) -> Vec<AllocatorFigures> {
        self.devices
            .iter()
            .map(|(&(pid, device), d)| d.figures(pid, device))
            .collect()
    }

    /// The OOMs since the last call, dated `t_s`.
    pub fn take_ooms(&mut self, t_s: u64) -> Vec<AllocatorOom> {
        let mut ooms = std::mem::take(&mut self.ooms);
        for oom in &mut ooms {
            oom.t_s = t_s;
        }
        ooms
    }

    /// The process replaced its image: its allocator is gone, and what the views held.
    pub fn forget_process(&mut self, ledger: &mut Ledger, pid: u32) {
        let gone: Vec<(u32, i32)> = self
            .devices
            .range((pid, i32::MIN)..=(pid, i32::MAX))
            .map(|(k, _)| *k)
            .collect();
        for key in gone {
            if let Some(dev) = self.devices.remove(&key) {
                dev.release_all(ledger);
            }
        }
        if let Some(cache) = self.pinned.remove(&pid) {
            cache.release_all(ledger);
        }
    }
}

impl PinnedCache {
    /// A tensor got the block in `ev` (`stream`: the `HostBlock*`) at `at` (process, stack).
    fn alloc(
        &mut self,
        ledger: &mut Ledger,
        at: (u32, Option<StackIndex>, PhaseId),
        ev: &TorchEvent,
    ) {
        let (pid, stack, phase) = at;
        let cell = |class| CellRef {
            phase,
            ..CellRef::new(pid, class, stack)
        };
        let (key, ptr, size) = (ev.stream, ev.addr, ev.size);
        if self
            .blocks
            .get(&key)
            .is_some_and(|b| b.ptr != ptr || b.size != size)
        {
            // The HostBlock was freed and its memory reused for another: the old one is gone.
            self.forget(ledger, key);
        }
        if !self.blocks.contains_key(&key) {
            // New (or made before attach): charged to the stack that first got it.
            self.insert(ledger, cell(Class::TorchPinnedCached), ev);
        }
        let Some(block) = self.blocks.get_mut(&key) else {
            return;
        };
        if let Some(cell) = block.live_cell.take() {
            // Its release was lost.
            ledger.debit(cell, size, true);
            ledger.credit_existing(block.cached_cell, size);
        }
        ledger.debit(block.cached_cell, size, false);
        let live = cell(Class::TorchPinned);
        block.live_cell = Some(ledger.credit(live, size, true));
    }

    /// The tensor holding the block in `ev` let it go: cached now (or once its CUDA events
    /// complete: either way no tensor holds it). False if the block was never seen; it is
    /// then known as cached from now on, charged to no stack.
    fn release(&mut self, ledger: &mut Ledger, ev: &TorchEvent) -> bool {
        let Some(block) = self.blocks.get_mut(&ev.stream) else {
            if ev.addr != 0 && ev.size != 0 {
                self.insert(
                    ledger,
                    CellRef::new(ev.tgid, Class::TorchPinnedCached, None),
                    ev,
                );
            }
            return false;
        };
        if let Some(cell) = block.live_cell.take() {
            ledger.debit(cell, block.size, true);
            ledger.credit_existing(block.cached_cell, block.size);
        }
        true
    }

    /// The block in `ev` (`stream`: the `HostBlock*`, `addr` its memory), cached, in `cell`.
    fn insert(&mut self, ledger: &mut Ledger, cell: CellRef, ev: &TorchEvent) {
        let block = PinnedBlock {
            ptr: ev.addr,
            size: ev.size,
            cached_cell: ledger.credit(cell, ev.size, true),
            live_cell: None,
        };
        self.by_ptr.insert(ev.addr, ev.stream);
        self.blocks.insert(ev.stream, block);
    }

    /// The driver freed the memory at `ptr`: the block holding it is gone.
    fn driver_freed(&mut self, ledger: &mut Ledger, ptr: u64) {
        if let Some(key) = self.by_ptr.get(&ptr).copied() {
            self.forget(ledger, key);
        }
    }

    fn forget(&mut self, ledger: &mut Ledger, key: u64) {
        let Some(block) = self.blocks.remove(&key) else {
            return;
        };
        self.by_ptr.remove(&block.ptr);
        Self::drop_block(ledger, &block);
    }

    fn drop_block(ledger: &mut Ledger, block: &PinnedBlock) {
        match block.live_cell {
            Some(cell) => {
                ledger.debit(cell, block.size, true);
                ledger.debit(block.cached_cell, 0, true);
            }
            None => ledger.debit(block.cached_cell, block.size, true),
        }
    }

    fn release_all(self, ledger: &mut Ledger) {
        for block in self.blocks.values() {
            Self::drop_block(ledger, block);
        }
    }
}

impl DeviceCache {
    /// A segment (or mapped range) of `size` bytes at `addr`, grown at `at` (process, stack,
    /// pool).
    fn add_segment(
        &mut self,
        ledger: &mut Ledger,
        at: Origin,
        addr: u64,
        size: u64,
        expandable: bool,
    ) {
        let (pid, stack, pool, phase) = at;
        // A segment already there had its release lost: it goes first.
        self.remove_range(ledger, addr, size);
        let at = CellRef {
            phase,
            ..CellRef::new(pid, Class::TorchCached, stack)
        };
        let cached_cell = ledger.credit(at, size, true);
        self.reserved += size;
        let origin = self.next_origin;
        self.next_origin += 1;
        self.pieces.insert(origin, 1);
        let mut segment = Segment {
            size,
            used: 0,
            cached_cell,
            expandable,
            pool,
            origin,
        };
        // Blocks already inside (a range mapped under a live block of an expandable segment).
        let end = addr.saturating_add(size);
        let inside: Vec<u64> = self.blocks.range(..end).map(|(a, _)| *a).collect();
        for a in inside {
            let block = self.blocks.get_mut(&a).expect("listed");
            let bytes = claimed((a, block.size), (addr, size), segment.used);
            if bytes > 0 {
                block.parts.push((addr, bytes));
                segment.used += bytes;
                ledger.debit(cached_cell, bytes, false);
            }
        }
        self.segments.insert(addr, segment);
    }

    /// The start addresses of the segments that overlap `[addr, addr + size)`.
    fn segments_overlapping(&self, addr: u64, size: u64) -> Vec<u64> {
        let end = addr.saturating_add(size);
        (self.segments.range(..end))
            .filter(|(s, seg)| s.saturating_add(seg.size) > addr)
            .map(|(s, _)| *s)
            .collect()
    }

    /// Releases the segments (or the parts of them) in `[addr, addr + size)`.
    fn remove_range(&mut self, ledger: &mut Ledger, addr: u64, size: u64) {
        let end = addr.saturating_add(size);
        remove_range(&mut self.sleeping, addr, end);
        for start in self.segments_overlapping(addr, size) {
            let seg = self.segments.remove(&start).expect("listed");
            let seg_end = start + seg.size;
            // What the release leaves of it (a partial unmap) stays, in the same cell.
            let keep: Vec<(u64, u64)> = [(start, addr.min(seg_end)), (end.max(start), seg_end)]
                .into_iter()
                .filter(|(k_start, k_end)| k_end > k_start)
                .collect();
            let gone = self.piece_count(seg.origin, keep.len() as u32) == 0;
            ledger.debit(seg.cached_cell, seg.size - seg.used, gone);
            self.reserved -= seg.size;
            for block in self.blocks.values_mut() {
                block.parts.retain(|(s, _)| *s != start);
            }
            for (k_start, k_end) in keep {
                self.keep_piece(ledger, k_start, k_end - k_start, &seg);
            }
        }
    }

    /// One piece of segment `origin` goes, `kept` new ones take its place; the pieces left.
    fn piece_count(&mut self, origin: u64, kept: u32) -> u32 {
        let left = self.pieces.get(&origin).map_or(0, |n| n - 1) + kept;
        if left == 0 {
            self.pieces.remove(&origin);
        } else {
            self.pieces.insert(origin, left);
        }
        left
    }

    /// Re-adds the piece `[start, start + size)` of segment `old`, whose rest was released: its
    /// used bytes recomputed from the blocks in it.
    fn keep_piece(&mut self, ledger: &mut Ledger, start: u64, size: u64, old: &Segment) {
        let end = start + size;
        let mut used = 0;
        for (&a, block) in self.blocks.range_mut(..end) {
            let bytes = claimed((a, block.size), (start, size), used);
            if bytes > 0 {
                block.parts.push((start, bytes));
                used += bytes;
            }
        }
        ledger.credit_existing(old.cached_cell, size - used);
        self.reserved += size;
        self.segments.insert(
            start,
            Segment {
                size,
                used,
                cached_cell: old.cached_cell,
                expandable: old.expandable,
                pool: old.pool,
                origin: old.origin,
            },
        );
    }

    /// A tensor block of `size` requested bytes at `addr`, allocated at `at`.
    fn alloc(&mut self, ledger: &mut Ledger, at: Origin, addr: u64, size: u64) {
        let (pid, stack, pool, phase) = at;
        if self.blocks.contains_key(&addr) {
            // Its release was lost.
            self.free_requested(ledger, addr);
            self.free_completed(ledger, addr);
        }
        let at = CellRef {
            phase,
            ..CellRef::new(pid, Class::Torch, stack)
        };
        let cell = ledger.credit(at, size, true);
        self.allocated += size;
        let mut parts = Vec::new();
        for start in self.segments_overlapping(addr, size) {
            let seg = self.segments.get_mut(&start).expect("listed");
            let bytes = claimed((addr, size), (start, seg.size), seg.used);
            if bytes > 0 {
                seg.used += bytes;
                ledger.debit(seg.cached_cell, bytes, false);
                parts.push((start, bytes));
            }
        }
        self.blocks.insert(
            addr,
            Block {
                size,
                cell,
                pending: false,
                parts,
                pool,
            },
        );
    }

    /// The owner freed the block at `addr`; false if it was never seen allocated.
    fn free_requested(&mut self, ledger: &mut Ledger, addr: u64) -> bool {
        let Some(block) = self.blocks.get_mut(&addr) else {
            return false;
        };
        if !block.pending {
            block.pending = true;
            ledger.debit(block.cell, block.size, true);
            self.allocated -= block.size;
            self.pending += block.size;
        }
        true
    }

    /// The block at `addr` is back in the cache.
    fn free_completed(&mut self, ledger: &mut Ledger, addr: u64) {
        if !self.blocks.get(&addr).is_some_and(|b| b.pending) {
            self.free_requested(ledger, addr);
        }
        let Some(block) = self.blocks.remove(&addr) else {
            return;
        };
        self.pending -= block.size;
        for (start, bytes) in block.parts {
            if let Some(seg) = self.segments.get_mut(&start) {
                seg.used -= bytes;
                ledger.credit_existing(seg.cached_cell, bytes);
            }
        }
    }

    fn release_all(self, ledger: &mut Ledger) {
        for block in self.blocks.values().filter(|b| !b.pending) {
            ledger.debit(block.cell, block.size, true);
        }
        let mut pieces = self.pieces;
        for seg in self.segments.values() {
            let left = pieces.entry(seg.origin).or_insert(1);
            *left -= 1;
            ledger.debit(seg.cached_cell, seg.size - seg.used, *left == 0);
        }
    }

    fn figures(&self, pid: u32, device: i32) -> AllocatorFigures {
        let (holes, hole_bytes, largest_hole) = self.holes();
        let private = |pool: &[u64; 2]| *pool != [0, 0];
        let mut pools: Vec<[u64; 2]> = (self.segments.values())
            .filter(|s| private(&s.pool))
            .map(|s| s.pool)
            .collect();
        pools.sort_unstable();
        pools.dedup();
        AllocatorFigures {
            pid,
            device,
            async_backend: self.async_backend,
            sleeping: self.sleeping.iter().map(|(s, e)| e - s).sum(),
            reserved: self.reserved,
            allocated: self.allocated,
            pending: self.pending,
            segments: self.segments.len() as u64,
            blocks: self.blocks.len() as u64,
            holes,
            hole_bytes,
            largest_hole,
            private_pools: pools.len() as u64,
            private_reserved: (self.segments.values())
                .filter(|s| private(&s.pool))
                .map(|s| s.size)
                .sum(),
            private_allocated: (self.blocks.values())
                .filter(|b| private(&b.pool) && !b.pending)
                .map(|b| b.size)
                .sum(),
        }
    }

    /// (count, bytes, largest) of the free holes: the gaps between blocks in each span of
    /// segment memory, blocks at their size rounded up to `MIN_BLOCK`.
    fn holes(&self) -> (u64, u64, u64) {
        let (mut count, mut bytes, mut largest) = (0, 0, 0);
        let mut gap = |len: u64| {
            if len > 0 {
                count += 1;
                bytes += len;
                largest = largest.max(len);
            }
        };
        for (start, end) in self.spans() {
            let mut at = start;
            for (&a, block) in self.blocks.range(start..end) {
                gap(a.saturating_sub(at));
                at = at.max(a.saturating_add(block.size.div_ceil(MIN_BLOCK) * MIN_BLOCK));
            }
            gap(end.saturating_sub(at));
        }
        (count, bytes, largest)
    }

    /// Segment memory as contiguous spans: each segment alone, except the mapped ranges of an
    /// expandable segment that touch, which are one.
    fn spans(&self) -> Vec<(u64, u64)> {
        let mut spans: Vec<(u64, u64, bool)> = Vec::new();
        for (&start, seg) in &self.segments {
            let end = start + seg.size;
            match spans.last_mut() {
                Some(last) if seg.expandable && last.2 && last.1 == start => last.1 = end,
                _ => spans.push((start, end, seg.expandable)),
            }
        }
        spans.into_iter().map(|(s, e, _)| (s, e)).collect()
    }
}

/// Adds `[start, end)` to a set of disjoint ranges (start → end), merging what touches;
/// whether the set changed.
fn add_range(ranges: &mut BTreeMap<u64, u64>, mut start: u64, mut end: u64) -> bool {
    if end <= start {
        return false;
    }
    let touching: Vec<(u64, u64)> = (ranges.range(..=end))
        .filter(|(_, e)| **e >= start)
        .map(|(s, e)| (*s, *e))
        .collect();
    if let [(s, e)] = touching[..]
        && s <= start
        && e >= end
    {
        return false;
    }
    for (s, e) in touching {
        ranges.remove(&s);
        start = start.min(s);
        end = end.max(e);
    }
    ranges.insert(start, end);
    true
}

/// Removes `[start, end)` from a set of disjoint ranges, splitting what it cuts; whether the set
/// changed.
fn remove_range(ranges: &mut BTreeMap<u64, u64>, start: u64, end: u64) -> bool {
    let cut: Vec<(u64, u64)> = (ranges.range(..end))
        .filter(|(_, e)| **e > start)
        .map(|(s, e)| (*s, *e))
        .collect();
    for &(s, e) in &cut {
        ranges.remove(&s);
        if s < start {
            ranges.insert(s, start);
        }
        if e > end {
            ranges.insert(end, e);
        }
    }
    !cut.is_empty()
}

/// The bytes of `block` that segment `segment` (of which `used` bytes are taken) holds for it:
/// their overlap, never more than the segment has left. (The events come from the target: blocks
/// that overlap each other must not take a segment past its size.)
fn claimed(block: (u64, u64), segment: (u64, u64), used: u64) -> u64 {
    overlap(block, segment).min(segment.1.saturating_sub(used))
}

/// Bytes the ranges `(start, len)` share.
fn overlap(a: (u64, u64), b: (u64, u64)) -> u64 {
    let start = a.0.max(b.0);
    let end = a.0.saturating_add(a.1).min(b.0.saturating_add(b.1));
    end.saturating_sub(start)
}

#[cfg(test)]
mod tests {
    use tracer_common::event_kind;

    use super::*;

    const MIB: u64 = 1 << 20;

    fn ev(action: u32, addr: u64, size: u64) -> TorchEvent {
        TorchEvent {
            kind: event_kind::TORCH,
            tgid: 7,
            action,
            device: 0,
            addr,
            size,
            stream: 1,
            pool: [0, 0],
            tid: 70,
            nframes: 0,
            stack_flags: 0,
            phase: 0,
            _pad: 0,
        }
    }

    struct Run {
        ledger: Ledger,
        torch: TorchLayer,
    }

    impl Run {
        fn new() -> Run {
            Run {
                ledger: Ledger::new(),
                torch: TorchLayer::new(),
            }
        }
        fn apply(&mut self, action: u32, addr: u64, size: u64, stack: u32) {
            self.torch
                .apply(&mut self.ledger, &ev(action, addr, size), Some(stack));
        }
        fn live(&self, class: Class, stack: u32) -> u64 {
            self.ledger
                .state(&BTreeMap::new())
                .cells
                .iter()
                .filter(|(k, _)| k.class == class && k.stack == Some(stack))
                .map(|(_, c)| c.live_bytes)
                .sum()
        }
        fn total(&self, class: Class) -> u64 {
            self.ledger.totals(class).live_bytes
        }
        fn figures(&self) -> AllocatorFigures {
            self.torch.figures()[0]
        }
    }

    use torch_action::*;

    /// A per-request tensor served from cached segments: no new segment, and still found under
    /// the stack that allocated it; the segments' bytes split exactly between the two views.
    #[test]
    fn a_leak_served_from_cache_is_charged_to_its_allocating_stack() {
        let mut r = Run::new();
        let (warm, request) = (1, 2);
        let base = 0x7e00_0000_0000;
        for i in 0..8 {
            let seg = base + i * 16 * MIB;
            r.apply(SEGMENT_ALLOC, seg, 16 * MIB, warm);
            r.apply(ALLOC, seg, 16 * MIB, warm);
        }
        for i in 0..8 {
            let seg = base + i * 16 * MIB;
            r.apply(FREE_REQUESTED, seg, 16 * MIB, 0);
            r.apply(FREE_COMPLETED, seg, 16 * MIB, 0);
        }
        for i in 0..5 {
            r.apply(ALLOC, base + i * 16 * MIB, 16 * MIB, request);
        }
        assert_eq!(r.live(Class::Torch, request), 80 * MIB);
        assert_eq!(r.live(Class::Torch, warm), 0);
        assert_eq!(r.live(Class::TorchCached, warm), 48 * MIB);
        assert_eq!(
            r.total(Class::Torch) + r.total(Class::TorchCached),
            128 * MIB
        );
        let f = r.figures();
        assert_eq!(
            (f.reserved, f.allocated, f.cached()),
            (128 * MIB, 80 * MIB, 48 * MIB)
        );
        assert_eq!(
            (f.holes, f.hole_bytes, f.largest_hole),
            (3, 48 * MIB, 16 * MIB)
        );
    }

    /// Freed on one stream while another still uses it: pending, in neither view, until it
    /// completes.
    /// A segment and the tensors cut from it are in the phase of the event that made each.
    #[test]
    fn segments_and_tensors_are_in_the_phase_they_were_made_in() {
        let mut r = Run::new();
        let (load, serve) = (r.ledger.phase("load"), r.ledger.phase("serve"));
        let apply = |r: &mut Run, action, addr, size, phase| {
            (r.torch).apply_in(&mut r.ledger, &ev(action, addr, size), Some(1), phase);
        };
        apply(&mut r, SEGMENT_ALLOC, 0x1000_0000, 2 * MIB, load);
        apply(&mut r, ALLOC, 0x1000_0000, MIB, serve);
        let state = r.ledger.state(&BTreeMap::new());
        let mut cells: Vec<(Class, &str, u64)> = (state.cells.iter())
            .map(|(k, c)| (k.class, k.phase.as_str(), c.live_bytes))
            .collect();
        cells.sort();
        assert_eq!(
            cells,
            [
                (Class::Torch, "serve", MIB),
                (Class::TorchCached, "load", MIB)
            ]
        );
    }

    #[test]
    fn a_block_in_use_on_another_stream_is_pending_until_its_free_completes() {
        let mut r = Run::new();
        r.apply(SEGMENT_ALLOC, 0x1000_0000, 2 * MIB, 1);
        r.apply(ALLOC, 0x1000_0000, 4096, 2);
        r.apply(FREE_REQUESTED, 0x1000_0000, 4096, 0);
        assert_eq!(r.total(Class::Torch), 0);
        assert_eq!(r.total(Class::TorchCached), 2 * MIB - 4096);
        assert_eq!(r.figures().pending, 4096);
        r.apply(FREE_COMPLETED, 0x1000_0000, 4096, 0);
        assert_eq!(r.total(Class::TorchCached), 2 * MIB);
        assert_eq!(r.figures().pending, 0);
        r.apply(SEGMENT_FREE, 0x1000_0000, 2 * MIB, 0);
        assert_eq!(r.total(Class::TorchCached), 0);
        assert_eq!(r.figures().reserved, 0);
    }

    /// The holes at an OOM, computed by hand: a 1 KiB block in a 2 MiB segment and the middle
    /// one of three 16 MiB segments freed.
    #[test]
    fn an_oom_carries_the_fragmentation_at_that_moment() {
        let mut r = Run::new();
        r.apply(SEGMENT_ALLOC, 0x1000_0000, 2 * MIB, 1);
        r.apply(ALLOC, 0x1000_0000, 1024, 1);
        for i in 0..3 {
            let seg = 0x2000_0000 + i * 16 * MIB;
            r.apply(SEGMENT_ALLOC, seg, 16 * MIB, 2);
            r.apply(ALLOC, seg, 16 * MIB, 2);
        }
        r.apply(FREE_REQUESTED, 0x2000_0000 + 16 * MIB, 16 * MIB, 0);
        r.apply(FREE_COMPLETED, 0x2000_0000 + 16 * MIB, 16 * MIB, 0);
        r.apply(OOM, 14 * MIB, 20 * MIB, 3);
        let oom = &r.torch.take_ooms(3)[0];
        assert_eq!(oom.t_s, 3);
        assert_eq!(
            (oom.requested, oom.device_free, oom.stack),
            (20 * MIB, 14 * MIB, Some(3))
        );
        let f = oom.figures;
        assert_eq!((f.reserved, f.allocated), (50 * MIB, 32 * MIB + 1024));
        assert_eq!(
            (f.holes, f.hole_bytes, f.largest_hole),
            (2, 18 * MIB - 1024, 16 * MIB)
        );
        // 1 − 16 MiB / (18 MiB − 1 KiB), in thousandths.
        assert_eq!(f.fragmentation_permille(), 111);
    }

    /// Expandable segments: mapped ranges that touch are one span; unmapping gives their bytes
    /// back.
    #[test]
    fn expandable_segment_ranges_are_one_span_and_unmap_releases_them() {
        let mut r = Run::new();
        let base = 0x4000_0000;
        r.apply(SEGMENT_MAP, base, 2 * MIB, 1);
        r.apply(SEGMENT_MAP, base + 2 * MIB, 2 * MIB, 1);
        // A block across both ranges.
        r.apply(ALLOC, base + MIB, 2 * MIB, 2);
        assert_eq!(r.live(Class::TorchCached, 1), 2 * MIB);
        assert_eq!(r.figures().holes, 2);
        r.apply(FREE_REQUESTED, base + MIB, 2 * MIB, 0);
        r.apply(FREE_COMPLETED, base + MIB, 2 * MIB, 0);
        let f = r.figures();
        assert_eq!(
            (f.holes, f.hole_bytes, f.largest_hole),
            (1, 4 * MIB, 4 * MIB)
        );
        r.apply(SEGMENT_UNMAP, base + 2 * MIB, 2 * MIB, 0);
        assert_eq!(r.total(Class::TorchCached), 2 * MIB);
        assert_eq!(r.figures().reserved, 2 * MIB);
        // A partial unmap keeps the rest of the range.
        r.apply(SEGMENT_UNMAP, base + MIB, MIB, 0);
        assert_eq!(r.total(Class::TorchCached), MIB);
        assert_eq!(r.figures().segments, 1);
    }

    /// A CUDA graph's private pool (the pool passed from torch 2.8 on): its segments and blocks
    /// counted apart; the default pools' figures unchanged.
    #[test]
    fn a_private_pool_is_counted_apart() {
        let mut r = Run::new();
        let graph_pool = |action, addr, size| {
            let mut e = ev(action, addr, size);
            e.pool = [1, 0];
            e
        };
        r.apply(SEGMENT_ALLOC, 0x1000_0000, 2 * MIB, 1);
        r.apply(ALLOC, 0x1000_0000, MIB, 1);
        for e in [
            graph_pool(SEGMENT_ALLOC, 0x2000_0000, 20 * MIB),
            graph_pool(ALLOC, 0x2000_0000, 4 * MIB),
            graph_pool(ALLOC, 0x2000_0000 + 4 * MIB, 4 * MIB),
        ] {
            r.torch.apply(&mut r.ledger, &e, Some(2));
        }
        let f = r.figures();
        assert_eq!(
            (f.private_pools, f.private_reserved, f.private_allocated),
            (1, 20 * MIB, 8 * MIB)
        );
        assert_eq!((f.reserved, f.allocated), (22 * MIB, 9 * MIB));
        r.torch.apply(
            &mut r.ledger,
            &graph_pool(FREE_REQUESTED, 0x2000_0000, 4 * MIB),
            None,
        );
        assert_eq!(r.figures().private_allocated, 4 * MIB);
    }

    /// Blocks that overlap (events a broken or hostile target made) never take a segment past its
    /// size: the views stay consistent, and reserved = torch + torch-cached still holds.
    #[test]
    fn overlapping_blocks_never_overfill_a_segment() {
        let mut r = Run::new();
        r.apply(ALLOC, 0x1000_0000, MIB, 1);
        r.apply(ALLOC, 0x1000_0000 + MIB / 2, MIB, 1);
        r.apply(SEGMENT_ALLOC, 0x1000_0000, MIB, 2);
        r.apply(ALLOC, 0x1000_0000 + MIB / 4, MIB, 1);
        assert_eq!(r.total(Class::TorchCached), 0);
        r.apply(SEGMENT_UNMAP, 0x1000_0000 + MIB / 2, MIB / 4, 0);
        // Two pieces left of one segment: one live block in its cell.
        assert_eq!(r.ledger.totals(Class::TorchCached).live_count, 1);
        r.apply(SEGMENT_FREE, 0x1000_0000, MIB, 0);
        assert_eq!(r.total(Class::TorchCached), 0);
        assert_eq!(r.ledger.totals(Class::TorchCached).live_count, 0);
        assert_eq!(r.figures().reserved, 0);
        // The same split forgotten at an exec.
        r.apply(SEGMENT_ALLOC, 0x2000_0000, MIB, 2);
        r.apply(SEGMENT_UNMAP, 0x2000_0000 + MIB / 2, MIB / 4, 0);
        r.torch.forget_process(&mut r.ledger, 7);
        assert_eq!(r.ledger.totals(Class::TorchCached).live_count, 0);
    }

    /// An exec forgets the allocator and gives back what both views held.
    #[test]
    fn forgetting_a_process_empties_both_views() {
        let mut r = Run::new();
        r.apply(SEGMENT_ALLOC, 0x1000_0000, 2 * MIB, 1);
        r.apply(ALLOC, 0x1000_0000, 4096, 2);
        r.torch.forget_process(&mut r.ledger, 7);
        assert_eq!(r.total(Class::Torch) + r.total(Class::TorchCached), 0);
        assert!(r.torch.figures().is_empty());
    }

    #[test]
    fn a_free_of_a_block_never_seen_is_unmatched() {
        let mut r = Run::new();
        r.apply(FREE_REQUESTED, 0x1000, 4096, 0);
        r.apply(FREE_COMPLETED, 0x1000, 4096, 0);
        assert_eq!(r.torch.unmatched_frees, 1);
        assert_eq!(r.total(Class::Torch), 0);
    }

    /// The cudaMallocAsync backend: each tensor is the driver allocation made inside
    /// `mallocAsync` on the same thread, of the size asked; frees by address.
    #[test]
    fn async_backend_tensors_are_the_driver_blocks_made_inside_malloc_async() {
        let mut r = Run::new();
        let (warm, request) = (1, 2);
        r.apply(ASYNC_MALLOC, 0, 16 * MIB, warm);
        // Another size first (not the tensor), then the tensor's.
        r.torch
            .driver_allocated(&mut r.ledger, 70, 0xa000_0000, 4096);
        r.torch
            .driver_allocated(&mut r.ledger, 70, 0xb000_0000, 16 * MIB);
        r.apply(ASYNC_FREE, 0xb000_0000, 0, 0);
        for i in 0..5 {
            r.apply(ASYNC_MALLOC, 0, 16 * MIB, request);
            r.torch
                .driver_allocated(&mut r.ledger, 70, 0xc000_0000 + i * 16 * MIB, 16 * MIB);
        }
        // A driver allocation outside mallocAsync is not a tensor.
        r.torch
            .driver_allocated(&mut r.ledger, 70, 0xd000_0000, 16 * MIB);
        // Another thread's mallocAsync is not this thread's.
        r.torch
            .driver_allocated(&mut r.ledger, 71, 0xe000_0000, 16 * MIB);
        assert_eq!(r.live(Class::Torch, warm), 0);
        assert_eq!(r.live(Class::Torch, request), 80 * MIB);
        assert_eq!(r.total(Class::TorchCached), 0);
        let f = r.figures();
        assert!(f.async_backend);
        assert_eq!(
            (f.allocated, f.blocks, f.reserved, f.segments),
            (80 * MIB, 5, 0, 0)
        );
        r.apply(ASYNC_FREE, 0xf000_0000, 0, 0);
        assert_eq!(r.torch.unmatched_frees, 1);
    }

    /// vLLM's sleep: the driver unmaps segment memory the allocator still holds; its bytes are
    /// sleeping until mapped again, and a released segment sleeps no more.
    #[test]
    fn segment_memory_unmapped_at_the_driver_is_sleeping() {
        let mut r = Run::new();
        let base = 0x7000_0000;
        r.apply(SEGMENT_MAP, base, 40 * MIB, 1);
        r.apply(ALLOC, base, 40 * MIB, 1);
        r.apply(SEGMENT_MAP, base + 40 * MIB, 20 * MIB, 2);
        r.apply(ALLOC, base + 40 * MIB, 20 * MIB, 2);
        // Unmapped page by page, and a range outside every segment.
        for page in 0..30 {
            r.torch.driver_unmapped(7, base + page * 2 * MIB, 2 * MIB);
        }
        r.torch.driver_unmapped(7, 0x1000, 2 * MIB);
        r.torch.driver_unmapped(8, base, 2 * MIB);
        let f = r.figures();
        assert_eq!(
            (f.sleeping, f.allocated, f.reserved),
            (60 * MIB, 60 * MIB, 60 * MIB)
        );
        // Woken in part: 10 pages mapped again.
        r.torch.driver_mapped(7, base + 4 * MIB, 20 * MIB);
        assert_eq!(r.figures().sleeping, 40 * MIB);
        // The second segment's range released by the allocator: not sleeping any more.
        r.apply(FREE_REQUESTED, base + 40 * MIB, 20 * MIB, 0);
        r.apply(FREE_COMPLETED, base + 40 * MIB, 20 * MIB, 0);
        r.apply(SEGMENT_UNMAP, base + 40 * MIB, 20 * MIB, 0);
        assert_eq!(r.figures().sleeping, 20 * MIB);
    }

    #[test]
    fn range_sets_merge_and_split() {
        let mut set = BTreeMap::new();
        assert!(add_range(&mut set, 10, 20));
        assert!(add_range(&mut set, 20, 30));
        assert!(!add_range(&mut set, 12, 18));
        assert!(add_range(&mut set, 40, 50));
        assert_eq!(set, BTreeMap::from([(10, 30), (40, 50)]));
        assert!(remove_range(&mut set, 15, 45));
        assert_eq!(set, BTreeMap::from([(10, 15), (45, 50)]));
        assert!(!remove_range(&mut set, 20, 40));
        assert!(!add_range(&mut set, 5, 5));
    }

    /// The pinned host allocator: a block is `torch-pinned` at the tensor's stack while held,
    /// `torch-pinned-cached` at the stack that made it while not; the driver's free ends it.
    #[test]
    fn pinned_blocks_are_held_or_cached_until_the_driver_frees_them() {
        let mut r = Run::new();
        let pinned = |action, ptr: u64, size, block: u64| TorchEvent {
            stream: block,
            ..ev(action, ptr, size)
        };
        let (warm, request) = (1, 2);
        let apply = |r: &mut Run, e: TorchEvent, stack| r.torch.apply(&mut r.ledger, &e, stack);
        // Two blocks made by `warm`, both released; one reused by `request` and kept.
        apply(
            &mut r,
            pinned(PINNED_ALLOC, 0x1000_0000, MIB, 0xb0),
            Some(warm),
        );
        apply(
            &mut r,
            pinned(PINNED_ALLOC, 0x2000_0000, MIB, 0xb1),
            Some(warm),
        );
        apply(&mut r, pinned(PINNED_FREE, 0x1000_0000, MIB, 0xb0), None);
        apply(&mut r, pinned(PINNED_FREE, 0x2000_0000, MIB, 0xb1), None);
        apply(
            &mut r,
            pinned(PINNED_ALLOC, 0x2000_0000, MIB, 0xb1),
            Some(request),
        );
        assert_eq!(r.live(Class::TorchPinned, request), MIB);
        assert_eq!(r.live(Class::TorchPinned, warm), 0);
        assert_eq!(r.live(Class::TorchPinnedCached, warm), MIB);
        assert_eq!(
            r.total(Class::TorchPinned) + r.total(Class::TorchPinnedCached),
            2 * MIB
        );
        // The driver frees the cached one (empty_cache); another address is not PyTorch's.
        r.torch.driver_freed(&mut r.ledger, 7, 0x1000_0000);
        r.torch.driver_freed(&mut r.ledger, 7, 0x3000_0000);
        assert_eq!(r.total(Class::TorchPinnedCached), 0);
        assert_eq!(r.total(Class::TorchPinned), MIB);
        // A block released that was never seen (made before attach) is cached from then on.
        apply(&mut r, pinned(PINNED_FREE, 0x4000_0000, 4096, 0xb4), None);
        assert_eq!(
            (r.total(Class::TorchPinnedCached), r.torch.unmatched_frees),
            (4096, 1)
        );
        // A HostBlock whose memory changed was replaced: the old block is gone.
        apply(
            &mut r,
            pinned(PINNED_ALLOC, 0x5000_0000, 8192, 0xb4),
            Some(request),
        );
        assert_eq!(r.total(Class::TorchPinnedCached), 0);
        assert_eq!(r.total(Class::TorchPinned), MIB + 8192);
        r.torch.forget_process(&mut r.ledger, 7);
        assert_eq!(
            r.total(Class::TorchPinned) + r.total(Class::TorchPinnedCached),
            0
        );
    }
}
