//! Loading the eBPF object and attaching its programs at the points `resolve` found.

mod kernel_log;
pub mod resolve;
mod uprobe_multi;

use std::{
    io,
    num::NonZeroU32,
    os::fd::{AsFd, OwnedFd},
    sync::{Arc, Mutex},
    time::Duration,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap as AyaHashMap, MapData, MapError, PerCpuArray, RingBuf},
    programs::{
        ProgramError, ProgramFd, ProgramInfo, TracePoint, UProbe,
        trace_point::{TracePointLink, TracePointLinkId},
        uprobe::{UProbeAttachLocation, UProbeAttachPoint, UProbeLink, UProbeLinkId, UProbeScope},
    },
};
use tracer_common::{
    Cookie, HeapFn, drop_cause, global,
    heap_ledger::{HeapLive, StackTotals, TracedProcess},
    heap_window, ledger_stat,
    phase::{self, PhaseFrees},
    stack_stat,
};

use self::{
    kernel_log::KernelLog,
    resolve::{AllocatorObject, CudaObject},
};
use crate::{
    hooks::{AttachStage, CudaHook, PROCESS_TRACEPOINTS, SYSCALL_TRACEPOINTS},
    ledger::kernel_heap::KernelTotals,
    session::phases::ResolvedRule,
};

/// A map update's flag: only if the key is absent.
const BPF_NOEXIST: u64 = 1;

/// The compiled eBPF object (built by build.rs).
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tracer"));

/// Programs attached by this module rather than through the hook tables: the exit of every
/// traced syscall, and the benchmark floor's empty entry and return.
const SYSCALL_EXIT_PROGRAM: &str = "syscall_exit";
const FLOOR_ENTRY_PROGRAM: &str = "floor_enter";
/// Counts malloc calls before the heap probes go on (`count_mallocs`).
const HEAP_COUNT_PROGRAM: &str = "heap_count";
const FLOOR_RETURN_PROGRAM: &str = "floor_return";
/// Loaded for multi-uprobe links to ask whether the kernel makes them (`uprobe_multi`).
const MULTI_LINK_PROBE_PROGRAM: &str = "multi_link_probe";
/// A sampled heap's allocation functions on uprobe sessions (Linux 6.13): an unsampled call
/// costs its entry trap alone. The floor's session program returns 1 at every entry; it also
/// asks the kernel whether it makes sessions.
const HEAP_SESSION_PROGRAM: &str = "heap_session";
const FLOOR_SESSION_PROGRAM: &str = "floor_session";
/// Set (to anything) to attach the heap probes as perf-event uprobes, as on a kernel without
/// multi-uprobe links (before 6.6): the tests cover both ways.
pub const PERF_UPROBES_ENV: &str = "ALLOCTRACE_PERF_UPROBES";
/// A phase rule's function entered (`attach_phase`).
const PHASE_ENTER_PROGRAM: &str = "phase_enter";
/// A USDT probe's phase rule (`tracer-ebpf/src/phase.rs`), and the entry of the function
/// around it.
const PHASE_ENTER_USDT_PROGRAM: &str = "phase_enter_usdt";
const PHASE_CALL_PROGRAM: &str = "phase_call";

#[derive(Clone, Debug)]
pub struct ProbeConfig {
    /// Ring buffer size in bytes (power of two, multiple of the page size).
    pub ring_bytes: u32,
    /// Attach empty programs at the same points (benchmark floor): nothing is recorded.
    pub floor: bool,
    /// Trace the children (fork, clone without CLONE_THREAD) of traced processes from birth.
    pub follow_children: bool,
    /// Record one of every N page faults that bring a page in (0: none).
    pub fault_sample: u32,
    /// User-stack bytes copied per event for DWARF unwinding (0: frame pointers): heap events
    /// and sampled faults, and the others (mappings, CUDA calls, failures).
    pub stack_copy_heap: u32,
    pub stack_copy_other: u32,
    /// Record the Python frames of CPython processes with each stack.
    pub python_frames: bool,
    /// Copy stacks even when the ring buffer is a quarter full (benchmark of the copy cost).
    pub stack_copy_always: bool,
    /// Print the programs' diagnostics (why an event or part of one was skipped) on stderr.
    pub debug_log: bool,
    /// Heap probes for every process that maps the allocator (`attach_systemwide`), filtered in
    /// the kernel by the traced set: children are followed from their first instruction.
    pub heap_systemwide: bool,
    /// `--heap-sample`: mean bytes between recorded heap allocations; 0: every one.
    pub heap_sample_mean: u32,
    /// Live heap blocks the kernel's heap ledger holds at most; 0: no kernel ledger (heap
    /// stacks copied for DWARF unwinding, sampling, or asked so), every block to user space.
    pub heap_ledger_blocks: u32,
    /// Heap probes attached in windows (`open_heap_window`, `close_heap`), not for the whole
    /// recording.
    pub heap_duty_cycled: bool,
    /// Blocks a full kernel ledger sends through the ring are byte-sampled whatever the ring
    /// holds, not only once it is a quarter full (tests of the sampled share).
    pub heap_full_sample_always: bool,
}

impl ProbeConfig {
    /// The object's load-time globals (`tracer_common::global`) for this configuration.
    fn globals(&self) -> [(&'static str, u32); 14] {
        [
            (global::FOLLOW_CHILDREN, u32::from(self.follow_children)),
            (global::FAULT_SAMPLE, self.fault_sample),
            (global::PYTHON_FRAMES, u32::from(self.python_frames)),
            (global::STACK_COPY_ALWAYS, u32::from(self.stack_copy_always)),
            (global::STACK_COPY_HEAP, self.stack_copy_heap),
            (global::STACK_COPY_OTHER, self.stack_copy_other),
            (global::DEBUG_LOG, u32::from(self.debug_log)),
            (global::HEAP_SYSTEMWIDE, u32::from(self.heap_systemwide)),
            (global::HEAP_SAMPLE_MEAN, self.heap_sample_mean),
            (
                global::HEAP_KERNEL_LEDGER,
                u32::from(self.heap_ledger_blocks > 0),
            ),
            (global::HEAP_DUTY_CYCLED, u32::from(self.heap_duty_cycled)),
            (global::HEAP_RECENT_SLOTS, self.recent_slots()),
            (
                global::HEAP_FULL_SAMPLE_MEAN,
                if self.heap_ledger_blocks > 0 {
                    tracer_common::heap_ledger::FULL_SAMPLE_MEAN
                } else {
                    0
                },
            ),
            (
                global::HEAP_FULL_SAMPLE_ALWAYS,
                u32::from(self.heap_full_sample_always),
            ),
        ]
    }

    /// Slots of the kernel heap ledger's recent blocks (the hash table holds the rest).
    fn recent_slots(&self) -> u32 {
        tracer_common::heap_ledger::recent_slots(self.heap_ledger_blocks)
    }

    /// The stack mode these copy sizes stand for, by its `--stack` name.
    pub fn stack_mode_name(&self) -> &'static str {
        match (self.stack_copy_heap, self.stack_copy_other) {
            (0, 0) => "fp",
            (0, _) => "auto",
            _ => "dwarf",
        }
    }
}

/// Bytes of user stack copied per event by default (`record --stack-copy`).
pub const DEFAULT_STACK_COPY: u32 = 16 << 10;

/// How user stacks are taken (`record --stack`).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum StackMode {
    /// A copy of the stack unwound with DWARF CFI for mapping, CUDA and failure events (few,
    /// and what a postmortem needs most), frame pointers for heap events and page faults (many).
    Auto,
    /// Frame pointers everywhere: cheapest; callers in code without frame pointers are lost.
    FramePointers,
    /// A stack copy for every event, heap included.
    Dwarf,
}

impl StackMode {
    /// The (heap, other) copy sizes for `copy_bytes` per copied stack.
    pub fn copy_sizes(self, copy_bytes: u32) -> (u32, u32) {
        match self {
            StackMode::Auto => (0, copy_bytes),
            StackMode::FramePointers => (0, 0),
            StackMode::Dwarf => (copy_bytes, copy_bytes),
        }
    }
}

