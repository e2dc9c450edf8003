//! Reading a recording back, finalized or not, without ever modifying it.

use std::{
    collections::{BTreeMap, HashMap},
    fs::File,
    io::{self, Read},
    path::{Path, PathBuf},
};

use rusqlite::{Connection, OpenFlags, OptionalExtension, Row, types::Value};

use super::{
    ProcessExit, Recorded, RecordingError, TotalsPoint,
    batches::{self, SeriesBatches, StepMeans},
    schema::{APPLICATION_ID, AmountsTable, FAULTS, RELEASED, SCHEMA_VERSION, from_sql, meta},
    sidecar,
};
use crate::{
    model::{
        AllocatorFigures, AllocatorOom, AllocatorSample, AmountsByStack, CellKey, Class,
        ClassTotals, CudaCalls, FailureKey, GpuSample, LedgerState, RssSample, SeriesPoint, Stack,
        StackCounters, StackIndex, TargetInfo, Warmup,
    },
    output::{self, io_reason},
};

/// The phases of the recording's Python rules (`NAME=py:...`).
fn python_phases(phases: Option<&crate::model::Phases>) -> Vec<String> {
    let rules = phases.iter().flat_map(|p| &p.rules);
    let mut names: Vec<String> = rules
        .filter(|r| r.rule.contains("=py:"))
        .map(|r| r.name.clone())
        .collect();
    names.sort();
    names.dedup();
    names
}

/// The first 16 bytes of every SQLite database file.
const SQLITE_MAGIC: &[u8; 16] = b"SQLite format 3\0";

pub struct Reader;

/// How much of the per-cell time series `Reader::open_with` loads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SeriesRead {
    /// Every point: what a time-series view needs. Hours of a busy target are millions of
    /// points (tens of bytes each in memory).
    All,
    /// Only the points at the first second and each cell's last point: enough for growth from
    /// start to end (the text report), in memory proportional to the cells.
    Endpoints,
    /// No point, only the batches (the JSON report).
    Batches,
    /// None: the flame graph uses the final state only.
    Nothing,
}

impl Reader {
    /// Reads the whole recording at `path`. A recording whose tracer was killed opens too
    /// (`complete` is false), with the data of its last commit, also when its `-wal` file is still
    /// beside it. The file is opened read-only: reading never changes it.
    pub fn open(path: &Path) -> Result<Recorded, RecordingError> {
        Self::open_with(path, SeriesRead::All)
    }

    /// `open`, loading only `series` of the per-cell time series (`Recorded::series`).
    pub fn open_with(path: &Path, series: SeriesRead) -> Result<Recorded, RecordingError> {
        Self::open_judged(path, series, None)
    }

    /// `open_with`, the leak suspects judged after the warm-up `warmup` (by default
    /// the recording's first third).
    pub fn open_judged(
        path: &Path,
        series: SeriesRead,
        warmup: Option<Warmup>,
    ) -> Result<Recorded, RecordingError> {
        match Self::read(path, series, warmup) {
            // Say "truncated" only when the header proves it: a copy or download cut short is
            // the common case, and its remedy differs.
            Err(RecordingError::Corrupt { path, detail }) => match truncation(&path) {
                Some((size, expected)) => Err(RecordingError::Truncated {
                    path,
                    size,
                    expected,
                }),
                None => Err(RecordingError::Corrupt { path, detail }),
            },
            other => other,
        }
    }

