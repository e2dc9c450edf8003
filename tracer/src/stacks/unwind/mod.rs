//! DWARF stack mode, user-space half: unwinds a copy of a thread's user stack (the bytes from rsp
//! up, with rip/rsp/rbp) using the call-frame information (.eh_frame, .debug_frame) of the modules
//! the process maps, so that callers survive in code built without frame pointers.
//!
//! framehop does the unwinding. This module feeds it one `Module` per executable file mapping,
//! shares parsed unwind sections between processes (`UnwindCache`, keyed by build id, in `cfi`),
//! and reports every stack that did not reach its outermost frame (`UnwindOutcome`): a short
//! stack copy, an address no CFI covers, a framehop error. framehop itself never says when it
//! guessed: where no CFI covers an address it silently walks frame pointers, and a frame pointer
//! of 0 then looks like a clean end. So coverage is checked here, from the FDE ranges, before
//! every step.

mod cfi;

use std::{collections::BTreeMap, fs, io, ops::Range, path::PathBuf, sync::Arc};

use framehop::{
    FrameAddress, Module, Unwinder,
    x86_64::{CacheX86_64, UnwindRegsX86_64, UnwinderX86_64},
};

use self::cfi::Bytes;
pub use self::cfi::{CacheStats, CfiKind, ModuleUnwindInfo, UnwindCache};
use crate::{
    elf::ElfError,
    proc::maps::{self, Mapping},
};

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

impl From<ElfError> for UnwindError {
    fn from(e: ElfError) -> UnwindError {
        match e {
            ElfError::Read { path, source } => UnwindError::Open { path, source },
            ElfError::Parse { path, source } => UnwindError::Parse {
                path,
                reason: source.to_string(),
            },
        }
    }
}

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
    fn truncated(truncation: Truncation, fp_fallback_steps: u32) -> UnwindOutcome {
        UnwindOutcome {
            end: UnwindEnd::Truncated(truncation),
            fp_fallback_steps,
        }
    }

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
    /// Paths of executable mappings added (their unwind data is read when first needed).
    pub added: Vec<String>,
    /// Executable mappings gone (or replaced).
    pub removed: usize,
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
    /// Executable mappings whose unwind information is not read yet: it is, the first time an
    /// unwind reaches an address in them (a PyTorch process maps a hundred libraries, a few of
    /// which its stacks pass through; the rest would cost their `.eh_frame` for nothing).
    pending: BTreeMap<u64, Mapping>,
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
            pending: BTreeMap::new(),
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
        self.pending.retain(|start, old| {
            wanted
                .get(start)
                .is_some_and(|m| m.end == old.end && m.inode == old.inode && m.path == old.path)
        });
        self.failed
            .retain(|(start, inode), _| wanted.get(start).is_some_and(|m| m.inode == *inode));
        for (start, m) in wanted {
            let known = self.modules.contains_key(&start) || self.pending.contains_key(&start);
            if known || self.failed.contains_key(&(m.start, m.inode)) {
                continue;
            }
            report.added.push(m.path.clone());
            self.pending.insert(start, m);
        }
        report
    }

    /// Reads the unwind information of the pending mapping that holds `address`, if any.
    fn ensure_loaded(&mut self, address: u64) {
        let Some((&start, m)) = self.pending.range(..=address).next_back() else {
            return;
        };
        if address >= m.end {
            return;
        }
        let Some(m) = self.pending.remove(&start) else {
            return;
        };
        if let Err(e) = self.load(&m) {
            self.failed
                .insert((m.start, m.inode), (m.path, e.to_string()));
        }
    }

    /// Reads the unwind information of every mapping now (tests; the fuzzer); unwinding reads
    /// each when it first needs it.
    pub fn load_all(&mut self) {
        let pending: Vec<u64> = self.pending.keys().copied().collect();
        for start in pending {
            self.ensure_loaded(start);
        }
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
        if ip == 0 {
            return UnwindOutcome::truncated(Truncation::NoInstructionPointer, 0);
        }
        let copied = sp..sp.saturating_add(stack.len() as u64);
        let mut read_stack = |addr: u64| -> Result<u64, ()> {
            let off = usize::try_from(addr.checked_sub(sp).ok_or(())?).map_err(|_| ())?;
            let word = stack.get(off..off.checked_add(8).ok_or(())?).ok_or(())?;
            Ok(u64::from_le_bytes(word.try_into().map_err(|_| ())?))
        };
        let mut regs = UnwindRegsX86_64::new(ip, sp, bp);
        let mut address = FrameAddress::from_instruction_pointer(ip);
        let mut fp_fallback_steps = 0;
        out.push(ip);
        loop {
            let lookup = address.address_for_lookup();
            self.ensure_loaded(lookup);
            let uncovered = self.coverage(lookup).err();
            if let Some(module) = &uncovered {
                if self.options.missing_cfi == MissingCfi::Stop {
                    let module = module.clone();
                    let end = Truncation::NoUnwindInfo {
                        address: lookup,
                        module,
                    };
                    return UnwindOutcome::truncated(end, fp_fallback_steps);
                }
                fp_fallback_steps += 1;
            }
            let step =
                self.unwinder
                    .unwind_frame(address, &mut regs, &mut self.rules, &mut read_stack);
            let next = match caller(step, lookup, uncovered, &copied) {
                Ok(next) => next,
                Err(end) => {
                    return UnwindOutcome {
                        end,
                        fp_fallback_steps,
                    };
                }
            };
            if out.len() >= self.options.max_frames {
                let end = Truncation::MaxFrames(self.options.max_frames);
                return UnwindOutcome::truncated(end, fp_fallback_steps);
            }
            out.push(next.address());
            address = next;
        }
    }
}

