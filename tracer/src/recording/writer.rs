//! Writing a recording: created before tracing starts, one transaction a second, finalized last.

use std::{
    collections::{BTreeMap, HashMap},
    fs::{self, File, OpenOptions},
    io::{self, Write},
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

use rusqlite::{Connection, OpenFlags, Transaction, params};

use super::{
    ProcessExit, RecordingError,
    schema::{self, APPLICATION_ID, AmountsTable, SCHEMA_VERSION, meta, to_sql},
    sidecar,
};
use crate::{
    model::{
        AllocatorFigures, AllocatorOom, AllocatorSample, AmountsByStack, CellKey, Class,
        ClassTotals, FailureKey, GpuSample, LedgerState, RssSample, SeriesPoint, Stack,
        StackCounters, TargetInfo,
    },
    output::{self, io_reason, parent_dir},
};

/// Files SQLite may keep beside a database. A leftover from an earlier recording at the same path
/// would be replayed into the new file by SQLite's recovery, so they go before a file is created.
const SIDECAR_SUFFIXES: [&str; 3] = ["-wal", "-shm", "-journal"];

/// Bytes held in reserve on the recording's file system, released when it is full so that the
/// recording can still say so (`meta.write_failure`, a few pages of log).
const RESERVE_BYTES: usize = 128 << 10;

/// What `meta.write_failure` says when the file system filled up.
pub const DISK_FULL: &str = "the file system was full (ENOSPC)";

const PUT_META: &str = "INSERT OR REPLACE INTO meta (key, value) VALUES (?1, ?2)";

const INSERT_CELL: &str = "INSERT INTO cells (id, class, phase, stack_id, live_bytes, live_count,
                   allocated_bytes, allocated_count, freed_bytes, freed_count, pid)
 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)";

/// A cell as last written: its row id and counters, to write only what changed.
struct WrittenCell {
    id: i64,
    counters: StackCounters,
}

/// Writes one recording. Every `commit_tick` is one transaction: a reader (or a crash) sees all
/// of it or none of it.
pub struct Writer {
    conn: Connection,
    path: PathBuf,
    /// Sorted like `LedgerState::cells`, so that a tick compares the two in one merged walk
    /// rather than tens of thousands of lookups.
    cells: BTreeMap<CellKey, WrittenCell>,
    next_cell_id: i64,
    failures: HashMap<FailureKey, (i64, u64)>,
    next_failure_id: i64,
    totals: BTreeMap<Class, ClassTotals>,
    lost_events: BTreeMap<String, u64>,
    unmatched_frees: u64,
    /// Set when a commit failed: the in-memory copy of what was written no longer matches the
    /// file, so later commits are refused rather than written wrong.
    failed: bool,
    /// An unnamed file of `RESERVE_BYTES` on the recording's file system (None where the file
    /// system has no unnamed files): freed when the file system is full, to write why the
    /// recording stops there.
    reserve: Option<File>,
}

