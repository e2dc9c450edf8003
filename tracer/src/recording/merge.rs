//! Stacks that read the same after symbolization merged into one, so that every row of a view is
//! a distinct stack. The recording keeps the finer, address-level stacks.

use std::collections::{BTreeMap, HashMap};

use super::{Recorded, batches::BatchFigures};
use crate::model::{
    AmountsByStack, CellKey, CudaCalls, FailureKey, MarkCell, SeriesPoint, Stack, StackCounters,
    StackIndex,
};

impl Recorded {
    /// Merges stacks whose symbolized frames are identical (distinct call sites in one function
    /// look the same by name), summing their cells, failures and series, so that every row of a
    /// view is a distinct stack. The recording keeps the finer, address-level stacks.
    pub fn merge_identical_stacks(&mut self) {
        let remap = StackRemap::of(&self.stacks);
        if remap.0.is_empty() {
            return;
        }
        let state = &mut self.state;
        state.cells = remap.cells(std::mem::take(&mut state.cells));
        state.failures = remap.failures(std::mem::take(&mut state.failures));
        state.faults = remap.amounts(std::mem::take(&mut state.faults));
        state.released = remap.amounts(std::mem::take(&mut state.released));
        state.cuda_calls = remap.cuda_calls(std::mem::take(&mut state.cuda_calls));
        self.series = remap.series(std::mem::take(&mut self.series));
        if let Some(batches) = &mut self.batches {
            batches.cells = remap.batch_figures(std::mem::take(&mut batches.cells));
        }
        for oom in &mut self.torch_ooms {
            oom.stack = remap.canon(oom.stack);
        }
        for mark in &mut self.marks {
            mark.cells = remap.mark_cells(std::mem::take(&mut mark.cells));
        }
        self.heap_windows_grown = remap.windows_grown(std::mem::take(&mut self.heap_windows_grown));
        self.stacks.retain(|index, _| !remap.0.contains_key(index));
    }
}

/// Each stack whose frames a stack of lower index has, to that stack.
struct StackRemap(HashMap<StackIndex, StackIndex>);

impl StackRemap {
    fn of(stacks: &BTreeMap<StackIndex, Stack>) -> StackRemap {
        let mut first: HashMap<&[String], StackIndex> = HashMap::new();
        let mut remap = HashMap::new();
        for (&index, stack) in stacks {
            let canonical = *first.entry(stack.frames.as_slice()).or_insert(index);
            if canonical != index {
                remap.insert(index, canonical);
            }
        }
        StackRemap(remap)
    }

    /// The stack `stack` merges into (itself when it merges into none).
    fn canon(&self, stack: Option<StackIndex>) -> Option<StackIndex> {
        stack.map(|s| self.0.get(&s).copied().unwrap_or(s))
    }

    /// Cell `key` with its stack as merged.
    fn cell(&self, key: CellKey) -> CellKey {
        CellKey {
            stack: self.canon(key.stack),
            ..key
        }
    }

    /// Merged cells rose in the windows either rose in: at least the most of them.
    fn windows_grown(&self, grown: BTreeMap<CellKey, u32>) -> BTreeMap<CellKey, u32> {
        let mut merged: BTreeMap<CellKey, u32> = BTreeMap::new();
        for (key, windows) in grown {
            let key = self.cell(key);
            let at = merged.entry(key).or_default();
            *at = (*at).max(windows);
        }
        merged
    }

    fn mark_cells(&self, cells: Vec<MarkCell>) -> Vec<MarkCell> {
        let mut merged: BTreeMap<CellKey, u64> = BTreeMap::new();
        for cell in cells {
            let key = self.cell(cell.key);
            *merged.entry(key).or_default() += cell.live_bytes;
        }
        (merged.into_iter())
            .map(|(key, live_bytes)| MarkCell { key, live_bytes })
            .collect()
    }

    fn cells(&self, cells: BTreeMap<CellKey, StackCounters>) -> BTreeMap<CellKey, StackCounters> {
        let mut merged: BTreeMap<CellKey, StackCounters> = BTreeMap::new();
        for (key, counters) in cells {
            let key = self.cell(key);
            merged.entry(key).or_default().add(&counters);
        }
        merged
    }

    /// Batch figures add up: a merged cell's are the sum of its members' (`BatchFigures::add`).
    fn batch_figures(&self, cells: Vec<(CellKey, BatchFigures)>) -> Vec<(CellKey, BatchFigures)> {
        let mut merged: BTreeMap<CellKey, BatchFigures> = BTreeMap::new();
        for (key, figures) in cells {
            let key = self.cell(key);
            merged.entry(key).or_default().add(&figures);
        }
        merged.into_iter().collect()
    }

    fn failures(&self, failures: BTreeMap<FailureKey, u64>) -> BTreeMap<FailureKey, u64> {
        let mut merged: BTreeMap<FailureKey, u64> = BTreeMap::new();
        for (key, n) in failures {
            let key = FailureKey {
                stack: self.canon(key.stack),
                ..key
            };
            *merged.entry(key).or_default() += n;
        }
        merged
    }

    fn amounts(&self, amounts: AmountsByStack) -> AmountsByStack {
        let mut merged = AmountsByStack::new();
        for ((pid, stack), n) in amounts {
            *merged.entry((pid, self.canon(stack))).or_default() += n;
        }
        merged
    }

    fn cuda_calls(&self, calls: CudaCalls) -> CudaCalls {
        let mut merged = CudaCalls::new();
        for ((pid, function, stack), n) in calls {
            let counts = merged
                .entry((pid, function, self.canon(stack)))
                .or_default();
            counts.calls += n.calls;
            counts.failed += n.failed;
        }
        merged
    }

