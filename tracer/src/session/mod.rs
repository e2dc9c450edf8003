//! `alloctrace record`: attach, drain events into the ledger, commit the recording every second,
//! finalize on duration, signal or target exit.

pub mod target;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    ffi::OsString,
    io::{IsTerminal, Write},
    path::PathBuf,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use aya::maps::{MapData, RingBuf};
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{SignalKind, signal},
};
use tracer_common::{
    HeapFn, MAP_FROM_ALLOCATOR, MapEvent, ProcEvent, STACK_SP_CANDIDATE, STACK_TRUNCATED,
    drop_cause, map_op, proc_op,
};

use crate::{
    cuda::{CudaLayer, nvml as gpu, vmm::VmmLedger},
    events::{self, Event},
    hooks,
    ledger::{CellRef, Ledger, mappings::MappingLedger},
    model::{Class, FailureKey, GpuSample, RssSample, StackCapture, StackIndex, TargetInfo},
    probes::{ProbeConfig, Probes, resolve},
    proc::maps,
    python::{self, PythonProcess},
    recording::Writer,
    session::target::{ExitWatch, TargetError},
    stacks::unwind::{FileAccess, ProcessUnwinder, Truncation, UnwindCache},
    stacks::{FrameNamer, StackTable},
    views,
};

/// What to trace.
#[derive(Clone, Debug)]
pub enum TargetSpec {
    Pid(u32),
    Command(Vec<OsString>),
}

#[derive(Clone, Debug)]
pub struct RecordOptions {
    pub target: TargetSpec,
    pub output: PathBuf,
    pub force: bool,
    pub duration: Option<Duration>,
    pub probes: ProbeConfig,
    /// Trace the C allocator with uprobes (exact live heap by stack; costs a trap per call).
    /// Mappings and the program break are always traced, with tracepoints.
    pub heap: bool,
    /// How often the ring buffer is drained.
    pub poll_interval: Duration,
}

/// What `record` reports when it is done.
#[derive(Debug)]
pub struct RecordSummary {
    pub events: u64,
    pub lost: u64,
    pub stop_reason: String,
    /// This process's peak resident memory (VmHWM), KiB.
    pub tracer_peak_kib: u64,
}

fn own_peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// CPython arenas are 256 KiB (up to 3.9) or 1 MiB; smaller mmaps are not worth a look.
const PYTHON_ARENA_MIN: u64 = 256 << 10;
const PYTHON_ARENA_FUNCTIONS: [&str; 2] = ["_PyObject_ArenaMmap", "new_arena"];

/// Where every stack of a process or thread starts.
const ENTRY_POINTS: [&str; 4] = ["_start", "__clone3", "__clone", "clone3"];

/// CPython's bytecode evaluation loop: the native frames the Python frames replace.
const PYTHON_EVAL_FUNCTIONS: [&str; 1] = ["_PyEval_EvalFrameDefault"];

const PROT_EXEC: u64 = 0x4;
const MAP_SHARED: u64 = 0x01;
const MAP_ANONYMOUS: u64 = 0x20;
const MAP_STACK: u64 = 0x20000;

/// The class of a new mapping from its mmap flags (and, for a shared file mapping, what the file
/// is: /dev/shm files and memfds are shared memory, not files).
fn mmap_class(pid: u32, flags: u64, fd: i32) -> Class {
    if flags & MAP_STACK != 0 {
        Class::ThreadStack
    } else if flags & MAP_ANONYMOUS != 0 || fd < 0 {
        if flags & MAP_SHARED != 0 {
            Class::MmapShared
        } else {
            Class::Mmap
        }
    } else {
        let target = std::fs::read_link(format!("/proc/{pid}/fd/{fd}")).unwrap_or_default();
        let target = target.to_string_lossy();
        if flags & MAP_SHARED != 0
            && (target.starts_with("/dev/shm/") || target.starts_with("/memfd:"))
        {
            Class::MmapShared
        } else {
            Class::MmapFile
        }
    }
}

/// The program break of `pid` now: the end of its `[heap]` mapping, else `start_brk` (field 47
/// of /proc/PID/stat) for a process that has not grown it yet.
fn current_brk(pid: u32) -> Option<u64> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).ok()?;
    if let Some(line) = maps.lines().find(|l| l.ends_with("[heap]")) {
        let range = line.split_whitespace().next()?;
        return u64::from_str_radix(range.split_once('-')?.1, 16).ok();
    }
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_comm = stat.rsplit_once(')')?.1;
    after_comm.split_whitespace().nth(44)?.parse().ok()
}