impl Writer {
    /// Validates `path` as a recording destination before tracing starts, creating nothing
    /// that outlives the call: the parent directory exists and accepts new files, `path` is not a
    /// directory, and it does not exist unless `force`.
    pub fn check_output_path(path: &Path, force: bool) -> Result<(), RecordingError> {
        if output::check_destination(path, force)? == output::Destination::Stream {
            // SQLite needs a file it can seek in, lock and put a log beside.
            return Err(output::OutputError::NotWritable {
                path: path.to_path_buf(),
                what: "a character device or FIFO",
                allowed: "a recording is written to a regular file",
            }
            .into());
        }
        let dir = parent_dir(path);
        let unwritable = |reason: String| RecordingError::Unwritable {
            path: path.to_path_buf(),
            reason,
        };
        let c_dir = std::ffi::CString::new(std::os::unix::ffi::OsStrExt::as_bytes(dir.as_os_str()))
            .map_err(|_| unwritable("the path contains a NUL byte".to_string()))?;
        // SAFETY: a valid NUL-terminated path; access(2) only reads it.
        if unsafe { libc::access(c_dir.as_ptr(), libc::W_OK | libc::X_OK) } != 0 {
            return Err(unwritable(io_reason(&io::Error::last_os_error())));
        }
        // access(2) says yes to root everywhere, also where no file can be created (/proc,
        // /sys): only creating one tells. The probe is removed at once.
        let probe = dir.join(format!(".alloctrace-probe-{}", std::process::id()));
        match OpenOptions::new().write(true).create_new(true).open(&probe) {
            Ok(_) => {
                let _ = fs::remove_file(&probe);
                Ok(())
            }
            // Someone else's file by that name: files can be created there.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(unwritable(format!(
                "`{}` does not accept new files",
                dir.display()
            ))),
            Err(e) => Err(unwritable(io_reason(&e))),
        }
    }

    /// Creates the recording at `path` (replacing an existing file only if `force`), with its
    /// schema and metadata committed, marked incomplete until `finalize`.
    pub fn create(
        path: &Path,
        target: &TargetInfo,
        started_unix_ns: u64,
        force: bool,
    ) -> Result<Writer, RecordingError> {
        Self::check_output_path(path, force)?;
        let unwritable = |e: io::Error| RecordingError::Unwritable {
            path: path.to_path_buf(),
            reason: io_reason(&e),
        };
        if force {
            match fs::remove_file(path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(unwritable(e)),
                _ => {}
            }
        }
        for suffix in SIDECAR_SUFFIXES {
            match fs::remove_file(sidecar(path, suffix)) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(unwritable(e)),
                _ => {}
            }
        }
        // Exclusive creation: a file that appeared since the check is not overwritten.
        // Owner-only: the recording holds the target's command line. SQLite gives its -wal and
        // -shm files the database file's permissions.
        let created = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(output::FILE_MODE)
            .open(path);
        match created {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Err(output::OutputError::Exists {
                    path: path.to_path_buf(),
                }
                .into());
            }
            Err(e) => return Err(unwritable(e)),
        }
        let initialized = reserve_space(path)
            .and_then(|reserve| Self::initialize(path, target, started_unix_ns, reserve));
        match initialized {
            Ok(writer) => Ok(writer),
            Err(e) => {
                // Nothing useful was written: leave nothing behind.
                let _ = fs::remove_file(path);
                for suffix in SIDECAR_SUFFIXES {
                    let _ = fs::remove_file(sidecar(path, suffix));
                }
                Err(match e {
                    RecordingError::DiskFull { path, .. } => {
                        RecordingError::DiskFull { path, kept: false }
                    }
                    other => other,
                })
            }
        }
    }

    fn initialize(
        path: &Path,
        target: &TargetInfo,
        started_unix_ns: u64,
        reserve: Option<File>,
    ) -> Result<Writer, RecordingError> {
        let write_err = |e: rusqlite::Error| write_error(path, e);
        let mut conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(write_err)?;
        let tx = conn.transaction().map_err(write_err)?;
        tx.execute_batch(schema::CREATE).map_err(write_err)?;
        tx.pragma_update(None, "application_id", APPLICATION_ID)
            .map_err(write_err)?;
        tx.pragma_update(None, "user_version", SCHEMA_VERSION)
            .map_err(write_err)?;
        insert_initial_meta(&tx, target, started_unix_ns).map_err(write_err)?;
        tx.commit().map_err(write_err)?;
        // The schema and metadata are in the database file itself (written in rollback-journal
        // mode), so that a copy of the main file alone is still a recognisable recording. From
        // here on, one commit a second: the write-ahead log makes each an append, and NORMAL
        // synchronisation keeps every commit across a crash of the tracer (only a power loss
        // can take back the last ones).
        let mode: String = conn
            .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
            .map_err(write_err)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(RecordingError::Write {
                path: path.to_path_buf(),
                detail: format!("the file system does not support SQLite's WAL mode (got {mode})"),
            });
        }
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(write_err)?;
        conn.set_prepared_statement_cache_capacity(32);
        // Commits never wait for readers in WAL mode; finalizing does (a `report` of the live
        // recording), briefly.
        conn.busy_timeout(std::time::Duration::from_secs(2))
            .map_err(write_err)?;
        Ok(Writer {
            conn,
            path: path.to_path_buf(),
            cells: BTreeMap::new(),
            next_cell_id: 0,
            failures: HashMap::new(),
            next_failure_id: 0,
            totals: BTreeMap::new(),
            lost_events: BTreeMap::new(),
            unmatched_frees: 0,
            failed: false,
            reserve,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Rows written, updated or deleted since the writer was created (for the tests of what a
    /// tick writes).
    #[cfg(test)]
    pub(super) fn rows_changed(&self) -> u64 {
        self.conn.total_changes()
    }

    /// Commits one second of recording in one transaction: the stacks first seen since the last
    /// tick, the ledger's complete `state` (only what changed since the last commit is written)
    /// and the `series` points of the cells that changed. `t_s` is seconds since the start.
    /// The stacks are taken one at a time, so that they can be named as they are written: the
    /// tick of torch's import names 4,000 stacks of 400,000 frames, 20 MB held at once when
    /// named before.
    pub fn commit_tick(
        &mut self,
        t_s: f64,
        new_stacks: impl IntoIterator<Item = Stack>,
        state: &LedgerState,
        series: &[SeriesPoint],
    ) -> Result<(), RecordingError> {
        let written = self.write_tick(t_s, new_stacks, state, series);
        self.noted(written)
    }

    fn write_tick(
        &mut self,
        t_s: f64,
        new_stacks: impl IntoIterator<Item = Stack>,
        state: &LedgerState,
        series: &[SeriesPoint],
    ) -> Result<(), RecordingError> {
        if self.failed {
            return Err(RecordingError::WriterFailed {
                path: self.path.clone(),
            });
        }
        // The in-memory copy is updated as rows are written; should the transaction fail, it no
        // longer matches the file and the writer refuses further commits (`failed`).
        self.failed = true;
        let path = self.path.clone();
        let tx = self.conn.transaction().map_err(|e| write_error(&path, e))?;
        let mut tick = Tick {
            tx: &tx,
            cells: &mut self.cells,
            next_cell_id: &mut self.next_cell_id,
            failures: &mut self.failures,
            next_failure_id: &mut self.next_failure_id,
            totals: &mut self.totals,
            lost_events: &mut self.lost_events,
            unmatched_frees: &mut self.unmatched_frees,
        };
        tick.write(t_s, new_stacks, state, series)
            .map_err(|e| write_error(&path, e))?;
        tx.commit().map_err(|e| write_error(&path, e))?;
        self.failed = false;
        Ok(())
    }

    /// How stacks were taken, and how that went.
    pub fn set_stack_capture(
        &mut self,
        capture: &crate::model::StackCapture,
    ) -> Result<(), RecordingError> {
        let json = serde_json::to_string(capture).unwrap_or_default();
        self.put_meta(meta::STACK_CAPTURE, json)
    }

    /// The recording is `alloctrace check`'s, judged with `thresholds`.
    pub fn set_check(
        &mut self,
        thresholds: &crate::model::Thresholds,
    ) -> Result<(), RecordingError> {
        let json = serde_json::to_string(thresholds).unwrap_or_default();
        self.put_meta(meta::CHECK, json)
    }

    /// The moments marked so far (`alloctrace check`).
    pub fn set_marks(&mut self, marks: &[crate::model::Mark]) -> Result<(), RecordingError> {
        let json = serde_json::to_string(marks).unwrap_or_default();
        self.put_meta(meta::MARKS, json)
    }

    /// The phase rules and their figures so far (`record --phase`).
    pub fn set_phases(&mut self, phases: &crate::model::Phases) -> Result<(), RecordingError> {
        let json = serde_json::to_string(phases).unwrap_or_default();
        self.put_meta(meta::PHASES, json)
    }

    /// Says where GPU samples come from (or why there are none).
    pub fn set_gpu_source(&mut self, source: &str) -> Result<(), RecordingError> {
        self.put_meta(meta::GPU_SOURCE, source)
    }

    /// Records the traced processes (children join as they are born).
    pub fn set_target_pids(&mut self, pids: &[u32]) -> Result<(), RecordingError> {
        let pids = serde_json::to_string(pids).expect("a list of numbers serializes");
        self.put_meta(meta::TARGET_PIDS, pids)
    }

    /// Records how the traced processes that ended did (the whole list, rewritten).
    pub fn set_exits(&mut self, exits: &[ProcessExit]) -> Result<(), RecordingError> {
        let json = serde_json::to_string(exits).expect("numbers and strings serialize");
        self.put_meta(meta::EXITS, json)
    }

    /// Records why the recording ends (before `finalize`).
    pub fn set_stop_reason(&mut self, reason: &str) -> Result<(), RecordingError> {
        self.put_meta(meta::STOP_REASON, reason)
    }

    /// Sets one value of the `meta` table, outside any tick.
    fn put_meta(&mut self, key: &str, value: impl rusqlite::ToSql) -> Result<(), RecordingError> {
        let written = self
            .conn
            .execute(PUT_META, params![key, value])
            .map(|_| ())
            .map_err(|e| write_error(&self.path, e));
        self.noted(written)
    }

    /// Passes `result` on; when it says the file system is full, first frees the reserve and
    /// writes so into the recording (`meta.write_failure`), which a reader shows instead of "the
    /// tracer was killed".
    fn noted<T>(&mut self, result: Result<T, RecordingError>) -> Result<T, RecordingError> {
        if let Err(RecordingError::DiskFull { .. }) = &result
            && let Some(reserve) = self.reserve.take()
        {
            let _ = reserve.set_len(0);
            drop(reserve);
            if let Err(e) = self
                .conn
                .execute(PUT_META, params![meta::WRITE_FAILURE, DISK_FULL])
            {
                log::warn!(
                    "{}: could not note the full file system in the recording: {e}",
                    self.path.display()
                );
            }
        }
        result
    }

    /// Appends PyTorch caching-allocator figures.
    pub fn add_torch_samples(&mut self, samples: &[AllocatorSample]) -> Result<(), RecordingError> {
        if samples.is_empty() {
            return Ok(());
        }
        self.append(
            "INSERT INTO torch_samples (t_s, pid, device, reserved, allocated, pending, segments,
                                        blocks, holes, hole_bytes, largest_hole, private_pools,
                                        private_reserved, private_allocated, sleeping,
                                        async_backend)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)",
            samples,
            |s| {
                let mut row = [0; 16];
                row[0] = to_sql(s.t_s);
                row[1..].copy_from_slice(&figure_columns(&s.figures));
                row
            },
        )
    }

    /// Appends phases' entries of the last second (`record --phase`).
    pub fn add_phase_activity(
        &mut self,
        rows: &[crate::model::PhaseActivity],
    ) -> Result<(), RecordingError> {
        if rows.is_empty() {
            return Ok(());
        }
        self.append(
            "INSERT INTO phase_activity (t_s, phase, entries) VALUES (?1, ?2, ?3)",
            rows,
            |a| {
                [
                    rusqlite::types::Value::Integer(to_sql(a.t_s)),
                    rusqlite::types::Value::Text(a.phase.clone()),
                    rusqlite::types::Value::Integer(to_sql(a.entries)),
                ]
            },
        )
    }

    /// Appends PyTorch caching-allocator OOMs (their stacks are in the stack table already).
    pub fn add_torch_ooms(&mut self, ooms: &[AllocatorOom]) -> Result<(), RecordingError> {
        if ooms.is_empty() {
            return Ok(());
        }
        self.append(
            "INSERT INTO torch_ooms (t_s, requested, device_free, stack_id, pid, device, reserved,
                                     allocated, pending, segments, blocks, holes, hole_bytes,
                                     largest_hole, private_pools, private_reserved,
                                     private_allocated, sleeping, async_backend)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17,
                     ?18, ?19)",
            ooms,
            |o| {
                let mut row = [None; 19];
                row[..4].copy_from_slice(&[
                    Some(to_sql(o.t_s)),
                    Some(to_sql(o.requested)),
                    Some(to_sql(o.device_free)),
                    o.stack.map(i64::from),
                ]);
                for (column, value) in row[4..].iter_mut().zip(figure_columns(&o.figures)) {
                    *column = Some(value);
                }
                row
            },
        )
    }

    pub fn add_gpu_samples(&mut self, samples: &[GpuSample]) -> Result<(), RecordingError> {
        if samples.is_empty() {
            return Ok(());
        }
        self.append(
            "INSERT INTO gpu_samples (t_s, pid, used, traced) VALUES (?1, ?2, ?3, ?4)",
            samples,
            |s| {
                [
                    to_sql(s.t_s),
                    s.pid.into(),
                    to_sql(s.used),
                    to_sql(s.traced),
                ]
            },
        )
    }

    /// Appends resident-memory samples (their own small transaction; a sample is independent of
    /// the ledger's state).
    pub fn add_rss_samples(&mut self, samples: &[RssSample]) -> Result<(), RecordingError> {
        self.append(
            "INSERT INTO rss_samples \
             (t_s, pid, rss, anon, file, shmem, swap, arena, traced_resident, arena_resident) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            samples,
            |s| {
                [
                    to_sql(s.t_s),
                    s.pid.into(),
                    to_sql(s.rss),
                    to_sql(s.anon),
                    to_sql(s.file),
                    to_sql(s.shmem),
                    to_sql(s.swap),
                    to_sql(s.arena),
                    to_sql(s.traced_resident),
                    to_sql(s.arena_resident),
                ]
            },
        )
    }

    /// Appends `rows` with `insert`, one execution a row (its columns as stored integers), in a
    /// transaction of their own.
    fn append<T, V: rusqlite::ToSql, const COLUMNS: usize>(
        &mut self,
        insert: &str,
        rows: &[T],
        columns_of: impl Fn(&T) -> [V; COLUMNS],
    ) -> Result<(), RecordingError> {
        let appended = self.append_rows(insert, rows, columns_of);
        self.noted(appended)
    }

    fn append_rows<T, V: rusqlite::ToSql, const COLUMNS: usize>(
        &mut self,
        insert: &str,
        rows: &[T],
        columns_of: impl Fn(&T) -> [V; COLUMNS],
    ) -> Result<(), RecordingError> {
        let path = self.path.clone();
        let write_err = |e| write_error(&path, e);
        let tx = self.conn.transaction().map_err(write_err)?;
        {
            let mut stmt = tx.prepare_cached(insert).map_err(write_err)?;
            for row in rows {
                stmt.execute(rusqlite::params_from_iter(columns_of(row)))
                    .map_err(write_err)?;
            }
        }
        tx.commit().map_err(write_err)
    }

    /// Marks the recording complete and folds the write-ahead log into the database file, so
    /// that exactly one self-contained file remains. The caller commits the last state with
    /// `commit_tick` first.
    pub fn finalize(mut self, t_s: f64) -> Result<(), RecordingError> {
        if self.failed {
            return Err(RecordingError::WriterFailed { path: self.path });
        }
        let path = self.path.clone();
        let write_err = |e: rusqlite::Error| write_error(&path, e);
        let ended_unix_ns = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        let tx = self.conn.transaction().map_err(write_err)?;
        {
            let mut put = tx.prepare_cached(PUT_META).map_err(write_err)?;
            put.execute(params![meta::DURATION_S, t_s])
                .map_err(write_err)?;
            put.execute(params![meta::ENDED_UNIX_NS, to_sql(ended_unix_ns)])
                .map_err(write_err)?;
            put.execute(params![meta::COMPLETE, 1]).map_err(write_err)?;
            // Last: the digest covers everything above.
            let digest = super::integrity::content_digest(&tx).map_err(write_err)?;
            put.execute(params![meta::CONTENT_DIGEST, digest])
                .map_err(write_err)?;
        }
        tx.commit().map_err(write_err)?;
        // The recording is complete now; what follows only tidies it into one file, and a
        // reader that holds it open (a `report` of the live recording) can only delay that:
        // the data stays in the log beside it, where any reader finds it.
        // TRUNCATE: copy every committed page into the database and empty the log.
        let checkpoint: rusqlite::Result<i64> =
            self.conn
                .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get(0));
        // Leaving WAL mode deletes the -wal and -shm files: one file to copy or mail.
        let mode: rusqlite::Result<String> =
            self.conn
                .pragma_update_and_check(None, "journal_mode", "DELETE", |row| row.get(0));
        match (checkpoint, mode) {
            (Ok(0), Ok(mode)) if mode.eq_ignore_ascii_case("delete") => {}
            // A full file system cannot take the log's pages either: the complete recording
            // stays in the log.
            (Err(e), _) | (_, Err(e)) if !is_busy(&e) && !is_disk_full(&e) => {
                return Err(write_err(e));
            }
            _ => log::warn!(
                "{} is complete but stays in WAL mode (a reader has it open): keep its -wal \
                 file with it",
                self.path.display()
            ),
        }
        self.conn
            .close()
            .map_err(|(_, e)| write_error(&self.path, e))
    }
}

