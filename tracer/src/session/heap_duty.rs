//! A duty-cycled heap (`record --heap-budget PCT` or `--heap-duty PCT`): uprobes trap on every
//! call, so a process making millions of mallocs a second cannot be traced exactly for cheap.
//! Here the allocation probes are attached for a window, the free probes for the window and a
//! grace period, then both are detached until the next window. Blocks allocated in a window and
//! still live after its grace are the long-lived candidates; the same stacks' survivors piling up
//! window after window are the leak, at a rate estimated over the windows' time.
//!
//! With a budget, the duty is chosen after each window from what it measured: what the probes
//! cost while on (the kernel's count of their programs' run time and runs, each run a trap at
//! `TRAP_COST`; `CostMeter`) against the traced processes' CPU time then gives the share of
//! that time the probes took, `f` (all probes) and `f_free` (the free probe alone). A cycle
//! slows the processes by `f / (1 − f)` for its window (and the allocation probes' detach) and
//! by `f_free / (1 − f_free)` for its grace; the period between windows spreads that within the
//! budget (`duty_for`). Without the kernel's counts, every call is priced at `COST_PER_CALL`
//! and the free probe at half the calls.

use std::{
    os::fd::OwnedFd,
    sync::{Arc, Mutex, mpsc},
    time::{Duration, Instant},
};

use tracer_common::ledger_stat;

use crate::{
    model::{HeapDuty, MAX_WINDOW_STARTS},
    probes::{HeapCostReader, HeapCosts, HeapRole, HeapWindowFlags, Probes, ProgramCost},
    proc::stat,
};

/// What one heap call costs a traced process while the probes are on: its traps (entry and
/// return) and the programs' work, as measured by `cargo xtask bench` on the development VM
/// (docs/performance.md: about 4.4 µs per malloc/free pair).
pub const COST_PER_CALL: Duration = Duration::from_nanos(2200);

/// What one uprobe hit costs beyond its program: the trap, the kernel's entry and exit (the
/// empty programs of `cargo xtask bench`'s floor: about 3 µs for a malloc/free pair's three
/// traps on the development VM).
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

enum State {
    /// Allocation and free probes attached since `since`; measured from `mark`, when the
    /// heap calls and CPU ticks were `calls` and `cpu_ticks`.
    Open {
        since: Instant,
        mark: Instant,
        calls: u64,
        cpu_ticks: u64,
        /// The heap programs' costs at `mark` (None: the kernel does not count them).
        costs: Option<HeapCosts>,
    },
    /// Allocation probes detached; free probes until `until`; the next window at `next`.
    Grace { until: Instant, next: Instant },
    /// Everything detached (or free probes kept, when the next window comes before their grace
    /// would end) until `next`.
    Closed { next: Instant },
}

/// The windows of a duty-cycled heap.
pub struct DutyCycle {
    opts: DutyOptions,
    state: State,
    clock: WindowClock,
    figures: HeapDuty,
    ticks_per_s: f64,
    meter: CostMeter,
    /// When the recording started: window starts are counted from it.
    started: Instant,
    /// The last windows' probe cost, free probe's cost and CPU time, in seconds: shares are
    /// taken over them (CPU time is counted in clock ticks, coarse for one short window).
    recent: std::collections::VecDeque<(f64, f64, f64)>,
}

/// Windows the probe shares are taken over.
const RECENT_WINDOWS: usize = 4;