    fn read(
        path: &Path,
        series: SeriesRead,
        warmup: Option<Warmup>,
    ) -> Result<Recorded, RecordingError> {
        let wal_mode = check_file(path)?;
        let ReadOnly { conn, leftover } =
            open_read_only(path, wal_mode).map_err(|e| read_error(path, e))?;
        let reading = Reading {
            conn: &conn,
            path: path.to_path_buf(),
        };
        let recorded = reading.verify().and_then(|schema| {
            reading
                .read_all(schema, series, warmup)
                .map_err(|e| match e {
                    ReadFailure::Sqlite(e) => read_error(path, e),
                    ReadFailure::Recording(e) => e,
                })
        });
        drop(conn);
        match leftover {
            Leftover::Nothing => {}
            Leftover::Shm(shm) => {
                let _ = std::fs::remove_file(shm);
            }
            Leftover::Copy(dir) => {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
        recorded
    }
}

/// Column `i` as an owned value. rusqlite's own conversion (`Value: From<ValueRef>`) panics on
/// text that is not UTF-8, which a damaged or hostile file can hold: here it is an error.
fn owned_value(row: &Row<'_>, i: usize) -> rusqlite::Result<Value> {
    use rusqlite::types::{FromSqlError, ValueRef};
    Ok(match row.get_ref(i)? {
        ValueRef::Text(t) => match std::str::from_utf8(t) {
            Ok(s) => Value::Text(s.to_string()),
            Err(e) => {
                return Err(rusqlite::Error::FromSqlConversionFailure(
                    i,
                    rusqlite::types::Type::Text,
                    Box::new(FromSqlError::Other(Box::new(e))),
                ));
            }
        },
        other => Value::from(other),
    })
}

/// A read-only connection, and what reading it left that must go after closing it.
struct ReadOnly {
    conn: Connection,
    leftover: Leftover,
}

enum Leftover {
    Nothing,
    /// The `-shm` file SQLite had to create beside the recording.
    Shm(PathBuf),
    /// A private copy of the recording and its log, in a directory of its own.
    Copy(PathBuf),
}

/// Opens `path` for reading, leaving nothing beside it afterwards.
///
/// A finalized recording is a plain database file. One whose tracer was killed is in WAL mode,
/// and SQLite creates the `-wal` and `-shm` files it lacks (when only the main file, or no
/// `-shm`, was copied) and leaves them behind. So: without a `-wal` there is nothing to replay
/// and the file is read as immutable; a `-wal` without a `-shm` needs SQLite's index of the log,
/// which it builds in a new `-shm`, removed after reading (no writer can be using it: a live
/// writer always has its `-shm`). Where that `-shm` cannot be created (a read-only mount, a
/// directory this user may not write), the recording and its log are copied to a private
/// directory and read there: opening it immutable would ignore the log, and with it every commit
/// since the last checkpoint.
fn open_read_only(path: &Path, wal_mode: bool) -> rusqlite::Result<ReadOnly> {
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let wal = sidecar(path, "-wal");
    if wal_mode && !wal.exists() {
        let conn = Connection::open_with_flags(
            format!("{}?immutable=1", file_uri(path)),
            flags | OpenFlags::SQLITE_OPEN_URI,
        )?;
        return Ok(ReadOnly {
            conn,
            leftover: Leftover::Nothing,
        });
    }
    let shm = sidecar(path, "-shm");
    let needs_shm = wal_mode && !shm.exists();
    if needs_shm && !accepts_new_files(&output::parent_dir(path)) {
        return open_private_copy(path, &wal);
    }
    let conn = Connection::open_with_flags(path, flags)?;
    // A live recorder can hold the log's index for a moment (at a checkpoint): wait, not fail.
    conn.busy_timeout(std::time::Duration::from_secs(2))?;
    let leftover = if needs_shm {
        Leftover::Shm(shm)
    } else {
        Leftover::Nothing
    };
    Ok(ReadOnly { conn, leftover })
}

/// Whether this process may create files in `dir` (false on a read-only mount even for root).
fn accepts_new_files(dir: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c_dir) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: a valid NUL-terminated path; access(2) only reads it.
    unsafe { libc::access(c_dir.as_ptr(), libc::W_OK | libc::X_OK) == 0 }
}

/// Copies the recording and its log into a new owner-only directory and opens the copy.
fn open_private_copy(path: &Path, wal: &Path) -> rusqlite::Result<ReadOnly> {
    let cant_open = |e: io::Error| {
        rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CANTOPEN),
            Some(format!(
                "its directory is read-only and a private copy failed: {}",
                io_reason(&e)
            )),
        )
    };
    let dir = private_dir().map_err(cant_open)?;
    let copy = dir.join("recording");
    let copied = std::fs::copy(path, &copy)
        .and_then(|_| std::fs::copy(wal, sidecar(&copy, "-wal")))
        .map_err(cant_open);
    let opened = copied.and_then(|_| {
        Connection::open_with_flags(
            &copy,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
    });
    match opened {
        Ok(conn) => Ok(ReadOnly {
            conn,
            leftover: Leftover::Copy(dir),
        }),
        Err(e) => {
            let _ = std::fs::remove_dir_all(&dir);
            Err(e)
        }
    }
}

/// A new directory only this user can enter, under the temporary directory.
fn private_dir() -> io::Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    let base = std::env::temp_dir();
    for n in 0u32.. {
        let dir = base.join(format!("alloctrace-read-{}-{n}", std::process::id()));
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(io::ErrorKind::AlreadyExists.into())
}

/// `path` as an SQLite `file:` URI, percent-encoding all but unreserved characters and `/`.
fn file_uri(path: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let mut uri = String::from("file:");
    for &b in path.as_os_str().as_bytes() {
        if b.is_ascii_alphanumeric() || b"/-._~".contains(&b) {
            uri.push(b as char);
        } else {
            uri.push_str(&format!("%{b:02X}"));
        }
    }
    uri
}

/// Checks what the file system can tell before SQLite gets the file, for precise messages: a
/// missing file, a directory, an empty file, a file that is not SQLite at all. Returns whether
/// the file is in WAL mode (a recording not finalized).
fn check_file(path: &Path) -> Result<bool, RecordingError> {
    let p = || path.to_path_buf();
    let metadata = std::fs::metadata(path).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => RecordingError::NotFound { path: p() },
        _ => RecordingError::Unreadable {
            path: p(),
            reason: io_reason(&e),
        },
    })?;
    if metadata.is_dir() {
        return Err(RecordingError::IsDirectory { path: p() });
    }
    if metadata.len() == 0 {
        return Err(RecordingError::Empty { path: p() });
    }
    let mut header = Vec::with_capacity(100);
    File::open(path)
        .and_then(|f| f.take(100).read_to_end(&mut header))
        .map_err(|e| RecordingError::Unreadable {
            path: p(),
            reason: io_reason(&e),
        })?;
    if !header.starts_with(SQLITE_MAGIC) {
        return Err(RecordingError::NotSqlite { path: p() });
    }
    // File format write/read versions at offsets 18 and 19: 2 means WAL.
    Ok(header.len() >= 20 && (header[18] == 2 || header[19] == 2))
}

/// (file size, size from the header) when the file is shorter than its SQLite header says.
fn truncation(path: &Path) -> Option<(u64, u64)> {
    let mut header = [0u8; 100];
    File::open(path).ok()?.read_exact(&mut header).ok();
    let actual = std::fs::metadata(path).ok()?.len();
    let be32 = |at: usize| u32::from_be_bytes(header[at..at + 4].try_into().unwrap());
    // Page size at 16 (1 means 65536); page count at 28, valid when the change counter at 24
    // equals the "version valid for" number at 92.
    let page_size = match u16::from_be_bytes([header[16], header[17]]) {
        1 => 65536,
        n => u64::from(n),
    };
    if page_size < 512 || be32(24) != be32(92) {
        return None;
    }
    let expected = page_size * u64::from(be32(28));
    (actual < expected).then_some((actual, expected))
}

