//! CPython frame walker for BPF: (code object, bytecode byte offset) of the innermost Python
//! frames of the current thread, given the target's `PythonOffsets` (filled by user space,
//! `alloctrace::python::detect`). docs/python-frames.md says how.

use core::mem::{MaybeUninit, size_of};

use aya_ebpf::helpers::{bpf_get_current_pid_tgid, bpf_probe_read_user};
use tracer_common::{
    PY_FRAMES_AT_MOST, StackArea,
    python::{ABSENT, MAX_PY_FRAMES, PY_FRAMES_SHIFT, PyRawFrame, PythonOffsets, instr_kind},
};

use crate::{
    diag::{self, PythonMiss},
    maps::{PY_OFFSETS, PYTHON_FRAMES, global},
};

/// Thread states examined to find the current thread's (bounded for the verifier).
pub const MAX_PY_THREADS: usize = 16;

#[inline(always)]
fn read_u64(addr: u64) -> Option<u64> {
    // SAFETY: bpf_probe_read_user checks the user address.
    unsafe { bpf_probe_read_user(addr as *const u64) }.ok()
}

#[inline(always)]
fn read_u32(addr: u64) -> Option<u32> {
    // SAFETY: bpf_probe_read_user checks the user address.
    unsafe { bpf_probe_read_user(addr as *const u32) }.ok()
}

#[inline(always)]
fn read_u8(addr: u64) -> Option<u8> {
    // SAFETY: bpf_probe_read_user checks the user address.
    unsafe { bpf_probe_read_user(addr as *const u8) }.ok()
}

/// Appends the current thread's Python frames (if it runs CPython) at byte `at` of the stack
/// area; their number goes into `flags`. Returns the bytes added.
#[inline(always)]
pub fn append_frames(area: &mut StackArea, at: usize, flags: &mut u16) -> usize {
    if global(&PYTHON_FRAMES) == 0 || at > PY_FRAMES_AT_MOST || !at.is_multiple_of(8) {
        return 0;
    }
    let key = bpf_get_current_pid_tgid();
    // SAFETY: the value is only read while this program runs.
    let Some(offsets) = (unsafe { PY_OFFSETS.get((key >> 32) as u32) }) else {
        return 0;
    };
    let tstate = match find_tstate(offsets, key as u32) {
        Ok(tstate) => tstate,
        Err(why) => {
            diag::python_skipped(why);
            return 0;
        }
    };
    // SAFETY: `at` is 8-byte aligned (stacks are whole words) and leaves room for the frames.
    let out = unsafe {
        &mut *area
            .as_mut_ptr()
            .cast::<u8>()
            .add(at)
            .cast::<[PyRawFrame; MAX_PY_FRAMES]>()
    };
    let n = walk(offsets, tstate, out);
    if n == 0 {
        diag::python_skipped(PythonMiss::NoFrame);
    }
    *flags |= (n as u16) << PY_FRAMES_SHIFT;
    n * size_of::<PyRawFrame>()
}

/// The `PyThreadState` of the current thread in the main interpreter: matched by kernel `tid`
/// (3.11+ `native_thread_id`), with or without the GIL held; on 3.10 the thread holding the GIL
/// (`gilstate.tstate_current`), which is the allocating thread while it runs Python code.
#[inline(always)]
fn find_tstate(o: &PythonOffsets, tid: u32) -> Result<u64, PythonMiss> {
    if o.tstate_native_thread_id == ABSENT {
        if o.runtime_tstate_current == ABSENT {
            return Err(PythonMiss::NoThreadState);
        }
        let t = read_u64(o.runtime_addr.wrapping_add(o.runtime_tstate_current))
            .ok_or(PythonMiss::Unreadable)?;
        return if t != 0 {
            Ok(t)
        } else {
            Err(PythonMiss::NoGilHolder)
        };
    }
    let interp = read_u64(o.runtime_addr.wrapping_add(o.runtime_interpreters_head))
        .ok_or(PythonMiss::Unreadable)?;
    if interp == 0 {
        return Err(PythonMiss::NoThreadState);
    }
    let mut t =
        read_u64(interp.wrapping_add(o.interp_threads_head)).ok_or(PythonMiss::Unreadable)?;
    for _ in 0..MAX_PY_THREADS {
        if t == 0 {
            return Err(PythonMiss::NoThreadState);
        }
        let thread_id =
            read_u32(t.wrapping_add(o.tstate_native_thread_id)).ok_or(PythonMiss::Unreadable)?;
        if thread_id == tid {
            return Ok(t);
        }
        t = read_u64(t.wrapping_add(o.tstate_next)).ok_or(PythonMiss::Unreadable)?;
    }
    Err(if t == 0 {
        PythonMiss::NoThreadState
    } else {
        PythonMiss::TooManyThreads
    })
}

