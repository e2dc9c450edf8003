//! How the traced processes end: exit code, signal, or the OOM killer, for the recording
//! (`meta.exits`) and the report, which opens on a death.
//!
//! The status of a process alloctrace launched comes from `waitpid`. Any other traced process is
//! someone else's child: its status is read from `/proc/PID/stat` while it is a zombie, or, once
//! its parent has reaped it, from the pidfd opened when it was first seen (`PIDFD_GET_INFO`
//! with `PIDFD_INFO_EXIT`, Linux 6.15 and later; earlier kernels leave such an end unknown).
//! Which deaths by SIGKILL the OOM killer dealt, `oom` tells.

use std::{
    collections::HashMap,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::Duration,
};

use crate::{
    proc::{self, stat},
    recording::ProcessExit,
    session::oom::OomWitness,
};

/// The ends of the traced processes, and what is needed to read them.
pub struct Exits {
    /// A pidfd of each traced process, opened when it was first seen.
    pidfds: HashMap<u32, OwnedFd>,
    oom: OomWitness,
    /// Processes seen ending whose status is not readable yet (the main thread's exit is
    /// reported before the process is a zombie), with when.
    pending: Vec<(u32, f64)>,
    /// The process alloctrace is stopping (a launched command at the end of the recording).
    stopping: Option<u32>,
    /// The ends read so far, in the order seen.
    pub ended: Vec<ProcessExit>,
    changed: bool,
}

impl Exits {
    pub fn new() -> Exits {
        Exits {
            pidfds: HashMap::new(),
            oom: OomWitness::new(),
            pending: Vec::new(),
            stopping: None,
            ended: Vec::new(),
            changed: false,
        }
    }

    /// A traced process, first seen: keeps what reading its end will need.
    pub fn watch(&mut self, pid: u32) {
        if let Some(fd) = pidfd_open(pid) {
            self.pidfds.insert(pid, fd);
        }
        self.oom.watch(pid);
    }

    /// alloctrace is stopping process `pid`: its end is recorded as alloctrace's doing.
    pub fn stopping(&mut self, pid: u32) {
        self.stopping = Some(pid);
    }

    /// Process `pid` was seen ending at `t_s`; its status is read now or at a later `resolve`.
    pub fn ended(&mut self, pid: u32, t_s: f64) {
        if self.known(pid) {
            return;
        }
        self.pending.push((pid, t_s));
        self.resolve();
    }

    /// Process `pid` ended at `t_s` with wait status `status` (a launched command, reaped).
    pub fn ended_with(&mut self, pid: u32, t_s: f64, status: i32) {
        self.pending.retain(|&(p, _)| p != pid);
        if self.ended.iter().any(|e| e.pid == pid) {
            return;
        }
        let mut exit = ProcessExit::from_wait_status(pid, t_s, status);
        exit.stopped_by_alloctrace = self.stopping == Some(pid) && exit.signal.is_some();
        exit.oom_kill = exit.signal.as_deref() == Some("SIGKILL")
            && !exit.stopped_by_alloctrace
            && self.oom.was_oom_killed(pid);
        self.pidfds.remove(&pid);
        self.ended.push(exit);
        self.changed = true;
    }

    /// Whether anything is waiting for `resolve`.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Reads the status of the processes seen ending, where it is readable now.
    pub fn resolve(&mut self) {
        for (pid, t_s) in std::mem::take(&mut self.pending) {
            match exit_status(pid, self.pidfds.get(&pid)) {
                Some(status) => self.ended_with(pid, t_s, status),
                None => self.pending.push((pid, t_s)),
            }
        }
    }

    /// The end of process `pid`, when read.
    pub fn of(&self, pid: u32) -> Option<&ProcessExit> {
        self.ended.iter().find(|e| e.pid == pid)
    }

    /// Whether the ends changed since the last call.
    pub fn take_changed(&mut self) -> bool {
        std::mem::take(&mut self.changed)
    }

