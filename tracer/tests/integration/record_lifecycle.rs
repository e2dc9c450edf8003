//! How a recording ends (target exit, duration, SIGTERM, SIGKILL of the recorder) and the views
//! of a finished recording. Privileged: needs root, eBPF and uprobes.

use std::{
    thread,
    time::{Duration, Instant},
};

use crate::common::{
    Session, alloctrace_cmd, leaks_totals, report_json, run, start_fixture, start_recorder,
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
