//! The call-frame information of one object file, read once: which CFI section framehop gets,
//! the address ranges it covers, and the cache that shares it between processes (keyed by build
//! id).

use std::{
    collections::HashMap,
    fmt,
    fs::{self, File},
    ops::{Deref, Range},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use framehop::ExplicitModuleSectionInfo;
use gimli::{
    BaseAddresses, CieOrFde, DebugFrame, EhFrame, EhFrameHdr, EndianSlice, LittleEndian,
    UnwindSection,
};

use super::UnwindError;
use crate::{
    elf::{self, Architecture, Elf, LoadSegment, ReadRef},
    proc::maps::Mapping,
};

/// Section bytes shared by every process that maps the same build (cheap to clone into a
/// framehop `Module`).
#[derive(Clone)]
pub(crate) struct Bytes {
    backing: Arc<Backing>,
}

enum Backing {
    /// The section as stored in the file, mapped read-only: only the pages unwinding touches
    /// become resident. libtorch's `.eh_frame` is 17 MiB and a run's stacks touch a few pages of
    /// it; copied, the CFI of a PyTorch process's libraries took 60 MB of the tracer's heap.
    Mapped(memmap2::Mmap),
    /// A copy: a compressed section, decompressed, or a file that could not be mapped.
    Owned(Box<[u8]>),
}

impl Deref for Bytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match &*self.backing {
            Backing::Mapped(map) => map,
            Backing::Owned(bytes) => bytes,
        }
    }
}

/// No bytes (framehop's section info is built from a default).
impl Default for Bytes {
    fn default() -> Bytes {
        Bytes::owned(&[])
    }
}

impl fmt::Debug for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Bytes({} bytes)", self.len())
    }
}

impl Bytes {
    /// `size` bytes of `file` from `offset`, mapped; `None` when they are not all in the file
    /// (a section header pointing past the end: touching such a mapping would be a SIGBUS).
    fn mapped(file: &File, offset: u64, size: u64) -> Option<Bytes> {
        let file_len = file.metadata().ok()?.len();
        if offset.checked_add(size)? > file_len {
            return None;
        }
        let len = usize::try_from(size).ok()?;
        // SAFETY: a read-only private mapping of bytes checked to lie in the file. The file is
        // one the target maps as code: truncating it under the mapping would break the target
        // as well (blazesym reads the same files through mappings for names).
        let map = unsafe {
            memmap2::MmapOptions::new()
                .offset(offset)
                .len(len)
                .map(file)
        }
        .ok()?;
        // Lookups jump around the section: read-ahead would only make more of it resident.
        let _ = map.advise(memmap2::Advice::Random);
        Some(Bytes {
            backing: Arc::new(Backing::Mapped(map)),
        })
    }

    fn owned(bytes: &[u8]) -> Bytes {
        Bytes {
            backing: Arc::new(Backing::Owned(bytes.into())),
        }
    }
}

/// Which call-frame information framehop was given for a module.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CfiKind {
    /// `.eh_frame` with its `.eh_frame_hdr` search table (the usual case).
    EhFrameHdr,
    /// `.eh_frame` without a search table: framehop indexes it per process.
    EhFrame,
    /// `.debug_frame` (code built with `-fno-asynchronous-unwind-tables -g`).
    DebugFrame,
    /// None: every address in the module is uncovered.
    None,
}

/// The identity of an opened file, for files without a build id (and to skip re-reading the
/// build id of a file already seen).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct FileIdentity {
    dev: u64,
    inode: u64,
    size: u64,
    /// Modification time (ns): a file rewritten in place at the same size is another file.
    mtime_ns: i128,
}

impl FileIdentity {
    fn of(meta: &fs::Metadata) -> FileIdentity {
        FileIdentity {
            dev: meta.dev(),
            inode: meta.ino(),
            size: meta.size(),
            mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
        }
    }
}

