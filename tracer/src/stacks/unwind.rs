//! DWARF stack mode, user-space half: unwinds a copy of a thread's user stack (the bytes from rsp
//! up, with rip/rsp/rbp) using the call-frame information (.eh_frame, .debug_frame) of the modules
//! the process maps, so that callers survive in code built without frame pointers.
//!
//! framehop does the unwinding. This module feeds it one `Module` per executable file mapping,
//! shares parsed unwind sections between processes (`UnwindCache`, keyed by build id), and reports
//! every stack that did not reach its outermost frame (`UnwindOutcome`): a short stack copy, an
//! address no CFI covers, a framehop error. framehop itself never says when it guessed: where no
//! CFI covers an address it silently walks frame pointers, and a frame pointer of 0 then looks
//! like a clean end. So coverage is checked here, from the FDE ranges, before every step.

use std::{
    borrow::Cow,
    collections::{BTreeMap, HashMap},
    fmt,
    fs::{self, File},
    io,
    ops::Range,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use framehop::{
    ExplicitModuleSectionInfo, FrameAddress, Module, Unwinder,
    x86_64::{CacheX86_64, UnwindRegsX86_64, UnwinderX86_64},
};
use gimli::{
    BaseAddresses, CieOrFde, DebugFrame, EhFrame, EndianSlice, LittleEndian, UnwindSection,
};
use object::{Object, ObjectSection, ObjectSegment, ReadCache};

use crate::proc::maps::{self, Mapping};

/// Section bytes shared by every process that maps the same build (cheap to clone into a
/// framehop `Module`).
type Bytes = Arc<[u8]>;

/// Why unwind data could not be had.
#[derive(Debug, thiserror::Error)]
pub enum UnwindError {
    #[error("cannot read the memory map of process {pid} (/proc/{pid}/maps): {source}")]
    Maps { pid: u32, source: io::Error },
    #[error("cannot open {} for its unwind tables: {source}", path.display())]
    Open { path: PathBuf, source: io::Error },
    #[error("{} is not an object file this unwinder can read: {reason}", path.display())]
    Parse { path: PathBuf, reason: String },
    #[error("{} is deleted and the process is gone: its unwind tables cannot be read", path.display())]
    Deleted { path: PathBuf },
    #[error(
        "{}: the mapping at file offset {offset:#x} lies in no loadable segment, so its load \
         address is unknown",
        path.display()
    )]
    NoSegment { path: PathBuf, offset: u64 },
    #[error("this unwinder was built from saved maps; only one built for a live process refreshes")]
    NotLive,
}

// ---- per-file unwind data and its cache ------------------------------------------------------

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

/// One PT_LOAD segment: maps a mapping's file offset to addresses stated in the file.
#[derive(Clone, Copy, Debug)]
struct LoadSegment {
    file_offset: u64,
    file_size: u64,
    address: u64,
}

/// The unwind sections of one object file, read once and shared by all processes mapping it.
pub struct ModuleUnwindInfo {
    path: PathBuf,
    build_id: Option<Vec<u8>>,
    segments: Vec<LoadSegment>,
    sections: ExplicitModuleSectionInfo<Bytes>,
    kind: CfiKind,
    /// Sorted, merged address ranges (as stated in the file) that the chosen CFI covers.
    covered: Vec<Range<u64>>,
}

