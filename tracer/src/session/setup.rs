//! Setting a recording up: the checks that need nothing attached (privilege, output path), the
//! probes, the target (found by PID or launched), attaching, and opening the recording.

use std::{
    collections::HashMap,
    io::{IsTerminal, Write},
    path::Path,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use tokio::signal::unix::{SignalKind, signal};

use crate::{
    cuda::nvml::{self as gpu, GpuMemorySource},
    escape,
    model::TargetInfo,
    probes::{
        ProbeError, Probes,
        resolve::{self, AllocatorObject},
    },
    proc::{
        maps::{self, Mapping},
        stat,
    },
    recording::Writer,
    session::{
        RecordOptions, TargetSpec,
        batch::RingReader,
        children::ProcessSet,
        cuda_hooking::{CudaHooked, hook_cuda},
        exits::Exits,
        gpu_sampling::sample_gpu,
        heap_duty::{self, DutyCycle},
        launch::{self, LaunchedCommand},
        lock::{TargetLock, lock_target},
        phases::{self, GivenRule, PythonRule, ResolvedRule},
        python_detection::detect_python,
        recorder::{Recorder, Signals},
        rss_sampling::sample_rss,
        sink::EventSink,
        target::{self, ExitWatch, TargetError},
    },
};

/// Checks what needs nothing attached, privilege first (it is the one error whose remedy
/// applies to every other check), then installs the signal handlers.
pub fn prepare(opts: &RecordOptions) -> anyhow::Result<Signals> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(ProbeError::NotPermitted.into());
    }
    Writer::check_output_path(&opts.output, opts.force)?;
    // Handlers first: a SIGINT that arrives right after `attached` must finalize, not kill.
    Ok(Signals {
        interrupt: signal(SignalKind::interrupt())?,
        terminate: signal(SignalKind::terminate())?,
        hangup: signal(SignalKind::hangup())?,
    })
}

/// The process to trace; a launched command is held stopped until `release`.
struct Target {
    pid: u32,
    command: String,
    /// Its mappings when found.
    maps: Vec<Mapping>,
    launched: Option<LaunchedCommand>,
    /// This recorder's hold on it.
    lock: Option<TargetLock>,
}

/// The target with the probes attached.
pub struct Attached {
    probes: Probes,
    target: Target,
    allocator: Option<AllocatorObject>,
    exit_watch: ExitWatch,
    initial_brk: Option<u64>,
    cuda_hooked: CudaHooked,
    phases_given: Vec<GivenRule>,
    phase_rules: Vec<ResolvedRule>,
    /// Native rules whose library is not mapped yet.
    phases_pending: Vec<GivenRule>,
    /// Whether the idle phase is on (`--idle-after`).
    idle_on: bool,
}

/// Loads the probes, finds the target and its allocator, and attaches.
pub fn attach(opts: &RecordOptions) -> anyhow::Result<Attached> {
    let mut probes = Probes::load(opts.probes.clone())?;
    let target = find_target(&opts.target, &opts.output, opts.heap)?;
    let pid = target.pid;
    let allocator = if opts.heap {
        Some(resolve::find_allocator(pid, &target.maps)?)
    } else {
        None
    };
    let exit_watch = ExitWatch::new(pid)?;
    if let (TargetSpec::Pid(_), Some(allocator), None) = (&opts.target, &allocator, opts.heap_duty)
        && !opts.probes.floor
    {
        say_heap_cost(&mut probes, pid, allocator);
    }
    phases::check_user_rules(&opts.phases)?;
    let phases_given = match opts.phase_profiles {
        true => phases::with_profiles(&opts.phases, &target.maps),
        false => opts.phases.iter().map(|r| (r.clone(), None)).collect(),
    };
    let phases::Resolution {
        resolved: phase_rules,
        pending: phases_pending,
    } = phases::resolve(&phases_given, pid, &target.maps)?;
    for (rule, _) in phases_pending
        .iter()
        .filter(|(_, profile)| profile.is_none())
    {
        eprintln!(
            "phase rule {}: no traced process maps '{}' yet: attached when one does",
            escape::for_terminal(&rule.to_string()),
            escape::for_terminal(&rule.lib)
        );
    }
    let initial_brk = current_brk(pid);
    // The idle phase where phases are: the user's rules, or a profile's native rule attached
    // (a profile's Python rule turns it on when it first matches, `Recorder::tick`).
    let idle_now = opts.idle_after_ms > 0 && (!opts.phases.is_empty() || !phase_rules.is_empty());
    let attached = (phase_rules
        .iter()
        .try_for_each(|rule| probes.attach_phase(rule)))
    .and_then(|()| match idle_now {
        true => probes.enable_idle_phase(opts.idle_after_ms),
        false => Ok(()),
    })
    .and_then(|()| probes.trace_mappings(pid))
    .and_then(|()| match &allocator {
        Some(allocator) if opts.probes.heap_systemwide => probes.attach_systemwide(allocator),
        Some(allocator) => probes.attach(pid, allocator),
        None => Ok(()),
    });
    if let Err(e) = attached {
        if exit_watch.has_exited() {
            return Err(TargetError::ExitedDuringAttach { pid }.into());
        }
        return Err(e.into());
    }
    if exit_watch.has_exited() && target.launched.is_none() {
        return Err(TargetError::ExitedDuringAttach { pid }.into());
    }
    let mut cuda_hooked = CudaHooked::new(opts.torch_allocator);
    if let Ok(maps) = maps::read_maps(pid) {
        hook_cuda(pid, &maps, &mut probes, &mut cuda_hooked);
    }
    Ok(Attached {
        probes,
        target,
        allocator,
        exit_watch,
        initial_brk,
        cuda_hooked,
        phases_given,
        phase_rules,
        phases_pending,
        idle_on: idle_now,
    })
}

