//! The `alloctrace` command line.

use std::{
    ffi::OsString,
    io::Write as _,
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use alloctrace::{
    check::{self, LoadPlan},
    escape, hooks,
    model::Class,
    model::{Thresholds, Warmup},
    output,
    probes::{ProbeConfig, StackMode},
    recording::{Reader, SeriesRead},
    session::{self, RecordOptions, TargetSpec, heap_duty::DutyOptions, phases::PhaseRule},
    views::{
        self,
        filter::{CellFilter, Layer},
        flamegraph, names, report,
    },
};
use clap::{Args, Parser, Subcommand, ValueEnum};

/// The recorder allocates through mimalloc, not the C library's malloc: the heap probes are on
/// that malloc in every process mapping it (filtered in the kernel), so each of the recorder's
/// own calls would trap as well.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "alloctrace",
    version,
    about = "eBPF memory-allocation tracer for LLM inference servers"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Trace a running process (-p PID) or a command (-- CMD ARGS...) into a recording.
    ///
    /// Heap tracing hooks malloc and friends with uprobes in the C library the target maps; every
    /// thread of the target is traced, other processes never. Stops when the duration ends,
    /// SIGINT, SIGTERM or SIGHUP arrives, or the target exits, and finalizes the recording in
    /// every case. One recorder per process: a second one on a traced process is refused. Needs
    /// root.
    ///
    /// A command launched with -- CMD never outlives the recording: when the duration ends or a
    /// signal arrives first, it gets SIGTERM (or that signal), then SIGKILL 5 s later (at once on
    /// a second signal), and the recording ends with it. A process attached to with -p is never
    /// signalled.
    ///
    /// Exit status: with -- CMD, the command's own when the recording ended because it exited
    /// (128 + N when signal N killed it, as a shell reports it); otherwise 0 once the recording
    /// is finalized; 1 on an error.
    Record(RecordArgs),
    /// A leak test from outside the process, for CI: records the target (-p PID, or -- CMD
    /// launched) while running a load command: --warmup runs, then --batches runs, marking the
    /// traced live memory (heap, mappings, device memory) at the end of each; then prints the
    /// Memory Growth Analysis (initial and final averages, growth and its percent, noise) and
    /// the stacks whose memory rose in every batch. The load command (run with sh -c) must
    /// return once its requests are answered. Every `record` option applies; the recording
    /// stays at -o FILE for the postmortem.
    ///
    /// Exit status: 0 no leak; 1 a leak (growth past --threshold); 2 too noisy to judge; 3 the
    /// check could not be made (an error, or fewer than two batches ran).
    Check(CheckArgs),
    /// Summarize a recording: totals per class, top live stacks, failures, lost events.
    Report {
        file: PathBuf,
        #[arg(long, value_enum, default_value_t = ReportFormat::Text)]
        format: ReportFormat,
        /// Write to this file instead of standard output.
        #[arg(short, long, value_name = "OUT")]
        output: Option<PathBuf>,
        /// Overwrite OUT if it exists.
        #[arg(short, long)]
        force: bool,
        /// Text: every frame and whole C++ names (by default stacks start past the allocator's
        /// own functions and C++ names lose argument lists and template arguments; the JSON
        /// always has everything).
        #[arg(long)]
        full_names: bool,
        #[command(flatten)]
        warmup: WarmupArgs,
    },
    /// Compare two recordings (before and after an upgrade, a configuration change): live bytes
    /// per class and per stack (matched by class, phase and frames), and the leak suspects of
    /// AFTER that BEFORE did not have or that grow at least twice as fast there.
    Diff {
        before: PathBuf,
        after: PathBuf,
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
        /// Write to this file instead of standard output.
        #[arg(short, long, value_name = "OUT")]
        output: Option<PathBuf>,
        /// Overwrite OUT if it exists.
        #[arg(short, long)]
        force: bool,
        /// Match and show stacks by their whole frames (see `report --full-names`).
        #[arg(long)]
        full_names: bool,
        /// Also write the differential flame graph: widths are AFTER's live bytes, colours the
        /// change from BEFORE (red grew, blue shrank).
        #[arg(long, value_name = "OUT.svg")]
        flamegraph: Option<PathBuf>,
    },
    /// Render live bytes by stack as a flamegraph SVG (root frames are the classes).
    Flamegraph {
        file: PathBuf,
        #[arg(short, long, value_name = "OUT.svg")]
        output: PathBuf,
        /// Overwrite OUT.svg if it exists.
        #[arg(short, long)]
        force: bool,
        /// Title of the picture.
        #[arg(long)]
        title: Option<String>,
        /// `live`: bytes live at the end, by class and stack (file mappings and thread stacks
        /// apart, in `static`: they never dwarf what can grow); `faults`: bytes faulted in
        /// (sampled page faults), by stack: which code made RSS grow; `leaks`: the leak
        /// suspects' growth after the warm-up (what kept growing); `allocated`: bytes allocated
        /// over the recording, freed or not (churn); `static`: file mappings and thread stacks
        /// reserved, at their mapped size.
        #[arg(long, value_enum, default_value_t = GraphKind::Live)]
        kind: GraphKind,
        /// Every frame and whole C++ names (see `report --full-names`).
        #[arg(long)]
        full_names: bool,
        #[command(flatten)]
        warmup: WarmupArgs,
        /// Only host memory (heap, mappings, pinned host memory) or only device memory (CUDA,
        /// PyTorch's tensors and cache, the driver's own): one scale each.
        #[arg(long, value_enum)]
        layer: Option<LayerArg>,
        /// Only these classes (repeatable): heap, mmap, cuda, torch, ...
        #[arg(long, value_name = "CLASS", value_parser = parse_class)]
        class: Vec<Class>,
        /// Only these phases (repeatable): serve, load, none, ...
        #[arg(long, value_name = "NAME")]
        phase: Vec<String>,
        /// Only these processes (repeatable).
        #[arg(long, value_name = "PID")]
        pid: Vec<u32>,
        /// The differential graph of two time points: the live bytes at the end against those
        /// at SECONDS (red grew since, blue shrank).
        #[arg(long, value_name = "SECONDS", value_parser = parse_seconds, conflicts_with = "kind")]
        since: Option<Duration>,
    },
    /// Render live bytes by class over time as an SVG chart, with the target's RSS and marks
    /// where a process died (the OOM killer), PyTorch's allocator ran out, or a check batch
    /// ended.
    Timeline {
        file: PathBuf,
        #[arg(short, long, value_name = "OUT.svg")]
        output: PathBuf,
        /// Overwrite OUT.svg if it exists.
        #[arg(short, long)]
        force: bool,
    },
    /// Print the table of hooked functions (Markdown; docs/hooks.md is this output).
    Hooks,
}

