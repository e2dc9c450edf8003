//! Stacks: instruction pointers from events → interned stack indexes → function names.
//!
//! Stacks are symbolized from the ELF files the target maps (opened through /proc/PID/root, so
//! containers work), using a snapshot of its mappings refreshed while it lives. Stacks seen just
//! before the target exits are therefore still symbolized after it is gone.

pub mod unwind;

use std::{collections::HashMap, path::PathBuf};

use blazesym::symbolize::{self, Symbolizer, source::Source};
use tracer_common::{STACK_SP_CANDIDATE, STACK_TRUNCATED};

use crate::{
    model::{Stack, StackIndex},
    proc::maps::{self, Mapping},
};

/// Marker frame at the outer end of a stack that was cut at `MAX_FRAMES`.
pub const TRUNCATED_FRAME: &str = "[truncated]";

/// High bits of the key word that carries an event's stack flags (no user address has them).
const FLAGS_MARK: u64 = 0xffff_0000_0000_0000;
/// High bits of the key word that carries the process id.
const PID_MARK: u64 = 0xfffe_0000_0000_0000;
/// High bits of a key word that stands for a Python frame (its index in the table of names).
const PY_MARK: u64 = 0xfffd_0000_0000_0000;
/// The bits above a key word's payload.
const MARK_MASK: u64 = 0xffff_0000_0000_0000;

/// Interns stacks and remembers which still need names.
#[derive(Default)]
pub struct StackTable {
    /// Key: the instruction pointers, innermost first, then `FLAGS_MARK | stack_flags` when the
    /// event had stack flags (truncated, stack-pointer candidate).
    by_ips: HashMap<Vec<u64>, StackIndex>,
    /// Python frames' names, by the index in their key word.
    python_names: Vec<String>,
    python_index: HashMap<String, u64>,
    /// Stacks interned but not yet symbolized, with the process whose addresses they are.
    pending: Vec<(StackIndex, u32, Vec<u64>)>,
    next: StackIndex,
    /// Stacks already symbolized (`name_pending_of`), waiting for `take_new`.
    ready: Vec<Stack>,
    /// Reused key buffer: looking up a known stack allocates nothing.
    scratch: Vec<u64>,
}

impl StackTable {
    pub fn new() -> StackTable {
        StackTable::default()
    }

    /// The stack index of an event's stack (`None` when it has no frame); `flags` are the
    /// event's `stack_flags`. Allocation-free when the stack is known.
    ///
    /// Addresses mean different code in different processes (after exec), so the key ends with
    /// the process id.
    pub fn intern(&mut self, pid: u32, ips: &[u64], flags: u16) -> Option<StackIndex> {
        if ips.is_empty() {
            return None;
        }
        self.scratch.clear();
        self.scratch.extend_from_slice(ips);
        if flags != 0 {
            self.scratch.push(FLAGS_MARK | u64::from(flags));
        }
        self.scratch.push(PID_MARK | u64::from(pid));
        if let Some(&idx) = self.by_ips.get(&self.scratch) {
            return Some(idx);
        }
        let idx = self.next;
        self.next += 1;
        let mut key = self.scratch.clone();
        self.by_ips.insert(key.clone(), idx);
        key.pop(); // the process id: the namer is per process
        self.pending.push((idx, pid, key));
        Some(idx)
    }

    pub fn len(&self) -> usize {
        self.next as usize
    }

    pub fn is_empty(&self) -> bool {
        self.next == 0
    }

    /// The key word standing for the Python frame named `name` (`function (file:line)`), to
    /// put among a stack's instruction pointers.
    pub fn python_frame(&mut self, name: String) -> u64 {
        if let Some(&word) = self.python_index.get(&name) {
            return word;
        }
        let word = PY_MARK | self.python_names.len() as u64;
        self.python_names.push(name.clone());
        self.python_index.insert(name, word);
        word
    }

    /// Whether a stack word stands for a Python frame.
    pub fn is_python_frame(word: u64) -> bool {
        word & MARK_MASK == PY_MARK
    }

