//! The traced process: checking a PID, launching a command stopped until its C library is mapped,
//! and noticing when it exits.

use std::{
    ffi::OsString,
    io,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::process::CommandExt,
    },
    process::Command,
};

use nix::{
    sys::{
        ptrace,
        signal::Signal,
        wait::{WaitStatus, waitpid},
    },
    unistd::Pid,
};

use crate::{
    output::io_reason,
    probes::resolve,
    proc::{
        self, ProcError, cmdline,
        maps::{self, Mapping},
        stat,
    },
};

#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    /// The process is gone, may not be looked at, or its /proc files cannot be read.
    #[error(transparent)]
    Proc(#[from] ProcError),
    #[error("process {pid} exited while alloctrace was attaching")]
    ExitedDuringAttach { pid: u32 },
    #[error(
        "PID {pid} is a kernel thread: alloctrace traces user processes; pick the PID of a user-space process"
    )]
    KernelThread { pid: u32 },
    #[error(
        "process {pid} maps no C library with malloc (statically linked without symbols, or another allocator): alloctrace cannot find malloc to hook"
    )]
    NoAllocator { pid: u32 },
    #[error("PID {pid} is alloctrace itself: pass the PID of the process to trace")]
    SelfTarget { pid: u32 },
    #[error(
        "process {pid} is a zombie (exited, not yet reaped by its parent {ppid}): nothing to trace"
    )]
    Zombie { pid: u32, ppid: u32 },
    #[error(
        "process {pid}'s main thread has exited ({} still {}): alloctrace cannot trace it: \
         /proc/{pid}/maps is empty without the main thread, and uprobes attached for a process \
         follow its main thread's memory map, gone with it",
        plural(*threads, "other thread"),
        if *threads == 1 { "runs" } else { "run" }
    )]
    MainThreadExited { pid: u32, threads: usize },
    #[error(
        "process {pid} is already traced by {}: stop that recording first",
        match holder {
            Some((recorder, output)) => format!("alloctrace (PID {recorder}, writing {output})"),
            None => "another alloctrace".to_string(),
        }
    )]
    AlreadyTraced {
        pid: u32,
        /// The other recorder's PID and output path.
        holder: Option<(u32, String)>,
    },
    // Not `source`: the chain of causes would print the OS error a second time.
    #[error("cannot start `{command}`: {}", io_reason(error))]
    Spawn { command: String, error: io::Error },
    #[error("`{command}` exited (status {status}) before its C library was loaded")]
    CommandExitedEarly { command: String, status: String },
    #[error(
        "cannot watch process {pid} for its exit (pidfd_open): {}",
        io_reason(error)
    )]
    ExitWatch { pid: u32, error: io::Error },
    #[error("cannot control the launched command: {0}")]
    Ptrace(nix::Error),
}

/// Checks that `pid` is a live user-space process other than ourselves; returns its command line.
pub fn check_pid(pid: u32) -> Result<String, TargetError> {
    if pid == std::process::id() {
        return Err(TargetError::SelfTarget { pid });
    }
    let stat = stat::read_stat(pid)?;
    if stat.has_exited() {
        return Err(match proc::other_threads(pid) {
            0 => TargetError::Zombie {
                pid,
                ppid: stat.ppid,
            },
            threads => TargetError::MainThreadExited { pid, threads },
        });
    }
    if stat.is_kernel_thread() {
        return Err(TargetError::KernelThread { pid });
    }
    Ok(cmdline::read_command_line(pid)?)
}

/// Whether a mapped path is the dynamic loader (present at exec in every dynamic executable).
fn is_dynamic_loader(path: &str) -> bool {
    let base = path.rsplit('/').next().unwrap_or(path);
    base.starts_with("ld-linux") || base.starts_with("ld-musl") || base.starts_with("ld.so")
}

/// A command launched by alloctrace, held stopped (under ptrace) until its allocator is mapped.
pub struct LaunchedCommand {
    pub pid: u32,
    pub command: String,
    /// Mappings at the moment the allocator appeared.
    pub maps: Vec<Mapping>,
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
    let pid = spawn_stopped(argv, &command)?;
    let maps = run_to_allocator(pid, &command, wait_for_allocator)?;
    Ok(LaunchedCommand { pid, command, maps })
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
    // Dropping `child` neither kills nor waits; we reap it ourselves (see `ExitWatch`).
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

impl LaunchedCommand {
    /// Lets the command run on, untraced by ptrace.
    pub fn release(&self) -> Result<(), TargetError> {
        ptrace::detach(Pid::from_raw(self.pid as i32), None).map_err(TargetError::Ptrace)
    }
}

/// A pidfd that becomes readable when the process exits.
pub struct ExitWatch {
    pub fd: OwnedFd,
    pid: u32,
    /// True when we launched the process and must reap it.
    pub is_child: bool,
}

impl ExitWatch {
    pub fn new(pid: u32, is_child: bool) -> Result<ExitWatch, TargetError> {
        // SAFETY: plain syscall; the returned fd is owned below.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
        if fd < 0 {
            let err = io::Error::last_os_error();
            return Err(match ProcError::gone_or_denied(pid, &err) {
                Some(known) => known.into(),
                None => TargetError::ExitWatch { pid, error: err },
            });
        }
        // SAFETY: fd is a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        Ok(ExitWatch { fd, pid, is_child })
    }

    pub fn raw_fd(&self) -> i32 {
        self.fd.as_raw_fd()
    }

    /// Whether the process has exited (non-blocking).
    pub fn has_exited(&self) -> bool {
        let mut pfd = libc::pollfd {
            fd: self.raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, zero timeout.
        unsafe { libc::poll(&mut pfd, 1, 0) > 0 }
    }

    /// Reaps a launched command; returns its wait status (None for a process we did not
    /// launch, which its own parent reaps).
    pub fn reap(&self) -> Option<i32> {
        if !self.is_child {
            return None;
        }
        let mut status = 0;
        loop {
            // SAFETY: waitpid on our own child, writing one int.
            let rc = unsafe { libc::waitpid(self.pid as libc::pid_t, &mut status, 0) };
            if rc == self.pid as libc::pid_t {
                return Some(status);
            }
            if rc < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return None;
        }
    }
}

/// "1 other thread", "3 other threads".
fn plural(n: usize, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_zombie_is_named_with_its_parent() {
        let mut child = Command::new("sh").args(["-c", "exit 0"]).spawn().unwrap();
        let pid = child.id();
        while !stat::read_stat(pid).unwrap().has_exited() {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let err = check_pid(pid).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "process {pid} is a zombie (exited, not yet reaped by its parent {}): nothing to \
                 trace",
                std::process::id()
            )
        );
        child.wait().unwrap();
    }

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

    #[test]
    fn thread_counts_read_as_words() {
        assert_eq!(plural(1, "other thread"), "1 other thread");
        assert_eq!(plural(3, "other thread"), "3 other threads");
        let err = TargetError::MainThreadExited { pid: 7, threads: 1 };
        assert!(
            err.to_string()
                .starts_with("process 7's main thread has exited (1 other thread still runs): "),
            "{err}"
        );
    }
}
