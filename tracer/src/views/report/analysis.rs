//! The figures both reports render: deaths and the seconds before them, cells by live bytes,
//! per-process sums, failures, losses, amounts by stack, CUDA calls by function, the RSS
//! waterfall, GPU residuals and growth. Each is computed once here, in the order the reports list
//! it.

use std::collections::{BTreeMap, HashMap};

use tracer_common::drop_cause;

use super::{GpuResidual, Waterfall};
use crate::{
    model::{
        AllocatorFigures, AmountsByStack, CallCounts, CellKey, Class, FailureKey, GpuSample,
        StackCounters, StackIndex,
    },
    recording::{ProcessExit, Recorded},
};

/// Seconds the flight recorder shows before a death.
pub(super) const LAST_SECONDS: u64 = 5;

/// The traced processes killed by a signal nobody at alloctrace sent, the target first, then in
/// the order they died.
pub(super) fn deaths(rec: &Recorded) -> Vec<&ProcessExit> {
    let target = rec.target.pids.first().copied();
    let mut deaths: Vec<&ProcessExit> = rec.exits.iter().filter(|e| e.is_death()).collect();
    deaths.sort_by_key(|e| Some(e.pid) != target);
    deaths
}

/// The end of the target (the first traced process), when it ended during the recording.
pub(super) fn target_exit(rec: &Recorded) -> Option<&ProcessExit> {
    let target = *rec.target.pids.first()?;
    rec.exits.iter().find(|e| e.pid == target)
}

/// One second of the flight recorder: the dead process's resident memory (when sampled that
/// second) and the live bytes of every class, all traced processes, at that second.
pub(super) struct LastSecond {
    pub t_s: u64,
    /// (RSS, anonymous) of the process.
    pub resident: Option<(u64, u64)>,
    pub live: BTreeMap<Class, u64>,
}

/// The `LAST_SECONDS` whole seconds up to `exit`, from the recording's per-second samples and
/// per-class series (a class keeps its figure until it changes).
pub(super) fn last_seconds(rec: &Recorded, exit: &ProcessExit) -> Vec<LastSecond> {
    let last = exit.t_s.max(0.0) as u64;
    let first = last.saturating_sub(LAST_SECONDS - 1);
    let mut live = BTreeMap::new();
    let mut points = rec.totals_series.iter().peekable();
    (first..=last)
        .map(|t_s| {
            while let Some(p) = points.next_if(|p| p.t_s <= t_s) {
                live.insert(p.class, p.live_bytes);
            }
            let resident = (rec.rss.iter())
                .find(|s| s.pid == exit.pid && s.t_s == t_s)
                .map(|s| (s.rss, s.anon));
            LastSecond {
                t_s,
                resident,
                live: live.clone(),
            }
        })
        .collect()
}

/// Cells in report order: live bytes, then allocated bytes, descending; ties by key so the
/// order is the same on every run.
pub(super) fn cells_by_live_bytes(rec: &Recorded) -> Vec<(&CellKey, &StackCounters)> {
    let mut cells: Vec<_> = rec.state.cells.iter().collect();
    cells.sort_by(|(ka, a), (kb, b)| {
        (b.live_bytes, b.allocated_bytes)
            .cmp(&(a.live_bytes, a.allocated_bytes))
            .then_with(|| ka.cmp(kb))
    });
    cells
}

/// Cells summed per process and class.
pub(super) fn per_process(rec: &Recorded) -> BTreeMap<u32, BTreeMap<&'static str, StackCounters>> {
    let mut out: BTreeMap<u32, BTreeMap<&'static str, StackCounters>> = BTreeMap::new();
    for (key, counters) in &rec.state.cells {
        out.entry(key.pid)
            .or_default()
            .entry(key.class.name())
            .or_default()
            .add(counters);
    }
    out
}

/// Failures by count, descending, then by key.
pub(super) fn failures_by_count(rec: &Recorded) -> Vec<(&FailureKey, u64)> {
    let mut failures: Vec<_> = rec.state.failures.iter().map(|(k, &n)| (k, n)).collect();
    failures.sort_by(|(ka, a), (kb, b)| b.cmp(a).then_with(|| ka.cmp(kb)));
    failures
}

/// Every kernel drop cause (zero when absent), then any other cause the recording has.
pub(super) fn lost_events(rec: &Recorded) -> BTreeMap<&str, u64> {
    let mut lost: BTreeMap<&str, u64> = drop_cause::NAMES.iter().map(|&n| (n, 0)).collect();
    for (cause, &n) in &rec.state.lost_events {
        *lost.entry(cause.as_str()).or_default() += n;
    }
    lost
}

/// One row of a per-(pid, stack) amount (page faults, released bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct StackAmount {
    pub pid: u32,
    pub stack: Option<StackIndex>,
    pub amount: u64,
}