/// One `commit_tick`, inside its transaction.
struct Tick<'a> {
    tx: &'a Transaction<'a>,
    cells: &'a mut BTreeMap<CellKey, WrittenCell>,
    next_cell_id: &'a mut i64,
    failures: &'a mut HashMap<FailureKey, (i64, u64)>,
    next_failure_id: &'a mut i64,
    totals: &'a mut BTreeMap<Class, ClassTotals>,
    lost_events: &'a mut BTreeMap<String, u64>,
    unmatched_frees: &'a mut u64,
}

impl Tick<'_> {
    fn write(
        &mut self,
        t_s: f64,
        new_stacks: impl IntoIterator<Item = Stack>,
        state: &LedgerState,
        series: &[SeriesPoint],
    ) -> rusqlite::Result<()> {
        self.write_stacks(new_stacks)?;
        self.write_cells(state)?;
        self.write_series(series)?;
        // Whole seconds, as the ledger stamps the cell series.
        self.write_totals(t_s.max(0.0) as u64, state)?;
        self.write_failures(t_s.max(0.0) as u64, state)?;
        self.write_lost_events(state)?;
        self.write_amounts(&schema::FAULTS, &state.faults)?;
        self.write_amounts(&schema::RELEASED, &state.released)?;
        self.write_cuda_calls(state)?;
        let mut put = self.tx.prepare_cached(PUT_META)?;
        put.execute(params![meta::DURATION_S, t_s])?;
        if *self.unmatched_frees != state.unmatched_frees {
            put.execute(params![
                meta::UNMATCHED_FREES,
                to_sql(state.unmatched_frees)
            ])?;
            *self.unmatched_frees = state.unmatched_frees;
        }
        Ok(())
    }

    fn write_stacks(&mut self, stacks: impl IntoIterator<Item = Stack>) -> rusqlite::Result<()> {
        let mut insert = self
            .tx
            .prepare_cached("INSERT OR REPLACE INTO stacks (id, frames) VALUES (?1, ?2)")?;
        for stack in stacks {
            let frames = serde_json::to_string(&stack.frames).expect("strings serialize");
            insert.execute(params![stack.index, frames])?;
        }
        Ok(())
    }

    fn write_cells(&mut self, state: &LedgerState) -> rusqlite::Result<()> {
        let mut insert = self.tx.prepare_cached(INSERT_CELL)?;
        let mut update = self.tx.prepare_cached(
            "UPDATE cells SET live_bytes = ?2, live_count = ?3, allocated_bytes = ?4,
                              allocated_count = ?5, freed_bytes = ?6, freed_count = ?7
             WHERE id = ?1",
        )?;
        let zero = StackCounters::default();
        let mut new_cells = Vec::new();
        let mut written = self.cells.iter_mut().peekable();
        for (key, counters) in &state.cells {
            // Cells written before but missing from this (complete) state count nothing now.
            // The ledger never drops a cell, so this does not happen in practice; the row stays,
            // zeroed, because series rows refer to it.
            while let Some((_, gone)) = written.next_if(|(k, _)| *k < key) {
                if gone.counters != zero {
                    execute_update(&mut update, gone.id, &zero)?;
                    gone.counters = zero;
                }
            }
            match written.next_if(|(k, _)| *k == key) {
                Some((_, cell)) => {
                    if cell.counters != *counters {
                        execute_update(&mut update, cell.id, counters)?;
                        cell.counters = *counters;
                    }
                }
                None => new_cells.push((key, counters)),
            }
        }
        for (_, gone) in written {
            if gone.counters != zero {
                execute_update(&mut update, gone.id, &zero)?;
                gone.counters = zero;
            }
        }
        for (key, counters) in new_cells {
            let id = *self.next_cell_id;
            *self.next_cell_id += 1;
            execute_insert(&mut insert, id, key, counters)?;
            self.cells.insert(
                key.clone(),
                WrittenCell {
                    id,
                    counters: *counters,
                },
            );
        }
        Ok(())
    }

    fn write_series(&mut self, series: &[SeriesPoint]) -> rusqlite::Result<()> {
        let mut append = self.tx.prepare_cached(
            "INSERT INTO series (t_s, cell_id, live_bytes, live_count) VALUES (?1, ?2, ?3, ?4)",
        )?;
        for point in series {
            let id = match self.cells.get(&point.key) {
                Some(written) => written.id,
                None => {
                    // A point of a cell the state does not have: give it a (zero) row so that
                    // the point still names its class, phase and stack.
                    let id = *self.next_cell_id;
                    *self.next_cell_id += 1;
                    let zero = StackCounters::default();
                    let mut insert = self.tx.prepare_cached(INSERT_CELL)?;
                    execute_insert(&mut insert, id, &point.key, &zero)?;
                    self.cells
                        .insert(point.key.clone(), WrittenCell { id, counters: zero });
                    id
                }
            };
            append.execute(params![
                to_sql(point.t_s),
                id,
                to_sql(point.live_bytes),
                to_sql(point.live_count)
            ])?;
        }
        Ok(())
    }

    fn write_totals(&mut self, t_s: u64, state: &LedgerState) -> rusqlite::Result<()> {
        if *self.totals == state.totals {
            return Ok(());
        }
        let mut upsert = self.tx.prepare_cached(
            "INSERT OR REPLACE INTO totals (class, live_bytes, live_count, peak_bytes,
                                            allocated_bytes, allocated_count, freed_count)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        )?;
        let mut append = self.tx.prepare_cached(
            "INSERT INTO totals_series (t_s, class, live_bytes, live_count) VALUES (?1, ?2, ?3, ?4)",
        )?;
        for (class, t) in &state.totals {
            if self.totals.get(class) != Some(t) {
                let live_changed = self.totals.get(class).is_none_or(|old| {
                    (old.live_bytes, old.live_count) != (t.live_bytes, t.live_count)
                });
                if live_changed {
                    append.execute(params![
                        to_sql(t_s),
                        class.name(),
                        to_sql(t.live_bytes),
                        to_sql(t.live_count)
                    ])?;
                }
                upsert.execute(params![
                    class.name(),
                    to_sql(t.live_bytes),
                    to_sql(t.live_count),
                    to_sql(t.peak_bytes),
                    to_sql(t.allocated_bytes),
                    to_sql(t.allocated_count),
                    to_sql(t.freed_count)
                ])?;
            }
        }
        let mut delete = self
            .tx
            .prepare_cached("DELETE FROM totals WHERE class = ?1")?;
        for class in self.totals.keys() {
            if !state.totals.contains_key(class) {
                delete.execute(params![class.name()])?;
            }
        }
        self.totals.clone_from(&state.totals);
        Ok(())
    }

    /// A table of amounts by (pid, stack): small, rewritten whole.
    fn write_amounts(
        &mut self,
        table: &AmountsTable,
        amounts: &AmountsByStack,
    ) -> rusqlite::Result<()> {
        if amounts.is_empty() {
            return Ok(());
        }
        self.tx.execute(table.delete_all, [])?;
        let mut insert = self.tx.prepare_cached(table.insert)?;
        for (&(pid, stack), &amount) in amounts {
            insert.execute(params![pid, stack, to_sql(amount)])?;
        }
        Ok(())
    }

    /// CUDA call counts: a small table, rewritten whole.
    fn write_cuda_calls(&mut self, state: &LedgerState) -> rusqlite::Result<()> {
        if state.cuda_calls.is_empty() {
            return Ok(());
        }
        self.tx.execute("DELETE FROM cuda_calls", [])?;
        let mut insert = self.tx.prepare_cached(
            "INSERT INTO cuda_calls (pid, function, stack_id, calls, failed)
             VALUES (?1, ?2, ?3, ?4, ?5)",
        )?;
        for ((pid, function, stack), n) in &state.cuda_calls {
            insert.execute(params![
                pid,
                function,
                stack,
                to_sql(n.calls),
                to_sql(n.failed)
            ])?;
        }
        Ok(())
    }

    fn write_failures(&mut self, t_s: u64, state: &LedgerState) -> rusqlite::Result<()> {
        let mut upsert = self.tx.prepare_cached(
            "INSERT OR REPLACE INTO failures (id, class, function, size, error, stack_id, count, pid)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        )?;
        // When: the failures of each second, for the timeline and the verdict.
        let mut when = self.tx.prepare_cached(
            "INSERT INTO failure_seconds (failure_id, t_s, count) VALUES (?1, ?2, ?3)",
        )?;
        for (key, &count) in &state.failures {
            let (id, before) = match self.failures.get(key) {
                Some(&(_, written)) if written == count => continue,
                Some(&(id, written)) => (id, written),
                None => {
                    *self.next_failure_id += 1;
                    (*self.next_failure_id - 1, 0)
                }
            };

            upsert.execute(params![
                id,
                key.class.name(),
                key.function,
                to_sql(key.size),
                key.error,
                key.stack,
                to_sql(count),
                key.pid
            ])?;
            self.failures.insert(key.clone(), (id, count));
            when.execute(params![
                id,
                to_sql(t_s),
                to_sql(count.saturating_sub(before))
            ])?;
        }
        if self.failures.len() > state.failures.len() {
            let mut delete = self
                .tx
                .prepare_cached("DELETE FROM failures WHERE id = ?1")?;
            let mut gone = Vec::new();
            for (key, &(id, _)) in self.failures.iter() {
                if !state.failures.contains_key(key) {
                    delete.execute(params![id])?;
                    gone.push(key.clone());
                }
            }
            for key in gone {
                self.failures.remove(&key);
            }
        }
        Ok(())
    }

    fn write_lost_events(&mut self, state: &LedgerState) -> rusqlite::Result<()> {
        if *self.lost_events == state.lost_events {
            return Ok(());
        }
        let mut upsert = self
            .tx
            .prepare_cached("INSERT OR REPLACE INTO lost_events (cause, count) VALUES (?1, ?2)")?;
        for (cause, &count) in &state.lost_events {
            if self.lost_events.get(cause) != Some(&count) {
                upsert.execute(params![cause, to_sql(count)])?;
            }
        }
        let mut delete = self
            .tx
            .prepare_cached("DELETE FROM lost_events WHERE cause = ?1")?;
        for cause in self.lost_events.keys() {
            if !state.lost_events.contains_key(cause) {
                delete.execute(params![cause])?;
            }
        }
        self.lost_events.clone_from(&state.lost_events);
        Ok(())
    }
}