/// What a cache entry is keyed by.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum ModuleKey {
    BuildId(Vec<u8>),
    File(FileIdentity),
}

/// The unwind sections of one object file, read once and shared by all processes mapping it.
pub struct ModuleUnwindInfo {
    path: PathBuf,
    build_id: Option<Vec<u8>>,
    segments: Vec<LoadSegment>,
    pub(super) sections: ExplicitModuleSectionInfo<Bytes>,
    kind: CfiKind,
    coverage: Coverage,
}

/// How to tell which addresses the chosen CFI covers.
enum Coverage {
    /// Through the `.eh_frame_hdr` search table, one lookup per address: nothing is read ahead
    /// of need (the usual case).
    SearchTable(BaseAddresses),
    /// Sorted, merged address ranges (as stated in the file), read from every FDE: for
    /// `.debug_frame` and for `.eh_frame` without a sound search table.
    Ranges(Vec<Range<u64>>),
}

impl fmt::Debug for ModuleUnwindInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ModuleUnwindInfo")
            .field("path", &self.path)
            .field("build_id", &self.build_id.as_deref().map(hex))
            .field("kind", &self.kind)
            .field(
                "covered_ranges",
                &match &self.coverage {
                    Coverage::SearchTable(_) => None,
                    Coverage::Ranges(ranges) => Some(ranges.len()),
                },
            )
            .finish()
    }
}

impl ModuleUnwindInfo {
    /// The file it was first read from (other processes may map it under other paths).
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn build_id(&self) -> Option<&[u8]> {
        self.build_id.as_deref()
    }

    pub fn cfi_kind(&self) -> CfiKind {
        self.kind
    }

    /// Whether the CFI framehop uses has a row for `address` (as stated in the file).
    pub fn covers(&self, address: u64) -> bool {
        match &self.coverage {
            Coverage::Ranges(covered) => {
                let i = covered.partition_point(|r| r.start <= address);
                i > 0 && covered[i - 1].end > address
            }
            Coverage::SearchTable(bases) => self.search_table_covers(bases, address),
        }
    }

    /// Whether the `.eh_frame_hdr` search table leads to an FDE containing `address`.
    fn search_table_covers(&self, bases: &BaseAddresses, address: u64) -> bool {
        let (Some(eh_frame), Some(hdr)) = (&self.sections.eh_frame, &self.sections.eh_frame_hdr)
        else {
            return false;
        };
        let Ok(parsed) = EhFrameHdr::new(hdr, LittleEndian).parse(bases, 8) else {
            return false;
        };
        let Some(table) = parsed.table() else {
            return false;
        };
        let mut section = EhFrame::new(eh_frame, LittleEndian);
        section.set_address_size(8);
        table
            .fde_for_address(&section, bases, address, |s, b, o| s.cie_from_offset(b, o))
            .is_ok_and(|fde| fde.len() > 0)
    }

    /// The load bias of a mapping of this file: run-time address minus stated address.
    pub(super) fn bias(&self, m: &Mapping) -> Option<u64> {
        elf::load_bias(&self.segments, m.start, m.file_offset, m.executable)
    }

    fn parse<'d, R: ReadRef<'d>>(
        path: &Path,
        file: &File,
        obj: &Elf<'d, R>,
        build_id: Option<Vec<u8>>,
    ) -> Result<ModuleUnwindInfo, UnwindError> {
        if obj.architecture() != Architecture::X86_64 {
            return Err(UnwindError::Parse {
                path: path.to_path_buf(),
                reason: format!("architecture {:?}, not x86-64", obj.architecture()),
            });
        }
        let (sections, kind, coverage) = CfiSections::read(file, obj).choose();
        Ok(ModuleUnwindInfo {
            path: path.to_path_buf(),
            build_id,
            segments: obj.load_segments().to_vec(),
            sections,
            kind,
            coverage,
        })
    }
}