    /// Symbolizes the pending stacks of `pid` now, with `namer` (before an exec replaces the
    /// code their addresses point into).
    pub fn name_pending_of(&mut self, pid: u32, namer: &mut FrameNamer) {
        let (mine, others): (Vec<_>, Vec<_>) = std::mem::take(&mut self.pending)
            .into_iter()
            .partition(|(_, p, _)| *p == pid);
        self.pending = others;
        self.ready
            .extend(mine.into_iter().map(|(index, _, key)| Stack {
                index,
                frames: namer.name_stack(&key, &self.python_names),
            }));
    }

    /// Symbolizes the stacks interned since the last call, each with its process's namer
    /// (created from the process's current mappings when missing).
    pub fn take_new(&mut self, namers: &mut HashMap<u32, FrameNamer>) -> Vec<Stack> {
        let mut out = std::mem::take(&mut self.ready);
        out.extend(
            std::mem::take(&mut self.pending)
                .into_iter()
                .map(|(index, pid, key)| {
                    let namer = namers.entry(pid).or_insert_with(|| {
                        FrameNamer::new(pid, maps::read_maps(pid).unwrap_or_default())
                    });
                    Stack {
                        index,
                        frames: namer.name_stack(&key, &self.python_names),
                    }
                }),
        );
        out
    }
}

/// Turns instruction pointers of one process into function names.
pub struct FrameNamer {
    pid: u32,
    maps: Vec<Mapping>,
    symbolizer: Symbolizer,
    /// Names by address: the functions inlined at it, innermost first, then the function.
    cache: HashMap<u64, Vec<String>>,
    after_call: HashMap<u64, bool>,
}

/// Whether `code`, the 7 bytes before a return address, ends with an x86-64 call instruction:
/// `call rel32` (e8), `call *disp32(%rip)` (ff 15), `call *%reg` (ff d0-d7, 41 ff d0-d7),
/// `call *disp8(%reg)` (ff 50-57 xx), `call *disp32(%reg)` (ff 90-97 xxxxxxxx).
pub fn is_call_before(code: &[u8; 7]) -> bool {
    let modrm_call = |m: u8| (m & 0x38) == 0x10; // reg field 2: CALL r/m64
    code[2] == 0xe8
        || (code[1] == 0xff && code[2] == 0x15)
        || (code[5] == 0xff && modrm_call(code[6]) && code[6] >= 0xc0)
        || (code[4] == 0xff && (0x50..=0x57).contains(&code[5]))
        || (code[1] == 0xff && (0x90..=0x97).contains(&code[2]))
}

impl FrameNamer {
    /// A namer for a forked child: same address space as the parent at the fork.
    pub fn for_child(&self, child: u32) -> FrameNamer {
        FrameNamer::new(child, self.maps.clone())
    }

    pub fn new(pid: u32, maps: Vec<Mapping>) -> FrameNamer {
        let maps = maps.into_iter().filter(|m| m.executable).collect();
        FrameNamer {
            pid,
            maps,
            symbolizer: Symbolizer::new(),
            cache: HashMap::new(),
            after_call: HashMap::new(),
        }
    }

