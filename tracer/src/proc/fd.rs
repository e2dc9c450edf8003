//! `/proc/PID/fd/N`: what a process's file descriptor refers to.

use std::{fs, path::PathBuf};

use super::ProcError;

/// The target of descriptor `fd` of `pid`: a path, or a pseudo-path such as `/memfd:name
/// (deleted)` or `socket:[1234]`.
pub fn fd_target(pid: u32, fd: i32) -> Result<PathBuf, ProcError> {
    fs::read_link(format!("/proc/{pid}/fd/{fd}")).map_err(|e| ProcError::from_io(pid, "fd", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_descriptors() {
        let file = std::fs::File::open("/proc/self/status").unwrap();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&file);
        let target = fd_target(std::process::id(), fd).unwrap();
        assert_eq!(
            target,
            PathBuf::from(format!("/proc/{}/status", std::process::id()))
        );
        assert!(fd_target(999_999_999, 0).is_err());
    }
}
