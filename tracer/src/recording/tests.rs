//! Round trips through real files: what the writer commits, the reader gets back, finalized,
//! abandoned or killed; and every kind of bad file gives one clear error.

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    time::Instant,
};

use super::*;
use crate::{
    ledger::{CellRef, Ledger, MISSED_FREE},
    model::{CellKey, Class, FailureKey, PHASE_NONE, Stack, StackCounters},
};

fn target() -> TargetInfo {
    TargetInfo {
        pids: vec![4242],
        command: "server --port 8080 'quoted arg'".to_string(),
        attached: true,
    }
}

fn stack(index: StackIndex) -> Stack {
    Stack {
        index,
        frames: vec![
            format!("leak_{index}"),
            "std::vector<int>::push_back(int const&)".to_string(),
            "main".to_string(),
        ],
    }
}

fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// What a session committed, to compare with what is read back.
#[derive(Clone, Default)]
struct Committed {
    state: LedgerState,
    stacks: BTreeMap<StackIndex, Stack>,
    series: Vec<SeriesPoint>,
    totals_series: Vec<TotalsPoint>,
}

impl Committed {
    fn assert_read_back(&self, rec: &Recorded) {
        assert_eq!(rec.state, self.state);
        assert_eq!(rec.stacks, self.stacks);
        assert_eq!(rec.series, self.series);
        assert_eq!(rec.totals_series, self.totals_series);
        assert_eq!(rec.target, target());
        assert_eq!(rec.schema, SCHEMA_VERSION);
        assert_eq!(rec.tool_version, env!("CARGO_PKG_VERSION"));
        assert_eq!(rec.started_unix_ns, 1_700_000_000_123_456_789);
    }
}

/// Drives a ledger and a writer the way `record` does.
struct Session {
    ledger: Ledger,
    writer: Writer,
    lost: BTreeMap<String, u64>,
    committed: Committed,
    next_addr: u64,
}

impl Session {
    fn start(path: &Path) -> Session {
        Session {
            ledger: Ledger::new(),
            writer: Writer::create(path, &target(), 1_700_000_000_123_456_789, false).unwrap(),
            lost: BTreeMap::new(),
            committed: Committed::default(),
            next_addr: 0x1000,
        }
    }

    /// `blocks` allocations of `size` bytes at `stack` (None: stack lost); returns addresses.
    fn alloc(&mut self, stack: Option<StackIndex>, blocks: u64, size: u64) -> Vec<u64> {
        (0..blocks)
            .map(|_| {
                let addr = self.next_addr;
                self.next_addr += 0x100;
                self.ledger
                    .alloc(1, addr, size, CellRef::new(1, Class::Heap, stack));
                addr
            })
            .collect()
    }

    /// Commits second `t` (at t + 0.25 s), with the stacks `new_stacks` first seen in it.
    fn tick(&mut self, t: u64, new_stacks: &[StackIndex]) {
        let new: Vec<Stack> = new_stacks.iter().map(|&i| stack(i)).collect();
        let series = self.ledger.take_series(t);
        let state = self.ledger.state(&self.lost);
        self.writer
            .commit_tick(t as f64 + 0.25, new.clone(), &state, &series)
            .unwrap();
        let committed = &mut self.committed;
        for s in new {
            committed.stacks.insert(s.index, s);
        }
        committed.series.extend(series);
        for (&class, totals) in &state.totals {
            let before = committed.state.totals.get(&class);
            let live = (totals.live_bytes, totals.live_count);
            if before.is_none_or(|b| (b.live_bytes, b.live_count) != live) {
                committed.totals_series.push(TotalsPoint {
                    t_s: t,
                    class,
                    live_bytes: totals.live_bytes,
                    live_count: totals.live_count,
                });
            }
        }
        committed.state = state;
    }
}

/// Three seconds of a realistic recording: leaks, churn, a realloc, a lost stack, failures,
/// unmatched frees and lost events.
fn record_three_seconds(path: &Path) -> Session {
    let mut s = Session::start(path);
    s.alloc(Some(0), 10, 100);
    let churn = s.alloc(Some(1), 5, 4096);
    s.lost.insert("ringbuf_full".to_string(), 0);
    s.tick(1, &[0, 1]);

    for addr in churn {
        s.ledger.free(1, addr);
    }
    let moved = s.alloc(Some(2), 1, 300)[0];
    s.ledger.realloc(
        1,
        moved,
        0x9_0000,
        600,
        CellRef::new(1, Class::Heap, Some(2)),
    );
    s.alloc(None, 2, 64);
    s.ledger.free(1, 0xdead_beef);
    s.ledger.failure(FailureKey {
        class: Class::Heap,
        pid: 1,
        function: "malloc".to_string(),
        size: u64::MAX,
        error: "ENOMEM".to_string(),
        stack: Some(0),
    });
    s.lost.insert("undecodable_record".to_string(), 2);
    s.tick(2, &[2]);

    // Reuse of a live address: a missed free.
    s.ledger
        .alloc(1, 0x9_0000, 50, CellRef::new(1, Class::Heap, Some(0)));
    s.lost.insert("ringbuf_full".to_string(), 7);
    s.tick(3, &[]);
    s
}

