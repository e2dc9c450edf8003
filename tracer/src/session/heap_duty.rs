//! A duty-cycled heap (`record --heap-budget PCT` or `--heap-duty PCT`): uprobes trap on every
//! call, so a process making millions of mallocs a second cannot be traced exactly for cheap.
//! Here the allocation probes are attached for a window, the free probes for the window and a
//! grace period, then both are detached until the next window. Blocks allocated in a window and
//! still live after its grace are the long-lived candidates; the same stacks' survivors piling up
//! window after window are the leak, at a rate estimated over the windows' time.
//!
//! With a budget, the duty is chosen from what the windows measured. What the probes cost is
//! their programs' run time (the kernel's count, `CostMeter`) and a trap per run. Against the
//! traced processes' CPU time, it gives the share of that time the probes took: `f` in a window
//! (every probe on) and `f_free` in a grace (the free probe alone). A cycle slows the
//! processes by `f / (1 − f)` for its window (and the allocation probes' detach) and by
//! `f_free / (1 − f_free)` for its grace; the period between windows spreads that within the
//! budget (`duty_for`).
//!
//! A trap costs a process more than the kernel's entry and exit: its caches and TLB are
//! refilled after each, which a large process pays far more than a small benchmark (a
//! PyTorch loop: 2–2.6 µs a trap, against 0.5–1 µs in `heap_churn`). So the trap's cost is
//! measured on the processes themselves (`trap_cost`): their frees are their work's unit, and
//! the CPU time a free costs with every probe on and with the free probe alone differs by the
//! programs' run time and the traps of the extra runs. `TRAP_COST` serves until a grace has
//! measured it. Without the kernel's counts, every call is priced at `COST_PER_CALL`.

use std::{
    collections::VecDeque,
    os::fd::OwnedFd,
    sync::{Arc, Mutex, mpsc},
    time::{Duration, Instant},
};

use crate::{
    model::{HeapDuty, MAX_WINDOW_STARTS},
    probes::{HeapCount, HeapCounters, HeapRole, HeapWindowFlags, Probes},
};

/// What one heap call costs a traced process while the probes are on: its traps (entry and
/// return) and the programs' work, as measured by `cargo xtask bench` on the development VM
/// (docs/performance.md: about 4.4 µs per malloc/free pair).
pub const COST_PER_CALL: Duration = Duration::from_nanos(2200);

/// What one uprobe hit costs beyond its program until one was measured on the traced
/// processes (`trap_cost`): the trap, the kernel's entry and exit (the empty programs of `cargo
/// xtask bench`'s floor: 1.6–3 µs for a malloc/free pair's three traps on the development VM).
pub const TRAP_COST: Duration = Duration::from_nanos(1000);

/// The least duty a budget chooses: a window every 1000 windows' time.
const MIN_DUTY: f64 = 0.001;

/// What detaching a window's allocation probes adds to the time their traps are paid, until a
/// detach was timed (`Probes::heap_alloc_detach`): the kernel's wait for one perf-event uprobe
/// (docs/performance.md).
const DETACH_ALLOWANCE: Duration = Duration::from_millis(75);

/// How the windows are set.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DutyOptions {
    /// `--heap-budget`: the slowdown allowed, as a fraction; None with a fixed duty.
    pub budget: Option<f64>,
    /// `--heap-duty` (fixed), or the duty before the first window measured anything.
    pub duty: f64,
    pub window: Duration,
    pub grace: Duration,
}

/// The counters and the traced processes' CPU time at one moment.
#[derive(Clone, Copy, Debug)]
struct Reading {
    at: Instant,
    cpu_ns: u64,
    count: HeapCount,
}

impl Reading {
    fn take(counters: &HeapCounters, programs: bool, pids: &[u32]) -> Reading {
        Reading {
            count: counters.read(programs),
            cpu_ns: cpu_ns(pids),
            at: Instant::now(),
        }
    }
}

/// What the probes saw and cost between two readings.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Span {
    pub seconds: f64,
    /// The traced processes' CPU time.
    pub cpu_s: f64,
    /// Heap calls and frees of the traced processes the probes saw.
    pub calls: u64,
    pub frees: u64,
    /// The heap programs' run time, seconds; None: the kernel did not count it. It includes
    /// the runs in processes not traced (a probe on a shared library traps in every process
    /// that maps it), each an early return: an upper bound.
    pub programs: Option<f64>,
}

impl Span {
    fn between(then: &Reading, now: &Reading) -> Span {
        let programs = (then.count.run_time)
            .zip(now.count.run_time)
            .map(|(a, b)| b.saturating_sub(a).as_secs_f64());
        Span {
            seconds: now.at.saturating_duration_since(then.at).as_secs_f64(),
            cpu_s: now.cpu_ns.saturating_sub(then.cpu_ns) as f64 / 1e9,
            calls: now.count.calls.saturating_sub(then.count.calls),
            frees: now.count.frees.saturating_sub(then.count.frees),
            programs,
        }
    }

    /// The traced processes' probe runs: an allocation's entry and return, a free's entry.
    fn runs(&self) -> u64 {
        let allocations = self.calls.saturating_sub(self.frees);
        2 * allocations + self.frees
    }

