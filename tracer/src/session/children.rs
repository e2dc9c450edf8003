//! Following children: the set of traced processes (the target, then every process it forks),
//! heap probes for each child, and for each new image after an exec.

use tracer_common::{ProcEvent, proc_op};

use crate::{
    probes::{
        Probes,
        resolve::{self, AllocatorObject},
    },
    proc::{self, maps},
};

/// The traced processes.
pub struct ProcessSet {
    /// The target, then the children it forks, in order.
    pub pids: Vec<u32>,
    /// Those not exited.
    pub live: Vec<u32>,
    /// Processes that exec'd with heap tracing on: their allocator may be another file now.
    exec_pending: Vec<u32>,
    /// How the target ended, once it has while followed children still run.
    target_exited: Option<String>,
}

impl ProcessSet {
    pub fn new(target: u32) -> ProcessSet {
        ProcessSet {
            pids: vec![target],
            live: vec![target],
            exec_pending: Vec::new(),
            target_exited: None,
        }
    }

    /// Acts on a process-tree event: a child joins the traced processes (with heap probes when
    /// heap tracing is on), an exec'd process may need probes on another allocator, an exit
    /// leaves.
    pub fn follow(
        &mut self,
        ev: &ProcEvent,
        allocator: Option<&AllocatorObject>,
        probes: &mut Probes,
    ) {
        if ev.op == proc_op::EXEC {
            // The new image's interpreter, if any, is detected when it maps its code.
            probes.forget_python(ev.pid);
        }
        match ev.op {
            proc_op::FORK => self.forked(ev.pid, allocator, probes),
            proc_op::EXEC if allocator.is_some() => self.exec_pending.push(ev.pid),
            proc_op::EXIT => self.live.retain(|&p| p != ev.pid),
            _ => {}
        }
    }

    fn forked(&mut self, child: u32, allocator: Option<&AllocatorObject>, probes: &mut Probes) {
        if !self.pids.contains(&child) {
            self.pids.push(child);
        }
        self.live.push(child);
        // The child maps the parent's libc: the same file, the same offsets; probes attached for
        // every process mapping it cover the child already, from its first instruction.
        if let Some(allocator) = allocator.filter(|_| !probes.heap_systemwide())
            && let Err(e) = probes.attach(child, allocator)
            && proc::exists(child)
        {
            // (A child that is already gone needs no probes.)
            log::warn!("child {child}: heap probes not attached: {e}");
        }
    }

    /// Puts heap probes on the new allocator of the processes that exec'd, once it is mapped.
    pub fn attach_after_exec(&mut self, allocator: Option<&AllocatorObject>, probes: &mut Probes) {
        self.exec_pending
            .retain(|&p| !heap_after_exec(p, allocator, probes));
    }

    /// The target exited, `how`: the reason to stop now, unless followed children still run.
    pub fn target_exited(
        &mut self,
        target: u32,
        how: String,
        follow_children: bool,
    ) -> Option<String> {
        self.live.retain(|&p| p != target);
        // Followed children keep the recording going until they exit too.
        if self.live.is_empty() || !follow_children {
            return Some(how);
        }
        self.target_exited = Some(how);
        None
    }

    /// The reason to stop once the target and all followed children have exited.
    pub fn all_exited(&self) -> Option<String> {
        self.target_exited.clone().filter(|_| self.live.is_empty())
    }
}

/// After an exec with heap tracing: done (true) once the new image's allocator is the one the
/// process's probes are on (uprobes follow the file, so nothing to do) or probes were attached
/// to the new one; false to look again later (its libc not mapped yet).
fn heap_after_exec(pid: u32, allocator: Option<&AllocatorObject>, probes: &mut Probes) -> bool {
    let Ok(maps) = maps::read_maps(pid) else {
        return true; // gone
    };
    let Ok(new) = resolve::find_allocator(pid, &maps) else {
        return false;
    };
    if allocator.is_some_and(|a| a.target_path == new.target_path) {
        return true;
    }
    if let Err(e) = probes.attach(pid, &new) {
        log::warn!("PID {pid} after exec: heap probes not attached: {e}");
    }
    true
}
