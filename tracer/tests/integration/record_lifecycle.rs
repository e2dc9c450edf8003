//! How a recording ends (target exit, duration, SIGTERM, SIGKILL of the recorder) and the views
//! of a finished recording. Privileged: needs root, eBPF and uprobes.

use std::{
    io::Read,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::process::CommandExt,
    },
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use crate::common::{
    self, Session, TIMEOUT, alloctrace_cmd, assert_clean_error, dir_entries, leaks_totals,
    report_json, report_value, run, start_fixture, start_recorder,
};

#[test]
fn recording_stops_by_itself_when_the_target_exits() {
    require_privileges!();
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("exit.trace");
    let mut target = start_fixture("leaks", "exit");
    let pid = target.pid();
    let mut recorder = start_recorder(pid, &trace, &[]);
    target.send_line("go");
    target.expect_stdout("done");
    target.wait_success();
    // No signal: the recorder must notice the exit, finalize and exit 0 on its own.
    recorder.wait_success();
    let r = report_json(&trace);
    r.assert_well_formed(Some(pid));
    assert!(r.complete, "{}", r.summary());
    // Stacks taken just before the exit are still symbolized.
    r.assert_leaks();
    r.assert_totals(leaks_totals());
    r.assert_no_lost_events();
}

#[test]
fn sigterm_finalizes_the_recording() {
    require_privileges!();
    let s = Session::run_scenario("leaks", "attach", &[]);
    let pid = s.target.pid();
    let r = s.stop(libc::SIGTERM);
    r.assert_well_formed(Some(pid));
    assert!(r.complete, "{}", r.summary());
    r.assert_leaks();
    r.assert_totals(leaks_totals());
}

#[test]
fn sigint_right_after_attached_finalizes_the_recording() {
    require_privileges!();
    // `attached` promises a live recorder: a SIGINT at once must finalize, not kill it.
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("early.trace");
    let mut target = start_fixture("leaks", "attach");
    let mut recorder = start_recorder(target.pid(), &trace, &[]);
    recorder.signal(libc::SIGINT);
    recorder.wait_success();
    let r = report_json(&trace);
    r.assert_well_formed(Some(target.pid()));
    assert!(r.complete, "{}", r.summary());
    assert_eq!(
        r.heap_totals_or_zero().allocated_count,
        0,
        "{}",
        r.summary()
    );
    target.send_line("go");
    target.expect_stdout("done");
    target.close_stdin();
    target.wait_success();
}

#[test]
fn duration_ends_the_recording() {
    require_privileges!();
    let mut s = Session::run_scenario("leaks", "attach", &["-d", "3"]);
    let waited = Instant::now();
    s.recorder.wait_success();
    assert!(
        waited.elapsed() < Duration::from_secs(20),
        "-d 3 took {:?}",
        waited.elapsed()
    );
    s.target.close_stdin();
    s.target.wait_success();
    let r = report_json(&s.trace);
    r.assert_well_formed(Some(s.target.pid()));
    assert!(r.complete, "{}", r.summary());
    assert!(
        (2.5..=15.0).contains(&r.duration_s),
        "duration_s {} for -d 3\n{}",
        r.duration_s,
        r.summary()
    );
    r.assert_leaks();
    r.assert_totals(leaks_totals());
}

#[test]
fn sigkill_of_the_recorder_keeps_what_was_committed() {
    require_privileges!();
    let mut s = Session::run_scenario("leaks", "attach", &[]);
    // The recording is committed once a second: after 2.5 s the leaks are on disk.
    thread::sleep(Duration::from_millis(2500));
    s.recorder.signal(libc::SIGKILL);
    let status = s.recorder.wait();
    assert!(!status.success(), "SIGKILL: {status}");
    s.target.close_stdin();
    s.target.wait_success();
    let r = report_json(&s.trace);
    r.assert_well_formed(Some(s.target.pid()));
    assert!(
        !r.complete,
        "a recording whose recorder was killed is not complete\n{}",
        r.summary()
    );
    r.assert_leaks();
    r.assert_totals(leaks_totals());
}

