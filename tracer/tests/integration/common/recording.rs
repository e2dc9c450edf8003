//! `alloctrace record` against the fixtures: the `ready`/`go`/`done` handshake with a fixture,
//! the recorder's `attached`, and recordings run to completion.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use super::{Report, TestProcess, alloctrace_cmd, fixture, report_json, run};

/// Starts `heap_fixture SCENARIO PROTOCOL` and waits for its `ready`.
pub fn start_fixture(scenario: &str, protocol: &str) -> TestProcess {
    start_fixture_exe(&fixture("heap_fixture"), scenario, protocol)
}

/// Starts the fixture executable `exe` with `SCENARIO PROTOCOL` and waits for its `ready`.
pub fn start_fixture_exe(exe: &Path, scenario: &str, protocol: &str) -> TestProcess {
    let mut cmd = Command::new(exe);
    cmd.args([scenario, protocol]);
    let name = exe.file_name().unwrap_or_default().to_string_lossy();
    let mut p = TestProcess::spawn(&format!("{name} {scenario} {protocol}"), cmd);
    p.expect_stdout("ready");
    p
}

/// Starts `alloctrace record -p PID -o TRACE --heap EXTRA...` and waits until it says `attached`.
pub fn start_recorder(pid: u32, trace: &Path, extra: &[&str]) -> TestProcess {
    start_recorder_args(pid, trace, &with_heap(extra))
}

/// `--heap` followed by `extra`.
fn with_heap<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    std::iter::once("--heap")
        .chain(extra.iter().copied())
        .collect()
}

/// Starts `alloctrace record -p PID -o TRACE ARGS...` with exactly the options `args` (mappings
/// are always traced; `--heap` adds the allocator) and waits until it says `attached`.
pub fn start_recorder_args(pid: u32, trace: &Path, args: &[&str]) -> TestProcess {
    let mut cmd = alloctrace_cmd(&["record", "-p", &pid.to_string(), "-o"]);
    cmd.arg(trace).args(args);
    let mut p = TestProcess::spawn("alloctrace record", cmd);
    p.expect_stderr_prefix("attached");
    p
}

/// Ends a recording by PID: SIGINT to the recorder (which must exit 0), then the fixture's
/// stdin closed (it exits 0 too).
pub fn stop_recording(recorder: &mut TestProcess, target: &mut TestProcess) {
    stop_recording_with(recorder, target, libc::SIGINT);
}

/// `stop_recording` with the signal `sig`.
fn stop_recording_with(recorder: &mut TestProcess, target: &mut TestProcess, sig: i32) {
    recorder.signal(sig);
    recorder.wait_success();
    target.close_stdin();
    target.wait_success();
}

/// A fixture traced by PID in a temporary directory. (Fields drop in order: the recorder is
/// killed first, the directory removed last.)
pub struct Session {
    pub recorder: TestProcess,
    pub target: TestProcess,
    pub trace: PathBuf,
    pub dir: tempfile::TempDir,
}

impl Session {
    /// Starts the fixture, attaches, runs the scenario and waits for its `done`.
    pub fn run_scenario(scenario: &str, protocol: &str, extra: &[&str]) -> Session {
        Session::run_scenario_of(&fixture("heap_fixture"), scenario, protocol, extra)
    }

    /// `run_scenario` with the heap fixture built as `exe` (another variant).
    pub fn run_scenario_of(exe: &Path, scenario: &str, protocol: &str, extra: &[&str]) -> Session {
        let target = start_fixture_exe(exe, scenario, protocol);
        Session::attach_and_run(target, scenario, &with_heap(extra))
    }

    /// Like `run_scenario`, for `map_fixture SCENARIO attach`, recorded with exactly the options
    /// `args` (no `--heap` unless given).
    pub fn run_map_scenario(scenario: &str, args: &[&str]) -> Session {
        let target = start_fixture_exe(&fixture("map_fixture"), scenario, "attach");
        Session::attach_and_run(target, scenario, args)
    }

    /// Attaches to `target` (waiting after its `ready`) with exactly the options `args`, into
    /// `NAME.trace`; lets it run (`go`) and waits for its `done`.
    pub fn attach_and_run(mut target: TestProcess, name: &str, args: &[&str]) -> Session {
        let dir = tempfile::tempdir().expect("temp dir");
        let trace = dir.path().join(format!("{name}.trace"));
        let recorder = start_recorder_args(target.pid(), &trace, args);
        target.send_line("go");
        target.expect_stdout("done");
        Session {
            recorder,
            target,
            trace,
            dir,
        }
    }

    /// Stops the recorder with `sig`, asserts it exited 0 and lets the fixture exit; the
    /// recording stays in `trace`.
    pub fn end(&mut self, sig: i32) {
        stop_recording_with(&mut self.recorder, &mut self.target, sig);
    }

    /// `end` with `sig`, then the JSON report.
    pub fn stop(mut self, sig: i32) -> Report {
        self.end(sig);
        report_json(&self.trace)
    }
}

/// Records `scenario` by PID and stops the recorder with SIGINT.
pub fn record_scenario(scenario: &str) -> Report {
    Session::run_scenario(scenario, "attach", &[]).stop(libc::SIGINT)
}

/// Runs `cmd`, an `alloctrace record ... -- COMMAND` (`what` names it), to completion (within
/// `TIMEOUT`) and asserts that it succeeded and said `attached`.
pub fn run_recording(what: &str, cmd: Command) {
    let out = run(&format!("alloctrace {what}"), cmd);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{stderr}",
        out.status
    );
    assert!(
        stderr.lines().any(|l| l.starts_with("attached")),
        "no `attached` line:\n{stderr}"
    );
}

/// Runs `alloctrace record ARGS... -o DIR/SCENARIO.trace -- EXE SCENARIO run` to completion
/// (within `TIMEOUT`) and returns its report, checked complete and well formed.
pub fn record_fixture_command(dir: &Path, exe: &Path, scenario: &str, args: &[&str]) -> Report {
    record_fixture_command_env(dir, exe, scenario, args, &[])
}

/// `record_fixture_command` with the recorder's environment variables `env` set.
pub fn record_fixture_command_env(
    dir: &Path,
    exe: &Path,
    scenario: &str,
    args: &[&str],
    env: &[(&str, &str)],
) -> Report {
    let trace = dir.join(format!("{scenario}.trace"));
    let mut cmd = alloctrace_cmd(&["record"]);
    cmd.envs(env.iter().copied());
    cmd.args(args)
        .arg("-o")
        .arg(&trace)
        .arg("--")
        .arg(exe)
        .args([scenario, "run"]);
    let name = exe.file_name().unwrap_or_default().to_string_lossy();
    run_recording(&format!("record -- {name} {scenario} run"), cmd);
    let r = report_json(&trace);
    r.assert_well_formed(None);
    r.assert_rows_add_up();
    assert!(r.complete, "{}", r.summary());
    assert!(
        r.target.command.contains(&format!("{name} {scenario} run")),
        "target.command\n{}",
        r.summary()
    );
    r
}
