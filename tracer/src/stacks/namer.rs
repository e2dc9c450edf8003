//! Naming: instruction pointers of one process → function names (inlined frames included),
//! read with blazesym from the files the process maps. The symbols of a file are read once for
//! every process that maps it (an inference server's engine and workers map the same libtorch).

use std::{
    cell::RefCell,
    collections::HashMap,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    rc::Rc,
    time::{Duration, Instant},
};

use blazesym::symbolize::{self, Symbolizer, source::Source};
use tracer_common::{STACK_SP_CANDIDATE, STACK_TRUNCATED};

use super::table::{StackTable, python_name_index, split_key};
use crate::{
    arch, elf,
    proc::maps::{self, Mapping},
};

/// Marker frame where a native frame chain stopped making sense (an address no code can be at).
pub const UNWIND_STOPPED_FRAME: &str = "[unwind stopped]";

/// Whether `ip` could be a user-space code address: above the never-mapped first page and within
/// the 47-bit user half (4-level paging; a process mapping code above it has a file mapping the
/// caller found first).
fn could_be_code(ip: u64) -> bool {
    (0x1000..=0x7fff_ffff_ffff).contains(&ip)
}

/// Marker frame at the outer end of a stack that was cut at `MAX_FRAMES`.
pub const TRUNCATED_FRAME: &str = "[truncated]";

/// The most DWARF (`.debug_info` as stored) a file may have to be named through it. blazesym
/// parses every unit's abbreviations and line program when it opens a file's DWARF: for
/// triton's 135 MiB that was 30 MB of the tracer's heap and 68 MB of the file resident, to name
/// a handful of import-time frames. Above this, the file's frames are named from its symbol
/// tables (no inlined frames); the fixtures, CPython and the C library's debug file are well
/// under it.
pub const DWARF_LIMIT: u64 = 32 << 20;

/// The symbolizer every process's namer shares, and the path each file is read through: a file
/// is known to blazesym by its path, and each process reaches it by a path of its own
/// (`/proc/PID/root/...`), which would read it once per process.
#[derive(Default)]
pub struct SharedSymbols {
    symbolizer: Symbolizer,
    /// By (device, inode, size, mtime): the path the file was first read through.
    paths: RefCell<HashMap<(u64, u64, u64, i64), PathBuf>>,
    /// By that path: whether its DWARF is read (`DWARF_LIMIT`).
    dwarf: RefCell<HashMap<PathBuf, bool>>,
    /// Addresses looked up in files since their pages were last released.
    lookups: std::cell::Cell<u32>,
}

/// Lookups between two releases of the file pages they left resident (`resident`): one import
/// storm names thousands of frames in one tick, each lookup mapping 64 KiB of a string table.
const LOOKUPS_PER_RELEASE: u32 = 64;

impl SharedSymbols {
    /// The path to read the file at `path` through: the one it was read through before, while
    /// that still leads to it (the process it was read for may be gone).
    fn path_for(&self, path: PathBuf) -> PathBuf {
        let Ok(m) = std::fs::metadata(&path) else {
            return path;
        };
        let key = (m.dev(), m.ino(), m.size(), m.mtime());
        let mut paths = self.paths.borrow_mut();
        if let Some(known) = paths.get(&key)
            && std::fs::metadata(known).is_ok_and(|k| (k.dev(), k.ino()) == (key.0, key.1))
        {
            return known.clone();
        }
        paths.insert(key, path.clone());
        path
    }

    /// Whether frames in the file at `path` are named through its DWARF: it has no more than
    /// `DWARF_LIMIT` of it.
    fn reads_dwarf(&self, path: &Path) -> bool {
        *self
            .dwarf
            .borrow_mut()
            .entry(path.to_path_buf())
            .or_insert_with(|| debug_info_size(path) <= DWARF_LIMIT)
    }
}

/// The size of the file's `.debug_info` as stored (0 when it has none or cannot be read).
fn debug_info_size(path: &Path) -> u64 {
    elf::stored_section_size(path, ".debug_info").unwrap_or(0)
}

/// Turns instruction pointers of one process into function names.
pub struct FrameNamer {
    pid: u32,
    maps: Vec<Mapping>,
    symbols: Rc<SharedSymbols>,
    /// Names by address: the functions inlined at it, innermost first, then the function.
    cache: HashMap<u64, Vec<String>>,
    after_call: HashMap<u64, bool>,
    /// The process mapped code since its mappings were last read (`maps_changed`).
    stale: bool,
    /// When its mappings were last read.
    read_at: Instant,
}