#[derive(Args)]
struct RecordArgs {
    /// PID of the process to attach to.
    #[arg(
        short,
        long,
        conflicts_with = "command",
        required_unless_present = "command"
    )]
    pid: Option<u32>,
    /// Stop after this many seconds.
    #[arg(short, long, value_name = "SECONDS", value_parser = parse_seconds)]
    duration: Option<Duration>,
    /// The recording to write (SQLite, see docs/recording.md).
    #[arg(short, long, value_name = "FILE")]
    output: PathBuf,
    /// Overwrite FILE if it exists.
    #[arg(short, long)]
    force: bool,
    /// Ring buffer size in MiB (power of two; 16 with --heap, 8 without). Raise it if
    /// lost_events shows ringbuf_full.
    #[arg(long, value_name = "MIB", value_parser = parse_ring_mib)]
    ring_size: Option<u32>,
    /// Also trace the C allocator (malloc, free and friends) with uprobes: exact live heap by
    /// stack, at the price of a uprobe trap per call (see docs/performance.md). Without it,
    /// only mappings and the program break are traced, with tracepoints: cheap enough for
    /// production.
    #[arg(long)]
    heap: bool,
    /// With --heap: record one allocation per BYTES on average (each with probability
    /// 1 − exp(−size / BYTES), drawn in the kernel) instead of every one; live heap bytes by
    /// stack are unbiased estimates, frees of unrecorded blocks are dropped in the kernel, and
    /// user space does a fraction of the work (docs/performance.md). Blocks of 16 × BYTES and
    /// more are always recorded.
    #[arg(long, value_name = "BYTES", requires = "heap", value_parser = clap::value_parser!(u32).range(1..))]
    heap_sample: Option<u32>,
    /// With --heap: attach the heap probes in windows, for a process whose malloc rate makes
    /// exact tracing too slow, and choose how often from what the probes cost while on (the
    /// kernel's count of their run time and traps, against the processes' CPU time) so that
    /// the expected slowdown stays within PCT percent. Blocks allocated in a window and still
    /// live after its grace period are the leak candidates; the report ranks the stacks whose
    /// survivors rose in the most windows first, with each one's leak rate.
    #[arg(long, value_name = "PCT", requires = "heap", conflicts_with_all = ["heap_sample", "heap_duty"],
          value_parser = parse_percent)]
    heap_budget: Option<f64>,
    /// With --heap: attach the heap probes in windows, on PCT percent of the time (a fixed
    /// --heap-budget).
    #[arg(long, value_name = "PCT", requires = "heap", conflicts_with = "heap_sample",
          value_parser = parse_percent)]
    heap_duty: Option<f64>,
    /// Duty-cycled heap: how long a window's allocation probes stay attached. Short: a window
    /// costs its time at the slowdown of exact tracing, and more, shorter windows see more of
    /// the run for the same budget.
    #[arg(long, value_name = "SECONDS", default_value = "0.1", value_parser = parse_seconds)]
    heap_window: Duration,
    /// Duty-cycled heap: how long the free probes stay attached after a window at most: blocks
    /// freed within it (a request's own buffers) are not leak candidates. It ends sooner once
    /// the window's blocks stop dying. Every free traps meanwhile, at full speed: on a PyTorch
    /// loop a grace costs more than its window.
    #[arg(long, value_name = "SECONDS", default_value = "0.5", value_parser = parse_seconds)]
    heap_grace: Duration,
    /// With --heap (exact, frame-pointer heap stacks): live heap blocks the kernel holds at
    /// most. Blocks stay in the kernel, counted per stack, and each stack goes to user space
    /// once, so that no call rate loses events. Past this many, blocks go through the ring
    /// buffer (counted in the report).
    #[arg(long, value_name = "BLOCKS", default_value_t = tracer_common::heap_ledger::DEFAULT_BLOCKS,
          value_parser = clap::value_parser!(u32).range(1..))]
    heap_ledger_blocks: u32,
    /// Every heap block through the ring to user space (benchmark of the kernel ledger).
    #[arg(long, hide = true)]
    no_kernel_heap_ledger: bool,
    /// Keep the recorder's own resident memory within MIB: past it, it drops what it can read
    /// again (unwind tables, symbols), then records events without their stacks (every byte
    /// still counted, under one frame that says so). What it gave up is in the report.
    #[arg(long, value_name = "MIB", value_parser = clap::value_parser!(u64).range(1..))]
    max_memory: Option<u64>,
    /// Request phases: while a thread is inside function SYMBOL of LIB (a library's or the
    /// executable's file name, or a path), what it allocates, frees and maps is in phase NAME
    /// (nested rules stack; the return restores the phase before). NAME=py:MODULE:QUALNAME
    /// names a Python function instead: what is allocated under it (in the Python frames of the
    /// stack) is in phase NAME. Repeatable, up to 30. The report shows live bytes by phase and
    /// which phase freed what another allocated: memory allocated while serving a request and
    /// still live is the per-request leak. Examples: --phase serve=libllama.so:llama_decode,
    /// --phase serve=py:vllm.v1.worker.gpu_model_runner:GPUModelRunner.execute_model. A native
    /// rule may add a condition on the call, [PLACE:TYPE OP NUMBER] with PLACE argN (N from 1)
    /// or sp+OFFSET (the stack at entry), TYPE i32, u32, i64 or u64: llama.cpp's prefill is
    /// --phase 'prefill=libllama.so:llama_decode[sp+8:i32>1]'. A library not mapped yet is
    /// waited for (attached when a traced process maps it). NAME=usdt:LIB:PROVIDER:PROBE starts
    /// the phase at a USDT probe of LIB, until the function around it returns
    #[arg(long, value_name = "NAME=LIB:SYMBOL")]
    phase: Vec<PhaseRule>,
    /// Do not use the built-in phase profiles. By default the phases of the servers alloctrace
    /// knows are recorded where they run: vLLM (V0 and V1), SGLang and TGI by their Python
    /// functions (load, profile, kv-cache, graph-capture, serve, prefill, decode, sleep, wake),
    /// llama.cpp by libllama's functions (load, kv-cache, prefill and decode by llama_decode's
    /// token count, serve) when a traced process maps it, at attach or later.
    #[arg(long)]
    no_phase_profiles: bool,
    /// A process with phases (a --phase rule, or a profile's that matched) is idle once it has
    /// shown no activity for MS milliseconds: no phase entered, no thread inside one, no
    /// PyTorch allocator traffic. What its threads allocate outside every phase from then on is
    /// in phase idle (before its first activity, start-up, it is in none): memory that grows
    /// with no request in flight. 0 turns the idle phase off.
    #[arg(long, value_name = "MS", default_value_t = session::phases::IDLE_AFTER_MS)]
    idle_after: u32,
    /// Do not follow child processes. By default every process the target forks (and what
    /// they exec) is traced from birth, as inference servers run their engine and GPU workers
    /// as children; every figure carries its PID.
    #[arg(long)]
    no_follow_children: bool,
    /// Record one of every N page faults that bring a page in, with its stack: which code
    /// makes RSS grow, without any uprobe (`flamegraph --kind faults`). 0 turns it off.
    #[arg(long, value_name = "N", default_value_t = 64)]
    fault_sample: u32,
    /// How call stacks are taken. `auto`: a copy of the user stack unwound with the modules'
    /// DWARF call-frame information (.eh_frame), which finds callers in code built without
    /// frame pointers (libcudart, libtorch, distribution libraries), for mapping, CUDA and
    /// failure events; frame pointers for heap events and page faults, which can be many.
    /// `fp`: frame pointers everywhere (cheapest). `dwarf`: stack copies everywhere.
    #[arg(long, value_enum, default_value_t = StackArg::Auto)]
    stack: StackArg,
    /// KiB of user stack copied per stack copy (1 to 32); deeper stacks are marked
    /// `[truncated]`.
    #[arg(long, value_name = "KIB", default_value_t = 16,
          value_parser = clap::value_parser!(u32).range(1..=32))]
    stack_copy: u32,
    /// Do not read Python frames. By default, in a CPython 3.10-3.13 process, each stack
    /// gets the Python frames (function, file, line) of the thread, read at the event, in
    /// place of the interpreter's evaluation loop.
    #[arg(long)]
    no_python_frames: bool,
    /// Do not hook PyTorch's CUDA caching allocator. By default, in a process that maps
    /// `libc10_cuda.so`, one probe on the allocator's event function splits its device memory
    /// into live tensors (`torch`) and cached segments (`torch-cached`); it traps once per
    /// allocator event, which an eager-mode loop making tens of thousands of them a second pays.
    #[arg(long)]
    no_torch_allocator: bool,
    /// Print the eBPF programs' diagnostics on standard error: why an event or a part of one
    /// was skipped (a busy in-flight slot, a full ring buffer, a stack copy that fell back
    /// to frame pointers, Python frames that could not be read). Costs nothing when off.
    #[arg(long)]
    debug_bpf: bool,
    /// Copy stacks even when the ring buffer fills up (benchmark of the copy's cost).
    #[arg(long, hide = true)]
    stack_copy_always: bool,
    /// Byte-sample the heap blocks a full kernel ledger sends through the ring even while the
    /// ring has room (tests of the sampled share).
    #[arg(long, hide = true)]
    heap_full_sample_always: bool,
    /// Attach empty programs at the same points and record nothing (benchmark floor).
    #[arg(long, hide = true)]
    probe_floor: bool,
    /// The command to launch, traced from its first instruction.
    #[arg(last = true, value_name = "CMD")]
    command: Vec<OsString>,
}