/// The largest figure a recording may hold, and the largest sum of one kind of figure over its
/// rows: 2^60 (1 EiB, or 10^18 calls). No trace comes near: the heap allocated in a recording,
/// all cells together, would be 10 GB/s for three and a half years. A bound the views can count
/// on: their arithmetic (a few such totals added, pages times the page size, differences as
/// i64) never overflows, where a forged recording's 2^63 would panic or wrap.
pub const FIGURE_LIMIT: u64 = 1 << 60;

/// The sum of `values`, the figures `what`, if it stays within `FIGURE_LIMIT`.
fn within_limit(what: &str, values: impl IntoIterator<Item = u64>) -> Result<u64, String> {
    values
        .into_iter()
        .try_fold(0u64, |sum, v| {
            sum.checked_add(v).filter(|&s| s <= FIGURE_LIMIT)
        })
        .ok_or_else(|| format!("figures out of range: {what} over 2^60"))
}

/// Each of `values` (figures of one row, never added up) within `FIGURE_LIMIT`.
fn each_within_limit(what: &str, values: impl IntoIterator<Item = u64>) -> Result<(), String> {
    values
        .into_iter()
        .try_for_each(|v| within_limit(what, [v]).map(drop))
}

/// A kind of figure of a row of type `T`: its name and how to get it.
type Figure<T> = (&'static str, fn(&T) -> u64);

/// Every figure of `rec` within `FIGURE_LIMIT`, and every sum the views or the merge of stacks
/// make: the figures of one kind over all rows of the final state, over the points of one second
/// of the series. Samples are never added up: each is bounded alone.
fn check_figures(rec: &Recorded) -> Result<(), String> {
    let s = &rec.state;
    let counters: [Figure<StackCounters>; 6] = [
        ("live bytes", |c| c.live_bytes),
        ("live blocks", |c| c.live_count),
        ("allocated bytes", |c| c.allocated_bytes),
        ("allocated blocks", |c| c.allocated_count),
        ("freed bytes", |c| c.freed_bytes),
        ("freed blocks", |c| c.freed_count),
    ];
    for (what, field) in counters {
        within_limit(&format!("the cells' {what}"), s.cells.values().map(field))?;
    }
    let totals: [Figure<ClassTotals>; 6] = [
        ("live bytes", |t| t.live_bytes),
        ("live blocks", |t| t.live_count),
        ("peak bytes", |t| t.peak_bytes),
        ("allocated bytes", |t| t.allocated_bytes),
        ("allocated blocks", |t| t.allocated_count),
        ("freed blocks", |t| t.freed_count),
    ];
    for (what, field) in totals {
        within_limit(
            &format!("the class totals' {what}"),
            s.totals.values().map(field),
        )?;
    }
    within_limit("failed calls", s.failures.values().copied())?;
    within_limit("unmatched frees", [s.unmatched_frees])?;
    within_limit("lost events", s.lost_events.values().copied())?;
    // Shown as bytes: pages times the page size.
    let pages = within_limit("pages faulted in", s.faults.values().copied())?;
    within_limit(
        "bytes faulted in",
        [pages.saturating_mul(crate::model::PAGE)],
    )?;
    within_limit("released bytes", s.released.values().copied())?;
    within_limit("CUDA calls", s.cuda_calls.values().map(|c| c.calls))?;
    within_limit("failed CUDA calls", s.cuda_calls.values().map(|c| c.failed))?;
    check_series_and_samples(rec)
}

/// The time series (summed per second) and the samples (each alone) within `FIGURE_LIMIT`.
fn check_series_and_samples(rec: &Recorded) -> Result<(), String> {
    let mut per_second: BTreeMap<u64, (u64, u64)> = BTreeMap::new();
    for p in &rec.series {
        within_limit("a second of the series", [p.t_s])?;
        let (bytes, blocks) = per_second.entry(p.t_s).or_default();
        *bytes = within_limit("the series' live bytes of a second", [*bytes, p.live_bytes])?;
        *blocks = within_limit(
            "the series' live blocks of a second",
            [*blocks, p.live_count],
        )?;
    }
    for p in &rec.totals_series {
        each_within_limit(
            "a point of the class series",
            [p.t_s, p.live_bytes, p.live_count],
        )?;
    }
    for s in &rec.rss {
        let figures = [s.t_s, s.rss, s.anon, s.file, s.shmem, s.swap, s.arena];
        each_within_limit("a resident-memory sample", figures)?;
        each_within_limit(
            "a resident-memory sample",
            [s.traced_resident, s.arena_resident],
        )?;
    }
    for s in &rec.gpu {
        each_within_limit("a GPU sample", [s.t_s, s.used, s.traced])?;
    }
    let allocator = (rec.torch.iter().map(|s| (s.t_s, &s.figures)))
        .chain(rec.torch_ooms.iter().map(|o| (o.t_s, &o.figures)));
    for (t_s, f) in allocator {
        let figures = [
            t_s,
            f.reserved,
            f.allocated,
            f.pending,
            f.segments,
            f.blocks,
            f.holes,
            f.hole_bytes,
            f.largest_hole,
            f.private_pools,
            f.private_reserved,
            f.private_allocated,
            f.sleeping,
        ];
        each_within_limit("a PyTorch allocator sample", figures)?;
    }
    for o in &rec.torch_ooms {
        each_within_limit("a PyTorch allocator OOM", [o.requested, o.device_free])?;
    }
    Ok(())
}

/// A SQLite error while reading, as the most precise `RecordingError`.
fn read_error(path: &Path, e: rusqlite::Error) -> RecordingError {
    use rusqlite::ErrorCode;
    let p = path.to_path_buf();
    match &e {
        rusqlite::Error::SqliteFailure(f, msg) => {
            let detail = msg
                .clone()
                .unwrap_or_else(|| f.to_string())
                .replace('\n', " ");
            match f.code {
                ErrorCode::NotADatabase => RecordingError::NotSqlite { path: p },
                ErrorCode::PermissionDenied | ErrorCode::CannotOpen => RecordingError::Unreadable {
                    path: p,
                    reason: detail,
                },
                // Malformed pages, short reads of a cut file, missing tables or columns: all
                // mean the file is not what the writer left.
                _ => RecordingError::Corrupt { path: p, detail },
            }
        }
        other => RecordingError::Corrupt {
            path: p,
            detail: other.to_string().replace('\n', " "),
        },
    }
}

enum ReadFailure {
    Sqlite(rusqlite::Error),
    Recording(RecordingError),
}

impl From<rusqlite::Error> for ReadFailure {
    fn from(e: rusqlite::Error) -> Self {
        ReadFailure::Sqlite(e)
    }
}

impl From<RecordingError> for ReadFailure {
    fn from(e: RecordingError) -> Self {
        ReadFailure::Recording(e)
    }
}

/// The `meta` table's values, read by type; a value of the wrong type is corruption.
struct Meta<'r> {
    values: HashMap<String, Value>,
    reading: &'r Reading<'r>,
}

