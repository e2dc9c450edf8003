//! The recording: one SQLite file per `alloctrace record`, crash-safe, read back by the views.
//!
//! The recorder commits the ledger's state once a second in one transaction (WAL mode), so a
//! tracer killed at any moment (SIGKILL, OOM killer, power loss aside) leaves a file that opens
//! with everything up to its last commit; `finalize` marks it complete and folds the write-ahead
//! log back in so that exactly one file remains. The schema is documented, with example queries,
//! in docs/recording.md; `schema.rs` holds its DDL.

mod integrity;
mod reader;
mod schema;
mod writer;

#[cfg(test)]
mod tests;

use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
};

pub use reader::{Reader, SeriesRead};
pub use schema::{APPLICATION_ID, SCHEMA_VERSION};
pub use writer::Writer;

use crate::{
    model::{
        CellKey, Class, CudaCalls, FailureKey, GpuSample, LedgerState, RssSample, SeriesPoint,
        Stack, StackCounters, StackIndex, TargetInfo,
    },
    output::OutputError,
};

/// Frames shown for a cell or failure whose stack could not be captured.
pub const STACK_LOST: &str = "[stack lost]";

/// Everything a recording holds, as read by `Reader::open`.
#[derive(Clone, Debug, PartialEq)]
pub struct Recorded {
    /// Schema version of the file (`SCHEMA_VERSION` or older).
    pub schema: u32,
    /// Version of the alloctrace that wrote the file.
    pub tool_version: String,
    pub target: TargetInfo,
    /// Wall-clock start, nanoseconds since the Unix epoch.
    pub started_unix_ns: u64,
    /// Wall-clock end; `None` unless finalized.
    pub ended_unix_ns: Option<u64>,
    /// Seconds from the start to the last commit (to the end when finalized).
    pub duration_s: f64,
    /// False when the tracer died before finalizing: the data is what it had committed by then.
    pub complete: bool,
    /// The ledger at the last commit. Cells that never counted anything are left out.
    pub state: LedgerState,
    pub stacks: BTreeMap<StackIndex, Stack>,
    /// Live figures of cells at the seconds they changed, in commit order.
    pub series: Vec<SeriesPoint>,
    /// Live figures of classes at the seconds they changed, in commit order.
    pub totals_series: Vec<TotalsPoint>,
    /// Resident memory samples, in time order.
    pub rss: Vec<RssSample>,
    /// GPU memory samples, in time order.
    pub gpu: Vec<GpuSample>,
    /// Where GPU samples came from, or why there are none (`None`: an older recording).
    pub gpu_source: Option<String>,
    /// How stacks were taken (`None`: an older recording).
    pub stack_capture: Option<crate::model::StackCapture>,
}

/// One point of the per-class time series.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TotalsPoint {
    /// Whole seconds since the recording started, as `SeriesPoint::t_s`.
    pub t_s: u64,
    pub class: Class,
    pub live_bytes: u64,
    pub live_count: u64,
}

impl Recorded {
    /// Merges stacks whose symbolized frames are identical (distinct call sites in one function
    /// look the same by name), summing their cells, failures and series, so that every row of a
    /// view is a distinct stack. The recording keeps the finer, address-level stacks.
    pub fn merge_identical_stacks(&mut self) {
        let mut first: HashMap<&[String], StackIndex> = HashMap::new();
        let mut remap: HashMap<StackIndex, StackIndex> = HashMap::new();
        for (&index, stack) in &self.stacks {
            let canonical = *first.entry(stack.frames.as_slice()).or_insert(index);
            if canonical != index {
                remap.insert(index, canonical);
            }
        }
        if remap.is_empty() {
            return;
        }
        let canon = |stack: Option<StackIndex>| stack.map(|s| remap.get(&s).copied().unwrap_or(s));

        let mut cells: BTreeMap<CellKey, StackCounters> = BTreeMap::new();
        for (key, counters) in std::mem::take(&mut self.state.cells) {
            let merged = CellKey {
                stack: canon(key.stack),
                ..key
            };
            cells.entry(merged).or_default().add(&counters);
        }
        self.state.cells = cells;

        let mut failures: BTreeMap<FailureKey, u64> = BTreeMap::new();
        for (key, n) in std::mem::take(&mut self.state.failures) {
            *failures
                .entry(FailureKey {
                    stack: canon(key.stack),
                    ..key
                })
                .or_default() += n;
        }
        self.state.failures = failures;

        let mut faults: BTreeMap<(u32, Option<StackIndex>), u64> = BTreeMap::new();
        for ((pid, stack), n) in std::mem::take(&mut self.state.faults) {
            *faults.entry((pid, canon(stack))).or_default() += n;
        }
        self.state.faults = faults;

        let mut released: BTreeMap<(u32, Option<StackIndex>), u64> = BTreeMap::new();
        for ((pid, stack), n) in std::mem::take(&mut self.state.released) {
            *released.entry((pid, canon(stack))).or_default() += n;
        }
        self.state.released = released;

        let mut cuda_calls: CudaCalls = BTreeMap::new();
        for ((pid, function, stack), n) in std::mem::take(&mut self.state.cuda_calls) {
            let merged = cuda_calls.entry((pid, function, canon(stack))).or_default();
            merged.calls += n.calls;
            merged.failed += n.failed;
        }
        self.state.cuda_calls = cuda_calls;

        // A series point is the value of one original cell; a merged point is the sum of the
        // latest values of all the originals it merges.
        let mut latest: HashMap<CellKey, (u64, u64)> = HashMap::new();
        let mut merged_members: HashMap<CellKey, Vec<CellKey>> = HashMap::new();
        let mut series = Vec::with_capacity(self.series.len());
        for point in std::mem::take(&mut self.series) {
            let merged = CellKey {
                stack: canon(point.key.stack),
                ..point.key.clone()
            };
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
        self.series = series;

        self.stacks.retain(|index, _| !remap.contains_key(index));
    }

    /// Frames of `stack`, innermost first; a placeholder frame when the stack was lost or is not
    /// in the stack table, so that every row shows something.
    pub fn frames(&self, stack: Option<StackIndex>) -> Vec<String> {
        match stack {
            None => vec![STACK_LOST.to_string()],
            Some(index) => match self.stacks.get(&index) {
                Some(s) if !s.frames.is_empty() => s.frames.clone(),
                _ => vec![format!("[stack {index} not recorded]")],
            },
        }
    }
}

/// The file SQLite keeps beside `path` with `suffix` (`-wal`, `-shm`, `-journal`).
pub(crate) fn sidecar(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// Why a recording could not be written or read. Each message is one line that names the file,
/// the problem and what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum RecordingError {
    /// Output path checks (exists without --force, directory, missing parent directory...).
    #[error(transparent)]
    Output(#[from] OutputError),
    #[error("cannot write `{}`: {reason}", path.display())]
    Unwritable { path: PathBuf, reason: String },
    #[error("cannot write the recording `{}`: {detail}", path.display())]
    Write { path: PathBuf, detail: String },
    #[error(
        "cannot write the recording `{}`: an earlier commit failed, the file holds the data up \
         to the commit before it",
        path.display()
    )]
    WriterFailed { path: PathBuf },