#[derive(Args)]
struct CheckArgs {
    /// One batch of load: a shell command run with `sh -c` (for example a load generator
    /// sending 100 requests and waiting for their answers).
    #[arg(long, value_name = "COMMAND")]
    load: String,
    /// Load runs before the measured batches (model loading, caches filling, warm-up).
    #[arg(long, value_name = "N", default_value_t = 1)]
    warmup: u32,
    /// Measured batches (one load run each).
    #[arg(long, value_name = "M", default_value_t = 10,
          value_parser = clap::value_parser!(u32).range(2..))]
    batches: u32,
    /// Growth in percent of the traced live memory, from the first third of the batches to
    /// the last, above which the check fails.
    #[arg(long, value_name = "PCT", default_value_t = 10.0, value_parser = parse_percent)]
    threshold: f64,
    /// Spread of the batches around their trend, in percent of their mean, above which the
    /// check says it is too noisy to judge (unless the growth is more than twice it).
    #[arg(long, value_name = "PCT", default_value_t = 5.0, value_parser = parse_percent)]
    max_noise: f64,
    #[command(flatten)]
    record: RecordArgs,
}

#[derive(Copy, Clone, ValueEnum)]
enum StackArg {
    Auto,
    Fp,
    Dwarf,
}

#[derive(Copy, Clone, ValueEnum)]
enum LayerArg {
    Host,
    Device,
}