#[test]
fn text_report_json_file_and_flamegraph() {
    require_privileges!();
    let mut s = Session::run_scenario("leaks", "attach", &[]);
    s.end(libc::SIGINT);
    let kept = s.trace.clone();
    let dir = s.dir.path().to_path_buf();
    let r = report_json(&kept);
    r.assert_leaks();

    // Text report on stdout names the leaking functions.
    let mut cmd = alloctrace_cmd(&["report"]);
    cmd.arg(&kept);
    let out = run("alloctrace report", cmd);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    for f in ["leak_malloc", "leak_pvalloc"] {
        assert!(text.contains(f), "text report lacks {f}:\n{text}");
    }

    // -o writes the same JSON to a file.
    let json_path = dir.join("report.json");
    let mut cmd = alloctrace_cmd(&["report", "--format", "json", "-o"]);
    cmd.arg(&json_path).arg(&kept);
    let out = run("alloctrace report -o", cmd);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let from_file: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json_path).expect("report.json written"))
            .expect("report.json is JSON");
    assert_eq!(from_file["totals"]["heap"]["live_bytes"], 76710);

    // The flamegraph is an SVG that shows the leaking functions.
    let svg_path = dir.join("flame.svg");
    let mut cmd = alloctrace_cmd(&["flamegraph"]);
    cmd.arg(&kept).arg("-o").arg(&svg_path);
    let out = run("alloctrace flamegraph", cmd);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let svg = std::fs::read_to_string(&svg_path).expect("flamegraph written");
    assert!(svg.contains("<svg"), "not an SVG");
    for f in ["heap", "leak_malloc", "leak_pvalloc"] {
        assert!(svg.contains(f), "flamegraph lacks {f}");
    }
}

/// Asserts that `trace` is one finalized file (its log folded in) that ended with `reason`.
fn assert_finalized(trace: &Path, reason: &str) {
    let dir = trace.parent().unwrap();
    let name = trace.file_name().unwrap().to_string_lossy().into_owned();
    assert_eq!(dir_entries(dir), vec![name], "files beside the recording");
    let v = report_value(trace);
    assert_eq!(v["complete"], true);
    assert_eq!(v["stop_reason"], reason);
}

#[test]
fn sighup_finalizes_the_recording_as_sigterm_does() {
    require_privileges!();
    let mut s = Session::run_scenario("leaks", "attach", &[]);
    s.end(libc::SIGHUP);
    assert_finalized(&s.trace, "hung up (SIGHUP)");
    let r = report_json(&s.trace);
    r.assert_well_formed(Some(s.target.pid()));
    r.assert_leaks();
    r.assert_totals(leaks_totals());
}

/// A pseudo-terminal: (master, slave), both close-on-exec (tests start processes side by side:
/// a master inherited by another child would keep the terminal from hanging up).
fn open_pty() -> (OwnedFd, OwnedFd) {
    let last_error = || std::io::Error::last_os_error();
    // SAFETY: posix_openpt returns a new descriptor or -1.
    let master = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) };
    assert!(master >= 0, "posix_openpt: {}", last_error());
    // SAFETY: a fresh descriptor we own.
    let master = unsafe { OwnedFd::from_raw_fd(master) };
    let mut name = [0 as libc::c_char; 128];
    // SAFETY: grantpt and unlockpt take the master; ptsname_r writes at most `name.len()` bytes.
    unsafe {
        assert_eq!(
            libc::grantpt(master.as_raw_fd()),
            0,
            "grantpt: {}",
            last_error()
        );
        assert_eq!(
            libc::unlockpt(master.as_raw_fd()),
            0,
            "unlockpt: {}",
            last_error()
        );
        assert_eq!(
            libc::ptsname_r(master.as_raw_fd(), name.as_mut_ptr(), name.len()),
            0
        );
    }
    // SAFETY: ptsname_r wrote a NUL-terminated path.
    let path = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) };
    // SAFETY: a valid path; open returns a new descriptor or -1.
    let slave = unsafe {
        libc::open(
            path.as_ptr(),
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        )
    };
    assert!(slave >= 0, "open {path:?}: {}", last_error());
    // SAFETY: a fresh descriptor we own.
    (master, unsafe { OwnedFd::from_raw_fd(slave) })
}