    /// Re-reads the target's mappings (libraries loaded later); keeps the old ones if it is gone.
    pub fn refresh(&mut self) {
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
            self.refresh();
        }
        self.names(ip)
            .iter()
            .any(|f| functions.contains(&f.as_str()))
    }

    /// Names a stack key (`StackTable`'s form: addresses, then an optional flags word).
    pub fn name_stack(&mut self, key: &[u64], python_names: &[String]) -> Vec<String> {
        let (ips, flags) = match key.split_last() {
            Some((&last, rest)) if last & FLAGS_MARK == FLAGS_MARK => {
                (rest, (last & 0xffff) as u16)
            }
            _ => (key, 0),
        };
        if ips
            .iter()
            .any(|&ip| !StackTable::is_python_frame(ip) && self.mapping_of(ip).is_none())
        {
            self.refresh();
        }
        let mut frames: Vec<String> = Vec::with_capacity(ips.len() + 1);
        for (i, &ip) in ips.iter().enumerate() {
            // The word read at the stack pointer is a frame only if a call instruction precedes
            // it (it is the return address of a leaf function); otherwise it is data.
            if StackTable::is_python_frame(ip) {
                let name = python_names.get((ip & !MARK_MASK) as usize);
                frames.push(name.cloned().unwrap_or_else(|| "[python]".to_string()));
                continue;
            }
            if i == 1 && flags & STACK_SP_CANDIDATE != 0 && !self.follows_call(ip) {
                continue;
            }
            frames.extend(self.names(ip));
        }
        if flags & STACK_TRUNCATED != 0 {
            frames.push(TRUNCATED_FRAME.to_string());
        }
        frames
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
                && is_call_before(&before)
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
        let name = match self.mapping_of(ip).cloned() {
            Some(m) => {
                // Stack addresses are return addresses: look up the call instruction before them.
                let offset = ip.saturating_sub(1) - m.start + m.file_offset;
                let path: PathBuf = maps::open_path(self.pid, &m);
                let fallback_path = PathBuf::from(&m.path);
                let src_path = if path.exists() { path } else { fallback_path };
                let src = Source::Elf(symbolize::source::Elf::new(src_path));
                match self
                    .symbolizer
                    .symbolize_single(&src, symbolize::Input::FileOffset(offset))
                {
                    Ok(symbolize::Symbolized::Sym(sym)) => sym
                        .inlined
                        .iter()
                        .rev()
                        .map(|f| f.name.to_string())
                        .chain(std::iter::once(sym.name.into_owned()))
                        .fold(Vec::new(), |mut names: Vec<String>, name| {
                            // An alias inlined into itself (glibc's syscall wrappers) is one frame.
                            if names.last() != Some(&name) {
                                names.push(name);
                            }
                            names
                        }),
                    _ => {
                        let base = m.path.rsplit('/').next().unwrap_or(&m.path);
                        vec![format!("[unknown] {base}+{offset:#x}")]
                    }
                }
            }
            None => vec![format!("[unknown] {ip:#x}")],
        };
        self.cache.insert(ip, name.clone());
        name
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognizes_call_instructions_before_return_addresses() {
        // call rel32
        assert!(is_call_before(&[0x90, 0x90, 0xe8, 1, 2, 3, 4]));
        // call *0x10(%rip)
        assert!(is_call_before(&[0x90, 0xff, 0x15, 1, 2, 3, 4]));
        // call *%rax ; call *%r8 (41 ff d0)
        assert!(is_call_before(&[0, 0, 0, 0, 0, 0xff, 0xd0]));
        assert!(is_call_before(&[0, 0, 0, 0, 0x41, 0xff, 0xd0]));
        // call *0x8(%rax)
        assert!(is_call_before(&[0, 0, 0, 0, 0xff, 0x50, 0x08]));
        // data: a pointer-looking word on the stack, or jmp *%rax (ff e0)
        assert!(!is_call_before(&[0x48, 0x89, 0xe5, 0x48, 0x83, 0xec, 0x10]));
        assert!(!is_call_before(&[0, 0, 0, 0, 0, 0xff, 0xe0]));
    }

    #[test]
    fn flags_travel_in_the_key() {
        let mut t = StackTable::new();
        let a = t.intern(7, &[1, 2], 0);
        let b = t.intern(7, &[1, 2], STACK_TRUNCATED);
        assert_ne!(a, b);
        assert_eq!(t.intern(7, &[1, 2], STACK_TRUNCATED), b);
        assert_ne!(t.intern(8, &[1, 2], 0), a, "other process, other code");
        assert_eq!(t.intern(7, &[], 0), None);
        assert_eq!(
            t.pending.last().map(|(_, pid, key)| (*pid, key.clone())),
            Some((8, vec![1, 2]))
        );
    }
}