#[derive(Copy, Clone, ValueEnum)]
enum GraphKind {
    Live,
    Faults,
    Leaks,
    Allocated,
    Static,
}

#[derive(Copy, Clone, ValueEnum)]
enum Format {
    Text,
    Json,
}

/// `report --format`: also `pprof`, a gzipped protobuf profile (`go tool pprof`, Pyroscope,
/// Grafana), written with -o; and `html`, the postmortem as one self-contained page.
#[derive(Copy, Clone, ValueEnum)]
enum ReportFormat {
    Text,
    Json,
    Pprof,
    Html,
}

/// The longest `-d`: a year. Longer is no duration a person means, and far longer ones would
/// overflow the clock's arithmetic; without `-d` the recording runs until the target exits.
const MAX_DURATION_S: f64 = 365.0 * 24.0 * 3600.0;

fn parse_seconds(s: &str) -> Result<Duration, String> {
    let secs: f64 = s
        .trim_end_matches('s')
        .parse()
        .map_err(|_| format!("`{s}` is not a number of seconds"))?;
    if !(secs > 0.0 && secs.is_finite()) {
        return Err(format!(
            "`{s}`: the duration must be a positive number of seconds"
        ));
    }
    if secs > MAX_DURATION_S {
        return Err(format!(
            "`{s}`: the duration must be at most {MAX_DURATION_S} seconds (a year); leave -d out to record until the target exits"
        ));
    }
    Duration::try_from_secs_f64(secs).map_err(|e| format!("`{s}`: {e}"))
}

