//! The recording: one SQLite file per `alloctrace record`, crash-safe, read back by the views.
//!
//! The recorder commits the ledger's state once a second in one transaction (WAL mode), so a
//! tracer killed at any moment (SIGKILL, OOM killer, power loss aside) leaves a file that opens
//! with everything up to its last commit; `finalize` marks it complete and folds the write-ahead
//! log back in so that exactly one file remains. The schema is documented, with example queries,
//! in docs/recording.md; `schema.rs` holds its DDL.

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

pub use reader::{Reader, SeriesRead};
pub use schema::{APPLICATION_ID, SCHEMA_VERSION};
pub use writer::Writer;

use crate::{
    model::{Class, GpuSample, LedgerState, RssSample, SeriesPoint, Stack, StackIndex, TargetInfo},
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