/// The metadata of a new recording: not complete, nothing counted yet.
fn insert_initial_meta(
    tx: &Transaction<'_>,
    target: &TargetInfo,
    started_unix_ns: u64,
) -> rusqlite::Result<()> {
    let pids = serde_json::to_string(&target.pids).expect("a list of numbers serializes");
    let mut put = tx.prepare("INSERT INTO meta (key, value) VALUES (?1, ?2)")?;
    put.execute(params![meta::SCHEMA_VERSION, SCHEMA_VERSION])?;
    put.execute(params![meta::TOOL_VERSION, env!("CARGO_PKG_VERSION")])?;
    put.execute(params![meta::TARGET_PIDS, pids])?;
    put.execute(params![meta::TARGET_COMMAND, target.command])?;
    put.execute(params![meta::TARGET_ATTACHED, i64::from(target.attached)])?;
    put.execute(params![meta::STARTED_UNIX_NS, to_sql(started_unix_ns)])?;
    put.execute(params![meta::DURATION_S, 0.0])?;
    put.execute(params![meta::COMPLETE, 0])?;
    put.execute(params![meta::UNMATCHED_FREES, 0])?;
    Ok(())
}

fn execute_insert(
    insert: &mut rusqlite::CachedStatement<'_>,
    id: i64,
    key: &CellKey,
    c: &StackCounters,
) -> rusqlite::Result<()> {
    insert.execute(params![
        id,
        key.class.name(),
        key.phase,
        key.stack,
        to_sql(c.live_bytes),
        to_sql(c.live_count),
        to_sql(c.allocated_bytes),
        to_sql(c.allocated_count),
        to_sql(c.freed_bytes),
        to_sql(c.freed_count),
        key.pid
    ])?;
    Ok(())
}