/// Acts on a process-tree event: a child joins the traced processes (with heap probes when heap
/// tracing is on), an exec'd process may need probes on another allocator, an exit leaves.
fn follow_process(
    ev: &ProcEvent,
    allocator: Option<&resolve::AllocatorObject>,
    probes: &mut Probes,
    pids: &mut Vec<u32>,
    live: &mut Vec<u32>,
    exec_pending: &mut Vec<u32>,
) {
    if ev.op == proc_op::EXEC {
        // The new image's interpreter, if any, is detected when it maps its code.
        probes.forget_python(ev.pid);
    }
    match ev.op {
        proc_op::FORK => {
            if !pids.contains(&ev.pid) {
                pids.push(ev.pid);
            }
            live.push(ev.pid);
            // The child maps the parent's libc: the same file, the same offsets.
            if let Some(allocator) = allocator
                && let Err(e) = probes.attach(ev.pid, allocator)
                && std::path::Path::new(&format!("/proc/{}", ev.pid)).exists()
            {
                // (A child that is already gone needs no probes.)
                log::warn!("child {}: heap probes not attached: {e}", ev.pid);
            }
        }
        proc_op::EXEC if allocator.is_some() => exec_pending.push(ev.pid),
        proc_op::EXIT => live.retain(|&p| p != ev.pid),
        _ => {}
    }
}

/// After an exec with heap tracing: done (true) once the new image's allocator is the one the
/// process's probes are on (uprobes follow the file, so nothing to do) or probes were attached
/// to the new one; false to look again later (its libc not mapped yet).
fn heap_after_exec(
    pid: u32,
    allocator: Option<&resolve::AllocatorObject>,
    probes: &mut Probes,
) -> bool {
    let Ok(maps) = maps::read_maps(pid) else {
        return true;
    }; // gone
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
/// What /proc/PID/smaps says: `(start, end, Rss bytes)` of every VMA, and the exact resident and
/// anonymous totals (page-table walks; /proc/PID/status's counters are per-CPU approximations
/// that can be off by megabytes on a busy machine).
#[derive(Default)]
struct Smaps {
    vmas: Vec<(u64, u64, u64)>,
    rss: u64,
    anon: u64,
}

fn read_smaps(pid: u32) -> Smaps {
    let mut out = Smaps::default();
    let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/smaps")) else {
        return out;
    };
    let kib =
        |v: &str| -> u64 { v.trim().trim_end_matches("kB").trim().parse().unwrap_or(0) * 1024 };
    let mut current: Option<(u64, u64)> = None;
    for line in text.lines() {
        if let Some(rss) = line.strip_prefix("Rss:") {
            let rss = kib(rss);
            out.rss += rss;
            if let Some((start, end)) = current.take() {
                out.vmas.push((start, end, rss));
            }
        } else if let Some(anon) = line.strip_prefix("Anonymous:") {
            out.anon += kib(anon);
        } else if let Some((range, _)) = line.split_once(' ')
            && let Some((a, b)) = range.split_once('-')
            && let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16))
        {
            current = Some((a, b));
        }
    }
    out
}

/// CUDA objects hooked so far, and objects known to hold no CUDA runtime.
#[derive(Default)]
struct CudaHooked {
    /// (pid, inode) of the objects hooked in each process.
    hooked: HashSet<(u32, u64)>,
    /// Inodes of objects read for a static runtime and found without one.
    without_runtime: HashSet<u64>,
}

/// Hooks the CUDA driver of `pid`, its shared runtime and the runtimes linked statically into its
/// other objects, for those not hooked yet in it (at attach, and each second after: CUDA
/// libraries are usually dlopen'ed later). Says so on stderr.
fn hook_cuda(pid: u32, probes: &mut Probes, done: &mut CudaHooked) {
    let Ok(maps) = maps::read_maps(pid) else {
        return;
    };
    // The runtime is hooked before the driver is loaded (it loads the driver inside its first
    // call), and fails by itself without one.
    let mut objects: Vec<(&str, resolve::CudaObject)> = Vec::new();
    objects.extend(resolve::find_cuda_driver(pid, &maps).map(|d| ("CUDA driver", d)));
    objects.extend(resolve::find_cuda_runtime(pid, &maps).map(|rt| ("CUDA runtime", rt)));
    let (statics, without) = resolve::find_static_cuda_runtimes(pid, &maps, |inode| {
        done.without_runtime.contains(&inode) || done.hooked.contains(&(pid, inode))
    });
    done.without_runtime.extend(without);
    objects.extend(statics.into_iter().map(|rt| ("static CUDA runtime", rt)));
    for (what, object) in objects {
        if object.points.is_empty() || done.hooked.contains(&(pid, object.inode)) {
            continue;
        }
        match probes.attach_cuda(pid, &object) {
            Ok(()) => {
                done.hooked.insert((pid, object.inode));
                eprintln!(
                    "hooked {} in PID {pid}: {} {what} probes",
                    object.target_path,
                    object.points.len()
                );
            }
            Err(e) => log::warn!("PID {pid}: {what} not hooked: {e}"),
        }
    }
}

