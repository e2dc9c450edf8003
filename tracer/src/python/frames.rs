//! Reading a live interpreter from outside: its thread states and frame chains through
//! /proc/PID/mem ([`ProcMem`]), and code objects turned into function, file and line.

use std::{collections::HashMap, fs::File, os::unix::fs::FileExt};

use super::{
    PythonError, Result,
    detect::{Interpreter, detect},
    linetable::{LineRange, decode_line_table_310, decode_location_table, line_at, line_ranges},
    offsets::{ABSENT, GLIBC_PTHREAD_TID, PythonOffsets, instr_kind},
};

/// Longest Python stack read; deeper frames are cut (also guards against cycles in bad memory).
pub const MAX_DEPTH: usize = 1024;
/// Most interpreters and thread states followed per list (guards against cycles).
const MAX_LIST: usize = 4096;
/// Largest string or line table read out of the target (bad pointers give absurd lengths).
const MAX_OBJECT_BYTES: u64 = 1 << 20;

/// Reads the target's memory through /proc/PID/mem (needs ptrace-level access to the target).
pub struct ProcMem {
    pid: u32,
    file: File,
}

impl ProcMem {
    pub fn open(pid: u32) -> Result<ProcMem> {
        let file = File::open(format!("/proc/{pid}/mem")).map_err(|err| PythonError::Proc {
            pid,
            what: "open /proc/PID/mem".into(),
            err,
        })?;
        Ok(ProcMem { pid, file })
    }

    pub fn read(&self, addr: u64, buf: &mut [u8]) -> Result<()> {
        self.file
            .read_exact_at(buf, addr)
            .map_err(|err| PythonError::Read {
                pid: self.pid,
                addr,
                len: buf.len(),
                err,
            })
    }

    pub fn u64(&self, addr: u64) -> Result<u64> {
        let mut b = [0; 8];
        self.read(addr, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    pub fn u32(&self, addr: u64) -> Result<u32> {
        let mut b = [0; 4];
        self.read(addr, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    pub fn u8(&self, addr: u64) -> Result<u8> {
        let mut b = [0; 1];
        self.read(addr, &mut b)?;
        Ok(b[0])
    }

    pub fn bytes(&self, addr: u64, len: u64) -> Result<Vec<u8>> {
        let mut v = vec![0; len as usize];
        self.read(addr, &mut v)?;
        Ok(v)
    }
}

/// One `PyThreadState` of the target.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct PyThread {
    /// Address of the `PyThreadState`.
    pub tstate: u64,
    /// `pthread_self()` of the thread (its fsbase on x86-64 glibc).
    pub thread_id: u64,
    /// Kernel tid: `native_thread_id` (3.11+), else read from glibc's `struct pthread`.
    pub native_thread_id: Option<u32>,
}

/// What the BPF walker records per frame: the code object and the bytecode byte offset in it.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct RawFrame {
    pub code: u64,
    pub instr_offset: u64,
}

/// A symbolized Python frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PyFrame {
    /// `co_qualname` (3.11+) or `co_name` (3.10).
    pub function: String,
    pub file: String,
    /// `None` for instructions without a line (artificial code).
    pub line: Option<u32>,
}

impl std::fmt::Display for PyFrame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.line {
            Some(l) => write!(f, "{} ({}:{l})", self.function, self.file),
            None => write!(f, "{} ({})", self.function, self.file),
        }
    }
}

/// A live CPython process: reads thread states and frames, symbolizes with a cache.
pub struct PythonProcess {
    interp: Interpreter,
    mem: ProcMem,
    symbolizer: Symbolizer,
}

impl PythonProcess {
    pub fn attach(pid: u32) -> Result<PythonProcess> {
        let interp = detect(pid)?;
        let mem = ProcMem::open(pid)?;
        let symbolizer = Symbolizer::new(interp.offsets);
        Ok(PythonProcess {
            interp,
            mem,
            symbolizer,
        })
    }

    pub fn interpreter(&self) -> &Interpreter {
        &self.interp
    }

    fn corrupt(&self, msg: impl Into<String>) -> PythonError {
        PythonError::Corrupt {
            pid: self.interp.pid,
            msg: msg.into(),
        }
    }

