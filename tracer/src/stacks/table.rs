//! Interning: each distinct (stack, flags, process) gets one dense index, and is named once.

use std::collections::HashMap;

use super::FrameNamer;
use crate::{
    model::{Stack, StackIndex},
    proc::maps,
};

/// High bits of the key word that carries an event's stack flags (no user address has them).
const FLAGS_MARK: u64 = 0xffff_0000_0000_0000;
/// High bits of the key word that carries the process id.
const PID_MARK: u64 = 0xfffe_0000_0000_0000;
/// High bits of a key word that stands for a Python frame (its index in the table of names).
const PY_MARK: u64 = 0xfffd_0000_0000_0000;
/// The bits above a key word's payload.
const MARK_MASK: u64 = 0xffff_0000_0000_0000;

/// A stack key's addresses and its event's stack flags (0 when it has no flags word).
pub(super) fn split_key(key: &[u64]) -> (&[u64], u16) {
    match key.split_last() {
        Some((&last, rest)) if last & FLAGS_MARK == FLAGS_MARK => (rest, (last & 0xffff) as u16),
        _ => (key, 0),
    }
}

/// The index in the table of Python frame names of a key word that stands for one.
pub(super) fn python_name_index(word: u64) -> Option<usize> {
    StackTable::is_python_frame(word).then_some((word & !MARK_MASK) as usize)
}

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

    /// The stacks interned since the last call, each symbolized with its process's namer
    /// (created from the process's current mappings when missing) as it is taken: only the one
    /// being written is held named.
    pub fn take_new<'a>(
        &'a mut self,
        namers: &'a mut HashMap<u32, FrameNamer>,
    ) -> impl Iterator<Item = Stack> + 'a {
        let ready = std::mem::take(&mut self.ready);
        let pending = std::mem::take(&mut self.pending);
        let python_names = &self.python_names;
        ready
            .into_iter()
            .chain(pending.into_iter().map(move |(index, pid, key)| {
                let namer =
                    FrameNamer::of(namers, pid, || maps::read_maps(pid).unwrap_or_default());
                Stack {
                    index,
                    frames: namer.name_stack(&key, python_names),
                }
            }))
    }
}

#[cfg(test)]
mod tests {
    use tracer_common::STACK_TRUNCATED;

    use super::*;

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
