//! Whether this machine can run the tests that load eBPF programs, and `require_privileges!`,
//! which skips (or, under `CI=true`, fails) a test that needs them where it cannot, and makes
//! room for its recorder.

use std::{
    path::Path,
    sync::{PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard},
};

/// Returns from the calling test when eBPF programs cannot be loaded here: the test is skipped
/// with a notice, except under `CI=true`, where it fails instead (see `privileged`). Otherwise
/// the test holds, until it ends, its place among the recorders (`record_beside_others`), or with
/// `alone` the whole process (`record_alone`).
macro_rules! require_privileges {
    () => {
        if !$crate::common::privileged() {
            return;
        }
        let _recording = $crate::common::record_beside_others();
    };
    (alone) => {
        if !$crate::common::privileged() {
            return;
        }
        let _recording = $crate::common::record_alone();
    };
}

/// The recorders of this process's tests (the suites share one process). Tests record side by
/// side, each holding a read guard; a test whose figures depend on when its recorder samples
/// holds the write guard and records alone, so that the suite's other recorders cannot starve
/// those samples of CPU.
static RECORDERS: RwLock<()> = RwLock::new(());

/// A place among the recorders that run side by side.
pub fn record_beside_others() -> RwLockReadGuard<'static, ()> {
    RECORDERS.read().unwrap_or_else(PoisonError::into_inner)
}

/// The only place: no other privileged test runs until the guard is dropped.
pub fn record_alone() -> RwLockWriteGuard<'static, ()> {
    RECORDERS.write().unwrap_or_else(PoisonError::into_inner)
}

/// Whether the tests that load eBPF programs can run here. Without root, eBPF, BTF or uprobes
/// they are skipped with a notice, except under `CI=true`, where they must run and fail instead.
pub fn privileged() -> bool {
    let mut missing = Vec::new();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        missing.push("root");
    }
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        missing.push("kernel BTF (/sys/kernel/btf/vmlinux)");
    }
    if !Path::new("/sys/bus/event_source/devices/uprobe").exists() {
        missing.push("uprobes (/sys/bus/event_source/devices/uprobe)");
    }
    if missing.is_empty() && !can_create_bpf_map() {
        missing.push("the bpf(2) system call (BPF_MAP_CREATE failed)");
    }
    if missing.is_empty() {
        return true;
    }
    let what = missing.join(", ");
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("privileged test cannot run: missing {what}; under CI=true it must not be skipped");
    }
    eprintln!("SKIPPED: privileged test needs {what} (set CI=true to make this a failure)");
    false
}

/// Creates (and closes) a one-element BPF array map: proof that this process may use eBPF.
fn can_create_bpf_map() -> bool {
    // union bpf_attr for BPF_MAP_CREATE: map_type, key_size, value_size, max_entries, ...
    let mut attr = [0u32; 18];
    attr[0] = 2; // BPF_MAP_TYPE_ARRAY
    attr[1] = 4;
    attr[2] = 4;
    attr[3] = 1;
    // SAFETY: bpf(BPF_MAP_CREATE, attr, size) reads `size` bytes of `attr`.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            0, // BPF_MAP_CREATE
            attr.as_ptr(),
            std::mem::size_of_val(&attr),
        )
    };
    if fd < 0 {
        return false;
    }
    // SAFETY: fd is a descriptor we own.
    unsafe { libc::close(fd as i32) };
    true
}