    /// A series point is the value of one original cell; a merged point is the sum of the
    /// latest values of all the originals it merges. One point per (second, merged cell): the
    /// last.
    fn series(&self, points: Vec<SeriesPoint>) -> Vec<SeriesPoint> {
        let mut latest: HashMap<CellKey, (u64, u64)> = HashMap::new();
        let mut merged_members: HashMap<CellKey, Vec<CellKey>> = HashMap::new();
        let mut series = Vec::with_capacity(points.len());
        for point in points {
            let merged = self.cell(point.key.clone());
            let members = merged_members.entry(merged.clone()).or_default();
            if !members.contains(&point.key) {
                members.push(point.key.clone());
            }
            latest.insert(point.key.clone(), (point.live_bytes, point.live_count));
            let (live_bytes, live_count) = members
                .iter()
                .filter_map(|k| latest.get(k))
                .fold((0, 0), |(b, c), (lb, lc)| (b + lb, c + lc));
            series.push(SeriesPoint {
                t_s: point.t_s,
                key: merged,
                live_bytes,
                live_count,
            });
        }
        // Keep the last point per (second, cell).
        series.dedup_by(|later, earlier| {
            later.t_s == earlier.t_s && later.key == earlier.key && {
                *earlier = later.clone();
                true
            }
        });
        series
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        model::{CallCounts, Class, ClassTotals, LedgerState, PHASE_NONE, TargetInfo},
        recording::SCHEMA_VERSION,
    };

    fn key(stack: StackIndex) -> CellKey {
        CellKey {
            class: Class::Heap,
            pid: 1,
            phase: PHASE_NONE.into(),
            stack: Some(stack),
        }
    }

    /// A failed `malloc(9)` at `stack`.
    fn failure(stack: StackIndex) -> FailureKey {
        FailureKey {
            class: Class::Heap,
            pid: 1,
            function: "malloc".into(),
            size: 9,
            error: "ENOMEM".into(),
            stack: Some(stack),
        }
    }

    fn counters(live: u64, count: u64) -> StackCounters {
        StackCounters {
            live_bytes: live,
            live_count: count,
            allocated_bytes: live,
            allocated_count: count,
            ..Default::default()
        }
    }

    #[test]
    fn stacks_with_identical_frames_merge_their_cells_failures_and_series() {
        let frames = |f: &[&str]| f.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let mut rec = Recorded {
            schema: SCHEMA_VERSION,
            tool_version: "t".into(),
            target: TargetInfo::default(),
            started_unix_ns: 0,
            ended_unix_ns: None,
            duration_s: 2.0,
            complete: true,
            state: LedgerState {
                faults: BTreeMap::from([((1, Some(1)), 64), ((1, Some(0)), 128)]),
                released: BTreeMap::new(),
                cuda_calls: BTreeMap::from([
                    (
                        (1, "cuGraphLaunch".into(), Some(1)),
                        CallCounts {
                            calls: 5,
                            failed: 1,
                        },
                    ),
                    (
                        (1, "cuGraphLaunch".into(), Some(0)),
                        CallCounts {
                            calls: 2,
                            failed: 0,
                        },
                    ),
                ]),
                totals: BTreeMap::from([(Class::Heap, ClassTotals::default())]),
                cells: BTreeMap::from([
                    (key(0), counters(10, 1)),
                    (key(1), counters(20, 2)),
                    (key(2), counters(5, 1)),
                ]),
                failures: BTreeMap::from([(failure(1), 2), (failure(0), 1)]),
                unmatched_frees: 0,
                lost_events: BTreeMap::new(),
            },
            stacks: BTreeMap::from([
                (
                    0,
                    Stack {
                        index: 0,
                        frames: frames(&["f", "main"]),
                    },
                ),
                (
                    1,
                    Stack {
                        index: 1,
                        frames: frames(&["f", "main"]),
                    },
                ),
                (
                    2,
                    Stack {
                        index: 2,
                        frames: frames(&["g", "main"]),
                    },
                ),
            ]),
            series: vec![
                SeriesPoint {
                    t_s: 0,
                    key: key(0),
                    live_bytes: 10,
                    live_count: 1,
                },
                SeriesPoint {
                    t_s: 1,
                    key: key(1),
                    live_bytes: 20,
                    live_count: 2,
                },
                SeriesPoint {
                    t_s: 1,
                    key: key(2),
                    live_bytes: 5,
                    live_count: 1,
                },
            ],
            ..crate::views::fixture::empty(true)
        };
        rec.merge_identical_stacks();
        assert_eq!(rec.stacks.keys().copied().collect::<Vec<_>>(), vec![0, 2]);
        assert_eq!(
            rec.state.cells[&key(0)],
            StackCounters {
                live_bytes: 30,
                live_count: 3,
                allocated_bytes: 30,
                allocated_count: 3,
                ..Default::default()
            }
        );
        assert_eq!(
            rec.state.failures.values().copied().collect::<Vec<_>>(),
            vec![3]
        );
        let merged: Vec<(u64, u64)> = rec
            .series
            .iter()
            .filter(|p| p.key == key(0))
            .map(|p| (p.t_s, p.live_bytes))
            .collect();
        assert_eq!(merged, vec![(0, 10), (1, 30)]);
        assert_eq!(rec.state.faults, BTreeMap::from([((1, Some(0)), 192)]));
        assert_eq!(
            rec.state.cuda_calls,
            BTreeMap::from([(
                (1, "cuGraphLaunch".to_string(), Some(0)),
                CallCounts {
                    calls: 7,
                    failed: 1
                }
            )])
        );
    }
}