/// Resident memory of `pid` from /proc/PID/smaps (and status for shared memory and swap);
/// `None` once it is gone.
fn sample_rss(pid: u32, t_s: u64, mappings: &MappingLedger) -> Option<RssSample> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib = |key: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    let smaps = read_smaps(pid);
    let (traced_resident, arena_resident) = mappings.resident(pid, &smaps.vmas);
    // Exact totals from smaps; the shared-memory split only status has (approximate).
    let shmem = kib("RssShmem:").min(smaps.rss.saturating_sub(smaps.anon));
    // A zombie has released its memory: no sample rather than zeros.
    (smaps.rss > 0).then(|| RssSample {
        t_s,
        pid,
        rss: smaps.rss,
        anon: smaps.anon,
        file: smaps.rss - smaps.anon - shmem,
        shmem,
        swap: kib("VmSwap:"),
        arena: mappings.arena_bytes(pid),
        traced_resident,
        arena_resident,
    })
}

/// Starts reading the Python frames of `pid` if it runs a supported CPython not known yet (at
/// attach, fork, and when it maps code). Says so on stderr.
fn detect_python(pid: u32, sink: &mut EventSink, probes: &mut Probes) {
    if !sink.python_frames || sink.pythons.contains_key(&pid) {
        return;
    }
    let Ok(py) = PythonProcess::attach(pid) else {
        return; // no CPython mapped (yet), or one this version cannot read
    };
    let interp = py.interpreter();
    match probes.set_python(pid, &interp.offsets) {
        Ok(()) => {
            eprintln!(
                "Python frames: CPython {} in PID {pid} ({})",
                interp.version,
                interp.path.display()
            );
            sink.pythons.insert(pid, py);
        }
        Err(e) => log::warn!("PID {pid}: Python frames not read: {e}"),
    }
}

/// The frame namer of `pid`, made from its current mappings when missing.
fn namer_of(namers: &mut HashMap<u32, FrameNamer>, pid: u32) -> &mut FrameNamer {
    namers
        .entry(pid)
        .or_insert_with(|| FrameNamer::new(pid, Vec::new()))
}

/// The unwinder of live process `pid`, or an empty one (every stack truncated) if it is gone.
fn new_unwinder(pid: u32, cache: &UnwindCache) -> ProcessUnwinder {
    ProcessUnwinder::new(pid, cache)
        .unwrap_or_else(|_| ProcessUnwinder::empty(FileAccess::Process(pid), cache))
}

/// Samples the GPU memory of `pids`, records it and charges the residual's change (class
/// `gpu-untraced`) to the opaque calls since the last sample.
fn sample_gpu(
    source: &mut dyn gpu::GpuMemorySource,
    sink: &mut EventSink,
    pids: &[u32],
    started: Instant,
    writer: &mut Writer,
) -> anyhow::Result<()> {
    let t_s = started.elapsed().as_secs();
    let usage = source.sample(pids);
    let mut samples = Vec::with_capacity(usage.len());
    for &p in pids {
        match usage.get(&p) {
            Some(&used) => {
                // (gpu-untraced is not a device class: charging it leaves this unchanged.)
                let traced = sink.ledger.live_of(p, Class::is_device);
                sink.cuda.hidden.sample(&mut sink.ledger, p, used, traced);
                samples.push(GpuSample {
                    t_s,
                    pid: p,
                    used,
                    traced,
                });
            }
            // Not on a GPU (yet): nothing to charge.
            None => sink.cuda.hidden.forget(p),
        }
    }
    writer.add_gpu_samples(&samples)?;
    Ok(())
}

/// User-space loss causes, besides the kernel's `drop_cause::NAMES`.
const UNDECODABLE: &str = "undecodable_record";