    /// What the probes cost the traced processes, in seconds, a trap costing `trap_s`.
    fn cost_s(&self, trap_s: f64) -> Option<f64> {
        Some(self.programs? + self.runs() as f64 * trap_s)
    }
}

enum State {
    /// Allocation and free probes attached since `since`; measured from `mark`.
    Open {
        since: Instant,
        mark: Reading,
        counters: Arc<HeapCounters>,
    },
    /// Allocation probes detached, free probes on.
    Grace(Grace),
    /// Everything detached (or free probes kept, when the next window comes before their grace
    /// would end) until `next`.
    Closed { next: Instant },
}

/// A grace: after the window opened at `opened` and on for `on` (measured as `window`), the
/// free probes until `until` at most, measured from the window's edge; it ends sooner once the
/// window's blocks stop dying (`Grace::stopped_dying`).
struct Grace {
    opened: Instant,
    on: Duration,
    window: Span,
    edge: Reading,
    counters: Arc<HeapCounters>,
    until: Instant,
    /// The current step's start and the held blocks freed by then (None: the kernel keeps no
    /// ledger to count them, and the grace lasts until `until`).
    step: Option<(Instant, u64)>,
    /// The held blocks freed in the grace's first step.
    first_step: Option<u64>,
}

/// How often a grace looks at whether the window's blocks still die.
const GRACE_STEP: Duration = Duration::from_millis(50);

/// A grace ends once a step frees at most this fraction (1/N) of what its first step freed.
const SETTLED_FRACTION: u64 = 8;

impl Grace {
    /// Whether the window's blocks have stopped dying, looked at once a step: most of a
    /// window's short-lived blocks (a request's own buffers) die in a burst after its edge, as
    /// the calls in flight finish; once a step frees at most an eighth of what the first did,
    /// what the grace is there to see has been seen, and the rest of it would be paid for
    /// nothing (on a PyTorch loop the free probe alone takes most of the process's time).
    fn stopped_dying(&mut self, now: Instant) -> bool {
        let Some((since, freed_then)) = self.step else {
            return false;
        };
        if now < since + GRACE_STEP {
            return false;
        }
        let Some(freed) = self.counters.read(false).held_freed else {
            return false;
        };
        let in_step = freed.saturating_sub(freed_then);
        self.step = Some((now, freed));
        match self.first_step {
            None => {
                self.first_step = Some(in_step);
                false
            }
            Some(first) => settled(first, in_step),
        }
    }
}

/// Whether a grace whose first step freed `first` of the window's blocks and its last `last`
/// has seen them stop dying: the last freed at most 1/`SETTLED_FRACTION` of the first (none,
/// when the first freed none).
fn settled(first: u64, last: u64) -> bool {
    last <= first / SETTLED_FRACTION
}

/// The windows of a duty-cycled heap.
pub struct DutyCycle {
    opts: DutyOptions,
    state: State,
    clock: WindowClock,
    figures: HeapDuty,
    meter: CostMeter,
    /// When the recording started: window starts are counted from it.
    started: Instant,
    /// The last windows' and graces' spans: shares are taken over them, steadier than one.
    windows: VecDeque<Span>,
    graces: VecDeque<Span>,
    /// The last traps' costs measured (seconds): the median is used.
    traps: VecDeque<f64>,
}

/// Windows (and graces, and trap costs) the shares are taken over.
const RECENT_WINDOWS: usize = 4;

impl DutyCycle {
    /// Opens the first window now, on the heap probes' sites attached so far.
    pub fn start(
        opts: DutyOptions,
        probes: &mut Probes,
        pids: &[u32],
        started: Instant,
    ) -> DutyCycle {
        let flags = match probes.heap_window_flags() {
            Ok(flags) => Some(flags),
            Err(e) => {
                log::warn!("duty-cycled heap: windows close when the recorder gets to them: {e}");
                None
            }
        };
        let mut cycle = DutyCycle {
            opts,
            clock: WindowClock::start(flags),
            state: State::Closed {
                next: Instant::now(),
            },
            figures: HeapDuty {
                budget_percent: opts.budget.map(|b| b * 100.0),
                duty: opts.duty,
                window_s: opts.window.as_secs_f64(),
                grace_s: opts.grace.as_secs_f64(),
                grace_taken_s: opts.grace.as_secs_f64(),
                trap_ns: TRAP_COST.as_nanos() as f64,
                ..HeapDuty::default()
            },
            meter: CostMeter::default(),
            started,
            windows: VecDeque::new(),
            graces: VecDeque::new(),
            traps: VecDeque::new(),
        };
        cycle.open(probes, pids);
        cycle
    }