/// An address outside every known mapping re-reads the mappings only when the process mapped
/// code since (`FrameNamer::maps_changed`), or at most this often: a frame-pointer walk through
/// code without frame pointers yields such addresses by the thousand, and a PyTorch process's
/// maps are thousands of lines (a quarter of the recorder's time went to re-reading them).
const UNPROMPTED_REFRESH: Duration = Duration::from_secs(1);

impl FrameNamer {
    /// A namer for a forked child: same address space as the parent at the fork.
    pub fn for_child(&self, child: u32) -> FrameNamer {
        self.sharing(child, self.maps.clone())
    }

    /// The namer of `pid` in `namers`, made with `maps` when missing, sharing the others'
    /// symbols.
    pub fn of(
        namers: &mut HashMap<u32, FrameNamer>,
        pid: u32,
        maps: impl FnOnce() -> Vec<Mapping>,
    ) -> &mut FrameNamer {
        let shared = namers.values().next().map(|other| other.symbols.clone());
        namers
            .entry(pid)
            .or_insert_with(|| FrameNamer::with_symbols(pid, maps(), shared.unwrap_or_default()))
    }

    /// A namer with symbols of its own.
    pub fn new(pid: u32, maps: Vec<Mapping>) -> FrameNamer {
        FrameNamer::with_symbols(pid, maps, Rc::default())
    }

    /// A namer of another process that reads each file's symbols once with this one.
    pub fn sharing(&self, pid: u32, maps: Vec<Mapping>) -> FrameNamer {
        FrameNamer::with_symbols(pid, maps, self.symbols.clone())
    }

    fn with_symbols(pid: u32, maps: Vec<Mapping>, symbols: Rc<SharedSymbols>) -> FrameNamer {
        let maps = maps.into_iter().filter(|m| m.executable).collect();
        FrameNamer {
            pid,
            maps,
            symbols,
            cache: HashMap::new(),
            after_call: HashMap::new(),
            stale: false,
            read_at: Instant::now(),
        }
    }

    /// The process mapped code: the next address outside the known mappings re-reads them.
    pub fn maps_changed(&mut self) {
        self.stale = true;
    }

    /// Re-reads the mappings for an address outside the known ones, if they may have changed.
    fn refresh_for_unknown(&mut self) {
        if self.stale || self.read_at.elapsed() >= UNPROMPTED_REFRESH {
            self.refresh();
        }
    }

    /// Re-reads the target's mappings (libraries loaded later); keeps the old ones if it is gone.
    pub fn refresh(&mut self) {
        self.stale = false;
        self.read_at = Instant::now();
        if let Ok(maps) = maps::read_maps(self.pid) {
            for m in maps.into_iter().filter(|m| m.executable) {
                if !self
                    .maps
                    .iter()
                    .any(|old| old.start == m.start && old.inode == m.inode)
                {
                    self.maps.push(m);
                }
            }
        }
    }

    fn mapping_of(&self, ip: u64) -> Option<&Mapping> {
        // Later snapshots first: an address range may have been reused by another object.
        self.maps.iter().rev().find(|m| ip >= m.start && ip < m.end)
    }

    /// Whether `ip` is in one of `functions` (or in a function inlined there), re-reading the
    /// mappings once if its module is not known yet.
    pub fn is_in(&mut self, ip: u64, functions: &[&str]) -> bool {
        if self.mapping_of(ip).is_none() {
            self.refresh_for_unknown();
        }
        self.names(ip)
            .iter()
            .any(|f| functions.contains(&f.as_str()))
    }

    /// Names a stack key (`StackTable`'s form: addresses, then an optional flags word).
    pub fn name_stack(&mut self, key: &[u64], python_names: &[String]) -> Vec<String> {
        let (ips, flags) = split_key(key);
        if ips
            .iter()
            .any(|&ip| !StackTable::is_python_frame(ip) && self.mapping_of(ip).is_none())
        {
            self.refresh_for_unknown();
        }
        let mut frames: Vec<String> = Vec::with_capacity(ips.len() + 1);
        let mut stopped = false;
        for (i, &ip) in ips.iter().enumerate() {
            if let Some(index) = python_name_index(ip) {
                let name = python_names.get(index);
                frames.push(name.cloned().unwrap_or_else(|| "[python]".to_string()));
                continue;
            }
            // The word read at the stack pointer is a frame only if a call instruction precedes
            // it (it is the return address of a leaf function); otherwise it is data.
            if i == 1 && flags & STACK_SP_CANDIDATE != 0 && !self.follows_call(ip) {
                continue;
            }
            if stopped {
                continue;
            }
            // A frame chain that ran into data (a frame without a frame pointer) yields numbers
            // no code can be at: the native frames end there, marked; the Python frames, read
            // apart, still follow.
            if self.mapping_of(ip).is_none() && !could_be_code(ip) {
                frames.push(UNWIND_STOPPED_FRAME.to_string());
                stopped = true;
                continue;
            }
            frames.extend(self.names(ip));
        }
        if flags & STACK_TRUNCATED != 0 {
            frames.push(TRUNCATED_FRAME.to_string());
        }
        frames
    }

