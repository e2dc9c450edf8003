//! CPython frame walker for BPF: (code object, bytecode byte offset) of the innermost Python
//! frames of the current thread, given the target's `PythonOffsets` (filled by user space,
//! `alloctrace::python::detect`). docs/python-frames.md says how.

use aya_ebpf::helpers::bpf_probe_read_user;
use tracer_common::python::{ABSENT, MAX_PY_FRAMES, PyRawFrame, PythonOffsets, instr_kind};

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

/// The `PyThreadState` of the current thread in the main interpreter: matched by kernel `tid`
/// (3.11+ `native_thread_id`), with or without the GIL held; on 3.10 the thread holding the GIL
/// (`gilstate.tstate_current`), which is the allocating thread while it runs Python code.
#[inline(always)]
pub fn find_tstate(o: &PythonOffsets, tid: u32) -> Option<u64> {
    if o.tstate_native_thread_id == ABSENT {
        if o.runtime_tstate_current == ABSENT {
            return None;
        }
        let t = read_u64(o.runtime_addr.wrapping_add(o.runtime_tstate_current))?;
        return (t != 0).then_some(t);
    }
    let interp = read_u64(o.runtime_addr.wrapping_add(o.runtime_interpreters_head))?;
    if interp == 0 {
        return None;
    }
    let mut t = read_u64(interp.wrapping_add(o.interp_threads_head))?;
    for _ in 0..MAX_PY_THREADS {
        if t == 0 {
            return None;
        }
        if read_u32(t.wrapping_add(o.tstate_native_thread_id))? == tid {
            return Some(t);
        }
        t = read_u64(t.wrapping_add(o.tstate_next))?;
    }
    None
}

/// Fills `out` with the innermost frames of `tstate`, innermost first; returns how many. Entry
/// shims (3.12+ `FRAME_OWNED_BY_CSTACK`, 3.13 `None` executables) are skipped; a failed read
/// ends the walk with what was read so far.
#[inline(always)]
pub fn walk(o: &PythonOffsets, tstate: u64, out: &mut [PyRawFrame; MAX_PY_FRAMES]) -> usize {
    let Some(mut f) = read_u64(tstate.wrapping_add(o.tstate_frame)) else {
        return 0;
    };
    if o.cframe_current_frame != ABSENT && f != 0 {
        match read_u64(f.wrapping_add(o.cframe_current_frame)) {
            Some(cur) => f = cur,
            None => return 0,
        }
    }
    let mut n = 0;
    // Shim frames take loop turns too (a few per stack).
    for _ in 0..MAX_PY_FRAMES + 4 {
        if f == 0 || n >= MAX_PY_FRAMES {
            break;
        }
        let Some(prev) = read_u64(f.wrapping_add(o.frame_previous)) else {
            break;
        };
        if o.frame_owner != ABSENT
            && read_u8(f.wrapping_add(o.frame_owner)).map(u64::from) == Some(o.owner_cstack)
        {
            f = prev;
            continue;
        }
        let Some(code) = read_u64(f.wrapping_add(o.frame_code)) else {
            break;
        };
        let is_code = code != 0
            && (o.code_type_addr == ABSENT
                || read_u64(code.wrapping_add(o.object_type)) == Some(o.code_type_addr));
        if is_code {
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
            out[n] = PyRawFrame { code, offset };
            n += 1;
        }
        f = prev;
    }
    n
}
