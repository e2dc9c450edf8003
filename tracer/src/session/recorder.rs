//! The recording loop: one method per event source (the ring, polled; the one-second tick;
//! signals; the target's exit; the process-tree events the ring brings), until the duration
//! ends, a signal arrives or the traced processes have exited.

use std::{
    io::Write,
    time::{Duration, Instant},
};

use tokio::{
    io::unix::AsyncFd,
    signal::unix::Signal,
    time::{Interval, MissedTickBehavior},
};

use crate::{
    cuda::nvml::GpuMemorySource,
    model::{Class, RssSample, StackCapture},
    probes::{Probes, resolve::AllocatorObject},
    recording::Writer,
    session::{
        RecordOptions, RecordSummary,
        batch::RingReader,
        children::ProcessSet,
        cuda_hooking::{CudaHooked, hook_cuda},
        gpu_sampling::sample_gpu,
        python_detection::detect_python,
        rss_sampling::{own_peak_rss_kib, sample_rss},
        sink::EventSink,
        target::{ExitWatch, LaunchedCommand},
    },
    views,
};

/// The signals that stop a recording.
pub struct Signals {
    pub interrupt: Signal,
    pub terminate: Signal,
}

/// What the loop waits on.
pub struct EventSources {
    /// When to look into the ring.
    poll: Interval,
    /// Once a second: commit the recording.
    tick: Interval,
    signals: Signals,
    /// Readable when the target exits.
    exit: AsyncFd<i32>,
    deadline: Option<tokio::time::Instant>,
}

impl EventSources {
    /// Starts the clocks (the duration counts from now) and watches the target's exit.
    pub fn new(
        signals: Signals,
        exit_watch: &ExitWatch,
        opts: &RecordOptions,
    ) -> anyhow::Result<EventSources> {
        // SAFETY: the pidfd is owned by `exit_watch`, which outlives the sources (`record`
        // borrows the recorder that holds it while the sources live).
        let exit = unsafe { AsyncFd::register(exit_watch.raw_fd()) }
            .map_err(|e| anyhow::anyhow!("cannot watch the target's exit: {e}"))?;
        let now = tokio::time::Instant::now();
        let mut poll = tokio::time::interval(opts.poll_interval);
        poll.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let second = Duration::from_secs(1);
        Ok(EventSources {
            poll,
            tick: tokio::time::interval_at(now + second, second),
            signals,
            exit,
            // A deadline past what the clock can hold is no deadline (the CLI caps -d at a year).
            deadline: opts.duration.and_then(|d| now.checked_add(d)),
        })
    }
}

/// Waits until `deadline`, forever without one.
async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// A recording in progress: the probes, the ring reader, the sink and the recording file.
pub struct Recorder {
    /// The target.
    pub(super) pid: u32,
    pub(super) follow_children: bool,
    /// The stack mode's name and the bytes of each stack copy, for the recording.
    pub(super) stack_mode: &'static str,
    pub(super) copy_bytes: u32,
    pub(super) probes: Probes,
    /// The allocator heap probes are on (heap tracing), for followed children.
    pub(super) allocator: Option<AllocatorObject>,
    pub(super) launched: Option<LaunchedCommand>,
    pub(super) exit_watch: ExitWatch,
    pub(super) cuda_hooked: CudaHooked,
    pub(super) reader: RingReader,
    pub(super) sink: EventSink,
    pub(super) writer: Writer,
    pub(super) gpu: Option<Box<dyn GpuMemorySource>>,
    pub(super) processes: ProcessSet,
    pub(super) started: Instant,
    /// Whether to show the event rate on stderr (a terminal), and the event count last shown.
    pub(super) progress: bool,
    pub(super) last_events: u64,
}

impl Recorder {
    /// Records until something says to stop; returns why.
    pub async fn run(&mut self, mut sources: EventSources) -> anyhow::Result<String> {
        loop {
            let stop = tokio::select! {
                _ = sources.poll.tick() => self.on_ring_poll()?,
                _ = sources.tick.tick() => {
                    self.on_tick()?;
                    None
                }
                _ = sources.signals.interrupt.recv() => {
                    Some(self.on_signal(libc::SIGINT, "interrupted (SIGINT)"))
                }
                _ = sources.signals.terminate.recv() => {
                    Some(self.on_signal(libc::SIGTERM, "terminated (SIGTERM)"))
                }
                guard = sources.exit.readable(), if !self.processes.has_target_exited() => {
                    drop(guard);
                    self.on_target_exit()
                }
                _ = sleep_until(sources.deadline) => Some("duration elapsed".to_string()),
            };
            if let Some(reason) = stop {
                return Ok(reason);
            }
        }
    }

    /// Applies the records in the ring.
    fn drain(&mut self) {
        while let Some(batch) = self.reader.next_batch() {
            self.sink.apply_batch(&batch);
        }
    }