/// The caller's frame after an unwind step at `lookup`, or how the stack ends there.
/// `uncovered` is `Some(module)` when no CFI covers `lookup` (the step was a frame-pointer
/// guess); `copied` is the range of stack addresses the copy holds.
fn caller(
    step: Result<Option<u64>, framehop::Error>,
    lookup: u64,
    uncovered: Option<Option<String>>,
    copied: &Range<u64>,
) -> Result<FrameAddress, UnwindEnd> {
    let no_unwind_info = |module| {
        UnwindEnd::Truncated(Truncation::NoUnwindInfo {
            address: lookup,
            module,
        })
    };
    let next = match step {
        Ok(Some(ra)) => FrameAddress::from_return_address(ra),
        Ok(None) => None,
        // A frame-pointer guess that failed: the missing CFI is the cause worth naming.
        Err(_) if uncovered.is_some() => return Err(no_unwind_info(uncovered.flatten())),
        Err(framehop::Error::CouldNotReadStack(addr)) => {
            return Err(UnwindEnd::Truncated(Truncation::StackNotCopied {
                addr,
                copied: copied.clone(),
            }));
        }
        Err(e) => return Err(UnwindEnd::Truncated(Truncation::Unwinder(e))),
    };
    // The end: trusted only where CFI said so.
    next.ok_or_else(|| match uncovered {
        None => UnwindEnd::Complete,
        Some(module) => no_unwind_info(module),
    })
}

#[cfg(test)]
mod tests {
    use std::{fs, os::unix::fs::MetadataExt, path::Path};

    use super::{cfi::tests::cc, *};

    /// A maps line that maps all of `path` executable at 0x400000.
    fn maps_line(path: &Path) -> String {
        let inode = fs::metadata(path).map_or(1, |m| m.ino());
        format!(
            "400000-500000 r-xp 00000000 08:01 {inode} {}\n",
            path.display()
        )
    }

    #[inline(never)]
    fn unwind_bias_marker() -> u64 {
        std::hint::black_box(11)
    }

    /// This test binary, linked by lld (its executable segment starts in the page where the
    /// read-only one ends), is loaded at the bias its functions run at.
    #[test]
    fn a_live_process_is_loaded_at_its_true_bias() {
        let addr = unwind_bias_marker as fn() -> u64 as usize as u64;
        assert_eq!(unwind_bias_marker(), 11);
        let cache = UnwindCache::new();
        let mut u = ProcessUnwinder::new(std::process::id(), &cache).unwrap();
        u.load_all();
        let module = u.modules().find(|m| m.range.contains(&addr)).unwrap();
        let data = fs::read(module.info.path()).unwrap();
        let elf = crate::elf::Elf::parse(module.info.path(), &*data).unwrap();
        let stated = elf
            .symbols()
            .find(|s| s.name.contains("unwind_bias_marker"))
            .unwrap();
        assert_eq!(module.bias, addr - stated.address);
        assert!(module.info.covers(stated.address));
    }