impl Meta<'_> {
    fn wrong_type(&self, key: &str, value: &Value) -> RecordingError {
        self.reading.corrupt(format!("meta `{key}` is {value:?}"))
    }

    fn int(&self, key: &str) -> Result<Option<u64>, RecordingError> {
        match self.values.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Integer(i)) => Ok(Some(from_sql(*i))),
            Some(other) => Err(self.wrong_type(key, other)),
        }
    }

    fn text(&self, key: &str) -> Result<String, RecordingError> {
        match self.values.get(key) {
            Some(Value::Text(s)) => Ok(s.clone()),
            None => Err(self.reading.corrupt(format!("meta `{key}` is missing"))),
            Some(other) => Err(self.wrong_type(key, other)),
        }
    }

    /// A text value that older recordings lack (anything else reads as absent).
    fn optional_text(&self, key: &str) -> Option<&str> {
        match self.values.get(key) {
            Some(Value::Text(s)) => Some(s),
            _ => None,
        }
    }

    /// Seconds, 0 when absent or not a number.
    fn seconds(&self, key: &str) -> f64 {
        match self.values.get(key) {
            Some(Value::Real(r)) => *r,
            Some(Value::Integer(i)) => *i as f64,
            _ => 0.0,
        }
    }
}

struct Reading<'a> {
    conn: &'a Connection,
    path: PathBuf,
}

