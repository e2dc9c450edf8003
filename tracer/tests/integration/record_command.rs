//! `alloctrace record -o FILE -- CMD ARGS...`: the command is traced from its first instruction
//! and the recording ends when it exits. Privileged: needs root, eBPF and uprobes.

use std::path::Path;

use crate::common::{
    self, Report, Totals, all_live, alloctrace_cmd, fixture, leaks_totals, report_json, run,
};

/// Runs `alloctrace record --heap -o cmd.trace -- ARGV...` (in a temporary directory) to
/// completion and returns its report.
fn record_command(argv: &[&str]) -> Report {
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("cmd.trace");
    let mut cmd = alloctrace_cmd(&["record", "--heap", "-o"]);
    cmd.arg(&trace).arg("--").args(argv);
    common::run_recording(&format!("record -- {argv:?}"), cmd);
    report_json(&trace)
}

/// `record_command` of `heap_fixture SCENARIO run`.
fn record_heap_fixture(scenario: &str) -> Report {
    let exe = fixture("heap_fixture");
    record_command(&[exe.to_str().unwrap(), scenario, "run"])
}

#[test]
fn command_leaks_are_exact() {
    require_privileges!();
    let r = record_heap_fixture("leaks");
    r.assert_well_formed(None);
    assert!(r.complete, "{}", r.summary());
    assert_eq!(r.target.pids.len(), 1, "{}", r.summary());
    assert!(
        r.target.command.contains("heap_fixture leaks run"),
        "target.command\n{}",
        r.summary()
    );
    r.assert_leaks();
    // The fixture allocates nothing else, from its first instruction to its exit.
    r.assert_totals(leaks_totals());
    assert!(r.failures.is_empty(), "{}", r.summary());
    assert_eq!(r.unmatched_frees, 0, "{}", r.summary());
    r.assert_no_lost_events();
}

#[test]
fn command_is_traced_before_main() {
    require_privileges!();
    let exe = fixture("ctor_fixture");
    let r = record_command(&[exe.to_str().unwrap()]);
    r.assert_well_formed(None);
    assert!(r.complete, "{}", r.summary());
    // A constructor runs before main: only a launch that attaches before any code sees it.
    r.assert_cell("leak_in_constructor", all_live(3, 4242));
    r.assert_cell("leak_in_main", all_live(2, 777));
    r.assert_totals(Totals {
        live_bytes: 3 * 4242 + 2 * 777,
        live_count: 5,
        peak_bytes: 3 * 4242 + 2 * 777,
        allocated_bytes: 3 * 4242 + 2 * 777,
        allocated_count: 5,
        freed_count: 0,
    });
    r.assert_no_lost_events();
}

#[test]
fn command_with_threads_counts_every_thread() {
    require_privileges!();
    let r = record_heap_fixture("threads");
    r.assert_well_formed(None);
    assert!(r.complete, "{}", r.summary());
    // Thread start-up (glibc's TLS vectors) allocates too, under other stacks: only thread_leak
    // is known exactly.
    r.assert_cell("thread_leak", all_live(8000, 40));
    r.assert_no_lost_events();
}

#[test]
fn command_failures_leave_nothing_live() {
    require_privileges!();
    let r = record_heap_fixture("failures");
    r.assert_well_formed(None);
    assert_eq!(r.failures.len(), 4, "{}", r.summary());
    let failed: u64 = r.failures.iter().map(|f| f.count).sum();
    assert_eq!(failed, 3 + 2 + 4 + 1, "{}", r.summary());
    let t = r.heap_totals();
    assert_eq!((t.live_bytes, t.live_count), (0, 0), "{}", r.summary());
}

#[test]
fn statically_linked_command_is_traced_in_its_own_allocator() {
    require_privileges!();
    // No libc.so is mapped: malloc and friends live in the executable's symbol table.
    let exe = common::fixture_variant("heap_fixture", "static", &["-static"]);
    let r = record_command(&[exe.to_str().unwrap(), "leaks", "run"]);
    assert!(r.complete, "{}", r.summary());
    // Exact per leaking function; the totals also hold static glibc's own start-up allocations
    // (`_dl_new_object`, ...); a dynamic executable makes those in ld.so, with its own allocator.
    r.assert_leaks();
    let leaks = leaks_totals();
    let t = r.heap_totals();
    assert!(
        t.live_bytes >= leaks.live_bytes && t.live_count >= leaks.live_count,
        "{}",
        r.summary()
    );
    r.assert_no_lost_events();
}

