//! Shared helpers of the privileged integration tests: fixture builds, child-process guards with
//! timeouts, the `alloctrace record` handshake and the JSON report.
#![allow(dead_code)] // each test binary uses a different subset

use std::{
    collections::{BTreeMap, HashMap},
    io::{BufRead, BufReader, Read, Write},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, ExitStatus, Output, Stdio},
    sync::{
        Arc, Mutex,
        mpsc::{self, Receiver, RecvTimeoutError},
    },
    thread,
    time::{Duration, Instant},
};

use serde::Deserialize;

/// Longest wait for anything: a hung tracer or fixture fails the test instead of hanging CI.
pub const TIMEOUT: Duration = Duration::from_secs(30);

pub fn alloctrace() -> &'static str {
    env!("CARGO_BIN_EXE_alloctrace")
}

// ---- privileges ----------------------------------------------------------------------------

/// Whether the tests that load eBPF programs can run here. Without root, eBPF, BTF or uprobes
/// they are skipped with a notice, except under `CI=true`, where they must run and fail instead.
pub fn privileged() -> bool {
    let mut missing = Vec::new();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        missing.push("root");
    }
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        missing.push("kernel BTF (/sys/kernel/btf/vmlinux)");
    }
    if !Path::new("/sys/bus/event_source/devices/uprobe").exists() {
        missing.push("uprobes (/sys/bus/event_source/devices/uprobe)");
    }
    if missing.is_empty() && !can_create_bpf_map() {
        missing.push("the bpf(2) system call (BPF_MAP_CREATE failed)");
    }
    if missing.is_empty() {
        return true;
    }
    let what = missing.join(", ");
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("privileged test cannot run: missing {what}; under CI=true it must not be skipped");
    }
    eprintln!("SKIPPED: privileged test needs {what} (set CI=true to make this a failure)");
    false
}

/// Creates (and closes) a one-element BPF array map: proof that this process may use eBPF.
fn can_create_bpf_map() -> bool {
    // union bpf_attr for BPF_MAP_CREATE: map_type, key_size, value_size, max_entries, ...
    let mut attr = [0u32; 18];
    attr[0] = 2; // BPF_MAP_TYPE_ARRAY
    attr[1] = 4;
    attr[2] = 4;
    attr[3] = 1;
    // SAFETY: bpf(BPF_MAP_CREATE, attr, size) reads `size` bytes of `attr`.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            0, // BPF_MAP_CREATE
            attr.as_ptr(),
            std::mem::size_of_val(&attr),
        )
    };
    if fd < 0 {
        return false;
    }
    // SAFETY: fd is a descriptor we own.
    unsafe { libc::close(fd as i32) };
    true
}

// ---- fixtures ------------------------------------------------------------------------------

/// Compiles `tests/fixtures/NAME.c` (once per test binary) with frame pointers and returns the
/// executable's path.
pub fn fixture(name: &str) -> PathBuf {
    fixture_variant(name, "", &[])
}

/// Like `fixture`, built with `extra` compiler flags into `NAME-VARIANT`.
pub fn fixture_variant(name: &str, variant: &str, extra: &[&str]) -> PathBuf {
    static BUILT: Mutex<BTreeMap<String, PathBuf>> = Mutex::new(BTreeMap::new());
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    let exe_name = if variant.is_empty() {
        name.to_string()
    } else {
        format!("{name}-{variant}")
    };
    if let Some(path) = built.get(&exe_name) {
        return path.clone();
    }
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(format!("{name}.c"));
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fixtures");
    std::fs::create_dir_all(&dir).expect("create the fixture directory");
    let out = dir.join(&exe_name);
    let mut args: Vec<std::ffi::OsString> = [
        "-O0",
        "-g",
        "-fno-omit-frame-pointer",
        "-mno-omit-leaf-frame-pointer",
        "-pthread",
        "-Wall",
    ]
    .iter()
    .map(Into::into)
    .collect();
    args.extend(extra.iter().map(Into::into));
    args.push(src.into_os_string());
    compile(&out, &args);
    built.insert(exe_name, out.clone());
    out
}

// ---- child processes -----------------------------------------------------------------------