    /// Moves the windows on: called at every poll of the ring.
    pub fn poll(&mut self, probes: &mut Probes, pids: &[u32]) {
        let now = Instant::now();
        let grace_over = match &mut self.state {
            State::Grace(grace) => now >= grace.until || grace.stopped_dying(now),
            _ => false,
        };
        match &self.state {
            State::Open { .. } => {
                let Some(edge) = self.clock.ended() else {
                    return;
                };
                if let State::Open {
                    since,
                    mark,
                    counters,
                } = self.take_state()
                {
                    self.state = self.end_window(probes, pids, (since, mark, counters), edge);
                }
            }
            State::Grace(_) if grace_over => {
                if let State::Grace(grace) = self.take_state() {
                    self.state = self.end_grace(probes, pids, grace);
                }
            }
            State::Closed { next } if now >= *next => self.open(probes, pids),
            _ => {}
        }
    }

    /// The state, left closed until now.
    fn take_state(&mut self) -> State {
        let closed = State::Closed {
            next: Instant::now(),
        };
        std::mem::replace(&mut self.state, closed)
    }

    /// The window opened at `since` and measured from `mark` ended at `edge`: priced, then
    /// closed for its grace, or opened again at once while the duty is 100 %.
    fn end_window(
        &mut self,
        probes: &mut Probes,
        pids: &[u32],
        (since, mark, counters): (Instant, Reading, Arc<HeapCounters>),
        edge: Reading,
    ) -> State {
        let window = Span::between(&mark, &edge);
        push_recent(&mut self.windows, window);
        self.figures.calls_per_s = window.calls as f64 / window.seconds.max(1e-6);
        self.price(probes);
        if self.opts.duty < 1.0 {
            return self.close(probes, since, window, edge, counters);
        }
        // Always on, for now: open again at once, measured again after another window's time.
        window_edge(probes, HeapRole::Alloc, true);
        let mark = Reading::take(&counters, self.meter.counting(), pids);
        let end = mark.at + self.opts.window;
        self.clock.schedule(end, pids, counters.clone(), mark);
        State::Open {
            since,
            mark,
            counters,
        }
    }

    /// The grace ended: its free probes detached, the trap's cost measured from it and its
    /// window, the cycle priced again and the next window moved to match.
    fn end_grace(&mut self, probes: &mut Probes, pids: &[u32], grace: Grace) -> State {
        let end = Reading::take(&grace.counters, self.meter.counting(), pids);
        window_edge(probes, HeapRole::Free, false);
        probes.close_heap(HeapRole::Free);
        self.meter.stop();
        let span = Span::between(&grace.edge, &end);
        log::debug!(
            "heap grace {}: {} frees in {:.3} s, {:.3} s of CPU",
            self.figures.windows,
            span.frees,
            span.seconds,
            span.cpu_s
        );
        push_recent(&mut self.graces, span);
        if let Some(trap) = trap_cost(&grace.window, &span) {
            // A window and its grace can fall in different phases of the processes' work
            // (start-up): one measure moves the price at most twofold.
            let now = self.trap_s();
            push_recent(&mut self.traps, trap.clamp(now / 2.0, now * 2.0));
        }
        self.price(probes);
        State::Closed {
            next: self.next_window(grace.opened, grace.on),
        }
    }

    /// The figures so far, a window still open counted up to now.
    pub fn figures(&self) -> HeapDuty {
        let mut figures = self.figures.clone();
        if let State::Open { since, .. } = self.state {
            figures.on_s += since.elapsed().as_secs_f64();
        }
        figures
    }

    /// Blocks found freed while the probes were off, counted in the kernel and by user space.
    pub fn set_freed_unseen(&mut self, blocks: u64) {
        self.figures.freed_unseen = blocks;
    }

    fn open(&mut self, probes: &mut Probes, pids: &[u32]) {
        self.meter.start();
        if let Err(e) = probes.open_heap_window() {
            log::warn!("duty-cycled heap: a window's probes were not all attached: {e}");
        }
        for role in [HeapRole::Free, HeapRole::Alloc] {
            window_edge(probes, role, true);
        }
        self.figures.windows += 1;
        let now = Instant::now();
        if self.figures.window_starts_s.len() < MAX_WINDOW_STARTS {
            let start = now.saturating_duration_since(self.started);
            self.figures.window_starts_s.push(start.as_secs_f64());
        }
        let counters = Arc::new(probes.heap_counters());
        let mark = Reading::take(&counters, self.meter.counting(), pids);
        self.clock
            .schedule(now + self.opts.window, pids, counters.clone(), mark);
        self.state = State::Open {
            since: now,
            mark,
            counters,
        };
    }

    /// When the window after the one opened at `opened` and on for `on` opens: one period (at
    /// the duty as priced now) after it, and not before now.
    fn next_window(&self, opened: Instant, on: Duration) -> Instant {
        let period = on.div_f64(self.opts.duty.max(MIN_DUTY));
        (opened + period).max(Instant::now())
    }

    /// What a trap costs the processes: the median of the last measures, `TRAP_COST` before one.
    fn trap_s(&self) -> f64 {
        median(&self.traps).unwrap_or(TRAP_COST.as_secs_f64())
    }

    /// How long a grace lasts: the median of the last ones (they end once the window's blocks
    /// stop dying), `--heap-grace` (the longest) before one.
    fn grace_s(&self) -> f64 {
        let lasted: VecDeque<f64> = self.graces.iter().map(|g| g.seconds).collect();
        median(&lasted).unwrap_or(self.opts.grace.as_secs_f64())
    }