#[test]
fn finalized_recording_reads_back_exactly_as_one_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("run.trace");
    let s = record_three_seconds(&path);
    let committed = s.committed;
    s.writer.finalize(3.5).unwrap();
    assert_eq!(entries(dir.path()), vec!["run.trace"], "WAL files left");

    let rec = Reader::open(&path).unwrap();
    assert!(rec.complete);
    assert_eq!(rec.duration_s, 3.5);
    assert!(rec.ended_unix_ns.is_some_and(|ns| ns > rec.started_unix_ns));
    committed.assert_read_back(&rec);

    // The failure, in the second it was committed.
    assert_eq!(
        rec.failure_seconds,
        [crate::model::FailureSecond {
            t_s: 2,
            class: Class::Heap,
            function: "malloc".into(),
            error: "ENOMEM".into(),
            count: 1,
        }]
    );
    // The figures themselves, not only their equality with the ledger's.
    let heap = rec.state.totals[&Class::Heap];
    assert_eq!(heap.live_bytes, 10 * 100 + 600 + 2 * 64 + 50 - 600);
    assert_eq!(heap.peak_bytes, 10 * 100 + 5 * 4096);
    let key = |stack| CellKey {
        class: Class::Heap,
        pid: 1,
        phase: PHASE_NONE.to_string(),
        stack,
    };
    assert_eq!(
        rec.state.cells[&key(Some(1))],
        StackCounters {
            live_bytes: 0,
            live_count: 0,
            allocated_bytes: 5 * 4096,
            allocated_count: 5,
            freed_bytes: 5 * 4096,
            freed_count: 5,
        }
    );
    assert_eq!(rec.state.cells[&key(None)].live_bytes, 128);
    assert_eq!(rec.state.unmatched_frees, 1);
    assert_eq!(rec.state.lost_events["ringbuf_full"], 7);
    assert_eq!(rec.state.lost_events["undecodable_record"], 2);
    assert_eq!(rec.state.lost_events[MISSED_FREE], 1);
    let failure = rec.state.failures.iter().next().unwrap();
    assert_eq!((failure.0.size, *failure.1), (u64::MAX, 1));
    assert_eq!(
        rec.stacks[&0].frames[1],
        "std::vector<int>::push_back(int const&)"
    );
}

#[test]
fn abandoned_writer_leaves_a_readable_incomplete_recording() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("abandoned.trace");
    let s = record_three_seconds(&path);
    let committed = s.committed;
    // As after a crash: the connection is never closed, the log never checkpointed.
    std::mem::forget(s.writer);
    assert!(
        entries(dir.path()).contains(&"abandoned.trace-wal".to_string()),
        "{:?}",
        entries(dir.path())
    );
    let rec = Reader::open(&path).unwrap();
    assert!(!rec.complete);
    assert_eq!(rec.duration_s, 3.25);
    assert_eq!(rec.ended_unix_ns, None);
    committed.assert_read_back(&rec);
}

#[test]
fn dropped_writer_without_finalize_is_incomplete() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dropped.trace");
    let s = record_three_seconds(&path);
    let committed = s.committed.clone();
    drop(s);
    let rec = Reader::open(&path).unwrap();
    assert!(!rec.complete);
    committed.assert_read_back(&rec);
}

const CRASH_CHILD_ENV: &str = "ALLOCTRACE_TEST_CRASH_CHILD";

/// Not a test of its own: the body of `sigkill_keeps_every_committed_tick`, run in a child
/// process (this test binary, filtered to this test) that kills itself mid-recording.
#[test]
fn sigkill_child() {
    let Some(path) = std::env::var_os(CRASH_CHILD_ENV) else {
        return;
    };
    let mut s = record_three_seconds(Path::new(&path));
    // Work after the last commit that must not appear.
    s.alloc(Some(9), 1, 1 << 20);
    let series = s.ledger.take_series(4);
    let state = s.ledger.state(&s.lost);
    let tx_started = s.writer.commit_tick(4.0, [stack(9)], &state, &series);
    assert!(tx_started.is_ok());
    s.alloc(Some(9), 1, 1 << 20);
    // SAFETY: kill(2) of this very process.
    unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
    unreachable!("SIGKILL");
}

#[test]
fn sigkill_keeps_every_committed_tick() {
    use std::os::unix::process::ExitStatusExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("killed.trace");
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "recording::tests::sigkill_child",
            "--test-threads=1",
            "--nocapture",
        ])
        .env(CRASH_CHILD_ENV, &path)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{status}");
    let before = entries(dir.path());
    let rec = Reader::open(&path).unwrap();
    assert!(!rec.complete);
    assert_eq!(rec.duration_s, 4.0);
    // The four commits: three seconds and the 1 MiB block of the fourth.
    let heap = rec.state.totals[&Class::Heap];
    assert_eq!(
        heap.live_bytes,
        10 * 100 + 600 + 2 * 64 + 50 - 600 + (1 << 20)
    );
    assert_eq!(rec.stacks[&9], stack(9));
    assert_eq!(rec.series.iter().filter(|p| p.t_s == 4).count(), 1);
    // Reading changed nothing beside the recording.
    assert_eq!(entries(dir.path()), before);
}

#[test]
fn reader_sees_the_last_commit_of_a_live_recording() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("live.trace");
    let mut s = Session::start(&path);
    s.alloc(Some(0), 3, 10);
    s.tick(1, &[0]);
    assert_eq!(
        Reader::open(&path).unwrap().state.totals[&Class::Heap].live_bytes,
        30
    );
    s.alloc(Some(0), 1, 10);
    s.tick(2, &[]);
    let rec = Reader::open(&path).unwrap();
    assert_eq!(rec.state.totals[&Class::Heap].live_bytes, 40);
    assert!(!rec.complete);
    s.writer.finalize(2.0).unwrap();
    assert!(Reader::open(&path).unwrap().complete);
}