/// A child process that is killed and reaped when dropped (also when a test panics), with its
/// stdout and stderr read line by line on background threads.
pub struct TestProcess {
    pub name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: Option<Receiver<String>>,
    stderr: Option<Receiver<String>>,
    stdout_log: Arc<Mutex<Vec<String>>>,
    stderr_log: Arc<Mutex<Vec<String>>>,
    status: Option<ExitStatus>,
}

fn pump(stream: impl Read + Send + 'static, log: Arc<Mutex<Vec<String>>>) -> Receiver<String> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            log.lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(line.clone());
            // The receiver may be gone (nobody waits for more lines): keep logging.
            let _ = tx.send(line);
        }
    });
    rx
}

impl TestProcess {
    /// Spawns `cmd` with piped stdin, stdout and stderr.
    pub fn spawn(name: &str, mut cmd: Command) -> TestProcess {
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({cmd:?}): {e}"));
        let stdout_log = Arc::new(Mutex::new(Vec::new()));
        let stderr_log = Arc::new(Mutex::new(Vec::new()));
        let stdout = child.stdout.take().map(|s| pump(s, stdout_log.clone()));
        let stderr = child.stderr.take().map(|s| pump(s, stderr_log.clone()));
        TestProcess {
            name: name.to_string(),
            stdin: child.stdin.take(),
            child,
            stdout,
            stderr,
            stdout_log,
            stderr_log,
            status: None,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn stdout_text(&self) -> String {
        self.stdout_log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .join("\n")
    }

    pub fn stderr_text(&self) -> String {
        self.stderr_log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .join("\n")
    }

    fn diagnostics(&mut self) -> String {
        let state = match self.child.try_wait() {
            Ok(Some(status)) => format!("exited: {status}"),
            Ok(None) => "still running".to_string(),
            Err(e) => format!("unknown ({e})"),
        };
        format!(
            "{} ({state})\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.name,
            self.stdout_text(),
            self.stderr_text()
        )
    }

    fn wait_line(&mut self, on_stderr: bool, what: &str, accept: impl Fn(&str) -> bool) -> String {
        let rx = if on_stderr {
            self.stderr.as_ref()
        } else {
            self.stdout.as_ref()
        }
        .expect("stream is piped");
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) if accept(&line) => return line,
                Ok(_) => continue,
                Err(RecvTimeoutError::Timeout) => {
                    let d = self.diagnostics();
                    panic!("timed out after {TIMEOUT:?} waiting for {what} from {d}");
                }
                Err(RecvTimeoutError::Disconnected) => {
                    // Let the process finish so its exit status shows in the message.
                    thread::sleep(Duration::from_millis(100));
                    let d = self.diagnostics();
                    panic!("{what} never came: the stream closed. {d}");
                }
            }
        }
    }

    /// Waits for the stdout line `expected`.
    pub fn expect_stdout(&mut self, expected: &str) {
        self.wait_line(false, &format!("stdout line {expected:?}"), |l| {
            l == expected
        });
    }

    /// Waits for a stderr line starting with `prefix`; returns it.
    pub fn expect_stderr_prefix(&mut self, prefix: &str) -> String {
        self.wait_line(
            true,
            &format!("a stderr line starting with {prefix:?}"),
            |l| l.starts_with(prefix),
        )
    }

    pub fn send_line(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin still open");
        writeln!(stdin, "{line}")
            .and_then(|_| stdin.flush())
            .unwrap_or_else(|e| panic!("cannot write to {}: {e}", self.name));
    }

    pub fn close_stdin(&mut self) {
        self.stdin = None;
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) of our own, not yet reaped, child.
        let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, sig) };
        assert_eq!(rc, 0, "kill({}, {sig}) failed", self.name);
    }

    /// Waits for the process to exit; panics (after killing it) when it takes longer than
    /// `TIMEOUT`.
    pub fn wait(&mut self) -> ExitStatus {
        if let Some(status) = self.status {
            return status;
        }
        let deadline = Instant::now() + TIMEOUT;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => {
                    self.status = Some(status);
                    // Give the reader threads a moment to log the last lines.
                    thread::sleep(Duration::from_millis(50));
                    return status;
                }
                Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
                Ok(None) => {
                    let d = self.diagnostics();
                    let _ = self.child.kill();
                    panic!(
                        "{} did not exit within {TIMEOUT:?}; killed it. {d}",
                        self.name
                    );
                }
                Err(e) => panic!("waiting for {}: {e}", self.name),
            }
        }
    }

    /// Waits for exit and asserts it was successful.
    pub fn wait_success(&mut self) {
        let status = self.wait();
        if !status.success() {
            let d = self.diagnostics();
            panic!("{} failed with {status}. {d}", self.name);
        }
    }
}