impl DutyCycle {
    /// Opens the first window now, on the heap probes' sites attached so far.
    pub fn start(
        opts: DutyOptions,
        probes: &mut Probes,
        pids: &[u32],
        started: Instant,
    ) -> DutyCycle {
        // SAFETY: sysconf has no preconditions.
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
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
                ..HeapDuty::default()
            },
            ticks_per_s: if ticks > 0 { ticks as f64 } else { 100.0 },
            meter: CostMeter::default(),
            started,
            recent: std::collections::VecDeque::new(),
        };
        cycle.open(probes, pids);
        cycle
    }

    /// Moves the windows on: called at every poll of the ring.
    pub fn poll(&mut self, probes: &mut Probes, pids: &[u32]) {
        let now = Instant::now();
        match self.state {
            State::Open {
                since,
                mark,
                calls,
                cpu_ticks: ticks,
                costs,
            } => {
                let Some(edge) = self.clock.ended() else {
                    return;
                };
                let ended = edge.at;
                let spent = costs.zip(edge.costs).map(|(then, now)| spent_since(then, now));
                self.measure(probes, ended - mark, (calls, ticks), edge.cpu_ticks, spent);
                if self.opts.duty < 1.0 {
                    self.close(probes, since, ended);
                } else {
                    // Always on, for now: open again at once, measured again after another
                    // window's time.
                    window_edge(probes, HeapRole::Alloc, true);
                    let reader = self.meter.reader(probes);
                    self.state = State::Open {
                        since,
                        mark: now,
                        calls: heap_calls(probes),
                        cpu_ticks: cpu_ticks(pids),
                        costs: reader.as_ref().map(|r| r.read()),
                    };
                    self.clock.schedule(now + self.opts.window, pids, reader);
                }
            }
            State::Grace { until, next } if now >= until => {
                window_edge(probes, HeapRole::Free, false);
                probes.close_heap(HeapRole::Free);
                self.state = State::Closed { next };
            }
            State::Closed { next } if now >= next => self.open(probes, pids),
            _ => {}
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
        let reader = self.meter.reader(probes);
        self.state = State::Open {
            since: now,
            mark: now,
            calls: heap_calls(probes),
            cpu_ticks: cpu_ticks(pids),
            costs: reader.as_ref().map(|r| r.read()),
        };
        self.clock.schedule(now + self.opts.window, pids, reader);
    }

    /// What the probes cost over the last `span`, from the heap calls and CPU ticks counted at
    /// its start and the CPU ticks at its end; with a budget, the duty that keeps within it.
    fn measure(
        &mut self,
        probes: &Probes,
        span: Duration,
        at_mark: (u64, u64),
        ticks: u64,
        spent: Option<HeapCosts>,
    ) {
        // The probes count no call once the window's edge closed: read now, it is the
        // window's count.
        let calls = heap_calls(probes).saturating_sub(at_mark.0);
        let cpu_s = ticks.saturating_sub(at_mark.1) as f64 / self.ticks_per_s;
        let (share, free_share) = match spent {
            Some(spent) => {
                let all = probe_cost(spent.alloc) + probe_cost(spent.free);
                let free = probe_cost(spent.free);
                if self.recent.len() == RECENT_WINDOWS {
                    self.recent.pop_front();
                }
                self.recent
                    .push_back((all.as_secs_f64(), free.as_secs_f64(), cpu_s));
                let sum = |f: fn(&(f64, f64, f64)) -> f64| self.recent.iter().map(f).sum::<f64>();
                let cpu = sum(|r| r.2);
                (
                    cost_share(Duration::from_secs_f64(sum(|r| r.0)), cpu),
                    cost_share(Duration::from_secs_f64(sum(|r| r.1)), cpu),
                )
            }
            None => {
                let share = probe_share(calls, cpu_s);
                (share, share / 2.0)
            }
        };
        self.figures.calls_per_s = calls as f64 / span.as_secs_f64().max(1e-6);
        self.figures.probe_share = share;
        self.figures.free_probe_share = free_share;
        let detach = probes.heap_alloc_detach();
        self.figures.detach_s = detach.map_or(0.0, |d| d.as_secs_f64());
        if let Some(budget) = self.opts.budget {
            let detach = detach.unwrap_or(DETACH_ALLOWANCE);
            self.opts.duty = duty_for(
                budget,
                (share, free_share),
                self.opts.window,
                detach,
                self.opts.grace,
            );
            self.figures.duty = self.opts.duty;
        }
        log::debug!(
            "heap window {}: {calls} calls in {:.3} s, {cpu_s:.3} s of CPU, probes {:.1} % \
             (free {:.1} %), detach {:.3} s, duty {:.4}",
            self.figures.windows,
            span.as_secs_f64(),
            share * 100.0,
            free_share * 100.0,
            self.figures.detach_s,
            self.opts.duty
        );
    }

    /// The window opened at `since` ended at `ended` (its edge closed): its allocation probes
    /// are detached, the free probes kept for the grace.
    fn close(&mut self, probes: &mut Probes, since: Instant, ended: Instant) {
        let on = ended - since;
        self.figures.on_s += on.as_secs_f64();
        probes.close_heap(HeapRole::Alloc);
        self.meter.stop();
        let now = Instant::now();
        // The next window comes one period after this one opened.
        let period = on.div_f64(self.opts.duty.max(MIN_DUTY));
        let next = (since + period).max(now);
        let until = ended + self.opts.grace;
        log::debug!(
            "heap window {} closed after {:.3} s; next in {:.1} s",
            self.figures.windows,
            on.as_secs_f64(),
            next.saturating_duration_since(now).as_secs_f64()
        );
        self.state = if until < next {
            State::Grace { until, next }
        } else {
            // The free probes stay on into the next window.
            State::Closed { next }
        };
    }
}