impl fmt::Debug for ModuleUnwindInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ModuleUnwindInfo")
            .field("path", &self.path)
            .field("build_id", &self.build_id.as_deref().map(hex))
            .field("kind", &self.kind)
            .field("covered_ranges", &self.covered.len())
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
        let i = self.covered.partition_point(|r| r.start <= address);
        i > 0 && self.covered[i - 1].end > address
    }

    /// The load bias of a mapping of this file: run-time address minus stated address.
    fn bias(&self, m: &Mapping) -> Option<u64> {
        let seg = self.segments.iter().find(|s| {
            m.file_offset >= s.file_offset && m.file_offset - s.file_offset < s.file_size.max(1)
        })?;
        let stated = seg.address.checked_add(m.file_offset - seg.file_offset)?;
        Some(m.start.wrapping_sub(stated))
    }

    fn parse<'d, R: object::ReadRef<'d>>(
        path: &Path,
        obj: &object::File<'d, R>,
        build_id: Option<Vec<u8>>,
    ) -> Result<ModuleUnwindInfo, UnwindError> {
        if obj.architecture() != object::Architecture::X86_64 {
            return Err(UnwindError::Parse {
                path: path.to_path_buf(),
                reason: format!("architecture {:?}, not x86-64", obj.architecture()),
            });
        }
        let segments = obj
            .segments()
            .map(|s| {
                let (file_offset, file_size) = s.file_range();
                LoadSegment {
                    file_offset,
                    file_size,
                    address: s.address(),
                }
            })
            .collect();
        let range = |name: &str| {
            obj.section_by_name(name)
                .map(|s| s.address()..s.address() + s.size())
        };
        // A section that cannot be read (compressed without support, truncated file) counts
        // as absent: the addresses it would cover are then reported as uncovered.
        let data = |name: &str| -> Option<Bytes> {
            let s = obj.section_by_name(name)?;
            let bytes: Cow<[u8]> = s.uncompressed_data().ok()?;
            (!bytes.is_empty()).then(|| Arc::from(&*bytes))
        };
        let text_svma = range(".text");
        let got_svma = range(".got");
        let eh_frame_svma = range(".eh_frame");
        let eh_frame_hdr_svma = range(".eh_frame_hdr");
        let eh_frame = data(".eh_frame");
        let eh_frame_hdr = data(".eh_frame_hdr");
        let debug_frame = data(".debug_frame");

        let start = |r: &Option<Range<u64>>| r.as_ref().map_or(0, |r| r.start);
        let bases = BaseAddresses::default()
            .set_eh_frame(start(&eh_frame_svma))
            .set_eh_frame_hdr(start(&eh_frame_hdr_svma))
            .set_text(start(&text_svma))
            .set_got(start(&got_svma));
        let eh_covered = eh_frame.as_deref().map(|d| {
            let mut s = EhFrame::new(d, LittleEndian);
            s.set_address_size(8);
            fde_ranges(&s, &bases)
        });
        let debug_covered = debug_frame.as_deref().map(|d| {
            let mut s = DebugFrame::new(d, LittleEndian);
            s.set_address_size(8);
            fde_ranges(&s, &bases)
        });

        // framehop uses one CFI section per module and prefers .eh_frame. A binary built with
        // `-fno-asynchronous-unwind-tables -g` still has a small .eh_frame from the C runtime's
        // start files, and its own code only in .debug_frame: give framehop the one that covers
        // more code.
        let total = |r: &Option<Vec<Range<u64>>>| {
            r.as_ref()
                .map_or(0, |v| v.iter().map(|r| r.end - r.start).sum::<u64>())
        };
        let use_debug_frame = total(&debug_covered) > total(&eh_covered);
        let mut sections = ExplicitModuleSectionInfo {
            base_svma: 0,
            text_svma,
            got_svma,
            ..Default::default()
        };
        let (kind, covered) = if use_debug_frame {
            sections.debug_frame = debug_frame;
            (CfiKind::DebugFrame, debug_covered.unwrap_or_default())
        } else if let Some(covered) = eh_covered {
            let kind = if eh_frame_hdr.is_some() {
                CfiKind::EhFrameHdr
            } else {
                CfiKind::EhFrame
            };
            sections.eh_frame = eh_frame;
            sections.eh_frame_svma = eh_frame_svma;
            sections.eh_frame_hdr = eh_frame_hdr;
            sections.eh_frame_hdr_svma = eh_frame_hdr_svma;
            (kind, covered)
        } else {
            (CfiKind::None, Vec::new())
        };
        Ok(ModuleUnwindInfo {
            path: path.to_path_buf(),
            build_id,
            segments,
            sections,
            kind,
            covered,
        })
    }
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
        let data = ReadCache::new(file);
        let obj = object::File::parse(&data).map_err(|e| UnwindError::Parse {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        let build_id = obj
            .build_id()
            .ok()
            .flatten()
            .filter(|id| !id.is_empty())
            .map(<[u8]>::to_vec);
        let key = match &build_id {
            Some(id) => ModuleKey::BuildId(id.clone()),
            None => ModuleKey::File(ident),
        };
        if let Some(info) = state.by_key.get(&key).cloned() {
            state.stats.hits += 1;
            state.by_file.insert(ident, info.clone());
            return Ok(info);
        }
        let info = Arc::new(ModuleUnwindInfo::parse(path, &obj, build_id)?);
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

// ---- the per-process unwinder ----------------------------------------------------------------

/// How the files named in a maps text are opened.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FileAccess {
    /// A live process: through `/proc/PID/root` (its mount namespace, so containers work), and
    /// deleted files through `/proc/PID/map_files`.
    Process(u32),
    /// Paths as written, under this root (`/` for a process of this host that has exited).
    Root(PathBuf),
}

impl FileAccess {
    fn open_path(&self, m: &Mapping) -> Result<PathBuf, UnwindError> {
        match self {
            FileAccess::Process(pid) => Ok(maps::open_path(*pid, m)),
            FileAccess::Root(_) if m.deleted => Err(UnwindError::Deleted {
                path: PathBuf::from(&m.path),
            }),
            FileAccess::Root(root) => Ok(root.join(m.path.trim_start_matches('/'))),
        }
    }
}

/// The registers a stack copy starts from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UserRegs {
    pub ip: u64,
    pub sp: u64,
    pub bp: u64,
}