impl Drop for TestProcess {
    fn drop(&mut self) {
        self.stdin = None;
        if self.status.is_none() {
            if let Ok(None) = self.child.try_wait() {
                let _ = self.child.kill();
            }
            let _ = self.child.wait();
        }
    }
}

/// Runs a command to completion with a timeout; stdin is /dev/null.
pub fn run(name: &str, mut cmd: Command) -> Output {
    cmd.stdin(Stdio::null()).env_remove("RUST_LOG");
    let mut p = TestProcess::spawn(name, cmd);
    p.close_stdin();
    let status = p.wait();
    // The reader threads end when the pipes close.
    let stdout = p.stdout_text();
    let stderr = p.stderr_text();
    Output {
        status,
        stdout: stdout.into_bytes(),
        stderr: stderr.into_bytes(),
    }
}

/// `alloctrace ARGS...` run to completion.
pub fn alloctrace_cmd(args: &[&str]) -> Command {
    let mut cmd = Command::new(alloctrace());
    cmd.args(args).env_remove("RUST_LOG");
    cmd
}

// ---- recording -----------------------------------------------------------------------------

/// Starts `heap_fixture SCENARIO PROTOCOL` and waits for its `ready`.
pub fn start_fixture(scenario: &str, protocol: &str) -> TestProcess {
    start_named_fixture("heap_fixture", scenario, protocol)
}

/// Starts fixture `name` with `SCENARIO PROTOCOL` and waits for its `ready`.
fn start_named_fixture(name: &str, scenario: &str, protocol: &str) -> TestProcess {
    start_fixture_exe(&fixture(name), scenario, protocol)
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

/// Ends a recording by PID: SIGINT to the recorder (which must exit 0), then the fixture's
/// stdin closed (it exits 0 too).
pub fn stop_recording(recorder: &mut TestProcess, target: &mut TestProcess) {
    recorder.signal(libc::SIGINT);
    recorder.wait_success();
    target.close_stdin();
    target.wait_success();
}

/// Runs `cc ARGS... -o OUT`, building under a private name renamed to `out` at the end (other
/// test binaries may run the old file meanwhile); panics with cc's message if it fails.
pub fn compile(out: &Path, args: &[std::ffi::OsString]) {
    let tmp = out.with_extension(format!("{}.tmp", std::process::id()));
    let result = Command::new("cc")
        .args(args)
        .arg("-o")
        .arg(&tmp)
        .output()
        .unwrap_or_else(|e| panic!("cannot run cc to build {}: {e}", out.display()));
    assert!(
        result.status.success(),
        "cc failed to build {}:\n{}",
        out.display(),
        String::from_utf8_lossy(&result.stderr)
    );
    std::fs::rename(&tmp, out).expect("move the build into place");
}

/// Starts `alloctrace record -p PID -o TRACE EXTRA...` and waits until it says `attached`.
pub fn start_recorder(pid: u32, trace: &Path, extra: &[&str]) -> TestProcess {
    let args: Vec<&str> = std::iter::once("--heap")
        .chain(extra.iter().copied())
        .collect();
    start_recorder_args(pid, trace, &args)
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
        let dir = tempfile::tempdir().expect("temp dir");
        let trace = dir.path().join(format!("{scenario}.trace"));
        let mut target = start_fixture_exe(exe, scenario, protocol);
        let recorder = start_recorder(target.pid(), &trace, extra);
        target.send_line("go");
        target.expect_stdout("done");
        Session {
            recorder,
            target,
            trace,
            dir,
        }
    }

    /// Stops the recorder with `sig`, asserts it exited 0, lets the fixture exit, and returns the
    /// JSON report.
    pub fn stop(mut self, sig: i32) -> Report {
        if sig == libc::SIGINT {
            stop_recording(&mut self.recorder, &mut self.target);
        } else {
            self.recorder.signal(sig);
            self.recorder.wait_success();
            self.target.close_stdin();
            self.target.wait_success();
        }
        report_json(&self.trace)
    }
}

