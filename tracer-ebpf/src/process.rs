//! The process tree of traced processes: a child of a traced process is traced from its birth
//! (when asked), and exec and exit are reported so that user space re-hooks or stops.

use aya_ebpf::{
    helpers::bpf_get_current_pid_tgid, macros::tracepoint, programs::TracePointContext,
};
use tracer_common::{ProcEvent, drop_cause, event_kind, heap_ledger::TracedProcess, proc_op};

use crate::{
    diag, heap_ledger,
    maps::{FOLLOW_CHILDREN, TARGETS, global},
    ring::{Wakeup, output_event},
    traced,
};

/// task:task_newtask's record: the new task's pid, and its clone flags.
const NEWTASK_PID_AT: usize = 8;
const NEWTASK_CLONE_FLAGS_AT: usize = 32;

const CLONE_THREAD: u64 = 0x0001_0000;

#[inline(always)]
fn emit_proc(op: u32, pid: u32, parent: u32) {
    let event = ProcEvent {
        kind: event_kind::PROC,
        op,
        pid,
        parent,
    };
    output_event(&event, Wakeup::Now, "process event");
}

/// task:task_newtask runs in the parent while it creates a task: a new process of a traced
/// parent is traced before it runs.
#[tracepoint]
pub fn task_newtask(ctx: TracePointContext) -> u32 {
    if global(&FOLLOW_CHILDREN) == 0 {
        return 0;
    }
    let parent = (bpf_get_current_pid_tgid() >> 32) as u32;
    if TARGETS.get_ptr(parent).is_none() {
        return 0;
    }
    // SAFETY: reads the tracepoint record.
    let (child, flags) = unsafe {
        (
            ctx.read_at::<u32>(NEWTASK_PID_AT).unwrap_or(0),
            ctx.read_at::<u64>(NEWTASK_CLONE_FLAGS_AT).unwrap_or(0),
        )
    };
    if child == 0 || flags & CLONE_THREAD != 0 {
        return 0;
    }
    if TARGETS.insert(child, TracedProcess::NEW, 0).is_err() {
        diag::lost(drop_cause::INFLIGHT_BUSY, "new process");
    }
    emit_proc(proc_op::FORK, child, parent);
    0
}

/// sched:sched_process_exec, in the process after its new image is loaded.
#[tracepoint]
pub fn process_exec(_ctx: TracePointContext) -> u32 {
    let pid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if let Some(process) = TARGETS.get_ptr_mut(pid) {
        // A new image: the heap ledger's stack keys change with it, the old image's heap is
        // gone. No other thread of the process is left to see either half-done.
        // SAFETY: a map value, valid while this program runs.
        let old = unsafe {
            core::ptr::replace(&raw mut (*process).generation, (*process).generation + 1)
        };
        traced::targets_changed();
        heap_ledger::forget_image(pid, old);
        emit_proc(proc_op::EXEC, pid, 0);
    }
    0
}

/// sched:sched_process_exit, for each exiting thread: reports the main thread's.
#[tracepoint]
pub fn process_exit(_ctx: TracePointContext) -> u32 {
    let key = bpf_get_current_pid_tgid();
    let (pid, tid) = ((key >> 32) as u32, key as u32);
    if pid == tid && TARGETS.get_ptr(pid).is_some() {
        let _ = TARGETS.remove(pid);
        // Threads of the process may outlive its main thread: none may go on as traced.
        traced::targets_changed();
        emit_proc(proc_op::EXIT, pid, 0);
    }
    0
}
