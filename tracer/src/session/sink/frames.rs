//! The stacks of events: native frames (read, or unwound from a stack copy with the process's
//! call-frame information), the Python frames merged in place of the interpreter's loop, and
//! the frame namers and unwinders kept per process for that.

use std::collections::HashMap;

use tracer_common::{STACK_SP_CANDIDATE, STACK_TRUNCATED};

use super::EventSink;
use crate::{
    events::RawStack,
    model::StackIndex,
    python,
    stacks::{
        FrameNamer, StackTable,
        unwind::{FileAccess, ProcessUnwinder, Truncation, UnwindCache},
    },
};

/// Where every stack of a process or thread starts.
const ENTRY_POINTS: [&str; 4] = ["_start", "__clone3", "__clone", "clone3"];

/// The one frame of an event's stack once the tracer is over `--max-memory`.
pub const STACK_NOT_KEPT: &str = "[stack not kept: tracer over --max-memory]";

/// CPython's bytecode evaluation loop: the native frames the Python frames replace.
const PYTHON_EVAL_FUNCTIONS: [&str; 1] = ["_PyEval_EvalFrameDefault"];

/// The functions of CPython's arena allocator that mmap arenas.
const PYTHON_ARENA_FUNCTIONS: [&str; 2] = ["_PyObject_ArenaMmap", "new_arena"];

/// The frame namer of `pid`, made from its current mappings when missing (sharing the others'
/// symbols).
fn namer_of(namers: &mut HashMap<u32, FrameNamer>, pid: u32) -> &mut FrameNamer {
    FrameNamer::of(namers, pid, Vec::new)
}

/// The unwinder of live process `pid`, or an empty one (every stack truncated) if it is gone.
fn new_unwinder(pid: u32, cache: &UnwindCache) -> ProcessUnwinder {
    ProcessUnwinder::new(pid, cache)
        .unwrap_or_else(|_| ProcessUnwinder::empty(FileAccess::Process(pid), cache))
}

impl EventSink {
    /// Reads an event's stack into `self.ips`, unwinding a stack copy with the process's
    /// call-frame information, and interns it. An unwind that did not reach the outermost frame
    /// is marked truncated.
    pub(super) fn stack_of(&mut self, pid: u32, stack: &RawStack) -> Option<StackIndex> {
        if self.shed.collapse {
            // Over `--max-memory`: no more stacks, one frame that says why.
            self.shed.stacks_collapsed += 1;
            self.ips.clear();
            self.ips
                .push(self.stacks.python_frame(STACK_NOT_KEPT.to_string()));
            return self.stacks.intern(pid, &self.ips, 0);
        }
        let flags = self.native_stack(pid, stack);
        self.merge_python(pid, stack);
        self.stacks.intern(pid, &self.ips, flags)
    }

    /// The stack of a heap stack key that covers the first `covered` native frames (all, unless
    /// the process's keys were shortened): those and the Python frames. Walks whose frames past
    /// the first are not return addresses are counted per process: where most are, the walks run
    /// through code without frame pointers, and the process's keys are to be shortened
    /// (`take_short_key_requests`).
    pub(super) fn heap_stack_of(
        &mut self,
        pid: u32,
        stack: &RawStack,
        covered: usize,
    ) -> Option<StackIndex> {
        if self.shed.collapse {
            return self.stack_of(pid, stack);
        }
        let flags = self.native_stack(pid, stack);
        if covered < self.ips.len() {
            self.ips.truncate(covered);
        } else {
            self.judge_walk(pid);
        }
        self.merge_python(pid, stack);
        self.stacks.intern(pid, &self.ips, flags)
    }

    /// Counts whether the native frames in `self.ips` past the first are all return addresses;
    /// asks for short keys for `pid` once a quarter of its first `WALKS_JUDGED` walks were not.
    fn judge_walk(&mut self, pid: u32) {
        const WALKS_JUDGED: u32 = 64;
        let judged = self.walks.entry(pid).or_default();
        if judged.0 >= WALKS_JUDGED {
            return;
        }
        let namer = namer_of(&mut self.namers, pid);
        let broken = (self.ips.iter().skip(1))
            .filter(|&&ip| !StackTable::is_python_frame(ip))
            .any(|&ip| !namer.is_return_address(ip));
        judged.0 += 1;
        judged.1 += u32::from(broken);
        if judged.0 == WALKS_JUDGED && judged.1 * 4 >= WALKS_JUDGED {
            self.short_keys.push(pid);
        }
    }

    /// Processes whose heap stack keys should cover the allocator's caller alone.
    pub fn take_short_key_requests(&mut self) -> Vec<u32> {
        std::mem::take(&mut self.short_keys)
    }

    /// Over `--max-memory`: what can be read again is dropped (unwind tables, symbols, the
    /// processes' frame namers). Called right after the new stacks were taken (named).
    pub fn drop_caches(&mut self) {
        self.unwinders.clear();
        self.unwind_cache = UnwindCache::new();
        self.namers.clear();
        self.shed.caches_dropped += 1;
    }

    /// Over `--max-memory` with the caches dropped: events from now on keep no stack.
    pub fn collapse_stacks(&mut self) {
        self.shed.collapse = true;
    }

