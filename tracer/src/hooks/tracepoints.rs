//! Kernel tracepoints: memory syscalls and the process tree.

/// A kernel tracepoint alloctrace attaches to (no uprobe trap).
#[derive(Copy, Clone, Debug)]
pub struct Tracepoint {
    /// Tracefs category.
    pub category: &'static str,
    /// For `syscalls`, the syscall (`sys_enter_NAME` runs `program`, `sys_exit_NAME` runs
    /// `syscall_exit`); otherwise the tracepoint's name.
    pub name: &'static str,
    pub program: &'static str,
    /// What it records, and into which classes.
    pub records: &'static str,
}

/// Memory syscalls, traced for every traced process whatever calls them (libc, raw `syscall()`,
/// static code, runtimes that never touch libc). Rules in docs/accounting.md, "Mappings".
pub const SYSCALL_TRACEPOINTS: &[Tracepoint] = &[
    Tracepoint {
        category: "syscalls",
        name: "mmap",
        program: "mmap_enter",
        records: "a new mapping: `mmap`, `mmap-shared`, `mmap-file`, `thread-stack`, \
                  `python-arena` by its flags and caller; allocator arena with --heap",
    },
    Tracepoint {
        category: "syscalls",
        name: "munmap",
        program: "munmap_enter",
        records: "pages unmapped from the mappings they belong to",
    },
    Tracepoint {
        category: "syscalls",
        name: "mprotect",
        program: "mprotect_enter",
        records: "pages becoming accessible (counted) or PROT_NONE (not counted)",
    },
    Tracepoint {
        category: "syscalls",
        name: "mremap",
        program: "mremap_enter",
        records: "a mapping moved, grown or shrunk: the new range at the mremap's stack",
    },
    Tracepoint {
        category: "syscalls",
        name: "brk",
        program: "brk_enter",
        records: "program-break growth: class `heap` (allocator arena with --heap)",
    },
    Tracepoint {
        category: "syscalls",
        name: "madvise",
        program: "madvise_enter",
        records: "pages released (DONTNEED, FREE, REMOVE) by stack, mappings kept",
    },
];

/// Process-tree and RSS tracepoints.
pub const PROCESS_TRACEPOINTS: &[Tracepoint] = &[
    Tracepoint {
        category: "task",
        name: "task_newtask",
        program: "task_newtask",
        records: "a child (not a thread) of a traced process joins the traced set before it runs",
    },
    Tracepoint {
        category: "sched",
        name: "sched_process_exec",
        program: "process_exec",
        records: "exec: the old image's blocks and mappings are retired",
    },
    Tracepoint {
        category: "sched",
        name: "sched_process_exit",
        program: "process_exit",
        records: "a traced process exited: it keeps its figures at exit",
    },
    Tracepoint {
        category: "exceptions",
        name: "page_fault_user",
        program: "page_fault_user",
        records: "sampled faults that bring a page in, by stack (`page_faults`)",
    },
];