/// A percentage above 0 and at most 100, as a fraction.
fn parse_percent(s: &str) -> Result<f64, String> {
    let pct: f64 = s
        .trim_end_matches('%')
        .parse()
        .map_err(|_| format!("`{s}` is not a percentage"))?;
    if !(pct > 0.0 && pct <= 100.0) {
        return Err(format!(
            "`{s}`: the percentage must be above 0 and at most 100"
        ));
    }
    Ok(pct / 100.0)
}

fn parse_class(s: &str) -> Result<Class, String> {
    Class::from_name(s).ok_or_else(|| {
        let names: Vec<&str> = Class::ALL.iter().map(|c| c.name()).collect();
        format!("`{s}` is not a class: one of {}", names.join(", "))
    })
}

/// The ring's default size in MiB. The recorder maps its pages twice (so that a record
/// wrapping the end reads as one), and its resident size counts both: 32 MB of a 16 MiB ring.
/// Without the heap probes the events are mappings, CUDA and PyTorch allocator calls and
/// sampled faults, drained every 10 ms: 8 MiB holds tens of thousands of them (what a full
/// ring loses is counted, `ringbuf_full`).
fn default_ring_mib(heap: bool) -> u32 {
    if heap { 16 } else { 8 }
}

fn parse_ring_mib(s: &str) -> Result<u32, String> {
    let mib: u32 = s
        .parse()
        .map_err(|_| format!("`{s}` is not a whole number of MiB"))?;
    if !mib.is_power_of_two() || mib > 1024 {
        return Err(format!(
            "`{s}`: the ring size must be a power of two between 1 and 1024 MiB"
        ));
    }
    Ok(mib)
}

/// Writes to stdout; a reader that went away (`| head`) is not an error.
fn write_stdout(bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other,
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Record(args) => return record(args),
        Command::Check(args) => return check(args),
        Command::Report {
            file,
            format,
            output,
            force,
            full_names,
            warmup,
        } => {
            let warmup = warmup.warmup();
            report(&file, format, output.as_deref(), force, full_names, warmup)?;
        }
        Command::Flamegraph {
            file,
            output,
            force,
            title,
            kind,
            full_names,
            warmup,
            layer,
            class,
            phase,
            pid,
            since,
        } => {
            let warmup = warmup.warmup();
            let mut classes = class;
            if let Some(layer) = layer {
                let layer = match layer {
                    LayerArg::Host => Layer::Host,
                    LayerArg::Device => Layer::Device,
                };
                let of_layer = layer.classes();
                classes = match classes.is_empty() {
                    true => of_layer,
                    false => classes
                        .into_iter()
                        .filter(|c| of_layer.contains(c))
                        .collect(),
                };
            }
            let filter = CellFilter {
                classes,
                phases: phase,
                pids: pid,
            };
            let picture = (title, kind, full_names, warmup);
            match since {
                Some(since) => {
                    let from = (file.as_path(), since.as_secs());
                    flamegraph_since(from, &output, force, full_names, &filter)?;
                }
                None => flamegraph(&file, &output, force, picture, &filter)?,
            }
        }
        Command::Diff {
            before,
            after,
            format,
            output,
            force,
            full_names,
            flamegraph,
        } => {
            let outputs = (output.as_deref(), flamegraph.as_deref());
            diff(&before, &after, format, outputs, force, full_names)?;
        }
        Command::Timeline {
            file,
            output,
            force,
        } => {
            output::check_destination(&output, force)?;
            let recorded = Reader::open_with(&file, SeriesRead::Nothing)?;
            let svg = views::timeline::render(&recorded);
            output::write_atomically(&output, svg.as_bytes(), force)?;
        }
        Command::Hooks => print!("{}", hooks::markdown()),
    }
    Ok(ExitCode::SUCCESS)
}