#[test]
fn a_tick_writes_only_what_changed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("diff.trace");
    let mut s = Session::start(&path);
    for stack in 0..20_000 {
        s.alloc(Some(stack), 1, 16);
    }
    let new: Vec<StackIndex> = (0..20_000).collect();
    s.tick(1, &new);
    let after_first = s.writer.rows_changed();
    // 20,000 stacks + 20,000 cells + 20,000 series points + totals + meta.
    assert!(after_first >= 60_000, "{after_first}");

    // One cell changes: its row, one series point, the totals, one totals point and the duration.
    s.alloc(Some(7), 1, 16);
    let started = Instant::now();
    s.tick(2, &[]);
    let elapsed = started.elapsed();
    assert_eq!(s.writer.rows_changed() - after_first, 5);
    // Generous for debug builds; a release build takes a few milliseconds.
    assert!(
        elapsed.as_millis() < 2000,
        "tick of 20,000 cells took {elapsed:?}"
    );

    // Nothing changes: only the duration.
    let before = s.writer.rows_changed();
    s.tick(3, &[]);
    assert_eq!(s.writer.rows_changed() - before, 1);
    let committed = s.committed;
    s.writer.finalize(3.0).unwrap();
    committed.assert_read_back(&Reader::open(&path).unwrap());
}

#[test]
fn state_is_complete_not_a_delta() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("replace.trace");
    let mut writer = Writer::create(&path, &target(), 0, false).unwrap();
    let key = |stack| CellKey {
        class: Class::Heap,
        pid: 1,
        phase: PHASE_NONE.to_string(),
        stack: Some(stack),
    };
    let counters = StackCounters {
        live_bytes: 8,
        live_count: 1,
        allocated_bytes: 8,
        allocated_count: 1,
        ..Default::default()
    };
    let failure = FailureKey {
        class: Class::Heap,
        pid: 1,
        function: "calloc".into(),
        size: 3,
        error: "ENOMEM".into(),
        stack: None,
    };
    let mut first = LedgerState::default();
    first.cells.insert(key(0), counters);
    first.cells.insert(key(1), counters);
    first.failures.insert(failure, 2);
    first.lost_events.insert("ringbuf_full".into(), 1);
    first.totals.insert(Class::Heap, Default::default());
    writer
        .commit_tick(1.0, [stack(0), stack(1)], &first, &[])
        .unwrap();

    let mut second = LedgerState::default();
    second.cells.insert(key(1), counters);
    writer.commit_tick(2.0, [], &second, &[]).unwrap();
    writer.finalize(2.0).unwrap();
    assert_eq!(Reader::open(&path).unwrap().state, second);
}

#[test]
fn existing_path_needs_force() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("existing.trace");
    fs::write(&path, "precious").unwrap();
    let err = Writer::create(&path, &target(), 0, false).err().unwrap();
    assert_eq!(
        err.to_string(),
        format!(
            "`{}` exists: pass --force to overwrite or choose another path",
            path.display()
        )
    );
    assert!(Writer::check_output_path(&path, false).is_err());
    assert_eq!(fs::read_to_string(&path).unwrap(), "precious");
    assert_eq!(entries(dir.path()), vec!["existing.trace"]);

    Writer::check_output_path(&path, true).unwrap();
    let w = Writer::create(&path, &target(), 0, true).unwrap();
    w.finalize(0.0).unwrap();
    assert!(Reader::open(&path).unwrap().complete);
    assert_eq!(entries(dir.path()), vec!["existing.trace"]);
}

#[test]
fn stale_log_of_an_earlier_recording_is_not_replayed() {
    let dir = tempfile::tempdir().unwrap();
    let old = dir.path().join("old.trace");
    let s = record_three_seconds(&old);
    std::mem::forget(s.writer);
    // The killed recording's files, renamed so that only its -wal and -shm share a new name.
    let path = dir.path().join("new.trace");
    for suffix in ["-wal", "-shm"] {
        fs::copy(
            format!("{}{suffix}", old.display()),
            format!("{}{suffix}", path.display()),
        )
        .unwrap();
    }
    let w = Writer::create(&path, &target(), 0, false).unwrap();
    w.finalize(1.0).unwrap();
    let rec = Reader::open(&path).unwrap();
    assert_eq!(rec.state, LedgerState::default());
    assert!(rec.stacks.is_empty());
}

#[test]
fn output_path_checks_create_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-dir").join("x.trace");
    let msg = Writer::check_output_path(&missing, false)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("no-such-dir") && msg.contains("does not exist"),
        "{msg}"
    );

    let msg = Writer::check_output_path(dir.path(), true)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("is a directory"), "{msg}");

    // /proc takes no new file, not even from root (whom access(2) lets write anywhere).
    let in_proc = Path::new("/proc/alloctrace-unit-test.trace");
    let msg = Writer::check_output_path(in_proc, false)
        .unwrap_err()
        .to_string();
    assert!(
        msg.starts_with("cannot write `/proc/alloctrace-unit-test.trace`: "),
        "{msg}"
    );
    assert!(!msg.contains('\n') && !msg.contains("os error"), "{msg}");
    let msg = Writer::create(in_proc, &target(), 0, false)
        .err()
        .unwrap()
        .to_string();
    assert!(msg.contains("/proc"), "{msg}");

    let fine = dir.path().join("fine.trace");
    Writer::check_output_path(&fine, false).unwrap();
    // A bare file name is relative to the current directory.
    Writer::check_output_path(Path::new("surely-not-here.trace"), false).unwrap();
    assert!(entries(dir.path()).is_empty(), "{:?}", entries(dir.path()));
}

/// The error `Reader::open` gives for `path`, asserted to be one line naming the file.
fn open_error(path: &Path) -> RecordingError {
    let err = Reader::open(path).expect_err("an error");
    let msg = err.to_string();
    let name = path.file_name().unwrap().to_str().unwrap();
    assert!(msg.contains(name), "{msg}");
    assert!(!msg.contains('\n'), "{msg}");
    err
}

