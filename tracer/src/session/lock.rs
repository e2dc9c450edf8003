//! One recorder per process: a lock file per traced target under `/run/alloctrace/`, named by
//! the target's PID and start time (so that a reused PID is another file), locked with `flock`
//! for as long as the recorder lives and holding its PID and output path. The kernel releases the
//! lock when the recorder dies, however it dies; a recorder that finishes removes the file (one
//! that was killed leaves it, unlocked: the next recorder of that process takes it over, and
//! `/run` is emptied at boot).
//! Two recorders on one process would each attach uprobes and see every event twice over the
//! kernel's uprobe chain, at twice the cost to the target.

use std::{
    fs::{self, File, OpenOptions},
    io::{self, Read, Seek, Write},
    os::{
        fd::AsRawFd,
        unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt},
    },
    path::{Path, PathBuf},
};

use crate::{proc::stat, session::target::TargetError};

/// Where the lock files are (a tmpfs on every systemd machine, emptied at boot).
const LOCK_DIR: &str = "/run/alloctrace";

/// The lock on one target, released (and its file removed) when dropped.
pub struct TargetLock {
    /// Open for as long as the lock is held.
    _held: File,
    path: PathBuf,
}

impl Drop for TargetLock {
    fn drop(&mut self) {
        // Removed while still locked: a recorder that opened it meanwhile finds, once it holds
        // the lock, that the path names another file (or none), and starts over.
        // The descriptor, and with it the lock, goes right after (fields drop after this).
        let _ = fs::remove_file(&self.path);
    }
}

/// Takes the lock on process `pid` for this recorder, which writes `output`. `AlreadyTraced`
/// when another recorder holds it; `None` (with a warning) where no lock can be kept (no
/// writable `/run`): recording goes on unguarded.
pub fn lock_target(pid: u32, output: &Path) -> Result<Option<TargetLock>, TargetError> {
    lock_target_in(Path::new(LOCK_DIR), pid, output)
}

fn lock_target_in(dir: &Path, pid: u32, output: &Path) -> Result<Option<TargetLock>, TargetError> {
    let start = stat::read_stat(pid)?.start_time.unwrap_or(0);
    let path = dir.join(format!("{pid}-{start}.lock"));
    match try_lock(dir, &path, output) {
        Ok(lock) => Ok(Some(lock)),
        Err(LockFailure::Held(holder)) => Err(TargetError::AlreadyTraced { pid, holder }),
        Err(LockFailure::Io(e)) => {
            log::warn!(
                "cannot keep a lock on process {pid} in {} ({e}): a second alloctrace on it would \
                 not be refused",
                dir.display()
            );
            Ok(None)
        }
    }
}

enum LockFailure {
    /// Another recorder holds the lock: its PID and output path, when it wrote them.
    Held(Option<(u32, String)>),
    Io(io::Error),
}

impl From<io::Error> for LockFailure {
    fn from(e: io::Error) -> Self {
        LockFailure::Io(e)
    }
}

fn try_lock(dir: &Path, path: &Path, output: &Path) -> Result<TargetLock, LockFailure> {
    ensure_private_dir(dir)?;
    // A file removed by a finishing recorder between our open and our lock is not the lock any
    // more: open again (a few times; each round means another recorder just finished).
    for _ in 0..8 {
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)?;
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                return Err(LockFailure::Held(holder(&mut file)));
            }
            return Err(e.into());
        }
        let still_named = fs::symlink_metadata(path)
            .is_ok_and(|m| m.ino() == file.metadata().map(|f| f.ino()).unwrap_or(0));
        if !still_named {
            continue;
        }
        file.set_len(0)?;
        let who = format!("{}\n{}\n", std::process::id(), output.display());
        file.write_all(who.as_bytes())?;
        return Ok(TargetLock {
            _held: file,
            path: path.to_path_buf(),
        });
    }
    Err(io::Error::other("the lock file kept being replaced").into())
}

/// Creates `dir` owner-only if missing; refuses anything but a directory owned by root (a
/// symbolic link planted there would redirect the lock files).
fn ensure_private_dir(dir: &Path) -> io::Result<()> {
    match fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            let meta = fs::symlink_metadata(dir)?;
            // SAFETY: geteuid has no preconditions.
            let uid = unsafe { libc::geteuid() };
            if meta.is_dir() && meta.uid() == uid {
                Ok(())
            } else {
                Err(io::Error::other(
                    "it exists and is not a directory of this user",
                ))
            }
        }
        Err(e) => Err(e),
    }
}

/// The PID and output path the holder of a lock wrote (None while it has not yet).
fn holder(file: &mut File) -> Option<(u32, String)> {
    let mut text = String::new();
    file.rewind().ok()?;
    file.take(4096).read_to_string(&mut text).ok()?;
    let (pid, output) = text.split_once('\n')?;
    Some((pid.parse().ok()?, output.trim_end_matches('\n').to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_one_process_names_the_first_holder() {
        let dir = tempfile::tempdir().unwrap();
        let locks = dir.path().join("locks");
        let me = std::process::id();
        let first = lock_target_in(&locks, me, Path::new("/tmp/first.trace"))
            .unwrap()
            .expect("locked");
        let mode = fs::metadata(&first.path).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(fs::metadata(&locks).unwrap().mode() & 0o777, 0o700);
        let second = lock_target_in(&locks, me, Path::new("/tmp/second.trace"));
        let Err(err) = second else {
            panic!("a second lock was granted");
        };
        assert_eq!(
            err.to_string(),
            format!(
                "process {me} is already traced by alloctrace (PID {me}, writing /tmp/first.trace): \
                 stop that recording first"
            )
        );
        // Released and removed with the first: the next recorder gets it.
        let path = first.path.clone();
        drop(first);
        assert!(!path.exists());
        let third = lock_target_in(&locks, me, Path::new("/tmp/third.trace")).unwrap();
        assert!(third.is_some());
    }

    #[test]
    fn a_lock_directory_that_is_a_link_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let elsewhere = dir.path().join("elsewhere");
        fs::create_dir(&elsewhere).unwrap();
        let link = dir.path().join("locks");
        std::os::unix::fs::symlink(&elsewhere, &link).unwrap();
        let lock = lock_target_in(&link, std::process::id(), Path::new("x")).unwrap();
        assert!(lock.is_none(), "locked through a symbolic link");
        assert_eq!(fs::read_dir(&elsewhere).unwrap().count(), 0);
    }
}
