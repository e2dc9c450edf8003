//! A command alloctrace launches (`record -- CMD`): started under ptrace on a thread of its own
//! (the tracer; ptrace answers only the thread that attached), held until its C library is
//! mapped, released once the probes are live, and then, while its image is young, held once
//! more at its exit so that the recorder reads its mappings before they go.
//!
//! Why the exit hold: stacks are named from /proc/PID/maps. A program that execs another
//! (`env prog`, a shell's `exec`) and ends within one ring poll leaves events whose code the
//! recorder never saw mapped: by the time they are read, the maps of an exited process are
//! empty. Stopped at `PTRACE_EVENT_EXIT` its address space is still whole. The hold lasts
//! `YOUNG_IMAGE` after the release and after each exec; then the tracer detaches, so that a
//! long-running server is left free of ptrace (debuggers and profilers may attach to it).

use std::{
    ffi::OsString,
    io,
    os::unix::process::CommandExt,
    process::Command,
    sync::mpsc,
    time::{Duration, Instant},
};

use nix::{
    sys::{
        ptrace,
        signal::Signal,
        wait::{WaitStatus, waitpid},
    },
    unistd::Pid,
};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

use super::target::{TargetError, is_dynamic_loader};
use crate::{
    probes::resolve,
    proc::maps::{self, Mapping},
};

/// How long after its release or its last exec a launched command is held at its exit.
const YOUNG_IMAGE: Duration = Duration::from_secs(2);

/// How long a command held at its exit waits for the recorder at most.
const HELD_EXIT_WAIT: Duration = Duration::from_secs(2);

/// How often the tracer looks at a young image that has not stopped.
const TRACER_POLL: Duration = Duration::from_millis(2);

/// A launched command stopped at its exit, its mappings still readable; it goes on (exits)
/// once `done` is sent or dropped.
pub struct HeldExit {
    pub pid: u32,
    pub done: mpsc::Sender<()>,
}

/// A command alloctrace launched, held stopped until its allocator is mapped.
pub struct LaunchedCommand {
    pub pid: u32,
    pub command: String,
    /// Mappings at the moment the allocator appeared.
    pub maps: Vec<Mapping>,
    release: mpsc::Sender<()>,
    held_exits: Option<UnboundedReceiver<HeldExit>>,
    status: mpsc::Receiver<i32>,
}