fn execute_update(
    update: &mut rusqlite::CachedStatement<'_>,
    id: i64,
    c: &StackCounters,
) -> rusqlite::Result<()> {
    update.execute(params![
        id,
        to_sql(c.live_bytes),
        to_sql(c.live_count),
        to_sql(c.allocated_bytes),
        to_sql(c.allocated_count),
        to_sql(c.freed_bytes),
        to_sql(c.freed_count)
    ])?;
    Ok(())
}

fn is_disk_full(e: &rusqlite::Error) -> bool {
    e.sqlite_error_code() == Some(rusqlite::ErrorCode::DiskFull)
}

/// Holds `RESERVE_BYTES` on the file system of `path`, in an unnamed file beside it that
/// disappears with this process; None where the file system has no unnamed files (O_TMPFILE).
fn reserve_space(path: &Path) -> Result<Option<File>, RecordingError> {
    let reserve = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_TMPFILE)
        .mode(output::FILE_MODE)
        .open(parent_dir(path));
    let mut reserve = match reserve {
        Ok(file) => file,
        Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => {
            return Err(RecordingError::DiskFull {
                path: path.to_path_buf(),
                kept: false,
            });
        }
        Err(e) => {
            log::debug!("no space reserve beside {}: {e}", path.display());
            return Ok(None);
        }
    };
    match reserve.write_all(&vec![0u8; RESERVE_BYTES]) {
        Ok(()) => Ok(Some(reserve)),
        Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => Err(RecordingError::DiskFull {
            path: path.to_path_buf(),
            kept: false,
        }),
        Err(e) => Err(RecordingError::Unwritable {
            path: path.to_path_buf(),
            reason: io_reason(&e),
        }),
    }
}