    /// Every thread state of every interpreter.
    pub fn threads(&self) -> Result<Vec<PyThread>> {
        let o = &self.interp.offsets;
        let m = &self.mem;
        let main_thread = m.u64(o.runtime_addr + o.runtime_main_thread)?;
        let mut out = Vec::new();
        let mut interp = m.u64(o.runtime_addr + o.runtime_interpreters_head)?;
        let mut interps = 0;
        while interp != 0 {
            interps += 1;
            if interps > MAX_LIST {
                return Err(self.corrupt("interpreter list does not end"));
            }
            let mut t = m.u64(interp + o.interp_threads_head)?;
            while t != 0 {
                if out.len() >= MAX_LIST {
                    return Err(self.corrupt("thread state list does not end"));
                }
                let thread_id = m.u64(t + o.tstate_thread_id)?;
                let native_thread_id = if o.tstate_native_thread_id != ABSENT {
                    Some(m.u32(t + o.tstate_native_thread_id)?)
                } else if thread_id == main_thread {
                    Some(self.interp.pid)
                } else {
                    m.u32(thread_id.wrapping_add(GLIBC_PTHREAD_TID)).ok()
                };
                out.push(PyThread {
                    tstate: t,
                    thread_id,
                    native_thread_id,
                });
                t = m.u64(t + o.tstate_next)?;
            }
            interp = m.u64(interp + o.interp_next)?;
        }
        Ok(out)
    }

    /// The thread state of kernel thread `tid`.
    pub fn thread(&self, tid: u32) -> Result<PyThread> {
        self.threads()?
            .into_iter()
            .find(|t| t.native_thread_id == Some(tid))
            .ok_or(PythonError::NoThread {
                pid: self.interp.pid,
                tid,
            })
    }

    /// The frames of a thread state, innermost first, as the BPF walker records them.
    pub fn raw_stack(&self, tstate: u64) -> Result<Vec<RawFrame>> {
        let o = &self.interp.offsets;
        let m = &self.mem;
        let mut frame = m.u64(tstate + o.tstate_frame)?;
        if o.cframe_current_frame != ABSENT && frame != 0 {
            frame = m.u64(frame + o.cframe_current_frame)?;
        }
        let mut out = Vec::new();
        let mut seen = 0;
        while frame != 0 && out.len() < MAX_DEPTH {
            seen += 1;
            if seen > 4 * MAX_DEPTH {
                return Err(self.corrupt("frame chain does not end"));
            }
            let previous = m.u64(frame + o.frame_previous)?;
            if o.frame_owner != ABSENT && u64::from(m.u8(frame + o.frame_owner)?) == o.owner_cstack
            {
                frame = previous;
                continue;
            }
            let code = m.u64(frame + o.frame_code)?;
            let is_code = code != 0
                && (o.code_type_addr == ABSENT || m.u64(code + o.object_type)? == o.code_type_addr);
            if is_code {
                let instr_offset = if o.frame_instr_kind == instr_kind::LASTI_CODE_UNITS {
                    let lasti = m.u32(frame + o.frame_instr)? as i32;
                    u64::try_from(lasti).unwrap_or(0) * 2
                } else {
                    let ip = m.u64(frame + o.frame_instr)?;
                    // Before its first instruction a 3.11/3.12 frame points one unit before.
                    ip.saturating_sub(code + o.code_code_adaptive)
                };
                out.push(RawFrame { code, instr_offset });
            }
            frame = previous;
        }
        Ok(out)
    }

    /// Symbolizes one recorded frame (cached per code object).
    pub fn symbolize(&mut self, frame: RawFrame) -> Result<PyFrame> {
        self.symbolizer.symbolize(&self.mem, frame)
    }

    /// The Python stack of kernel thread `tid` right now, innermost first (like `py-spy dump`).
    pub fn stack(&mut self, tid: u32) -> Result<Vec<PyFrame>> {
        let t = self.thread(tid)?;
        let raw = self.raw_stack(t.tstate)?;
        raw.into_iter().map(|f| self.symbolize(f)).collect()
    }
}

/// What a code object says about itself, read once.
#[derive(Clone, Debug)]
struct CodeInfo {
    function: String,
    file: String,
    lines: Vec<LineRange>,
}

