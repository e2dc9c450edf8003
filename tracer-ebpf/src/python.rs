//! CPython frame walker for BPF: (code object, bytecode byte offset) of the innermost Python
//! frames of the current thread, given the target's `PythonOffsets` (filled by user space,
//! `alloctrace::python::detect`). docs/python-frames.md says how.

use core::mem::size_of;

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
        n: 0,
        out,
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
    let Some(prev) = read_u64(f.wrapping_add(o.frame_previous)) else {
        return 1;
    };
    state.frame = prev;
    if o.frame_owner != ABSENT
        && read_u8(f.wrapping_add(o.frame_owner)).map(u64::from) == Some(o.owner_cstack)
    {
        return 0;
    }
    let Some(code) = read_u64(f.wrapping_add(o.frame_code)) else {
        return 1;
    };
    let is_code = code != 0
        && (o.code_type_addr == ABSENT
            || read_u64(code.wrapping_add(o.object_type)) == Some(o.code_type_addr));
    if !is_code {
        return 0;
    }
    let offset = if o.frame_instr_kind == instr_kind::LASTI_CODE_UNITS {
        match read_u32(f.wrapping_add(o.frame_instr)) {
            Some(lasti) if (lasti as i32) > 0 => u64::from(lasti) * 2,
            _ => 0,
        }
    } else {
        read_u64(f.wrapping_add(o.frame_instr))
            .unwrap_or(0)
            .saturating_sub(code.wrapping_add(o.code_code_adaptive))
    };
    // SAFETY: `out` outlives the loop; `n` is below MAX_PY_FRAMES.
    unsafe { (*state.out)[n] = PyRawFrame { code, offset } };
    state.n += 1;
    0
}