/// Closes allocation windows on time: a thread sleeps until a window's end and closes its edge
/// in the kernel, reading the traced processes' CPU time and the heap programs' costs then,
/// whatever the recorder's loop is busy with (hooking a large library can take it seconds). Both
/// are read at the edge: the free probe runs on through the grace, so costs read later would be
/// set against CPU time that stopped counting. Without the thread, the loop closes the edge
/// itself when it sees the end passed.
struct WindowClock {
    flags: Option<HeapWindowFlags>,
    deadlines: Option<mpsc::Sender<Deadline>>,
    /// The window now open: its end and what to read then (without the thread).
    deadline: Option<Deadline>,
    /// The current window's edge, once it closed.
    ended: Arc<Mutex<Option<Edge>>>,
}

/// A window's end, the processes whose CPU time is read then, and the programs whose costs are.
struct Deadline {
    at: Instant,
    pids: Vec<u32>,
    costs: Option<HeapCostReader>,
}

/// A window's edge: when it closed, the processes' CPU ticks then, and the heap programs' costs
/// then (None: the kernel does not count them).
struct Edge {
    at: Instant,
    cpu_ticks: u64,
    costs: Option<HeapCosts>,
}

impl Deadline {
    /// Closes the allocation edge and reads what the window's measure needs, at once.
    fn close(&self, flags: Option<&HeapWindowFlags>) -> Edge {
        if let Some(flags) = flags {
            let _ = flags.set(HeapRole::Alloc, false);
        }
        Edge {
            at: Instant::now(),
            cpu_ticks: cpu_ticks(&self.pids),
            costs: self.costs.as_ref().map(HeapCostReader::read),
        }
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

    /// The window now open ends at `at`; `costs` reads its programs' costs then.
    fn schedule(&mut self, at: Instant, pids: &[u32], costs: Option<HeapCostReader>) {
        *self.ended.lock().unwrap_or_else(|e| e.into_inner()) = None;
        let deadline = Deadline {
            at,
            pids: pids.to_vec(),
            costs,
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

    /// The window's edge, once it closed.
    fn ended(&mut self) -> Option<Edge> {
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

/// The kernel's count of what the heap programs cost (`BPF_ENABLE_STATS`), on only while a
/// window is open: it times every eBPF program on the machine (two clock reads a run).
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

    /// Reads the heap programs attached now, while the kernel counts their costs.
    fn reader(&self, probes: &mut Probes) -> Option<HeapCostReader> {
        self.stats.as_ref()?;
        Some(probes.heap_cost_reader())
    }
}

/// What the heap programs cost between two readings.
fn spent_since(then: HeapCosts, now: HeapCosts) -> HeapCosts {
    let since = |then: ProgramCost, now: ProgramCost| ProgramCost {
        run_time: now.run_time.saturating_sub(then.run_time),
        runs: now.runs.saturating_sub(then.runs),
    };
    HeapCosts {
        alloc: since(then.alloc, now.alloc),
        free: since(then.free, now.free),
    }
}

/// Opens or closes a window's edge in the kernel; a failure (the map write) is said once and
/// leaves the probes recording, which only costs.
fn window_edge(probes: &mut Probes, role: HeapRole, open: bool) {
    if let Err(e) = probes.set_heap_window(role, open) {
        log::warn!("duty-cycled heap: window flag not set: {e}");
    }
}

/// Heap calls the probes saw so far.
fn heap_calls(probes: &Probes) -> u64 {
    probes.ledger_stats()[ledger_stat::HEAP_CALLS as usize]
}

/// CPU time of the traced processes so far, in clock ticks.
fn cpu_ticks(pids: &[u32]) -> u64 {
    pids.iter()
        .filter_map(|&p| stat::read_stat(p).ok()?.cpu_ticks)
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

/// The share of `cpu_s` seconds of the traced processes' CPU time that `cost` took (at most
/// 0.99; 0.99 as well for a cost with no measurable time).
pub fn cost_share(cost: Duration, cpu_s: f64) -> f64 {
    if cost.is_zero() {
        return 0.0;
    }
    if cpu_s <= 0.0 {
        return 0.99;
    }
    (cost.as_secs_f64() / cpu_s).min(0.99)
}

/// What probes cost the processes they ran in: their programs' run time and a trap per run.
pub fn probe_cost(cost: ProgramCost) -> Duration {
    cost.run_time + TRAP_COST.saturating_mul(u32::try_from(cost.runs).unwrap_or(u32::MAX))
}

/// The duty (the share of the time the allocation probes are on) whose expected slowdown is
/// `budget`, for probes that take `shares.0` of the processes' time while all are on and
/// `shares.1` with the free probe alone. A cycle costs its window and the allocation probes'
/// detach slowing by `f / (1 − f)`, and its grace slowing by `f_free / (1 − f_free)`; the
/// cycle's period spreads that cost to the budget. At most 1, at least `MIN_DUTY`.
pub fn duty_for(
    budget: f64,
    shares: (f64, f64),
    window: Duration,
    detach: Duration,
    grace: Duration,
) -> f64 {
    let (share, free_share) = shares;
    if share <= 0.0 {
        return 1.0;
    }
    let slowdown = |f: f64| f / (1.0 - f);
    let cost = (window + detach).as_secs_f64() * slowdown(share)
        + grace.as_secs_f64() * slowdown(free_share);
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
    fn the_duty_keeps_the_expected_slowdown_within_the_budget() {
        let (window, grace) = (Duration::from_millis(250), Duration::from_secs(2));
        // Exact tracing slows a loop 20x: the probes take 95 % of its time while on. A cycle
        // costs 0.325 s x 19 (window and detach) + 2 s x 0.475/0.525 (grace, frees alone):
        // 7.985 s of slowdown, spread over 159.7 s at 5 %: the window is on 0.157 % of the time.
        let duty = duty_for(0.05, (0.95, 0.475), window, DETACH_ALLOWANCE, grace);
        let cost = 0.325 * 19.0 + 2.0 * (0.475 / 0.525);
        assert!((duty - 0.25 / (cost / 0.05)).abs() < 1e-12, "{duty}");
        assert!(
            (cost * duty / 0.25 - 0.05).abs() < 1e-12,
            "slowdown over a period = budget"
        );
        // A modest malloc rate (2 % in probes): on most of the time.
        let modest = duty_for(0.05, (0.02, 0.01), window, DETACH_ALLOWANCE, grace);
        assert!(modest > 0.25 && modest < 1.0, "{modest}");
        // No calls: always on; a budget that allows everything: always on.
        assert_eq!(
            duty_for(0.05, (0.0, 0.0), window, DETACH_ALLOWANCE, grace),
            1.0
        );
        assert_eq!(
            duty_for(1.0, (0.01, 0.005), window, DETACH_ALLOWANCE, grace),
            1.0
        );
        assert_eq!(
            duty_for(0.0001, (0.99, 0.5), window, DETACH_ALLOWANCE, grace),
            MIN_DUTY
        );
        // A free probe that costs little (no stack to walk) leaves room for more windows: a
        // cycle costs 6.175 s + 2 s x 0.05/0.95.
        let cheap_frees = duty_for(0.05, (0.95, 0.05), window, DETACH_ALLOWANCE, grace);
        let cheap_cost = 0.325 * 19.0 + 2.0 * (0.05 / 0.95);
        assert!(
            (cheap_frees / duty - cost / cheap_cost).abs() < 1e-9,
            "{cheap_frees}"
        );
    }

    #[test]
    fn the_counted_cost_is_the_programs_run_time_and_a_trap_per_run() {
        let counted = ProgramCost {
            run_time: Duration::from_millis(150),
            runs: 100_000,
        };
        // 0.15 s in the programs, 0.1 s of traps, over 0.5 s of CPU: half of it.
        assert_eq!(probe_cost(counted), Duration::from_millis(250));
        assert!((cost_share(probe_cost(counted), 0.5) - 0.5).abs() < 1e-12);
        assert_eq!(cost_share(Duration::ZERO, 0.5), 0.0);
        assert_eq!(cost_share(Duration::from_millis(1), 0.0), 0.99);
        assert_eq!(cost_share(Duration::from_secs(2), 1.0), 0.99);
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