    #[test]
    fn maps_updates_add_remove_and_report_failures() {
        let dir = tempfile::tempdir().unwrap();
        let exe = cc(dir.path(), "a", &[]);
        let cache = UnwindCache::new();
        let gone = "600000-601000 r-xp 00000000 08:01 77 /nonexistent/libgone.so\n";
        let maps = format!("{}{gone}", maps_line(&exe));
        let mut u = ProcessUnwinder::from_maps(&maps, FileAccess::Root("/".into()), &cache);
        // Nothing is read before an unwind needs it.
        assert_eq!(
            (u.modules().count(), u.load_errors().count(), cache.len()),
            (0, 0, 0)
        );
        u.load_all();
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
        u.update_maps(&deleted);
        u.load_all();
        let errors: Vec<_> = u.load_errors().collect();
        assert!(errors[0].1.contains("deleted"), "{errors:?}");
        assert_eq!(u.modules().count(), 0);
    }

    /// Unwind data is read for the modules a stack passes through, when it first does.
    #[test]
    fn only_the_modules_an_unwind_reaches_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (cc(dir.path(), "a", &[]), cc(dir.path(), "b", &[]));
        let inode = |p: &Path| fs::metadata(p).unwrap().ino();
        let maps = format!(
            "400000-500000 r-xp 00000000 08:01 {} {}\n600000-700000 r-xp 00000000 08:01 {} {}\n",
            inode(&a),
            a.display(),
            inode(&b),
            b.display()
        );
        let cache = UnwindCache::new();
        let mut u = ProcessUnwinder::from_maps(&maps, FileAccess::Root("/".into()), &cache);
        let mut out = Vec::new();
        u.unwind((0x400100, 0x7000, 0), &stack_of(&[0; 4]), &mut out);
        let loaded: Vec<String> = u.modules().map(|m| m.path).collect();
        assert_eq!(loaded, [a.display().to_string()]);
        assert_eq!(cache.len(), 1, "b was never read");
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

    /// `exe` with every FDE pointer of its `.eh_frame_hdr` search table set to the table's own
    /// start, before `.eh_frame`: what a forged file can say.
    fn with_forged_search_table(exe: &Path) -> Vec<u8> {
        let mut data = fs::read(exe).unwrap();
        let elf = crate::elf::Elf::parse(exe, &*data).unwrap();
        let hdr = elf.section_range(".eh_frame_hdr").unwrap();
        assert!(hdr.start < elf.section_range(".eh_frame").unwrap().start);
        let at = usize::try_from(elf.file_offset(hdr.start).unwrap()).unwrap();
        drop(elf);
        // Version 1; eh_frame_ptr pcrel sdata4, fde_count udata4, table datarel sdata4 (the
        // encodings GNU ld writes), then (initial location, FDE) pairs of sdata4.
        assert_eq!(data[at..at + 4], [1, 0x1b, 0x03, 0x3b]);
        let count = u32::from_le_bytes(data[at + 8..at + 12].try_into().unwrap()) as usize;
        assert!(count > 0);
        for i in 0..count {
            let fde = at + 12 + 8 * i + 4;
            data[fde..fde + 4].copy_from_slice(&0i32.to_le_bytes());
        }
        data
    }

    /// gimli subtracted the `.eh_frame` address from an FDE pointer before it: a panic under
    /// overflow checks (found by the cfi_unwind fuzz target). The table is left out, and
    /// framehop indexes `.eh_frame` itself.
    #[test]
    fn a_forged_search_table_is_left_out_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let exe = cc(dir.path(), "a", &[]);
        assert_eq!(
            UnwindCache::new().load(&exe).unwrap().cfi_kind(),
            CfiKind::EhFrameHdr
        );
        let forged = dir.path().join("forged");
        fs::write(&forged, with_forged_search_table(&exe)).unwrap();
        // A cache of its own: the copy has the original's build id.
        let cache = UnwindCache::new();
        let mut u =
            ProcessUnwinder::from_maps(&maps_line(&forged), FileAccess::Root("/".into()), &cache);
        u.load_all();
        let module = u.modules().next().unwrap();
        assert_eq!(module.info.cfi_kind(), CfiKind::EhFrame);
        let data = fs::read(&forged).unwrap();
        let f = crate::elf::Elf::parse(&forged, &*data)
            .unwrap()
            .symbols()
            .find(|s| s.name == "f")
            .unwrap()
            .address;
        // At f's first instruction the return address is on top of the stack.
        let sp = 0x7fff_0000_0000;
        let mut out = Vec::new();
        let ip = module.bias + f;
        u.unwind((ip, sp, 0), &stack_of(&[module.bias + 0x10, 0]), &mut out);
        assert_eq!(out[..2], [ip, module.bias + 0x10]);
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
