//! The recording loop: one method per event source (the ring, polled; the one-second tick;
//! signals; the target's exit; the process-tree events the ring brings), until the duration
//! ends, a signal arrives or the traced processes have exited.

use std::{
    collections::BTreeMap,
    io::Write,
    time::{Duration, Instant},
};

use nix::{sys::signal::Signal as Sig, unistd::Pid};

use tokio::{
    io::unix::AsyncFd,
    signal::unix::Signal,
    sync::mpsc::UnboundedReceiver,
    time::{Interval, MissedTickBehavior},
};

use crate::{
    cuda::nvml::GpuMemorySource,
    escape,
    model::{
        AllocatorSample, Class, Mark, MarkCell, MemoryLimit, PhaseActivity, PhaseFrees,
        PhaseRuleFigures, Phases, RssSample, StackCapture,
    },
    probes::{Probes, resolve::AllocatorObject},
    proc::{
        maps::read_maps,
        status::{own_status, read_status},
    },
    recording::Writer,
    session::{
        RecordOptions, RecordSummary,
        batch::RingReader,
        children::ProcessSet,
        control::{Request, next_request},
        cuda_hooking::{CudaHooked, hook_cuda},
        exits::Exits,
        gpu_sampling::sample_gpu,
        heap_duty::DutyCycle,
        launch::{HeldExit, LaunchedCommand},
        lock::TargetLock,
        phases::{self, PhaseRule, ResolvedRule},
        python_detection::detect_python,
        rss_sampling::{own_peak_rss_kib, sample_rss},
        sink::EventSink,
        target::ExitWatch,
    },
    stacks::resident,
    views,
};
use tracer_common::{ledger_stat, phase, proc_op};

/// How long a launched command may take to exit after the signal that stops it (the end of
/// `-d`, or the signal alloctrace got) before it gets SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// How long to wait for its exit after SIGKILL (a task stuck in the kernel) before leaving it.
const KILL_WAIT: Duration = Duration::from_secs(5);

/// The signals that stop a recording: SIGINT, SIGTERM and SIGHUP (a terminal or SSH session
/// going away) alike.
pub struct Signals {
    pub interrupt: Signal,
    pub terminate: Signal,
    pub hangup: Signal,
}

impl Signals {
    /// The next of them to arrive.
    async fn recv(&mut self) -> i32 {
        tokio::select! {
            _ = self.interrupt.recv() => libc::SIGINT,
            _ = self.terminate.recv() => libc::SIGTERM,
            _ = self.hangup.recv() => libc::SIGHUP,
        }
    }
}

/// Why the recording stops.
struct Stop {
    reason: String,
    /// The signal that stops a launched command still running (None: the traced processes
    /// ended by themselves).
    command_signal: Option<i32>,
}

impl Stop {
    /// The traced processes ended by themselves.
    fn ended(reason: String) -> Stop {
        Stop {
            reason,
            command_signal: None,
        }
    }

    fn signal(signal: i32) -> Stop {
        let reason = match signal {
            libc::SIGINT => "interrupted (SIGINT)",
            libc::SIGHUP => "hung up (SIGHUP)",
            _ => "terminated (SIGTERM)",
        };
        Stop {
            reason: reason.to_string(),
            command_signal: Some(signal),
        }
    }
}

/// How long one poll, and one tick, may spend applying ring records before the loop moves on.
const DRAIN_PER_POLL: Duration = Duration::from_millis(50);
const DRAIN_PER_TICK: Duration = Duration::from_millis(200);

/// What the loop waits on.
pub struct EventSources {
    /// When to look into the ring.
    poll: Interval,
    /// Once a second: commit the recording.
    tick: Interval,
    signals: Signals,
    /// Readable when the target exits.
    exit: AsyncFd<i32>,
    /// A launched command held at its exit (`launch`).
    held_exits: Option<UnboundedReceiver<HeldExit>>,
    deadline: Option<tokio::time::Instant>,
    /// A driver's requests (`alloctrace check`).
    control: Option<UnboundedReceiver<Request>>,
}