/// Finds the target and its mappings, and takes the lock on it (one recorder per process); a
/// launched command is held stopped meanwhile.
fn find_target(spec: &TargetSpec, output: &Path, heap: bool) -> Result<Target, TargetError> {
    match spec {
        TargetSpec::Pid(pid) => {
            let command = target::check_pid(*pid)?;
            let lock = lock_target(*pid, output)?;
            let maps = maps::read_maps(*pid)?;
            if maps.is_empty() {
                return Err(TargetError::KernelThread { pid: *pid });
            }
            Ok(Target {
                pid: *pid,
                command,
                maps,
                launched: None,
                lock,
            })
        }
        TargetSpec::Command(argv) => {
            // Held until its libc is mapped also without heap tracing: stacks are then named
            // from a snapshot that has the C library, even for a command that exits at once.
            let launched = launch::launch(argv, heap)?;
            let lock = lock_target(launched.pid, output)?;
            Ok(Target {
                pid: launched.pid,
                command: launched.command.clone(),
                maps: launched.maps.clone(),
                launched: Some(launched),
                lock,
            })
        }
    }
}

/// The program break of `pid` now: the end of its `[heap]` mapping, else `start_brk` for a
/// process that has not grown it yet.
fn current_brk(pid: u32) -> Option<u64> {
    match maps::read_heap_end(pid).ok()? {
        Some(end) => Some(end),
        None => stat::read_stat(pid).ok()?.start_brk,
    }
}

/// Opens the recording, takes the first resident sample and lets a launched target go on.
pub fn open_recording(opts: &RecordOptions, attached: Attached) -> anyhow::Result<Recorder> {
    let Attached {
        mut probes,
        target,
        allocator,
        exit_watch,
        initial_brk,
        cuda_hooked,
        phases_given,
        phase_rules,
        phases_pending,
        idle_on,
    } = attached;
    let pid = target.pid;
    let started = Instant::now();
    let info = TargetInfo {
        pids: vec![pid],
        command: target.command.clone(),
        attached: target.launched.is_none(),
    };
    let mut writer = Writer::create(&opts.output, &info, unix_ns(), opts.force)?;
    let mut exits = Exits::new();
    exits.watch(pid);
    let reader = RingReader::new(probes.take_ring());
    let mut gpu = open_gpu(&mut writer)?;
    if let Some(thresholds) = &opts.check {
        writer.set_check(thresholds)?;
    }
    let fn_names = heap_fn_names(allocator.as_ref());
    let python_frames = opts.probes.python_frames;
    let mut sink = EventSink::new(pid, target.maps, fn_names, gpu.is_some(), python_frames);
    sink.learn_code_of(pid);
    if !phases_given.is_empty() {
        let python: Vec<PythonRule> = phases_given
            .iter()
            .filter_map(|(r, _)| r.python())
            .collect();
        sink.set_phases(&phases::names(&phase_rules), &python);
    }
    if let Some(kernel) = probes.take_kernel_totals() {
        sink.set_kernel_totals(kernel);
    }
    detect_python(pid, &mut sink, &mut probes);
    if let Some(brk) = initial_brk {
        sink.mappings.set_initial_brk(pid, brk);
    }
    // The first resident sample precedes everything the recording sees: taken before `attached`
    // tells anyone to go on (a launched command is still held at this point).
    if let Some(sample) = sample_rss(pid, 0, &sink.mappings) {
        writer.add_rss_samples(&[sample])?;
    }
    // What the driver holds for a process that ran before the recorder: pre-attach.
    if let Some(source) = gpu.as_mut()
        && target.launched.is_none()
    {
        sink.cuda.hidden.attached_to(pid);
        sample_gpu(source.as_mut(), &mut sink, &[pid], started, &mut writer)?;
    }
    // A duty-cycled heap's first window opens before the target is released.
    let duty = (opts.heap_duty).map(|d| DutyCycle::start(d, &mut probes, &[pid], started));
    if duty.is_some() {
        sink.ledger.set_duty_cycled();
    }
    announce(pid, &target.command, allocator.as_ref(), &probes);
    if let Some(launched) = &target.launched {
        launched.release()?;
    }
    Ok(Recorder {
        pid,
        follow_children: opts.probes.follow_children,
        stack_mode: opts.probes.stack_mode_name(),
        heap_sample_bytes: u64::from(opts.probes.heap_sample_mean),
        copy_bytes: opts
            .probes
            .stack_copy_other
            .max(opts.probes.stack_copy_heap),
        probes,
        allocator,
        launched: target.launched,
        exit_watch,
        target_ended: false,
        launched_status: None,
        exits,
        _lock: target.lock,
        cuda_hooked,
        reader,
        sink,
        writer,
        gpu,
        processes: ProcessSet::new(pid),
        duty,
        max_memory: opts.max_memory,
        started,
        progress: std::io::stderr().is_terminal(),
        last_events: 0,
        phase_rules,
        phases_pending,
        phases_given,
        marks: Vec::new(),
        marks_written: 0,
        phase_entries_seen: [0; tracer_common::phase::IDS],
        idle_pending_ms: (opts.idle_after_ms > 0 && !idle_on).then_some(opts.idle_after_ms),
    })
}