/// Runs `alloctrace record ARGS... -o DIR/SCENARIO.trace -- EXE SCENARIO run` to completion
/// (within `TIMEOUT`) and returns its report, checked complete and well formed.
pub fn record_fixture_command(dir: &Path, exe: &Path, scenario: &str, args: &[&str]) -> Report {
    let trace = dir.join(format!("{scenario}.trace"));
    let mut cmd = alloctrace_cmd(&["record"]);
    cmd.args(args)
        .arg("-o")
        .arg(&trace)
        .arg("--")
        .arg(exe)
        .args([scenario, "run"]);
    let name = exe.file_name().unwrap_or_default().to_string_lossy();
    let out = run(&format!("alloctrace record -- {name} {scenario}"), cmd);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "record -- {name} {scenario} run failed ({}):\n{stderr}",
        out.status
    );
    assert!(
        stderr.lines().any(|l| l.starts_with("attached")),
        "no `attached` line:\n{stderr}"
    );
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

/// Records `scenario` by PID and stops the recorder with SIGINT.
pub fn record_scenario(scenario: &str) -> Report {
    Session::run_scenario(scenario, "attach", &[]).stop(libc::SIGINT)
}

// ---- known answers -------------------------------------------------------------------------

/// Leaking functions of the `leaks` scenario: (function, blocks, requested bytes per block).
pub const LEAKS: [(&str, u64, u64); 9] = [
    ("leak_malloc", 10, 100),
    ("leak_calloc", 11, 3 * 70),
    ("leak_realloc", 12, 300),
    ("leak_reallocarray", 13, 5 * 80),
    ("leak_posix_memalign", 14, 500),
    ("leak_aligned_alloc", 15, 640),
    ("leak_memalign", 16, 700),
    ("leak_valloc", 17, 1000),
    ("leak_pvalloc", 18, 1100),
];

/// Totals of the `leaks` scenario: 76710 bytes in 126 blocks, nothing freed.
pub fn leaks_totals() -> Totals {
    let bytes: u64 = LEAKS.iter().map(|(_, n, size)| n * size).sum();
    let count: u64 = LEAKS.iter().map(|(_, n, _)| n).sum();
    assert_eq!((bytes, count), (76710, 126));
    Totals {
        live_bytes: bytes,
        live_count: count,
        peak_bytes: bytes,
        allocated_bytes: bytes,
        allocated_count: count,
        freed_count: 0,
    }
}

// ---- the JSON report -----------------------------------------------------------------------

#[derive(Clone, Debug, Deserialize)]
pub struct Report {
    pub schema: u64,
    pub complete: bool,
    pub target: Target,
    pub duration_s: f64,
    pub totals: HashMap<String, Totals>,
    pub stacks: Vec<StackRow>,
    pub failures: Vec<FailureRow>,
    pub unmatched_frees: u64,
    pub lost_events: BTreeMap<String, u64>,
    pub stack_capture: Option<StackCapture>,
}

/// How the recording's stacks were taken (`record --stack`).
#[derive(Clone, Debug, Deserialize)]
pub struct StackCapture {
    pub mode: String,
    pub copy_bytes: u32,
    pub copies: u64,
    pub truncated: u64,
    pub fp_under_pressure: u64,
}