/// Changes a finalized recording as a newer alloctrace would have written it: `sql`, then the
/// digest over the new content.
fn write_as_a_newer_alloctrace(path: &Path, sql: &str) {
    let conn = rusqlite::Connection::open(path).unwrap();
    conn.execute_batch(sql).unwrap();
    let digest = super::integrity::content_digest(&conn).unwrap();
    conn.execute(
        "UPDATE meta SET value = ?1 WHERE key = 'content_digest'",
        [digest],
    )
    .unwrap();
}

fn finalized_recording(dir: &Path, stacks: u32) -> PathBuf {
    let path = dir.join("full.trace");
    let mut s = Session::start(&path);
    for stack in 0..stacks {
        s.alloc(Some(stack), 2, 24);
    }
    s.tick(1, &(0..stacks).collect::<Vec<_>>());
    s.writer.finalize(1.0).unwrap();
    path
}

#[test]
fn missing_directory_and_empty_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.trace");
    let err = open_error(&missing);
    assert_eq!(
        err.to_string(),
        format!("`{}` does not exist", missing.display())
    );
    assert!(matches!(
        open_error(dir.path()),
        RecordingError::IsDirectory { .. }
    ));
    let empty = dir.path().join("empty.trace");
    fs::write(&empty, "").unwrap();
    assert!(matches!(open_error(&empty), RecordingError::Empty { .. }));
    assert_eq!(entries(dir.path()), vec!["empty.trace"]);
}

#[test]
fn files_that_are_not_sqlite_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.trace");
    fs::write(&junk, "this is not an alloctrace recording\n".repeat(200)).unwrap();
    let err = open_error(&junk);
    assert!(matches!(err, RecordingError::NotSqlite { .. }), "{err}");
    assert!(err.to_string().contains("not a SQLite database"));

    // Random bytes from a fixed xorshift seed.
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let random: Vec<u8> = (0..65536)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let noise = dir.path().join("noise.trace");
    fs::write(&noise, &random).unwrap();
    assert!(matches!(
        open_error(&noise),
        RecordingError::NotSqlite { .. }
    ));

    // The SQLite magic followed by noise: SQLite itself has to refuse it.
    let mut fake = b"SQLite format 3\0".to_vec();
    fake.extend_from_slice(&random);
    let fake_path = dir.path().join("fake.trace");
    fs::write(&fake_path, &fake).unwrap();
    let err = open_error(&fake_path);
    assert!(
        matches!(
            err,
            RecordingError::NotSqlite { .. } | RecordingError::Corrupt { .. }
        ),
        "{err}"
    );
    assert_eq!(
        entries(dir.path()),
        vec!["fake.trace", "junk.trace", "noise.trace"]
    );
}

#[test]
fn another_sqlite_database_is_not_a_recording() {
    let dir = tempfile::tempdir().unwrap();
    let other = dir.path().join("other.db");
    let conn = rusqlite::Connection::open(&other).unwrap();
    conn.execute_batch("CREATE TABLE t (x); INSERT INTO t VALUES (1);")
        .unwrap();
    drop(conn);
    let err = open_error(&other);
    assert!(matches!(err, RecordingError::NotRecording { .. }), "{err}");
}

#[test]
fn truncated_recordings_are_corrupt_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let full_path = finalized_recording(dir.path(), 3000);
    let full = fs::read(&full_path).unwrap();
    assert!(full.len() > 64 * 1024, "{} bytes", full.len());
    for (name, len) in [
        ("half.trace", full.len() / 2),
        ("header.trace", 100),
        ("first-page.trace", 4096),
        ("almost.trace", full.len() - 4096),
    ] {
        let cut = dir.path().join(name);
        fs::write(&cut, &full[..len]).unwrap();
        let err = open_error(&cut);
        assert!(
            matches!(err, RecordingError::Truncated { size, expected, .. }
                if size == len as u64 && expected == full.len() as u64),
            "{name}: {err}"
        );
    }
    // Overwritten in the middle.
    let mut scribbled = full.clone();
    let mid = full.len() / 2;
    scribbled[mid..mid + 8192].fill(0xa5);
    let path = dir.path().join("scribbled.trace");
    fs::write(&path, &scribbled).unwrap();
    assert!(matches!(open_error(&path), RecordingError::Corrupt { .. }));
}

#[test]
fn newer_schema_asks_for_an_upgrade() {
    let dir = tempfile::tempdir().unwrap();
    let path = finalized_recording(dir.path(), 1);
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.pragma_update(None, "user_version", 2).unwrap();
    drop(conn);
    let err = open_error(&path);
    assert_eq!(
        err.to_string(),
        format!(
            "`{}` was written by a newer alloctrace (schema 2; this one reads 1): upgrade \
             alloctrace",
            path.display()
        )
    );
}

/// A recording written before the PyTorch allocator layer (no `torch_*` tables) still reads,
/// with no allocator figures.
#[test]
fn a_recording_from_before_the_allocator_tables_reads_without_them() {
    let dir = tempfile::tempdir().unwrap();
    let path = finalized_recording(dir.path(), 1);
    write_as_a_newer_alloctrace(&path, "DROP TABLE torch_samples; DROP TABLE torch_ooms;");
    let rec = Reader::open(&path).unwrap();
    assert!(rec.torch.is_empty() && rec.torch_ooms.is_empty());
}