/// Starts `argv` stopped at its exec, then steps it syscall by syscall through the dynamic loader
/// until an object defining `malloc` is mapped (at once for static executables). No code of the
/// program itself has run when this returns: the loader maps every library before it runs any
/// initializer. The caller attaches probes and then calls `release`.
pub fn launch(argv: &[OsString], wait_for_allocator: bool) -> Result<LaunchedCommand, TargetError> {
    let command = argv
        .iter()
        .map(|a| a.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ");
    let (ready_tx, ready_rx) = mpsc::channel();
    let (release_tx, release_rx) = mpsc::channel();
    let (held_tx, held_rx) = unbounded_channel();
    let (status_tx, status_rx) = mpsc::channel();
    let tracer = Tracer {
        argv: argv.to_vec(),
        command: command.clone(),
        wait_for_allocator,
        held: held_tx,
    };
    std::thread::Builder::new()
        .name("launch-tracer".into())
        .spawn(move || tracer.run(ready_tx, release_rx, status_tx))
        .map_err(|error| TargetError::Spawn {
            command: command.clone(),
            error,
        })?;
    let (pid, maps) = ready_rx
        .recv()
        .unwrap_or(Err(TargetError::Ptrace(nix::Error::ESRCH)))?;
    Ok(LaunchedCommand {
        pid,
        command,
        maps,
        release: release_tx,
        held_exits: Some(held_rx),
        status: status_rx,
    })
}

impl LaunchedCommand {
    /// Lets the command run on.
    pub fn release(&self) -> Result<(), TargetError> {
        self.release
            .send(())
            .map_err(|_| TargetError::Ptrace(nix::Error::ESRCH))
    }

    /// The command's exits held for the recorder (taken once).
    pub fn take_held_exits(&mut self) -> Option<UnboundedReceiver<HeldExit>> {
        self.held_exits.take()
    }

    /// The command's wait status, once it has exited (the tracer thread reaps it); None if
    /// that thread is gone.
    pub fn wait_status(&self) -> Option<i32> {
        self.status.recv().ok()
    }
}

/// The tracer thread's part.
struct Tracer {
    argv: Vec<OsString>,
    command: String,
    wait_for_allocator: bool,
    held: UnboundedSender<HeldExit>,
}

impl Tracer {
    fn run(
        self,
        ready: mpsc::Sender<Result<(u32, Vec<Mapping>), TargetError>>,
        release: mpsc::Receiver<()>,
        status: mpsc::Sender<i32>,
    ) {
        let started = spawn_stopped(&self.argv, &self.command).and_then(|pid| {
            run_to_allocator(pid, &self.command, self.wait_for_allocator).map(|maps| (pid, maps))
        });
        let pid = match started {
            Ok((pid, maps)) => {
                let _ = ready.send(Ok((pid, maps)));
                pid
            }
            Err(e) => {
                let _ = ready.send(Err(e));
                return;
            }
        };
        let npid = Pid::from_raw(pid as i32);
        if release.recv().is_err() {
            // Setup failed before the command ran any code of its own: it does not run alone.
            let _ = nix::sys::signal::kill(npid, Signal::SIGKILL);
            let _ = waitpid(npid, None);
            return;
        }
        let reaped = match ptrace::setoptions(
            npid,
            ptrace::Options::PTRACE_O_EXITKILL
                | ptrace::Options::PTRACE_O_TRACEEXEC
                | ptrace::Options::PTRACE_O_TRACEEXIT,
        ) {
            Ok(()) => self.hold_while_young(npid),
            Err(e) => {
                log::debug!("launched command {pid}: not held at exit: {e}");
                let _ = ptrace::detach(npid, None);
                None
            }
        };
        if let Some(s) = reaped.or_else(|| reap(pid)) {
            let _ = status.send(s);
        }
    }

    /// Runs the command under ptrace while its image is young: signals passed on, exec resets
    /// the clock, exit held for the recorder. Returns the wait status if it ended under ptrace,
    /// None once detached.
    fn hold_while_young(&self, npid: Pid) -> Option<i32> {
        let mut young_until = Instant::now() + YOUNG_IMAGE;
        let mut resume: Option<i32> = Some(0);
        let mut stopping = false;
        loop {
            if let Some(sig) = resume.take()
                && ptrace_cont(npid, sig).is_err()
            {
                return None;
            }
            let status = match wait_raw(npid, !stopping) {
                Ok(Some(status)) => status,
                Ok(None) => {
                    if Instant::now() >= young_until {
                        // Old enough: stopped by a signal of ours, which is not passed on.
                        stopping = true;
                        // SAFETY: plain syscall on our own child.
                        unsafe {
                            libc::syscall(
                                libc::SYS_tgkill,
                                npid.as_raw(),
                                npid.as_raw(),
                                libc::SIGSTOP,
                            )
                        };
                    } else {
                        std::thread::sleep(TRACER_POLL);
                    }
                    continue;
                }
                Err(_) => return None,
            };
            if libc::WIFEXITED(status) || libc::WIFSIGNALED(status) {
                return Some(status);
            }
            if !libc::WIFSTOPPED(status) {
                resume = Some(0);
                continue;
            }
            let sig = libc::WSTOPSIG(status);
            match status >> 16 {
                libc::PTRACE_EVENT_EXEC => {
                    young_until = Instant::now() + YOUNG_IMAGE;
                    resume = Some(0);
                }
                libc::PTRACE_EVENT_EXIT => {
                    self.hand_exit_to_recorder(npid);
                    let _ = ptrace::detach(npid, None);
                    return None;
                }
                _ if sig == libc::SIGSTOP && stopping => {
                    let _ = ptrace::detach(npid, None);
                    return None;
                }
                _ if is_stop_signal(sig) && ptrace::getsiginfo(npid).is_err() => {
                    // A group stop (job control): left stopped, and no longer held.
                    let _ = ptrace::detach(npid, None);
                    return None;
                }
                _ => resume = Some(sig),
            }
        }
    }

    /// Tells the recorder that the command is at its exit; waits until it has looked.
    fn hand_exit_to_recorder(&self, npid: Pid) {
        let (done, looked) = mpsc::channel();
        let held = HeldExit {
            pid: npid.as_raw() as u32,
            done,
        };
        if self.held.send(held).is_ok() {
            let _ = looked.recv_timeout(HELD_EXIT_WAIT);
        }
    }
}

fn is_stop_signal(sig: i32) -> bool {
    matches!(
        sig,
        libc::SIGSTOP | libc::SIGTSTP | libc::SIGTTIN | libc::SIGTTOU
    )
}

fn ptrace_cont(npid: Pid, sig: i32) -> nix::Result<()> {
    let sig = if sig == 0 {
        None
    } else {
        Signal::try_from(sig).ok()
    };
    ptrace::cont(npid, sig)
}

/// The next wait status of traced `npid`; with `nohang`, None if there is none yet.
fn wait_raw(npid: Pid, nohang: bool) -> io::Result<Option<i32>> {
    let flags = libc::__WALL | if nohang { libc::WNOHANG } else { 0 };
    let mut status = 0;
    loop {
        // SAFETY: waitpid on our own child, writing one int.
        let rc = unsafe { libc::waitpid(npid.as_raw(), &mut status, flags) };
        if rc > 0 {
            return Ok(Some(status));
        }
        if rc == 0 {
            return Ok(None);
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EINTR) {
            return Err(err);
        }
    }
}

/// Waits for the (no longer traced) command to end; its wait status.
fn reap(pid: u32) -> Option<i32> {
    let mut status = 0;
    loop {
        // SAFETY: waitpid on our own child, writing one int.
        let rc = unsafe { libc::waitpid(pid as libc::pid_t, &mut status, 0) };
        if rc == pid as libc::pid_t {
            return Some(status);
        }
        if rc < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
            continue;
        }
        return None;
    }
}

