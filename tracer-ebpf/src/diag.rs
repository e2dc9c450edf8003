//! What the programs lose and why: per-CPU counters user space reports (`DROPS`,
//! `STACK_STATS`), and with `record --debug-bpf` a log line per skipped event or stack part
//! (aya-log). Off by default: every log site first tests `DEBUG_LOG`, a read-only constant the
//! verifier prunes the site with.

use aya_ebpf::helpers::bpf_get_current_pid_tgid;
use aya_log_ebpf::{debug, warn};
use tracer_common::drop_cause;

use crate::maps::{DEBUG_LOG, DROPS, STACK_STATS, global};

#[inline(always)]
fn logging() -> bool {
    global(&DEBUG_LOG) != 0
}

#[inline(always)]
fn current_tid() -> u32 {
    bpf_get_current_pid_tgid() as u32
}

/// Counts a stack capture by `stack_stat`.
#[inline(always)]
pub fn count_stack(stat: u32) {
    if let Some(slot) = STACK_STATS.get_ptr_mut(stat) {
        // SAFETY: per-CPU slot: no other writer while this program runs.
        unsafe { *slot += 1 };
    }
}

/// An event was lost by `cause` (a `drop_cause`) at `site` (what the program was doing):
/// counted, and logged when asked.
#[inline(always)]
pub fn lost(cause: u32, site: &'static str) {
    if let Some(slot) = DROPS.get_ptr_mut(cause) {
        // SAFETY: per-CPU slot: no other writer while this program runs.
        unsafe { *slot += 1 };
    }
    if logging() {
        let name = match drop_cause::NAMES.get(cause as usize) {
            Some(name) => *name,
            None => "unknown",
        };
        warn!(
            &(),
            "event lost ({}) at {}, thread {}",
            name,
            site,
            current_tid()
        );
    }
}

/// A stack that was to be copied got the frame-pointer walk: the ring held `used` of `size`
/// bytes.
#[inline(always)]
pub fn stack_copy_skipped(used: u64, size: u64) {
    if logging() {
        debug!(
            &(),
            "stack copy skipped for the frame-pointer walk: ring buffer {} of {} bytes used, thread {}",
            used,
            size,
            current_tid()
        );
    }
}

/// A stack copy read nothing at the stack pointer `sp`.
#[inline(always)]
pub fn stack_copy_empty(sp: u64) {
    if logging() {
        debug!(
            &(),
            "stack copy empty: user stack unreadable at {:x}, thread {}",
            sp,
            current_tid()
        );
    }
}

/// Why the Python frames of a CPython process's thread were not read.
#[derive(Copy, Clone)]
pub enum PythonMiss {
    /// 3.10: no thread holds the GIL.
    NoGilHolder,
    /// The runtime, interpreter or a thread state could not be read.
    Unreadable,
    /// The interpreter has no thread state for this thread.
    NoThreadState,
    /// The thread state was not among the first `MAX_PY_THREADS` of the interpreter.
    TooManyThreads,
    /// The thread state holds no frame (the thread runs no Python code now).
    NoFrame,
}

/// The Python frames of the current thread were not read, for `why`.
#[inline(always)]
pub fn python_skipped(why: PythonMiss) {
    if !logging() {
        return;
    }
    let tid = current_tid();
    // One call per message: the log macros want their strings constant.
    match why {
        PythonMiss::NoGilHolder => {
            debug!(
                &(),
                "Python frames skipped, thread {}: no thread holds the GIL", tid
            )
        }
        PythonMiss::Unreadable => debug!(
            &(),
            "Python frames skipped, thread {}: interpreter state unreadable", tid
        ),
        PythonMiss::NoThreadState => debug!(
            &(),
            "Python frames skipped, thread {}: no thread state for it", tid
        ),
        PythonMiss::TooManyThreads => debug!(
            &(),
            "Python frames skipped, thread {}: not among the first {} thread states",
            tid,
            crate::python::MAX_PY_THREADS as u32
        ),
        PythonMiss::NoFrame => debug!(
            &(),
            "Python frames skipped, thread {}: no Python frame running", tid
        ),
    }
}
