//! Stacks: instruction pointers from events → interned stack indexes → function names.
//!
//! Stacks are symbolized from the ELF files the target maps (opened through /proc/PID/root, so
//! containers work), using a snapshot of its mappings refreshed while it lives. Stacks seen just
//! before the target exits are therefore still symbolized after it is gone.

use std::{collections::HashMap, path::PathBuf};

use blazesym::symbolize::{self, Symbolizer, source::Source};

use crate::{
    model::{Stack, StackIndex},
    probes::resolve::{self, Mapping},
};

/// Marker frame at the outer end of a stack that was cut at `MAX_FRAMES`.
pub const TRUNCATED_FRAME: &str = "[truncated]";

/// Interns stacks and remembers which still need names.
#[derive(Default)]
pub struct StackTable {
    /// Key: the instruction pointers, innermost first; a truncated stack ends with `u64::MAX`.
    by_ips: HashMap<Vec<u64>, StackIndex>,
    /// Stacks interned but not yet symbolized.
    pending: Vec<(StackIndex, Vec<u64>)>,
    next: StackIndex,
}

impl StackTable {
    pub fn new() -> StackTable {
        StackTable::default()
    }

    /// The stack index of an event's stack (`None` when it has no frame); `truncated` marks a
    /// stack cut at `MAX_FRAMES`. Allocation-free when the stack is known.
    pub fn intern(&mut self, ips: &[u64], truncated: bool) -> Option<StackIndex> {
        if ips.is_empty() {
            return None;
        }
        if !truncated && let Some(&idx) = self.by_ips.get(ips) {
            return Some(idx);
        }
        let mut key = ips.to_vec();
        if truncated {
            key.push(u64::MAX);
            if let Some(&idx) = self.by_ips.get(&key) {
                return Some(idx);
            }
        }
        let idx = self.next;
        self.next += 1;
        self.by_ips.insert(key.clone(), idx);
        self.pending.push((idx, key));
        Some(idx)
    }

    pub fn len(&self) -> usize {
        self.next as usize
    }

    pub fn is_empty(&self) -> bool {
        self.next == 0
    }

    /// Symbolizes the stacks interned since the last call.
    pub fn take_new(&mut self, names: &mut FrameNamer) -> Vec<Stack> {
        std::mem::take(&mut self.pending)
            .into_iter()
            .map(|(index, ips)| Stack {
                index,
                frames: names.name_stack(&ips),
            })
            .collect()
    }
}

/// Turns instruction pointers of one process into function names.
pub struct FrameNamer {
    pid: u32,
    maps: Vec<Mapping>,
    symbolizer: Symbolizer,
    cache: HashMap<u64, String>,
}

impl FrameNamer {
    pub fn new(pid: u32, maps: Vec<Mapping>) -> FrameNamer {
        let maps = maps.into_iter().filter(|m| m.executable).collect();
        FrameNamer {
            pid,
            maps,
            symbolizer: Symbolizer::new(),
            cache: HashMap::new(),
        }
    }

    /// Re-reads the target's mappings (libraries loaded later); keeps the old ones if it is gone.
    pub fn refresh(&mut self) {
        if let Ok(maps) = resolve::read_maps(self.pid) {
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

    pub fn name_stack(&mut self, ips: &[u64]) -> Vec<String> {
        if ips
            .iter()
            .any(|&ip| ip != u64::MAX && self.mapping_of(ip).is_none())
        {
            self.refresh();
        }
        ips.iter()
            .map(|&ip| {
                if ip == u64::MAX {
                    TRUNCATED_FRAME.to_string()
                } else {
                    self.name(ip)
                }
            })
            .collect()
    }

    fn name(&mut self, ip: u64) -> String {
        if let Some(n) = self.cache.get(&ip) {
            return n.clone();
        }
        let name = match self.mapping_of(ip).cloned() {
            Some(m) => {
                // Stack addresses are return addresses: look up the call instruction before them.
                let offset = ip.saturating_sub(1) - m.start + m.file_offset;
                let path: PathBuf = resolve::open_path(self.pid, &m);
                let fallback_path = PathBuf::from(&m.path);
                let src_path = if path.exists() { path } else { fallback_path };
                let src = Source::Elf(symbolize::source::Elf::new(src_path));
                match self
                    .symbolizer
                    .symbolize_single(&src, symbolize::Input::FileOffset(offset))
                {
                    Ok(symbolize::Symbolized::Sym(sym)) => sym.name.into_owned(),
                    _ => {
                        let base = m.path.rsplit('/').next().unwrap_or(&m.path);
                        format!("[unknown] {base}+{offset:#x}")
                    }
                }
            }
            None => format!("[unknown] {ip:#x}"),
        };
        self.cache.insert(ip, name.clone());
        name
    }
}