/// Rows of a per-(pid, stack) amount, largest first, then by (pid, stack).
pub(super) fn by_amount(map: &AmountsByStack) -> Vec<StackAmount> {
    let mut rows: Vec<_> = map
        .iter()
        .map(|(&(pid, stack), &amount)| StackAmount { pid, stack, amount })
        .collect();
    rows.sort_by(|a, b| {
        b.amount
            .cmp(&a.amount)
            .then_with(|| (a.pid, a.stack).cmp(&(b.pid, b.stack)))
    });
    rows
}

/// CUDA calls by (pid, function), all stacks summed, most calls first.
pub(super) fn cuda_calls_by_function(rec: &Recorded) -> Vec<((u32, &str), CallCounts)> {
    let mut by_function: BTreeMap<(u32, &str), CallCounts> = BTreeMap::new();
    for ((pid, function, _), n) in &rec.state.cuda_calls {
        let e = by_function.entry((*pid, function)).or_default();
        e.calls += n.calls;
        e.failed += n.failed;
    }
    let mut rows: Vec<_> = by_function.into_iter().collect();
    rows.sort_by(|a, b| b.1.calls.cmp(&a.1.calls).then_with(|| a.0.cmp(&b.0)));
    rows
}

/// A PyTorch caching allocator (one process, one device) over the recording.
#[derive(serde::Serialize, Clone, Debug, PartialEq)]
pub struct AllocatorSummary {
    pub pid: u32,
    pub device: i32,
    /// Seconds of its first and last samples.
    pub first_t_s: u64,
    pub last_t_s: u64,
    /// Its figures at the last sample.
    pub reserved: u64,
    pub allocated: u64,
    pub pending: u64,
    /// Reserved, neither allocated nor pending.
    pub cached: u64,
    pub segments: u64,
    pub blocks: u64,
    pub holes: u64,
    pub hole_bytes: u64,
    pub largest_hole: u64,
    /// `1 − largest hole / bytes in holes` (0 without holes), three decimals.
    pub fragmentation: f64,
    /// CUDA graphs' and users' private pools, and their share of reserved and allocated.
    pub private_pools: u64,
    pub private_reserved: u64,
    pub private_allocated: u64,
    /// Served by the `cudaMallocAsync` backend (tensors only, no segments).
    pub async_backend: bool,
    /// Segment bytes unmapped at the driver while the allocator holds them (vLLM's sleep).
    pub sleeping: u64,
    pub peak_reserved: u64,
    pub peak_allocated: u64,
    /// Last minus first sample.
    pub reserved_growth: i64,
    pub allocated_growth: i64,
}

/// `1 − largest hole / bytes in holes` of `f`, to three decimals.
pub fn fragmentation(f: &AllocatorFigures) -> f64 {
    f.fragmentation_permille() as f64 / 1000.0
}

/// Each caching allocator's last figures, peaks and growth over the recording.
pub fn allocator_summaries(rec: &Recorded) -> Vec<AllocatorSummary> {
    let mut by_device: BTreeMap<(u32, i32), Vec<(u64, &AllocatorFigures)>> = BTreeMap::new();
    for s in &rec.torch {
        let key = (s.figures.pid, s.figures.device);
        by_device.entry(key).or_default().push((s.t_s, &s.figures));
    }
    by_device
        .into_iter()
        .filter_map(|((pid, device), samples)| {
            let (first_t, first) = *samples.first()?;
            let (last_t, last) = *samples.last()?;
            let d = |a: u64, b: u64| b as i64 - a as i64;
            Some(AllocatorSummary {
                pid,
                device,
                first_t_s: first_t,
                last_t_s: last_t,
                reserved: last.reserved,
                allocated: last.allocated,
                pending: last.pending,
                cached: last.cached(),
                segments: last.segments,
                blocks: last.blocks,
                holes: last.holes,
                hole_bytes: last.hole_bytes,
                largest_hole: last.largest_hole,
                fragmentation: fragmentation(last),
                private_pools: last.private_pools,
                private_reserved: last.private_reserved,
                private_allocated: last.private_allocated,
                async_backend: last.async_backend,
                sleeping: last.sleeping,
                peak_reserved: samples.iter().map(|(_, f)| f.reserved).max().unwrap_or(0),
                peak_allocated: samples.iter().map(|(_, f)| f.allocated).max().unwrap_or(0),
                reserved_growth: d(first.reserved, last.reserved),
                allocated_growth: d(first.allocated, last.allocated),
            })
        })
        .collect()
}

/// The last GPU sample of each process.
pub fn gpu_residuals(rec: &Recorded) -> Vec<GpuResidual> {
    let mut last: BTreeMap<u32, GpuSample> = BTreeMap::new();
    for s in &rec.gpu {
        last.insert(s.pid, *s);
    }
    last.into_values()
        .map(|s| GpuResidual {
            pid: s.pid,
            t_s: s.t_s,
            used: s.used,
            traced: s.traced,
            untraced: s.used as i64 - s.traced as i64,
        })
        .collect()
}