/// Allocator figures and OOMs are read back as written, the OOM with its stack.
#[test]
fn allocator_samples_and_ooms_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("torch.trace");
    let mut s = Session::start(&path);
    s.alloc(Some(0), 2, 24);
    s.tick(1, &[0]);
    let figures = crate::model::AllocatorFigures {
        pid: 2,
        device: 1,
        reserved: 50 << 20,
        allocated: (32 << 20) + 1024,
        pending: 0,
        segments: 4,
        blocks: 3,
        holes: 2,
        hole_bytes: (18 << 20) - 1024,
        largest_hole: 16 << 20,
        private_pools: 1,
        private_reserved: 20 << 20,
        private_allocated: 12 << 20,
        sleeping: 6 << 20,
        async_backend: true,
    };
    let sample = crate::model::AllocatorSample { t_s: 1, figures };
    let oom = crate::model::AllocatorOom {
        t_s: 1,
        requested: 20 << 20,
        device_free: 14 << 20,
        stack: Some(0),
        figures,
    };
    let unstacked = crate::model::AllocatorOom {
        stack: None,
        ..oom.clone()
    };
    s.writer.add_torch_samples(&[sample]).unwrap();
    s.writer
        .add_torch_ooms(&[oom.clone(), unstacked.clone()])
        .unwrap();
    s.writer.finalize(1.0).unwrap();
    let rec = Reader::open(&path).unwrap();
    assert_eq!(rec.torch, vec![sample]);
    assert_eq!(rec.torch_ooms, vec![oom, unstacked]);
}

/// Allocator figures past 2^60 are damage, said like any other figure out of range.
#[test]
fn allocator_figures_out_of_range_are_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("torch.trace");
    let mut s = Session::start(&path);
    s.tick(1, &[]);
    let figures = crate::model::AllocatorFigures {
        reserved: 1 << 61,
        ..Default::default()
    };
    let sample = crate::model::AllocatorSample { t_s: 1, figures };
    s.writer.add_torch_samples(&[sample]).unwrap();
    s.writer.finalize(1.0).unwrap();
    let err = open_error(&path);
    assert!(
        err.to_string()
            .contains("figures out of range: a PyTorch allocator sample over 2^60"),
        "{err}"
    );
}

#[test]
fn unknown_class_asks_for_an_upgrade() {
    let dir = tempfile::tempdir().unwrap();
    let path = finalized_recording(dir.path(), 1);
    write_as_a_newer_alloctrace(&path, "UPDATE cells SET class = 'tpu-hbm'");
    let err = open_error(&path);
    assert!(matches!(err, RecordingError::UnknownClass { .. }), "{err}");
    assert!(err.to_string().contains("`tpu-hbm`"));
}

