//! Bad input: one `alloctrace: error:` line on stderr, a non-zero exit, and no output file left
//! behind. The `record` cases are privileged (the recorder needs root and eBPF to get that far);
//! the `report` and `flamegraph` cases run anywhere.

use std::path::Path;

use crate::common::{
    self, Session, TestProcess, alloctrace_cmd, assert_clean_error, dir_entries, report_json, run,
    start_fixture,
};

/// A PID that no process has right now.
fn unused_pid() -> u32 {
    let max: u32 = std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(32768);
    (2..max)
        .rev()
        .find(|pid| !Path::new(&format!("/proc/{pid}")).exists())
        .expect("a free PID")
}

/// Lets a `heap_fixture ... attach` that was not traced (or only briefly) run its scenario and
/// exit: a failed `record` must not have disturbed it.
fn finish(mut target: TestProcess) {
    target.send_line("go");
    target.expect_stdout("done");
    target.close_stdin();
    target.wait_success();
}

/// The bad-input contract (`assert_clean_error`), with the error line exactly `line`.
fn assert_error_line(out: &std::process::Output, line: &str) {
    assert_clean_error(out, "");
    assert_eq!(String::from_utf8_lossy(&out.stderr).trim(), line);
}

/// `record -p PID` must fail with the error line `line`, leaving no file behind.
fn assert_record_refused(pid: u32, line: &str) {
    let dir = tempfile::tempdir().unwrap();
    let out = record_pid(pid, &dir.path().join("x.trace"), &["-d", "1"]);
    assert_error_line(&out, line);
    assert_eq!(dir_entries(dir.path()), Vec::<String>::new(), "left behind");
}

fn record_pid(pid: u32, output: &Path, extra: &[&str]) -> std::process::Output {
    let mut cmd = alloctrace_cmd(&["record", "-p", &pid.to_string(), "-o"]);
    cmd.arg(output).args(extra);
    run("alloctrace record -p", cmd)
}

#[test]
fn record_of_a_nonexistent_pid_fails_cleanly() {
    require_privileges!();
    let dir = tempfile::tempdir().unwrap();
    let pid = unused_pid();
    let out = record_pid(pid, &dir.path().join("x.trace"), &["-d", "1"]);
    assert_clean_error(&out, &pid.to_string());
    assert_eq!(dir_entries(dir.path()), Vec::<String>::new(), "left behind");
}

#[test]
fn record_of_a_kernel_thread_fails_cleanly() {
    require_privileges!();
    let stat = std::fs::read_to_string("/proc/2/stat").expect("PID 2 exists");
    assert!(stat.contains("(kthreadd)"), "PID 2 is not kthreadd: {stat}");
    let dir = tempfile::tempdir().unwrap();
    let out = record_pid(2, &dir.path().join("x.trace"), &["-d", "1"]);
    assert_clean_error(&out, "kernel thread");
    assert_eq!(dir_entries(dir.path()), Vec::<String>::new(), "left behind");
}

#[test]
fn record_refuses_an_existing_output_without_force() {
    require_privileges!();
    let target = start_fixture("leaks", "attach");
    let dir = tempfile::tempdir().unwrap();
    let existing = dir.path().join("existing.trace");
    std::fs::write(&existing, "precious").unwrap();
    let out = record_pid(target.pid(), &existing, &["-d", "1"]);
    assert_clean_error(&out, "--force");
    assert_eq!(
        std::fs::read_to_string(&existing).unwrap(),
        "precious",
        "the existing file was modified"
    );
    assert_eq!(dir_entries(dir.path()), vec!["existing.trace".to_string()]);
    finish(target);
}