    #[error("`{}` does not exist", path.display())]
    NotFound { path: PathBuf },
    #[error("`{}` is a directory: pass a file written by `alloctrace record`", path.display())]
    IsDirectory { path: PathBuf },
    #[error("cannot read `{}`: {reason}", path.display())]
    Unreadable { path: PathBuf, reason: String },
    #[error(
        "`{}` is empty, not an alloctrace recording: pass a file written by `alloctrace record`",
        path.display()
    )]
    Empty { path: PathBuf },
    #[error(
        "`{}` is not an alloctrace recording (not a SQLite database): pass a file written by \
         `alloctrace record`",
        path.display()
    )]
    NotSqlite { path: PathBuf },
    #[error(
        "`{}` is not an alloctrace recording (a SQLite database of another kind): pass a file \
         written by `alloctrace record`",
        path.display()
    )]
    NotRecording { path: PathBuf },
    #[error(
        "`{}` is truncated ({size} of the {expected} bytes its header announces): copy it again \
         in full, or record again",
        path.display()
    )]
    Truncated {
        path: PathBuf,
        size: u64,
        expected: u64,
    },
    #[error(
        "`{}` is truncated or corrupt ({detail}): use an intact copy or record again",
        path.display()
    )]
    Corrupt { path: PathBuf, detail: String },
    #[error(
        "`{}` is damaged: its content differs from the digest written when it was finalized (a \
         disk, a copy or an edit changed it): use an intact copy or record again",
        path.display()
    )]
    Damaged { path: PathBuf },
    #[error(
        "`{}` was written by a newer alloctrace (schema {found}; this one reads {supported}): \
         upgrade alloctrace",
        path.display()
    )]
    NewerSchema {
        path: PathBuf,
        found: i64,
        supported: u32,
    },
    #[error(
        "`{}` holds memory class `{class}`, unknown to this alloctrace: upgrade alloctrace",
        path.display()
    )]
    UnknownClass { path: PathBuf, class: String },
}

#[cfg(test)]
mod merge_tests {
    use super::*;
    use crate::model::{CallCounts, ClassTotals, PHASE_NONE};

    fn key(stack: StackIndex) -> CellKey {
        CellKey {
            class: Class::Heap,
            pid: 1,
            phase: PHASE_NONE.into(),
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
                failures: BTreeMap::from([
                    (
                        FailureKey {
                            class: Class::Heap,
                            pid: 1,
                            function: "malloc".into(),
                            size: 9,
                            error: "ENOMEM".into(),
                            stack: Some(1),
                        },
                        2,
                    ),
                    (
                        FailureKey {
                            class: Class::Heap,
                            pid: 1,
                            function: "malloc".into(),
                            size: 9,
                            error: "ENOMEM".into(),
                            stack: Some(0),
                        },
                        1,
                    ),
                ]),
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
            totals_series: Vec::new(),
            rss: Vec::new(),
            gpu: Vec::new(),
            gpu_source: None,
            stack_capture: None,
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
