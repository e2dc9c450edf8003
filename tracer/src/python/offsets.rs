//! The layout of each supported CPython version (offsets measured against its headers), and
//! 3.13's own published layout laid over it.

pub use tracer_common::python::{ABSENT, PythonOffsets, instr_kind};

use super::{PythonError, Result};

/// glibc x86-64 `struct pthread` → `tid`: maps 3.10's `thread_id` (a `pthread_t`) to the kernel
/// tid, since 3.10 has no `native_thread_id`. Tests check it against 3.11+'s `native_thread_id`.
pub const GLIBC_PTHREAD_TID: u64 = 0x2d0;

/// A CPython version; `micro` is 0 where the binary does not say (3.10 has no `Py_Version`).
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct PyVersion {
    pub major: u32,
    pub minor: u32,
    pub micro: u32,
}

impl PyVersion {
    /// From `Py_Version` / `PY_VERSION_HEX` (`0x030b07f0` is 3.11.7 final).
    pub fn from_hex(hex: u32) -> PyVersion {
        PyVersion {
            major: hex >> 24,
            minor: (hex >> 16) & 0xff,
            micro: (hex >> 8) & 0xff,
        }
    }

    fn hex(self) -> u64 {
        u64::from(self.major << 24 | self.minor << 16 | self.micro << 8)
    }
}

impl std::fmt::Display for PyVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.micro)
    }
}

/// The layout of `version` with the process-specific addresses left [`ABSENT`].
pub fn offsets_for(version: PyVersion) -> Result<PythonOffsets> {
    const A: u64 = ABSENT;
    // Per minor: runtime interpreters.head, gilstate.tstate_current, main_thread; interp next,
    // threads.head; tstate next, thread_id, native_thread_id, frame/cframe/current_frame,
    // cframe.current_frame; frame code, previous, instr, owner, cstack owner value; code
    // qualname, name, filename, firstlineno, linetable, co_code_adaptive; sizeof(PyASCIIObject),
    // sizeof(PyCompactUnicodeObject).
    #[rustfmt::skip]
    let t: [u64; 23] = match (version.major, version.minor) {
        (3, 10) => [32, 568, 72, 0, 8, 8, 176, A, 24, A, 32, 24, 96, A, A, 112, 112, 104, 40, 120, A, 48, 72],
        (3, 11) => [40, 576, 80, 0, 16, 8, 152, 160, 56, 8, 32, 48, 56, 69, A, 128, 120, 112, 72, 136, 184, 48, 72],
        (3, 12) => [40, A, 64, 0, 72, 8, 136, 144, 56, 0, 0, 8, 56, 70, 3, 128, 120, 112, 68, 136, 192, 40, 56],
        (3, 13) => [632, A, 656, 7264, 7344, 8, 152, 160, 72, A, 0, 8, 56, 70, 3, 128, 120, 112, 68, 136, 200, 40, 56],
        (major, minor) => return Err(PythonError::Unsupported(major, minor)),
    };
    Ok(PythonOffsets {
        version: version.hex(),
        runtime_addr: A,
        code_type_addr: A,
        tls_tstate: A,
        runtime_interpreters_head: t[0],
        runtime_tstate_current: t[1],
        runtime_main_thread: t[2],
        interp_next: t[3],
        interp_threads_head: t[4],
        tstate_next: t[5],
        tstate_thread_id: t[6],
        tstate_native_thread_id: t[7],
        tstate_frame: t[8],
        cframe_current_frame: t[9],
        frame_code: t[10],
        frame_previous: t[11],
        frame_instr: t[12],
        frame_instr_kind: if version.minor == 10 {
            instr_kind::LASTI_CODE_UNITS
        } else {
            instr_kind::POINTER
        },
        frame_owner: t[13],
        owner_cstack: t[14],
        code_qualname: t[15],
        code_name: t[16],
        code_filename: t[17],
        code_firstlineno: t[18],
        code_linetable: t[19],
        code_code_adaptive: t[20],
        object_type: 8,
        var_size: 16,
        bytes_data: 32,
        unicode_length: 16,
        unicode_state: 32,
        unicode_ascii_data: t[21],
        unicode_compact_data: t[22],
    })
}

/// Overlays 3.13's own `_PyRuntime.debug_offsets` (`_Py_DebugOffsets`, read as `u64` words) on
/// the table, since the target's word beats a table measured on another build. `None` when the
/// cookie or version does not match, so the table stays.
pub fn apply_debug_offsets(table: &PythonOffsets, words: &[u64]) -> Option<PythonOffsets> {
    // Word indices of _Py_DebugOffsets in 3.13 (Include/internal/pycore_runtime.h): cookie 0,
    // version 1, free_threaded 2, runtime_state 3.., interpreter_state 6.., thread_state 19..,
    // interpreter_frame 28.., code_object 34.., pyobject 44...
    if words.len() < 46 || words[0].to_le_bytes() != *b"xdebugpy" {
        return None;
    }
    if words[1] >> 16 != table.version >> 16 {
        return None;
    }
    Some(PythonOffsets {
        runtime_interpreters_head: words[5],
        interp_next: words[8],
        interp_threads_head: words[9],
        tstate_next: words[21],
        tstate_frame: words[23],
        tstate_thread_id: words[24],
        tstate_native_thread_id: words[25],
        frame_previous: words[29],
        frame_code: words[30],
        frame_instr: words[31],
        frame_owner: words[33],
        code_filename: words[35],
        code_name: words[36],
        code_qualname: words[37],
        code_linetable: words[38],
        code_firstlineno: words[39],
        code_code_adaptive: words[43],
        object_type: words[45],
        ..*table
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsupported_versions_error() {
        for minor in [9, 14] {
            let e = offsets_for(PyVersion {
                major: 3,
                minor,
                micro: 0,
            })
            .unwrap_err();
            assert_eq!(
                e.to_string(),
                format!("CPython 3.{minor} is not supported (supported: 3.10 to 3.13)")
            );
        }
    }

    #[test]
    fn debug_offsets_need_the_cookie() {
        let table = offsets_for(PyVersion {
            major: 3,
            minor: 13,
            micro: 0,
        })
        .unwrap();
        let mut words = vec![0u64; 46];
        assert_eq!(apply_debug_offsets(&table, &words), None);
        words[0] = u64::from_le_bytes(*b"xdebugpy");
        words[1] = 0x030d_00f0;
        words[9] = 1234;
        assert_eq!(
            apply_debug_offsets(&table, &words)
                .unwrap()
                .interp_threads_head,
            1234
        );
        words[1] = 0x030e_00f0;
        assert_eq!(apply_debug_offsets(&table, &words), None);
    }
}