#[test]
fn record_with_force_replaces_an_existing_output() {
    require_privileges!();
    let target = start_fixture("leaks", "attach");
    let dir = tempfile::tempdir().unwrap();
    let existing = dir.path().join("existing.trace");
    std::fs::write(&existing, "old contents").unwrap();
    let out = record_pid(target.pid(), &existing, &["-d", "1", "--force"]);
    assert!(
        out.status.success(),
        "record --force failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = report_json(&existing);
    assert!(r.complete, "{}", r.summary());
    assert_eq!(r.target.pids, vec![target.pid()]);
    finish(target);
}

#[test]
fn record_into_an_unwritable_directory_fails_cleanly() {
    require_privileges!();
    let target = start_fixture("leaks", "attach");
    let dir = tempfile::tempdir().unwrap();
    // A directory that does not exist.
    let missing = dir.path().join("no-such-dir").join("x.trace");
    let out = record_pid(target.pid(), &missing, &["-d", "1"]);
    assert_clean_error(&out, "no-such-dir");
    assert_eq!(dir_entries(dir.path()), Vec::<String>::new(), "left behind");
    // A directory where not even root may create files.
    let in_proc = Path::new("/proc/alloctrace-test.trace");
    let out = record_pid(target.pid(), in_proc, &["-d", "1"]);
    assert_clean_error(&out, "/proc");
    assert!(!in_proc.exists());
    finish(target);
}

#[test]
fn record_of_a_missing_command_fails_cleanly() {
    require_privileges!();
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = alloctrace_cmd(&["record", "-o"]);
    cmd.arg(dir.path().join("x.trace"))
        .arg("--")
        .arg("/nonexistent/alloctrace-no-such-command");
    let out = run("alloctrace record -- missing", cmd);
    // The OS's reason once, not once more as the cause of itself.
    assert_error_line(
        &out,
        "alloctrace: error: cannot start `/nonexistent/alloctrace-no-such-command`: no such file \
         or directory",
    );
    assert_eq!(dir_entries(dir.path()), Vec::<String>::new(), "left behind");
}

/// The processes whose parent is `parent`.
fn children_of(parent: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let after = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
            after.split_whitespace().nth(1) == Some(parent.to_string().as_str())
        })
        .collect()
}

/// The state letter of `/proc/PID/stat` (`Z` for a zombie).
fn state_of(pid: u32) -> String {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
    after.split_whitespace().next().unwrap_or("").to_string()
}