/// Starts `argv` under ptrace, stopped at its exec; returns its PID.
fn spawn_stopped(argv: &[OsString], command: &str) -> Result<u32, TargetError> {
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..]);
    // SAFETY: PTRACE_TRACEME is async-signal-safe and only affects the child.
    unsafe {
        cmd.pre_exec(|| ptrace::traceme().map_err(io::Error::from));
    }
    let child = cmd.spawn().map_err(|error| TargetError::Spawn {
        command: command.to_string(),
        error,
    })?;
    let pid = child.id();
    let npid = Pid::from_raw(pid as i32);
    // Dropping `child` neither kills nor waits; the tracer thread reaps it.
    drop(child);
    match waitpid(npid, None).map_err(TargetError::Ptrace)? {
        WaitStatus::Stopped(_, Signal::SIGTRAP) => {}
        WaitStatus::Exited(_, code) => return Err(exited_early(command, code.to_string())),
        other => return Err(exited_early(command, format!("{other:?}"))),
    }
    ptrace::setoptions(
        npid,
        ptrace::Options::PTRACE_O_TRACESYSGOOD | ptrace::Options::PTRACE_O_EXITKILL,
    )
    .map_err(TargetError::Ptrace)?;
    Ok(pid)
}

/// Steps the stopped command `pid` until an object defining `malloc` is mapped (or, without
/// `wait_for_allocator`, until it is found static); returns its mappings then.
fn run_to_allocator(
    pid: u32,
    command: &str,
    wait_for_allocator: bool,
) -> Result<Vec<Mapping>, TargetError> {
    let npid = Pid::from_raw(pid as i32);
    let mut pending_signal: Option<Signal> = None;
    let mut first_stop = true;
    loop {
        let maps = maps::read_maps(pid)?;
        // Look into ELF files only when it can succeed: a static executable at the first stop, or
        // once a C library is mapped.
        let worth_looking = first_stop
            || maps
                .iter()
                .any(|m| m.executable && resolve::is_libc_name(&m.path));
        if worth_looking && resolve::find_allocator(pid, &maps).is_ok() {
            return Ok(maps);
        }
        let is_static = first_stop && !maps.iter().any(|m| is_dynamic_loader(&m.path));
        if is_static && !wait_for_allocator {
            // Tracepoints need nothing mapped; nothing more will be.
            return Ok(maps);
        }
        if is_static {
            // A static executable without malloc symbols: nothing will ever be mapped to hook.
            let _ = nix::sys::signal::kill(npid, Signal::SIGKILL);
            let _ = waitpid(npid, None);
            return Err(TargetError::NoAllocator { pid });
        }
        first_stop = false;
        ptrace::syscall(npid, pending_signal.take()).map_err(TargetError::Ptrace)?;
        pending_signal = next_stop(npid, command)?;
    }
}

/// Waits for the stepped command's next stop; returns the signal to deliver when it resumes.
fn next_stop(npid: Pid, command: &str) -> Result<Option<Signal>, TargetError> {
    match waitpid(npid, None).map_err(TargetError::Ptrace)? {
        WaitStatus::Stopped(_, sig) => Ok(Some(sig)),
        WaitStatus::Exited(_, code) => Err(exited_early(command, code.to_string())),
        WaitStatus::Signaled(_, sig, _) => Err(exited_early(command, format!("killed by {sig}"))),
        _ => Ok(None),
    }
}

fn exited_early(command: &str, status: String) -> TargetError {
    TargetError::CommandExitedEarly {
        command: command.to_string(),
        status,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_command_that_cannot_start_says_why_once() {
        let argv = [OsString::from("/nonexistent/alloctrace-no-such-command")];
        let Err(err) = launch(&argv, false) else {
            panic!("launched a command that does not exist");
        };
        let chain: Vec<String> = anyhow::Error::from(err)
            .chain()
            .map(|e| e.to_string())
            .collect();
        assert_eq!(
            chain,
            ["cannot start `/nonexistent/alloctrace-no-such-command`: no such file or directory"]
        );
    }
}
