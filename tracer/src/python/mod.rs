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

use std::{
    collections::HashMap,
    fs::File,
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
};

use object::{Object, ObjectSegment, ObjectSymbol, SymbolKind};
pub use tracer_common::python::{ABSENT, PythonOffsets, instr_kind};

/// Longest Python stack read; deeper frames are cut (also guards against cycles in bad memory).
pub const MAX_DEPTH: usize = 1024;
/// Most interpreters and thread states followed per list (guards against cycles).
const MAX_LIST: usize = 4096;
/// Largest string or line table read out of the target (bad pointers give absurd lengths).
const MAX_OBJECT_BYTES: u64 = 1 << 20;
/// glibc x86-64 `struct pthread` → `tid`: maps 3.10's `thread_id` (a `pthread_t`) to the kernel
/// tid, since 3.10 has no `native_thread_id`. Tests check it against 3.11+'s `native_thread_id`.
pub const GLIBC_PTHREAD_TID: u64 = 0x2d0;

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

/// The interpreter found in a process: which ELF holds `_PyRuntime`, its version and layout.
#[derive(Clone, Debug)]
pub struct Interpreter {
    pub pid: u32,
    /// The mapped libpython3.X.so or python3.X executable, as named in /proc/PID/maps.
    pub path: PathBuf,
    pub version: PyVersion,
    /// Ready for the BPF map: process addresses filled in.
    pub offsets: PythonOffsets,
    /// Whether the layout came from the target's `_Py_DebugOffsets` (3.13+) instead of the table.
    pub from_debug_offsets: bool,
}

/// A file-backed mapping from /proc/PID/maps.
struct FileMap {
    start: u64,
    offset: u64,
    path: String,
}

fn file_maps(pid: u32) -> Result<Vec<FileMap>> {
    let text =
        std::fs::read_to_string(format!("/proc/{pid}/maps")).map_err(|err| PythonError::Proc {
            pid,
            what: "read /proc/PID/maps".into(),
            err,
        })?;
    let mut maps = Vec::new();
    for line in text.lines() {
        let mut f = line.splitn(6, ' ');
        let (Some(range), _, Some(offset), _, _, Some(path)) =
            (f.next(), f.next(), f.next(), f.next(), f.next(), f.next())
        else {
            continue;
        };
        let path = path.trim_start();
        if !path.starts_with('/') {
            continue;
        }
        let start = range
            .split('-')
            .next()
            .and_then(|s| u64::from_str_radix(s, 16).ok());
        let offset = u64::from_str_radix(offset, 16).ok();
        if let (Some(start), Some(offset)) = (start, offset) {
            maps.push(FileMap {
                start,
                offset,
                path: path.trim_end_matches(" (deleted)").to_string(),
            });
        }
    }
    Ok(maps)
}

/// `(minor, is_library)` for `libpython3.X.so…` or `python3.X` file names; `3.Xt`/`3.Xd` builds
/// (free-threaded, debug) have other layouts and are refused by their suffix, as 3.X+1 would be.
fn interpreter_name(path: &str) -> Option<(u32, bool, bool)> {
    let name = path.rsplit('/').next()?;
    let (rest, lib) = if let Some(r) = name.strip_prefix("libpython3.") {
        (r, true)
    } else if let Some(r) = name.strip_prefix("python3.") {
        (r, false)
    } else {
        return None;
    };
    let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
    let minor = digits.parse().ok()?;
    let tail = &rest[digits.len()..];
    let plain = if lib {
        tail.starts_with(".so")
    } else {
        tail.is_empty()
    };
    let variant = !plain && (tail.starts_with('t') || tail.starts_with('d'));
    if !plain && !variant {
        return None;
    }
    Some((minor, lib, variant))
}