    /// The shares of the processes' time the probes take, from the last windows and graces and
    /// the trap's cost measured; with a budget, the duty that keeps within it.
    fn price(&mut self, probes: &Probes) {
        let trap_s = self.trap_s();
        let grace = Duration::from_secs_f64(self.grace_s());
        self.figures.grace_taken_s = grace.as_secs_f64();
        let shares = shares(&self.windows, &self.graces, trap_s);
        self.figures.trap_ns = trap_s * 1e9;
        self.figures.probe_share = shares.window;
        self.figures.detach_probe_share = shares.detach;
        self.figures.free_probe_share = shares.grace;
        let detach = probes.heap_alloc_detach();
        self.figures.detach_s = detach.map_or(0.0, |d| d.as_secs_f64());
        if let Some(budget) = self.opts.budget {
            let detach = detach.unwrap_or(DETACH_ALLOWANCE);
            self.opts.duty = duty_for(budget, shares, self.opts.window, detach, grace);
            self.figures.duty = self.opts.duty;
        }
        let last = self.windows.back().copied().unwrap_or_default();
        log::debug!(
            "heap window {}: {} calls ({} frees) in {:.3} s, {:.3} s of CPU; a trap {:.0} ns; \
             probes {:.1} % (grace {:.1} %), detach {:.3} s, duty {:.4}",
            self.figures.windows,
            last.calls,
            last.frees,
            last.seconds,
            last.cpu_s,
            trap_s * 1e9,
            shares.window * 100.0,
            shares.grace * 100.0,
            self.figures.detach_s,
            self.opts.duty
        );
    }

    /// The window opened at `since` ended at `edge` (its edge closed): its allocation probes
    /// are detached, the free probes kept for the grace.
    fn close(
        &mut self,
        probes: &mut Probes,
        since: Instant,
        window: Span,
        edge: Reading,
        counters: Arc<HeapCounters>,
    ) -> State {
        let on = edge.at - since;
        self.figures.on_s += on.as_secs_f64();
        probes.close_heap(HeapRole::Alloc);
        let now = Instant::now();
        let next = self.next_window(since, on);
        let until = edge.at + self.opts.grace;
        log::debug!(
            "heap window {} closed after {:.3} s; next in {:.1} s",
            self.figures.windows,
            on.as_secs_f64(),
            next.saturating_duration_since(now).as_secs_f64()
        );
        if until < next {
            State::Grace(Grace {
                opened: since,
                on,
                window,
                step: edge.count.held_freed.map(|freed| (edge.at, freed)),
                first_step: None,
                edge,
                counters,
                until,
            })
        } else {
            // The free probes stay on into the next window.
            self.meter.stop();
            State::Closed { next }
        }
    }
}

/// Keeps the last `RECENT_WINDOWS` of `value`.
fn push_recent<T>(recent: &mut VecDeque<T>, value: T) {
    if recent.len() == RECENT_WINDOWS {
        recent.pop_front();
    }
    recent.push_back(value);
}

/// The middle of `values` (the mean of the two middle ones), None when empty.
fn median(values: &VecDeque<f64>) -> Option<f64> {
    let mut sorted: Vec<f64> = values.iter().copied().collect();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(sorted[n / 2]),
        _ => Some((sorted[n / 2 - 1] + sorted[n / 2]) / 2.0),
    }
}

/// The shares of the traced processes' CPU time the probes take in each part of a cycle.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Shares {
    /// In a window, every probe on.
    pub window: f64,
    /// While the allocation probes are detached: their traps go on, their programs return at
    /// once (the window's edge is closed).
    pub detach: f64,
    /// In a grace, the free probe alone.
    pub grace: f64,
}

/// The shares over the last `windows` and `graces`, a trap costing `trap_s`. Before a grace
/// measured one, the grace's share is the window's frees at the window's cost per run. Without
/// the kernel's counts, every call is priced at `COST_PER_CALL`, the free probe at half the
/// calls, the detach as the window.
pub fn shares(windows: &VecDeque<Span>, graces: &VecDeque<Span>, trap_s: f64) -> Shares {
    let sum = |spans: &VecDeque<Span>, f: &dyn Fn(&Span) -> Option<f64>| {
        spans.iter().map(f).sum::<Option<f64>>()
    };
    let cpu = |spans: &VecDeque<Span>| spans.iter().map(|s| s.cpu_s).sum::<f64>();
    let counted = sum(windows, &|s| s.cost_s(trap_s));
    let Some(cost) = counted else {
        let calls = windows.iter().map(|s| s.calls).sum();
        let share = probe_share(calls, cpu(windows));
        let frees = graces.iter().map(|s| s.frees).sum();
        let grace = match graces.is_empty() {
            true => share / 2.0,
            false => probe_share(frees, cpu(graces)),
        };
        return Shares {
            window: share,
            detach: share,
            grace,
        };
    };
    let runs: u64 = windows.iter().map(Span::runs).sum();
    let grace = match sum(graces, &|s| s.cost_s(trap_s)) {
        Some(grace_cost) if !graces.is_empty() => cost_share(grace_cost, cpu(graces)),
        _ => {
            // The window's frees, each a run at the window's mean cost per run.
            let frees: u64 = windows.iter().map(|s| s.frees).sum();
            let per_run = cost / (runs.max(1) as f64);
            cost_share(frees as f64 * per_run, cpu(windows))
        }
    };
    Shares {
        window: cost_share(cost, cpu(windows)),
        detach: cost_share(runs as f64 * trap_s, cpu(windows)),
        grace,
    }
}