impl EventSources {
    /// Starts the clocks (the duration counts from now) and watches the target's exit.
    pub fn new(
        signals: Signals,
        exit_watch: &ExitWatch,
        held_exits: Option<UnboundedReceiver<HeldExit>>,
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
            held_exits,
            // A deadline past what the clock can hold is no deadline (the CLI caps -d at a year).
            deadline: opts.duration.and_then(|d| now.checked_add(d)),
            control: None,
        })
    }

    /// The recording takes a driver's requests.
    pub fn with_control(mut self, requests: Option<UnboundedReceiver<Request>>) -> EventSources {
        self.control = requests;
        self
    }
}

/// The next launched command held at its exit; never, without one.
async fn next_held_exit(held: &mut Option<UnboundedReceiver<HeldExit>>) -> HeldExit {
    match held {
        Some(rx) => match rx.recv().await {
            Some(h) => h,
            None => std::future::pending().await,
        },
        None => std::future::pending().await,
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
    /// `--heap-sample`'s mean (0: every heap call), for the recording.
    pub(super) heap_sample_bytes: u64,
    pub(super) probes: Probes,
    /// The allocator heap probes are on (heap tracing), for followed children.
    pub(super) allocator: Option<AllocatorObject>,
    pub(super) launched: Option<LaunchedCommand>,
    pub(super) exit_watch: ExitWatch,
    /// Whether the target's exit was seen.
    pub(super) target_ended: bool,
    /// The launched command's wait status, once reaped.
    pub(super) launched_status: Option<i32>,
    /// How the traced processes ended.
    pub(super) exits: Exits,
    /// This recorder's hold on the target, released when it is done.
    pub(super) _lock: Option<TargetLock>,
    pub(super) cuda_hooked: CudaHooked,
    pub(super) reader: RingReader,
    pub(super) sink: EventSink,
    pub(super) writer: Writer,
    pub(super) gpu: Option<Box<dyn GpuMemorySource>>,
    pub(super) processes: ProcessSet,
    /// A duty-cycled heap's windows.
    pub(super) duty: Option<DutyCycle>,
    /// `--max-memory`, bytes.
    pub(super) max_memory: Option<u64>,
    pub(super) started: Instant,
    /// Whether to show the event rate on stderr (a terminal), and the event count last shown.
    pub(super) progress: bool,
    pub(super) last_events: u64,
    /// Entries of each kernel phase id at the last commit.
    pub(super) phase_entries_seen: [u64; phase::IDS],
    /// What a driver marked (`alloctrace check`), and how many of them the recording has.
    pub(super) marks: Vec<Mark>,
    pub(super) marks_written: usize,
    /// `--phase` rules as given, then the built-in profiles' (with their server), and the
    /// native ones attached.
    pub(super) phases_given: Vec<(PhaseRule, Option<&'static str>)>,
    pub(super) phase_rules: Vec<ResolvedRule>,
    /// Native rules whose library no traced process mapped yet: looked for each second.
    pub(super) phases_pending: Vec<phases::GivenRule>,
    /// `--idle-after` ms, while the idle phase waits for a profile's Python rule to match.
    pub(super) idle_pending_ms: Option<u32>,
}

impl Recorder {
    /// Records until something says to stop, then stops a launched command that still runs;
    /// returns why the recording stopped.
    pub async fn run(&mut self, mut sources: EventSources) -> anyhow::Result<String> {
        let stop = self.record_until_stop(&mut sources).await?;
        if let Some(signal) = stop.command_signal
            && self.launched.is_some()
            && !self.target_ended
        {
            self.stop_command(&mut sources, signal).await?;
            if let Some(exit) = self.exits.of(self.pid) {
                let how = exit.describe();
                return Ok(format!("{}; the launched command: {how}", stop.reason));
            }
        }
        Ok(stop.reason)
    }

    async fn record_until_stop(&mut self, sources: &mut EventSources) -> anyhow::Result<Stop> {
        // Setting up may have taken the tracer over --max-memory already.
        self.keep_within_memory();
        loop {
            let stop = tokio::select! {
                _ = sources.poll.tick() => self.on_ring_poll()?.map(Stop::ended),
                _ = sources.tick.tick() => {
                    self.on_tick()?;
                    None
                }
                signal = sources.signals.recv() => Some(Stop::signal(signal)),
                held = next_held_exit(&mut sources.held_exits) => {
                    self.on_held_exit(held);
                    None
                }
                guard = sources.exit.readable(), if !self.target_ended => {
                    drop(guard);
                    self.on_target_exit().map(Stop::ended)
                }
                _ = sleep_until(sources.deadline) => Some(Stop {
                    reason: "duration elapsed".to_string(),
                    command_signal: Some(libc::SIGTERM),
                }),
                request = next_request(&mut sources.control) => match request {
                    Request::Mark { label, reply } => {
                        let _ = reply.send(self.mark(label));
                        None
                    }
                    Request::Stop => Some(Stop {
                        reason: "the load was done".to_string(),
                        command_signal: Some(libc::SIGTERM),
                    }),
                },
            };
            if let Some(stop) = stop {
                return Ok(stop);
            }
        }
    }

    /// A command alloctrace launched never outlives the recording (it would be left to PID 1,
    /// unseen): it gets `signal`, then SIGKILL after `STOP_GRACE` or at the next signal. The
    /// recording goes on meanwhile, so that what it does on its way out and how it ends are in
    /// it. A process attached to by PID is never signalled.
    async fn stop_command(
        &mut self,
        sources: &mut EventSources,
        signal: i32,
    ) -> anyhow::Result<()> {
        self.exits.stopping(self.pid);
        self.send_command(signal);
        let now = tokio::time::Instant::now();
        let mut kill_at = Some(now + STOP_GRACE);
        let give_up = now + STOP_GRACE + KILL_WAIT;
        while !self.target_ended {
            tokio::select! {
                _ = sources.poll.tick() => {
                    self.on_ring_poll()?;
                }
                _ = sources.tick.tick() => self.on_tick()?,
                _ = sources.signals.recv() => kill_at = Some(tokio::time::Instant::now()),
                held = next_held_exit(&mut sources.held_exits) => self.on_held_exit(held),
                guard = sources.exit.readable() => {
                    drop(guard);
                    self.on_target_exit();
                }
                _ = sleep_until(kill_at) => {
                    self.send_command(libc::SIGKILL);
                    kill_at = None;
                }
                _ = tokio::time::sleep_until(give_up) => {
                    let pid = self.pid;
                    log::warn!("the launched command (PID {pid}) does not exit after SIGKILL");
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    /// The recording failed: a launched command still running goes on, untraced, and the
    /// operator is told which it is (it is no longer alloctrace's child once alloctrace exits).
    pub fn leave_command(&self) {
        if self.launched.is_some() && !self.target_ended {
            let _ = writeln!(
                std::io::stderr(),
                "alloctrace: the launched command (PID {}) goes on, untraced",
                self.pid
            );
        }
    }

    fn send_command(&self, signal: i32) {
        if let Ok(signal) = Sig::try_from(signal) {
            let _ = nix::sys::signal::kill(Pid::from_raw(self.pid as i32), signal);
        }
    }

    /// Applies the records in the ring.
    fn drain(&mut self) {
        while let Some(batch) = self.reader.next_batch() {
            self.sink.apply_batch(&batch);
        }
    }

    /// Applies the records in the ring for at most `budget`: a burst (thousands of new stacks
    /// to name) must not hold up what the loop does on time (a duty-cycled heap's windows, the
    /// commit); the next poll goes on where this one stopped.
    fn drain_for(&mut self, budget: Duration) {
        let started = Instant::now();
        while let Some(batch) = self.reader.next_batch() {
            self.sink.apply_batch(&batch);
            if started.elapsed() >= budget {
                break;
            }
        }
    }

    /// A driver's mark: every record the ring holds applied, the kernel's heap counts read, the
    /// traced live memory and the target's RSS now (kept for the recording's meta `marks`).
    fn mark(&mut self, label: String) -> Mark {
        self.drain();
        let past_full = self.probes.ledger_stats().went_past_full_tables();
        self.sink.sync_kernel_heap(past_full == 0);
        let ledger = &self.sink.ledger;
        let mark = Mark {
            label,
            t_s: self.started.elapsed().as_secs_f64(),
            traced_live: (Class::ALL.into_iter().filter(|c| c.can_leak()))
                .map(|c| ledger.totals(c).live_bytes)
                .sum(),
            rss: read_status(self.pid).ok().map(|s| s.rss),
            cells: (ledger.live_cells(Class::can_leak).into_iter())
                .map(|(key, live_bytes)| MarkCell { key, live_bytes })
                .collect(),
        };
        self.marks.push(mark.clone());
        mark
    }

    /// Moves a duty-cycled heap's windows on.
    fn poll_duty(&mut self) {
        if let Some(duty) = self.duty.as_mut() {
            duty.poll(&mut self.probes, &self.processes.live);
        }
    }

    /// The ring may hold records: applies them, then acts on what they said (code mapped,
    /// processes forked, exec'd or exited, opaque CUDA calls). Stops once the target and its
    /// followed children have all exited.
    fn on_ring_poll(&mut self) -> anyhow::Result<Option<String>> {
        self.poll_duty();
        self.drain_for(DRAIN_PER_POLL);
        if self.exits.has_pending() {
            self.exits.resolve();
        }
        // Process events first: an exec forgets the old image's interpreter, and the new image
        // may have mapped its own in the same batch.
        self.on_process_events()?;
        for p in self.sink.take_code_mapped() {
            // Detection first: reading the new modules' unwind tables can take a while (a
            // libtorch), and Python frames are read in the kernel only from detection on.
            detect_python(p, &mut self.sink, &mut self.probes);
            self.sink.refresh_code_of(p);
        }
        let allocator = self.allocator.as_ref();
        self.processes
            .attach_after_exec(allocator, &mut self.probes);
        self.poll_duty();
        for pid in self.sink.take_short_key_requests() {
            // Each walk past the allocator's caller would make a key of its own.
            match self.probes.shorten_heap_keys(pid) {
                Ok(()) => log::warn!(
                    "PID {pid}: its heap stacks run through code without frame pointers: kept as \
                     the allocator's caller and the Python frames (--stack dwarf unwinds them, \
                     block by block in user space)"
                ),
                Err(e) => log::warn!("PID {pid}: heap stack keys not shortened: {e}"),
            }
        }
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

    /// A launched command stopped at its exit, its address space whole: what it did is read
    /// from the ring, and the stacks of its events are named from its mappings now, before they
    /// go. It exits once this returns.
    fn on_held_exit(&mut self, held: HeldExit) {
        if let Err(e) = self.on_ring_poll() {
            log::warn!("while PID {} was held at its exit: {e}", held.pid);
        }
        self.sink.refresh_code_of(held.pid);
        self.sink.name_stacks_of(held.pid);
        let _ = held.done.send(());
    }

    /// The process-tree events the ring brought: children join the traced processes, exits
    /// leave.
    fn on_process_events(&mut self) -> anyhow::Result<()> {
        let before = self.processes.pids.len();
        for ev in self.sink.take_proc_events() {
            match ev.op {
                proc_op::FORK => self.exits.watch(ev.pid),
                proc_op::EXIT => self
                    .exits
                    .ended(ev.pid, self.started.elapsed().as_secs_f64()),
                _ => {}
            }
            let allocator = self.allocator.as_ref();
            self.processes.follow(&ev, allocator, &mut self.probes);
        }
        if self.processes.pids.len() == before {
            return Ok(());
        }
        self.writer.set_target_pids(&self.processes.pids)?;
        // A child inherits the parent's CUDA libraries, not its uprobes.
        for &p in &self.processes.pids[before..] {
            if let Ok(maps) = read_maps(p) {
                hook_cuda(p, &maps, &mut self.probes, &mut self.cuda_hooked);
            }
            detect_python(p, &mut self.sink, &mut self.probes);
        }
        Ok(())
    }

    /// Once a second: hooks newly loaded CUDA libraries and attaches the phase rules whose
    /// library is now mapped (one read of each process's maps for both), samples GPU memory,
    /// commits.
    fn on_tick(&mut self) -> anyhow::Result<()> {
        let mut found: Vec<ResolvedRule> = Vec::new();
        for &p in &self.processes.live {
            let Ok(maps) = read_maps(p) else {
                continue;
            };
            hook_cuda(p, &maps, &mut self.probes, &mut self.cuda_hooked);
            // A library loaded after attach (dlopen, an engine started later).
            if !self.phases_pending.is_empty() {
                let known = self.phase_rules.len() + found.len();
                let pending = &mut self.phases_pending;
                found.extend(phases::resolve_pending(pending, known, p, &maps));
            }
        }
        self.attach_phases(found);
        self.drain_for(DRAIN_PER_TICK);
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
        resident::release_file_pages();
        resident::release_freed_heap();
        self.keep_within_memory();
        if self.exits.take_changed() {
            self.writer.set_exits(&self.exits.ended)?;
        }
        self.show_progress();
        Ok(())
    }

    /// `--max-memory`: over the limit, the caches that can be read again are dropped (right
    /// after a commit named the pending stacks); still over, events keep no stack from then on.
    /// Figures stay exact; what was given up is counted in the recording.
    fn keep_within_memory(&mut self) {
        let Some(limit) = self.max_memory else {
            return;
        };
        let rss = || own_status().map_or(0, |s| s.rss);
        if self.sink.shed.collapse || rss() <= limit {
            return;
        }
        self.sink.drop_caches();
        // SAFETY: malloc_trim has no preconditions; it returns freed heap to the kernel.
        unsafe { libc::malloc_trim(0) };
        if rss() > limit {
            log::warn!(
                "the recorder is over --max-memory ({}) with its caches dropped: events keep no stack from now on",
                views::human_bytes(limit)
            );
            self.sink.collapse_stacks();
        }
    }

    /// The target exited: stop, unless followed children still run.
    fn on_target_exit(&mut self) -> Option<String> {
        self.target_ended = true;
        let t_s = self.started.elapsed().as_secs_f64();
        self.launched_status = self.launched.as_ref().and_then(|l| l.wait_status());
        match self.launched_status {
            Some(status) => self.exits.ended_with(self.pid, t_s, status),
            None => self.exits.ended(self.pid, t_s),
        }
        // The pidfd says the target exits before its status is readable (the task is not yet a
        // zombie): wait for it briefly, so that the stop reason names how it ended.
        for _ in 0..20 {
            if self.exits.of(self.pid).is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
            self.exits.resolve();
        }
        let how = match self.exits.of(self.pid) {
            Some(exit) => format!("target ended: {}", exit.describe()),
            None => "target exited".to_string(),
        };
        self.processes
            .target_exited(self.pid, how, self.follow_children)
    }

    /// The status to exit alloctrace with: the launched command's, as a shell gives it (128 + N
    /// for signal N), when it ended on its own; None otherwise.
    fn command_status(&self) -> Option<u8> {
        let status = self.launched_status?;
        if self.exits.of(self.pid)?.stopped_by_alloctrace {
            return None;
        }
        if libc::WIFEXITED(status) {
            Some(libc::WEXITSTATUS(status) as u8)
        } else if libc::WIFSIGNALED(status) {
            Some((128 + libc::WTERMSIG(status)) as u8)
        } else {
            None
        }
    }

    /// Writes what the last second brought: resident samples, new stacks, the ledger's state.
    fn commit(&mut self) -> anyhow::Result<()> {
        let t_s = self.started.elapsed().as_secs_f64();
        let samples: Vec<RssSample> = (self.processes.live.iter())
            .filter_map(|&p| sample_rss(p, t_s as u64, &self.sink.mappings))
            .collect();
        self.writer.add_rss_samples(&samples)?;
        let stats = self.probes.ledger_stats();
        let past_full = stats.went_past_full_tables();
        let freed_unseen = stats.get(ledger_stat::FREED_UNSEEN);
        self.sink
            .ledger
            .set_kernel_unmatched_frees(stats.get(ledger_stat::UNMATCHED_FREES));
        self.sink.sync_kernel_heap(past_full == 0);
        let [_, fp_under_pressure] = self.probes.stack_stats();
        self.writer.set_stack_capture(&StackCapture {
            mode: self.stack_mode.to_string(),
            copy_bytes: self.copy_bytes,
            copies: self.sink.unwinds,
            truncated: self.sink.unwinds_truncated,
            fp_under_pressure,
            heap_sample_bytes: self.heap_sample_bytes,
            kernel_heap_stacks: self.sink.kernel_heap.stacks() as u64,
            kernel_heap_full: past_full,
            kernel_heap_sampled_out: stats.get(ledger_stat::FULL_SAMPLED_OUT),
            memory_limit: self.max_memory.map(|limit_bytes| MemoryLimit {
                limit_bytes,
                caches_dropped: self.sink.shed.caches_dropped,
                stacks_not_kept: self.sink.shed.stacks_collapsed,
            }),
            heap_duty: self.duty.as_mut().map(|duty| {
                duty.set_freed_unseen(freed_unseen + self.sink.ledger.freed_unseen());
                duty.figures()
            }),
        })?;
        if self.idle_pending_ms.is_some() && !self.sink.python_rules_matched().is_empty() {
            // A server of a profile shows itself: its idle time is told from now on.
            self.enable_pending_idle();
        }
        if let Some(phases) = self.phases() {
            self.writer.set_phases(&phases)?;
            let activity = self.phase_activity(t_s as u64);
            self.writer.add_phase_activity(&activity)?;
        }
        if self.marks.len() > self.marks_written {
            self.writer.set_marks(&self.marks)?;
            self.marks_written = self.marks.len();
        }
        let series = self.sink.ledger.take_series(t_s as u64);
        let state = self.sink.ledger.state(&self.sink.lost(self.probes.drops()));
        // The new stacks are named as they are written.
        let new_stacks = self.sink.take_new_stacks();
        self.writer.commit_tick(t_s, new_stacks, &state, &series)?;
        // After the stacks they name.
        let torch: Vec<AllocatorSample> = (self.sink.torch.take_changed().into_iter())
            .map(|figures| AllocatorSample {
                t_s: t_s as u64,
                figures,
            })
            .collect();
        self.writer.add_torch_samples(&torch)?;
        self.writer
            .add_torch_ooms(&self.sink.torch.take_ooms(t_s as u64))?;
        Ok(())
    }

    /// The phase rules' figures so far: entries, and frees by phase, those the kernel's heap
    /// ledger counted and those user space did (each block is counted by one of them).
    fn phases(&self) -> Option<Phases> {
        let entries = self.probes.phase_entries();
        let matched = self.sink.python_rules_matched();
        let mut profiles: Vec<String> = Vec::new();
        let mut rules: Vec<PhaseRuleFigures> = Vec::new();
        for (given, profile) in &self.phases_given {
            let native = self.phase_rules.iter().find(|r| r.rule == *given);
            // A profile's rule is listed once it was attached or matched a frame.
            let used = native.is_some() || matched.contains(&given.name_and_site());
            if profile.is_some() && !used {
                continue;
            }
            if let Some(server) = profile
                && !profiles.iter().any(|p| p == server)
            {
                profiles.push(server.to_string());
            }
            rules.push(PhaseRuleFigures {
                name: given.name.clone(),
                rule: given.to_string(),
                file: native.map(|r| r.shown_path.clone()),
                // A native rule not attached yet: its function was never entered.
                entries: native
                    .map(|r| entries[r.id as usize])
                    .or_else(|| (self.phases_pending.iter().any(|(r, _)| r == given)).then_some(0)),
            });
        }
        if rules.is_empty() {
            return None;
        }
        let mut frees: BTreeMap<(Class, String, String), (u64, u64)> = BTreeMap::new();
        for ((class, a, f), (bytes, count)) in self.sink.ledger.phase_frees() {
            let n = frees.entry((class, a.into(), f.into())).or_default();
            n.0 += bytes;
            n.1 += count;
        }
        if let Some(kernel) = self.probes.phase_frees() {
            let names = phases::names(&self.phase_rules);
            for (cell, (&bytes, &count)) in kernel.bytes.iter().zip(&kernel.count).enumerate() {
                let (a, f) = (cell / phase::IDS, cell % phase::IDS);
                let (Some(a), Some(f)) = (names.get(a), names.get(f)) else {
                    continue;
                };
                if count > 0 {
                    let n = frees
                        .entry((Class::Heap, a.clone(), f.clone()))
                        .or_default();
                    n.0 += bytes;
                    n.1 += count;
                }
            }
        }
        let frees = (frees.into_iter())
            .map(
                |((class, allocated_in, freed_in), (bytes, count))| PhaseFrees {
                    class,
                    allocated_in,
                    freed_in,
                    bytes,
                    count,
                },
            )
            .collect();
        Some(Phases {
            profiles,
            rules,
            frees,
        })
    }

    /// Attaches the pending phase rules `found` (their library mapped by now); records carry
    /// their phases from then on.
    fn attach_phases(&mut self, found: Vec<ResolvedRule>) {
        if found.is_empty() {
            return;
        }
        for rule in found {
            let shown = escape::for_terminal(&rule.rule.to_string()).into_owned();
            match self.probes.attach_phase(&rule) {
                Ok(()) => {
                    eprintln!(
                        "phase rule {shown} attached: {}",
                        escape::for_terminal(&rule.shown_path)
                    );
                    self.phase_rules.push(rule);
                }
                Err(e) => eprintln!("alloctrace: phase rule {shown}: {e}"),
            }
        }
        self.sink
            .set_kernel_phases(&phases::names(&self.phase_rules));
        self.enable_pending_idle();
    }

    /// Turns the idle phase on if it waits for phases (`--idle-after`), once they are there.
    fn enable_pending_idle(&mut self) {
        if let Some(ms) = self.idle_pending_ms.take()
            && let Err(e) = self.probes.enable_idle_phase(ms)
        {
            eprintln!("alloctrace: no idle phase: {e}");
        }
    }

    /// Each native phase's entries since the last call, at second `t_s` (phases of several
    /// rules added up).
    fn phase_activity(&mut self, t_s: u64) -> Vec<PhaseActivity> {
        let entries = self.probes.phase_entries();
        let mut by_phase: BTreeMap<&str, u64> = BTreeMap::new();
        for r in &self.phase_rules {
            let i = r.id as usize;
            let new = entries[i].saturating_sub(self.phase_entries_seen[i]);
            if new > 0 {
                *by_phase.entry(r.rule.name.as_str()).or_default() += new;
            }
        }
        self.phase_entries_seen = entries;
        (by_phase.into_iter())
            .map(|(phase, entries)| PhaseActivity {
                t_s,
                phase: phase.to_string(),
                entries,
            })
            .collect()
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
        // A terminal that went away (an SSH session dropped) fails the write: no matter.
        let mut stderr = std::io::stderr();
        let heap = self.sink.ledger.totals(Class::Heap);
        let _ = write!(
            stderr,
            "\r{rate} events/s, live heap {} in {} blocks, lost {}   ",
            views::human_bytes(heap.live_bytes),
            heap.live_count,
            self.lost()
        );
        let _ = stderr.flush();
    }

    /// Stops: applies what is left in the ring, writes the last state and closes the recording.
    pub fn finish(mut self, stop_reason: String) -> anyhow::Result<RecordSummary> {
        if self.progress {
            let _ = writeln!(std::io::stderr());
        }
        // Everything the target did before now is in the ring: drain it, then write the last
        // state.
        self.drain();
        let t_s = self.started.elapsed().as_secs_f64();
        for ev in self.sink.take_proc_events() {
            if ev.op == proc_op::EXIT {
                self.exits.ended(ev.pid, t_s);
            }
        }
        self.sink.cuda.finish(&mut self.sink.ledger);
        self.sink.adopt_undelivered_heap();
        if resident::truncated_pages() > 0 {
            log::warn!(
                "{} pages of files the recorder read symbols or unwind tables from were truncated \
                 while mapped and read as zeros: frames in them may be unnamed",
                resident::truncated_pages()
            );
        }
        self.exits.finish();
        self.commit()?;
        self.writer.set_exits(&self.exits.ended)?;
        self.writer.set_stop_reason(&stop_reason)?;
        let command_status = self.command_status();
        self.writer.finalize(self.started.elapsed().as_secs_f64())?;
        let lost = self.sink.lost(self.probes.drops()).values().sum();
        Ok(RecordSummary {
            events: self.sink.events,
            lost,
            stop_reason,
            tracer_peak_kib: own_peak_rss_kib(),
            command_status,
        })
    }
}
