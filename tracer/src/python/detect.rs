//! Finding CPython in a process: which mapped file is the interpreter (by name), its version
//! and runtime symbols (from the ELF file), and where it is loaded.

use std::path::{Path, PathBuf};

use super::{
    ProcMem, PythonError, Result,
    offsets::{ABSENT, PyVersion, PythonOffsets, apply_debug_offsets, offsets_for},
};
use crate::{
    elf::{self, Elf, ElfError, ReadRef, SymbolKind},
    proc::maps::{self, Mapping},
};

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

/// The file mappings of `pid`.
fn file_maps(pid: u32) -> Result<Vec<Mapping>> {
    let text =
        std::fs::read_to_string(format!("/proc/{pid}/maps")).map_err(|err| PythonError::Proc {
            pid,
            what: "read /proc/PID/maps".into(),
            err,
        })?;
    Ok(maps::parse_maps(&text))
}

/// `(minor, is_library, is_variant)` for `libpython3.X.so…` or `python3.X` file names;
/// `3.Xt`/`3.Xd` builds (free-threaded, debug) have other layouts and are refused by their
/// suffix, as 3.X+1 would be.
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

/// The addresses (as stated in the file) of the runtime symbols the walk needs.
#[derive(Default)]
struct RuntimeSymbols {
    runtime: Option<u64>,
    version: Option<u64>,
    code_type: Option<u64>,
    /// Offset in the module's TLS block.
    tls_tstate: Option<u64>,
}

impl RuntimeSymbols {
    /// Looks in .dynsym, then .symtab (whose value wins where both have one).
    fn of<'data, R: ReadRef<'data>>(elf: &Elf<'data, R>) -> RuntimeSymbols {
        let mut found = RuntimeSymbols::default();
        for sym in elf.symbols() {
            let slot = match sym.name {
                "_PyRuntime" => &mut found.runtime,
                "Py_Version" => &mut found.version,
                "PyCode_Type" => &mut found.code_type,
                "_Py_tss_tstate" if sym.kind == SymbolKind::Tls => &mut found.tls_tstate,
                _ => continue,
            };
            *slot = Some(sym.address);
        }
        found
    }
}

/// The interpreter in `path`, a file `pid` maps whose name says 3.`minor`.
fn detect_in(pid: u32, maps: &[Mapping], path: &str, minor: u32) -> Result<Interpreter> {
    // Through the target's root, so that a process in a container reads its own file.
    let on_disk = Path::new(&format!("/proc/{pid}/root")).join(path.trim_start_matches('/'));
    let data = elf::read(&on_disk).map_err(|e| read_error(pid, path, e))?;
    let elf = Elf::parse(&on_disk, &*data).map_err(|e| read_error(pid, path, e))?;
    let symbols = RuntimeSymbols::of(&elf);
    let runtime = symbols
        .runtime
        .ok_or_else(|| elf_error(path, "no _PyRuntime symbol"))?;
    let version = version_of(&elf, path, symbols.version, minor)?;
    let mut offsets = offsets_for(version)?;
    let bias = load_bias(&elf, maps, pid, path)?;
    offsets.runtime_addr = bias.wrapping_add(runtime);
    offsets.code_type_addr = symbols.code_type.map_or(ABSENT, |a| bias.wrapping_add(a));
    offsets.tls_tstate = symbols.tls_tstate.unwrap_or(ABSENT);
    let from_debug_offsets = version.minor >= 13 && overlay_debug_offsets(pid, path, &mut offsets)?;
    Ok(Interpreter {
        pid,
        path: path.into(),
        version,
        offsets,
        from_debug_offsets,
    })
}

fn elf_error(path: &str, msg: impl Into<String>) -> PythonError {
    PythonError::Elf {
        path: path.into(),
        msg: msg.into(),
    }
}

/// Why the interpreter file `path` (as the target names it) could not be read.
fn read_error(pid: u32, path: &str, e: ElfError) -> PythonError {
    match e {
        ElfError::Read { source, .. } => PythonError::Proc {
            pid,
            what: format!("read {path}"),
            err: source,
        },
        ElfError::Parse { source, .. } => elf_error(path, format!("not an ELF file: {source}")),
    }
}

/// The version `Py_Version` (at `version_sym`) states, else the file name's 3.`minor`; an error
/// where they disagree.
fn version_of<'data, R: ReadRef<'data>>(
    elf: &Elf<'data, R>,
    path: &str,
    version_sym: Option<u64>,
    minor: u32,
) -> Result<PyVersion> {
    let version = match version_sym {
        Some(addr) => {
            let bytes = elf
                .data_at(addr, 4)
                .ok_or_else(|| elf_error(path, "Py_Version is not in the file"))?;
            PyVersion::from_hex(u32::from_le_bytes(bytes.try_into().unwrap_or_default()))
        }
        None => PyVersion {
            major: 3,
            minor,
            micro: 0,
        },
    };
    if (version.major, version.minor) != (3, minor) {
        return Err(elf_error(
            path,
            format!("file name says 3.{minor} but Py_Version says {version}"),
        ));
    }
    Ok(version)
}

/// The load bias of `path` in `pid`: from its first PT_LOAD segment and the mapping of that
/// segment's page of the file.
fn load_bias<'data, R: ReadRef<'data>>(
    elf: &Elf<'data, R>,
    maps: &[Mapping],
    pid: u32,
    path: &str,
) -> Result<u64> {
    let first = elf
        .load_segments()
        .iter()
        .min_by_key(|s| s.address)
        .ok_or_else(|| elf_error(path, "no loadable segment"))?;
    let page_off = first.file_offset & !0xfff;
    maps.iter()
        .find(|m| m.path == path && m.file_offset == page_off)
        .and_then(|m| first.bias(m.start, page_off))
        .ok_or_else(|| {
            elf_error(
                path,
                format!("offset {page_off:#x} is not mapped in process {pid}"),
            )
        })
}

/// Lays 3.13's own `_PyRuntime.debug_offsets` over `offsets`; whether they were there (their
/// cookie and version match). Refuses free-threaded builds, which they announce.
fn overlay_debug_offsets(pid: u32, path: &str, offsets: &mut PythonOffsets) -> Result<bool> {
    let mem = ProcMem::open(pid)?;
    let raw = mem.bytes(offsets.runtime_addr, 46 * 8)?;
    let words: Vec<u64> = raw
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default()))
        .collect();
    if words.get(2).is_some_and(|&ft| ft != 0) {
        return Err(elf_error(
            path,
            "free-threaded CPython builds are not supported",
        ));
    }
    let Some(overlaid) = apply_debug_offsets(offsets, &words) else {
        return Ok(false);
    };
    *offsets = overlaid;
    Ok(true)
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
}