    /// At the end of the recording: waits briefly for the statuses still pending; a process
    /// still running (a main thread that exited before its other threads) did not end, one whose
    /// status stays unreadable ended unknown.
    pub fn finish(&mut self) {
        for _ in 0..20 {
            self.resolve();
            if self.pending.is_empty() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        for (pid, t_s) in std::mem::take(&mut self.pending) {
            let running = stat::read_stat(pid).is_ok_and(|s| !s.has_exited());
            if !running && !self.known(pid) {
                self.ended.push(ProcessExit::unknown(pid, t_s));
                self.changed = true;
            }
        }
    }

    fn known(&self, pid: u32) -> bool {
        self.ended.iter().any(|e| e.pid == pid) || self.pending.iter().any(|&(p, _)| p == pid)
    }
}

/// The wait status of process `pid`, which is not our child, once it has ended: from its stat
/// while a zombie, else from its pidfd once reaped. None while it runs (or when unreadable).
fn exit_status(pid: u32, pidfd: Option<&OwnedFd>) -> Option<i32> {
    if let Some(status) = pidfd.and_then(pidfd_exit_status) {
        return Some(status);
    }
    match stat::read_stat(pid) {
        Ok(s) if s.state == "Z" && proc::other_threads(pid) == 0 => s.exit_code,
        // Reaped between the two reads: the pidfd has it now.
        _ => pidfd.and_then(pidfd_exit_status),
    }
}

fn pidfd_open(pid: u32) -> Option<OwnedFd> {
    // SAFETY: plain syscall; the returned fd is owned below.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    // SAFETY: a fresh descriptor we own.
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// `struct pidfd_info` of linux/pidfd.h, its first version (64 bytes).
#[repr(C)]
#[derive(Default)]
struct PidfdInfo {
    mask: u64,
    cgroupid: u64,
    pid: u32,
    tgid: u32,
    ppid: u32,
    ids: [u32; 8],
    exit_code: i32,
}

const _: () = assert!(std::mem::size_of::<PidfdInfo>() == 64);

/// `PIDFD_GET_INFO`: `_IOWR(0xFF, 11, struct pidfd_info)`.
const PIDFD_GET_INFO: libc::c_ulong =
    (3 << 30) | ((std::mem::size_of::<PidfdInfo>() as libc::c_ulong) << 16) | (0xFF << 8) | 11;
const PIDFD_INFO_EXIT: u64 = 1 << 3;

/// The wait status the kernel keeps for a reaped process (Linux 6.15+); None before it is
/// reaped, or on an older kernel.
fn pidfd_exit_status(pidfd: &OwnedFd) -> Option<i32> {
    let mut info = PidfdInfo {
        mask: PIDFD_INFO_EXIT,
        ..PidfdInfo::default()
    };
    // SAFETY: the ioctl writes at most the size encoded in the request, which is `info`'s.
    let rc = unsafe { libc::ioctl(pidfd.as_raw_fd(), PIDFD_GET_INFO, &mut info) };
    (rc == 0 && info.mask & PIDFD_INFO_EXIT != 0).then_some(info.exit_code)
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use super::*;

    /// Starts `sh -c SCRIPT` and returns it once it has become a zombie (not reaped).
    fn zombie_of(script: &str) -> std::process::Child {
        let mut child = Command::new("sh").args(["-c", script]).spawn().unwrap();
        for _ in 0..500 {
            if stat::read_stat(child.id()).is_ok_and(|s| s.state == "Z") {
                return child;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("`{script}` did not end");
    }

    fn kernel_at_least(major: u32, minor: u32) -> bool {
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
        let mut numbers = release
            .split(['.', '-'])
            .map(|n| n.parse::<u32>().unwrap_or(0));
        let found = (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0));
        found >= (major, minor)
    }

    #[test]
    fn reads_the_status_of_a_zombie_and_of_a_reaped_process() {
        let mut exits = Exits::new();
        let mut zombie = zombie_of("exit 3");
        exits.watch(zombie.id());
        exits.ended(zombie.id(), 1.5);
        let exit = exits
            .of(zombie.id())
            .expect("read from the zombie's stat")
            .clone();
        assert_eq!(
            (exit.code, exit.signal.as_deref(), exit.t_s),
            (Some(3), None, 1.5)
        );
        assert_eq!(exit.describe(), "exited with status 3");
        zombie.wait().unwrap();

        // Reaped before its end is read: the pidfd (Linux 6.15+) still has it.
        let mut killed = Command::new("sleep").arg("60").spawn().unwrap();
        exits.watch(killed.id());
        killed.kill().unwrap();
        killed.wait().unwrap();
        exits.ended(killed.id(), 2.0);
        let Some(exit) = exits.of(killed.id()) else {
            assert!(!kernel_at_least(6, 15), "PIDFD_INFO_EXIT is in Linux 6.15");
            eprintln!("SKIPPED: this kernel has no PIDFD_INFO_EXIT");
            return;
        };
        assert_eq!(exit.signal.as_deref(), Some("SIGKILL"));
        assert!(!exit.oom_kill, "a kill(2) is not an OOM kill");
        assert_eq!(exit.describe(), "killed by SIGKILL");
        assert!(exits.take_changed() && !exits.take_changed());
    }

    #[test]
    fn a_command_alloctrace_stops_is_no_death() {
        let mut exits = Exits::new();
        exits.stopping(20);
        exits.ended_with(20, 4.0, libc::SIGTERM);
        let exit = exits.of(20).unwrap();
        assert!(exit.stopped_by_alloctrace && !exit.is_death());
        assert_eq!(exit.describe(), "stopped by alloctrace with SIGTERM");
        // An exit on its own, even while being stopped, is its own.
        exits.stopping(21);
        exits.ended_with(21, 4.0, 2 << 8);
        assert!(!exits.of(21).unwrap().stopped_by_alloctrace);
        assert_eq!(exits.of(21).unwrap().code, Some(2));
    }
}
