//! Output files of the views (`report -o`, `flamegraph -o`): written whole or not at all.
//!
//! The bytes go to a temporary file in the destination's directory (so the final rename stays on
//! one file system and is atomic), are fsynced, and only then take the destination's name. A crash
//! or a full disk at any point leaves either the old file (or none) or the complete new one, never
//! a half-written report.
//!
//! alloctrace runs as root: an existing path is replaced only when it is a regular file (and
//! `--force` says so). A character device or a FIFO (`/dev/stdout`, a pipe made with mkfifo) is
//! written into, never replaced; anything else (a block device, a socket) is refused. New files
//! are created owner-only (0600): recordings and reports hold the target's command line, where
//! tokens and keys live.

use std::{
    fs::{self, File, OpenOptions},
    io::{self, Write},
    os::unix::fs::{FileTypeExt, OpenOptionsExt},
    path::{Path, PathBuf},
    sync::atomic::{AtomicU64, Ordering},
};

/// Why an output file could not be written. Each message is one line naming the path and what to
/// do about it.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error("`{}` exists: pass --force to overwrite or choose another path", path.display())]
    Exists { path: PathBuf },
    #[error("`{}` is a directory: pass a file path", path.display())]
    IsDirectory { path: PathBuf },
    #[error("`{}` is {what}: {allowed}", path.display())]
    NotWritable {
        path: PathBuf,
        what: &'static str,
        allowed: &'static str,
    },
    #[error("cannot write `{}`: directory `{}` does not exist", path.display(), dir.display())]
    NoDirectory { path: PathBuf, dir: PathBuf },
    #[error("cannot write `{}`: {reason}", path.display())]
    Io { path: PathBuf, reason: String },
}

/// The permissions of every file alloctrace creates: owner-only.
pub const FILE_MODE: u32 = 0o600;

/// What an output path names before anything is written.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Destination {
    /// Nothing yet: a new file is created.
    New,
    /// A regular file that `--force` allows to replace.
    RegularFile,
    /// A character device or a FIFO: written into, never replaced.
    Stream,
}