#[derive(Clone, Debug, Deserialize)]
pub struct Target {
    pub pids: Vec<u32>,
    pub command: String,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct Totals {
    pub live_bytes: u64,
    pub live_count: u64,
    pub peak_bytes: u64,
    pub allocated_bytes: u64,
    pub allocated_count: u64,
    pub freed_count: u64,
}

#[derive(Clone, Debug, Deserialize)]
pub struct StackRow {
    pub class: String,
    pub phase: String,
    pub live_bytes: u64,
    pub live_count: u64,
    pub allocated_bytes: u64,
    pub allocated_count: u64,
    pub frames: Vec<String>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct FailureRow {
    pub class: String,
    pub function: String,
    pub size: u64,
    pub count: u64,
    pub error: String,
    pub frames: Vec<String>,
}

/// The four counters of a function's heap stacks, summed over the stacks whose innermost frame is
/// that function.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cell {
    pub live_bytes: u64,
    pub live_count: u64,
    pub allocated_bytes: u64,
    pub allocated_count: u64,
}

/// A cell with `count` blocks of `size` bytes allocated, all still live.
pub fn all_live(count: u64, size: u64) -> Cell {
    Cell {
        live_bytes: count * size,
        live_count: count,
        allocated_bytes: count * size,
        allocated_count: count,
    }
}

/// A cell with `count` blocks of `size` bytes allocated, none live.
pub fn all_freed(count: u64, size: u64) -> Cell {
    Cell {
        live_bytes: 0,
        live_count: 0,
        allocated_bytes: count * size,
        allocated_count: count,
    }
}

impl Report {
    /// Readable summary for assertion messages.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "report: complete={} duration_s={} target={:?} totals={:?} unmatched_frees={} \
             lost_events={:?}\nstacks:\n",
            self.complete,
            self.duration_s,
            self.target,
            self.totals,
            self.unmatched_frees,
            self.lost_events
        );
        for st in &self.stacks {
            s.push_str(&format!(
                "  {}/{} live {} B in {}, allocated {} B in {}: {}\n",
                st.class,
                st.phase,
                st.live_bytes,
                st.live_count,
                st.allocated_bytes,
                st.allocated_count,
                st.frames.join(" <- ")
            ));
        }
        s.push_str("failures:\n");
        for f in &self.failures {
            s.push_str(&format!(
                "  {} {} size {} x{} {}: {}\n",
                f.class,
                f.function,
                f.size,
                f.count,
                f.error,
                f.frames.join(" <- ")
            ));
        }
        s
    }

    pub fn heap_totals(&self) -> Totals {
        *self
            .totals
            .get("heap")
            .unwrap_or_else(|| panic!("no heap totals\n{}", self.summary()))
    }

    /// Heap totals, zero when the recording has none (nothing was allocated or freed).
    pub fn heap_totals_or_zero(&self) -> Totals {
        self.totals.get("heap").copied().unwrap_or_default()
    }

    /// Heap stacks whose innermost frame (the allocator's caller) is `function`.
    pub fn stacks_of(&self, function: &str) -> Vec<&StackRow> {
        self.stacks
            .iter()
            .filter(|s| s.class == "heap" && s.frames.first().map(String::as_str) == Some(function))
            .collect()
    }

    /// The summed counters of `function`'s heap stacks; panics if there is none.
    pub fn cell(&self, function: &str) -> Cell {
        let stacks = self.stacks_of(function);
        assert!(
            !stacks.is_empty(),
            "no heap stack with frames[0] == {function:?}\n{}",
            self.summary()
        );
        stacks.iter().fold(Cell::default(), |c, s| Cell {
            live_bytes: c.live_bytes + s.live_bytes,
            live_count: c.live_count + s.live_count,
            allocated_bytes: c.allocated_bytes + s.allocated_bytes,
            allocated_count: c.allocated_count + s.allocated_count,
        })
    }

    pub fn assert_cell(&self, function: &str, expected: Cell) {
        assert_eq!(
            self.cell(function),
            expected,
            "counters of {function}\n{}",
            self.summary()
        );
    }

    /// Every leaking function of the `leaks` scenario at its exact live bytes and count.
    pub fn assert_leaks(&self) {
        for (function, n, size) in LEAKS {
            self.assert_cell(function, all_live(n, size));
        }
    }

    pub fn assert_totals(&self, expected: Totals) {
        assert_eq!(
            self.heap_totals(),
            expected,
            "heap totals\n{}",
            self.summary()
        );
    }

    /// The well-formedness every report must have: schema 1, one target PID, a sane duration, and
    /// stack rows that add up to the totals.
    pub fn assert_well_formed(&self, pid: Option<u32>) {
        assert_eq!(self.schema, 1, "schema\n{}", self.summary());
        assert!(
            self.duration_s.is_finite() && self.duration_s >= 0.0,
            "duration_s\n{}",
            self.summary()
        );
        if let Some(pid) = pid {
            assert_eq!(
                self.target.pids,
                vec![pid],
                "target.pids\n{}",
                self.summary()
            );
        }
        for s in &self.stacks {
            assert_eq!(s.phase, "none", "phase of {:?}", s.frames);
            assert!(
                !s.frames.is_empty(),
                "a stack without frames\n{}",
                self.summary()
            );
        }
        let heap: Vec<&StackRow> = self.stacks.iter().filter(|s| s.class == "heap").collect();
        let live: u64 = heap.iter().map(|s| s.live_bytes).sum();
        let count: u64 = heap.iter().map(|s| s.live_count).sum();
        let t = self.heap_totals_or_zero();
        assert_eq!(
            (live, count),
            (t.live_bytes, t.live_count),
            "stack rows do not add up to the heap totals\n{}",
            self.summary()
        );
    }

    /// No event was lost: every cause is absent or zero.
    pub fn assert_no_lost_events(&self) {
        assert!(
            self.lost_events.values().all(|&n| n == 0),
            "lost events in a deterministic scenario\n{}",
            self.summary()
        );
    }
}

