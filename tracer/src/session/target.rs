//! The traced process: checking a PID and noticing when it exits (`launch` starts a command).

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use crate::{
    output::io_reason,
    proc::{self, ProcError, cmdline, stat},
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
pub(super) fn is_dynamic_loader(path: &str) -> bool {
    let base = path.rsplit('/').next().unwrap_or(path);
    base.starts_with("ld-linux") || base.starts_with("ld-musl") || base.starts_with("ld.so")
}

/// A pidfd that becomes readable when the process exits.
pub struct ExitWatch {
    pub fd: OwnedFd,
}

impl ExitWatch {
    pub fn new(pid: u32) -> Result<ExitWatch, TargetError> {
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
        Ok(ExitWatch { fd })
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
        let mut child = std::process::Command::new("sh")
            .args(["-c", "exit 0"])
            .spawn()
            .unwrap();
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