/// Reads the terminal's output until `attached` shows and says what it read; closes the master
/// side, which hangs the terminal up, when told to.
fn terminal(master: OwnedFd) -> (mpsc::Receiver<String>, mpsc::Sender<()>) {
    let (shown_tx, shown) = mpsc::channel();
    let (hang_up, hang_up_rx) = mpsc::channel::<()>();
    thread::spawn(move || {
        let mut master = std::fs::File::from(master);
        let mut seen = String::new();
        let mut buf = [0u8; 512];
        while !seen.contains("attached") {
            match master.read(&mut buf) {
                Ok(n) if n > 0 => seen.push_str(&String::from_utf8_lossy(&buf[..n])),
                _ => break,
            }
        }
        let _ = shown_tx.send(seen);
        let _ = hang_up_rx.recv_timeout(TIMEOUT);
        // `master` closes here: the hang-up.
    });
    (shown, hang_up)
}

#[test]
fn a_terminal_that_hangs_up_finalizes_the_recording() {
    require_privileges!();
    // As when an SSH session drops: alloctrace's terminal goes away, the kernel sends SIGHUP to
    // it (the session's controlling process), and its writes to the terminal fail from then on.
    let mut target = start_fixture("leaks", "attach");
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("hangup.trace");
    let (master, slave) = open_pty();
    let mut cmd = alloctrace_cmd(&["record", "--heap", "-p", &target.pid().to_string(), "-o"]);
    cmd.arg(&trace)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(slave));
    // SAFETY: setsid and ioctl are async-signal-safe; fd 2 is the terminal by now.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 || libc::ioctl(2, libc::TIOCSCTTY, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut recorder = cmd.spawn().expect("start alloctrace record");
    drop(cmd);
    let (shown, hang_up) = terminal(master);
    let seen = shown
        .recv_timeout(TIMEOUT)
        .expect("the terminal shows `attached`");
    assert!(seen.contains("attached"), "{seen}");
    target.send_line("go");
    target.expect_stdout("done");
    // Progress lines reach the terminal once a second: let one be written, then hang up.
    thread::sleep(Duration::from_millis(1500));
    hang_up.send(()).unwrap();
    let deadline = Instant::now() + TIMEOUT;
    let status = loop {
        if let Some(status) = recorder.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "alloctrace did not stop at the hang-up"
        );
        thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0), "{status}");
    assert_finalized(&trace, "hung up (SIGHUP)");
    let r = report_json(&trace);
    r.assert_leaks();
    r.assert_totals(leaks_totals());
    target.close_stdin();
    target.wait_success();
}

#[test]
fn a_second_recorder_on_a_traced_process_is_refused() {
    require_privileges!();
    let mut target = start_fixture("leaks", "attach");
    let pid = target.pid();
    let dir = tempfile::tempdir().unwrap();
    let (first_trace, second_trace) = (
        dir.path().join("first.trace"),
        dir.path().join("second.trace"),
    );
    let mut first = start_recorder(pid, &first_trace, &[]);
    let mut cmd = alloctrace_cmd(&["record", "--heap", "-d", "1", "-p", &pid.to_string(), "-o"]);
    cmd.arg(&second_trace);
    let out = run("a second alloctrace record", cmd);
    assert_clean_error(&out, "already traced");
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        format!(
            "alloctrace: error: process {pid} is already traced by alloctrace (PID {}, writing \
             {}): stop that recording first",
            first.pid(),
            first_trace.display()
        )
    );
    assert!(!second_trace.exists(), "the refused recorder left a file");
    // The first recording saw everything, exactly once.
    target.send_line("go");
    target.expect_stdout("done");
    common::stop_recording(&mut first, &mut target);
    let r = report_json(&first_trace);
    assert!(r.complete, "{}", r.summary());
    r.assert_leaks();
    r.assert_totals(leaks_totals());
    r.assert_no_lost_events();
}