    /// The ring may hold records: applies them, then acts on what they said (code mapped,
    /// processes forked, exec'd or exited, opaque CUDA calls). Stops once the target and its
    /// followed children have all exited.
    fn on_ring_poll(&mut self) -> anyhow::Result<Option<String>> {
        self.drain();
        for p in self.sink.take_code_mapped() {
            self.sink.refresh_code_of(p);
            detect_python(p, &mut self.sink, &mut self.probes);
        }
        self.on_process_events()?;
        let allocator = self.allocator.as_ref();
        self.processes
            .attach_after_exec(allocator, &mut self.probes);
        // Right after an opaque driver call (context, module, graph), while what it
        // allocated for itself is new.
        let waiting = self.sink.cuda.hidden.waiting();
        if let Some(source) = self.gpu.as_mut()
            && !waiting.is_empty()
        {
            let (sink, writer) = (&mut self.sink, &mut self.writer);
            sample_gpu(source.as_mut(), sink, &waiting, self.started, writer)?;
        }
        Ok(self.processes.all_exited())
    }

    /// The process-tree events the ring brought: children join the traced processes, exits
    /// leave.
    fn on_process_events(&mut self) -> anyhow::Result<()> {
        let before = self.processes.pids.len();
        for ev in self.sink.take_proc_events() {
            let allocator = self.allocator.as_ref();
            self.processes.follow(&ev, allocator, &mut self.probes);
        }
        if self.processes.pids.len() == before {
            return Ok(());
        }
        self.writer.set_target_pids(&self.processes.pids)?;
        // A child inherits the parent's CUDA libraries, not its uprobes.
        for &p in &self.processes.pids[before..] {
            hook_cuda(p, &mut self.probes, &mut self.cuda_hooked);
            detect_python(p, &mut self.sink, &mut self.probes);
        }
        Ok(())
    }

    /// Once a second: hooks newly loaded CUDA libraries, samples GPU memory, commits.
    fn on_tick(&mut self) -> anyhow::Result<()> {
        for &p in &self.processes.live {
            hook_cuda(p, &mut self.probes, &mut self.cuda_hooked);
        }
        self.drain();
        if let Some(source) = self.gpu.as_mut() {
            let live = &self.processes.live;
            sample_gpu(
                source.as_mut(),
                &mut self.sink,
                live,
                self.started,
                &mut self.writer,
            )?;
        }
        self.commit()?;
        self.show_progress();
        Ok(())
    }

    /// A command we launched stops with us, as under `perf record -- CMD`; a process we
    /// attached to by PID is never disturbed.
    fn on_signal(&self, sig: i32, reason: &str) -> String {
        if let Some(launched) = &self.launched {
            // SAFETY: plain kill(2) of our own child.
            unsafe { libc::kill(launched.pid as libc::pid_t, sig) };
        }
        reason.to_string()
    }

    /// The target exited: stop, unless followed children still run.
    fn on_target_exit(&mut self) -> Option<String> {
        let how = self
            .exit_watch
            .reap()
            .map(|h| format!(" ({h})"))
            .unwrap_or_default();
        let how = format!("target exited{how}");
        self.processes
            .target_exited(self.pid, how, self.follow_children)
    }

    /// Writes what the last second brought: resident samples, new stacks, the ledger's state.
    fn commit(&mut self) -> anyhow::Result<()> {
        let t_s = self.started.elapsed().as_secs_f64();
        let samples: Vec<RssSample> = (self.processes.live.iter())
            .filter_map(|&p| sample_rss(p, t_s as u64, &self.sink.mappings))
            .collect();
        self.writer.add_rss_samples(&samples)?;
        let new_stacks = self.sink.take_new_stacks();
        let [_, fp_under_pressure] = self.probes.stack_stats();
        self.writer.set_stack_capture(&StackCapture {
            mode: self.stack_mode.to_string(),
            copy_bytes: self.copy_bytes,
            copies: self.sink.unwinds,
            truncated: self.sink.unwinds_truncated,
            fp_under_pressure,
        })?;
        let series = self.sink.ledger.take_series(t_s as u64);
        let state = self.sink.ledger.state(&self.sink.lost(self.probes.drops()));
        self.writer.commit_tick(t_s, &new_stacks, &state, &series)?;
        Ok(())
    }

    /// Events lost so far, all causes.
    fn lost(&self) -> u64 {
        self.sink.lost(self.probes.drops()).values().sum()
    }

    /// The event rate, live heap and losses on one terminal line.
    fn show_progress(&mut self) {
        if !self.progress {
            return;
        }
        let rate = self.sink.events - self.last_events;
        self.last_events = self.sink.events;
        eprint!(
            "\r{rate} events/s, live heap {} in {} blocks, lost {}   ",
            views::human_bytes(self.sink.ledger.totals(Class::Heap).live_bytes),
            self.sink.ledger.live_blocks(),
            self.lost()
        );
        let _ = std::io::stderr().flush();
    }

    /// Stops: applies what is left in the ring, writes the last state and closes the recording.
    pub fn finish(mut self, stop_reason: String) -> anyhow::Result<RecordSummary> {
        if self.progress {
            eprintln!();
        }
        // Everything the target did before now is in the ring: drain it, then write the last
        // state.
        self.drain();
        self.sink.cuda.finish(&mut self.sink.ledger);
        self.commit()?;
        self.writer.finalize(self.started.elapsed().as_secs_f64())?;
        let lost = self.sink.lost(self.probes.drops()).values().sum();
        Ok(RecordSummary {
            events: self.sink.events,
            lost,
            stop_reason,
            tracer_peak_kib: own_peak_rss_kib(),
        })
    }
}