/// What a trap costs the traced processes, in seconds, from a window (every probe on) and the
/// grace after it (the free probe alone), with frees as the unit of their work: a free costs
/// `u + (P + R·t) / F` of CPU time in each, `u` the work's own share, `P` the programs' run
/// time, `R` their runs and `F` the frees, so the difference of the two gives `t`. None when a
/// span lacks the counts or frees, the runs per free hardly differ, or the two spans' work
/// differed so much that no positive trap cost fits (a phase change).
pub fn trap_cost(window: &Span, grace: &Span) -> Option<f64> {
    const MIN_FREES: u64 = 100;
    let (p_w, p_g) = (window.programs?, grace.programs?);
    if window.frees < MIN_FREES || grace.frees < MIN_FREES {
        return None;
    }
    let (f_w, f_g) = (window.frees as f64, grace.frees as f64);
    let extra_runs = window.runs() as f64 / f_w - grace.runs() as f64 / f_g;
    if extra_runs < 0.5 {
        return None;
    }
    let per_free = |cpu_s: f64, run_time: f64, frees: f64| (cpu_s - run_time) / frees;
    let t = (per_free(window.cpu_s, p_w, f_w) - per_free(grace.cpu_s, p_g, f_g)) / extra_runs;
    (t > 0.0 && t < MAX_TRAP_COST.as_secs_f64()).then_some(t)
}

/// More than any trap costs: a measure above it is a phase change, not a trap.
const MAX_TRAP_COST: Duration = Duration::from_micros(50);

/// Closes allocation windows on time: a thread sleeps until a window's end and closes its edge
/// in the kernel, reading the counters and the traced processes' CPU time then, whatever the
/// recorder's loop is busy with (hooking a large library can take it seconds). All are read at
/// the edge: the free probe runs on through the grace, so its costs read later would be set
/// against CPU time that stopped counting. Without the thread, the loop closes the edge itself
/// when it sees the end passed.
struct WindowClock {
    flags: Option<HeapWindowFlags>,
    deadlines: Option<mpsc::Sender<Deadline>>,
    /// The window now open, without the thread.
    deadline: Option<Deadline>,
    /// The reading at the current window's edge, once it closed.
    ended: Arc<Mutex<Option<Reading>>>,
}

/// A window's end: the processes whose CPU time is read then, and the counters.
struct Deadline {
    at: Instant,
    pids: Vec<u32>,
    counters: Arc<HeapCounters>,
    /// Whether the programs' costs are read (they were at the window's start).
    programs: bool,
}

impl Deadline {
    /// Closes the allocation edge and reads the window's end, at once.
    fn close(&self, flags: Option<&HeapWindowFlags>) -> Reading {
        if let Some(flags) = flags {
            let _ = flags.set(HeapRole::Alloc, false);
        }
        Reading::take(&self.counters, self.programs, &self.pids)
    }
}

impl WindowClock {
    fn start(flags: Option<HeapWindowFlags>) -> WindowClock {
        let ended = Arc::new(Mutex::new(None));
        let (tx, rx) = mpsc::channel::<Deadline>();
        let thread_flags = flags.clone();
        let thread_ended = ended.clone();
        let spawned = thread_flags.is_some()
            && std::thread::Builder::new()
                .name("heap-window".into())
                .spawn(move || {
                    for deadline in rx {
                        std::thread::sleep(deadline.at.saturating_duration_since(Instant::now()));
                        let edge = deadline.close(thread_flags.as_ref());
                        *thread_ended.lock().unwrap_or_else(|e| e.into_inner()) = Some(edge);
                    }
                })
                .is_ok();
        WindowClock {
            flags,
            deadlines: spawned.then_some(tx),
            deadline: None,
            ended,
        }
    }

    /// The window measured from `mark` ends at `at`, read with `counters`.
    fn schedule(&mut self, at: Instant, pids: &[u32], counters: Arc<HeapCounters>, mark: Reading) {
        *self.ended.lock().unwrap_or_else(|e| e.into_inner()) = None;
        let deadline = Deadline {
            at,
            pids: pids.to_vec(),
            counters,
            programs: mark.count.run_time.is_some(),
        };
        self.deadline = None;
        if let Some(tx) = &self.deadlines {
            match tx.send(deadline) {
                Ok(()) => return,
                Err(mpsc::SendError(deadline)) => self.deadline = Some(deadline),
            }
        } else {
            self.deadline = Some(deadline);
        }
        self.deadlines = None;
    }