/// Finds CPython in `pid` from its mappings and ELF symbols; no configuration involved.
pub fn detect(pid: u32) -> Result<Interpreter> {
    let maps = file_maps(pid)?;
    let mut candidates: Vec<(u32, bool, bool, &str)> = maps
        .iter()
        .filter_map(|m| interpreter_name(&m.path).map(|(v, lib, var)| (v, lib, var, &*m.path)))
        .collect();
    // libpython first: a python3.X executable linked against it has no `_PyRuntime` itself.
    candidates.sort_by_key(|c| !c.1);
    candidates.dedup_by_key(|c| c.3);
    let mut last_err = None;
    for (minor, _, variant, path) in candidates {
        if variant {
            return Err(PythonError::Elf {
                path: path.into(),
                msg: "free-threaded (t) or debug (d) CPython builds are not supported".into(),
            });
        }
        // Refuse by name first: an unsupported version's symbols mean nothing to the table.
        offsets_for(PyVersion {
            major: 3,
            minor,
            micro: 0,
        })?;
        match detect_in(pid, &maps, path, minor) {
            Ok(i) => return Ok(i),
            Err(e) => last_err = Some(e),
        }
    }
    Err(last_err.unwrap_or(PythonError::NotPython(pid)))
}

fn detect_in(pid: u32, maps: &[FileMap], path: &str, minor: u32) -> Result<Interpreter> {
    let elf_err = |msg: String| PythonError::Elf {
        path: path.into(),
        msg,
    };
    // Through the target's root, so that a process in a container reads its own file.
    let on_disk = Path::new(&format!("/proc/{pid}/root")).join(path.trim_start_matches('/'));
    let data = std::fs::read(&on_disk).map_err(|err| PythonError::Proc {
        pid,
        what: format!("read {path}"),
        err,
    })?;
    let elf = object::File::parse(&*data).map_err(|e| elf_err(format!("not an ELF file: {e}")))?;
    let mut runtime = None;
    let mut version_sym = None;
    let mut code_type = None;
    let mut tls_tstate = None;
    for sym in elf.dynamic_symbols().chain(elf.symbols()) {
        match sym.name() {
            Ok("_PyRuntime") => runtime = Some(sym.address()),
            Ok("Py_Version") => version_sym = Some(sym.address()),
            Ok("PyCode_Type") => code_type = Some(sym.address()),
            Ok("_Py_tss_tstate") if sym.kind() == SymbolKind::Tls => {
                tls_tstate = Some(sym.address())
            }
            _ => {}
        }
    }
    let runtime = runtime.ok_or_else(|| elf_err("no _PyRuntime symbol".into()))?;
    let version = match version_sym {
        Some(addr) => {
            let bytes = elf
                .segments()
                .find_map(|s| s.data_range(addr, 4).ok().flatten())
                .ok_or_else(|| elf_err("Py_Version is not in the file".into()))?;
            let hex = u32::from_le_bytes(bytes.try_into().unwrap_or_default());
            PyVersion::from_hex(hex)
        }
        None => PyVersion {
            major: 3,
            minor,
            micro: 0,
        },
    };
    if (version.major, version.minor) != (3, minor) {
        return Err(elf_err(format!(
            "file name says 3.{minor} but Py_Version says {version}"
        )));
    }
    let mut offsets = offsets_for(version)?;

    // Load bias from the first PT_LOAD segment and its mapping at the same page of the file.
    let first = elf
        .segments()
        .min_by_key(|s| s.address())
        .ok_or_else(|| elf_err("no loadable segment".into()))?;
    let page_off = first.file_range().0 & !0xfff;
    let map = maps
        .iter()
        .find(|m| m.path == path && m.offset == page_off)
        .ok_or_else(|| {
            elf_err(format!(
                "offset {page_off:#x} is not mapped in process {pid}"
            ))
        })?;
    let bias = map.start.wrapping_sub(first.address() & !0xfff);

    offsets.runtime_addr = bias.wrapping_add(runtime);
    offsets.code_type_addr = code_type.map_or(ABSENT, |a| bias.wrapping_add(a));
    offsets.tls_tstate = tls_tstate.unwrap_or(ABSENT);
    let mut from_debug_offsets = false;
    if version.minor >= 13 {
        let mem = ProcMem::open(pid)?;
        let raw = mem.bytes(offsets.runtime_addr, 46 * 8)?;
        let words: Vec<u64> = raw
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default()))
            .collect();
        if words.get(2).is_some_and(|&ft| ft != 0) {
            return Err(elf_err(
                "free-threaded CPython builds are not supported".into(),
            ));
        }
        if let Some(o) = apply_debug_offsets(&offsets, &words) {
            offsets = o;
            from_debug_offsets = true;
        }
    }
    Ok(Interpreter {
        pid,
        path: path.into(),
        version,
        offsets,
        from_debug_offsets,
    })
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