impl From<(u64, u64, u64)> for UserRegs {
    fn from((ip, sp, bp): (u64, u64, u64)) -> UserRegs {
        UserRegs { ip, sp, bp }
    }
}

/// What to do at an address no CFI covers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MissingCfi {
    /// Let framehop walk the frame pointer there (its own fallback), counted in
    /// `UnwindOutcome::fp_fallback_steps`: right in code built with frame pointers, a guess
    /// elsewhere.
    #[default]
    FramePointer,
    /// Stop and report the stack as truncated there.
    Stop,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnwindOptions {
    /// At most this many frames (the ip included); a deeper stack is reported as truncated.
    pub max_frames: usize,
    pub missing_cfi: MissingCfi,
}

impl Default for UnwindOptions {
    fn default() -> UnwindOptions {
        // The kernel's PERF_MAX_STACK_DEPTH, the frame-pointer mode's limit.
        UnwindOptions {
            max_frames: 127,
            missing_cfi: MissingCfi::default(),
        }
    }
}

/// Why a stack did not reach its outermost frame.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Truncation {
    /// The instruction pointer is 0: nothing to unwind.
    #[error("the instruction pointer is 0")]
    NoInstructionPointer,
    /// A caller's frame lies outside the copied bytes (`copied` is the range they cover): the
    /// copy was too short, or the registers do not belong to the stack.
    #[error(
        "needed stack memory at {addr:#x}, outside the copied {:#x}-{:#x} ({} bytes)",
        copied.start, copied.end, copied.end - copied.start
    )]
    StackNotCopied { addr: u64, copied: Range<u64> },
    /// No CFI covers `address` (the ip, or a return address minus 1), in `module` (`None`: in no
    /// known module), and the policy is `MissingCfi::Stop`, or the frame-pointer fallback taken
    /// there failed or ended the walk (a frame pointer of 0 is no proof of the outermost frame
    /// in code that does not keep one).
    #[error("no unwind info for {address:#x} ({})", module.as_deref().unwrap_or("in no known module"))]
    NoUnwindInfo {
        address: u64,
        module: Option<String>,
    },
    #[error("more than {0} frames")]
    MaxFrames(usize),
    /// framehop gave up (frame pointer moved backwards, no progress, overflow).
    #[error("unwinding failed: {0}")]
    Unwinder(framehop::Error),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UnwindEnd {
    /// The outermost frame was reached: CFI marks the return address undefined (`_start`,
    /// `clone`), or the return address is 0.
    Complete,
    Truncated(Truncation),
}

/// How an unwind went; the frames are in the caller's vector.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnwindOutcome {
    pub end: UnwindEnd,
    /// Steps at addresses no CFI covers, taken with framehop's frame-pointer fallback
    /// (`MissingCfi::FramePointer`): the callers found there may be wrong or missing.
    pub fp_fallback_steps: u32,
}

