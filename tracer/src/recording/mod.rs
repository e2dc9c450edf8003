//! The recording: one SQLite file per `alloctrace record`, crash-safe, read back by the views.
//!
//! The recorder commits the ledger's state once a second in one transaction (WAL mode), so a
//! tracer killed at any moment (SIGKILL, OOM killer, power loss aside) leaves a file that opens
//! with everything up to its last commit; `finalize` marks it complete and folds the write-ahead
//! log back in so that exactly one file remains. The schema is documented, with example queries,
//! in docs/recording.md; `schema.rs` holds its DDL.

pub mod batches;
mod integrity;
mod merge;
mod reader;
mod schema;
mod writer;

#[cfg(test)]
mod tests;

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

pub use reader::{Reader, SeriesRead};
pub use schema::{APPLICATION_ID, SCHEMA_VERSION};
pub use writer::{DISK_FULL, Writer};

use crate::{
    model::{
        AllocatorOom, AllocatorSample, CellKey, Class, GpuSample, LedgerState, RssSample,
        SeriesPoint, Stack, StackIndex, TargetInfo,
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
    /// The cells that grew after the warm-up, batch by batch (`None`: too short to judge, or
    /// not read).
    pub batches: Option<batches::SeriesBatches>,
    /// Resident memory samples, in time order.
    pub rss: Vec<RssSample>,
    /// GPU memory samples, in time order.
    pub gpu: Vec<GpuSample>,
    /// PyTorch caching-allocator figures at the seconds they changed, in time order.
    pub torch: Vec<AllocatorSample>,
    /// PyTorch caching-allocator OOMs, in time order.
    pub torch_ooms: Vec<AllocatorOom>,
    /// Where GPU samples came from, or why there are none (`None`: an older recording).
    pub gpu_source: Option<String>,
    /// How stacks were taken (`None`: an older recording).
    pub stack_capture: Option<crate::model::StackCapture>,
    /// `alloctrace check`'s thresholds, when it made the recording.
    pub check: Option<crate::model::Thresholds>,
    /// Failed allocations by second, in time order; empty for an older recording.
    pub failure_seconds: Vec<crate::model::FailureSecond>,
    /// Phases' entries by second (`record --phase`, native rules), in time order; empty for an
    /// older recording.
    pub phase_activity: Vec<crate::model::PhaseActivity>,
    /// Seconds in which the live memory of a Python function's phase changed (`record --phase
    /// NAME=py:...`, whose calls are not counted), as (second, phase), in time order: where the
    /// timeline draws those phases' bands.
    pub phase_seconds: Vec<(u64, String)>,
    /// Moments a driver marked (`alloctrace check`), in order; empty for a plain recording.
    pub marks: Vec<crate::model::Mark>,
    /// `record --phase`: the rules and their figures (`None`: no rule was given).
    pub phases: Option<crate::model::Phases>,
    /// Why the recording ended ("duration elapsed", "target exited (...)"); `None` unless
    /// finalized (or an older recording).
    pub stop_reason: Option<String>,
    /// Why writing stopped before the end ("the file system was full (ENOSPC)"), when it did.
    pub write_failure: Option<String>,
    /// The traced processes that ended during the recording, in the order seen.
    pub exits: Vec<ProcessExit>,
    /// A duty-cycled heap: for each heap cell, the windows its live bytes rose in
    /// (`survivor_windows`); empty otherwise, or when the series was not read.
    pub heap_windows_grown: BTreeMap<CellKey, u32>,
}

/// How a traced process ended during the recording (meta `exits`, docs/recording.md). With
/// neither `code` nor `signal` its status could not be read.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ProcessExit {
    pub pid: u32,
    /// Seconds from the start of the recording to when the recorder saw it end.
    pub t_s: f64,
    /// Its exit code, when it exited.
    pub code: Option<i32>,
    /// The signal that killed it (`SIGKILL`), when one did.
    pub signal: Option<String>,
    /// Killed by the kernel's OOM killer.
    pub oom_kill: bool,
    pub core_dumped: bool,
    /// alloctrace stopped it: a command it launched, at the end of `-d` or on a signal.
    pub stopped_by_alloctrace: bool,
}

impl ProcessExit {
    /// An end whose status is not known (yet).
    pub fn unknown(pid: u32, t_s: f64) -> ProcessExit {
        ProcessExit {
            pid,
            // Milliseconds: the recorder sees an end within its 10 ms poll at best.
            t_s: (t_s * 1000.0).round() / 1000.0,
            ..ProcessExit::default()
        }
    }

    /// The end that `status` (`waitpid`'s encoding) describes.
    pub fn from_wait_status(pid: u32, t_s: f64, status: i32) -> ProcessExit {
        let mut exit = ProcessExit::unknown(pid, t_s);
        if libc::WIFEXITED(status) {
            exit.code = Some(libc::WEXITSTATUS(status));
        } else if libc::WIFSIGNALED(status) {
            exit.signal = Some(signal_name(libc::WTERMSIG(status)));
            exit.core_dumped = libc::WCOREDUMP(status);
        }
        exit
    }

    /// Killed by a signal nobody at alloctrace sent: the death a report opens on.
    pub fn is_death(&self) -> bool {
        self.signal.is_some() && !self.stopped_by_alloctrace
    }

    /// "exited with status 1", "killed by SIGKILL (the OOM killer)", ...
    pub fn describe(&self) -> String {
        match (&self.signal, self.code) {
            (Some(signal), _) if self.stopped_by_alloctrace => {
                format!("stopped by alloctrace with {signal}")
            }
            (Some(signal), _) if self.oom_kill => format!("killed by {signal} (the OOM killer)"),
            (Some(signal), _) if self.core_dumped => format!("killed by {signal} (core dumped)"),
            (Some(signal), _) => format!("killed by {signal}"),
            (None, Some(code)) => format!("exited with status {code}"),
            (None, None) => "ended (its exit status could not be read)".to_string(),
        }
    }
}

/// `SIGKILL` for 9; `signal 34` for signals without a name (real-time ones).
pub fn signal_name(signal: i32) -> String {
    nix::sys::signal::Signal::try_from(signal)
        .map(|s| s.as_str().to_string())
        .unwrap_or_else(|_| format!("signal {signal}"))
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
    #[error(
        "cannot write the recording `{}`: the file system is full (ENOSPC): free space there or \
         record to another file system{}",
        path.display(),
        if *kept { "; the file keeps what was committed before" } else { "" }
    )]
    DiskFull {
        path: PathBuf,
        /// Whether the file stays, with what was committed before.
        kept: bool,
    },

    #[error("`{}` does not exist", path.display())]
    NotFound { path: PathBuf },
    /// The recording cannot answer what was asked of it (`--warmup-requests` without
    /// requests).
    #[error("{what} (`{}`)", path.display())]
    CannotTell { path: PathBuf, what: String },
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