// ---- line tables ---------------------------------------------------------------------------

/// Bytecode bytes `[start, end)` that belong to source line `line` (`None`: no line).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct LineRange {
    pub start: u64,
    pub end: u64,
    pub line: Option<i32>,
}

/// One 3.11+ location entry: bytecode bytes `[start, end)` and their source span, as
/// `co_positions()` reports it (`None` where Python says `None`).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Location {
    pub start: u64,
    pub end: u64,
    pub line: Option<i32>,
    pub end_line: Option<i32>,
    pub column: Option<i32>,
    pub end_column: Option<i32>,
}

/// The line of the instruction at byte `offset`.
pub fn line_at(ranges: &[LineRange], offset: u64) -> Option<i32> {
    let i = ranges.partition_point(|r| r.end <= offset);
    ranges
        .get(i)
        .filter(|r| r.start <= offset)
        .and_then(|r| r.line)
}

/// 3.10 `co_linetable`: pairs (byte delta: u8, line delta: i8), line delta -128 = no line;
/// entries with a zero byte delta only move the line (Objects/lnotab_notes.txt).
pub fn decode_line_table_310(table: &[u8], first_line: i32) -> Vec<LineRange> {
    let mut out = Vec::new();
    let (mut start, mut line) = (0u64, first_line);
    for pair in table.chunks_exact(2) {
        let end = start + u64::from(pair[0]);
        let delta = pair[1] as i8;
        let this = if delta == -128 {
            None
        } else {
            line = line.wrapping_add(i32::from(delta));
            Some(line)
        };
        if end > start {
            out.push(LineRange {
                start,
                end,
                line: this,
            });
        }
        start = end;
    }
    out
}

/// 3.11+ `co_linetable` (PEP 657, Objects/locations.md). Each entry starts with a byte with the
/// top bit set: bits 3-6 a code, bits 0-2 the length − 1 in 2-byte code units. Codes 0-9: same
/// line, columns in one more byte; 10-12: line += code − 10, column and end column bytes; 13:
/// line delta (signed varint), no columns; 14: line delta, end line delta, column + 1, end
/// column + 1 (varints); 15: no location. A truncated table ends the decoding.
pub fn decode_location_table(table: &[u8], first_line: i32) -> Vec<Location> {
    let mut out = Vec::new();
    let mut r = Reader { data: table, at: 0 };
    let (mut start, mut line) = (0u64, first_line);
    while let Some(first) = r.byte() {
        if first & 0x80 == 0 {
            break; // not an entry start: corrupt table
        }
        let code = (first >> 3) & 15;
        let end = start + 2 * (u64::from(first & 7) + 1);
        let col = |v: u32| i32::try_from(v).ok().map(|v| v - 1).filter(|&v| v >= 0);
        let loc = match code {
            15 => Some((None, None, None, None)),
            14 => (|| {
                line = line.wrapping_add(r.svarint()?);
                let end_line = line.wrapping_add(r.varint()? as i32);
                let (c, ec) = (r.varint()?, r.varint()?);
                Some((Some(line), Some(end_line), col(c), col(ec)))
            })(),
            13 => r.svarint().map(|d| {
                line = line.wrapping_add(d);
                (Some(line), Some(line), None, None)
            }),
            10..=12 => {
                line = line.wrapping_add(i32::from(code) - 10);
                match (r.byte(), r.byte()) {
                    (Some(c), Some(ec)) => {
                        Some((Some(line), Some(line), Some(c.into()), Some(ec.into())))
                    }
                    _ => None,
                }
            }
            _ => r.byte().map(|b| {
                let c = i32::from(code) << 3 | i32::from(b >> 4);
                (Some(line), Some(line), Some(c), Some(c + i32::from(b & 15)))
            }),
        };
        let Some((line, end_line, column, end_column)) = loc else {
            break;
        };
        out.push(Location {
            start,
            end,
            line,
            end_line,
            column,
            end_column,
        });
        start = end;
    }
    out
}