/// The session's options from the command line.
fn record_options(args: RecordArgs) -> RecordOptions {
    let mode = match args.stack {
        StackArg::Auto => StackMode::Auto,
        StackArg::Fp => StackMode::FramePointers,
        StackArg::Dwarf => StackMode::Dwarf,
    };
    let (stack_copy_heap, stack_copy_other) = mode.copy_sizes(args.stack_copy << 10);
    let heap_duty = heap_duty_options(&args);
    let target = match args.pid {
        Some(pid) => TargetSpec::Pid(pid),
        None => TargetSpec::Command(args.command),
    };
    RecordOptions {
        target,
        output: args.output,
        force: args.force,
        duration: args.duration,
        probes: ProbeConfig {
            ring_bytes: args.ring_size.unwrap_or(default_ring_mib(args.heap)) << 20,
            floor: args.probe_floor,
            follow_children: !args.no_follow_children,
            fault_sample: args.fault_sample,
            stack_copy_heap,
            stack_copy_other,
            python_frames: !args.no_python_frames,
            stack_copy_always: args.stack_copy_always,
            debug_log: args.debug_bpf,
            // A launched command's children allocate from their first instruction (a shell,
            // `timeout`, a server spawning its engine): the heap probes cover every process
            // mapping the allocator, the kernel keeps the traced ones. Attached by PID, a
            // production process's node is spared that: its children get probes when seen.
            heap_systemwide: args.heap && !args.no_follow_children && args.pid.is_none(),
            heap_sample_mean: args.heap_sample.unwrap_or(0),
            // Blocks are held in the kernel by stack key: the frame-pointer walk gives one per
            // call site, a stack copy does not (it is unwound in user space); sampled heaps are
            // a fraction of the calls already.
            heap_duty_cycled: args.heap_budget.is_some() || args.heap_duty.is_some(),
            heap_full_sample_always: args.heap_full_sample_always,
            heap_ledger_blocks: if args.heap
                && args.heap_sample.is_none()
                && stack_copy_heap == 0
                && !args.no_kernel_heap_ledger
            {
                args.heap_ledger_blocks
            } else {
                0
            },
        },
        heap: args.heap,
        phases: args.phase,
        phase_profiles: !args.no_phase_profiles,
        idle_after_ms: args.idle_after,
        check: None,
        heap_duty,
        max_memory: args.max_memory.map(|mib| mib << 20),
        torch_allocator: !args.no_torch_allocator,
        poll_interval: Duration::from_millis(10),
    }
}

/// A duty-cycled heap's windows, if asked for: with a budget, the first window measures at
/// a duty of the budget itself, until it knows what the probes cost.
fn heap_duty_options(args: &RecordArgs) -> Option<DutyOptions> {
    let (budget, duty) = match (args.heap_budget, args.heap_duty) {
        (Some(budget), _) => (Some(budget), budget),
        (None, Some(duty)) => (None, duty),
        (None, None) => return None,
    };
    Some(DutyOptions {
        budget,
        duty,
        window: args.heap_window,
        grace: args.heap_grace,
    })
}

/// Records; returns the exit status (a launched command's own, when it ended by itself).
fn record(args: RecordArgs) -> anyhow::Result<ExitCode> {
    let opts = record_options(args);
    let output = opts.output.clone();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let summary = runtime.block_on(session::record(opts))?;
    // After a hang-up stderr may be gone: the recording is finalized, the line is a courtesy.
    let _ = writeln!(
        std::io::stderr(),
        "recorded {} events ({} lost), {}: wrote {} (tracer peak RSS {} KiB)",
        summary.events,
        summary.lost,
        summary.stop_reason,
        escape::for_terminal(&output.display().to_string()),
        summary.tracer_peak_kib
    );
    Ok(summary
        .command_status
        .map_or(ExitCode::SUCCESS, ExitCode::from))
}