/// The waterfall at the last resident sample of the first target process.
pub fn waterfall(rec: &Recorded) -> Option<Waterfall> {
    let pid = *rec.target.pids.first()?;
    let samples: Vec<_> = rec.rss.iter().filter(|s| s.pid == pid).collect();
    let (first, last) = (samples.first()?, samples.last()?);
    let live = |class: Class| rec.state.totals.get(&class).map_or(0, |t| t.live_bytes);
    let heap_live = live(Class::Heap);
    // Resident arena the live blocks do not use. (Blocks that live in arena mapped before
    // attach make this an underestimate, and show in the untraced remainder instead.)
    let allocator_retained = last.arena_resident.saturating_sub(heap_live);
    let traced_mappings_mapped =
        live(Class::Mmap) + live(Class::ThreadStack) + live(Class::PythonArena);
    let traced_mappings = last.traced_resident;
    let d = |a: u64, b: u64| b as i64 - a as i64;
    let untraced_anon =
        last.anon as i64 - (heap_live + allocator_retained + traced_mappings) as i64;
    // The sample taken at attach, before any event: what the target held then.
    // Traced then, as in the waterfall: the arena (live heap and retained) and the mappings.
    let traced_then = first.traced_resident.saturating_add(first.arena_resident);
    let at_attach =
        (rec.target.attached && first.t_s == 0).then(|| first.anon.saturating_sub(traced_then));
    Some(Waterfall {
        pid,
        t_s: last.t_s,
        rss: last.rss,
        file: last.file,
        shmem: last.shmem,
        anon: last.anon,
        heap_live,
        allocator_retained,
        traced_mappings,
        traced_mappings_mapped,
        untraced_anon,
        pre_attach: at_attach.map(|held| held.min(untraced_anon.max(0) as u64)),
        first_t_s: first.t_s,
        rss_growth: d(first.rss, last.rss),
        anon_growth: d(first.anon, last.anon),
        file_growth: d(first.file, last.file),
        shmem_growth: d(first.shmem, last.shmem),
    })
}

/// Live figures of every cell at the first and the last second of the series.
pub(super) struct Growth<'a> {
    pub first_t: u64,
    pub last_t: u64,
    /// (live bytes at the first second, at the last), by cell.
    pub cells: HashMap<&'a CellKey, (u64, u64)>,
}

pub(super) fn growth(rec: &Recorded) -> Option<Growth<'_>> {
    let first_t = rec.series.iter().map(|p| p.t_s).min()?;
    let last_t = rec.series.iter().map(|p| p.t_s).max()?;
    let mut cells: HashMap<&CellKey, (u64, u64)> = HashMap::new();
    // Points are in commit order: the last one of a cell is its latest value. A cell without a
    // point at the first second did not exist yet (the ledger reports a cell when it is made).
    for p in &rec.series {
        let entry = cells.entry(&p.key).or_insert((0, 0));
        if p.t_s == first_t {
            entry.0 = p.live_bytes;
        }
        entry.1 = p.live_bytes;
    }
    Some(Growth {
        first_t,
        last_t,
        cells,
    })
}

impl<'a> Growth<'a> {
    /// The cells whose live bytes grew, by how much, most first (ties by key).
    pub fn growing(&self) -> Vec<(&'a CellKey, i128)> {
        let mut growing: Vec<(&CellKey, i128)> = self
            .cells
            .iter()
            .map(|(key, (first, last))| (*key, i128::from(*last) - i128::from(*first)))
            .filter(|(_, d)| *d > 0)
            .collect();
        growing.sort_by(|(ka, a), (kb, b)| b.cmp(a).then_with(|| ka.cmp(kb)));
        growing
    }
}

/// Live bytes of each class at second `first_t` and at the end, from the per-class series
/// (a class without a point at `first_t` had nothing live then).
pub(super) fn class_growth(rec: &Recorded, first_t: u64) -> BTreeMap<Class, (u64, u64)> {
    let mut classes: BTreeMap<Class, (u64, u64)> = BTreeMap::new();
    for p in &rec.totals_series {
        let entry = classes.entry(p.class).or_default();
        if p.t_s <= first_t {
            entry.0 = p.live_bytes;
        }
        entry.1 = p.live_bytes;
    }
    classes
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        model::PHASE_NONE,
        views::fixture::{self, CHURN_STACK},
    };

    #[test]
    fn growth_counts_cells_created_later_from_zero() {
        let rec = fixture::recorded();
        let g = growth(&rec).unwrap();
        assert_eq!((g.first_t, g.last_t), (1, 4));
        let key = |stack| CellKey {
            class: Class::Heap,
            pid: 7,
            phase: PHASE_NONE.to_string(),
            stack,
        };
        // leak_malloc: 5 of 10 blocks of 100 B in the first second.
        assert_eq!(g.cells[&key(Some(0))], (500, 1000));
        // The lost-stack block appeared at 4 s.
        assert_eq!(g.cells[&key(None)], (0, 64));
        let churn = CellKey {
            phase: "serve".into(),
            ..key(Some(CHURN_STACK))
        };
        assert_eq!(g.cells[&churn], (0, 0));
    }
}
