//! Multi-uprobe links (`BPF_TRACE_UPROBE_MULTI`, Linux 6.6): one `BPF_LINK_CREATE` attaches a
//! program to every offset of a file it is given, and closing the link detaches them all with
//! one wait for the kernel's grace periods. A perf-event uprobe costs a `perf_event_open`, a
//! trace event of its own and a wait on detach (about 75 ms each here, one after another under
//! the kernel's `event_mutex`): a duty-cycled heap opens and closes its windows every few
//! seconds, so that is what a window costs. aya 0.14 loads such programs (`UProbe::load_multi`,
//! third_party/aya) but makes no such links; this file does.

use std::{
    ffi::CString,
    io,
    num::NonZeroU32,
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    os::unix::ffi::OsStrExt,
    path::Path,
};

/// `BPF_LINK_CREATE` (`enum bpf_cmd`).
const BPF_LINK_CREATE: libc::c_long = 28;
/// `BPF_TRACE_UPROBE_MULTI` (`enum bpf_attach_type`).
const BPF_TRACE_UPROBE_MULTI: u32 = 48;
/// `BPF_TRACE_UPROBE_SESSION` (Linux 6.13): the program runs at the functions' entries and, unless
/// the entry run returned non-zero, at their returns.
const BPF_TRACE_UPROBE_SESSION: u32 = 57;
/// `BPF_F_UPROBE_MULTI_RETURN`: the program runs at the functions' returns.
const BPF_F_UPROBE_MULTI_RETURN: u32 = 1;

/// When a link's program runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkKind {
    /// At the probed instructions.
    Entry,
    /// At the returns of the functions whose entries are the offsets.
    Return,
    /// At the functions' entries and, unless the entry run returned non-zero, their returns
    /// (loaded with `UProbe::load_session`).
    Session,
}

/// `union bpf_attr` as `BPF_LINK_CREATE` reads it for a multi-uprobe link (the kernel takes a
/// shorter attribute than its own and treats the rest as zero).
#[repr(C)]
#[derive(Default)]
struct LinkCreateUprobeMulti {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
    path: u64,
    offsets: u64,
    ref_ctr_offsets: u64,
    cookies: u64,
    cnt: u32,
    multi_flags: u32,
    pid: u32,
    _pad: u32,
}

/// Where a multi-uprobe link's probes fire.
pub struct MultiPoints<'a> {
    /// The file, as the kernel opens it.
    pub path: &'a Path,
    /// File offsets of the probed instructions.
    pub offsets: &'a [u64],
    /// Each offset's attach cookie.
    pub cookies: &'a [u64],
    /// Only this process (all its threads); None: every process mapping the file.
    pub pid: Option<NonZeroU32>,
    pub kind: LinkKind,
}

/// Attaches `program` (loaded with `UProbe::load_multi`, or `load_session` for a session) at
/// `points`; the link lives as long as the returned descriptor.
pub fn attach(program: BorrowedFd<'_>, points: &MultiPoints<'_>) -> io::Result<OwnedFd> {
    if points.offsets.len() != points.cookies.len() || points.offsets.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "a multi-uprobe link needs one cookie per offset, and an offset",
        ));
    }
    let path = CString::new(points.path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let attr = LinkCreateUprobeMulti {
        prog_fd: program.as_raw_fd() as u32,
        attach_type: match points.kind {
            LinkKind::Session => BPF_TRACE_UPROBE_SESSION,
            LinkKind::Entry | LinkKind::Return => BPF_TRACE_UPROBE_MULTI,
        },
        path: path.as_ptr() as u64,
        offsets: points.offsets.as_ptr() as u64,
        cookies: points.cookies.as_ptr() as u64,
        cnt: points.offsets.len() as u32,
        multi_flags: if points.kind == LinkKind::Return {
            BPF_F_UPROBE_MULTI_RETURN
        } else {
            0
        },
        pid: points.pid.map_or(0, NonZeroU32::get),
        ..LinkCreateUprobeMulti::default()
    };
    // SAFETY: `attr` is a valid BPF_LINK_CREATE attribute of the size passed; the path, offsets
    // and cookies it points to outlive the call, which copies them.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_LINK_CREATE,
            &attr as *const LinkCreateUprobeMulti,
            size_of::<LinkCreateUprobeMulti>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Whether the kernel makes links of `kind`, asked as libbpf asks: a link for `program`
/// (loaded for that kind) on `/` fails with EBADF where they exist (`/` is no regular file),
/// with EINVAL or EOPNOTSUPP where they do not.
pub fn supported(program: BorrowedFd<'_>, kind: LinkKind) -> bool {
    let points = MultiPoints {
        path: Path::new("/"),
        offsets: &[0],
        cookies: &[0],
        pid: None,
        kind,
    };
    match attach(program, &points) {
        Ok(_) => true,
        Err(e) => e.raw_os_error() == Some(libc::EBADF),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_attribute_has_the_kernels_layout() {
        // struct { prog_fd, target_fd, attach_type, flags; uprobe_multi { path, offsets,
        // ref_ctr_offsets, cookies: u64; cnt, flags, pid: u32 } } (include/uapi/linux/bpf.h).
        assert_eq!(std::mem::offset_of!(LinkCreateUprobeMulti, path), 16);
        assert_eq!(std::mem::offset_of!(LinkCreateUprobeMulti, cookies), 40);
        assert_eq!(std::mem::offset_of!(LinkCreateUprobeMulti, cnt), 48);
        assert_eq!(std::mem::offset_of!(LinkCreateUprobeMulti, pid), 56);
        assert_eq!(size_of::<LinkCreateUprobeMulti>(), 64);
    }

    #[test]
    fn offsets_without_their_cookies_are_refused_before_the_kernel() {
        // SAFETY: 0 is open for the test's whole run (stdin); no link is made with it.
        let fd = unsafe { BorrowedFd::borrow_raw(0) };
        let points = MultiPoints {
            path: Path::new("/bin/true"),
            offsets: &[1, 2],
            cookies: &[1],
            pid: None,
            kind: LinkKind::Entry,
        };
        let e = attach(fd, &points).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    }
}