/// The leak test: records while running the load, then judges the recording. Its errors exit
/// with 3 (1 and 2 are verdicts).
fn check(args: CheckArgs) -> anyhow::Result<ExitCode> {
    const CHECK_FAILED: u8 = 3;
    // The parser gives fractions.
    let thresholds = Thresholds {
        growth_percent: args.threshold * 100.0,
        noise_percent: args.max_noise * 100.0,
    };
    let plan = LoadPlan {
        command: args.load,
        warmup: args.warmup,
        batches: args.batches,
    };
    let mut opts = record_options(args.record);
    opts.check = Some(thresholds);
    let output = opts.output.clone();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (summary, load) = runtime.block_on(check::run(opts, &plan));
    let fail = |e: anyhow::Error| -> anyhow::Result<ExitCode> {
        let _ = writeln!(
            std::io::stderr(),
            "alloctrace: error: {}",
            escape::for_terminal(&format!("{e:#}"))
        );
        Ok(ExitCode::from(CHECK_FAILED))
    };
    let summary = match summary {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    let shown = escape::for_terminal(&output.display().to_string()).into_owned();
    let _ = writeln!(
        std::io::stderr(),
        "recorded {} events ({} lost), {}: wrote {shown}; load: {} runs, {} failed",
        summary.events,
        summary.lost,
        summary.stop_reason,
        load.runs,
        load.failed_runs
    );
    let recorded = match Reader::open_with(&output, SeriesRead::Nothing) {
        Ok(mut r) => {
            names::use_display_names(&mut r);
            r
        }
        Err(e) => return fail(e.into()),
    };
    let Some(verdict) = report::check_verdict(&recorded) else {
        return fail(anyhow::anyhow!(
            "the load ran {} of {} batches before the recording ended ({}): nothing to judge; \
             see the recording {shown}",
            load.batches_marked,
            plan.batches,
            summary.stop_reason
        ));
    };
    write_stdout(report::render_check_text(&recorded).as_bytes())?;
    Ok(ExitCode::from(verdict.exit_code()))
}

fn report(
    file: &Path,
    format: ReportFormat,
    output: Option<&Path>,
    force: bool,
    full_names: bool,
    warmup: Option<Warmup>,
) -> anyhow::Result<()> {
    if let Some(out) = output {
        output::check_destination(out, force)?;
    }
    if matches!(format, ReportFormat::Pprof) && output.is_none() {
        anyhow::bail!("--format pprof writes a binary file: give it with -o FILE.pb.gz");
    }
    // The text report needs the first and last points of the series; the JSON the batches
    // the leak suspects are judged from; the profile the final state.
    let series = match format {
        ReportFormat::Text => SeriesRead::Endpoints,
        ReportFormat::Json => SeriesRead::Batches,
        ReportFormat::Pprof => SeriesRead::Nothing,
        ReportFormat::Html => SeriesRead::Batches,
    };
    let mut recorded = Reader::open_judged(file, series, warmup)?;
    let bytes = match format {
        ReportFormat::Text => {
            if !full_names {
                names::use_display_names(&mut recorded);
            }
            report::render_text(&recorded).into_bytes()
        }
        ReportFormat::Json => report::render_json(&recorded).into_bytes(),
        ReportFormat::Pprof => {
            if !full_names {
                names::use_display_names(&mut recorded);
            }
            views::pprof::render(&recorded)?
        }
        ReportFormat::Html => {
            if !full_names {
                names::use_display_names(&mut recorded);
            }
            report::render_html(&recorded).into_bytes()
        }
    };
    match output {
        Some(path) => output::write_atomically(path, &bytes, force)?,
        None => write_stdout(&bytes)?,
    }
    Ok(())
}

fn diff(
    before: &Path,
    after: &Path,
    format: Format,
    (output, svg): (Option<&Path>, Option<&Path>),
    force: bool,
    full_names: bool,
) -> anyhow::Result<()> {
    for out in output.into_iter().chain(svg) {
        output::check_destination(out, force)?;
    }
    let read = |path: &Path| -> anyhow::Result<_> {
        let mut recorded = Reader::open_with(path, SeriesRead::Batches)?;
        if !full_names {
            names::use_display_names(&mut recorded);
        }
        Ok(recorded)
    };
    let (before, after) = (read(before)?, read(after)?);
    let compared = views::diff::diff(&before, &after);
    if let Some(path) = svg {
        let picture = flamegraph::render_diff_svg(&before, &after)?;
        output::write_atomically(path, &picture, force)?;
    }
    let text = match format {
        Format::Text => views::diff::render_text(&compared),
        Format::Json => {
            let json = serde_json::to_string_pretty(&compared)? + "\n";
            escape::for_json(json)
        }
    };
    match output {
        Some(path) => output::write_atomically(path, text.as_bytes(), force)?,
        None => write_stdout(text.as_bytes())?,
    }
    Ok(())
}

/// `flamegraph --since SECONDS`: the end against that second.
fn flamegraph_since(
    (file, since): (&Path, u64),
    output: &Path,
    force: bool,
    full_names: bool,
    filter: &CellFilter,
) -> anyhow::Result<()> {
    output::check_destination(output, force)?;
    let mut recorded = Reader::open_with(file, SeriesRead::All)?;
    if !full_names {
        names::use_display_names(&mut recorded);
    }
    filter.apply(&mut recorded);
    let then = flamegraph::at_second(&recorded, since);
    let svg = flamegraph::render_diff_svg(&then, &recorded)?;
    output::write_atomically(output, &svg, force)?;
    Ok(())
}

/// Where the leak suspects' judged part starts (`report`, `flamegraph --kind leaks`).
#[derive(Args, Debug, Clone, Copy)]
struct WarmupArgs {
    /// Judge the leak suspects after a warm-up of SECONDS from the start of the recording (by
    /// default its first third: imports, model loading and caches filling are not judged).
    #[arg(long, value_name = "SECONDS", value_parser = parse_seconds)]
    warmup: Option<Duration>,
    /// Judge the leak suspects after the first N requests (entries of the serving phase that
    /// counts them: request, serve, prefill or decode, the first recorded), from the end of the
    /// second the Nth came in.
    #[arg(long, value_name = "N", conflicts_with = "warmup")]
    warmup_requests: Option<u64>,
}

impl WarmupArgs {
    fn warmup(self) -> Option<Warmup> {
        match (self.warmup, self.warmup_requests) {
            (Some(s), _) => Some(Warmup::Seconds(s.as_secs_f64())),
            (None, Some(n)) => Some(Warmup::Requests(n)),
            (None, None) => None,
        }
    }
}

fn flamegraph(
    file: &Path,
    output: &Path,
    force: bool,
    (title, kind, full_names, warmup): (Option<String>, GraphKind, bool, Option<Warmup>),
    filter: &CellFilter,
) -> anyhow::Result<()> {
    output::check_destination(output, force)?;
    // Leak suspects are judged from the series' batches; the other graphs read the final state.
    let series = match kind {
        GraphKind::Leaks => SeriesRead::Batches,
        GraphKind::Live | GraphKind::Faults | GraphKind::Allocated | GraphKind::Static => {
            SeriesRead::Nothing
        }
    };
    let mut recorded = Reader::open_judged(file, series, warmup)?;
    if !full_names {
        names::use_display_names(&mut recorded);
    }
    filter.apply(&mut recorded);
    let mut options = flamegraph::FlamegraphOptions::default();
    if !filter.is_empty() {
        options.note = Some(filter.describe());
    }
    match kind {
        GraphKind::Live => {}
        GraphKind::Faults => {
            options.kind = flamegraph::Kind::Faults;
            options.title = flamegraph::FAULTS_TITLE.to_string();
        }
        GraphKind::Leaks => {
            options.kind = flamegraph::Kind::Leaks;
            options.title = flamegraph::LEAKS_TITLE.to_string();
        }
        GraphKind::Allocated => {
            options.kind = flamegraph::Kind::Allocated;
            options.title = flamegraph::ALLOCATED_TITLE.to_string();
        }
        GraphKind::Static => {
            options.kind = flamegraph::Kind::Static;
            options.title = flamegraph::STATIC_TITLE.to_string();
        }
    }
    if let Some(title) = title {
        options.title = title;
    }
    let svg = flamegraph::render_svg(&recorded, &options)?;
    output::write_atomically(output, &svg, force)?;
    eprintln!("wrote {}", output.display());
    Ok(())
}

fn main() -> ExitCode {
    alloctrace::stacks::resident::guard_truncated_files();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        // Warnings name the target's paths and libraries: escaped like the error line.
        .format(|buf, record| {
            use std::io::Write;
            let message = record.args().to_string();
            let level = record.level();
            let module = record.target();
            writeln!(
                buf,
                "[{level:<5} {module}] {}",
                escape::for_terminal(&message)
            )
        })
        .init();
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(err) => {
            // One line: the outermost message and its causes.
            let msg = err
                .chain()
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
                .join(": ");
            // Paths, command lines and messages from a recording may carry control characters.
            let _ = writeln!(
                std::io::stderr(),
                "alloctrace: error: {}",
                escape::for_terminal(&msg)
            );
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_beyond_a_year_are_refused_not_panics() {
        for s in ["1e19", "1e20", "18446744073709551615", "31536001"] {
            let err = parse_seconds(s).unwrap_err();
            assert!(err.contains("at most 31536000 seconds"), "{s}: {err}");
        }
        assert_eq!(
            parse_seconds("31536000").unwrap(),
            Duration::from_secs(31_536_000)
        );
        assert_eq!(parse_seconds("1.5s").unwrap(), Duration::from_millis(1500));
        for s in ["0", "-1", "nan", "inf", "x"] {
            assert!(parse_seconds(s).is_err(), "{s}");
        }
    }
}