#[test]
fn stripped_static_command_without_malloc_symbols_fails_cleanly() {
    require_privileges!();
    let exe = common::fixture_variant("heap_fixture", "static-stripped", &["-static", "-s"]);
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("x.trace");
    let mut cmd = alloctrace_cmd(&["record", "--heap", "-o"]);
    cmd.arg(&trace).arg("--").arg(&exe).args(["leaks", "run"]);
    let out = run("alloctrace record -- stripped static", cmd);
    common::assert_clean_error(&out, "malloc");
    assert!(!trace.exists(), "no recording may be left behind");
}

#[test]
fn a_target_that_execs_mid_recording_is_traced_in_its_new_image() {
    require_privileges!();
    // sh is attached to, then replaces itself with the fixture: what sh had live went with its
    // image, and the fixture's leaks count exactly, through the same probes, under the same PID.
    let exe = fixture("heap_fixture");
    let script = format!("read line; exec {} leaks attach", exe.display());
    let mut sh = std::process::Command::new("/bin/sh");
    sh.args(["-c", &script]);
    let mut target = common::TestProcess::spawn("sh -c exec heap_fixture", sh);
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("exec.trace");
    let mut recorder = common::start_recorder(target.pid(), &trace, &[]);
    target.send_line("exec now");
    target.expect_stdout("ready");
    target.send_line("go");
    target.expect_stdout("done");
    common::stop_recording(&mut recorder, &mut target);

    let r = report_json(&trace);
    assert!(r.complete, "{}", r.summary());
    r.assert_leaks();
    let (live, expected) = (r.heap_totals(), leaks_totals());
    assert_eq!(
        (live.live_bytes, live.live_count),
        (expected.live_bytes, expected.live_count),
        "live heap after the exec is the fixture's leaks alone\n{}",
        r.summary()
    );
    r.assert_no_lost_events();
}

#[test]
fn an_exec_takes_the_old_images_heap_out_of_the_live_bytes_and_peak() {
    require_privileges!();
    // The fixture keeps 32 MiB and execs itself, twice, the second time into the leaks
    // scenario: each block went with its image. The kernel's heap ledger takes an image's
    // blocks out of the live bytes at its exec, so the peak is one block, not two, nor one and
    // the leaks. The second image's block is taken out only if the kernel tagged it with that
    // image's generation: a cache that kept the first image's would leave it in.
    let r = record_heap_fixture("exec_leaks");
    assert!(r.complete, "{}", r.summary());
    r.assert_leaks();
    let (t, leaks) = (r.heap_totals(), leaks_totals());
    assert_eq!(
        (t.live_bytes, t.live_count, t.peak_bytes),
        (leaks.live_bytes, leaks.live_count, 32 << 20),
        "{}",
        r.summary()
    );
    r.assert_no_lost_events();
}

#[test]
fn a_short_lived_program_execed_by_the_command_is_named_from_its_own_image() {
    require_privileges!();
    // env replaces itself with the fixture, which does its work and exits in a few
    // milliseconds, within one ring poll: its events are read after it has gone. Held at its exit
    // under ptrace (`session/launch.rs`), its mappings are read first, and every leak is named.
    let exe = fixture("heap_fixture");
    let r = record_command(&["env", exe.to_str().unwrap(), "leaks", "run"]);
    assert!(r.complete, "{}", r.summary());
    assert_eq!(r.target.pids.len(), 1, "{}", r.summary());
    r.assert_leaks();
    r.assert_no_lost_events();
}

#[test]
fn a_long_running_command_is_left_free_of_ptrace() {
    require_privileges!();
    // The exit hold lasts while the image is young: a server launched under alloctrace must be
    // left attachable by a debugger or profiler afterwards, and undisturbed.
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("long.trace");
    let mut cmd = alloctrace_cmd(&["record", "-o"]);
    cmd.arg(&trace)
        .args(["--", "sh", "-c", "read line; echo $$; read line; exit 7"]);
    let mut target = common::TestProcess::spawn("record -- sh (long)", cmd);
    target.send_line("go");
    let pid: u32 = target.read_stdout_line().trim().parse().unwrap();
    let tracer_of = |pid: u32| -> String {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("TracerPid:"))
            .unwrap()
            .trim()
            .to_string()
    };
    assert_ne!(tracer_of(pid), "0", "held while young");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while tracer_of(pid) != "0" {
        assert!(
            std::time::Instant::now() < deadline,
            "still traced after 30 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    target.send_line("end");
    let status = target.wait();
    assert_eq!(status.code(), Some(7), "its exit status is passed on");
    let r = report_json(&trace);
    assert!(r.complete, "{}", r.summary());
}

#[test]
fn tracefs_is_mounted_when_the_machine_has_not_mounted_it() {
    require_privileges!();
    // In a private mount namespace (the machine's own mounts stay as they are), unmount tracefs
    // and record: alloctrace mounts it for its tracepoints.
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("tracefs.trace");
    let script = format!(
        "umount /sys/kernel/tracing 2>/dev/null; umount /sys/kernel/debug/tracing 2>/dev/null; \
         test ! -e /sys/kernel/tracing/events || exit 3; \
         {} record -o {} -- /bin/true",
        common::alloctrace(),
        trace.display()
    );
    let mut cmd = std::process::Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "sh", "-c", &script]);
    let out = run("unshare -m alloctrace record", cmd);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(trace.exists());
}