/// The sections of an object file that unwinding reads, with their stated addresses.
struct CfiSections {
    text_svma: Option<Range<u64>>,
    got_svma: Option<Range<u64>>,
    eh_frame_svma: Option<Range<u64>>,
    eh_frame_hdr_svma: Option<Range<u64>>,
    eh_frame: Option<Bytes>,
    eh_frame_hdr: Option<Bytes>,
    debug_frame: Option<Bytes>,
}

impl CfiSections {
    fn read<'d, R: ReadRef<'d>>(file: &File, obj: &Elf<'d, R>) -> CfiSections {
        // A section that cannot be read (compressed without support, truncated file) counts
        // as absent: the addresses it would cover are then reported as uncovered.
        let data = |name: &str| -> Option<Bytes> {
            if let Some((offset, size)) = obj.section_file_range(name)
                && let Some(mapped) = Bytes::mapped(file, offset, size)
            {
                return Some(mapped);
            }
            let bytes = obj.section_data(name)?;
            (!bytes.is_empty()).then(|| Bytes::owned(&bytes))
        };
        CfiSections {
            text_svma: obj.section_range(".text"),
            got_svma: obj.section_range(".got"),
            eh_frame_svma: obj.section_range(".eh_frame"),
            eh_frame_hdr_svma: obj.section_range(".eh_frame_hdr"),
            eh_frame: data(".eh_frame"),
            eh_frame_hdr: data(".eh_frame_hdr"),
            debug_frame: data(".debug_frame"),
        }
    }

    /// framehop's section info with the CFI it is to use, which one that is, and how to tell
    /// what it covers.
    fn choose(self) -> (ExplicitModuleSectionInfo<Bytes>, CfiKind, Coverage) {
        let start = |r: &Option<Range<u64>>| r.as_ref().map_or(0, |r| r.start);
        let bases = BaseAddresses::default()
            .set_eh_frame(start(&self.eh_frame_svma))
            .set_eh_frame_hdr(start(&self.eh_frame_hdr_svma))
            .set_text(start(&self.text_svma))
            .set_got(start(&self.got_svma));
        let mut sections = ExplicitModuleSectionInfo {
            base_svma: 0,
            text_svma: self.text_svma.clone(),
            got_svma: self.got_svma.clone(),
            ..Default::default()
        };
        // The usual case: `.eh_frame` with a sound search table and no `.debug_frame` to weigh
        // it against. Nothing is scanned: framehop and coverage both look addresses up.
        if self.debug_frame.is_none()
            && self.eh_frame.is_some()
            && self
                .eh_frame_hdr
                .as_deref()
                .is_some_and(|hdr| search_table_is_sound(hdr, &bases))
        {
            sections.eh_frame = self.eh_frame;
            sections.eh_frame_svma = self.eh_frame_svma;
            sections.eh_frame_hdr = self.eh_frame_hdr;
            sections.eh_frame_hdr_svma = self.eh_frame_hdr_svma;
            return (sections, CfiKind::EhFrameHdr, Coverage::SearchTable(bases));
        }
        let eh_covered = self.eh_frame.as_deref().map(|d| {
            let mut s = EhFrame::new(d, LittleEndian);
            s.set_address_size(8);
            fde_ranges(&s, &bases)
        });
        let debug_covered = self.debug_frame.as_deref().map(|d| {
            let mut s = DebugFrame::new(d, LittleEndian);
            s.set_address_size(8);
            fde_ranges(&s, &bases)
        });
        // framehop uses one CFI section per module and prefers .eh_frame. A binary built with
        // `-fno-asynchronous-unwind-tables -g` still has a small .eh_frame from the C runtime's
        // start files, and its own code only in .debug_frame: give framehop the one that covers
        // more code.
        if covered_bytes(&debug_covered) > covered_bytes(&eh_covered) {
            sections.debug_frame = self.debug_frame;
            return (
                sections,
                CfiKind::DebugFrame,
                Coverage::Ranges(debug_covered.unwrap_or_default()),
            );
        }
        let Some(covered) = eh_covered else {
            return (sections, CfiKind::None, Coverage::Ranges(Vec::new()));
        };
        let eh_frame_hdr = self
            .eh_frame_hdr
            .filter(|hdr| search_table_is_sound(hdr, &bases));
        let kind = if eh_frame_hdr.is_some() {
            CfiKind::EhFrameHdr
        } else {
            CfiKind::EhFrame
        };
        sections.eh_frame = self.eh_frame;
        sections.eh_frame_svma = self.eh_frame_svma;
        sections.eh_frame_hdr = eh_frame_hdr;
        sections.eh_frame_hdr_svma = self.eh_frame_hdr_svma;
        (sections, kind, Coverage::Ranges(covered))
    }
}