    /// Whether `ip` can be a return address: in a mapped file, right after a call instruction
    /// (a frame-pointer walk through code built without frame pointers finds whatever the stack
    /// held instead).
    pub fn is_return_address(&mut self, ip: u64) -> bool {
        if self.mapping_of(ip).is_none() {
            self.refresh_for_unknown();
        }
        self.follows_call(ip)
    }

    /// Whether the code just before `ip` is a call instruction (read from the mapped file).
    fn follows_call(&mut self, ip: u64) -> bool {
        if let Some(&known) = self.after_call.get(&ip) {
            return known;
        }
        let verdict = self.mapping_of(ip).cloned().is_some_and(|m| {
            let offset = ip - m.start + m.file_offset;
            let mut before = [0u8; 7];
            offset >= 7
                && std::fs::File::open(maps::open_path(self.pid, &m))
                    .or_else(|_| std::fs::File::open(&m.path))
                    .and_then(|f| {
                        std::os::unix::fs::FileExt::read_exact_at(&f, &mut before, offset - 7)
                    })
                    .is_ok()
                && arch::is_call_before(&before)
        });
        self.after_call.insert(ip, verdict);
        verdict
    }

    /// The frames an address stands for: functions inlined at it, innermost first, then the
    /// function that contains it (demangled).
    fn names(&mut self, ip: u64) -> Vec<String> {
        if let Some(n) = self.cache.get(&ip) {
            return n.clone();
        }
        let names = match self.mapping_of(ip).cloned() {
            // Stack addresses are return addresses: look up the call instruction before them. A
            // fault's first frame is the faulting instruction itself, which may be a mapping's
            // first byte: nothing precedes it there, so it names itself.
            Some(m) => self.names_in(&m, (ip - m.start).saturating_sub(1) + m.file_offset),
            None => vec![format!("[unknown] {ip:#x}")],
        };
        self.cache.insert(ip, names.clone());
        names
    }

    /// The frames at `offset` in the file of mapping `m`.
    fn names_in(&mut self, m: &Mapping, offset: u64) -> Vec<String> {
        let path: PathBuf = maps::open_path(self.pid, m);
        let src_path = if path.exists() {
            path
        } else {
            PathBuf::from(&m.path)
        };
        let src_path = self.symbols.path_for(src_path);
        let mut elf = symbolize::source::Elf::new(src_path);
        elf.debug_syms = self.symbols.reads_dwarf(&elf.path);
        let src = Source::Elf(elf);
        let lookups = self.symbols.lookups.get() + 1;
        self.symbols.lookups.set(lookups % LOOKUPS_PER_RELEASE);
        if lookups == LOOKUPS_PER_RELEASE {
            super::resident::release_file_pages();
        }
        match (self.symbols.symbolizer).symbolize_single(&src, symbolize::Input::FileOffset(offset))
        {
            Ok(symbolize::Symbolized::Sym(sym)) => frames_of(sym),
            _ => {
                let base = m.path.rsplit('/').next().unwrap_or(&m.path);
                vec![format!("[unknown] {base}+{offset:#x}")]
            }
        }
    }
}