/// `alloctrace report TRACE --format json`, asserted successful, as untyped JSON (for the fields
/// the typed `Report` does not model: per-process, gpu, rss, page faults...).
pub fn report_value(trace: &Path) -> serde_json::Value {
    serde_json::from_str(&report_text(trace)).expect("report JSON")
}

/// The text of `alloctrace report TRACE --format json`, asserted successful.
fn report_text(trace: &Path) -> String {
    let mut cmd = alloctrace_cmd(&["report", "--format", "json"]);
    cmd.arg(trace);
    let out = run("alloctrace report --format json", cmd);
    assert!(
        out.status.success(),
        "alloctrace report failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The rows of a report list (`stacks`, `page_faults`, `released`, ...) whose frames include
/// `function`.
pub fn json_rows_through<'a>(
    list: &'a serde_json::Value,
    function: &str,
) -> Vec<&'a serde_json::Value> {
    list.as_array()
        .expect("a list of rows")
        .iter()
        .filter(|s| {
            s["frames"]
                .as_array()
                .is_some_and(|f| f.iter().any(|f| f == function))
        })
        .collect()
}

/// The `stacks` rows of `class` whose frames include `function`.
pub fn json_class_rows<'a>(
    r: &'a serde_json::Value,
    class: &str,
    function: &str,
) -> Vec<&'a serde_json::Value> {
    json_rows_through(&r["stacks"], function)
        .into_iter()
        .filter(|s| s["class"] == class)
        .collect()
}

/// The sum of a numeric field over JSON rows.
pub fn json_sum(rows: &[&serde_json::Value], field: &str) -> u64 {
    rows.iter().map(|s| s[field].as_u64().expect(field)).sum()
}

/// `alloctrace report TRACE --format json`, asserted successful and parsed.
pub fn report_json(trace: &Path) -> Report {
    let text = report_text(trace);
    serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("the JSON report does not match the contract: {e}\n{text}"))
}

// ---- errors --------------------------------------------------------------------------------

/// Asserts the bad-input contract: non-zero exit and exactly one stderr line, starting with
/// `alloctrace: error:` and mentioning `needle` (case-insensitive).
pub fn assert_clean_error(out: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(
        !out.status.success(),
        "expected a failure, got {}; stderr:\n{stderr}",
        out.status
    );
    assert_eq!(
        lines.len(),
        1,
        "expected exactly one stderr line, got {}:\n{stderr}",
        lines.len()
    );
    assert!(
        lines[0].starts_with("alloctrace: error:"),
        "the error line must start with `alloctrace: error:`: {:?}",
        lines[0]
    );
    assert!(
        lines[0].to_lowercase().contains(&needle.to_lowercase()),
        "the error line should name the problem ({needle:?}): {:?}",
        lines[0]
    );
}

/// Names of the entries in `dir` (to check that a failed command left nothing behind).
pub fn dir_entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

// ---- mappings (map_fixture) ----------------------------------------------------------------

/// The page size: mapping figures are whole pages.
pub fn page() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    assert!(size > 0, "sysconf(_SC_PAGESIZE) failed");
    size as u64
}

/// C library functions that may stand between a memory system call and the function that asked
/// for it: the system-call wrappers (their caller is recovered as the next frame) and thread
/// creation (which maps the thread's stack).
pub const LIBC_FRAMES: [&str; 20] = [
    "mmap",
    "mmap64",
    "__mmap",
    "__mmap64",
    "munmap",
    "__munmap",
    "mremap",
    "__mremap",
    "mprotect",
    "__mprotect",
    "syscall",
    "brk",
    "__brk",
    "sbrk",
    "__sbrk",
    "pthread_create",
    "pthread_create@@GLIBC_2.34",
    "pthread_create@GLIBC_2.2.5",
    "__pthread_create_2_1",
    "allocate_stack",
];