/// Applies events to the ledger, interning stacks as they come.
struct EventSink {
    ledger: Ledger,
    cuda: CudaLayer,
    vmm: VmmLedger,
    mappings: MappingLedger,
    stacks: StackTable,
    /// Display names of hooked functions by cookie (aliases joined: `memalign/aligned_alloc`).
    fn_names: HashMap<u32, String>,
    events: u64,
    undecodable: u64,
    /// Reused buffer for a record's stack.
    ips: Vec<u64>,
    /// Processes that mapped an executable file since the last look: their frame namers must
    /// re-read maps while they still live.
    code_mapped: Vec<u32>,
    /// Frame namers by process.
    namers: HashMap<u32, FrameNamer>,
    /// DWARF unwinders of stack copies by process, sharing parsed unwind tables by build id.
    unwinders: HashMap<u32, ProcessUnwinder>,
    unwind_cache: UnwindCache,
    /// CPython processes whose Python frames are recorded: their code objects are read here.
    pythons: HashMap<u32, PythonProcess>,
    python_frames: bool,
    /// Stack copies unwound, and those that did not reach the outermost frame.
    unwinds: u64,
    unwinds_truncated: u64,
    /// Process-tree events, for the recorder to act on (attach heap probes, stop when all exit).
    proc_events: Vec<ProcEvent>,
}

impl EventSink {
    fn apply(&mut self, bytes: &[u8]) {
        self.events += 1;
        match events::decode(bytes) {
            Some(Event::Free(ev)) => {
                self.ledger.free(ev.tgid, ev.addr);
            }
            Some(Event::Alloc(ev, ips)) => {
                let is_realloc = matches!(
                    HeapFn::from_u32(ev.func),
                    Some(HeapFn::Realloc | HeapFn::Reallocarray)
                );
                if ev.addr == 0 && is_realloc && ev.size == 0 && ev.old_block() != 0 {
                    // glibc's realloc(p, 0) frees p and returns NULL.
                    self.ledger.free(ev.tgid, ev.old_block());
                    return;
                }
                let stack = self.stack_of(ev.tgid, &ips);
                if let Some(runtime) = hooks::runtime_hook(ev.func) {
                    self.cuda
                        .runtime_return(&mut self.ledger, &ev, runtime, stack);
                    return;
                }
                let cuda = hooks::cuda_hook(ev.func);
                let at = match cuda {
                    Some(h) if ev.addr != 0 => CellRef {
                        stack,
                        ..self.cuda.placement(&mut self.ledger, &ev, h)
                    },
                    _ => CellRef::new(ev.tgid, Class::Heap, stack),
                };
                let class = cuda.map_or(Class::Heap, |h| h.class);
                let vmm = cuda.map(|h| h.records);
                if ev.addr != 0 && vmm == Some(hooks::Records::VmmCreate) {
                    self.vmm
                        .create(&mut self.ledger, ev.tgid, ev.addr, ev.size, at);
                    return;
                }
                if ev.addr != 0 && vmm == Some(hooks::Records::VmmRetain) {
                    self.vmm.retain(ev.tgid, ev.addr);
                    return;
                }
                if ev.addr != 0
                    && vmm == Some(hooks::Records::Alloc)
                    && hooks::runtime_hook(ev.enclosing_calls().runtime).is_some()
                {
                    // Counted when the runtime call around it returns, at the runtime caller's
                    // stack (libcudart has no frame pointers: the driver's own walk stops in it).
                    self.cuda.defer_alloc(ev, at);
                    return;
                }
                if ev.addr == 0 {
                    let (function, error) = match cuda {
                        Some(h) => (h.symbol.to_string(), hooks::cuda_error_name(ev.err)),
                        None => (
                            self.fn_names
                                .get(&ev.func)
                                .cloned()
                                .unwrap_or_else(|| format!("fn{}", ev.func)),
                            events::errno_name(ev.err),
                        ),
                    };
                    let failure = FailureKey {
                        class,
                        pid: ev.tgid,
                        function,
                        size: ev.size,
                        error,
                        stack,
                    };
                    if cuda.is_some() {
                        self.cuda.driver_failure(&mut self.ledger, &ev, failure);
                    } else {
                        self.ledger.failure(failure);
                    }
                } else if is_realloc {
                    self.ledger
                        .realloc(ev.tgid, ev.old_block(), ev.addr, ev.size, at);
                } else {
                    self.ledger.alloc(ev.tgid, ev.addr, ev.size, at);
                }
            }
            Some(Event::Map(ev, ips)) => {
                let stack = self.stack_of(ev.tgid, &ips);
                self.apply_map(&ev, stack);
            }
            Some(Event::Fault(ev, ips)) => {
                let stack = self.stack_of(ev.tgid, &ips);
                self.ledger.fault(ev.tgid, stack, u64::from(ev.weight));
            }
            Some(Event::CudaCall(ev, ips)) => {
                let stack = self.stack_of(ev.tgid, &ips);
                self.cuda.call(&mut self.ledger, &mut self.vmm, &ev, stack);
            }
            Some(Event::Proc(ev)) => {
                match ev.op {
                    proc_op::FORK => {
                        self.mappings.fork(ev.parent, ev.pid);
                        self.learn_code_of(ev.pid);
                        if let Some(parent) = self.namers.get(&ev.parent) {
                            let child = parent.for_child(ev.pid);
                            self.namers.insert(ev.pid, child);
                        }
                    }
                    proc_op::EXEC => {
                        // The old image's stacks are named with the old image's mappings.
                        self.unwinders.remove(&ev.pid);
                        self.pythons.remove(&ev.pid);
                        if let Some(mut namer) = self.namers.remove(&ev.pid) {
                            self.stacks.name_pending_of(ev.pid, &mut namer);
                        }
                        // Its memory went with the old address space.
                        self.ledger.forget_process(ev.pid);
                        self.mappings.forget_process(&mut self.ledger, ev.pid);
                    }
                    _ => {}
                }
                self.proc_events.push(ev);
            }
            None => self.undecodable += 1,
        }
    }