/// Writes `bytes` to `path`: atomically to a file (an existing one is refused unless `force`),
/// straight into a character device or FIFO.
pub fn write_atomically(path: &Path, bytes: &[u8], force: bool) -> Result<(), OutputError> {
    let io_err = |e: io::Error| OutputError::Io {
        path: path.to_path_buf(),
        reason: io_reason(&e),
    };
    if check_destination(path, force)? == Destination::Stream {
        return write_into_stream(path, bytes).map_err(io_err);
    }
    let dir = parent_dir(path);

    let temp = TempFile::create(&dir, path).map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            // The directory exists (checked above) yet refuses the name: /proc, /sys.
            OutputError::Io {
                path: path.to_path_buf(),
                reason: format!("`{}` does not accept new files", dir.display()),
            }
        } else {
            io_err(e)
        }
    })?;
    temp.file()
        .write_all(bytes)
        .and_then(|()| temp.file().sync_all())
        .map_err(io_err)?;
    if force {
        fs::rename(&temp.path, path).map_err(io_err)?;
    } else {
        rename_no_replace(&temp.path, path).map_err(|e| {
            if e.kind() == io::ErrorKind::AlreadyExists {
                // Created by someone else since `check_destination`.
                OutputError::Exists {
                    path: path.to_path_buf(),
                }
            } else {
                io_err(e)
            }
        })?;
    }
    temp.persisted();
    // The rename is durable once the directory entry is: without this a power loss could bring
    // back the old name. Failure here loses nothing already written, so it is not an error.
    if let Ok(d) = File::open(&dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Writes into an existing character device or FIFO: no temporary, no rename, no truncation.
fn write_into_stream(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut file = OpenOptions::new().write(true).open(path)?;
    file.write_all(bytes)?;
    file.flush()
}

/// The checks `write_atomically` does before writing anything, for callers that want to fail
/// before doing expensive work (reading a large recording, rendering).
pub fn check_destination(path: &Path, force: bool) -> Result<Destination, OutputError> {
    let not_writable = |what| OutputError::NotWritable {
        path: path.to_path_buf(),
        what,
        allowed: "alloctrace writes regular files, character devices and FIFOs",
    };
    match fs::metadata(path) {
        Ok(m) if m.is_dir() => Err(OutputError::IsDirectory {
            path: path.to_path_buf(),
        }),
        Ok(m) if m.file_type().is_char_device() || m.file_type().is_fifo() => {
            Ok(Destination::Stream)
        }
        Ok(m) if m.file_type().is_block_device() => Err(not_writable("a block device")),
        Ok(m) if m.file_type().is_socket() => Err(not_writable("a socket")),
        Ok(_) if !force => Err(OutputError::Exists {
            path: path.to_path_buf(),
        }),
        Ok(_) => {
            check_directory(path)?;
            Ok(Destination::RegularFile)
        }
        Err(_) => {
            check_directory(path)?;
            Ok(Destination::New)
        }
    }
}

/// The directory a new file would go to exists and is one.
fn check_directory(path: &Path) -> Result<(), OutputError> {
    let dir = parent_dir(path);
    match fs::metadata(&dir) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(OutputError::Io {
            path: path.to_path_buf(),
            reason: format!("`{}` is not a directory", dir.display()),
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(OutputError::NoDirectory {
            path: path.to_path_buf(),
            dir,
        }),
        Err(e) => Err(OutputError::Io {
            path: path.to_path_buf(),
            reason: io_reason(&e),
        }),
    }
}

/// The directory `path` lives in (`.` for a bare file name).
pub(crate) fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// An I/O error as a short lower-case phrase ("permission denied"), without the "(os error 13)"
/// that means nothing to a user.
pub(crate) fn io_reason(e: &io::Error) -> String {
    let text = e.to_string();
    let text = match text.find(" (os error") {
        Some(i) => &text[..i],
        None => &text,
    };
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => "unknown I/O error".to_string(),
    }
}

/// A uniquely named file next to the destination, removed on drop unless persisted.
struct TempFile {
    path: PathBuf,
    file: Option<File>,
}

impl TempFile {
    fn create(dir: &Path, destination: &Path) -> io::Result<TempFile> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let base = destination
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "output".to_string());
        loop {
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            // Hidden, and named after the destination, so a leftover from a power loss is
            // recognisable.
            let path = dir.join(format!(".{base}.{}.{n}.tmp", std::process::id()));
            let created = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(FILE_MODE)
                .open(&path);
            match created {
                Ok(file) => {
                    return Ok(TempFile {
                        path,
                        file: Some(file),
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
    }

    fn file(&self) -> &File {
        self.file.as_ref().expect("open until persisted")
    }

    /// The file now has its final name: nothing to clean up.
    fn persisted(mut self) {
        self.file = None;
        self.path = PathBuf::new();
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.path.as_os_str().is_empty() {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// `rename` that fails with `AlreadyExists` instead of replacing `to`, atomically where the file
/// system supports it.
fn rename_no_replace(from: &Path, to: &Path) -> io::Result<()> {
    use std::{ffi::CString, os::unix::ffi::OsStrExt};
    let c = |p: &Path| {
        CString::new(p.as_os_str().as_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
    };
    let (c_from, c_to) = (c(from)?, c(to)?);
    // SAFETY: both are valid NUL-terminated paths; renameat2 only reads them.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            c_from.as_ptr(),
            libc::AT_FDCWD,
            c_to.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        // File systems without RENAME_NOREPLACE: a hard link is also exclusive.
        Some(libc::EINVAL) | Some(libc::ENOSYS) => match fs::hard_link(from, to) {
            Ok(()) => fs::remove_file(from),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Err(e),
            // Neither is supported (e.g. some FUSE file systems): the window between this check
            // and the rename is the best that can be done.
            Err(_) if to.exists() => Err(io::ErrorKind::AlreadyExists.into()),
            Err(_) => fs::rename(from, to),
        },
        _ => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn writes_new_file_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("report.json");
        write_atomically(&path, b"{\"a\": 1}\n", false).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"{\"a\": 1}\n");
        assert_eq!(entries(dir.path()), vec!["report.json"]);
    }

    #[test]
    fn refuses_existing_file_without_force_and_keeps_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.svg");
        fs::write(&path, "precious").unwrap();
        let err = write_atomically(&path, b"new", false).unwrap_err();
        assert!(matches!(err, OutputError::Exists { .. }));
        let msg = err.to_string();
        assert!(msg.contains("out.svg") && msg.contains("--force"), "{msg}");
        assert_eq!(fs::read_to_string(&path).unwrap(), "precious");
        assert_eq!(entries(dir.path()), vec!["out.svg"]);
    }

    #[test]
    fn force_replaces_existing_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.svg");
        fs::write(&path, "old contents, longer than the new ones").unwrap();
        write_atomically(&path, b"new", true).unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), "new");
        assert_eq!(entries(dir.path()), vec!["out.svg"]);
    }

    #[test]
    fn missing_directory_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("no-such-dir").join("out.txt");
        let err = write_atomically(&path, b"x", false).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, OutputError::NoDirectory { .. }), "{msg}");
        assert!(msg.contains("no-such-dir") && !msg.contains('\n'), "{msg}");
        assert!(entries(dir.path()).is_empty());
    }

    #[test]
    fn directory_destination_is_refused_even_with_force() {
        let dir = tempfile::tempdir().unwrap();
        let err = write_atomically(dir.path(), b"x", true).unwrap_err();
        assert!(matches!(err, OutputError::IsDirectory { .. }), "{err}");
        assert!(entries(dir.path()).is_empty());
    }

    #[test]
    fn unwritable_directory_gives_one_line_and_leaves_nothing() {
        // /proc refuses file creation even to root, unlike a chmod-ed directory.
        let path = Path::new("/proc/alloctrace-output-test.txt");
        let err = write_atomically(path, b"x", false).unwrap_err();
        let msg = err.to_string();
        assert_eq!(
            msg,
            "cannot write `/proc/alloctrace-output-test.txt`: `/proc` does not accept new files"
        );
        assert!(!msg.contains("os error") && !msg.contains('\n'), "{msg}");
        assert!(!path.exists());
    }

    #[test]
    fn bare_file_name_resolves_to_current_directory() {
        assert_eq!(parent_dir(Path::new("x.svg")), PathBuf::from("."));
        assert_eq!(parent_dir(Path::new("/x.svg")), PathBuf::from("/"));
    }

    #[test]
    fn io_reason_is_short_and_lower_case() {
        let e = io::Error::from_raw_os_error(libc::EACCES);
        assert_eq!(io_reason(&e), "permission denied");
    }

    #[test]
    fn rename_no_replace_refuses_existing_target() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        fs::write(&a, "a").unwrap();
        fs::write(&b, "b").unwrap();
        let e = rename_no_replace(&a, &b).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(fs::read_to_string(&b).unwrap(), "b");
    }

    /// Makes a device or FIFO node at `path` (root only); None where the kernel refuses.
    fn make_node(path: &Path, kind: libc::mode_t, dev: libc::dev_t) -> Option<()> {
        use std::{ffi::CString, os::unix::ffi::OsStrExt};
        let c = CString::new(path.as_os_str().as_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path; mknod only reads it.
        (unsafe { libc::mknod(c.as_ptr(), kind | 0o600, dev) } == 0).then_some(())
    }

    #[test]
    fn character_device_is_written_into_not_replaced() {
        // /dev/null stays a character device, with or without --force.
        for force in [false, true] {
            write_atomically(Path::new("/dev/null"), b"report", force).unwrap();
            let m = fs::metadata("/dev/null").unwrap();
            assert!(m.file_type().is_char_device());
        }
    }

    #[test]
    fn fifo_is_written_into() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("pipe");
        make_node(&fifo, libc::S_IFIFO, 0).expect("mkfifo in a temporary directory");
        let reader = {
            let fifo = fifo.clone();
            std::thread::spawn(move || fs::read(&fifo).unwrap())
        };
        write_atomically(&fifo, b"through the pipe", false).unwrap();
        assert_eq!(reader.join().unwrap(), b"through the pipe");
        assert!(fs::metadata(&fifo).unwrap().file_type().is_fifo());
        assert_eq!(entries(dir.path()), vec!["pipe"]);
    }

    #[test]
    fn block_device_and_socket_are_refused_even_with_force() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("sock");
        let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        let err = write_atomically(&socket, b"x", true).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "`{}` is a socket: alloctrace writes regular files, character devices and FIFOs",
                socket.display()
            )
        );
        // A block device node (loop device 0's numbers): only root may make one.
        let block = dir.path().join("disk");
        if make_node(&block, libc::S_IFBLK, libc::makedev(7, 0)).is_none() {
            assert_ne!(unsafe { libc::geteuid() }, 0, "root could not mknod");
            return;
        }
        let err = write_atomically(&block, b"x", true).unwrap_err();
        assert!(err.to_string().contains("is a block device"), "{err}");
        assert!(fs::metadata(&block).unwrap().file_type().is_block_device());
    }

    #[test]
    fn new_files_are_owner_only_whatever_the_umask() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("report.txt");
        // SAFETY: umask has no preconditions; the old mask is put back at once.
        let old = unsafe { libc::umask(0) };
        let written = write_atomically(&path, b"x", false);
        unsafe { libc::umask(old) };
        written.unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, FILE_MODE);
        // Replacing keeps it owner-only too.
        fs::set_permissions(&path, fs::Permissions::from_mode(0o666)).unwrap();
        write_atomically(&path, b"y", true).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, FILE_MODE);
    }
}