/// The functions inlined at a symbolized address, innermost first, then the one containing it.
fn frames_of(sym: symbolize::Sym<'_>) -> Vec<String> {
    let mut names: Vec<String> = Vec::with_capacity(sym.inlined.len() + 1);
    let inlined = sym.inlined.iter().rev().map(|f| f.name.to_string());
    for name in inlined.chain(std::iter::once(sym.name.into_owned())) {
        // An alias inlined into itself (glibc's syscall wrappers) is one frame.
        if names.last() != Some(&name) {
            names.push(name);
        }
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mapping(start: u64, end: u64, file_offset: u64) -> Mapping {
        Mapping {
            start,
            end,
            file_offset,
            executable: true,
            inode: 1,
            path: "/nonexistent/libgone.so".to_string(),
            deleted: false,
        }
    }

    /// Garbage read as a return address ends the native frames with a marker; what is unknown but
    /// could be code (JIT code in an anonymous mapping) is kept as an address; Python frames
    /// after it remain.
    #[test]
    fn a_chain_that_runs_into_data_ends_with_a_marker() {
        let mut namer = FrameNamer::new(u32::MAX, vec![mapping(0x1000, 0x2000, 0)]);
        let mut table = StackTable::new();
        let py = table.python_frame("handle_request (server.py:3)".to_string());
        let key = [0x1010, 0x7f00_0000_1234, 0x0064_0000_0006_ff01, 0x1020, py];
        let names = namer.name_stack(&key, &["handle_request (server.py:3)".to_string()]);
        assert_eq!(
            names,
            vec![
                "[unknown] libgone.so+0xf".to_string(),
                "[unknown] 0x7f0000001234".to_string(),
                UNWIND_STOPPED_FRAME.to_string(),
                "handle_request (server.py:3)".to_string(),
            ]
        );
    }

    /// An address at a mapping's first byte (a fault at the first instruction of a page) names
    /// the offset it stands at; it does not reach back before the mapping.
    #[test]
    fn an_address_at_a_mappings_first_byte_is_named_in_that_mapping() {
        let mut namer = FrameNamer::new(u32::MAX, vec![mapping(0x1000, 0x2000, 0x5000)]);
        assert_eq!(namer.names(0x1000), vec!["[unknown] libgone.so+0x5000"]);
        assert_eq!(namer.names(0x1010), vec!["[unknown] libgone.so+0x500f"]);
        assert_eq!(namer.names(0x2000), vec!["[unknown] 0x2000"]);
    }

    /// An address outside the known mappings re-reads them only once the process mapped code
    /// (or after `UNPROMPTED_REFRESH`): not for every stray address a walk yields.
    #[test]
    fn mappings_are_read_again_when_the_process_mapped_code() {
        let me = std::process::id();
        let mut namer = FrameNamer::new(me, Vec::new());
        let code = a_chain_that_runs_into_data_ends_with_a_marker as *const () as u64;
        assert_eq!(
            namer.name_stack(&[code], &[]),
            vec![format!("[unknown] {code:#x}")],
            "known mappings unchanged: not read again"
        );
        namer.maps_changed();
        let names = namer.name_stack(&[code + 1], &[]);
        assert!(!names[0].starts_with("[unknown] 0x"), "{names:?}");
        assert!(!namer.stale);
    }

    /// The DWARF limit weighs `.debug_info` as stored: a `-g` build has some, a stripped copy of
    /// it none, and a file that is not ELF none.
    #[test]
    fn debug_info_is_measured_as_stored() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("g.c");
        std::fs::write(&src, "int main(void) { return 0; }\n").unwrap();
        let exe = dir.path().join("g");
        let status = std::process::Command::new("cc")
            .args(["-g", "-o"])
            .arg(&exe)
            .arg(&src)
            .status()
            .unwrap();
        assert!(status.success());
        let size = debug_info_size(&exe);
        assert!(size > 0 && size < DWARF_LIMIT, "{size}");
        let stripped = dir.path().join("stripped");
        let status = std::process::Command::new("strip")
            .arg("-o")
            .arg(&stripped)
            .arg(&exe)
            .status()
            .unwrap();
        assert!(status.success());
        assert_eq!(debug_info_size(&stripped), 0);
        let text = dir.path().join("notes.txt");
        std::fs::write(&text, "not ELF").unwrap();
        assert_eq!(debug_info_size(&text), 0);
        let symbols = SharedSymbols::default();
        assert!(symbols.reads_dwarf(&exe));
    }

    /// One file reached by two paths (two processes' `/proc/PID/root/...`) is read through the
    /// first, while it still leads to the file.
    #[test]
    fn a_file_is_read_through_the_path_it_was_first_read_through() {
        let dir = tempfile::tempdir().unwrap();
        let (first, second) = (dir.path().join("lib-a.so"), dir.path().join("lib-b.so"));
        std::fs::write(&first, b"\x7fELF").unwrap();
        std::fs::hard_link(&first, &second).unwrap();
        let symbols = SharedSymbols::default();
        assert_eq!(symbols.path_for(first.clone()), first);
        assert_eq!(symbols.path_for(second.clone()), first);
        std::fs::remove_file(&first).unwrap();
        assert_eq!(symbols.path_for(second.clone()), second);
        let other = dir.path().join("other.so");
        std::fs::write(&other, b"other").unwrap();
        assert_eq!(symbols.path_for(other.clone()), other);
    }
}