impl Default for ProbeConfig {
    fn default() -> Self {
        ProbeConfig {
            ring_bytes: 16 << 20,
            floor: false,
            follow_children: true,
            fault_sample: 64,
            stack_copy_heap: 0,
            stack_copy_other: DEFAULT_STACK_COPY,
            python_frames: true,
            stack_copy_always: false,
            debug_log: false,
            heap_systemwide: false,
            heap_sample_mean: 0,
            heap_ledger_blocks: 0,
            heap_duty_cycled: false,
            heap_full_sample_always: false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error(
        "loading eBPF programs needs root (CAP_BPF, CAP_PERFMON and CAP_SYS_ADMIN): run alloctrace as root"
    )]
    NotPermitted,
    #[error(
        "this kernel cannot load alloctrace's eBPF programs ({0}): alloctrace needs Linux >= 5.15 with BTF, uprobes and ring buffers"
    )]
    Load(String),
    #[error(
        "cannot attach to {symbol} in {path}: {reason}; if dmesg says 'ref_ctr_offset mismatch', another tool holds a probe on the same function: stop it and retry"
    )]
    Attach {
        symbol: String,
        path: String,
        reason: String,
    },
}

fn is_eperm(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<io::Error>()
            && io.raw_os_error() == Some(libc::EPERM)
        {
            return true;
        }
        if err.to_string().contains("Operation not permitted") {
            return true;
        }
        cur = err.source();
    }
    false
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(err) = cur {
        s.push_str(": ");
        s.push_str(&err.to_string());
        cur = err.source();
    }
    s
}

