//! Readers of the target's `/proc` files, with one error type. Everything read here comes from
//! the target and is untrusted: the parsers are pure functions over the text that skip what they
//! cannot read rather than fail.

pub mod cgroup;
pub mod cmdline;
pub mod fd;
pub mod maps;
pub mod smaps;
pub mod stat;
pub mod status;

use std::{fs, io, path::Path};

/// Why a `/proc/PID/...` file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ProcError {
    #[error("no process with PID {pid}: check the PID (ps -p {pid})")]
    NoSuchProcess { pid: u32 },
    #[error("permission denied reading /proc/{pid}: run alloctrace as root")]
    PermissionDenied { pid: u32 },
    #[error("cannot read /proc/{pid}/{file}: {source}")]
    Io {
        pid: u32,
        file: &'static str,
        source: io::Error,
    },
}

impl ProcError {
    /// What an error reading `/proc/PID/FILE` means: the process is gone, we may not look, or
    /// another I/O error.
    pub fn from_io(pid: u32, file: &'static str, err: io::Error) -> ProcError {
        match ProcError::gone_or_denied(pid, &err) {
            Some(known) => known,
            None => ProcError::Io {
                pid,
                file,
                source: err,
            },
        }
    }

    /// `NoSuchProcess` or `PermissionDenied` when that is what `err` says about `pid` (also for
    /// errors of calls on the process other than reading /proc, e.g. pidfd_open).
    pub fn gone_or_denied(pid: u32, err: &io::Error) -> Option<ProcError> {
        match err.kind() {
            io::ErrorKind::NotFound => Some(ProcError::NoSuchProcess { pid }),
            io::ErrorKind::PermissionDenied => Some(ProcError::PermissionDenied { pid }),
            _ if err.raw_os_error() == Some(libc::ESRCH) => Some(ProcError::NoSuchProcess { pid }),
            _ => None,
        }
    }
}

/// The text of `/proc/PID/FILE`.
fn read_text(pid: u32, file: &'static str) -> Result<String, ProcError> {
    fs::read_to_string(format!("/proc/{pid}/{file}")).map_err(|e| ProcError::from_io(pid, file, e))
}

/// Whether process `pid` still exists (possibly as a zombie).
pub fn exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// How many threads of process `pid` other than its main thread are listed in
/// `/proc/PID/task` (threads that exited are gone from it; a main thread that exited stays, as a
/// zombie, while others run). 0 when unreadable.
pub fn other_threads(pid: u32) -> usize {
    let Ok(entries) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    let main = pid.to_string();
    entries
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_str() != Some(main.as_str()))
        .count()
}

/// A `N kB` value of /proc's status and smaps files, in bytes; `None` when unreadable, also when
/// the bytes would not fit in a u64 (no kernel says that, a forged file can).
fn kib_value(value: &str) -> Option<u64> {
    let kib: u64 = value.trim().trim_end_matches("kB").trim().parse().ok()?;
    kib.checked_mul(1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_io_errors_to_what_they_say_about_the_process() {
        let gone = io::Error::from(io::ErrorKind::NotFound);
        assert!(matches!(
            ProcError::from_io(7, "stat", gone),
            ProcError::NoSuchProcess { pid: 7 }
        ));
        let esrch = io::Error::from_raw_os_error(libc::ESRCH);
        assert!(matches!(
            ProcError::from_io(7, "stat", esrch),
            ProcError::NoSuchProcess { pid: 7 }
        ));
        let denied = io::Error::from(io::ErrorKind::PermissionDenied);
        assert!(matches!(
            ProcError::from_io(7, "maps", denied),
            ProcError::PermissionDenied { pid: 7 }
        ));
        let other = io::Error::from_raw_os_error(libc::EIO);
        let err = ProcError::from_io(7, "smaps", other);
        assert!(
            err.to_string().starts_with("cannot read /proc/7/smaps: "),
            "{err}"
        );
    }

    #[test]
    fn reads_kib_values() {
        assert_eq!(kib_value("    1234 kB"), Some(1234 * 1024));
        assert_eq!(kib_value("0 kB"), Some(0));
        assert_eq!(kib_value(" kB"), None);
        assert_eq!(kib_value("12x kB"), None);
        // 2^54 kB overflowed the multiplication (a forged status file; the proc_parsers fuzz
        // target replays it from its corpus).
        assert_eq!(kib_value("18014398509481983 kB"), Some(u64::MAX - 1023));
        assert_eq!(kib_value("18014398509481984 kB"), None);
    }

    #[test]
    fn reading_a_process_that_does_not_exist_says_so() {
        // Above PID_MAX_LIMIT (2^22): never a process.
        let pid = 999_999_999;
        assert!(!exists(pid));
        assert!(matches!(
            read_text(pid, "status"),
            Err(ProcError::NoSuchProcess { pid: 999_999_999 })
        ));
    }
}