    /// The reading at the window's edge, once it closed.
    fn ended(&mut self) -> Option<Reading> {
        if self.deadlines.is_some() {
            return self.ended.lock().unwrap_or_else(|e| e.into_inner()).take();
        }
        if Instant::now() < self.deadline.as_ref()?.at {
            return None;
        }
        let deadline = self.deadline.take()?;
        Some(deadline.close(self.flags.as_ref()))
    }
}

/// The kernel's count of what the heap programs cost (`BPF_ENABLE_STATS`), on only from a
/// window's start to its grace's end: it times every eBPF program on the machine (two clock
/// reads a run).
#[derive(Default)]
struct CostMeter {
    stats: Option<OwnedFd>,
    /// Said once: the kernel would not count (an older kernel, or no permission).
    refused: bool,
}

impl CostMeter {
    fn start(&mut self) {
        if self.stats.is_some() || self.refused {
            return;
        }
        match aya::sys::enable_stats(aya::sys::Stats::RunTime) {
            Ok(fd) => self.stats = Some(fd),
            Err(e) => {
                self.refused = true;
                log::debug!("duty-cycled heap: the probes priced per call, not counted: {e}");
            }
        }
    }

    fn stop(&mut self) {
        self.stats = None;
    }

    /// Whether the kernel counts the programs' costs now.
    fn counting(&self) -> bool {
        self.stats.is_some()
    }
}

/// Opens or closes a window's edge in the kernel; a failure (the map write) is said once and
/// leaves the probes recording, which only costs.
fn window_edge(probes: &mut Probes, role: HeapRole, open: bool) {
    if let Err(e) = probes.set_heap_window(role, open) {
        log::warn!("duty-cycled heap: window flag not set: {e}");
    }
}

/// CPU time of the traced processes so far, in nanoseconds: their CPU clocks
/// (`clock_getcpuclockid`), all threads together, exact where /proc's clock ticks (10 ms)
/// would be coarse for one short window. A process gone counts nothing.
fn cpu_ns(pids: &[u32]) -> u64 {
    pids.iter()
        .filter_map(|&pid| {
            let pid = libc::pid_t::try_from(pid).ok()?;
            let mut clock: libc::clockid_t = 0;
            // SAFETY: `clock` is a valid out pointer.
            if unsafe { libc::clock_getcpuclockid(pid, &mut clock) } != 0 {
                return None;
            }
            let mut now = libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            // SAFETY: `now` is a valid out pointer.
            if unsafe { libc::clock_gettime(clock, &mut now) } != 0 {
                return None;
            }
            Some(
                u64::try_from(now.tv_sec).ok()? * 1_000_000_000
                    + u64::try_from(now.tv_nsec).ok()?,
            )
        })
        .sum()
}

/// The share of the traced processes' CPU time that `calls` heap calls took in probes, over
/// `cpu_s` seconds of it (at most 0.99; 0.99 as well when calls came with no measurable time).
pub fn probe_share(calls: u64, cpu_s: f64) -> f64 {
    if calls == 0 {
        return 0.0;
    }
    let probes = calls as f64 * COST_PER_CALL.as_secs_f64();
    if cpu_s <= 0.0 {
        return 0.99;
    }
    (probes / cpu_s).min(0.99)
}

/// The share of `cpu_s` seconds of the traced processes' CPU time that `cost_s` seconds took
/// (at most 0.99; 0.99 as well for a cost with no measurable time).
pub fn cost_share(cost_s: f64, cpu_s: f64) -> f64 {
    if cost_s <= 0.0 {
        return 0.0;
    }
    if cpu_s <= 0.0 {
        return 0.99;
    }
    (cost_s / cpu_s).min(0.99)
}

/// The duty (the share of the time the allocation probes are on) whose expected slowdown is
/// `budget`, for probes that take `shares` of the processes' time. A cycle costs its window
/// slowing by `f / (1 − f)` at the window's share, the allocation probes' detach at the
/// detach's share and its grace at the grace's; the cycle's period spreads that cost to the
/// budget. At most 1, at least `MIN_DUTY`.
pub fn duty_for(
    budget: f64,
    shares: Shares,
    window: Duration,
    detach: Duration,
    grace: Duration,
) -> f64 {
    if shares.window <= 0.0 {
        return 1.0;
    }
    let slowdown = |f: f64| f / (1.0 - f);
    let cost = window.as_secs_f64() * slowdown(shares.window)
        + detach.as_secs_f64() * slowdown(shares.detach)
        + grace.as_secs_f64() * slowdown(shares.grace);
    let period = cost / budget;
    (window.as_secs_f64() / period).clamp(MIN_DUTY, 1.0)
}

