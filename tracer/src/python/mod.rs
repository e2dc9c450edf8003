//! CPython frames: find the interpreter in a target process, know its struct layout
//! ([`PythonOffsets`]), walk a thread's Python stack from outside, and symbolize
//! (code object, bytecode offset) pairs into function, file and line.
//!
//! The walk here is the same one the BPF walker does at event time (docs/python-frames.md), so
//! that the offsets are proven against live interpreters by tests before BPF relies on them:
//!
//! 1. **Thread state of the current thread.** Walk `_PyRuntime.interpreters.head` →
//!    `interp.threads.head` → `tstate.next` and pick the `PyThreadState` whose
//!    `native_thread_id` is the kernel tid (3.11+) or whose `thread_id` (`pthread_self()`, the
//!    thread's fsbase on x86-64 glibc) equals `task->thread.fsbase` (all versions). This works
//!    whether or not the thread holds the GIL. Shortcuts: 3.10/3.11
//!    `_PyRuntime.gilstate.tstate_current` is the GIL holder (the allocating thread while it runs
//!    Python code; check its `native_thread_id`); 3.12+ keeps the current thread state in the TLS
//!    variable `_Py_tss_tstate` (`tls_tstate`), which needs the module's TLS block address.
//! 2. **Innermost frame.** 3.10: `tstate->frame` (`PyFrameObject*`). 3.11/3.12:
//!    `tstate->cframe->current_frame` (`_PyInterpreterFrame*`). 3.13: `tstate->current_frame`.
//! 3. **Each frame.** Skip frames whose `owner` byte is `FRAME_OWNED_BY_CSTACK` (3.12+ entry
//!    shims) or whose code pointer is not a `PyCode_Type` object; record the code object address
//!    and the bytecode byte offset (3.10: `f_lasti * 2`; 3.11+: instruction pointer − (code +
//!    `co_code_adaptive`)); continue with `f_back` / `previous` until null.
//! 4. **Symbolize** in user space ([`Symbolizer`]): `co_qualname`, `co_filename`,
//!    `co_firstlineno`, and the line of the offset from `co_linetable` (3.10 address/line delta
//!    pairs, 3.11+ PEP 657 location table), cached per code object address.
//!
//! Layouts were measured with `offsetof` against each version's installed internal headers
//! (tests/fixtures/py_offsets_probe.c checks the table on every run where headers exist); 3.13
//! also publishes them itself in `_PyRuntime.debug_offsets`, which win over the table.

use std::path::PathBuf;

mod detect;
mod frames;
mod linetable;
mod offsets;

pub use self::{
    detect::{Interpreter, detect},
    frames::{
        MAX_DEPTH, ProcMem, PyFrame, PyThread, PythonProcess, RawFrame, Symbolizer, decode_str,
        read_str,
    },
    linetable::{
        LineRange, Location, decode_line_table_310, decode_location_table, line_at, line_ranges,
    },
    offsets::{
        ABSENT, GLIBC_PTHREAD_TID, PyVersion, PythonOffsets, apply_debug_offsets, instr_kind,
        offsets_for,
    },
};

/// Why the Python stack of a process could not be read. Each renders as one line.
#[derive(Debug, thiserror::Error)]
pub enum PythonError {
    #[error("process {pid}: {what}: {err}")]
    Proc {
        pid: u32,
        what: String,
        err: std::io::Error,
    },
    #[error("process {0} has no CPython interpreter mapped (no libpython3.X.so or python3.X)")]
    NotPython(u32),
    #[error("CPython {0}.{1} is not supported (supported: 3.10 to 3.13)")]
    Unsupported(u32, u32),
    #[error("{path}: {msg}")]
    Elf { path: PathBuf, msg: String },
    #[error("process {pid}: cannot read {len} bytes at {addr:#x}: {err}")]
    Read {
        pid: u32,
        addr: u64,
        len: usize,
        err: std::io::Error,
    },
    #[error("process {pid}: thread {tid} has no Python thread state")]
    NoThread { pid: u32, tid: u32 },
    #[error("process {pid}: {msg}")]
    Corrupt { pid: u32, msg: String },
}

pub type Result<T> = std::result::Result<T, PythonError>;