/// Runs `alloctrace record -o DIR/NAME.trace ARGS... -- ARGV...` to completion; returns its
/// output and the recording's JSON report.
fn record_to_the_end(
    dir: &Path,
    name: &str,
    args: &[&str],
    argv: &[&str],
) -> (std::process::Output, serde_json::Value) {
    let trace = dir.join(format!("{name}.trace"));
    let mut cmd = alloctrace_cmd(&["record"]);
    cmd.args(args).arg("-o").arg(&trace).arg("--").args(argv);
    let out = run(&format!("alloctrace record -- {argv:?}"), cmd);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.lines().any(|l| l.starts_with("attached")),
        "{argv:?}: no `attached` line:\n{stderr}"
    );
    (out, common::report_value(&trace))
}

#[test]
fn the_command_exit_status_is_passed_on_and_stored() {
    require_privileges!();
    let dir = tempfile::tempdir().unwrap();
    for (name, argv, status, code, signal) in [
        ("false", &["/bin/false"][..], 1, Some(1), None),
        ("exit7", &["sh", "-c", "exit 7"][..], 7, Some(7), None),
        ("true", &["/bin/true"][..], 0, Some(0), None),
        // As a shell reports it: 128 + SIGTERM's 15.
        (
            "term",
            &["sh", "-c", "kill -TERM $$"][..],
            143,
            None,
            Some("SIGTERM"),
        ),
    ] {
        let (out, v) = record_to_the_end(dir.path(), name, &[], argv);
        assert_eq!(out.status.code(), Some(status), "{argv:?}: {}", out.status);
        let exit = &v["target_exit"];
        assert_eq!(exit["pid"], v["target"]["pids"][0], "{argv:?}: {exit}");
        assert_eq!(exit["code"].as_i64(), code, "{argv:?}: {exit}");
        assert_eq!(exit["signal"].as_str(), signal, "{argv:?}: {exit}");
        assert_eq!(exit["stopped_by_alloctrace"], false, "{argv:?}: {exit}");
        assert_eq!(v["complete"], true);
    }
}

#[test]
fn a_command_still_running_when_the_duration_ends_is_stopped_not_left_to_init() {
    require_privileges!();
    let dir = tempfile::tempdir().unwrap();
    // SIGTERM ends `sleep`; one that ignores SIGTERM gets SIGKILL 5 s later.
    for (name, argv, signal, at_least) in [
        ("term", &["sleep", "60"][..], "SIGTERM", 1.0),
        (
            "kill",
            &["sh", "-c", "trap '' TERM; exec sleep 60"][..],
            "SIGKILL",
            1.0 + 5.0,
        ),
    ] {
        let (out, v) = record_to_the_end(dir.path(), name, &["-d", "1"], argv);
        // The recording ended by its duration, not by the command: alloctrace's own status.
        assert!(out.status.success(), "{argv:?}: {}", out.status);
        let exit = &v["target_exit"];
        assert_eq!(exit["signal"], signal, "{argv:?}: {exit}");
        assert_eq!(exit["stopped_by_alloctrace"], true, "{argv:?}: {exit}");
        assert!(
            exit["t_s"].as_f64().unwrap() >= at_least,
            "{argv:?}: {exit}"
        );
        assert_eq!(
            v["stop_reason"],
            format!("duration elapsed; the launched command: stopped by alloctrace with {signal}")
        );
        // Reaped by alloctrace: not running on under PID 1.
        let pid = exit["pid"].as_u64().unwrap();
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "{argv:?}: PID {pid} outlived the recording"
        );
    }
}