fn is_busy(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
    )
}

/// A SQLite error while writing, as one line; a full file system is `DiskFull`.
pub(super) fn write_error(path: &Path, e: rusqlite::Error) -> RecordingError {
    if is_disk_full(&e) {
        return RecordingError::DiskFull {
            path: path.to_path_buf(),
            kept: true,
        };
    }
    let detail = match &e {
        rusqlite::Error::SqliteFailure(_, Some(msg)) => msg.clone(),
        other => other.to_string(),
    };
    RecordingError::Write {
        path: path.to_path_buf(),
        detail: detail.replace('\n', " "),
    }
}

/// The columns of an allocator's figures, in the order of the `torch_samples` and `torch_ooms`
/// tables (from `pid` to `private_allocated`; the reader's `allocator_figures` reads them back).
fn figure_columns(f: &AllocatorFigures) -> [i64; 15] {
    [
        f.pid.into(),
        f.device.into(),
        to_sql(f.reserved),
        to_sql(f.allocated),
        to_sql(f.pending),
        to_sql(f.segments),
        to_sql(f.blocks),
        to_sql(f.holes),
        to_sql(f.hole_bytes),
        to_sql(f.largest_hole),
        to_sql(f.private_pools),
        to_sql(f.private_reserved),
        to_sql(f.private_allocated),
        to_sql(f.sleeping),
        f.async_backend.into(),
    ]
}