impl UnwindOutcome {
    pub fn is_complete(&self) -> bool {
        self.end == UnwindEnd::Complete
    }

    pub fn truncation(&self) -> Option<&Truncation> {
        match &self.end {
            UnwindEnd::Complete => None,
            UnwindEnd::Truncated(t) => Some(t),
        }
    }
}

/// A module as the unwinder sees it.
#[derive(Clone, Debug)]
pub struct ModuleView {
    /// The path in the process's maps.
    pub path: String,
    pub range: Range<u64>,
    /// Run-time address minus the address stated in the file.
    pub bias: u64,
    pub info: Arc<ModuleUnwindInfo>,
}

/// What a refresh changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RefreshReport {
    /// Paths of executable mappings added.
    pub added: Vec<String>,
    /// Executable mappings gone (or replaced).
    pub removed: usize,
    /// New mappings whose unwind data could not be read, with why.
    pub failed: Vec<String>,
}

struct LoadedModule {
    end: u64,
    inode: u64,
    path: String,
    bias: u64,
    info: Arc<ModuleUnwindInfo>,
}

/// Unwinds stack copies of one process. Built from its live maps (`new`) or from a saved maps
/// text (`from_maps`, for a process that has exited or a test capture).
pub struct ProcessUnwinder {
    files: FileAccess,
    cache: UnwindCache,
    options: UnwindOptions,
    unwinder: UnwinderX86_64<Bytes>,
    rules: CacheX86_64,
    /// Keyed by the start of the executable mapping.
    modules: BTreeMap<u64, LoadedModule>,
    /// Mappings (start, inode) whose files could not be read, with why; not retried.
    failed: BTreeMap<(u64, u64), (String, String)>,
}

impl ProcessUnwinder {
    /// The unwinder of live process `pid`. Modules that cannot be read are left out and listed
    /// by `load_errors`; only an unreadable maps file is an error.
    pub fn new(pid: u32, cache: &UnwindCache) -> Result<ProcessUnwinder, UnwindError> {
        let mut u = ProcessUnwinder::empty(FileAccess::Process(pid), cache);
        u.refresh()?;
        Ok(u)
    }

    /// The unwinder of the process whose `/proc/PID/maps` text is `maps`, opening its files
    /// as `files` says.
    pub fn from_maps(maps: &str, files: FileAccess, cache: &UnwindCache) -> ProcessUnwinder {
        let mut u = ProcessUnwinder::empty(files, cache);
        u.update_maps(maps);
        u
    }

    /// An unwinder with no module: every address is uncovered.
    pub fn empty(files: FileAccess, cache: &UnwindCache) -> ProcessUnwinder {
        ProcessUnwinder {
            files,
            cache: cache.clone(),
            options: UnwindOptions::default(),
            unwinder: UnwinderX86_64::new(),
            rules: CacheX86_64::new(),
            modules: BTreeMap::new(),
            failed: BTreeMap::new(),
        }
    }

    pub fn set_options(&mut self, options: UnwindOptions) {
        self.options = options;
    }

    pub fn options(&self) -> UnwindOptions {
        self.options
    }

    /// Re-reads the live process's maps: adds new executable mappings (dlopen), drops gone ones.
    pub fn refresh(&mut self) -> Result<RefreshReport, UnwindError> {
        let FileAccess::Process(pid) = self.files else {
            return Err(UnwindError::NotLive);
        };
        let maps = fs::read_to_string(format!("/proc/{pid}/maps"))
            .map_err(|source| UnwindError::Maps { pid, source })?;
        Ok(self.update_maps(&maps))
    }