#[test]
fn schema_is_queryable_as_documented() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.trace");
    let s = record_three_seconds(&path);
    s.writer.finalize(3.0).unwrap();
    let conn =
        rusqlite::Connection::open_with_flags(&path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap();
    // docs/recording.md: "Top live stacks".
    let (bytes, innermost): (i64, String) = conn
        .query_row(
            "SELECT c.live_bytes, json_extract(s.frames, '$[0]')
             FROM cells AS c JOIN stacks AS s ON s.id = c.stack_id
             ORDER BY c.live_bytes DESC LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!((bytes, innermost.as_str()), (1050, "leak_0"));
    // docs/recording.md: "Live heap over time".
    let points: Vec<(i64, i64)> = conn
        .prepare("SELECT t_s, live_bytes FROM totals_series WHERE class = 'heap' ORDER BY t_s")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<rusqlite::Result<_>>()
        .unwrap();
    assert_eq!(
        points,
        vec![
            (1, 1000 + 5 * 4096),
            (2, 1000 + 600 + 128),
            (3, 1000 + 50 + 128)
        ]
    );
    // docs/recording.md: "Stacks that grew most".
    let grown: Vec<(i64, String)> = conn
        .prepare(GROWTH_QUERY)
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(3)?)))
        .unwrap()
        .collect::<rusqlite::Result<_>>()
        .unwrap();
    assert_eq!(
        grown,
        vec![
            (128, "[stack lost]".to_string()),
            (50, "leak_0".to_string())
        ]
    );
    // The size of malloc(SIZE_MAX) reads as -1, as documented.
    let size: i64 = conn
        .query_row("SELECT size FROM failures", [], |r| r.get(0))
        .unwrap();
    assert_eq!(size, -1);
    let (app, version): (i64, i64) = conn
        .query_row(
            "SELECT * FROM pragma_application_id, pragma_user_version",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!((app, version), (i64::from(APPLICATION_ID), 1));
    let view_rows: i64 = conn
        .query_row(
            "SELECT COUNT(*) FROM series_by_cell WHERE stack_id IS NULL",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(view_rows, 1);
}

/// The `sql` blocks of docs/recording.md.
fn documented_queries() -> Vec<String> {
    let doc = fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/recording.md"))
        .expect("docs/recording.md");
    doc.split("```sql\n")
        .skip(1)
        .map(|block| block.split("```").next().unwrap().to_string())
        .collect()
}

#[test]
fn documented_queries_run() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("docs.trace");
    let s = record_three_seconds(&path);
    s.writer.finalize(3.0).unwrap();
    let conn =
        rusqlite::Connection::open_with_flags(&path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap();
    let queries = documented_queries();
    assert!(queries.len() >= 8, "{} sql blocks", queries.len());
    for sql in &queries {
        let mut stmt = conn.prepare(sql).unwrap_or_else(|e| panic!("{e}\n{sql}"));
        let columns = stmt.column_count();
        let rows: Vec<Vec<rusqlite::types::Value>> = stmt
            .query_map([], |r| (0..columns).map(|i| r.get(i)).collect())
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap_or_else(|e| panic!("{e}\n{sql}"));
        assert!(!rows.is_empty(), "no rows from\n{sql}");
    }
    assert!(queries.iter().any(|q| q.trim() == GROWTH_QUERY.trim()));
}

/// The "Stacks that grew most" query of docs/recording.md, verbatim.
const GROWTH_QUERY: &str = "
WITH first AS (
  SELECT cell_id, live_bytes, MAX(rowid)
  FROM series WHERE t_s = (SELECT MIN(t_s) FROM series)
  GROUP BY cell_id)
SELECT c.live_bytes - IFNULL(f.live_bytes, 0) AS growth,
       IFNULL(f.live_bytes, 0) AS at_start, c.live_bytes AS at_end,
       IFNULL(json_extract(s.frames, '$[0]'), '[stack lost]') AS innermost
FROM cells AS c
LEFT JOIN first AS f ON f.cell_id = c.id
LEFT JOIN stacks AS s ON s.id = c.stack_id
WHERE growth > 0
ORDER BY growth DESC
LIMIT 10;
";

#[test]
fn copies_of_a_killed_recording_read_without_creating_files() {
    let dir = tempfile::tempdir().unwrap();
    let killed = dir.path().join("killed.trace");
    let s = record_three_seconds(&killed);
    let committed = s.committed;
    std::mem::forget(s.writer);
    let copy = |name: &str, suffixes: &[&str]| {
        let to_dir = dir.path().join(name);
        fs::create_dir(&to_dir).unwrap();
        let to = to_dir.join("copy?#%.trace");
        for suffix in suffixes {
            fs::copy(
                format!("{}{suffix}", killed.display()),
                format!("{}{suffix}", to.display()),
            )
            .unwrap();
        }
        (to_dir, to)
    };

    // The main file alone: what was checkpointed, here the schema and metadata.
    let (only_main_dir, only_main) = copy("main", &[""]);
    let rec = Reader::open(&only_main).unwrap();
    assert!(!rec.complete);
    assert_eq!(rec.target, target());
    assert_eq!(rec.state, LedgerState::default());
    assert_eq!(entries(&only_main_dir), vec!["copy?#%.trace"]);

    // Main file and log, without the shared-memory index: everything.
    let (no_shm_dir, no_shm) = copy("no-shm", &["", "-wal"]);
    committed.assert_read_back(&Reader::open(&no_shm).unwrap());
    assert_eq!(
        entries(&no_shm_dir),
        vec!["copy?#%.trace", "copy?#%.trace-wal"]
    );

    // All three.
    let (all_dir, all) = copy("all", &["", "-wal", "-shm"]);
    committed.assert_read_back(&Reader::open(&all).unwrap());
    assert_eq!(entries(&all_dir).len(), 3);
}

/// A bind mount of a directory onto itself, read-only, undone on drop.
struct ReadOnlyMount(PathBuf);

impl ReadOnlyMount {
    fn new(dir: &Path) -> ReadOnlyMount {
        let mount = |args: &[&str]| {
            let status = std::process::Command::new("mount")
                .args(args)
                .arg(dir)
                .arg(dir)
                .status()
                .unwrap();
            assert!(status.success(), "mount {args:?} failed");
        };
        mount(&["--bind"]);
        let guard = ReadOnlyMount(dir.to_path_buf());
        mount(&["-o", "remount,bind,ro"]);
        guard
    }
}

impl Drop for ReadOnlyMount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_killed_recording_on_a_read_only_mount_reads_everything() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        assert_ne!(std::env::var("CI").as_deref(), Ok("true"), "needs root");
        eprintln!("SKIPPED: mounting needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ro = dir.path().join("ro");
    fs::create_dir(&ro).unwrap();
    let killed = ro.join("killed.trace");
    let s = record_three_seconds(&killed);
    let committed = s.committed;
    std::mem::forget(s.writer);
    fs::remove_file(sidecar(&killed, "-shm")).unwrap();
    let leftovers = || {
        let prefix = format!("alloctrace-read-{}-", std::process::id());
        fs::read_dir(std::env::temp_dir())
            .unwrap()
            .filter(|e| {
                let name = e.as_ref().unwrap().file_name();
                name.to_string_lossy().starts_with(&prefix)
            })
            .count()
    };
    let before = leftovers();
    {
        let _mount = ReadOnlyMount::new(&ro);
        committed.assert_read_back(&Reader::open(&killed).unwrap());
        assert_eq!(entries(&ro), vec!["killed.trace", "killed.trace-wal"]);
    }
    assert_eq!(leftovers(), before);
}

#[test]
fn reports_need_only_the_series_endpoints() {
    use crate::views::report::{render_json, render_text};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ends.trace");
    let mut s = record_three_seconds(&path);
    // Two commits in the same second, as the last tick and the final commit can be.
    s.alloc(Some(0), 1, 7);
    s.tick(3, &[]);
    s.alloc(Some(5), 2, 1000);
    s.tick(4, &[5]);
    s.writer.finalize(4.5).unwrap();

    let all = Reader::open(&path).unwrap();
    let ends = Reader::open_with(&path, SeriesRead::Endpoints).unwrap();
    let batches = Reader::open_with(&path, SeriesRead::Batches).unwrap();
    let none = Reader::open_with(&path, SeriesRead::Nothing).unwrap();
    assert!(ends.series.len() < all.series.len());
    assert!(none.series.is_empty() && batches.series.is_empty());
    assert_eq!(render_text(&ends), render_text(&all));
    assert_eq!(render_json(&batches), render_json(&all));
    assert!(render_text(&all).contains("Growth from 1 s to 4 s"));
}

/// The batches the reader streams from the file (cell by cell) are those of the series read
/// whole; a stack that grew every second after the warm-up is the first suspect.
#[test]
fn batches_are_streamed_as_the_whole_series_gives_them() {
    use crate::{recording::batches::SeriesBatches, views::report::render_json};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("batches.trace");
    let mut s = record_three_seconds(&path);
    for t in 3..12 {
        s.alloc(Some(5), 1, 1000);
        let freed = s.alloc(Some(6), 3, 10);
        if t % 2 == 0 {
            for addr in freed {
                s.ledger.free(1, addr);
            }
        }
        s.tick(t, &[5, 6]);
    }
    s.writer.finalize(12.0).unwrap();
    let all = Reader::open(&path).unwrap();
    let streamed = Reader::open_with(&path, SeriesRead::Batches).unwrap();
    let expected = SeriesBatches::from_points(&all.series, all.duration_s).unwrap();
    let mut got = streamed.batches.clone().unwrap();
    let mut want = expected.clone();
    got.cells.sort_by(|a, b| a.0.cmp(&b.0));
    want.cells.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(got, want);
    assert_eq!((want.from_s, want.to_s), (4.0, 12.0));
    let json: serde_json::Value = serde_json::from_str(&render_json(&streamed)).unwrap();
    let first = &json["suspects"]["stacks"][0];
    assert_eq!(first["stack"].as_u64(), Some(5), "{json:#}");
    // 1000 bytes a second from second 3: batch means of 2 s each from 4 s.
    assert_eq!(
        first["batch_means"],
        serde_json::json!([2500, 4500, 6500, 8500]),
        "{json:#}"
    );
}

#[test]
fn finalize_with_a_reader_open_completes_and_keeps_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("busy.trace");
    let s = record_three_seconds(&path);
    let committed = s.committed;
    let reader =
        rusqlite::Connection::open_with_flags(&path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap();
    reader
        .execute_batch("BEGIN; SELECT COUNT(*) FROM cells;")
        .unwrap();
    s.writer.finalize(3.0).unwrap();
    let rec = Reader::open(&path).unwrap();
    assert!(rec.complete);
    committed.assert_read_back(&rec);
    drop(reader);
    assert!(Reader::open(&path).unwrap().complete);
}

/// xorshift64*: a fixed, dependency-free sequence, so a failure names a reproducible seed.
fn next_random(state: &mut u64) -> u64 {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    state.wrapping_mul(0x2545_f491_4f6c_dd1d)
}

#[test]
fn flipped_bytes_are_refused_or_harmless_never_a_panic_or_a_silent_change() {
    use crate::views::{flamegraph, report};
    let dir = tempfile::tempdir().unwrap();
    let path = finalized_recording(dir.path(), 40);
    let intact = std::fs::read(&path).unwrap();
    let render = |rec: &Recorded| {
        (
            report::render_text(rec),
            report::render_json(rec),
            flamegraph::render_svg(rec, &flamegraph::FlamegraphOptions::default()).ok(),
        )
    };
    let expected = render(&Reader::open(&path).unwrap());
    let damaged = dir.path().join("damaged.trace");
    let (mut refused, mut harmless) = (0, 0);
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    for trial in 0..300 {
        let mut bytes = intact.clone();
        for _ in 0..1 + next_random(&mut state) % 4 {
            let at = (next_random(&mut state) % bytes.len() as u64) as usize;
            bytes[at] ^= 1 << (next_random(&mut state) % 8);
        }
        std::fs::write(&damaged, &bytes).unwrap();
        let outcome = std::panic::catch_unwind(|| Reader::open(&damaged).map(|r| render(&r)));
        match outcome {
            Err(_) => panic!("trial {trial}: reading a damaged recording panicked"),
            Ok(Err(e)) => {
                let msg = e.to_string();
                assert!(
                    !msg.contains('\n') && msg.contains("damaged.trace"),
                    "{msg}"
                );
                refused += 1;
            }
            Ok(Ok(rendered)) => {
                assert!(
                    rendered == expected,
                    "trial {trial}: a damaged recording read differently"
                );
                harmless += 1;
            }
        }
    }
    // With this seed about 80 flips land in content (refused); the rest fall in free space or
    // unused parts of pages, and the reports are identical. The file holds a timestamp of its
    // own, so the exact split can move by a few.
    assert!(refused >= 40, "refused {refused}, harmless {harmless}");
}

#[test]
fn a_changed_frame_name_is_refused_as_damaged() {
    let dir = tempfile::tempdir().unwrap();
    let path = finalized_recording(dir.path(), 3);
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.execute(
        "UPDATE stacks SET frames = replace(frames, 'leak', 'lEak')",
        [],
    )
    .unwrap();
    drop(conn);
    let err = open_error(&path);
    assert!(matches!(err, RecordingError::Damaged { .. }), "{err}");
    assert_eq!(
        err.to_string(),
        format!(
            "`{}` is damaged: its content differs from the digest written when it was finalized (a \
             disk, a copy or an edit changed it): use an intact copy or record again",
            path.display()
        )
    );
}

#[test]
fn text_that_is_not_utf8_is_corrupt_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let path = finalized_recording(dir.path(), 3);
    let conn = rusqlite::Connection::open(&path).unwrap();
    // Damage that keeps the digest valid: the digest row goes too, as in an older recording.
    conn.execute_batch(
        "DELETE FROM meta WHERE key = 'content_digest';
         UPDATE meta SET value = CAST(X'66FF6F' AS TEXT) WHERE key = 'target_command';",
    )
    .unwrap();
    drop(conn);
    let err = open_error(&path);
    assert!(matches!(err, RecordingError::Corrupt { .. }), "{err}");
}

