//! Where a CPython interpreter keeps its thread states and frames, per target process: filled by
//! user space (`alloctrace::python`), copied into a BPF map, read by the BPF frame walker.
//!
//! Every field is a `u64` so that the layout has no padding and is the same on both sides.
//! Offsets are bytes from the start of the named C struct; [`ABSENT`] marks a field that the
//! target's version does not have. docs/python-frames.md says how the walker uses each field.

use core::mem::size_of;

/// An offset or address that this interpreter version does not have.
pub const ABSENT: u64 = u64::MAX;

/// How a frame records where it is in its bytecode (`PythonOffsets::frame_instr_kind`).
pub mod instr_kind {
    /// 3.10: `PyFrameObject.f_lasti`, an `int` counting 2-byte code units; -1 before the first
    /// instruction. Byte offset = `f_lasti * 2`.
    pub const LASTI_CODE_UNITS: u64 = 0;
    /// 3.11+: a pointer into the code object's `co_code_adaptive` (3.11/3.12 `prev_instr`, 3.13
    /// `instr_ptr`). Byte offset = pointer − (code object + `code_code_adaptive`).
    pub const POINTER: u64 = 1;
}

/// How to find the current thread's frame chain and read each frame's code object and position.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct PythonOffsets {
    /// `Py_Version` style: `major << 24 | minor << 16 | micro << 8` (3.10: micro 0, unknown).
    pub version: u64,
    /// Absolute address of `_PyRuntime` in the target.
    pub runtime_addr: u64,
    /// Absolute address of `PyCode_Type`: a frame's code pointer must point at an object of
    /// this type (3.13 shim frames hold `None`), or [`ABSENT`] when the symbol is not found.
    pub code_type_addr: u64,
    /// Offset of `_Py_tss_tstate` inside the module's TLS block (3.12+, from `.symtab`), or
    /// [`ABSENT`] (3.10/3.11, stripped binaries). Needs the module's TLS block address too.
    pub tls_tstate: u64,

    /// `_PyRuntimeState.interpreters.head`.
    pub runtime_interpreters_head: u64,
    /// `_PyRuntimeState.gilstate.tstate_current` (3.10/3.11: the thread holding the GIL).
    pub runtime_tstate_current: u64,
    /// `_PyRuntimeState.main_thread` (a `pthread_t`, like `PyThreadState.thread_id`).
    pub runtime_main_thread: u64,
    /// `PyInterpreterState.next`.
    pub interp_next: u64,
    /// `PyInterpreterState.threads.head` (3.10: `tstate_head`).
    pub interp_threads_head: u64,

    /// `PyThreadState.next`.
    pub tstate_next: u64,
    /// `PyThreadState.thread_id`: `pthread_self()`, which is the thread's fsbase on x86-64 glibc.
    pub tstate_thread_id: u64,
    /// `PyThreadState.native_thread_id` (kernel tid, 3.11+).
    pub tstate_native_thread_id: u64,
    /// 3.10: `frame` (innermost `PyFrameObject*`); 3.11/3.12: `cframe` (`_PyCFrame*`, then
    /// `cframe_current_frame`); 3.13: `current_frame` (`_PyInterpreterFrame*`).
    pub tstate_frame: u64,
    /// `_PyCFrame.current_frame` (3.11/3.12).
    pub cframe_current_frame: u64,

    /// 3.10 `f_code`, 3.11/3.12 `f_code`, 3.13 `f_executable`.
    pub frame_code: u64,
    /// 3.10 `f_back`, 3.11+ `previous`.
    pub frame_previous: u64,
    /// 3.10 `f_lasti`, 3.11/3.12 `prev_instr`, 3.13 `instr_ptr`; see `frame_instr_kind`.
    pub frame_instr: u64,
    /// One of [`instr_kind`].
    pub frame_instr_kind: u64,
    /// `_PyInterpreterFrame.owner` (one byte, 3.11+).
    pub frame_owner: u64,
    /// `FRAME_OWNED_BY_CSTACK`: entry shim frames without Python code, to skip (3.12+).
    pub owner_cstack: u64,

    /// `PyCodeObject.co_qualname` (3.11+; 3.10 has only `co_name`, the same offset here).
    pub code_qualname: u64,
    /// `PyCodeObject.co_name`.
    pub code_name: u64,
    /// `PyCodeObject.co_filename`.
    pub code_filename: u64,
    /// `PyCodeObject.co_firstlineno` (an `int`).
    pub code_firstlineno: u64,
    /// `PyCodeObject.co_linetable` (a `bytes` object).
    pub code_linetable: u64,
    /// `PyCodeObject.co_code_adaptive`, where the bytecode starts inside the code object (3.11+).
    pub code_code_adaptive: u64,

    /// `PyObject.ob_type`.
    pub object_type: u64,
    /// `PyVarObject.ob_size` (length of a `bytes` object).
    pub var_size: u64,
    /// `PyBytesObject.ob_sval`.
    pub bytes_data: u64,
    /// `PyASCIIObject.length`.
    pub unicode_length: u64,
    /// `PyASCIIObject.state` (bit field: kind bits 2-4, compact bit 5, ascii bit 6).
    pub unicode_state: u64,
    /// `sizeof(PyASCIIObject)`: characters of a compact ASCII string follow it.
    pub unicode_ascii_data: u64,
    /// `sizeof(PyCompactUnicodeObject)`: characters of other compact strings follow it.
    pub unicode_compact_data: u64,
}

const _: () = assert!(size_of::<PythonOffsets>() == 8 * 33);

/// Python frames recorded per event.
pub const MAX_PY_FRAMES: usize = 16;

/// One recorded Python frame: the code object and the bytecode byte offset in it; user space
/// symbolizes it. Events carry them after their stack, innermost first, their number in
/// `stack_flags` (`PY_FRAMES_SHIFT`).
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct PyRawFrame {
    pub code: u64,
    pub offset: u64,
}

/// `stack_flags >> PY_FRAMES_SHIFT & PY_FRAMES_MASK`: Python frames after the stack.
pub const PY_FRAMES_SHIFT: u16 = 8;
pub const PY_FRAMES_MASK: u16 = 0x1f;

const _: () = assert!(MAX_PY_FRAMES as u16 <= PY_FRAMES_MASK);
const _: () = assert!(size_of::<PyRawFrame>() == 16);

#[cfg(feature = "user")]
// SAFETY: #[repr(C)] and only u64 fields, so no padding bytes.
unsafe impl aya::Pod for PythonOffsets {}