    /// Puts the Python frames recorded with a stack in place of the interpreter's innermost
    /// evaluation loop in `self.ips` (the outer loops' frames are among them), or after the
    /// native frames when the native walk did not reach the interpreter.
    fn merge_python(&mut self, pid: u32, stack: &RawStack) {
        let Some(words) = self.python_words(pid, stack) else {
            return;
        };
        let namer = namer_of(&mut self.namers, pid);
        let mut is_eval =
            |ip: u64| !StackTable::is_python_frame(ip) && namer.is_in(ip, &PYTHON_EVAL_FUNCTIONS);
        let native = std::mem::take(&mut self.ips);
        match native.iter().position(|&ip| is_eval(ip)) {
            Some(first) => {
                self.ips.extend_from_slice(&native[..first]);
                self.ips.extend_from_slice(&words);
                self.ips.extend(
                    native[first + 1..]
                        .iter()
                        .copied()
                        .filter(|&ip| !is_eval(ip)),
                );
            }
            None => {
                self.ips.extend_from_slice(&native);
                self.ips.extend_from_slice(&words);
            }
        }
    }

    /// The stack words of the Python frames recorded with a stack (named from the process's
    /// code objects), `None` when there are none or the process's Python is not read.
    fn python_words(&mut self, pid: u32, stack: &RawStack) -> Option<Vec<u64>> {
        let mut raw = stack.python_frames().peekable();
        raw.peek()?;
        let py = self.pythons.get_mut(&pid)?;
        let (stacks, rules) = (&mut self.stacks, &self.python_rules);
        let matched = &mut self.python_matched;
        let (phase_of, mut phase) = (&mut self.python_phase_of, 0);
        let words = raw
            .map(|(code, instr_offset)| {
                let frame = py.symbolize(python::RawFrame { code, instr_offset }).ok();
                let name = match &frame {
                    Some(frame) => frame.to_string(),
                    None => format!("[python] code {code:#x}"),
                };
                let word = stacks.python_frame(name);
                if rules.is_empty() {
                    return word;
                }
                // Each distinct frame is matched against the rules once.
                let frame_phase = *phase_of.entry(word).or_insert_with(|| {
                    let at = frame.as_ref().and_then(|f| {
                        (rules.iter()).position(|(r, _)| r.matches(&f.function, &f.file))
                    });
                    at.map_or(0, |i| {
                        matched[i] = true;
                        rules[i].1
                    })
                });
                // Innermost first: the first frame in a phase gives the stack's.
                if phase == 0 {
                    phase = frame_phase;
                }
                word
            })
            .collect();
        self.stack_python_phase = phase;
        Some(words)
    }

    /// Reads an event's native stack into `self.ips`, unwinding a stack copy; returns the stack
    /// flags to intern it with.
    fn native_stack(&mut self, pid: u32, stack: &RawStack) -> u16 {
        let Some((regs, bytes)) = stack.copy() else {
            stack.read_into(&mut self.ips);
            return stack.flags & (STACK_TRUNCATED | STACK_SP_CANDIDATE);
        };
        let cache = &self.unwind_cache;
        let unwinder = self
            .unwinders
            .entry(pid)
            .or_insert_with(|| new_unwinder(pid, cache));
        let regs = (regs.ip, regs.sp, regs.bp);
        let mut outcome = unwinder.unwind(regs, bytes, &mut self.ips);
        if let Some(Truncation::NoUnwindInfo { module: None, .. }) = outcome.truncation() {
            // Code mapped since the unwinder last looked (dlopen): look again, once.
            if unwinder.refresh().is_ok() {
                outcome = unwinder.unwind(regs, bytes, &mut self.ips);
            }
        }
        self.unwinds += 1;
        if outcome.is_complete() || self.ends_at_entry_point(pid) {
            0
        } else {
            self.unwinds_truncated += 1;
            STACK_TRUNCATED
        }
    }

    /// Whether the stack in `self.ips` reached a process's or thread's entry point, whose CFI
    /// does not always say that nothing is above it (the dynamic loader's `_start`).
    fn ends_at_entry_point(&mut self, pid: u32) -> bool {
        let Some(&last) = self.ips.last() else {
            return false;
        };
        namer_of(&mut self.namers, pid).is_in(last, &ENTRY_POINTS)
    }

    /// Reads the code mappings of `pid` for unwinding (at attach, fork and each time it maps
    /// code), while it lives: events are unwound after the fact, possibly after it exited.
    pub fn learn_code_of(&mut self, pid: u32) {
        let cache = &self.unwind_cache;
        self.unwinders
            .entry(pid)
            .and_modify(|u| {
                let _ = u.refresh();
            })
            .or_insert_with(|| new_unwinder(pid, cache));
    }

    /// Looks again at the code `pid` maps, for naming frames and unwinding (also the first look
    /// at a process that exec'd: its new image's libraries).
    pub fn refresh_code_of(&mut self, pid: u32) {
        namer_of(&mut self.namers, pid).refresh();
        self.learn_code_of(pid);
    }

    /// Names the stacks of `pid` waiting to be named, from its mappings as the namer knows them
    /// now (a process about to exit: later, they are gone).
    pub fn name_stacks_of(&mut self, pid: u32) {
        self.stacks
            .name_pending_of(pid, namer_of(&mut self.namers, pid));
    }

    /// Whether the mmap whose stack is in `self.ips` comes from CPython's arena allocator: one of
    /// its first frames is `_PyObject_ArenaMmap` (obmalloc, CPython 3.8 to 3.13).
    pub(super) fn is_python_arena(&mut self, pid: u32) -> bool {
        let namer = namer_of(&mut self.namers, pid);
        self.ips
            .iter()
            .take(3)
            .any(|&ip| namer.is_in(ip, &PYTHON_ARENA_FUNCTIONS))
    }
}