/// Whether every FDE pointer of the `.eh_frame_hdr` search table is at or after the start of
/// `.eh_frame`, where it says `.eh_frame` is. gimli (0.33) turns the pointer it finds into an
/// offset by subtracting, unchecked: a forged table overflowed it (a panic under overflow checks,
/// found by the cfi_unwind fuzz target). A table that fails this is not given to framehop, which
/// then indexes `.eh_frame` itself (`CfiKind::EhFrame`).
fn search_table_is_sound(hdr: &[u8], bases: &BaseAddresses) -> bool {
    let Ok(parsed) = EhFrameHdr::new(hdr, LittleEndian).parse(bases, 8) else {
        return false;
    };
    let Ok(eh_frame) = parsed.eh_frame_ptr().direct() else {
        return false;
    };
    let Some(table) = parsed.table() else {
        return true; // nothing to look up
    };
    let mut entries = table.iter(bases);
    loop {
        match entries.next() {
            Ok(Some((_, fde))) if fde.direct().is_ok_and(|fde| fde >= eh_frame) => {}
            Ok(None) => return true,
            _ => return false,
        }
    }
}

/// How many bytes of code `ranges` (absent: none) cover.
fn covered_bytes(ranges: &Option<Vec<Range<u64>>>) -> u64 {
    ranges
        .as_ref()
        .map_or(0, |v| v.iter().map(|r| r.end - r.start).sum::<u64>())
}

/// The address ranges of all FDEs of a CFI section, sorted and merged. An FDE that does not
/// parse ends the walk: what it and later ones describe then counts as uncovered.
fn fde_ranges<'a, S>(section: &S, bases: &BaseAddresses) -> Vec<Range<u64>>
where
    S: UnwindSection<EndianSlice<'a, LittleEndian>>,
{
    let mut ranges = Vec::new();
    let mut entries = section.entries(bases);
    while let Ok(Some(entry)) = entries.next() {
        let CieOrFde::Fde(partial) = entry else {
            continue;
        };
        let Ok(fde) = partial.parse(|s, b, o| s.cie_from_offset(b, o)) else {
            break;
        };
        let start = fde.initial_address();
        if fde.len() > 0
            && let Some(end) = start.checked_add(fde.len())
        {
            ranges.push(start..end);
        }
    }
    ranges.sort_by_key(|r| r.start);
    let mut merged: Vec<Range<u64>> = Vec::with_capacity(ranges.len());
    for r in ranges {
        match merged.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => merged.push(r),
        }
    }
    merged.shrink_to_fit();
    merged
}

/// How often the cache parsed a file and how often it answered from memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Files whose unwind sections were read and indexed.
    pub parsed: u64,
    /// Loads answered by an entry already there (same file, or same build id elsewhere).
    pub hits: u64,
}

#[derive(Default)]
struct CacheState {
    by_key: HashMap<ModuleKey, Arc<ModuleUnwindInfo>>,
    by_file: HashMap<FileIdentity, Arc<ModuleUnwindInfo>>,
    stats: CacheStats,
}

/// Process-wide cache of unwind sections, keyed by build id (else by file identity), so that a
/// hundred processes of one program read libc's unwind tables once. Clones share the cache.
#[derive(Clone, Default)]
pub struct UnwindCache(Arc<Mutex<CacheState>>);