/// Waits (up to `TIMEOUT`) for `found` to give something.
fn wait_for<T>(what: &str, found: impl Fn() -> Option<T>) -> T {
    let deadline = std::time::Instant::now() + common::TIMEOUT;
    loop {
        if let Some(value) = found() {
            return value;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

#[test]
fn record_of_a_zombie_names_it_and_its_parent() {
    require_privileges!();
    // sh starts `true` and becomes `sleep`, which never reaps it: a zombie whose parent lives.
    let mut sh = std::process::Command::new("sh");
    sh.args(["-c", "/bin/true & exec sleep 30"]);
    let parent = TestProcess::spawn("sh -c true & exec sleep", sh);
    let zombie = wait_for("the zombie", || {
        children_of(parent.pid())
            .into_iter()
            .find(|&child| state_of(child) == "Z")
    });
    assert_record_refused(
        zombie,
        &format!(
            "alloctrace: error: process {zombie} is a zombie (exited, not yet reaped by its parent \
             {}): nothing to trace",
            parent.pid()
        ),
    );
}

#[test]
fn record_of_a_process_whose_main_thread_exited_names_it() {
    require_privileges!();
    let mut cmd = std::process::Command::new(common::fixture("lifecycle_fixture"));
    cmd.arg("main-exits");
    let mut target = TestProcess::spawn("lifecycle_fixture main-exits", cmd);
    target.expect_stdout("ready");
    let pid = target.pid();
    wait_for("the main thread's exit", || {
        (state_of(pid) == "Z").then_some(())
    });
    assert_record_refused(
        pid,
        &format!(
            "alloctrace: error: process {pid}'s main thread has exited (2 other threads still \
             run): alloctrace cannot trace it: /proc/{pid}/maps is empty without the main thread, \
             and uprobes attached for a process follow its main thread's memory map, gone with it"
        ),
    );
    // Its other threads run on, undisturbed, and end it at EOF.
    target.close_stdin();
    target.wait_success();
}

/// `report` and `flamegraph` of `input` must fail cleanly, naming the file, and write nothing.
fn assert_views_reject(dir: &Path, input: &Path) {
    let name = input.file_name().unwrap().to_str().unwrap().to_string();
    let before = dir_entries(dir);
    for (what, args, out_name) in [
        ("report", vec!["report", "-o"], "out.txt"),
        (
            "report --format json",
            vec!["report", "--format", "json", "-o"],
            "out.json",
        ),
        ("flamegraph", vec!["flamegraph", "-o"], "out.svg"),
    ] {
        let mut cmd = alloctrace_cmd(&args);
        cmd.arg(dir.join(out_name)).arg(input);
        let out = run(what, cmd);
        assert_clean_error(&out, &name);
        assert_eq!(
            dir_entries(dir),
            before,
            "`{what}` of {name} left files behind"
        );
    }
    // Without -o the report goes to stdout; it must still fail.
    let mut cmd = alloctrace_cmd(&["report"]);
    cmd.arg(input);
    assert_clean_error(&run("report to stdout", cmd), &name);
}

#[test]
fn views_reject_a_corrupt_recording() {
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.trace");
    std::fs::write(&junk, "this is not an alloctrace recording\n".repeat(200)).unwrap();
    assert_views_reject(dir.path(), &junk);
}

#[test]
fn views_reject_an_empty_recording() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.trace");
    std::fs::write(&empty, "").unwrap();
    assert_views_reject(dir.path(), &empty);
}

#[test]
fn views_reject_a_missing_recording() {
    let dir = tempfile::tempdir().unwrap();
    assert_views_reject(dir.path(), &dir.path().join("missing.trace"));
}

#[test]
fn views_reject_a_truncated_recording() {
    require_privileges!();
    let mut s = Session::run_scenario("leaks", "attach", &[]);
    s.end(libc::SIGINT);
    let full = std::fs::read(&s.trace).expect("the recording");
    assert!(report_json(&s.trace).complete);
    for (name, len) in [
        ("half.trace", full.len() / 2),
        ("header.trace", 100.min(full.len())),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let cut = dir.path().join(name);
        std::fs::write(&cut, &full[..len]).unwrap();
        assert_views_reject(dir.path(), &cut);
    }
}

#[test]
fn record_as_an_unprivileged_user_says_to_run_as_root() {
    require_privileges!();
    let Ok(setpriv) = which_setpriv() else {
        panic!("setpriv (util-linux) is needed to drop privileges in this test");
    };
    let dir = tempfile::tempdir().unwrap();
    let target = start_fixture("leaks", "attach");
    let trace = dir.path().join("x.trace");
    let mut cmd = std::process::Command::new(setpriv);
    cmd.args([
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        common::alloctrace(),
    ])
    .args(["record", "-p", &target.pid().to_string(), "-d", "1", "-o"])
    .arg(&trace);
    let out = run("alloctrace record as nobody", cmd);
    assert_clean_error(&out, "root");
    assert!(!trace.exists(), "no recording may be left behind");
    finish(target);
}

fn which_setpriv() -> Result<std::path::PathBuf, ()> {
    ["/usr/bin/setpriv", "/bin/setpriv"]
        .iter()
        .map(std::path::PathBuf::from)
        .find(|p| p.exists())
        .ok_or(())
}

/// A phase rule whose function the file does not have: one line that says which and what to do;
/// the target is not disturbed. One whose file the target does not map (yet) is said on one line
/// too, and waited for: the library may be loaded later.
#[test]
fn record_with_a_phase_rule_that_finds_nothing_says_so_and_leaves_the_target_alone() {
    require_privileges!();
    let target = start_fixture("leaks", "attach");
    let pid = target.pid();
    let dir = tempfile::tempdir().unwrap();
    let waited = dir.path().join("waited.trace");
    let out = record_pid(
        pid,
        &waited,
        &["-d", "1", "--phase", "serve=libnothing.so:serve"],
    );
    assert!(out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.lines().any(|l| l
            == "phase rule serve=libnothing.so:serve: no traced process maps 'libnothing.so' yet: \
                attached when one does"),
        "{stderr}"
    );
    let json = crate::common::report_value(&waited);
    assert_eq!(
        json["phases"]["rules"][0]["entries"], 0,
        "{:#}",
        json["phases"]
    );
    std::fs::remove_file(&waited).unwrap();
    let out = record_pid(
        pid,
        &dir.path().join("x.trace"),
        &["-d", "1", "--phase", "serve=heap_fixture:no_such_function"],
    );
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
    assert_error_line(
        &out,
        &format!(
            "alloctrace: error: --phase serve=heap_fixture:no_such_function: {} has no function \
             'no_such_function' in its symbol tables (C++ functions go by their mangled names; \
             `nm -D` lists them)",
            exe.display()
        ),
    );
    // USDT probes: one the file does not declare, and one with a semaphore.
    let lib = crate::common::late_lib();
    let lib = lib.display();
    let usdt_rule = |probe: &str| {
        let rule = format!("s=usdt:{lib}:alloctrace_fixture:{probe}");
        let out = record_pid(
            pid,
            &dir.path().join("x.trace"),
            &["-d", "1", "--phase", &rule],
        );
        (out, format!("alloctrace: error: --phase {rule}: "))
    };
    let (out, prefix) = usdt_rule("nothing");
    assert_error_line(
        &out,
        &format!(
            "{prefix}{lib} declares no USDT probe alloctrace_fixture:nothing (`readelf -n` lists \
             them)"
        ),
    );
    let (out, prefix) = usdt_rule("guarded");
    assert_error_line(
        &out,
        &format!(
            "{prefix}probe alloctrace_fixture:guarded has a semaphore (it fires only while a \
             tracer writes a count into the target, which alloctrace does not do): give a \
             function rule instead"
        ),
    );
    assert_eq!(dir_entries(dir.path()), Vec::<String>::new(), "left behind");
    finish(target);
}