/// Turns (code object, offset) into [`PyFrame`]s, caching code objects by address. A freed code
/// object's address can be reused; [`Symbolizer::clear`] drops the cache (e.g. on exec).
pub struct Symbolizer {
    offsets: PythonOffsets,
    cache: HashMap<u64, CodeInfo>,
}

impl Symbolizer {
    pub fn new(offsets: PythonOffsets) -> Symbolizer {
        Symbolizer {
            offsets,
            cache: HashMap::new(),
        }
    }

    pub fn clear(&mut self) {
        self.cache.clear();
    }

    pub fn symbolize(&mut self, mem: &ProcMem, frame: RawFrame) -> Result<PyFrame> {
        let info = match self.cache.get(&frame.code) {
            Some(info) => info,
            None => {
                let info = read_code(mem, &self.offsets, frame.code)?;
                self.cache.entry(frame.code).or_insert(info)
            }
        };
        Ok(PyFrame {
            function: info.function.clone(),
            file: info.file.clone(),
            line: line_at(&info.lines, frame.instr_offset).and_then(|l| u32::try_from(l).ok()),
        })
    }
}

fn read_code(mem: &ProcMem, o: &PythonOffsets, code: u64) -> Result<CodeInfo> {
    let function = read_str(mem, o, mem.u64(code + o.code_qualname)?)?;
    let file = read_str(mem, o, mem.u64(code + o.code_filename)?)?;
    let first = mem.u32(code + o.code_firstlineno)? as i32;
    let table = read_bytes_object(mem, o, mem.u64(code + o.code_linetable)?)?;
    let lines = if o.frame_instr_kind == instr_kind::LASTI_CODE_UNITS {
        decode_line_table_310(&table, first)
    } else {
        line_ranges(&decode_location_table(&table, first))
    };
    Ok(CodeInfo {
        function,
        file,
        lines,
    })
}

fn read_bytes_object(mem: &ProcMem, o: &PythonOffsets, obj: u64) -> Result<Vec<u8>> {
    let len = mem.u64(obj + o.var_size)?;
    if len > MAX_OBJECT_BYTES {
        return Err(PythonError::Corrupt {
            pid: mem.pid,
            msg: format!("bytes object at {obj:#x} claims {len} bytes"),
        });
    }
    mem.bytes(obj + o.bytes_data, len)
}

/// Decodes a compact `str` (ASCII, or 1/2/4-byte kind); legacy non-compact strings never hold
/// code object names.
pub fn read_str(mem: &ProcMem, o: &PythonOffsets, obj: u64) -> Result<String> {
    let corrupt = |msg: String| PythonError::Corrupt { pid: mem.pid, msg };
    let len = mem.u64(obj + o.unicode_length)?;
    let state = mem.u32(obj + o.unicode_state)?;
    let kind = u64::from((state >> 2) & 7);
    let compact = state & (1 << 5) != 0;
    let ascii = state & (1 << 6) != 0;
    if !compact || !matches!(kind, 1 | 2 | 4) {
        return Err(corrupt(format!(
            "str at {obj:#x} is not a compact string (state {state:#x})"
        )));
    }
    if len.saturating_mul(kind) > MAX_OBJECT_BYTES {
        return Err(corrupt(format!("str at {obj:#x} claims {len} characters")));
    }
    let data = if ascii {
        o.unicode_ascii_data
    } else {
        o.unicode_compact_data
    };
    let raw = mem.bytes(obj + data, len * kind)?;
    Ok(decode_str(&raw, kind as usize))
}

/// Characters of a compact string of `kind` bytes per character (PEP 393).
pub fn decode_str(raw: &[u8], kind: usize) -> String {
    match kind {
        1 => raw.iter().map(|&b| char::from(b)).collect(),
        2 => char::decode_utf16(
            raw.chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]])),
        )
        .map(|c| c.unwrap_or(char::REPLACEMENT_CHARACTER))
        .collect(),
        _ => raw
            .chunks_exact(4)
            .map(|c| {
                char::from_u32(u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .unwrap_or(char::REPLACEMENT_CHARACTER)
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn string_kinds() {
        assert_eq!(decode_str(b"caf\xe9", 1), "café");
        assert_eq!(decode_str(&[0x3b, 0x04, 0x3e, 0x04], 2), "ло");
        assert_eq!(decode_str(&0x1f600u32.to_le_bytes(), 4), "😀");
    }
}