#[test]
fn a_target_killed_by_sigkill_is_stored_and_the_report_opens_on_it() {
    require_privileges!();
    let mut s = Session::run_scenario("leaks", "attach", &[]);
    let pid = s.target.pid();
    s.target.signal(libc::SIGKILL);
    // No signal to the recorder: the target's end ends the recording.
    s.recorder.wait_success();
    let v = report_value(&s.trace);
    assert_eq!(v["complete"], true);
    let exit = &v["target_exit"];
    assert_eq!(exit["pid"], pid);
    assert_eq!(exit["signal"], "SIGKILL");
    assert_eq!(exit["oom_kill"], false, "a kill(2) is no OOM kill: {exit}");
    assert_eq!(exit["code"], serde_json::Value::Null);
    assert_eq!(v["exits"].as_array().unwrap().len(), 1, "{}", v["exits"]);
    assert_eq!(v["stop_reason"], "target ended: killed by SIGKILL");

    let mut cmd = alloctrace_cmd(&["report"]);
    cmd.arg(&s.trace);
    let out = run("alloctrace report", cmd);
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    let t_s = exit["t_s"].as_f64().unwrap();
    assert_eq!(
        lines[..2],
        [
            format!("Target process {pid} was killed by SIGKILL at {t_s:.1} s.").as_str(),
            "The final ledger and the last seconds before its death follow.",
        ],
        "{text}"
    );
    // The final ledger follows: what it held when it died.
    for f in ["leak_malloc", "leak_pvalloc"] {
        assert!(text.contains(f), "{text}");
    }
    report_json(&s.trace).assert_totals(leaks_totals());
}

/// A tmpfs of `size` mounted on a new temporary directory, unmounted when dropped.
struct SmallFileSystem {
    dir: tempfile::TempDir,
}

impl SmallFileSystem {
    fn mount(size: &str) -> SmallFileSystem {
        let dir = tempfile::tempdir().unwrap();
        let mut cmd = Command::new("mount");
        cmd.args([
            "-t",
            "tmpfs",
            "-o",
            &format!("size={size},mode=0700"),
            "tmpfs",
        ])
        .arg(dir.path());
        let out = run("mount -t tmpfs", cmd);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        SmallFileSystem { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Writes `name` until the file system is full.
    fn fill(&self, name: &str) {
        use std::io::Write;
        let mut filler = std::fs::File::create(self.path(name)).unwrap();
        let block = [0xa5u8; 4096];
        loop {
            if let Err(e) = filler.write_all(&block) {
                assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{e}");
                return;
            }
        }
    }
}

impl Drop for SmallFileSystem {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

#[test]
fn a_full_disk_is_named_by_the_recorder_and_in_what_it_kept() {
    require_privileges!();
    let fs = SmallFileSystem::mount("4m");
    let mut target = start_fixture("leaks", "attach");
    let trace = fs.path("full.trace");
    let mut recorder = start_recorder(target.pid(), &trace, &[]);
    // The first commit is due a second after `attached`: the file system is full by then.
    fs.fill("filler");
    target.send_line("go");
    target.expect_stdout("done");
    let status = recorder.wait();
    assert_eq!(status.code(), Some(1), "{status}");
    let stderr = recorder.stderr_text();
    let expected = format!(
        "alloctrace: error: cannot write the recording `{}`: the file system is full (ENOSPC): \
         free space there or record to another file system; the file keeps what was committed \
         before",
        trace.display()
    );
    assert!(stderr.lines().any(|l| l == expected), "{stderr}");

    // What was kept says why it stops where it does, not that the tracer was killed.
    let v = report_value(&trace);
    assert_eq!(v["complete"], false);
    assert_eq!(v["write_failure"], "the file system was full (ENOSPC)");
    assert_eq!(v["totals"], serde_json::json!({}), "nothing was committed");
    let mut cmd = alloctrace_cmd(&["report"]);
    cmd.arg(&trace);
    let text = String::from_utf8_lossy(&run("alloctrace report", cmd).stdout).into_owned();
    assert!(
        text.contains(
            "duration: NOT FINALIZED: writing stopped, the file system was full (ENOSPC); data up \
             to 0 s\n"
        ),
        "{text}"
    );
    assert!(
        text.contains(
            "  nothing was committed before writing stopped (the file system was full (ENOSPC))\n"
        ),
        "{text}"
    );
    assert!(!text.contains("killed"), "{text}");
    // The target never noticed.
    target.close_stdin();
    target.wait_success();
}