    /// Brings the modules in line with a maps text (`/proc/PID/maps` format).
    pub fn update_maps(&mut self, maps: &str) -> RefreshReport {
        let wanted: BTreeMap<u64, Mapping> = maps::parse_maps(maps)
            .into_iter()
            .filter(|m| m.executable && m.end > m.start)
            .map(|m| (m.start, m))
            .collect();
        let mut report = RefreshReport::default();
        let stale: Vec<u64> = self
            .modules
            .iter()
            .filter(|(start, old)| {
                wanted
                    .get(start)
                    .is_none_or(|m| m.end != old.end || m.inode != old.inode || m.path != old.path)
            })
            .map(|(&start, _)| start)
            .collect();
        for start in stale {
            self.modules.remove(&start);
            self.unwinder.remove_module(start);
            report.removed += 1;
        }
        self.failed
            .retain(|(start, inode), _| wanted.get(start).is_some_and(|m| m.inode == *inode));
        for (start, m) in &wanted {
            if self.modules.contains_key(start) || self.failed.contains_key(&(m.start, m.inode)) {
                continue;
            }
            match self.load(m) {
                Ok(()) => report.added.push(m.path.clone()),
                Err(e) => {
                    let msg = e.to_string();
                    report.failed.push(msg.clone());
                    self.failed
                        .insert((m.start, m.inode), (m.path.clone(), msg));
                }
            }
        }
        report
    }

    fn load(&mut self, m: &Mapping) -> Result<(), UnwindError> {
        let path = self.files.open_path(m)?;
        let info = self.cache.load(&path)?;
        let bias = info.bias(m).ok_or_else(|| UnwindError::NoSegment {
            path: path.clone(),
            offset: m.file_offset,
        })?;
        self.unwinder.add_module(Module::new(
            m.path.clone(),
            m.start..m.end,
            bias,
            info.sections.clone(),
        ));
        self.modules.insert(
            m.start,
            LoadedModule {
                end: m.end,
                inode: m.inode,
                path: m.path.clone(),
                bias,
                info,
            },
        );
        Ok(())
    }