/// Line ranges of a location table (consecutive entries of one line merged).
pub fn line_ranges(locations: &[Location]) -> Vec<LineRange> {
    let mut out: Vec<LineRange> = Vec::new();
    for l in locations {
        match out.last_mut() {
            Some(last) if last.line == l.line && last.end == l.start => last.end = l.end,
            _ => out.push(LineRange {
                start: l.start,
                end: l.end,
                line: l.line,
            }),
        }
    }
    out
}

struct Reader<'a> {
    data: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn byte(&mut self) -> Option<u8> {
        let b = *self.data.get(self.at)?;
        self.at += 1;
        Some(b)
    }

    /// 6-bit chunks, least significant first; bit 6 says another chunk follows.
    fn varint(&mut self) -> Option<u32> {
        let mut b = self.byte()?;
        let mut v = u32::from(b & 63);
        let mut shift = 0;
        while b & 64 != 0 {
            b = self.byte()?;
            shift += 6;
            if shift >= 32 {
                return None;
            }
            v |= u32::from(b & 63) << shift;
        }
        Some(v)
    }

    /// Sign in the lowest bit, magnitude above it.
    fn svarint(&mut self) -> Option<i32> {
        let v = self.varint()?;
        let m = (v >> 1) as i32;
        Some(if v & 1 != 0 { -m } else { m })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interpreter_file_names() {
        assert_eq!(
            interpreter_name("/usr/lib/x86_64-linux-gnu/libpython3.11.so.1.0"),
            Some((11, true, false))
        );
        assert_eq!(
            interpreter_name("/usr/bin/python3.12"),
            Some((12, false, false))
        );
        assert_eq!(
            interpreter_name("/opt/libpython3.13t.so.1.0"),
            Some((13, true, true))
        );
        assert_eq!(interpreter_name("/usr/bin/python3"), None);
        assert_eq!(
            interpreter_name("/usr/lib/python3.11/lib-dynload/_ssl.so"),
            None
        );
        assert_eq!(interpreter_name("/usr/bin/python3.11-config"), None);
    }

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
    fn varints() {
        // 300 = 0b100_101100: low chunk 44 with the continuation bit, then 4.
        let mut r = Reader {
            data: &[64 | 44, 4, 7, 6],
            at: 0,
        };
        assert_eq!(r.varint(), Some(300));
        assert_eq!(r.svarint(), Some(-3));
        assert_eq!(r.svarint(), Some(3));
        assert_eq!(r.varint(), None);
    }

    #[test]
    fn truncated_location_table_stops() {
        // A long-form entry (code 14) cut after its line delta.
        let locs = decode_location_table(&[0x80 | 14 << 3, 2], 10);
        assert!(locs.is_empty());
        // Short form code 1 (column 8 + 2), two code units; then "no location".
        let locs = decode_location_table(&[0x80 | 1 << 3 | 1, 0x23, 0x80 | 15 << 3], 5);
        assert_eq!(
            locs.iter()
                .map(|l| (l.start, l.end, l.line, l.column, l.end_column))
                .collect::<Vec<_>>(),
            [
                (0, 4, Some(5), Some(10), Some(13)),
                (4, 6, None, None, None)
            ]
        );
    }

    #[test]
    fn string_kinds() {
        assert_eq!(decode_str(b"caf\xe9", 1), "café");
        assert_eq!(decode_str(&[0x3b, 0x04, 0x3e, 0x04], 2), "ло");
        assert_eq!(decode_str(&0x1f600u32.to_le_bytes(), 4), "😀");
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