/// What exact heap tracing will cost process `pid`, which made `mallocs` malloc calls in
/// `span` using `cpu_s` seconds of CPU (None: unreadable), as one line: each malloc and its free
/// traced at `COST_PER_CALL`, against the CPU time the process uses.
pub fn heap_cost_line(pid: u32, mallocs: u64, span: Duration, cpu_s: Option<f64>) -> String {
    let per_s = mallocs as f64 / span.as_secs_f64().max(1e-6);
    let probes_s = 2.0 * mallocs as f64 * COST_PER_CALL.as_secs_f64();
    let rate = if per_s >= 1e6 {
        format!("{:.1} M", per_s / 1e6)
    } else if per_s >= 1e4 {
        format!("{:.0} k", per_s / 1e3)
    } else {
        format!("{per_s:.0}")
    };
    let head = format!(
        "heap cost: PID {pid} makes {rate} malloc calls a second (counted for {:.1} s before \
         the heap probes went on)",
        span.as_secs_f64()
    );
    match cpu_s {
        Some(cpu) if cpu > 0.0 => {
            let extra = probes_s / cpu;
            let advice = if extra > 0.1 {
                "; --heap-budget 5 would keep it within 5 %"
            } else {
                ""
            };
            format!(
                "{head}: each call and its free trapped at ~{:.1} µs adds about {:.0} % to its \
                 CPU time{advice}",
                COST_PER_CALL.as_secs_f64() * 1e6,
                extra * 100.0
            )
        }
        _ => format!("{head}; it used no measurable CPU time meanwhile"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cost_line_prices_each_call_and_its_free_against_the_cpu_time() {
        let span = Duration::from_millis(200);
        // 200 k mallocs in 0.2 s with 0.2 s of CPU: 1 M/s; 400 k traced calls, 0.88 s of traps.
        let line = heap_cost_line(42, 200_000, span, Some(0.2));
        assert!(
            line.contains("PID 42 makes 1.0 M malloc calls a second"),
            "{line}"
        );
        assert!(line.contains("adds about 440 %"), "{line}");
        assert!(line.contains("--heap-budget 5"), "{line}");
        // A llama.cpp-like rate: no advice needed.
        let line = heap_cost_line(42, 20, span, Some(0.2));
        assert!(
            line.contains("makes 100 malloc calls") && line.contains("about 0 %"),
            "{line}"
        );
        assert!(!line.contains("--heap-budget"), "{line}");
        let line = heap_cost_line(42, 0, span, Some(0.0));
        assert!(line.ends_with("no measurable CPU time meanwhile"), "{line}");
    }

    #[test]
    fn a_grace_ends_once_a_step_frees_an_eighth_of_what_its_first_did() {
        // The first step saw the burst after the edge; the last freed an eighth of it, or less.
        assert!(settled(800, 100));
        assert!(settled(800, 0));
        assert!(!settled(800, 101));
        // Nothing of the window died in the first step: done once the last frees nothing too.
        assert!(settled(0, 0));
        assert!(!settled(0, 1));
        // Blocks that go on dying at the same rate keep the grace on to its end.
        assert!(!settled(500, 500));
        assert!(!settled(u64::MAX, u64::MAX));
    }

    fn cycle(window: f64, detach: f64, grace: f64) -> Shares {
        Shares {
            window,
            detach,
            grace,
        }
    }

    #[test]
    fn the_duty_keeps_the_expected_slowdown_within_the_budget() {
        let (window, grace) = (Duration::from_millis(250), Duration::from_secs(2));
        let duty_of = |budget, shares| duty_for(budget, shares, window, DETACH_ALLOWANCE, grace);
        // Exact tracing slows a loop 20x: the probes take 95 % of its time while on, their
        // traps alone 50 %. A cycle costs 0.25 s x 19 (window) + 0.075 s x 1 (detach) + 2 s x
        // 0.475/0.525 (grace, frees alone): 6.6346 s of slowdown, spread over 132.7 s at 5 %:
        // the window is on 0.188 % of the time.
        let duty = duty_of(0.05, cycle(0.95, 0.5, 0.475));
        let cost = 0.25 * 19.0 + 0.075 + 2.0 * (0.475 / 0.525);
        assert!((duty - 0.25 / (cost / 0.05)).abs() < 1e-12, "{duty}");
        assert!(
            (cost * duty / 0.25 - 0.05).abs() < 1e-12,
            "slowdown over a period = budget"
        );
        // A modest malloc rate (2 % in probes): on most of the time.
        let modest = duty_of(0.05, cycle(0.02, 0.01, 0.01));
        assert!(modest > 0.25 && modest < 1.0, "{modest}");
        // No calls: always on; a budget that allows everything: always on.
        let none = cycle(0.0, 0.0, 0.0);
        assert_eq!(duty_of(0.05, none), 1.0);
        let cheap = cycle(0.01, 0.005, 0.005);
        assert_eq!(duty_of(1.0, cheap), 1.0);
        let dear = cycle(0.99, 0.9, 0.5);
        assert_eq!(duty_of(0.0001, dear), MIN_DUTY);
        // A free probe that costs little (no stack to walk) leaves room for more windows: a
        // cycle costs 4.825 s + 2 s x 0.05/0.95.
        let cheap_frees = duty_of(0.05, cycle(0.95, 0.5, 0.05));
        let cheap_cost = 0.25 * 19.0 + 0.075 + 2.0 * (0.05 / 0.95);
        assert!(
            (cheap_frees / duty - cost / cheap_cost).abs() < 1e-9,
            "{cheap_frees}"
        );
    }

    /// A process whose work frees 100 k blocks a CPU second untraced (10 µs of its own CPU
    /// time a free), with a malloc per free; traps cost it `trap` each.
    fn spans(trap: f64) -> (Span, Span) {
        let own = 10e-6;
        // Window: 10 k frees; malloc entry, malloc return and free: 3 runs a free, the
        // programs 0.4 µs a run.
        let (frees, runs) = (10_000u64, 30_000u64);
        let run_time = runs as f64 * 0.4e-6;
        let window = Span {
            seconds: 0.25,
            cpu_s: frees as f64 * own + run_time + runs as f64 * trap,
            calls: 20_000,
            frees,
            programs: Some(run_time),
        };
        // Grace: 150 k frees, the free probe alone at 0.2 µs a run.
        let (frees, runs) = (150_000u64, 150_000u64);
        let run_time = runs as f64 * 0.2e-6;
        let grace = Span {
            seconds: 2.0,
            cpu_s: frees as f64 * own + run_time + runs as f64 * trap,
            calls: frees,
            frees,
            programs: Some(run_time),
        };
        (window, grace)
    }

    #[test]
    fn a_trap_is_priced_from_a_window_and_its_grace() {
        for trap in [0.5e-6, 2.4e-6, 10e-6] {
            let (window, grace) = spans(trap);
            let measured = trap_cost(&window, &grace).unwrap();
            assert!((measured - trap).abs() < 1e-12, "{measured} against {trap}");
        }
        let (window, grace) = spans(2.4e-6);
        // No counts, too few frees, or no more runs a free in the window than in the grace.
        let uncounted = Span {
            programs: None,
            ..grace
        };
        assert_eq!(trap_cost(&window, &uncounted), None);
        let idle = Span { frees: 10, ..grace };
        assert_eq!(trap_cost(&window, &idle), None);
        let frees_alone = Span {
            calls: window.frees,
            ..window
        };
        assert_eq!(trap_cost(&frees_alone, &grace), None);
        // The grace's work much heavier a free than the window's (a phase change): no
        // positive trap cost fits.
        let heavier = Span {
            cpu_s: grace.cpu_s * 10.0,
            ..grace
        };
        assert_eq!(trap_cost(&window, &heavier), None);
    }

    #[test]
    fn the_shares_are_the_programs_and_their_traps_against_the_cpu_time() {
        let trap = 2.4e-6;
        let (window, grace) = spans(trap);
        let windows = VecDeque::from([window]);
        let graces = VecDeque::from([grace]);
        let priced = shares(&windows, &graces, trap);
        // Window: 30 k runs at 0.4 + 2.4 µs = 0.084 s of 0.184 s of CPU; their traps alone
        // 0.072 s.
        assert!((priced.window - 0.084 / 0.184).abs() < 1e-12, "{priced:?}");
        assert!((priced.detach - 0.072 / 0.184).abs() < 1e-12, "{priced:?}");
        // Grace: 150 k runs at 0.2 + 2.4 µs = 0.39 s of 1.89 s.
        assert!((priced.grace - 0.39 / 1.89).abs() < 1e-12, "{priced:?}");
        // Priced at a cheaper trap, the window costs less.
        assert!(shares(&windows, &graces, 0.5e-6).window < priced.window);
        // Before a grace: the window's frees at its mean cost per run, a third of its cost.
        let first = shares(&windows, &VecDeque::new(), trap).grace;
        assert!((first - 0.084 / 3.0 / 0.184).abs() < 1e-12, "{first}");
        // Without the kernel's counts: every call at COST_PER_CALL, the free probe at half.
        let uncounted = VecDeque::from([Span {
            programs: None,
            ..window
        }]);
        let priced = shares(&uncounted, &VecDeque::new(), trap);
        assert_eq!(priced.window, probe_share(20_000, window.cpu_s));
        assert_eq!(priced.detach, priced.window);
        assert_eq!(priced.grace, priced.window / 2.0);
        assert_eq!(cost_share(0.0, 0.5), 0.0);
        assert_eq!(cost_share(0.001, 0.0), 0.99);
        assert_eq!(cost_share(2.0, 1.0), 0.99);
    }

    #[test]
    fn the_median_of_the_last_measures_is_used() {
        assert_eq!(median(&VecDeque::new()), None);
        assert_eq!(median(&VecDeque::from([3.0, 1.0, 2.0])), Some(2.0));
        assert_eq!(median(&VecDeque::from([4.0, 1.0, 2.0, 3.0])), Some(2.5));
        let mut recent = VecDeque::new();
        for v in 0..6 {
            push_recent(&mut recent, f64::from(v));
        }
        assert_eq!(recent, VecDeque::from([2.0, 3.0, 4.0, 5.0]));
    }

    #[test]
    fn the_probe_share_comes_from_the_calls_and_the_cpu_time() {
        // A million calls at 2.2 µs in 4.4 s of CPU: half of it.
        assert!((probe_share(1_000_000, 4.4) - 0.5).abs() < 1e-9);
        assert_eq!(probe_share(0, 1.0), 0.0);
        assert_eq!(
            probe_share(10, 0.0),
            0.99,
            "calls but no measurable CPU time"
        );
        assert_eq!(probe_share(100_000_000, 1.0), 0.99);
    }
}