    /// The modules loaded, by address.
    pub fn modules(&self) -> impl Iterator<Item = ModuleView> + '_ {
        self.modules.iter().map(|(&start, m)| ModuleView {
            path: m.path.clone(),
            range: start..m.end,
            bias: m.bias,
            info: m.info.clone(),
        })
    }

    /// Executable mappings left out because their files could not be read: (path, why).
    pub fn load_errors(&self) -> impl Iterator<Item = (&str, &str)> + '_ {
        self.failed.values().map(|(p, e)| (p.as_str(), e.as_str()))
    }

    fn module_at(&self, address: u64) -> Option<&LoadedModule> {
        let (_, m) = self.modules.range(..=address).next_back()?;
        (address < m.end).then_some(m)
    }

    /// Whether CFI covers `address`; else the module it is in, if any (for the report).
    fn coverage(&self, address: u64) -> Result<(), Option<String>> {
        match self.module_at(address) {
            Some(m) if m.info.covers(address.wrapping_sub(m.bias)) => Ok(()),
            Some(m) => Err(Some(m.path.clone())),
            None => Err(None),
        }
    }

    /// Unwinds a stack copy: `stack` holds the bytes from `regs.sp` up. Fills `out` (cleared
    /// first) with the ip, then return addresses, innermost first; symbolize a return address
    /// at `addr - 1`, the call instruction. Never panics on bad input: it is reported.
    pub fn unwind(
        &mut self,
        regs: impl Into<UserRegs>,
        stack: &[u8],
        out: &mut Vec<u64>,
    ) -> UnwindOutcome {
        let UserRegs { ip, sp, bp } = regs.into();
        out.clear();
        let mut fp_fallback_steps = 0;
        let done = |end: Truncation, fp_fallback_steps| UnwindOutcome {
            end: UnwindEnd::Truncated(end),
            fp_fallback_steps,
        };
        if ip == 0 {
            return done(Truncation::NoInstructionPointer, 0);
        }
        let copied = sp..sp.saturating_add(stack.len() as u64);
        let mut read_stack = |addr: u64| -> Result<u64, ()> {
            let off = usize::try_from(addr.checked_sub(sp).ok_or(())?).map_err(|_| ())?;
            let word = stack.get(off..off.checked_add(8).ok_or(())?).ok_or(())?;
            Ok(u64::from_le_bytes(word.try_into().map_err(|_| ())?))
        };
        let mut regs = UnwindRegsX86_64::new(ip, sp, bp);
        let mut address = FrameAddress::from_instruction_pointer(ip);
        out.push(ip);
        loop {
            let lookup = address.address_for_lookup();
            let uncovered = self.coverage(lookup).err();
            if let Some(module) = &uncovered {
                if self.options.missing_cfi == MissingCfi::Stop {
                    let module = module.clone();
                    return done(
                        Truncation::NoUnwindInfo {
                            address: lookup,
                            module,
                        },
                        fp_fallback_steps,
                    );
                }
                fp_fallback_steps += 1;
            }
            let step =
                self.unwinder
                    .unwind_frame(address, &mut regs, &mut self.rules, &mut read_stack);
            let next = match step {
                Ok(Some(ra)) => FrameAddress::from_return_address(ra),
                Ok(None) => None,
                // A frame-pointer guess that failed: the missing CFI is the cause worth naming.
                Err(_) if uncovered.is_some() => {
                    return done(
                        Truncation::NoUnwindInfo {
                            address: lookup,
                            module: uncovered.flatten(),
                        },
                        fp_fallback_steps,
                    );
                }
                Err(framehop::Error::CouldNotReadStack(addr)) => {
                    return done(
                        Truncation::StackNotCopied {
                            addr,
                            copied: copied.clone(),
                        },
                        fp_fallback_steps,
                    );
                }
                Err(e) => return done(Truncation::Unwinder(e), fp_fallback_steps),
            };
            let Some(next) = next else {
                // The end: trusted only where CFI said so.
                return match uncovered {
                    None => UnwindOutcome {
                        end: UnwindEnd::Complete,
                        fp_fallback_steps,
                    },
                    Some(module) => done(
                        Truncation::NoUnwindInfo {
                            address: lookup,
                            module,
                        },
                        fp_fallback_steps,
                    ),
                };
            };
            if out.len() >= self.options.max_frames {
                return done(
                    Truncation::MaxFrames(self.options.max_frames),
                    fp_fallback_steps,
                );
            }
            out.push(next.address());
            address = next;
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use object::ObjectSymbol;

    use super::*;

    const SRC: &str = "__attribute__((noinline)) int f(int x) { return x * 3 + 1; }\n\
                       __attribute__((noinline)) int g(int x) { return f(x) * 5; }\n\
                       int main(int c, char **v) { (void)v; return g(c); }\n";

    /// Compiles `SRC` into `dir/name` with `flags`.
    fn cc(dir: &Path, name: &str, flags: &[&str]) -> PathBuf {
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

    /// A maps line that maps all of `path` executable at 0x400000.
    fn maps_line(path: &Path) -> String {
        let inode = fs::metadata(path).map_or(1, |m| m.ino());
        format!(
            "400000-500000 r-xp 00000000 08:01 {inode} {}\n",
            path.display()
        )
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
        let obj = object::File::parse(&*data).unwrap();
        let functions: Vec<_> = obj
            .symbols()
            .filter(|s| s.kind() == object::SymbolKind::Text && s.size() > 0)
            .collect();
        for name in ["f", "g", "main"] {
            let sym = functions
                .iter()
                .find(|s| s.name() == Ok(name))
                .unwrap_or_else(|| panic!("no symbol {name}"));
            let (start, end) = (sym.address(), sym.address() + sym.size());
            assert!(info.covers(start) && info.covers(end - 1), "{name}");
        }
        assert!(!info.covers(0));
        assert!(!info.covers(u64::MAX));
    }

    #[test]
    fn maps_updates_add_remove_and_report_failures() {
        let dir = tempfile::tempdir().unwrap();
        let exe = cc(dir.path(), "a", &[]);
        let cache = UnwindCache::new();
        let gone = "600000-601000 r-xp 00000000 08:01 77 /nonexistent/libgone.so\n";
        let maps = format!("{}{gone}", maps_line(&exe));
        let mut u = ProcessUnwinder::from_maps(&maps, FileAccess::Root("/".into()), &cache);
        let modules: Vec<_> = u.modules().collect();
        assert_eq!(modules.len(), 1);
        assert_eq!(modules[0].range, 0x400000..0x500000);
        assert_eq!(modules[0].bias, 0x400000);
        let errors: Vec<_> = u.load_errors().collect();
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].0, "/nonexistent/libgone.so");
        assert!(
            errors[0].1.contains("/nonexistent/libgone.so"),
            "{errors:?}"
        );

        // Nothing new: the failed mapping is not retried, the loaded one not reloaded.
        assert_eq!(u.update_maps(&maps), RefreshReport::default());
        // Both gone.
        let report = u.update_maps("");
        assert_eq!(report.removed, 1);
        assert_eq!(u.modules().count(), 0);
        assert_eq!(u.load_errors().count(), 0);
        // Deleted files of a process that is gone cannot be read.
        let deleted = format!("{} (deleted)\n", maps_line(&exe).trim_end());
        let report = u.update_maps(&deleted);
        assert!(report.added.is_empty());
        assert!(report.failed[0].contains("deleted"), "{report:?}");
    }

    fn stack_of(words: &[u64]) -> Vec<u8> {
        words.iter().flat_map(|w| w.to_le_bytes()).collect()
    }

    #[test]
    fn bad_registers_and_empty_stacks_are_reported() {
        let cache = UnwindCache::new();
        let mut u = ProcessUnwinder::empty(FileAccess::Root("/".into()), &cache);
        u.set_options(UnwindOptions {
            missing_cfi: MissingCfi::Stop,
            ..UnwindOptions::default()
        });
        let mut out = vec![1, 2, 3];
        let o = u.unwind((0, 0x7000, 0), &[], &mut out);
        assert_eq!(o.truncation(), Some(&Truncation::NoInstructionPointer));
        assert!(out.is_empty());

        u.set_options(UnwindOptions::default());
        for (ip, sp, bp) in [
            (0x1234, 0x7000, 0x7100),
            (u64::MAX, u64::MAX, u64::MAX),
            (0x1234, u64::MAX - 3, 1),
            (0x1234, 0, u64::MAX - 8),
        ] {
            for stack in [&[][..], &[0xff; 5][..], &[0xab; 64][..]] {
                let o = u.unwind((ip, sp, bp), stack, &mut out);
                assert!(!o.is_complete(), "{ip:#x} {sp:#x} {bp:#x}: {o:?}");
                assert_eq!(out[0], ip);
            }
        }
    }

    /// A frame-pointer chain through memory no module covers: followed (counted), its end not
    /// trusted, and cut at `max_frames`.
    #[test]
    fn frame_pointer_fallback_is_counted_and_bounded() {
        let sp = 0x7fff_0000_0000;
        // Frame i at sp + 16 i: [caller's frame pointer, return address].
        let mut words = Vec::new();
        for i in 0..20u64 {
            let next_bp = if i == 19 { 0 } else { sp + 16 * (i + 1) };
            words.extend([next_bp, 0x1000 + i]);
        }
        let stack = stack_of(&words);
        let cache = UnwindCache::new();
        let mut u = ProcessUnwinder::empty(FileAccess::Root("/".into()), &cache);
        let mut out = Vec::new();
        let o = u.unwind((0x999, sp, sp), &stack, &mut out);
        let expected: Vec<u64> = std::iter::once(0x999).chain(0x1000..0x1014).collect();
        assert_eq!(out, expected);
        assert_eq!(o.fp_fallback_steps, 21);
        assert_eq!(
            o.truncation(),
            Some(&Truncation::NoUnwindInfo {
                address: 0x1013 - 1,
                module: None
            })
        );

        u.set_options(UnwindOptions {
            max_frames: 5,
            ..UnwindOptions::default()
        });
        let o = u.unwind((0x999, sp, sp), &stack, &mut out);
        assert_eq!(out, expected[..5]);
        assert_eq!(o.truncation(), Some(&Truncation::MaxFrames(5)));
    }

    #[test]
    fn truncations_explain_themselves() {
        let t = Truncation::StackNotCopied {
            addr: 0x7000_0048,
            copied: 0x7000_0000..0x7000_0040,
        };
        assert_eq!(
            t.to_string(),
            "needed stack memory at 0x70000048, outside the copied 0x70000000-0x70000040 (64 bytes)"
        );
        let t = Truncation::NoUnwindInfo {
            address: 0x1234,
            module: Some("/usr/lib/libx.so".into()),
        };
        assert_eq!(
            t.to_string(),
            "no unwind info for 0x1234 (/usr/lib/libx.so)"
        );
    }
}