#[test]
fn how_the_recording_and_its_processes_ended_reads_back_under_the_digest() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ended.trace");
    let mut s = record_three_seconds(&path);
    let exits = vec![
        ProcessExit {
            code: Some(3),
            ..ProcessExit::unknown(4243, 1.5)
        },
        ProcessExit {
            signal: Some("SIGKILL".into()),
            oom_kill: true,
            ..ProcessExit::unknown(4242, 3.25)
        },
    ];
    s.writer.set_exits(&exits).unwrap();
    s.writer
        .set_stop_reason("target ended: killed by SIGKILL (the OOM killer)")
        .unwrap();
    s.writer.finalize(3.5).unwrap();
    let rec = Reader::open(&path).unwrap();
    assert_eq!(rec.exits, exits);
    assert_eq!(
        rec.stop_reason.as_deref(),
        Some("target ended: killed by SIGKILL (the OOM killer)")
    );
    assert_eq!(rec.write_failure, None);

    // The new keys are under the digest like every other row.
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.execute(
        "UPDATE meta SET value = replace(value, '\"oom_kill\":true', '\"oom_kill\":false') \
         WHERE key = 'exits'",
        [],
    )
    .unwrap();
    drop(conn);
    assert!(matches!(open_error(&path), RecordingError::Damaged { .. }));
}