/// A uprobe that would not attach, named by symbol and library.
fn uprobe_err(e: &(dyn std::error::Error + 'static), symbol: &str, path: &str) -> ProbeError {
    if is_eperm(e) {
        ProbeError::NotPermitted
    } else {
        ProbeError::Attach {
            symbol: symbol.to_string(),
            path: path.to_string(),
            reason: chain(e),
        }
    }
}

/// The order the probes of one object go live, as (return probe?, index of the point): every
/// return probe first, so that no entry is ever saved without its return in place; then the
/// entries by `AttachStage`, releases before creations, so that no block is seen created whose
/// release could go unseen (see `AttachStage`).
fn attach_sequence<T>(
    points: &[T],
    has_return: impl Fn(&T) -> bool,
    stage: impl Fn(&T) -> AttachStage,
) -> Vec<(bool, usize)> {
    let returns = (0..points.len()).filter(|&i| has_return(&points[i]));
    let mut entries: Vec<usize> = (0..points.len()).collect();
    entries.sort_by_key(|&i| stage(&points[i]));
    returns
        .map(|i| (true, i))
        .chain(entries.into_iter().map(|i| (false, i)))
        .collect()
}

fn attach_err(name: &str, e: &(dyn std::error::Error + 'static)) -> ProbeError {
    if is_eperm(e) {
        ProbeError::NotPermitted
    } else {
        ProbeError::Attach {
            symbol: format!("syscalls:{name}"),
            path: "tracefs".into(),
            reason: chain(e),
        }
    }
}

/// aya finds tracepoints through tracefs; a fresh machine may not have it mounted.
fn ensure_tracefs() -> Result<(), ProbeError> {
    let mounted = |p: &str| std::path::Path::new(p).join("events").exists();
    if mounted("/sys/kernel/tracing") || mounted("/sys/kernel/debug/tracing") {
        return Ok(());
    }
    // SAFETY: mount(2) with static NUL-terminated strings.
    let rc = unsafe {
        libc::mount(
            c"nodev".as_ptr(),
            c"/sys/kernel/tracing".as_ptr(),
            c"tracefs".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 || !mounted("/sys/kernel/tracing") {
        return Err(ProbeError::Load(format!(
            "tracefs is not mounted and mounting it failed ({}): run `mount -t tracefs nodev /sys/kernel/tracing`",
            io::Error::last_os_error()
        )));
    }
    Ok(())
}

/// The program `name` of the object as its type `P`, loaded into the kernel on first use.
fn loaded_program<'a, P>(
    ebpf: &'a mut Ebpf,
    name: &str,
    load: fn(&mut P) -> Result<(), ProgramError>,
    is_loaded: fn(&P) -> bool,
) -> Result<&'a mut P, ProbeError>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    let prog: &mut P = ebpf
        .program_mut(name)
        .ok_or_else(|| ProbeError::Load(format!("program {name} missing from the eBPF object")))?
        .try_into()
        .map_err(|e: ProgramError| ProbeError::Load(chain(&e)))?;
    if !is_loaded(prog) {
        load(prog).map_err(|e| {
            if is_eperm(&e) {
                ProbeError::NotPermitted
            } else {
                ProbeError::Load(chain(&e))
            }
        })?;
    }
    Ok(prog)
}

/// The loaded programs and their maps: heap, CUDA, syscall, process and fault probes.
pub struct Probes {
    ebpf: Ebpf,
    /// Prints the programs' log (`debug_log`); stops with the probes.
    _kernel_log: Option<KernelLog>,
    config: ProbeConfig,
    mappings_attached: bool,
    /// Names of the attached functions (`malloc`, `memalign/aligned_alloc`, ...).
    pub attached: Vec<String>,
    /// Every attachment, by program, for `detach_all` (the heap's apart: duty-cycled windows
    /// detach them by role).
    uprobe_links: Vec<(&'static str, UProbeLinkId)>,
    heap_links: Vec<HeapLink>,
    /// Whether the heap programs are loaded for multi-uprobe links (decided at the first heap
    /// attachment, `heap_links_multi`), and a sampled heap's allocation functions for uprobe
    /// sessions (`heap_sessions`).
    heap_multi: Option<bool>,
    heap_session: Option<bool>,
    tracepoint_links: Vec<(&'static str, TracePointLinkId)>,
    /// Duty-cycled heap: where the heap probes go each time a window opens, and which of them
    /// are attached now.
    heap_sites: Vec<(AllocatorObject, UProbeScope)>,
    heap_attached: HeapRoles,
    /// Threads detaching a closed window's probes.
    heap_detaching: Vec<std::thread::JoinHandle<()>>,
    /// How long detaching the last window's allocation probes took (the traps they cost
    /// meanwhile are a window's too).
    heap_alloc_detach: Arc<Mutex<Option<Duration>>>,
    /// The window flags, once taken out of the object (`heap_window_flags`).
    heap_window: Option<HeapWindowFlags>,
}

/// What a heap attachment does in a duty-cycled window: allocation probes are on for the
/// window, free probes for the window and its grace period.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeapRole {
    Alloc,
    Free,
}

/// The duty-cycled heap's window flags in the kernel (`HEAP_WINDOW`), shared between the
/// recorder's loop and the thread that closes windows on time.
#[derive(Clone)]
pub struct HeapWindowFlags(Arc<Mutex<Array<MapData, u32>>>);

impl HeapWindowFlags {
    /// Opens or closes the `role` window.
    pub fn set(&self, role: HeapRole, open: bool) -> Result<(), ProbeError> {
        let which = match role {
            HeapRole::Alloc => heap_window::ALLOC,
            HeapRole::Free => heap_window::FREE,
        };
        let mut windows = self.0.lock().unwrap_or_else(|e| e.into_inner());
        windows
            .set(which, u32::from(open), 0)
            .map_err(|e| ProbeError::Load(chain(&e)))
    }
}

/// Which heap roles are attached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HeapRoles {
    pub alloc: bool,
    pub free: bool,
}

impl HeapRoles {
    const BOTH: HeapRoles = HeapRoles {
        alloc: true,
        free: true,
    };

    fn has(self, role: HeapRole) -> bool {
        match role {
            HeapRole::Alloc => self.alloc,
            HeapRole::Free => self.free,
        }
    }
}

/// The duty-cycled heap's counters at one moment (`HeapCounters::read`): heap calls and frees
/// of traced processes the probes saw, the frees of blocks the kernel's ledger held (None: it
/// keeps none), and the heap programs' run time so far, as the kernel counts it (None: not
/// asked, the kernel was not counting).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct HeapCount {
    pub calls: u64,
    pub frees: u64,
    pub held_freed: Option<u64>,
    pub run_time: Option<Duration>,
}

/// Reads a duty-cycled heap's counters on any thread (the one that closes a window reads them
/// at the window's edge): the ledger's call counts (`LEDGER_STATS`) and the kernel's count of
/// the run time of the heap programs attached when it was made, while
/// `BPF_ENABLE_STATS` is on (`heap_duty::CostMeter`). Holds its own descriptors of both.
pub struct HeapCounters {
    programs: Vec<ProgramFd>,
    stats: Option<PerCpuArray<MapData, u64>>,
    /// Whether the kernel keeps the heap ledger (else `HELD_FREED` counts nothing).
    ledger: bool,
}

impl HeapCounters {
    /// The counts now; `programs`: with the programs' run time. What the kernel cannot describe
    /// counts nothing.
    pub fn read(&self, programs: bool) -> HeapCount {
        let stat = |index: u32| per_cpu_total(self.stats.as_ref()?, index);
        let run_time = programs.then(|| {
            (self.programs.iter())
                .filter_map(|fd| ProgramInfo::new_from_fd(fd.as_fd()).ok())
                .map(|info| info.run_time())
                .sum()
        });
        HeapCount {
            calls: stat(ledger_stat::HEAP_CALLS).unwrap_or(0),
            frees: stat(ledger_stat::FREE_CALLS).unwrap_or(0),
            held_freed: self.ledger.then(|| stat(ledger_stat::HELD_FREED)).flatten(),
            run_time,
        }
    }
}

/// A heap attachment: a program on one or (multi-uprobe link) several points of a file.
struct HeapLink {
    program: &'static str,
    attachment: HeapAttachment,
    role: HeapRole,
    is_return: bool,
    /// Malloc's entry is among its points: the hottest, detached first.
    has_malloc_entry: bool,
}

enum HeapAttachment {
    Perf(UProbeLinkId),
    Multi(OwnedFd),
}

/// An attachment taken out of its program, to be closed on any thread.
enum Link {
    UProbe(#[allow(dead_code)] UProbeLink),
    TracePoint(#[allow(dead_code)] TracePointLink),
    Multi(#[allow(dead_code)] OwnedFd),
}

/// The heap probes of one program and role on one file, in the order they go live: one
/// multi-uprobe link, or a perf-event uprobe per point.
#[derive(Debug, PartialEq)]
struct HeapGroup {
    program: &'static str,
    role: HeapRole,
    is_return: bool,
    offsets: Vec<u64>,
    cookies: Vec<u64>,
    funcs: Vec<HeapFn>,
    /// The latest stage among its points: the group goes live when that stage may.
    stage: AttachStage,
    /// A uprobe session: entry and return in one program (`uprobe_multi::LinkKind::Session`).
    session: bool,
}

/// The points of an allocator object grouped by (program, role, entry or return): returns
/// first, then each group at the latest stage among its points (a group of releases before one
/// that creates). Within a group the points keep the order of `sequence` (`attach_sequence`),
/// which the kernel registers them in: realloc's entry before malloc's in one link.
/// `heap_groups_keep_the_attach_order` checks it.
/// With `session`, the allocation functions are one uprobe session at their entries (the
/// return's probe is set from there), and have no return group.
fn heap_groups(
    object: &AllocatorObject,
    sequence: &[(bool, usize)],
    (floor, session): (bool, bool),
    roles: HeapRoles,
) -> Vec<HeapGroup> {
    let mut groups: Vec<HeapGroup> = Vec::new();
    for &(is_return, at) in sequence {
        let point = &object.points[at];
        let hook = point.hook();
        let role = if hook.func == HeapFn::Free {
            HeapRole::Free
        } else {
            HeapRole::Alloc
        };
        if !roles.has(role) {
            continue;
        }
        let in_session = session && hook.return_program.is_some();
        if in_session && is_return {
            continue;
        }
        let (program, offset) = match (is_return, floor) {
            _ if in_session => (
                if floor {
                    FLOOR_SESSION_PROGRAM
                } else {
                    HEAP_SESSION_PROGRAM
                },
                point.function_offset,
            ),
            (true, true) => (FLOOR_RETURN_PROGRAM, point.function_offset),
            (true, false) => (
                hook.return_program.unwrap_or(hook.entry_program),
                point.function_offset,
            ),
            (false, true) => (FLOOR_ENTRY_PROGRAM, point.entry_offset),
            (false, false) => (hook.entry_program, point.entry_offset),
        };
        let cookie = u64::from(Cookie::Heap(hook.func).encode());
        let group = match groups
            .iter_mut()
            .position(|g| g.program == program && g.role == role && g.is_return == is_return)
        {
            Some(i) => &mut groups[i],
            None => {
                groups.push(HeapGroup {
                    program,
                    role,
                    is_return,
                    offsets: Vec::new(),
                    cookies: Vec::new(),
                    funcs: Vec::new(),
                    stage: hook.attach_stage(),
                    session: in_session,
                });
                groups.last_mut().expect("pushed")
            }
        };
        group.stage = group.stage.max(hook.attach_stage());
        group.offsets.push(offset);
        group.cookies.push(cookie);
        group.funcs.push(hook.func);
    }
    // Stable: groups of one stage keep their order.
    groups.sort_by_key(|g| (!g.is_return, g.stage));
    groups
}

/// `exp(−i / 64)` as a fraction of 2^32 (saturated): entry `i` of the kernel's table (it has no
/// floating point).
fn sample_table_entry(i: u32) -> u32 {
    let e = (-f64::from(i) / 64.0).exp() * 4_294_967_296.0;
    e.min(f64::from(u32::MAX)) as u32
}

/// The kernel's `exp(−x)` table for its byte-sampling draw (`tracer_common::heap_sample`).
fn fill_sample_table(ebpf: &mut aya::Ebpf) -> Result<(), ProbeError> {
    let load_err = |e: &dyn std::error::Error| ProbeError::Load(e.to_string());
    let map = (ebpf.map_mut("SAMPLE_EXP"))
        .ok_or_else(|| ProbeError::Load("SAMPLE_EXP map missing".into()))?;
    let mut table: aya::maps::Array<&mut MapData, u32> =
        aya::maps::Array::try_from(map).map_err(|e| load_err(&e))?;
    for i in 0..tracer_common::heap_sample::TABLE_LEN {
        let entry = sample_table_entry(i);
        table.set(i, entry, 0).map_err(|e| load_err(&e))?;
    }
    Ok(())
}

/// Threads that close attachments at once when the probes go.
const DETACH_THREADS: usize = 32;

impl Probes {
    pub fn load(config: ProbeConfig) -> Result<Probes, ProbeError> {
        if unsafe { libc::geteuid() } != 0 {
            return Err(ProbeError::NotPermitted);
        }
        // One scratch record per possible CPU (see SCRATCH_SLOTS in the eBPF program).
        let cpus = aya::util::nr_cpus()
            .map_err(|(what, e)| ProbeError::Load(format!("{what}: {e}")))?
            as u32;
        let globals = config.globals();
        let recent_slots = config.recent_slots();
        let mut loader = EbpfLoader::new();
        loader
            .map_max_entries("EVENTS", config.ring_bytes)
            .map_max_entries("SCRATCH", cpus)
            .map_max_entries("MAP_SCRATCH", cpus)
            .map_max_entries("CALL_SCRATCH", cpus)
            .map_max_entries("FAULT_SCRATCH", cpus)
            .map_max_entries("TORCH_SCRATCH", cpus)
            // The sampled set only when sampling: preallocated, it is 16 MiB of kernel memory.
            .map_max_entries(
                "SAMPLED",
                if config.heap_sample_mean > 0 {
                    1 << 18
                } else {
                    1
                },
            )
            // The kernel's heap ledger: the recent blocks' slots (preallocated, 2.5 MiB at
            // most), the hash table the rest (allocated as it fills).
            .map_max_entries("RECENT_BLOCKS", recent_slots.max(1))
            .map_max_entries(
                "HELD_BLOCKS",
                (config.heap_ledger_blocks - recent_slots).max(1),
            )
            .map_max_entries(
                "STACK_TOTALS",
                if config.heap_ledger_blocks > 0 {
                    tracer_common::heap_ledger::STACKS
                } else {
                    1
                },
            );
        if !config.debug_log {
            // Nothing is logged: the smallest ring the kernel takes, not aya-log's 128 KiB.
            loader.map_max_entries(tracer_common::LOG_RING, page_size());
        }
        for (name, value) in &globals {
            loader.override_global(name, value, true);
        }
        let mut ebpf = loader.load(EBPF_OBJECT).map_err(|e| {
            if is_eperm(&e) {
                ProbeError::NotPermitted
            } else {
                ProbeError::Load(chain(&e))
            }
        })?;
        // Sampled heaps draw from it, and so does a full kernel ledger (`FULL_SAMPLE_MEAN`).
        if config.heap_sample_mean > 0 || config.heap_ledger_blocks > 0 {
            fill_sample_table(&mut ebpf)?;
        }
        let kernel_log = if config.debug_log {
            Some(KernelLog::start(&mut ebpf).map_err(ProbeError::Load)?)
        } else {
            None
        };
        Ok(Probes {
            ebpf,
            _kernel_log: kernel_log,
            config,
            mappings_attached: false,
            attached: Vec::new(),
            uprobe_links: Vec::new(),
            heap_links: Vec::new(),
            heap_multi: None,
            heap_session: None,
            tracepoint_links: Vec::new(),
            heap_sites: Vec::new(),
            heap_attached: HeapRoles::default(),
            heap_detaching: Vec::new(),
            heap_alloc_detach: Arc::default(),
            heap_window: None,
        })
    }

    fn program(&mut self, name: &str) -> Result<&mut UProbe, ProbeError> {
        loaded_program(&mut self.ebpf, name, UProbe::load, |p: &UProbe| {
            p.fd().is_ok()
        })
    }

    /// Attaches the CUDA hooks (driver or runtime) of `object` for process `pid`, in
    /// `attach_sequence` order.
    pub fn attach_cuda(&mut self, pid: u32, object: &CudaObject) -> Result<(), ProbeError> {
        let scope = UProbeScope::OneProcess(NonZeroU32::new(pid).expect("pid > 0"));
        let hooks: Vec<&CudaHook> = object
            .points
            .iter()
            .map(|&(i, _)| &object.hooks[i])
            .collect();
        let sequence = attach_sequence(
            &hooks,
            |h| h.return_program.is_some(),
            |h| h.records.attach_stage(),
        );
        for (is_return, at) in sequence {
            let (index, offset) = object.points[at];
            let hook = hooks[at];
            let program = match (is_return, hook.return_program) {
                (true, Some(p)) => p,
                _ => hook.entry_program,
            };
            let point = UProbeAttachPoint {
                location: UProbeAttachLocation::AbsoluteOffset(offset),
                cookie: Some(u64::from((object.cookie)(index as u32).encode())),
            };
            let path = object.open_path.clone();
            let link = self
                .program(program)?
                .attach(point, &path, scope)
                .map_err(|e| uprobe_err(&e, hook.symbol, &object.target_path))?;
            self.uprobe_links.push((program, link));
        }
        Ok(())
    }

    /// Attaches every point of `object` for process `pid` (all its threads), in
    /// `attach_sequence` order.
    pub fn attach(&mut self, pid: u32, object: &AllocatorObject) -> Result<(), ProbeError> {
        let scope = UProbeScope::OneProcess(NonZeroU32::new(pid).expect("pid > 0"));
        self.attach_heap(object, scope)
    }

    /// Counts the malloc calls process `pid` makes in `span`, with a probe that does nothing
    /// else, before the heap probes go on: what tracing them will cost.
    pub fn count_mallocs(
        &mut self,
        pid: u32,
        object: &AllocatorObject,
        span: Duration,
    ) -> Result<u64, ProbeError> {
        let Some(malloc) = object
            .points
            .iter()
            .find(|p| p.hook().func == HeapFn::Malloc)
        else {
            return Ok(0);
        };
        let scope = UProbeScope::OneProcess(NonZeroU32::new(pid).expect("pid > 0"));
        let attach_point = UProbeAttachPoint {
            location: UProbeAttachLocation::AbsoluteOffset(malloc.entry_offset),
            cookie: None,
        };
        let path = object.open_path.clone();
        let program = self.program(HEAP_COUNT_PROGRAM)?;
        let id = (program.attach(attach_point, &path, scope))
            .map_err(|e| uprobe_err(&e, "malloc", &object.target_path))?;
        let before = self.ledger_stats().get(ledger_stat::HEAP_CALLS);
        std::thread::sleep(span);
        let after = self.ledger_stats().get(ledger_stat::HEAP_CALLS);
        if let Ok(link) = self.program(HEAP_COUNT_PROGRAM)?.take_link(id) {
            // Detaching waits for the kernel (tens of milliseconds): not on the way to attaching.
            std::thread::spawn(move || drop(link));
        }
        Ok(after.saturating_sub(before))
    }

    /// Whether the heap probes cover every process mapping the allocator (`attach_systemwide`).
    pub fn heap_systemwide(&self) -> bool {
        self.config.heap_systemwide
    }

    /// Attaches every point of `object` for every process that maps it, now and later (the
    /// kernel installs the breakpoints in each new mapping of the file: a forked child has them
    /// from its first instruction, an exec'd image as soon as it maps the file). The programs
    /// keep only traced processes (`heap_systemwide` must be set); the others pay a trap per
    /// call while the recording lasts.
    pub fn attach_systemwide(&mut self, object: &AllocatorObject) -> Result<(), ProbeError> {
        if !self.config.heap_systemwide {
            return Err(ProbeError::Load(
                "heap probes for every process need the kernel-side filter".into(),
            ));
        }
        self.attach_heap(object, UProbeScope::AllProcesses)
    }

    fn attach_heap(
        &mut self,
        object: &AllocatorObject,
        scope: UProbeScope,
    ) -> Result<(), ProbeError> {
        self.attached = object.points.iter().map(|p| p.name()).collect();
        if !self.config.heap_duty_cycled {
            return self.attach_heap_roles(object, scope, HeapRoles::BOTH);
        }
        // Duty-cycled: attached with the next window, or now if one is open.
        self.heap_sites.push((object.clone(), scope));
        self.attach_heap_roles(object, scope, self.heap_attached)
    }

    /// Attaches the points of `object` whose role is in `roles`, in `attach_sequence` order:
    /// a multi-uprobe link per program where the kernel makes them, else a perf-event uprobe
    /// per point.
    fn attach_heap_roles(
        &mut self,
        object: &AllocatorObject,
        scope: UProbeScope,
        roles: HeapRoles,
    ) -> Result<(), ProbeError> {
        let sequence = attach_sequence(
            &object.points,
            |p| p.hook().return_program.is_some(),
            |p| p.hook().attach_stage(),
        );
        let multi = self.heap_links_multi()?;
        let session = multi && self.heap_sessions()?;
        for group in heap_groups(object, &sequence, (self.config.floor, session), roles) {
            let has_malloc_entry = !group.is_return && group.funcs.contains(&HeapFn::Malloc);
            let link = |attachment| HeapLink {
                program: group.program,
                attachment,
                role: group.role,
                is_return: group.is_return,
                has_malloc_entry,
            };
            if multi {
                let pid = match scope {
                    UProbeScope::AllProcesses => None,
                    UProbeScope::OneProcess(pid) => Some(pid),
                    UProbeScope::CallingProcess => NonZeroU32::new(std::process::id()),
                };
                let points = uprobe_multi::MultiPoints {
                    path: &object.open_path,
                    offsets: &group.offsets,
                    cookies: &group.cookies,
                    pid,
                    kind: if group.session {
                        uprobe_multi::LinkKind::Session
                    } else if group.is_return {
                        uprobe_multi::LinkKind::Return
                    } else {
                        uprobe_multi::LinkKind::Entry
                    },
                };
                let program = self.heap_program(group.program)?;
                let fd = program.fd().map_err(|e| ProbeError::Load(chain(&e)))?;
                let made = uprobe_multi::attach(fd.as_fd(), &points).map_err(|e| {
                    let names: Vec<String> = group.funcs.iter().map(|f| format!("{f:?}")).collect();
                    uprobe_err(&e, &names.join(", "), &object.target_path)
                })?;
                self.heap_links.push(link(HeapAttachment::Multi(made)));
                continue;
            }
            for (i, (&offset, &cookie)) in group.offsets.iter().zip(&group.cookies).enumerate() {
                let attach_point = UProbeAttachPoint {
                    location: UProbeAttachLocation::AbsoluteOffset(offset),
                    cookie: Some(cookie),
                };
                let path = object.open_path.clone();
                let id = self
                    .heap_program(group.program)?
                    .attach(attach_point, &path, scope)
                    .map_err(|e| {
                        uprobe_err(&e, &format!("{:?}", group.funcs[i]), &object.target_path)
                    })?;
                let mut made = link(HeapAttachment::Perf(id));
                made.has_malloc_entry = !group.is_return && group.funcs[i] == HeapFn::Malloc;
                self.heap_links.push(made);
            }
        }
        Ok(())
    }

    /// Whether the heap programs go on multi-uprobe links: asked of the kernel once, before
    /// the first heap program is loaded (a program is loaded for one kind of link or the
    /// other), unless `PERF_UPROBES_ENV` says not to.
    fn heap_links_multi(&mut self) -> Result<bool, ProbeError> {
        if let Some(multi) = self.heap_multi {
            return Ok(multi);
        }
        let multi = std::env::var_os(PERF_UPROBES_ENV).is_none()
            && self.kernel_makes(
                MULTI_LINK_PROBE_PROGRAM,
                UProbe::load_multi,
                uprobe_multi::LinkKind::Entry,
            )?;
        if !multi {
            log::debug!("heap probes: perf-event uprobes, one per point");
        }
        self.heap_multi = Some(multi);
        Ok(multi)
    }

    /// Whether the kernel makes links of `kind`: asked with `program`, loaded with `load` for
    /// that kind (`uprobe_multi::supported`).
    fn kernel_makes(
        &mut self,
        program: &str,
        load: fn(&mut UProbe) -> Result<(), ProgramError>,
        kind: uprobe_multi::LinkKind,
    ) -> Result<bool, ProbeError> {
        let probe = loaded_program(&mut self.ebpf, program, load, |p: &UProbe| p.fd().is_ok())?;
        let fd = probe.fd().map_err(|e| ProbeError::Load(chain(&e)))?;
        Ok(uprobe_multi::supported(fd.as_fd(), kind))
    }

    /// Whether a sampled heap's allocation functions go on uprobe sessions (multi-uprobe
    /// links and Linux 6.13): asked of the kernel once, for a sampled heap only (exact tracing
    /// needs every return).
    fn heap_sessions(&mut self) -> Result<bool, ProbeError> {
        if let Some(session) = self.heap_session {
            return Ok(session);
        }
        let session = self.config.heap_sample_mean > 0
            && self.heap_links_multi()?
            && self.kernel_makes(
                FLOOR_SESSION_PROGRAM,
                UProbe::load_session,
                uprobe_multi::LinkKind::Session,
            )?;
        if self.config.heap_sample_mean > 0 && !session {
            log::debug!("sampled heap: no uprobe sessions, an unsampled call traps at its return");
        }
        self.heap_session = Some(session);
        Ok(session)
    }

    /// Heap program `name`, loaded for the kind of link `heap_links_multi` chose.
    fn heap_program(&mut self, name: &str) -> Result<&mut UProbe, ProbeError> {
        if matches!(name, HEAP_SESSION_PROGRAM | FLOOR_SESSION_PROGRAM) {
            return loaded_program(&mut self.ebpf, name, UProbe::load_session, |p: &UProbe| {
                p.fd().is_ok()
            });
        }
        let load = if self.heap_links_multi()? {
            UProbe::load_multi
        } else {
            UProbe::load
        };
        loaded_program(&mut self.ebpf, name, load, |p: &UProbe| p.fd().is_ok())
    }

    /// Duty-cycled heap: opens a window (attaches the allocation probes, and the free probes
    /// unless their grace period kept them). A site whose process is gone is dropped; the
    /// others' failures are returned after all were tried.
    pub fn open_heap_window(&mut self) -> Result<(), ProbeError> {
        let missing = HeapRoles {
            alloc: !self.heap_attached.alloc,
            free: !self.heap_attached.free,
        };
        self.heap_attached = HeapRoles::BOTH;
        let mut first_error = None;
        for (object, scope) in std::mem::take(&mut self.heap_sites) {
            // Its file is reached through the process that mapped it (`/proc/PID/root/...`):
            // gone with it.
            let gone = !object.open_path.exists()
                || matches!(scope, UProbeScope::OneProcess(pid) if !crate::proc::exists(pid.get()));
            if gone {
                continue;
            }
            if let Err(e) = self.attach_heap_roles(&object, scope, missing) {
                first_error.get_or_insert(e);
            }
            self.heap_sites.push((object, scope));
        }
        first_error.map_or(Ok(()), Err)
    }

    /// The kernel heap ledger's stack keys for `pid` cover its allocator's caller alone (and
    /// the Python frames): its frame-pointer walks run through code without frame pointers.
    pub fn shorten_heap_keys(&mut self, pid: u32) -> Result<(), ProbeError> {
        let map = (self.ebpf.map_mut("KEY_FRAMES"))
            .ok_or_else(|| ProbeError::Load("KEY_FRAMES map missing".into()))?;
        let mut map: AyaHashMap<&mut MapData, u32, u32> =
            AyaHashMap::try_from(map).map_err(|e| ProbeError::Load(chain(&e)))?;
        map.insert(pid, 1, 0)
            .map_err(|e| ProbeError::Load(chain(&e)))?;
        self.settings_changed()
    }

    /// A process's entry in `KEY_FRAMES` or `PY_OFFSETS` changed: `SETTINGS_VERSION` moves on,
    /// so that the heap probes read those maps again rather than what they cached of them.
    fn settings_changed(&mut self) -> Result<(), ProbeError> {
        let map = (self.ebpf.map_mut("SETTINGS_VERSION"))
            .ok_or_else(|| ProbeError::Load("SETTINGS_VERSION map missing".into()))?;
        let mut map: Array<&mut MapData, u32> =
            Array::try_from(map).map_err(|e| ProbeError::Load(chain(&e)))?;
        let version = map.get(&0, 0).map_err(|e| ProbeError::Load(chain(&e)))?;
        map.set(0, version.wrapping_add(1), 0)
            .map_err(|e| ProbeError::Load(chain(&e)))
    }

    /// Duty-cycled heap: opens or closes the `role` window's edge in the kernel (the probes
    /// record from the moment it opens to the moment it closes, whatever attaching and
    /// detaching them takes).
    pub fn set_heap_window(&mut self, role: HeapRole, open: bool) -> Result<(), ProbeError> {
        self.heap_window_flags()?.set(role, open)
    }

    /// The duty-cycled heap's window flags, shared: a window closes on time from a thread of
    /// its own, whatever the recorder's loop is busy with.
    pub fn heap_window_flags(&mut self) -> Result<HeapWindowFlags, ProbeError> {
        if let Some(flags) = &self.heap_window {
            return Ok(flags.clone());
        }
        let map = (self.ebpf.take_map("HEAP_WINDOW"))
            .ok_or_else(|| ProbeError::Load("HEAP_WINDOW map missing".into()))?;
        let array = Array::try_from(map).map_err(|e| ProbeError::Load(chain(&e)))?;
        let flags = HeapWindowFlags(Arc::new(Mutex::new(array)));
        self.heap_window = Some(flags.clone());
        Ok(flags)
    }

    /// Duty-cycled heap: detaches the probes of `role`, on a thread: the kernel waits tens of
    /// milliseconds per detach (docs/performance.md), one after another, while the recorder
    /// goes on draining (the window's edge in the kernel is closed already: they record
    /// nothing more). The hottest go first, so that their traps stop soonest: malloc's entry
    /// (no entry, no return trap), then the other entries, then the returns; on multi-uprobe
    /// links all at once, their waits overlapping.
    pub fn close_heap(&mut self, role: HeapRole) {
        let (mut closing, kept): (Vec<HeapLink>, Vec<HeapLink>) =
            std::mem::take(&mut self.heap_links)
                .into_iter()
                .partition(|l| l.role == role);
        self.heap_links = kept;
        closing.sort_by_key(|l| (l.is_return, !l.has_malloc_entry));
        let links: Vec<Link> = closing
            .into_iter()
            .filter_map(|l| self.take_heap_link(l))
            .collect();
        let took = (role == HeapRole::Alloc).then(|| self.heap_alloc_detach.clone());
        let detach = move || {
            let start = std::time::Instant::now();
            close_in_parallel(links);
            if let Some(took) = took {
                *took.lock().unwrap_or_else(|e| e.into_inner()) = Some(start.elapsed());
            }
        };
        match std::thread::Builder::new()
            .name("heap-detach".into())
            .spawn(detach)
        {
            Ok(handle) => self.heap_detaching.push(handle),
            Err(e) => log::debug!("detached on the recorder's thread: {e}"),
        }
        match role {
            HeapRole::Alloc => self.heap_attached.alloc = false,
            HeapRole::Free => self.heap_attached.free = false,
        }
    }

    /// How long detaching the last window's allocation probes took, once one was.
    pub fn heap_alloc_detach(&self) -> Option<Duration> {
        *self
            .heap_alloc_detach
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// A duty-cycled heap's counters (`HeapCounters`): the ledger's call counts and the heap
    /// programs attached now. Programs whose descriptor cannot be had count nothing.
    pub fn heap_counters(&mut self) -> HeapCounters {
        let mut names: Vec<&'static str> = Vec::new();
        for link in &self.heap_links {
            if !names.contains(&link.program) {
                names.push(link.program);
            }
        }
        let programs = names
            .into_iter()
            .filter_map(|name| self.heap_program(name).ok()?.fd().ok()?.try_clone().ok())
            .collect();
        // A handle of its own on the ledger's counters, for the thread that reads them.
        let stats = match self.ebpf.map("LEDGER_STATS") {
            Some(aya::maps::Map::PerCpuArray(data)) => data
                .info()
                .and_then(|info| MapData::from_id(info.id()))
                .and_then(|data| PerCpuArray::try_from(aya::maps::Map::PerCpuArray(data)))
                .ok(),
            _ => None,
        };
        HeapCounters {
            programs,
            stats,
            ledger: self.config.heap_ledger_blocks != 0,
        }
    }

    /// Traces the memory syscalls (mmap, munmap, mprotect, mremap, brk) of process `pid` with
    /// syscall tracepoints: every caller is seen (libc, raw `syscall()`, static code, runtimes
    /// that bypass libc) and no uprobe trap is paid.
    pub fn trace_mappings(&mut self, pid: u32) -> Result<(), ProbeError> {
        ensure_tracefs()?;
        let load_err = |e: &dyn std::error::Error| ProbeError::Load(e.to_string());
        {
            let map = self
                .ebpf
                .map_mut("TARGETS")
                .ok_or_else(|| ProbeError::Load("TARGETS map missing".into()))?;
            let mut targets: AyaHashMap<&mut MapData, u32, TracedProcess> =
                AyaHashMap::try_from(map).map_err(|e| load_err(&e))?;
            // Never over an entry: the kernel writes the values (a followed child's, before
            // user space hears of it), and would lose what it counted since.
            match targets.insert(pid, TracedProcess::NEW, BPF_NOEXIST) {
                Err(MapError::SyscallError(e))
                    if e.io_error.raw_os_error() == Some(libc::EEXIST) => {}
                other => other.map_err(|e| load_err(&e))?,
            }
        }
        if self.mappings_attached {
            return Ok(());
        }
        // Exits first, as with uprobes: an entry is never saved without its exit in place.
        for tp in SYSCALL_TRACEPOINTS {
            let link = self
                .tracepoint(SYSCALL_EXIT_PROGRAM)?
                .attach("syscalls", &format!("sys_exit_{}", tp.name))
                .map_err(|e| attach_err(tp.name, &e))?;
            self.tracepoint_links.push((SYSCALL_EXIT_PROGRAM, link));
        }
        for tp in SYSCALL_TRACEPOINTS.iter().chain(PROCESS_TRACEPOINTS) {
            let name = match tp.category {
                "syscalls" => format!("sys_enter_{}", tp.name),
                _ => tp.name.to_string(),
            };
            let link = self
                .tracepoint(tp.program)?
                .attach(tp.category, &name)
                .map_err(|e| attach_err(tp.name, &e))?;
            self.tracepoint_links.push((tp.program, link));
        }
        self.mappings_attached = true;
        Ok(())
    }

    fn tracepoint(&mut self, name: &str) -> Result<&mut TracePoint, ProbeError> {
        loaded_program(&mut self.ebpf, name, TracePoint::load, |p: &TracePoint| {
            p.fd().is_ok()
        })
    }

    /// Detaches every probe. Each attachment's close waits for the kernel's grace periods
    /// (RCU): one after another that took seconds for a hundred CUDA probes; closed from
    /// `DETACH_THREADS` threads at once, the waits overlap.
    pub fn detach_all(&mut self) {
        let mut links: Vec<Link> = Vec::new();
        for heap_link in std::mem::take(&mut self.heap_links) {
            links.extend(self.take_heap_link(heap_link));
        }
        for (name, id) in std::mem::take(&mut self.uprobe_links) {
            if let Ok(program) = self.program(name)
                && let Ok(link) = program.take_link(id)
            {
                links.push(Link::UProbe(link));
            }
        }
        for (name, id) in std::mem::take(&mut self.tracepoint_links) {
            if let Ok(program) = self.tracepoint(name)
                && let Ok(link) = program.take_link(id)
            {
                links.push(Link::TracePoint(link));
            }
        }
        close_in_parallel(links);
        for handle in std::mem::take(&mut self.heap_detaching) {
            let _ = handle.join();
        }
    }

    /// A heap attachment as a link to close, out of its program for a perf-event uprobe.
    fn take_heap_link(&mut self, link: HeapLink) -> Option<Link> {
        match link.attachment {
            HeapAttachment::Perf(id) => Some(Link::UProbe(
                self.heap_program(link.program).ok()?.take_link(id).ok()?,
            )),
            HeapAttachment::Multi(fd) => Some(Link::Multi(fd)),
        }
    }

    pub fn take_ring(&mut self) -> RingBuf<MapData> {
        RingBuf::try_from(self.ebpf.take_map("EVENTS").expect("EVENTS map"))
            .expect("EVENTS is a ring buffer")
    }

    /// Attaches phase rule `rule`'s entry probe (an entry probe only: the kernel tells a
    /// returned call from the stack, `tracer-ebpf/src/phase.rs`) for every process mapping the
    /// file: the program keeps the traced ones.
    pub fn attach_phase(&mut self, rule: &ResolvedRule) -> Result<(), ProbeError> {
        if let Some(p) = rule.rule.predicate {
            let map = (self.ebpf.map_mut("PHASE_PREDICATES"))
                .ok_or_else(|| ProbeError::Load("no PHASE_PREDICATES map".into()))?;
            let mut predicates: Array<_, phase::PhasePredicate> =
                Array::try_from(map).map_err(|e| ProbeError::Load(chain(&e)))?;
            predicates
                .set(rule.id, p.to_kernel(), 0)
                .map_err(|e| ProbeError::Load(chain(&e)))?;
        }
        let point = UProbeAttachPoint {
            location: UProbeAttachLocation::AbsoluteOffset(rule.offset),
            cookie: Some(u64::from(rule.id)),
        };
        let program = match rule.rule.usdt {
            true => PHASE_ENTER_USDT_PROGRAM,
            false => PHASE_ENTER_PROGRAM,
        };
        let link = self
            .program(program)?
            .attach(point, &rule.open_path, UProbeScope::AllProcesses)
            .map_err(|e| uprobe_err(&e, &rule.rule.symbol, &rule.shown_path))?;
        self.uprobe_links.push((program, link));
        if let Some(around) = rule.around {
            let link = self
                .program(PHASE_CALL_PROGRAM)?
                .attach(around, &rule.open_path, UProbeScope::AllProcesses)
                .map_err(|e| uprobe_err(&e, &rule.rule.symbol, &rule.shown_path))?;
            self.uprobe_links.push((PHASE_CALL_PROGRAM, link));
        }
        // Records carry phases from now on.
        self.set_phases_on(phase::ON, 1)
    }

    /// Records carry phases, and a process quiet for `idle_ms` is idle (`tracer-ebpf/src/
    /// phase.rs`): for Python rules, which attach no probe, and for the idle phase itself.
    pub fn enable_idle_phase(&mut self, idle_ms: u32) -> Result<(), ProbeError> {
        self.set_phases_on(phase::IDLE_MS, idle_ms)?;
        self.set_phases_on(phase::ON, 1)
    }

    fn set_phases_on(&mut self, slot: u32, value: u32) -> Result<(), ProbeError> {
        let map = (self.ebpf.map_mut("PHASES_ON"))
            .ok_or_else(|| ProbeError::Load("no PHASES_ON map".into()))?;
        let mut on: Array<_, u32> =
            Array::try_from(map).map_err(|e| ProbeError::Load(chain(&e)))?;
        on.set(slot, value, 0)
            .map_err(|e| ProbeError::Load(chain(&e)))
    }

    /// Entries of each phase so far, by phase id.
    pub fn phase_entries(&self) -> [u64; phase::IDS] {
        sum_per_cpu(&self.ebpf, "PHASE_ENTRIES")
    }

    /// The kernel heap ledger's frees by (allocated-in, freed-in) phase so far.
    pub fn phase_frees(&self) -> Option<PhaseFrees> {
        let array = Array::<&MapData, PhaseFrees>::try_from(self.ebpf.map("PHASE_FREES")?).ok()?;
        array.get(&0, 0).ok()
    }

    /// Tells the kernel side where the CPython interpreter of `pid` keeps its frames.
    pub fn set_python(
        &mut self,
        pid: u32,
        offsets: &tracer_common::python::PythonOffsets,
    ) -> Result<(), ProbeError> {
        let map = self
            .ebpf
            .map_mut("PY_OFFSETS")
            .ok_or_else(|| ProbeError::Load("no PY_OFFSETS map".into()))?;
        let mut map: aya::maps::HashMap<_, u32, tracer_common::python::PythonOffsets> =
            aya::maps::HashMap::try_from(map).map_err(|e| ProbeError::Load(chain(&e)))?;
        map.insert(pid, offsets, 0)
            .map_err(|e| ProbeError::Load(chain(&e)))?;
        self.settings_changed()
    }

    /// `pid` runs no CPython any more (exec, exit).
    pub fn forget_python(&mut self, pid: u32) {
        let removed = self.ebpf.map_mut("PY_OFFSETS").is_some_and(|map| {
            aya::maps::HashMap::<_, u32, tracer_common::python::PythonOffsets>::try_from(map)
                .is_ok_and(|mut map| map.remove(&pid).is_ok())
        });
        if removed {
            let _ = self.settings_changed();
        }
    }

    /// Stack capture counters summed over CPUs, by `stack_stat`.
    pub fn stack_stats(&self) -> [u64; stack_stat::COUNT as usize] {
        sum_per_cpu(&self.ebpf, "STACK_STATS")
    }

    /// Drop counters summed over CPUs, by `drop_cause`.
    pub fn drops(&self) -> [u64; drop_cause::COUNT as usize] {
        sum_per_cpu(&self.ebpf, "DROPS")
    }

    /// The kernel heap ledger's counts (`ledger_stat`), summed over CPUs.
    pub fn ledger_stats(&self) -> LedgerStats {
        LedgerStats(sum_per_cpu(&self.ebpf, "LEDGER_STATS"))
    }

    /// The kernel heap ledger's per-stack totals and peak, for the sink to read (once: the
    /// maps move out); None when the kernel keeps no heap ledger.
    pub fn take_kernel_totals(&mut self) -> Option<Box<dyn KernelTotals>> {
        if self.config.heap_ledger_blocks == 0 {
            return None;
        }
        let totals = AyaHashMap::try_from(self.ebpf.take_map("STACK_TOTALS")?).ok()?;
        let live = Array::try_from(self.ebpf.take_map("HEAP_LIVE")?).ok()?;
        Some(Box::new(KernelLedgerMaps { totals, live }))
    }
}

/// The kernel heap ledger's counts, by `ledger_stat`.
pub struct LedgerStats([u64; ledger_stat::COUNT as usize]);

impl LedgerStats {
    /// The count of `stat` (a `ledger_stat`).
    pub fn get(&self, stat: u32) -> u64 {
        self.0.get(stat as usize).copied().unwrap_or(0)
    }

    /// Blocks that went through the ring because one of the kernel's tables (blocks, stacks)
    /// was full: while none did, the kernel's live bytes and peak are the whole heap's.
    pub fn went_past_full_tables(&self) -> u64 {
        self.get(ledger_stat::BLOCKS_FULL) + self.get(ledger_stat::STACKS_FULL)
    }
}

/// The kernel heap ledger's maps that user space reads.
struct KernelLedgerMaps {
    totals: AyaHashMap<MapData, u64, StackTotals>,
    live: Array<MapData, HeapLive>,
}

impl KernelTotals for KernelLedgerMaps {
    fn read(&self, key: u64) -> Option<StackTotals> {
        self.totals.get(&key, 0).ok()
    }

    fn forget(&mut self, key: u64) {
        let _ = self.totals.remove(&key);
    }

    fn heap_peak(&self) -> Option<u64> {
        self.live.get(&0, 0).ok().map(|live| live.peak)
    }

    fn all(&self) -> Vec<(u64, StackTotals)> {
        self.totals.iter().filter_map(Result::ok).collect()
    }
}

/// Every probe detaches when `Probes` goes: no program stays attached to the target past the
/// recorder.
impl Drop for Probes {
    fn drop(&mut self) {
        self.detach_all();
    }
}

/// Drops `links` from up to `DETACH_THREADS` threads (on this one if no thread starts).
fn close_in_parallel<T: Send>(links: Vec<T>) {
    let per_thread = links.len().div_ceil(DETACH_THREADS).max(1);
    let mut links = links.into_iter();
    std::thread::scope(|scope| {
        loop {
            let chunk: Vec<T> = links.by_ref().take(per_thread).collect();
            if chunk.is_empty() {
                break;
            }
            if let Err(e) = std::thread::Builder::new().spawn_scoped(scope, move || drop(chunk)) {
                // The closure, chunk and all, was dropped on this thread.
                log::debug!("detaching on this thread: {e}");
            }
        }
    });
}

/// The system's page size.
fn page_size() -> u32 {
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u32::try_from(size).unwrap_or(4096)
}

/// The slots of per-CPU u64 array `name`, each summed over CPUs (zeros if it cannot be read).
fn sum_per_cpu<const N: usize>(ebpf: &aya::Ebpf, name: &str) -> [u64; N] {
    let mut out = [0u64; N];
    let Some(map) = ebpf.map(name) else {
        return out;
    };
    let Ok(array) = PerCpuArray::<&MapData, u64>::try_from(map) else {
        return out;
    };
    for (i, slot) in out.iter_mut().enumerate() {
        if let Some(total) = per_cpu_total(&array, i as u32) {
            *slot = total;
        }
    }
    out
}

/// Entry `index` of a per-CPU counter array, summed over the CPUs; None when unreadable.
fn per_cpu_total<T: std::borrow::Borrow<MapData>>(
    array: &PerCpuArray<T, u64>,
    index: u32,
) -> Option<u64> {
    let values = array.get(&index, 0).ok()?;
    Some(values.iter().sum())
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use object::{Object, ObjectSymbol};
    use tracer_common::HeapFn;

    use super::*;
    use crate::hooks::{self, CUDA_HOOKS, HOOKS, RUNTIME_HOOKS};

    /// Every program user space loads by name is in the object: the programs live in the eBPF
    /// crate's modules and are exported under their function names.
    /// Attachments are closed on many threads at once, every one of them.
    #[test]
    fn links_close_on_many_threads() {
        use std::{
            collections::HashSet,
            sync::{Arc, Mutex},
            thread::ThreadId,
        };
        struct Closing(Arc<Mutex<Vec<ThreadId>>>);
        impl Drop for Closing {
            fn drop(&mut self) {
                // Long enough that one thread could not take every link before the others start.
                std::thread::sleep(std::time::Duration::from_millis(20));
                self.0.lock().unwrap().push(std::thread::current().id());
            }
        }
        let closed = Arc::new(Mutex::new(Vec::new()));
        let n = DETACH_THREADS * 3;
        let links: Vec<Closing> = (0..n).map(|_| Closing(closed.clone())).collect();
        close_in_parallel(links);
        let closed = closed.lock().unwrap();
        assert_eq!(closed.len(), n);
        let threads: HashSet<&ThreadId> = closed.iter().collect();
        assert_eq!(threads.len(), DETACH_THREADS);
        assert!(!threads.contains(&std::thread::current().id()));
    }

    #[test]
    fn every_program_loaded_by_name_is_in_the_object() {
        let object = object::File::parse(EBPF_OBJECT).expect("the eBPF object is ELF");
        let defined: HashSet<&str> = object
            .symbols()
            .filter(|s| s.is_definition())
            .filter_map(|s| s.name().ok())
            .collect();
        let heap = HOOKS
            .iter()
            .flat_map(|h| [Some(h.entry_program), h.return_program]);
        let cuda = CUDA_HOOKS
            .iter()
            .chain(RUNTIME_HOOKS)
            .flat_map(|h| [Some(h.entry_program), h.return_program]);
        let tracepoints = SYSCALL_TRACEPOINTS
            .iter()
            .chain(PROCESS_TRACEPOINTS)
            .map(|t| Some(t.program));
        let own = [
            SYSCALL_EXIT_PROGRAM,
            FLOOR_ENTRY_PROGRAM,
            FLOOR_RETURN_PROGRAM,
            HEAP_COUNT_PROGRAM,
            MULTI_LINK_PROBE_PROGRAM,
            HEAP_SESSION_PROGRAM,
            FLOOR_SESSION_PROGRAM,
            PHASE_ENTER_PROGRAM,
            PHASE_ENTER_USDT_PROGRAM,
            PHASE_CALL_PROGRAM,
        ]
        .map(Some);
        for name in heap.chain(cuda).chain(tracepoints).chain(own).flatten() {
            assert!(
                defined.contains(name),
                "program {name} missing from the object"
            );
        }
    }

    /// Each hook's cookie leads back to it and to no other table.
    #[test]
    fn every_hook_has_a_cookie_of_its_own() {
        assert!(CUDA_HOOKS.len() <= Cookie::TABLE_MAX as usize);
        for (i, hook) in CUDA_HOOKS.iter().enumerate() {
            let cookie = Cookie::Cuda(i as u32).encode();
            assert!(hooks::cuda_hook(cookie).is_some_and(|h| h.symbol == hook.symbol));
            assert!(hooks::runtime_hook(cookie).is_none());
        }
        for (i, hook) in RUNTIME_HOOKS.iter().enumerate() {
            let cookie = Cookie::Runtime(i as u32).encode();
            assert!(hooks::runtime_hook(cookie).is_some_and(|h| h.symbol == hook.symbol));
            assert!(hooks::cuda_hook(cookie).is_none());
        }
        for func in HeapFn::ALL {
            let cookie = Cookie::Heap(func).encode();
            assert!(hooks::cuda_hook(cookie).is_none() && hooks::runtime_hook(cookie).is_none());
        }
    }

    #[test]
    fn debug_log_is_a_global_off_by_default() {
        let globals = ProbeConfig::default().globals();
        assert!(globals.contains(&(global::DEBUG_LOG, 0)));
        let debug = ProbeConfig {
            debug_log: true,
            ..ProbeConfig::default()
        };
        assert!(debug.globals().contains(&(global::DEBUG_LOG, 1)));
    }

    /// One group per program and role, in the order the probes must go live: the return
    /// program first (every allocation's return), free (a release) before the creations; each
    /// point in exactly one group, with its own cookie.
    #[test]
    fn heap_groups_keep_the_attach_order() {
        let object = AllocatorObject {
            target_path: "libc.so.6".into(),
            open_path: "/libc.so.6".into(),
            points: HOOKS
                .iter()
                .enumerate()
                .map(|(i, hook)| resolve::AttachPoint {
                    hooks: vec![hook],
                    function_offset: 0x1000 * (i as u64 + 1),
                    entry_offset: 0x1000 * (i as u64 + 1) + 9,
                })
                .collect(),
        };
        let sequence = attach_sequence(
            &object.points,
            |p| p.hook().return_program.is_some(),
            |p| p.hook().attach_stage(),
        );
        let groups = heap_groups(&object, &sequence, (false, false), HeapRoles::BOTH);
        assert!(groups[0].is_return, "{groups:?}");
        assert_eq!(
            groups[0].offsets.len(),
            HOOKS.len() - 1,
            "all but free return"
        );
        assert!(groups[1..].iter().all(|g| !g.is_return));
        let group_of = |func: HeapFn| {
            groups
                .iter()
                .position(|g| !g.is_return && g.funcs.contains(&func))
                .unwrap()
        };
        for creator in [HeapFn::Malloc, HeapFn::Calloc, HeapFn::PosixMemalign] {
            assert!(group_of(HeapFn::Free) < group_of(creator), "{creator:?}");
            assert!(
                group_of(HeapFn::Realloc) <= group_of(creator),
                "{creator:?}"
            );
        }
        assert_eq!(groups[group_of(HeapFn::Free)].role, HeapRole::Free);
        // One program for every allocation entry: realloc registered before malloc in it.
        let entries = &groups[group_of(HeapFn::Malloc)];
        let at = |func| entries.funcs.iter().position(|&f| f == func).unwrap();
        assert!(at(HeapFn::Realloc) < at(HeapFn::Malloc));
        assert_eq!(
            groups.len(),
            3,
            "returns, free, every allocation entry: {groups:?}"
        );
        let entries: usize = groups[1..].iter().map(|g| g.offsets.len()).sum();
        assert_eq!(entries, HOOKS.len());
        for g in &groups {
            for (func, cookie) in g.funcs.iter().zip(&g.cookies) {
                assert_eq!(*cookie, u64::from(Cookie::Heap(*func).encode()));
            }
        }
        // A sampled heap on uprobe sessions: free's entry, then one session over every
        // allocation function's first instruction (its return is set from there).
        let sessions = heap_groups(&object, &sequence, (false, true), HeapRoles::BOTH);
        assert_eq!(sessions.len(), 2, "{sessions:?}");
        assert_eq!(sessions[0].funcs, [HeapFn::Free]);
        assert!(sessions[1].session && !sessions[1].is_return);
        assert_eq!(sessions[1].program, HEAP_SESSION_PROGRAM);
        assert_eq!(sessions[1].offsets.len(), HOOKS.len() - 1);
        assert!(
            sessions[1].offsets.iter().all(|o| o % 0x1000 == 0),
            "function offsets"
        );
        // A window's free probes alone: one group.
        let free_only = HeapRoles {
            alloc: false,
            free: true,
        };
        let groups = heap_groups(&object, &sequence, (false, false), free_only);
        assert_eq!(groups.len(), 1);
        assert_eq!(groups[0].offsets, [0x1000 * 5 + 9]);
    }

    /// Releases go live before creations, every return before every entry: attaching malloc
    /// before free let blocks be seen allocated and never freed (hundreds of missed frees).
    #[test]
    fn releases_go_live_before_creations_and_returns_before_entries() {
        let heap: Vec<&crate::hooks::Hook> = HOOKS.iter().collect();
        let order = attach_sequence(&heap, |h| h.return_program.is_some(), |h| h.attach_stage());
        let position = |symbol: &str, is_return: bool| {
            order
                .iter()
                .position(|&(r, i)| r == is_return && heap[i].symbol == symbol)
                .unwrap_or_else(|| panic!("{symbol} ({is_return}) not attached"))
        };
        let first_entry = order.iter().position(|&(r, _)| !r).unwrap();
        assert!(order[first_entry..].iter().all(|&(r, _)| !r));
        assert_eq!(order.len(), first_entry + heap.len());
        for creator in ["malloc", "calloc", "posix_memalign", "valloc"] {
            assert!(
                position("free", false) < position(creator, false),
                "{creator}"
            );
            assert!(
                position("realloc", false) < position(creator, false),
                "{creator}"
            );
        }

        let cuda: Vec<&CudaHook> = CUDA_HOOKS.iter().collect();
        let order = attach_sequence(
            &cuda,
            |h| h.return_program.is_some(),
            |h| h.records.attach_stage(),
        );
        let entry = |symbol: &str| {
            order
                .iter()
                .position(|&(r, i)| !r && cuda[i].symbol == symbol)
                .unwrap()
        };
        assert!(entry("cuMemFree_v2") < entry("cuMemAlloc_v2"));
        assert!(entry("cuMemUnmap") < entry("cuMemMap"));
        assert!(entry("cuMemRelease") < entry("cuMemCreate"));
    }
}
