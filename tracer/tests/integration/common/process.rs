//! Child processes with timeouts: the fixtures, the recorder and the views, killed and reaped
//! when dropped, their output read line by line.

use std::{
    io::{BufRead, BufReader, Read, Write},
    process::{Child, ChildStdin, Command, ExitStatus, Output, Stdio},
    sync::{
        Arc, Mutex,
        mpsc::{self, Receiver, RecvTimeoutError},
    },
    thread,
    time::{Duration, Instant},
};

/// Longest wait for anything: a hung tracer or fixture fails the test instead of hanging CI.
pub const TIMEOUT: Duration = Duration::from_secs(30);

/// The `alloctrace` executable under test.
pub fn alloctrace() -> &'static str {
    env!("CARGO_BIN_EXE_alloctrace")
}

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

    /// Waits for the next stdout line; returns it.
    pub fn read_stdout_line(&mut self) -> String {
        self.wait_line(false, "a stdout line", |_| true)
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