#[test]
fn a_recording_without_the_newer_keys_reads_as_ending_unknown() {
    let dir = tempfile::tempdir().unwrap();
    let path = finalized_recording(dir.path(), 2);
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.execute_batch("DELETE FROM meta WHERE key IN ('content_digest', 'exits', 'stop_reason');")
        .unwrap();
    drop(conn);
    let rec = Reader::open(&path).unwrap();
    assert!(rec.exits.is_empty() && rec.stop_reason.is_none() && rec.write_failure.is_none());
}

#[test]
fn a_full_file_system_is_named_as_such() {
    let full = rusqlite::Error::SqliteFailure(
        rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_FULL),
        Some("database or disk is full".into()),
    );
    let err = writer::write_error(Path::new("/mnt/small/x.trace"), full);
    assert_eq!(
        err.to_string(),
        "cannot write the recording `/mnt/small/x.trace`: the file system is full (ENOSPC): free \
         space there or record to another file system; the file keeps what was committed before"
    );
}

#[test]
fn figures_out_of_range_are_corrupt_not_a_panic() {
    // A forged recording's -1 reads as 2^64 - 1: summing two such cells, or the views' sums,
    // overflowed (a panic under overflow checks, wrapped figures without).
    for (sql, what) in [
        ("UPDATE cells SET live_bytes = -1", "the cells' live bytes"),
        (
            "UPDATE totals SET peak_bytes = 1 << 61",
            "the class totals' peak bytes",
        ),
        (
            "INSERT INTO faults VALUES (1, NULL, 1 << 49)",
            "bytes faulted in",
        ),
        ("UPDATE series SET t_s = -5", "a second of the series"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let path = finalized_recording(dir.path(), 3);
        write_as_a_newer_alloctrace(&path, sql);
        let err = open_error(&path);
        assert!(
            matches!(err, RecordingError::Corrupt { .. }),
            "{sql}: {err}"
        );
        let detail = format!("(figures out of range: {what} over 2^60)");
        assert!(err.to_string().contains(&detail), "{sql}: {err}");
    }
}

#[test]
fn figures_at_the_limit_read_and_render() {
    use crate::views::{flamegraph, report};
    let dir = tempfile::tempdir().unwrap();
    let path = finalized_recording(dir.path(), 3);
    // Every sum exactly at the limit: one cell, one class, one fault row hold it all.
    let limit = reader::FIGURE_LIMIT;
    let pages = limit / crate::model::PAGE;
    write_as_a_newer_alloctrace(
        &path,
        &format!(
            "UPDATE cells SET live_bytes = 0, allocated_bytes = 0;
             UPDATE cells SET live_bytes = {limit}, allocated_bytes = {limit} WHERE id = 1;
             UPDATE totals SET live_bytes = {limit}, peak_bytes = {limit};
             INSERT INTO faults VALUES (1, NULL, {pages});"
        ),
    );
    let rec = Reader::open(&path).unwrap();
    assert!(report::render_text(&rec).contains("1024.0 PiB"));
    assert!(report::render_json(&rec).contains(&limit.to_string()));
    for kind in [flamegraph::Kind::Live, flamegraph::Kind::Faults] {
        let options = flamegraph::FlamegraphOptions {
            kind,
            ..Default::default()
        };
        flamegraph::render_svg(&rec, &options).unwrap();
    }
}

/// `--warmup-requests`: the judged part starts at the end of the second the Nth request came
/// in; a recording that counted no requests says so, naming the file.
#[test]
fn a_warm_up_in_requests_is_the_second_the_nth_came_in() {
    use crate::model::{PhaseActivity, Warmup};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("requests.trace");
    let mut s = Session::start(&path);
    s.alloc(Some(0), 2, 24);
    for t in 1..=12 {
        s.tick(t, &[0]);
        let serve = PhaseActivity {
            t_s: t,
            phase: "serve".into(),
            entries: 10,
        };
        s.writer.add_phase_activity(&[serve]).unwrap();
    }
    s.writer.finalize(12.0).unwrap();
    let judged = |w| Reader::open_judged(&path, SeriesRead::Batches, Some(w));
    // 25 requests: reached in second 3 (10 + 10 + 10): judged from 4 s.
    let rec = judged(Warmup::Requests(25)).unwrap();
    assert_eq!(rec.batches.map(|b| b.from_s), Some(4.0));
    // More than the recording saw: nothing judged.
    assert!(judged(Warmup::Requests(1000)).unwrap().batches.is_none());
    let quiet = finalized_recording(dir.path(), 1);
    let err = Reader::open_judged(&quiet, SeriesRead::Batches, Some(Warmup::Requests(5)))
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("--warmup-requests: the recording counted no requests")
            && err.ends_with(&format!("(`{}`)", quiet.display())),
        "{err}"
    );
}