/// Whether `frame` is a C library frame: one of `LIBC_FRAMES`, glibc's internal alias of one
/// (`__GI___mmap64`), or an unnamed libc address.
pub fn is_libc_frame(frame: &str) -> bool {
    LIBC_FRAMES.contains(&frame)
        || frame.starts_with("__GI_")
        || frame.starts_with("[unknown] libc.so")
}

/// Starts `map_fixture SCENARIO PROTOCOL` and waits for its `ready`.
pub fn start_map_fixture(scenario: &str, protocol: &str) -> TestProcess {
    start_named_fixture("map_fixture", scenario, protocol)
}

/// Starts `alloctrace record -p PID -o TRACE ARGS...` with exactly the options `args` (mappings
/// are always traced; `--heap` adds the allocator) and waits until it says `attached`.
pub fn start_recorder_args(pid: u32, trace: &Path, args: &[&str]) -> TestProcess {
    let mut cmd = Command::new(alloctrace());
    cmd.arg("record")
        .arg("-p")
        .arg(pid.to_string())
        .arg("-o")
        .arg(trace)
        .args(args)
        .env_remove("RUST_LOG");
    let mut p = TestProcess::spawn("alloctrace record", cmd);
    p.expect_stderr_prefix("attached");
    p
}

impl Session {
    /// Like `run_scenario`, for `map_fixture SCENARIO attach`, recorded with exactly the options
    /// `args` (no `--heap` unless given).
    pub fn run_map_scenario(scenario: &str, args: &[&str]) -> Session {
        let dir = tempfile::tempdir().expect("temp dir");
        let trace = dir.path().join(format!("{scenario}.trace"));
        let mut target = start_map_fixture(scenario, "attach");
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
}

impl Report {
    /// Totals of `class`, zero when the recording has none.
    pub fn class_totals_or_zero(&self, class: &str) -> Totals {
        self.totals.get(class).copied().unwrap_or_default()
    }

    /// Rows (any class) whose first frame outside the C library (`is_libc_frame`) is `function`:
    /// `frames[0] == function`, or libc wrappers such as `mmap64` or `syscall` first, then it.
    pub fn stacks_through(&self, function: &str) -> Vec<&StackRow> {
        self.stacks
            .iter()
            .filter(|s| {
                s.frames
                    .iter()
                    .find(|f| !is_libc_frame(f))
                    .map(String::as_str)
                    == Some(function)
            })
            .collect()
    }

    /// Rows of `class` through `function` (see `stacks_through`).
    pub fn class_stacks_through(&self, class: &str, function: &str) -> Vec<&StackRow> {
        self.stacks_through(function)
            .into_iter()
            .filter(|s| s.class == class)
            .collect()
    }

    /// The summed counters of `class`'s rows through `function`; panics if there is none.
    pub fn class_cell(&self, class: &str, function: &str) -> Cell {
        let stacks = self.class_stacks_through(class, function);
        assert!(
            !stacks.is_empty(),
            "no {class} stack through {function:?}\n{}",
            self.summary()
        );
        sum_rows(&stacks)
    }

    pub fn assert_class_cell(&self, class: &str, function: &str, expected: Cell) {
        assert_eq!(
            self.class_cell(class, function),
            expected,
            "{class} counters of {function}\n{}",
            self.summary()
        );
    }

    /// Every class's rows add up to its totals (live bytes and count).
    pub fn assert_rows_add_up(&self) {
        for (class, t) in &self.totals {
            let rows: Vec<&StackRow> = self.stacks.iter().filter(|s| &s.class == class).collect();
            let c = sum_rows(&rows);
            assert_eq!(
                (c.live_bytes, c.live_count),
                (t.live_bytes, t.live_count),
                "{class} rows do not add up to the {class} totals\n{}",
                self.summary()
            );
        }
    }
}

/// The four counters of `rows`, summed.
pub fn sum_rows(rows: &[&StackRow]) -> Cell {
    rows.iter().fold(Cell::default(), |c, s| Cell {
        live_bytes: c.live_bytes + s.live_bytes,
        live_count: c.live_count + s.live_count,
        allocated_bytes: c.allocated_bytes + s.allocated_bytes,
        allocated_count: c.allocated_count + s.allocated_count,
    })
}