    /// Reads an event's stack into `self.ips`, unwinding a stack copy with the process's
    /// call-frame information, and interns it. An unwind that did not reach the outermost frame
    /// is marked truncated.
    fn stack_of(&mut self, pid: u32, stack: &events::RawStack) -> Option<StackIndex> {
        let flags = self.native_stack(pid, stack);
        self.merge_python(pid, stack);
        self.stacks.intern(pid, &self.ips, flags)
    }

    /// Puts the Python frames recorded with a stack in place of the interpreter's innermost
    /// evaluation loop in `self.ips` (the outer loops' frames are among them), or after the
    /// native frames when the native walk did not reach the interpreter.
    fn merge_python(&mut self, pid: u32, stack: &events::RawStack) {
        let mut raw = stack.python_frames().peekable();
        if raw.peek().is_none() {
            return;
        }
        let Some(py) = self.pythons.get_mut(&pid) else {
            return;
        };
        let words: Vec<u64> = raw
            .map(|(code, instr_offset)| {
                let name = match py.symbolize(python::RawFrame { code, instr_offset }) {
                    Ok(frame) => frame.to_string(),
                    Err(_) => format!("[python] code {code:#x}"),
                };
                self.stacks.python_frame(name)
            })
            .collect();
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

    /// Reads an event's native stack into `self.ips`, unwinding a stack copy; returns the stack
    /// flags to intern it with.
    fn native_stack(&mut self, pid: u32, stack: &events::RawStack) -> u16 {
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
    fn learn_code_of(&mut self, pid: u32) {
        let cache = &self.unwind_cache;
        self.unwinders
            .entry(pid)
            .and_modify(|u| {
                let _ = u.refresh();
            })
            .or_insert_with(|| new_unwinder(pid, cache));
    }

    /// Whether the mmap whose stack is in `self.ips` comes from CPython's arena allocator: one of
    /// its first frames is `_PyObject_ArenaMmap` (obmalloc, CPython 3.8 to 3.13).
    fn is_python_arena(&mut self, pid: u32) -> bool {
        let namer = namer_of(&mut self.namers, pid);
        self.ips
            .iter()
            .take(3)
            .any(|&ip| namer.is_in(ip, &PYTHON_ARENA_FUNCTIONS))
    }

    fn apply_map(&mut self, ev: &MapEvent, stack: Option<StackIndex>) {
        let from_allocator = ev.flags & MAP_FROM_ALLOCATOR != 0;
        let (pid, a) = (ev.tgid, ev.args);
        if ev.op == map_op::MMAP {
            let (prot, fd) = (a[2], a[4] as i32);
            if prot & PROT_EXEC != 0 && fd >= 0 && !self.code_mapped.contains(&pid) {
                self.code_mapped.push(pid);
            }
        }
        let arena = ev.op == map_op::MMAP
            && mmap_class(pid, a[3], a[4] as i32) == Class::Mmap
            && a[1] >= PYTHON_ARENA_MIN
            && self.is_python_arena(pid);
        let (ledger, mappings) = (&mut self.ledger, &mut self.mappings);
        match ev.op {
            map_op::MMAP => {
                let (len, prot, flags, fd) = (a[1], a[2], a[3], a[4] as i32);
                let class = if arena {
                    Class::PythonArena
                } else {
                    mmap_class(pid, flags, fd)
                };
                let at = (!from_allocator).then(|| CellRef::new(pid, class, stack));
                mappings.map(ledger, pid, (ev.ret, len), prot != 0, class, at);
            }
            map_op::MUNMAP => mappings.unmap(ledger, pid, a[0], a[1]),
            map_op::MPROTECT => mappings.protect(ledger, pid, a[0], a[1], a[2] != 0),
            map_op::MREMAP => {
                mappings.remap(
                    ledger,
                    pid,
                    a[0],
                    a[1],
                    ev.ret,
                    a[2],
                    Class::Mmap,
                    |class| (!from_allocator).then(|| CellRef::new(pid, class, stack)),
                );
            }
            map_op::MADVISE => {
                let len = crate::ledger::mappings::page_up(a[1]);
                ledger.released(pid, stack, len);
            }
            map_op::BRK => {
                let at = (!from_allocator).then(|| CellRef::new(ev.tgid, Class::Heap, stack));
                mappings.brk(ledger, pid, ev.ret, at);
            }
            _ => self.undecodable += 1,
        }
    }

    fn drain(&mut self, ring: &mut RingBuf<MapData>) {
        while let Some(item) = ring.next() {
            self.apply(&item);
        }
    }

    fn lost(&self, probes: &Probes) -> BTreeMap<String, u64> {
        let mut lost: BTreeMap<String, u64> = drop_cause::NAMES
            .iter()
            .zip(probes.drops())
            .map(|(name, n)| (name.to_string(), n))
            .collect();
        if self.undecodable > 0 {
            lost.insert(UNDECODABLE.to_string(), self.undecodable);
        }
        lost
    }
}

fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// A command we launched stops with us, as under `perf record -- CMD`; a process we attached to
/// by PID is never disturbed.
fn forward_to_launched(launched: Option<&target::LaunchedCommand>, sig: i32) {
    if let Some(l) = launched {
        // SAFETY: plain kill(2) of our own child.
        unsafe { libc::kill(l.pid as libc::pid_t, sig) };
    }
}

/// Attaches to the target and records until done.
pub async fn record(opts: RecordOptions) -> anyhow::Result<RecordSummary> {
    // Privilege first: it is the one error whose remedy applies to every other check.
    if unsafe { libc::geteuid() } != 0 {
        return Err(crate::probes::ProbeError::NotPermitted.into());
    }
    Writer::check_output_path(&opts.output, opts.force)?;
    // Handlers first: a SIGINT that arrives right after `attached` must finalize, not kill.
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut probes = Probes::load(opts.probes.clone())?;

    // Find the target and its allocator; a launched command is held stopped meanwhile.
    let (pid, command, maps, launched) = match &opts.target {
        TargetSpec::Pid(pid) => {
            let command = target::check_pid(*pid)?;
            let maps = maps::read_maps(*pid)?;
            if maps.is_empty() {
                return Err(TargetError::KernelThread { pid: *pid }.into());
            }
            (*pid, command, maps, None)
        }
        TargetSpec::Command(argv) => {
            // Held until its libc is mapped also without heap tracing: stacks are then named
            // from a snapshot that has the C library, even for a command that exits at once.
            let launched = target::launch(argv, opts.heap)?;
            (
                launched.pid,
                launched.command.clone(),
                launched.maps.clone(),
                Some(launched),
            )
        }
    };
    let allocator = if opts.heap {
        Some(resolve::find_allocator(pid, &maps)?)
    } else {
        None
    };
    let exit_watch = ExitWatch::new(pid, launched.is_some())?;
    let initial_brk = current_brk(pid);
    let attached = probes.trace_mappings(pid).and_then(|()| match &allocator {
        Some(allocator) => probes.attach(pid, allocator),
        None => Ok(()),
    });
    if let Err(e) = attached {
        if exit_watch.has_exited() {
            return Err(TargetError::ExitedDuringAttach { pid }.into());
        }
        return Err(e.into());
    }
    if exit_watch.has_exited() && launched.is_none() {
        return Err(TargetError::ExitedDuringAttach { pid }.into());
    }
    // Processes whose CUDA driver is hooked, by the driver file's inode.
    let mut cuda_hooked = CudaHooked::default();
    hook_cuda(pid, &mut probes, &mut cuda_hooked);

    let started = Instant::now();
    let mut writer = Writer::create(
        &opts.output,
        &TargetInfo {
            pids: vec![pid],
            command: command.clone(),
        },
        unix_ns(),
        opts.force,
    )?;
    let mut ring = probes.take_ring();
    let fn_names: HashMap<u32, String> = allocator
        .iter()
        .flat_map(|a| &a.points)
        .map(|p| (p.hook().func as u32, p.name()))
        .collect();
    // GPU memory per process, to reconcile with the traced device classes.
    let mut gpu = match gpu::open_source() {
        Ok(source) => {
            writer.set_gpu_source(&source.describe())?;
            Some(source)
        }
        Err(why) => {
            // Said in the report, where it matters (a process that used the GPU).
            writer.set_gpu_source(&format!("not available: {why}"))?;
            None
        }
    };
    let mut sink = EventSink {
        ledger: Ledger::new(),
        cuda: CudaLayer::new(gpu.is_some()),
        vmm: VmmLedger::new(),
        mappings: MappingLedger::new(),
        stacks: StackTable::new(),
        fn_names,
        events: 0,
        undecodable: 0,
        ips: Vec::new(),
        code_mapped: Vec::new(),
        namers: HashMap::from([(pid, FrameNamer::new(pid, maps))]),
        unwinders: HashMap::new(),
        unwind_cache: UnwindCache::new(),
        unwinds: 0,
        unwinds_truncated: 0,
        pythons: HashMap::new(),
        python_frames: opts.probes.python_frames,
        proc_events: Vec::new(),
    };
    for class in Class::ALL {
        sink.ledger.track(class);
    }
    sink.learn_code_of(pid);
    detect_python(pid, &mut sink, &mut probes);
    if let Some(brk) = initial_brk {
        sink.mappings.set_initial_brk(pid, brk);
    }

    // The first resident sample precedes everything the recording sees: taken before `attached`
    // tells anyone to go on (a launched command is still held at this point).
    if let Some(sample) = sample_rss(pid, 0, &sink.mappings) {
        writer.add_rss_samples(&[sample])?;
    }
    let heap = match &allocator {
        Some(a) => format!(
            "; heap: {} probes on {} [{}]",
            a.points.len(),
            a.target_path,
            probes.attached.join(", ")
        ),
        None => "; heap: not traced (add --heap for malloc by stack)".to_string(),
    };
    eprintln!(
        "attached to PID {pid} ({command}): mappings: mmap, munmap, mprotect, mremap, brk{heap}"
    );
    if let Some(launched) = &launched {
        launched.release()?;
    }

    // SAFETY: the pidfd is owned by `exit_watch`, which outlives this registration.
    let exit_fd = unsafe { AsyncFd::register(exit_watch.raw_fd()) }
        .map_err(|e| anyhow::anyhow!("cannot watch the target's exit: {e}"))?;
    let deadline = opts.duration.map(|d| tokio::time::Instant::now() + d);
    let mut poll = tokio::time::interval(opts.poll_interval);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut tick = tokio::time::interval_at(
        tokio::time::Instant::now() + Duration::from_secs(1),
        Duration::from_secs(1),
    );
    let progress = std::io::stderr().is_terminal();
    let mut last_events = 0u64;

    // Traced processes: the target, then the children it forks. `live` are those not exited.
    let mut pids = vec![pid];
    let mut live: Vec<u32> = vec![pid];
    let mut main_exited: Option<String> = None;
    // Processes that exec'd with heap tracing on: their allocator may be another file now.
    let mut exec_pending: Vec<u32> = Vec::new();
    let commit = |sink: &mut EventSink,
                  writer: &mut Writer,
                  probes: &Probes,
                  live: &[u32]|
     -> anyhow::Result<()> {
        let t_s = started.elapsed().as_secs_f64();
        let samples: Vec<RssSample> = live
            .iter()
            .filter_map(|&p| sample_rss(p, t_s as u64, &sink.mappings))
            .collect();
        writer.add_rss_samples(&samples)?;
        let new_stacks = sink.stacks.take_new(&mut sink.namers);
        let [_, fp_under_pressure] = probes.stack_stats();
        writer.set_stack_capture(&StackCapture {
            mode: opts.probes.stack_mode_name().to_string(),
            copy_bytes: opts
                .probes
                .stack_copy_other
                .max(opts.probes.stack_copy_heap),
            copies: sink.unwinds,
            truncated: sink.unwinds_truncated,
            fp_under_pressure,
        })?;
        let series = sink.ledger.take_series(t_s as u64);
        let state = sink.ledger.state(&sink.lost(probes));
        writer.commit_tick(t_s, &new_stacks, &state, &series)?;
        Ok(())
    };

    let stop_reason = loop {
        tokio::select! {
            _ = poll.tick() => {
                sink.drain(&mut ring);
                for p in std::mem::take(&mut sink.code_mapped) {
                    // Also the first look at a process that exec'd: its new image's libraries.
                    namer_of(&mut sink.namers, p).refresh();
                    sink.learn_code_of(p);
                    detect_python(p, &mut sink, &mut probes);
                }
                let before = pids.len();
                for ev in std::mem::take(&mut sink.proc_events) {
                    follow_process(&ev, allocator.as_ref(), &mut probes, &mut pids, &mut live, &mut exec_pending);
                }
                if pids.len() != before {
                    writer.set_target_pids(&pids)?;
                    // A child inherits the parent's CUDA libraries, not its uprobes.
                    for &p in &pids[before..] {
                        hook_cuda(p, &mut probes, &mut cuda_hooked);
                        detect_python(p, &mut sink, &mut probes);
                    }
                }
                exec_pending.retain(|&p| !heap_after_exec(p, allocator.as_ref(), &mut probes));
                // Right after an opaque driver call (context, module, graph), while what it
                // allocated for itself is new.
                let waiting = sink.cuda.hidden.waiting();
                if let Some(source) = gpu.as_mut() && !waiting.is_empty() {
                    sample_gpu(source.as_mut(), &mut sink, &waiting, started, &mut writer)?;
                }
                if let Some(how) = &main_exited && live.is_empty() {
                    break how.clone();
                }
            }
            _ = tick.tick() => {
                for &p in &live {
                    hook_cuda(p, &mut probes, &mut cuda_hooked);
                }
                sink.drain(&mut ring);
                if let Some(source) = gpu.as_mut() {
                    sample_gpu(source.as_mut(), &mut sink, &live, started, &mut writer)?;
                }
                commit(&mut sink, &mut writer, &probes, &live)?;
                if progress {
                    let lost: u64 = sink.lost(&probes).values().sum();
                    let rate = sink.events - last_events;
                    last_events = sink.events;
                    eprint!(
                        "\r{rate} events/s, live heap {} in {} blocks, lost {lost}   ",
                        views::human_bytes(sink.ledger.totals(Class::Heap).live_bytes),
                        sink.ledger.live_blocks()
                    );
                    let _ = std::io::stderr().flush();
                }
            }
            _ = sigint.recv() => {
                forward_to_launched(launched.as_ref(), libc::SIGINT);
                break "interrupted (SIGINT)".to_string();
            }
            _ = sigterm.recv() => {
                forward_to_launched(launched.as_ref(), libc::SIGTERM);
                break "terminated (SIGTERM)".to_string();
            }
            guard = exit_fd.readable(), if main_exited.is_none() => {
                drop(guard);
                let how = exit_watch.reap().map(|h| format!(" ({h})")).unwrap_or_default();
                let how = format!("target exited{how}");
                live.retain(|&p| p != pid);
                // Followed children keep the recording going until they exit too.
                if live.is_empty() || !opts.probes.follow_children {
                    break how;
                }
                main_exited = Some(how);
            }
            _ = async { match deadline { Some(d) => tokio::time::sleep_until(d).await, None => std::future::pending().await } } => {
                break "duration elapsed".to_string();
            }
        }
    };
    if progress {
        eprintln!();
    }

    // Everything the target did before now is in the ring: drain it, then write the last state.
    sink.drain(&mut ring);
    sink.cuda.finish(&mut sink.ledger);
    commit(&mut sink, &mut writer, &probes, &live)?;
    writer.finalize(started.elapsed().as_secs_f64())?;
    let lost: u64 = sink.lost(&probes).values().sum();
    Ok(RecordSummary {
        events: sink.events,
        lost,
        stop_reason,
        tracer_peak_kib: own_peak_rss_kib(),
    })
}