impl UnwindCache {
    pub fn new() -> UnwindCache {
        UnwindCache::default()
    }

    /// The unwind data of the object file at `path`, read on first use. The lock is held while
    /// reading, so concurrent loads of one file read it once.
    pub fn load(&self, path: &Path) -> Result<Arc<ModuleUnwindInfo>, UnwindError> {
        let open_err = |source| UnwindError::Open {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(open_err)?;
        let ident = FileIdentity::of(&file.metadata().map_err(open_err)?);
        let mut state = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(info) = state.by_file.get(&ident).cloned() {
            state.stats.hits += 1;
            return Ok(info);
        }
        let data = elf::on_demand(file.try_clone().map_err(open_err)?);
        let obj = Elf::parse(path, &data)?;
        let build_id = obj.build_id();
        let key = match &build_id {
            Some(id) => ModuleKey::BuildId(id.clone()),
            None => ModuleKey::File(ident),
        };
        if let Some(info) = state.by_key.get(&key).cloned() {
            state.stats.hits += 1;
            state.by_file.insert(ident, info.clone());
            return Ok(info);
        }
        let info = Arc::new(ModuleUnwindInfo::parse(path, &file, &obj, build_id)?);
        state.stats.parsed += 1;
        state.by_key.insert(key, info.clone());
        state.by_file.insert(ident, info.clone());
        Ok(info)
    }

    pub fn stats(&self) -> CacheStats {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).stats
    }