/// Display names of the hooked heap functions by cookie (aliases joined).
fn heap_fn_names(allocator: Option<&AllocatorObject>) -> HashMap<u32, String> {
    allocator
        .iter()
        .flat_map(|a| &a.points)
        .map(|p| (p.hook().func as u32, p.name()))
        .collect()
}

/// GPU memory per process, to reconcile with the traced device classes; the recording says
/// where it comes from, or why there is none.
fn open_gpu(writer: &mut Writer) -> anyhow::Result<Option<Box<dyn GpuMemorySource>>> {
    match gpu::open_source() {
        Ok(source) => {
            writer.set_gpu_source(&source.describe())?;
            Ok(Some(source))
        }
        Err(why) => {
            // Said in the report, where it matters (a process that used the GPU).
            writer.set_gpu_source(&format!("not available: {why}"))?;
            Ok(None)
        }
    }
}

/// Says on stderr what is traced.
fn announce(pid: u32, command: &str, allocator: Option<&AllocatorObject>, probes: &Probes) {
    let heap = match allocator {
        Some(a) => format!(
            "; heap: {} probes on {} [{}]{}",
            a.points.len(),
            escape::for_terminal(&a.target_path),
            probes.attached.join(", "),
            if probes.heap_systemwide() {
                " for every process mapping it, the traced ones kept (children from their first \
                 instruction; the others pay a trap per call while recording)"
            } else {
                ""
            }
        ),
        None => "; heap: not traced (add --heap for malloc by stack)".to_string(),
    };
    // The command line and the library path are the target's: escaped. A terminal that went
    // away fails the write: no matter.
    let _ = writeln!(
        std::io::stderr(),
        "attached to PID {pid} ({}): mappings: mmap, munmap, mprotect, mremap, brk{}",
        escape::for_terminal(command),
        escape::for_terminal(&heap)
    );
}

/// `-p PID --heap`: before the heap probes go on, counts the process's malloc calls for a
/// moment and says what tracing them will cost (one line on stderr).
fn say_heap_cost(probes: &mut Probes, pid: u32, allocator: &AllocatorObject) {
    const SPAN: Duration = Duration::from_millis(200);
    let cpu_ticks = || stat::read_stat(pid).ok().and_then(|s| s.cpu_ticks);
    let before = cpu_ticks();
    let mallocs = match probes.count_mallocs(pid, allocator, SPAN) {
        Ok(n) => n,
        Err(e) => {
            log::debug!("malloc calls not counted: {e}");
            return;
        }
    };
    // SAFETY: sysconf has no preconditions.
    let ticks_per_s = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let cpu_s = before
        .zip(cpu_ticks())
        .map(|(b, a)| a.saturating_sub(b) as f64 / ticks_per_s);
    let _ = writeln!(
        std::io::stderr(),
        "{}",
        heap_duty::heap_cost_line(pid, mallocs, SPAN, cpu_s)
    );
}

fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}