/// The frame walk's state, passed to each `bpf_loop` turn (the verifier checks one turn once,
/// instead of every turn on every path to the walk).
#[repr(C)]
struct Walk {
    offsets: *const PythonOffsets,
    frame: u64,
    n: u64,
    out: *mut [PyRawFrame; MAX_PY_FRAMES],
    /// Bytes of a frame that hold the fields the walk reads (`frame_span`; 0: they are read
    /// one at a time), and how many of them `chunk` holds for the current frame.
    span: u64,
    chunk_len: u64,
    /// The current frame's first `chunk_len` bytes, read at once. One word more than a read can
    /// fill, so that a field the verifier sees inside the read is inside the array.
    chunk: MaybeUninit<[u64; FRAME_CHUNK_WORDS + 1]>,
}

/// A frame's bytes read at once: the fields the walk reads lie in its first 72 (3.11 to
/// 3.13) or 100 (3.10) bytes.
const FRAME_CHUNK_WORDS: usize = 16;

/// Bytes from a frame's start to the end of the last field the walk reads, rounded up to a
/// word: read at once, one read a frame instead of four. 0 when a field lies further.
#[inline(always)]
fn frame_span(o: &PythonOffsets) -> u64 {
    let end = |offset: u64, size: u64| {
        if offset == ABSENT {
            0
        } else {
            offset.saturating_add(size)
        }
    };
    let instr = if o.frame_instr_kind == instr_kind::LASTI_CODE_UNITS {
        4
    } else {
        8
    };
    let last = end(o.frame_previous, 8)
        .max(end(o.frame_code, 8))
        .max(end(o.frame_instr, instr))
        .max(end(o.frame_owner, 1));
    let span = last.next_multiple_of(8);
    if span > 8 * FRAME_CHUNK_WORDS as u64 {
        0
    } else {
        span
    }
}

/// Fills `out` with the innermost frames of `tstate`, innermost first; returns how many. Entry
/// shims (3.12+ `FRAME_OWNED_BY_CSTACK`, 3.13 `None` executables) are skipped; a failed read
/// ends the walk with what was read so far.
#[inline(always)]
fn walk(o: &PythonOffsets, tstate: u64, out: &mut [PyRawFrame; MAX_PY_FRAMES]) -> usize {
    let Some(mut f) = read_u64(tstate.wrapping_add(o.tstate_frame)) else {
        return 0;
    };
    if o.cframe_current_frame != ABSENT && f != 0 {
        match read_u64(f.wrapping_add(o.cframe_current_frame)) {
            Some(cur) => f = cur,
            None => return 0,
        }
    }
    let mut state = Walk {
        offsets: o,
        frame: f,
        // Laundered: known exactly, the count would make every turn a state of its own, and
        // the verifier would walk the turn's paths once per frame.
        n: crate::stack::forget_value(0) as u64,
        out,
        span: frame_span(o),
        chunk_len: 0,
        chunk: MaybeUninit::uninit(),
    };
    // Shim frames take loop turns too (a few per stack).
    // SAFETY: `walk_turn` has the callback's signature; `state` outlives the call.
    unsafe {
        aya_ebpf::helpers::generated::bpf_loop(
            (MAX_PY_FRAMES + 4) as u32,
            walk_turn as *mut core::ffi::c_void,
            (&mut state as *mut Walk).cast(),
            0,
        )
    };
    (state.n as usize).min(MAX_PY_FRAMES)
}