    /// Distinct modules held.
    pub fn len(&self) -> usize {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .by_key
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
pub(super) mod tests {
    use std::process::Command;

    use super::*;
    use crate::elf::SymbolKind;

    const SRC: &str = "__attribute__((noinline)) int f(int x) { return x * 3 + 1; }\n\
                       __attribute__((noinline)) int g(int x) { return f(x) * 5; }\n\
                       int main(int c, char **v) { (void)v; return g(c); }\n";

    /// Compiles `SRC` into `dir/name` with `flags`.
    pub(crate) fn cc(dir: &Path, name: &str, flags: &[&str]) -> PathBuf {
        let src = dir.join("t.c");
        fs::write(&src, SRC).unwrap();
        let out = dir.join(name);
        let result = Command::new("cc")
            .args(["-O2", "-fomit-frame-pointer"])
            .args(flags)
            .arg(&src)
            .arg("-o")
            .arg(&out)
            .output()
            .expect("cannot run cc");
        assert!(
            result.status.success(),
            "{}",
            String::from_utf8_lossy(&result.stderr)
        );
        out
    }

    #[test]
    fn same_file_twice_is_parsed_once() {
        let dir = tempfile::tempdir().unwrap();
        let exe = cc(dir.path(), "a", &[]);
        let cache = UnwindCache::new();
        let first = cache.load(&exe).unwrap();
        let second = cache.clone().load(&exe).unwrap();
        assert!(Arc::ptr_eq(&first, &second));
        assert!(first.build_id().is_some_and(|id| !id.is_empty()));
        assert_eq!(cache.stats(), CacheStats { parsed: 1, hits: 1 });
        assert_eq!(cache.len(), 1);
    }

    #[test]
    fn same_build_id_at_another_path_is_parsed_once() {
        let dir = tempfile::tempdir().unwrap();
        let exe = cc(dir.path(), "a", &[]);
        let copy = dir.path().join("copy");
        fs::copy(&exe, &copy).unwrap();
        let cache = UnwindCache::new();
        let a = cache.load(&exe).unwrap();
        let b = cache.load(&copy).unwrap();
        assert!(Arc::ptr_eq(&a, &b), "another inode, same build id");
        assert_eq!(cache.stats(), CacheStats { parsed: 1, hits: 1 });
    }

    #[test]
    fn without_build_id_files_are_keyed_by_identity() {
        let dir = tempfile::tempdir().unwrap();
        let exe = cc(dir.path(), "a", &["-Wl,--build-id=none"]);
        let copy = dir.path().join("copy");
        fs::copy(&exe, &copy).unwrap();
        let cache = UnwindCache::new();
        let a = cache.load(&exe).unwrap();
        assert_eq!(a.build_id(), None);
        let again = cache.load(&exe).unwrap();
        assert!(Arc::ptr_eq(&a, &again));
        let b = cache.load(&copy).unwrap();
        assert!(!Arc::ptr_eq(&a, &b), "no build id: a copy is another file");
        assert_eq!(cache.stats(), CacheStats { parsed: 2, hits: 1 });
    }

    #[test]
    fn unreadable_and_foreign_files_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let cache = UnwindCache::new();
        let missing = dir.path().join("missing.so");
        let err = cache.load(&missing).unwrap_err();
        assert!(matches!(err, UnwindError::Open { .. }), "{err:?}");
        assert!(err.to_string().contains("missing.so"), "{err}");

        let text = dir.path().join("notes.txt");
        fs::write(&text, "not an ELF file").unwrap();
        let err = cache.load(&text).unwrap_err();
        assert!(matches!(err, UnwindError::Parse { .. }), "{err:?}");
        assert!(err.to_string().contains("notes.txt"), "{err}");

        let empty = dir.path().join("empty");
        fs::write(&empty, "").unwrap();
        assert!(matches!(cache.load(&empty), Err(UnwindError::Parse { .. })));
        assert_eq!(cache.stats().parsed, 0);
    }

    /// Every function the compiler emitted has CFI, and addresses outside the code have none.
    #[test]
    fn cfi_ranges_cover_the_functions() {
        let dir = tempfile::tempdir().unwrap();
        let exe = cc(dir.path(), "a", &["-fasynchronous-unwind-tables"]);
        let info = UnwindCache::new().load(&exe).unwrap();
        assert_eq!(info.cfi_kind(), CfiKind::EhFrameHdr);
        let data = fs::read(&exe).unwrap();
        let obj = Elf::parse(&exe, &*data).unwrap();
        let functions: Vec<_> = obj
            .symbols()
            .filter(|s| s.kind == SymbolKind::Text && s.size > 0)
            .collect();
        for name in ["f", "g", "main"] {
            let sym = functions
                .iter()
                .find(|s| s.name == name)
                .unwrap_or_else(|| panic!("no symbol {name}"));
            let (start, end) = (sym.address, sym.address + sym.size);
            assert!(info.covers(start) && info.covers(end - 1), "{name}");
        }
        assert!(!info.covers(0));
        assert!(!info.covers(u64::MAX));
    }

    /// The usual object (`.eh_frame` with its search table) is read through a mapping, and the
    /// per-address lookup covers exactly what a scan of all its FDEs covers.
    #[test]
    fn search_table_lookups_agree_with_a_scan_of_every_fde() {
        let dir = tempfile::tempdir().unwrap();
        let exe = cc(dir.path(), "a", &["-fasynchronous-unwind-tables"]);
        let info = UnwindCache::new().load(&exe).unwrap();
        let Coverage::SearchTable(bases) = &info.coverage else {
            panic!("expected lookups through the search table");
        };
        let eh_frame = info.sections.eh_frame.clone().unwrap();
        assert!(matches!(*eh_frame.backing, Backing::Mapped(_)));
        let mut section = EhFrame::new(&eh_frame, LittleEndian);
        section.set_address_size(8);
        let ranges = fde_ranges(&section, bases);
        assert!(!ranges.is_empty());
        let (low, high) = (ranges[0].start - 64, ranges[ranges.len() - 1].end + 64);
        for address in low..high {
            let scanned = ranges.iter().any(|r| r.contains(&address));
            assert_eq!(info.covers(address), scanned, "{address:#x}");
        }
    }
}