impl Reading<'_> {
    fn corrupt(&self, detail: impl Into<String>) -> RecordingError {
        RecordingError::Corrupt {
            path: self.path.clone(),
            detail: detail.into(),
        }
    }

    /// Structure, identity and version, before any table is read. Returns the schema version.
    fn verify(&self) -> Result<u32, RecordingError> {
        let read_err = |e| read_error(&self.path, e);
        // quick_check reads every page of every b-tree (not the index contents): a cut or
        // overwritten file fails here rather than halfway through reading.
        let mut check = self
            .conn
            .prepare("PRAGMA quick_check(1)")
            .map_err(read_err)?;
        let verdict: String = check.query_row([], |r| r.get(0)).map_err(read_err)?;
        if verdict != "ok" {
            let problem = verdict
                .trim_start_matches("*** in database main ***")
                .trim();
            return Err(self.corrupt(format!("integrity check: {}", problem.replace('\n', " "))));
        }
        let application_id: i32 = self
            .conn
            .pragma_query_value(None, "application_id", |r| r.get(0))
            .map_err(read_err)?;
        if application_id != APPLICATION_ID {
            return Err(RecordingError::NotRecording {
                path: self.path.clone(),
            });
        }
        let version: i64 = self
            .conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(read_err)?;
        if version > i64::from(SCHEMA_VERSION) {
            return Err(RecordingError::NewerSchema {
                path: self.path.clone(),
                found: version,
                supported: SCHEMA_VERSION,
            });
        }
        if version < 1 {
            return Err(self.corrupt(format!("schema version {version}")));
        }
        self.check_digest()?;
        Ok(version as u32)
    }

    /// A finalized recording's content against the digest written at finalize.
    fn check_digest(&self) -> Result<(), RecordingError> {
        let read_err = |e| read_error(&self.path, e);
        let stored: Option<Value> = self
            .conn
            .query_row(
                "SELECT value FROM meta WHERE key = ?1",
                [meta::CONTENT_DIGEST],
                |r| owned_value(r, 0),
            )
            .optional()
            .map_err(read_err)?;
        let Some(stored) = stored else {
            // Not finalized (the tracer was killed), or written before digests existed.
            return Ok(());
        };
        let actual = super::integrity::content_digest(self.conn).map_err(read_err)?;
        match stored {
            Value::Text(stored) if stored == actual => Ok(()),
            _ => Err(RecordingError::Damaged {
                path: self.path.clone(),
            }),
        }
    }

    fn read_all(
        &self,
        schema: u32,
        series_read: SeriesRead,
        warmup: Option<Warmup>,
    ) -> Result<Recorded, ReadFailure> {
        // One read transaction: a recording being written meanwhile is read at one commit.
        self.conn.execute_batch("BEGIN")?;
        let meta_values = self.read_meta()?;
        let stacks = self.read_stacks()?;
        let (cells, keys_by_id) = self.read_cells()?;
        let totals = self.read_totals()?;
        let failures = self.read_failures()?;
        let lost_events = self.read_lost_events()?;
        let series = self.read_series(&keys_by_id, series_read)?;
        let duration_s = meta_values
            .get(meta::DURATION_S)
            .and_then(|v| match v {
                Value::Real(s) => Some(*s),
                Value::Integer(s) => Some(*s as f64),
                _ => None,
            })
            .unwrap_or(0.0);
        // Added within version 1: older files have no such table.
        let phase_activity = if self.has_table("phase_activity")? {
            self.read_phase_activity()?
        } else {
            Vec::new()
        };
        let warmup_s = match warmup.map(|w| w.seconds(&phase_activity, duration_s)) {
            Some(Err(what)) => {
                return Err(ReadFailure::Recording(RecordingError::CannotTell {
                    path: self.path.clone(),
                    what,
                }));
            }
            Some(Ok(s)) => Some(s),
            None => None,
        };
        let batches = match series_read {
            SeriesRead::Nothing => None,
            _ => self.read_batches(&keys_by_id, duration_s, warmup_s)?,
        };
        let totals_series = self.read_totals_series()?;
        let rss = self.read_rss_samples()?;
        let gpu = self.read_gpu_samples()?;
        // Added within version 1: older files have neither table.
        let (torch, torch_ooms) = if self.has_table("torch_samples")? {
            (self.read_torch_samples()?, self.read_torch_ooms()?)
        } else {
            (Vec::new(), Vec::new())
        };
        let phases: Option<crate::model::Phases> = match meta_values.get(meta::PHASES) {
            Some(Value::Text(json)) => serde_json::from_str(json).ok(),
            _ => None,
        };
        let phase_seconds = self.read_phase_seconds(&python_phases(phases.as_ref()))?;
        let failure_seconds = if self.has_table("failure_seconds")? {
            self.read_failure_seconds()?
        } else {
            Vec::new()
        };
        let faults = self.read_amounts(&FAULTS)?;
        let released = self.read_amounts(&RELEASED)?;
        let cuda_calls = self.read_cuda_calls()?;
        let stack_capture: Option<crate::model::StackCapture> =
            match meta_values.get(meta::STACK_CAPTURE) {
                Some(Value::Text(json)) => serde_json::from_str(json).ok(),
                _ => None,
            };
        let heap_windows_grown = match stack_capture.as_ref().and_then(|s| s.heap_duty.as_ref()) {
            Some(duty) if series_read != SeriesRead::Nothing => {
                self.read_windows_grown(&keys_by_id, duty)?
            }
            _ => BTreeMap::new(),
        };
        self.conn.execute_batch("COMMIT")?;

        let metadata = Meta {
            values: meta_values,
            reading: self,
        };
        let pids: Vec<u32> = serde_json::from_str(&metadata.text(meta::TARGET_PIDS)?)
            .map_err(|e| self.corrupt(format!("meta `{}`: {e}", meta::TARGET_PIDS)))?;
        let exits: Vec<ProcessExit> = match metadata.optional_text(meta::EXITS) {
            Some(json) => serde_json::from_str(json)
                .map_err(|e| self.corrupt(format!("meta `{}`: {e}", meta::EXITS)))?,
            None => Vec::new(),
        };
        let mut recorded = Recorded {
            schema,
            tool_version: metadata.text(meta::TOOL_VERSION)?,
            target: TargetInfo {
                pids,
                command: metadata.text(meta::TARGET_COMMAND)?,
                attached: metadata.int(meta::TARGET_ATTACHED)? == Some(1),
            },
            started_unix_ns: metadata.int(meta::STARTED_UNIX_NS)?.unwrap_or(0),
            ended_unix_ns: metadata.int(meta::ENDED_UNIX_NS)?,
            duration_s: metadata.seconds(meta::DURATION_S),
            complete: metadata.int(meta::COMPLETE)? == Some(1),
            state: LedgerState {
                faults,
                released,
                cuda_calls,
                totals,
                cells,
                failures,
                unmatched_frees: metadata.int(meta::UNMATCHED_FREES)?.unwrap_or(0),
                lost_events,
            },
            stacks,
            series,
            totals_series,
            batches,
            rss,
            gpu,
            torch,
            torch_ooms,
            gpu_source: metadata.optional_text(meta::GPU_SOURCE).map(str::to_string),
            stack_capture,
            check: metadata
                .optional_text(meta::CHECK)
                .and_then(|json| serde_json::from_str(json).ok()),
            phase_activity,
            phase_seconds,
            failure_seconds,
            marks: metadata
                .optional_text(meta::MARKS)
                .and_then(|json| serde_json::from_str(json).ok())
                .unwrap_or_default(),
            phases,
            stop_reason: metadata
                .optional_text(meta::STOP_REASON)
                .map(str::to_string),
            write_failure: metadata
                .optional_text(meta::WRITE_FAILURE)
                .map(str::to_string),
            exits,
            heap_windows_grown,
        };
        // Before merging, which adds figures of stacks that name the same.
        check_figures(&recorded).map_err(|detail| self.corrupt(detail))?;
        recorded.merge_identical_stacks();
        Ok(recorded)
    }

    fn read_meta(&self) -> Result<HashMap<String, Value>, ReadFailure> {
        let mut stmt = self.conn.prepare("SELECT key, value FROM meta")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, owned_value(r, 1)?)))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    fn class(&self, name: &str) -> Result<Class, RecordingError> {
        Class::from_name(name).ok_or_else(|| RecordingError::UnknownClass {
            path: self.path.clone(),
            class: name.to_string(),
        })
    }

    fn stack_index(&self, id: Option<i64>) -> Result<Option<StackIndex>, RecordingError> {
        id.map(|id| StackIndex::try_from(id).map_err(|_| self.corrupt(format!("stack id {id}"))))
            .transpose()
    }

    /// Runs `sql` and hands each row to `each`.
    fn for_each_row(
        &self,
        sql: &str,
        mut each: impl FnMut(&Row<'_>) -> Result<(), ReadFailure>,
    ) -> Result<(), ReadFailure> {
        let mut stmt = self.conn.prepare(sql)?;
        let mut rows = stmt.query([])?;
        while let Some(row) = rows.next()? {
            each(row)?;
        }
        Ok(())
    }

    /// Runs `sql` and collects `item` of each row.
    fn collect_rows<T, C: FromIterator<T>>(
        &self,
        sql: &str,
        mut item: impl FnMut(&Row<'_>) -> Result<T, ReadFailure>,
    ) -> Result<C, ReadFailure> {
        let mut items = Vec::new();
        self.for_each_row(sql, |row| {
            items.push(item(row)?);
            Ok(())
        })?;
        Ok(items.into_iter().collect())
    }

    fn read_stacks(&self) -> Result<BTreeMap<StackIndex, Stack>, ReadFailure> {
        self.collect_rows("SELECT id, frames FROM stacks", |row| {
            let id: i64 = row.get(0)?;
            let frames: String = row.get(1)?;
            let index = self.stack_index(Some(id))?.expect("an id was given");
            let frames: Vec<String> = serde_json::from_str(&frames)
                .map_err(|e| self.corrupt(format!("frames of stack {id}: {e}")))?;
            Ok((index, Stack { index, frames }))
        })
    }

    #[allow(clippy::type_complexity)]
    fn read_cells(
        &self,
    ) -> Result<(BTreeMap<CellKey, StackCounters>, HashMap<i64, CellKey>), ReadFailure> {
        let (mut cells, mut keys_by_id) = (BTreeMap::new(), HashMap::new());
        let sql = "SELECT id, class, phase, stack_id, live_bytes, live_count, allocated_bytes,
                          allocated_count, freed_bytes, freed_count, pid
                   FROM cells";
        self.for_each_row(sql, |row| {
            let id: i64 = row.get(0)?;
            let class: String = row.get(1)?;
            let key = CellKey {
                class: self.class(&class)?,
                pid: row.get(10)?,
                phase: row.get(2)?,
                stack: self.stack_index(row.get(3)?)?,
            };
            let counters = StackCounters {
                live_bytes: from_sql(row.get(4)?),
                live_count: from_sql(row.get(5)?),
                allocated_bytes: from_sql(row.get(6)?),
                allocated_count: from_sql(row.get(7)?),
                freed_bytes: from_sql(row.get(8)?),
                freed_count: from_sql(row.get(9)?),
            };
            // A zero row only exists to name series points (see the writer); it is no cell of
            // the ledger's state.
            if counters != StackCounters::default() {
                cells.insert(key.clone(), counters);
            }
            keys_by_id.insert(id, key);
            Ok(())
        })?;
        Ok((cells, keys_by_id))
    }

    fn read_totals(&self) -> Result<BTreeMap<Class, ClassTotals>, ReadFailure> {
        let sql = "SELECT class, live_bytes, live_count, peak_bytes, allocated_bytes,
                          allocated_count, freed_count
                   FROM totals";
        self.collect_rows(sql, |row| {
            let class: String = row.get(0)?;
            let totals = ClassTotals {
                live_bytes: from_sql(row.get(1)?),
                live_count: from_sql(row.get(2)?),
                peak_bytes: from_sql(row.get(3)?),
                allocated_bytes: from_sql(row.get(4)?),
                allocated_count: from_sql(row.get(5)?),
                freed_count: from_sql(row.get(6)?),
            };
            Ok((self.class(&class)?, totals))
        })
    }

    fn read_failures(&self) -> Result<BTreeMap<FailureKey, u64>, ReadFailure> {
        let sql = "SELECT class, function, size, error, stack_id, count, pid FROM failures";
        self.collect_rows(sql, |row| {
            let class: String = row.get(0)?;
            let key = FailureKey {
                class: self.class(&class)?,
                pid: row.get(6)?,
                function: row.get(1)?,
                size: from_sql(row.get(2)?),
                error: row.get(3)?,
                stack: self.stack_index(row.get(4)?)?,
            };
            Ok((key, from_sql(row.get(5)?)))
        })
    }

    fn read_lost_events(&self) -> Result<BTreeMap<String, u64>, ReadFailure> {
        self.collect_rows("SELECT cause, count FROM lost_events", |row| {
            Ok((row.get(0)?, from_sql(row.get(1)?)))
        })
    }

    /// The cells that grew after the warm-up, batch by batch, streamed one cell at a time.
    fn read_batches(
        &self,
        keys: &HashMap<i64, CellKey>,
        duration_s: f64,
        warmup_s: Option<f64>,
    ) -> Result<Option<SeriesBatches>, ReadFailure> {
        let last_t: Option<i64> =
            self.conn
                .query_row("SELECT MAX(t_s) FROM series", [], |row| row.get(0))?;
        let Some(window) =
            last_t.and_then(|t| batches::judged_window(from_sql(t), duration_s, warmup_s))
        else {
            return Ok(None);
        };
        let mut out = SeriesBatches {
            from_s: window.0,
            to_s: window.1,
            cells: Vec::new(),
        };
        let mut current: Option<(i64, StepMeans)> = None;
        let mut finish = |current: Option<(i64, StepMeans)>| -> Result<(), ReadFailure> {
            if let Some((id, means)) = current {
                let key = keys
                    .get(&id)
                    .ok_or_else(|| self.corrupt(format!("series point of unknown cell {id}")))?;
                out.add(key, means.finish());
            }
            Ok(())
        };
        self.for_each_row(
            "SELECT cell_id, t_s, live_bytes FROM series ORDER BY cell_id, rowid",
            |row| {
                let id: i64 = row.get(0)?;
                if current.as_ref().is_none_or(|(c, _)| *c != id) {
                    finish(current.replace((id, StepMeans::new(window))))?;
                }
                if let Some((_, means)) = current.as_mut() {
                    let t: u64 = from_sql(row.get(1)?);
                    means.push(t as f64, from_sql(row.get(2)?));
                }
                Ok(())
            },
        )?;
        finish(current)?;
        Ok(Some(out))
    }

    /// A duty-cycled heap: the windows each heap cell's live bytes rose in
    /// (`batches::WindowRises`), streamed one cell at a time.
    fn read_windows_grown(
        &self,
        keys: &HashMap<i64, CellKey>,
        duty: &crate::model::HeapDuty,
    ) -> Result<BTreeMap<CellKey, u32>, ReadFailure> {
        let mut grown = BTreeMap::new();
        if duty.window_starts_s.is_empty() {
            return Ok(grown);
        }
        let reach_s = duty.window_s + duty.detach_s + duty.grace_s;
        let mut current: Option<(i64, batches::WindowRises)> = None;
        let mut finish = |current: Option<(i64, batches::WindowRises)>| {
            if let Some((id, rises)) = current
                && rises.windows() > 0
                && let Some(key) = keys.get(&id)
            {
                grown.insert(key.clone(), rises.windows());
            }
        };
        self.for_each_row(
            "SELECT cell_id, t_s, live_bytes FROM series ORDER BY cell_id, rowid",
            |row| {
                let id: i64 = row.get(0)?;
                if keys.get(&id).is_none_or(|k| k.class != Class::Heap) {
                    return Ok(());
                }
                if current.as_ref().is_none_or(|(c, _)| *c != id) {
                    let rises = batches::WindowRises::new(&duty.window_starts_s, reach_s);
                    finish(current.replace((id, rises)));
                }
                if let Some((_, rises)) = current.as_mut() {
                    rises.push(from_sql(row.get(1)?), from_sql(row.get(2)?));
                }
                Ok(())
            },
        )?;
        finish(current);
        Ok(grown)
    }

    fn read_series(
        &self,
        keys: &HashMap<i64, CellKey>,
        read: SeriesRead,
    ) -> Result<Vec<SeriesPoint>, ReadFailure> {
        let sql = match read {
            SeriesRead::Nothing | SeriesRead::Batches => return Ok(Vec::new()),
            SeriesRead::All => {
                "SELECT t_s, cell_id, live_bytes, live_count FROM series ORDER BY rowid"
            }
            SeriesRead::Endpoints => {
                "SELECT t_s, cell_id, live_bytes, live_count FROM series
                 WHERE rowid IN (
                     SELECT rowid FROM series WHERE t_s = (SELECT MIN(t_s) FROM series)
                     UNION
                     SELECT MAX(rowid) FROM series GROUP BY cell_id)
                 ORDER BY rowid"
            }
        };
        self.collect_rows(sql, |row| {
            let cell_id: i64 = row.get(1)?;
            let key = keys
                .get(&cell_id)
                .ok_or_else(|| self.corrupt(format!("series point of unknown cell {cell_id}")))?;
            Ok(SeriesPoint {
                t_s: from_sql(row.get(0)?),
                key: key.clone(),
                live_bytes: from_sql(row.get(2)?),
                live_count: from_sql(row.get(3)?),
            })
        })
    }

    /// CUDA call counts; rows of one (pid, function, stack) add up.
    fn read_cuda_calls(&self) -> Result<CudaCalls, ReadFailure> {
        let mut calls = CudaCalls::new();
        let sql = "SELECT pid, function, stack_id, calls, failed FROM cuda_calls";
        self.for_each_row(sql, |row| {
            let stack = self.stack_index(row.get(2)?)?;
            let n = calls.entry((row.get(0)?, row.get(1)?, stack)).or_default();
            n.calls += from_sql(row.get(3)?);
            n.failed += from_sql(row.get(4)?);
            Ok(())
        })?;
        Ok(calls)
    }

    /// A table of amounts by (pid, stack); rows of one (pid, stack) add up.
    fn read_amounts(&self, table: &AmountsTable) -> Result<AmountsByStack, ReadFailure> {
        let mut amounts = AmountsByStack::new();
        self.for_each_row(table.select, |row| {
            let stack = self.stack_index(row.get(1)?)?;
            *amounts.entry((row.get(0)?, stack)).or_default() += from_sql(row.get(2)?);
            Ok(())
        })?;
        Ok(amounts)
    }

    fn has_table(&self, name: &str) -> Result<bool, ReadFailure> {
        let n: i64 = self.conn.query_row(
            "SELECT COUNT(*) FROM sqlite_schema WHERE type = 'table' AND name = ?1",
            [name],
            |r| r.get(0),
        )?;
        Ok(n > 0)
    }

    fn read_failure_seconds(&self) -> Result<Vec<crate::model::FailureSecond>, ReadFailure> {
        let sql = "SELECT s.t_s, f.class, f.function, f.error, s.count
                   FROM failure_seconds AS s JOIN failures AS f ON f.id = s.failure_id
                   ORDER BY s.rowid";
        self.collect_rows(sql, |row| {
            let class: String = row.get(1)?;
            Ok(crate::model::FailureSecond {
                t_s: from_sql(row.get(0)?),
                class: self.class(&class)?,
                function: row.get(2)?,
                error: row.get(3)?,
                count: from_sql(row.get(4)?),
            })
        })
    }

    fn read_phase_activity(&self) -> Result<Vec<crate::model::PhaseActivity>, ReadFailure> {
        let sql = "SELECT t_s, phase, entries FROM phase_activity ORDER BY rowid";
        self.collect_rows(sql, |row| {
            Ok(crate::model::PhaseActivity {
                t_s: from_sql(row.get(0)?),
                phase: row.get(1)?,
                entries: from_sql(row.get(2)?),
            })
        })
    }

    /// The seconds with a series point of a cell in one of `phases`.
    fn read_phase_seconds(&self, phases: &[String]) -> Result<Vec<(u64, String)>, ReadFailure> {
        let mut seconds = Vec::new();
        let mut stmt = self.conn.prepare(
            "SELECT DISTINCT s.t_s FROM series AS s JOIN cells AS c ON c.id = s.cell_id
             WHERE c.phase = ?1",
        )?;
        for phase in phases {
            let rows = stmt.query_map([phase], |row| row.get::<_, i64>(0))?;
            for t in rows {
                seconds.push((from_sql(t?), phase.clone()));
            }
        }
        seconds.sort();
        Ok(seconds)
    }

    fn read_torch_samples(&self) -> Result<Vec<AllocatorSample>, ReadFailure> {
        let sql = "SELECT t_s, pid, device, reserved, allocated, pending, segments, blocks, holes,
                          hole_bytes, largest_hole, private_pools, private_reserved,
                          private_allocated, sleeping, async_backend
                   FROM torch_samples ORDER BY rowid";
        self.collect_rows(sql, |row| {
            Ok(AllocatorSample {
                t_s: from_sql(row.get(0)?),
                figures: allocator_figures(row, 1)?,
            })
        })
    }

    fn read_torch_ooms(&self) -> Result<Vec<AllocatorOom>, ReadFailure> {
        let sql = "SELECT t_s, requested, device_free, stack_id, pid, device, reserved, allocated,
                          pending, segments, blocks, holes, hole_bytes, largest_hole,
                          private_pools, private_reserved, private_allocated, sleeping,
                          async_backend
                   FROM torch_ooms ORDER BY rowid";
        self.collect_rows(sql, |row| {
            Ok(AllocatorOom {
                t_s: from_sql(row.get(0)?),
                requested: from_sql(row.get(1)?),
                device_free: from_sql(row.get(2)?),
                stack: self.stack_index(row.get(3)?)?,
                figures: allocator_figures(row, 4)?,
            })
        })
    }

    fn read_gpu_samples(&self) -> Result<Vec<GpuSample>, ReadFailure> {
        let sql = "SELECT t_s, pid, used, traced FROM gpu_samples ORDER BY rowid";
        self.collect_rows(sql, |row| {
            Ok(GpuSample {
                t_s: from_sql(row.get(0)?),
                pid: row.get(1)?,
                used: from_sql(row.get(2)?),
                traced: from_sql(row.get(3)?),
            })
        })
    }

    fn read_rss_samples(&self) -> Result<Vec<RssSample>, ReadFailure> {
        let sql = "SELECT t_s, pid, rss, anon, file, shmem, swap, arena, traced_resident,
                          arena_resident
                   FROM rss_samples ORDER BY rowid";
        self.collect_rows(sql, |row| {
            Ok(RssSample {
                t_s: from_sql(row.get(0)?),
                pid: row.get(1)?,
                rss: from_sql(row.get(2)?),
                anon: from_sql(row.get(3)?),
                file: from_sql(row.get(4)?),
                shmem: from_sql(row.get(5)?),
                swap: from_sql(row.get(6)?),
                arena: from_sql(row.get(7)?),
                traced_resident: from_sql(row.get(8)?),
                arena_resident: from_sql(row.get(9)?),
            })
        })
    }

    fn read_totals_series(&self) -> Result<Vec<TotalsPoint>, ReadFailure> {
        let sql = "SELECT t_s, class, live_bytes, live_count FROM totals_series ORDER BY rowid";
        self.collect_rows(sql, |row| {
            let class: String = row.get(1)?;
            Ok(TotalsPoint {
                t_s: from_sql(row.get(0)?),
                class: self.class(&class)?,
                live_bytes: from_sql(row.get(2)?),
                live_count: from_sql(row.get(3)?),
            })
        })
    }
}

/// The allocator figures in the columns from `at` on (pid, device, reserved, allocated, pending,
/// segments, blocks, holes, hole_bytes, largest_hole, private_pools, private_reserved,
/// private_allocated, sleeping, async_backend).
fn allocator_figures(row: &Row<'_>, at: usize) -> rusqlite::Result<AllocatorFigures> {
    Ok(AllocatorFigures {
        pid: row.get(at)?,
        device: row.get(at + 1)?,
        reserved: from_sql(row.get(at + 2)?),
        allocated: from_sql(row.get(at + 3)?),
        pending: from_sql(row.get(at + 4)?),
        segments: from_sql(row.get(at + 5)?),
        blocks: from_sql(row.get(at + 6)?),
        holes: from_sql(row.get(at + 7)?),
        hole_bytes: from_sql(row.get(at + 8)?),
        largest_hole: from_sql(row.get(at + 9)?),
        private_pools: from_sql(row.get(at + 10)?),
        private_reserved: from_sql(row.get(at + 11)?),
        private_allocated: from_sql(row.get(at + 12)?),
        sleeping: from_sql(row.get(at + 13)?),
        async_backend: row.get(at + 14)?,
    })
}