/// One frame of the walk; 1 stops it.
#[inline(never)]
extern "C" fn walk_turn(_index: u32, ctx: *mut core::ffi::c_void) -> i64 {
    // SAFETY: `ctx` is the `Walk` that `walk` passed to bpf_loop.
    let state = unsafe { &mut *ctx.cast::<Walk>() };
    // SAFETY: the offsets outlive the loop (a map value of the calling program).
    let o = unsafe { &*state.offsets };
    let f = state.frame;
    let n = state.n as usize;
    if f == 0 || n >= MAX_PY_FRAMES {
        return 1;
    }
    read_frame(state, f);
    let Some(prev) = frame_u64(state, f, o.frame_previous) else {
        return 1;
    };
    state.frame = prev;
    if o.owner_cstack != ABSENT
        && o.frame_owner != ABSENT
        && frame_u8(state, f, o.frame_owner).map(u64::from) == Some(o.owner_cstack)
    {
        return 0;
    }
    let Some(code) = frame_u64(state, f, o.frame_code) else {
        return 1;
    };
    let is_code = code != 0
        && (o.code_type_addr == ABSENT
            || read_u64(code.wrapping_add(o.object_type)) == Some(o.code_type_addr));
    if !is_code {
        return 0;
    }
    let offset = if o.frame_instr_kind == instr_kind::LASTI_CODE_UNITS {
        match frame_u32(state, f, o.frame_instr) {
            Some(lasti) if (lasti as i32) > 0 => u64::from(lasti) * 2,
            _ => 0,
        }
    } else {
        frame_u64(state, f, o.frame_instr)
            .unwrap_or(0)
            .saturating_sub(code.wrapping_add(o.code_code_adaptive))
    };
    // SAFETY: `out` outlives the loop; `n` is below MAX_PY_FRAMES.
    unsafe { (*state.out)[n] = PyRawFrame { code, offset } };
    state.n += 1;
    0
}

/// Reads the first `span` bytes of the frame at `f` into the chunk (none if that read fails:
/// its fields are then read one at a time).
#[inline(always)]
fn read_frame(state: &mut Walk, f: u64) {
    // Bounded where the verifier sees it (`frame_span` never gives more).
    let span = if state.span <= 8 * FRAME_CHUNK_WORDS as u64 {
        state.span
    } else {
        0
    };
    // SAFETY: the chunk holds more than `span` bytes; the helper checks the user address.
    let rc = unsafe {
        aya_ebpf::helpers::generated::bpf_probe_read_user(
            state.chunk.as_mut_ptr().cast(),
            span as u32,
            f as *const core::ffi::c_void,
        )
    };
    state.chunk_len = if span != 0 && rc == 0 { span } else { 0 };
}

/// The chunk's byte `offset` as a pointer to a `T` there, if the chunk holds the whole `T`
/// and `offset` is aligned for it (the verifier wants aligned stack reads).
#[inline(always)]
fn in_chunk<T>(state: &Walk, offset: u64) -> Option<*const T> {
    let size = core::mem::size_of::<T>() as u64;
    if offset >= state.chunk_len || state.chunk_len - offset < size || offset % size != 0 {
        return None;
    }
    // Masked so that the verifier sees it inside the array, and aligned.
    let at = (offset & (8 * FRAME_CHUNK_WORDS as u64 - 1)) & !(size - 1);
    // SAFETY: `at` lies in the bytes the read filled (`chunk_len`).
    Some(unsafe {
        state
            .chunk
            .as_ptr()
            .cast::<u8>()
            .add(at as usize)
            .cast::<T>()
    })
}

/// The frame's word at `offset`: from the chunk, else read.
#[inline(always)]
fn frame_u64(state: &Walk, f: u64, offset: u64) -> Option<u64> {
    match in_chunk::<u64>(state, offset) {
        // SAFETY: inside the chunk's read bytes, aligned.
        Some(p) => Some(unsafe { *p }),
        None => read_u64(f.wrapping_add(offset)),
    }
}

/// The frame's `u32` at `offset`: from the chunk, else read.
#[inline(always)]
fn frame_u32(state: &Walk, f: u64, offset: u64) -> Option<u32> {
    match in_chunk::<u32>(state, offset) {
        // SAFETY: as in `frame_u64`.
        Some(p) => Some(unsafe { *p }),
        None => read_u32(f.wrapping_add(offset)),
    }
}

/// The frame's byte at `offset`: from the chunk, else read.
#[inline(always)]
fn frame_u8(state: &Walk, f: u64, offset: u64) -> Option<u8> {
    match in_chunk::<u8>(state, offset) {
        // SAFETY: as in `frame_u64`.
        Some(p) => Some(unsafe { *p }),
        None => read_u8(f.wrapping_add(offset)),
    }
}
