//! `alloctrace record`: attach, drain events into the ledger, commit the recording every second,
//! finalize on duration, signal or target exit.

use std::{
    collections::{BTreeMap, HashMap},
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
use tracer_common::{HeapFn, drop_cause};

use crate::{
    events::{self, Event},
    ledger::{CellRef, Ledger},
    model::{Class, FailureKey, TargetInfo},
    probes::{HeapProbes, ProbeConfig, resolve},
    recording::Writer,
    stacks::{FrameNamer, StackTable},
    target::{self, ExitWatch, TargetError},
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

/// User-space loss causes, besides the kernel's `drop_cause::NAMES`.
const UNDECODABLE: &str = "undecodable_record";

/// Applies events to the ledger, interning stacks as they come.
struct EventSink {
    ledger: Ledger,
    stacks: StackTable,
    /// Display names of hooked functions by cookie (aliases joined: `memalign/aligned_alloc`).
    fn_names: HashMap<u32, String>,
    events: u64,
    undecodable: u64,
    /// Reused buffer for a record's stack.
    ips: Vec<u64>,
}

impl EventSink {
    fn apply(&mut self, bytes: &[u8]) {
        self.events += 1;
        match events::decode(bytes) {
            Some(Event::HeapFree(ev)) => {
                self.ledger.free(ev.tgid, ev.addr);
            }
            Some(Event::HeapAlloc(ev, ips)) => {
                let is_realloc = matches!(
                    HeapFn::from_u32(ev.func),
                    Some(HeapFn::Realloc | HeapFn::Reallocarray)
                );
                if ev.addr == 0 && is_realloc && ev.size == 0 && ev.old_addr != 0 {
                    // glibc's realloc(p, 0) frees p and returns NULL.
                    self.ledger.free(ev.tgid, ev.old_addr);
                    return;
                }
                ips.read_into(&mut self.ips);
                let stack = self.stacks.intern(&self.ips, ips.truncated);
                if ev.addr == 0 {
                    let function = self
                        .fn_names
                        .get(&ev.func)
                        .cloned()
                        .unwrap_or_else(|| format!("fn{}", ev.func));
                    self.ledger.failure(FailureKey {
                        class: Class::Heap,
                        function,
                        size: ev.size,
                        error: events::errno_name(ev.err),
                        stack,
                    });
                } else if is_realloc {
                    self.ledger.realloc(
                        ev.tgid,
                        ev.old_addr,
                        ev.addr,
                        ev.size,
                        CellRef::new(Class::Heap, stack),
                    );
                } else {
                    self.ledger
                        .alloc(ev.tgid, ev.addr, ev.size, CellRef::new(Class::Heap, stack));
                }
            }
            None => self.undecodable += 1,
        }
    }

    fn drain(&mut self, ring: &mut RingBuf<MapData>) {
        while let Some(item) = ring.next() {
            self.apply(&item);
        }
    }

    fn lost(&self, probes: &HeapProbes) -> BTreeMap<String, u64> {
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
    let mut probes = HeapProbes::load(opts.probes.clone())?;

    // Find the target and its allocator; a launched command is held stopped meanwhile.
    let (pid, command, maps, launched) = match &opts.target {
        TargetSpec::Pid(pid) => {
            let command = target::check_pid(*pid)?;
            let maps = resolve::read_maps(*pid)?;
            if maps.is_empty() {
                return Err(TargetError::KernelThread { pid: *pid }.into());
            }
            (*pid, command, maps, None)
        }
        TargetSpec::Command(argv) => {
            let launched = target::launch(argv)?;
            (
                launched.pid,
                launched.command.clone(),
                launched.maps.clone(),
                Some(launched),
            )
        }
    };
    let allocator = resolve::find_allocator(pid, &maps)?;
    let exit_watch = ExitWatch::new(pid, launched.is_some())?;
    if let Err(e) = probes.attach(pid, &allocator) {
        if exit_watch.has_exited() {
            return Err(TargetError::ExitedDuringAttach { pid }.into());
        }
        return Err(e.into());
    }
    if exit_watch.has_exited() && launched.is_none() {
        return Err(TargetError::ExitedDuringAttach { pid }.into());
    }

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
        .points
        .iter()
        .map(|p| (p.hook().func as u32, p.name()))
        .collect();
    let mut sink = EventSink {
        ledger: Ledger::new(),
        stacks: StackTable::new(),
        fn_names,
        events: 0,
        undecodable: 0,
        ips: Vec::new(),
    };
    sink.ledger.track(Class::Heap);
    let mut namer = FrameNamer::new(pid, maps);

    eprintln!(
        "attached to PID {pid} ({command}): {} probes on {} [{}]",
        allocator.points.len(),
        allocator.target_path,
        probes.attached.join(", ")
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

    let commit = |sink: &mut EventSink,
                  namer: &mut FrameNamer,
                  writer: &mut Writer,
                  probes: &HeapProbes|
     -> anyhow::Result<()> {
        let t_s = started.elapsed().as_secs_f64();
        let new_stacks = sink.stacks.take_new(namer);
        let series = sink.ledger.take_series(t_s as u64);
        let state = sink.ledger.state(&sink.lost(probes));
        writer.commit_tick(t_s, &new_stacks, &state, &series)?;
        Ok(())
    };

    let stop_reason = loop {
        tokio::select! {
            _ = poll.tick() => sink.drain(&mut ring),
            _ = tick.tick() => {
                sink.drain(&mut ring);
                commit(&mut sink, &mut namer, &mut writer, &probes)?;
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
            guard = exit_fd.readable() => {
                drop(guard);
                let how = exit_watch.reap().map(|h| format!(" ({h})")).unwrap_or_default();
                break format!("target exited{how}");
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
    commit(&mut sink, &mut namer, &mut writer, &probes)?;
    writer.finalize(started.elapsed().as_secs_f64())?;
    let lost: u64 = sink.lost(&probes).values().sum();
    Ok(RecordSummary {
        events: sink.events,
        lost,
        stop_reason,
        tracer_peak_kib: own_peak_rss_kib(),
    })
}
