//! The text postmortem: what the target held when the recording ended, where, and how it grew.

use std::fmt::Write as _;

use super::{
    analysis::{
        StackAmount, allocator_summaries, by_amount, cells_by_live_bytes, class_growth,
        cuda_calls_by_function, deaths, failures_by_count, fragmentation, gpu_residuals, growth,
        last_seconds, lost_events, per_process, waterfall,
    },
    phases,
    suspects::{self, is_static},
    verdict::{self, Category},
};
use crate::views::check::{self, Verdict};
use crate::{
    escape::{self, for_terminal},
    model::{CellKey, Class, FailureKey, HeapDuty, PAGE, PHASE_NONE, StackCounters},
    recording::batches::BATCHES,
    recording::{ProcessExit, Recorded},
    views::{count_of, human_bytes, human_delta, one_line, target_pids},
};

/// How many live stacks the text report lists.
const TEXT_TOP_STACKS: usize = 20;
/// How many growing stacks the text report lists.
const TEXT_TOP_GROWING: usize = 10;
/// How many leak suspects the text report lists.
const TEXT_TOP_SUSPECTS: usize = 10;
/// The longest class name (`torch-pinned-cached`): the class column's width.
const CLASS_WIDTH: usize = 19;
/// A phase name's column (names are at most 32 characters; most are short).
const PHASE_WIDTH: usize = 14;

/// Frames shown per stack in the text report; the JSON has them all.
const TEXT_FRAMES: usize = 8;

/// "74.9 KiB (76710 B)": readable and exact.
fn bytes_exact(n: u64) -> String {
    if n < 1024 {
        format!("{n} B")
    } else {
        format!("{} ({n} B)", human_bytes(n))
    }
}

/// Innermost frames joined by " ← ", cut after `TEXT_FRAMES`.
/// A stack that reaches Python code shows its first `NATIVE_BEFORE_PYTHON` native frames, then
/// the Python frames: the code a person wrote, past the interpreter's and the bindings' calls
/// (ctypes, pybind11, torch's dispatch) that would fill the line.
fn frames_line(frames: &[String]) -> String {
    const NATIVE_BEFORE_PYTHON: usize = 2;
    let first_python = frames.iter().position(|f| is_python_frame(f));
    let (mut parts, shown_to) = match first_python {
        Some(first) if first > NATIVE_BEFORE_PYTHON + 1 => {
            let end = (first + TEXT_FRAMES - NATIVE_BEFORE_PYTHON).min(frames.len());
            let mut parts: Vec<String> = (frames[..NATIVE_BEFORE_PYTHON].iter())
                .map(|f| for_terminal(f).into_owned())
                .collect();
            parts.push(format!(
                "… {} native frames …",
                first - NATIVE_BEFORE_PYTHON
            ));
            parts.extend(
                frames[first..end]
                    .iter()
                    .map(|f| for_terminal(f).into_owned()),
            );
            (parts, end)
        }
        _ => {
            let end = frames.len().min(TEXT_FRAMES);
            let parts = (frames[..end].iter())
                .map(|f| for_terminal(f).into_owned())
                .collect();
            (parts, end)
        }
    };
    if frames.len() > shown_to {
        parts.push(format!("… ({} more)", frames.len() - shown_to));
    }
    parts.join(" ← ")
}

/// Whether `frame` is a Python frame, `function (file.py:line)`.
fn is_python_frame(frame: &str) -> bool {
    frame.ends_with(')')
        && frame
            .rsplit_once(" (")
            .is_some_and(|(_, at)| at.contains(".py:"))
}

/// `unix_ns` as "2023-11-14 22:13:20 UTC" (proleptic Gregorian, from Howard Hinnant's
/// days-to-civil algorithm; no time zone database needed for UTC).
fn utc(unix_ns: u64) -> String {
    let secs = unix_ns / 1_000_000_000;
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// Bytes that may be negative ("-1.0 MiB"); no sign when positive.
fn signed_bytes(v: i64) -> String {
    if v < 0 {
        format!("-{}", human_bytes(v.unsigned_abs()))
    } else {
        human_bytes(v as u64)
    }
}

fn phase_suffix(key: &CellKey) -> String {
    if key.phase == PHASE_NONE {
        String::new()
    } else {
        format!(" [{}]", for_terminal(&key.phase))
    }
}

/// The text report, section by section.
pub(super) fn render(rec: &Recorded) -> String {
    let mut out = String::new();
    text_deaths(&mut out, rec);
    text_header(&mut out, rec);
    text_check(&mut out, rec);
    text_verdict(&mut out, rec);
    text_totals(&mut out, rec);
    text_suspects(&mut out, rec);
    text_phases(&mut out, rec);
    // The memory layers side by side: resident memory, the GPU driver's figure, the framework's
    // allocator; then where the bytes are.
    text_waterfall(&mut out, rec);
    text_gpu(&mut out, rec);
    text_torch_allocator(&mut out, rec);
    text_processes(&mut out, rec);
    text_live_stacks(&mut out, rec);
    text_heap_survivors(&mut out, rec);
    text_failures(&mut out, rec);
    text_unmatched_and_lost(&mut out, rec);
    text_growth(&mut out, rec);
    text_faults(&mut out, rec);
    text_released(&mut out, rec);
    text_cuda_calls(&mut out, rec);
    text_stack_capture(&mut out, rec);
    out
}

/// The report opens on the deaths of traced processes, when any died: how and when, then the
/// seconds before the first (the target's, when it died). The rest of the report is the final
/// ledger.
fn text_deaths(out: &mut String, rec: &Recorded) {
    let deaths = deaths(rec);
    let Some(first) = deaths.first() else {
        return;
    };
    let target = rec.target.pids.first().copied();
    for death in &deaths {
        let who = if Some(death.pid) == target {
            "Target process"
        } else {
            "Traced process"
        };
        let _ = writeln!(
            out,
            "{who} {} was killed by {} at {:.1} s.",
            death.pid,
            killer(death),
            death.t_s
        );
    }
    let _ = writeln!(
        out,
        "The final ledger and the last seconds before {} follow{}.",
        if deaths.len() == 1 {
            "its death".to_string()
        } else {
            format!("the death of PID {}", first.pid)
        },
        if first.oom_kill {
            " (the OOM flight recorder)"
        } else {
            ""
        }
    );
    text_last_seconds(out, rec, first);
    let _ = writeln!(out);
}

/// "the OOM killer", "SIGSEGV (core dumped)", "SIGKILL".
fn killer(death: &ProcessExit) -> String {
    // Read from the recording, which anyone may have written.
    let signal = escape::for_terminal(death.signal.as_deref().unwrap_or("a signal"));
    if death.oom_kill {
        "the OOM killer".to_string()
    } else if death.core_dumped {
        format!("{signal} (core dumped)")
    } else {
        signal.into_owned()
    }
}

/// Second by second up to a death: the process's resident memory, every class's live bytes.
fn text_last_seconds(out: &mut String, rec: &Recorded, death: &ProcessExit) {
    let seconds = last_seconds(rec, death);
    // The classes that held anything in those seconds.
    let mut classes: Vec<_> = (seconds.iter())
        .flat_map(|s| {
            s.live
                .iter()
                .filter(|&(_, &live)| live > 0)
                .map(|(&c, _)| c)
        })
        .collect();
    classes.sort();
    classes.dedup();
    let mut head = format!("  {:>5} {:>12} {:>12}", "t (s)", "RSS", "anonymous");
    for class in &classes {
        let _ = write!(head, " {:>12}", class.name());
    }
    let _ = writeln!(out, "{head}");
    for second in &seconds {
        let (rss, anon) = match second.resident {
            Some((rss, anon)) => (human_bytes(rss), human_bytes(anon)),
            None => ("-".to_string(), "-".to_string()),
        };
        let mut row = format!("  {:>5} {rss:>12} {anon:>12}", second.t_s);
        for class in &classes {
            let live = second.live.get(class).copied().unwrap_or(0);
            let _ = write!(row, " {:>12}", human_bytes(live));
        }
        let _ = writeln!(out, "{row}");
    }
}

fn text_header(out: &mut String, rec: &Recorded) {
    let _ = writeln!(
        out,
        "alloctrace report (alloctrace {})",
        for_terminal(&rec.tool_version)
    );
    let _ = writeln!(
        out,
        "target:   {}: {}",
        target_pids(rec),
        for_terminal(&one_line(&rec.target.command))
    );
    if rec.started_unix_ns > 0 {
        let _ = writeln!(out, "started:  {}", utc(rec.started_unix_ns));
    }
    if rec.complete {
        let _ = writeln!(out, "duration: {:.1} s, complete", rec.duration_s);
    } else if let Some(failure) = &rec.write_failure {
        let _ = writeln!(
            out,
            "duration: NOT FINALIZED: writing stopped, {}; data up to {:.0} s",
            escape::for_terminal(failure),
            rec.duration_s
        );
    } else {
        let _ = writeln!(
            out,
            "duration: NOT FINALIZED: tracer was killed; data up to {:.0} s",
            rec.duration_s
        );
    }
    if let Some(reason) = &rec.stop_reason {
        let _ = writeln!(out, "ended:    {}", escape::for_terminal(reason));
    }
}

fn text_totals(out: &mut String, rec: &Recorded) {
    let _ = writeln!(out, "\nTotals at the end of the recording");
    let sampled = rec
        .stack_capture
        .as_ref()
        .map_or(0, |s| s.heap_sample_bytes);
    if sampled > 0 {
        let _ = writeln!(
            out,
            "  heap sampled (--heap-sample {sampled}: one allocation per {} on average): heap bytes \
             are unbiased estimates, block counts the blocks recorded",
            human_bytes(sampled)
        );
    }
    if let Some(duty) = rec
        .stack_capture
        .as_ref()
        .and_then(|s| s.heap_duty.as_ref())
    {
        text_heap_duty_line(out, duty);
    }
    if rec.state.totals.is_empty() {
        let nothing = match &rec.write_failure {
            // The ledger may have counted allocations that never reached the file.
            Some(failure) => format!(
                "  nothing was committed before writing stopped ({})",
                escape::for_terminal(failure)
            ),
            None => "  no allocation was seen".to_string(),
        };
        let _ = writeln!(out, "{nothing}");
        return;
    }
    // Classes that saw nothing are left out: most recordings use three or four of them.
    let used: Vec<_> = (rec.state.totals.iter())
        .filter(|(_, t)| t.allocated_count > 0 || t.live_bytes > 0 || t.peak_bytes > 0)
        .collect();
    if used.is_empty() {
        let _ = writeln!(out, "  no allocation was seen");
        return;
    }
    let w = CLASS_WIDTH;
    let _ = writeln!(
        out,
        "  {:<w$} {:>22} {:>12} {:>22} {:>22} {:>13} {:>13}",
        "class", "live", "live blocks", "peak", "allocated", "alloc blocks", "freed blocks"
    );
    for (class, t) in used {
        let _ = writeln!(
            out,
            "  {:<w$} {:>22} {:>12} {:>22} {:>22} {:>13} {:>13}",
            class.name(),
            bytes_exact(t.live_bytes),
            t.live_count,
            bytes_exact(t.peak_bytes),
            bytes_exact(t.allocated_bytes),
            t.allocated_count,
            t.freed_count
        );
    }
}

/// What kept growing once the program was warm (`suspects`), the most first.
fn text_suspects(out: &mut String, rec: &Recorded) {
    let Some(s) = suspects::suspects(rec) else {
        let _ = writeln!(
            out,
            "\nLeak suspects: not judged (under 4 s of the recording after its warm-up: the \
             first third, or `report --warmup`)"
        );
        return;
    };
    let window = format!(
        "{:.0} s to {:.0} s, after a warm-up of {:.0} s",
        s.from_s, s.to_s, s.from_s
    );
    let mut levelled = match s.not_steady {
        0 => String::new(),
        n => format!(
            "; {} grew but not in every batch (caches and pools that level off, or noise)",
            count_of(n as u64, "stack")
        ),
    };
    if !s.too_noisy.is_empty() {
        levelled.push_str(&format!(
            "; {} rose in every batch by less than it swings within one: too noisy to judge",
            count_of(s.too_noisy.len() as u64, "stack")
        ));
    }
    if s.rows.is_empty() {
        let _ = writeln!(
            out,
            "\nLeak suspects: none: no stack's live memory rose in each of {BATCHES} batches of \
             {window}{levelled}"
        );
        return;
    }
    let _ = writeln!(
        out,
        "\nLeak suspects: live memory that rose in each of {BATCHES} batches of {window} (growth \
         from the first batch to the last){levelled}"
    );
    for (i, row) in s.rows.iter().take(TEXT_TOP_SUSPECTS).enumerate() {
        let _ = writeln!(
            out,
            "  {:>2}. {:>12} ({}/s{})  {}{}: {}",
            i + 1,
            human_delta(i128::from(row.growth)),
            human_bytes(row.bytes_per_s.round() as u64),
            row.growth_percent
                .map(|p| format!(", +{p:.0} %"))
                .unwrap_or_default(),
            row.key.class.name(),
            phase_suffix(row.key),
            frames_line(&rec.frames(row.key.stack))
        );
    }
    if s.rows.len() > TEXT_TOP_SUSPECTS {
        let _ = writeln!(
            out,
            "  ... {} more in the JSON report",
            s.rows.len() - TEXT_TOP_SUSPECTS
        );
    }
}

/// The leak test's judgement, for a recording `alloctrace check` made: the traced live memory
/// at the end of each batch, its growth against the threshold, the noise, the verdict and the
/// stacks that grew in every batch.
pub(super) fn text_check(out: &mut String, rec: &Recorded) {
    let Some(thresholds) = rec.check else {
        return;
    };
    let Some(a) = check::analyse(&rec.marks, thresholds) else {
        let _ = writeln!(
            out,
            "\nMemory Growth Analysis: not judged (fewer than two batches of load were marked)"
        );
        return;
    };
    let n = a.batches.len();
    let _ = writeln!(
        out,
        "\nMemory Growth Analysis: traced live memory (heap, mappings, device memory; not file \
         mappings or thread stacks) at the end of each of {n} batches after the warm-up"
    );
    let values: Vec<String> = a.batches.iter().map(|&b| human_bytes(b)).collect();
    let _ = writeln!(out, "  batches:       {}", values.join(", "));
    let _ = writeln!(
        out,
        "  initial avg:   {} (batches 1-{})",
        human_bytes(a.initial_avg.round() as u64),
        a.averaged
    );
    let _ = writeln!(
        out,
        "  final avg:     {} (batches {}-{n})",
        human_bytes(a.final_avg.round() as u64),
        n - a.averaged + 1
    );
    let _ = writeln!(
        out,
        "  growth:        {} ({:+.1} %), threshold {} %",
        human_delta(a.growth_bytes.round() as i128),
        a.growth_percent,
        thresholds.growth_percent
    );
    let _ = writeln!(
        out,
        "  noise:         {:.1} % around the trend (limit {} %)",
        a.noise_percent, thresholds.noise_percent
    );
    let verdict = match a.verdict {
        Verdict::Pass => format!(
            "PASS: the traced live memory grew {:.1} % (at most {} %)",
            a.growth_percent, thresholds.growth_percent
        ),
        Verdict::Leak => format!(
            "LEAK: the traced live memory grew {:.1} % from the first batches to the last",
            a.growth_percent
        ),
        Verdict::TooNoisy => format!(
            "TOO NOISY to judge: the batches swing by {:.1} % around their trend",
            a.noise_percent
        ),
    };
    let _ = writeln!(out, "  verdict:       {verdict}");
    if a.suspects.is_empty() {
        let _ = writeln!(out, "  no stack's live memory rose in every batch");
        return;
    }
    let _ = writeln!(
        out,
        "  stacks whose live memory rose in every batch (growth since the warm-up):"
    );
    for (i, (key, growth)) in a.suspects.iter().take(TEXT_TOP_SUSPECTS).enumerate() {
        let _ = writeln!(
            out,
            "  {:>2}. {:>12}  {}{}: {}",
            i + 1,
            human_delta(*growth),
            key.class.name(),
            phase_suffix(key),
            frames_line(&rec.frames(key.stack))
        );
    }
}

/// The recording classified: each category with its evidence.
fn text_verdict(out: &mut String, rec: &Recorded) {
    let findings = verdict::classify(rec);
    let names: Vec<&str> = findings.iter().map(|f| category_name(f.category)).collect();
    let _ = writeln!(out, "\nVerdict: {}", names.join("; "));
    for f in &findings {
        for line in &f.evidence {
            let _ = writeln!(out, "  {}: {}", category_name(f.category), line);
        }
    }
}

fn category_name(c: Category) -> &'static str {
    match c {
        Category::EndsInOom => "ends in an OOM",
        Category::ErrorInduced => "grows after errors",
        Category::Leaks => "leaks",
        Category::GrowsWhileServing => "grows while serving (scales with traffic)",
        Category::GrowsWithoutTraffic => "grows without traffic",
        Category::TooNoisy => "too noisy to judge",
        Category::NoLeak => "no leak",
        Category::NotJudged => "not judged",
    }
}

/// Memory by the phase it was allocated in (`record --phase`), and where it was freed.
fn text_phases(out: &mut String, rec: &Recorded) {
    let Some(rows) = phases::phase_rows(rec) else {
        return;
    };
    let profiles = match rec.phases.as_ref().map(|p| p.profiles.join(", ")) {
        Some(p) if !p.is_empty() => format!(" (phases of {}, built in)", for_terminal(&p)),
        _ => String::new(),
    };
    let _ = writeln!(
        out,
        "\nPhases{profiles}: memory by the phase it was allocated in (entries: calls of the phase's \
         function; live per entry: what each left behind; freed within the phase or later \
         elsewhere: '-' for a Python function's phase, as a free has no stack)"
    );
    let w = PHASE_WIDTH;
    let _ = writeln!(
        out,
        "  {:<w$} {:>9} {:>12} {:>12} {:>15} {:>12} {:>12} {:>13} {:>16}",
        "phase",
        "entries",
        "live",
        "live blocks",
        "live per entry",
        "allocated",
        "freed",
        "freed within",
        "freed elsewhere"
    );
    let or_dash = |v: Option<String>| v.unwrap_or_else(|| "-".to_string());
    for row in &rows {
        let _ = writeln!(
            out,
            "  {:<w$} {:>9} {:>12} {:>12} {:>15} {:>12} {:>12} {:>13} {:>16}",
            for_terminal(&row.phase),
            or_dash(row.entries.map(|n| n.to_string())),
            human_bytes(row.live_bytes),
            row.live_count,
            or_dash(row.live_per_entry.map(|b| human_bytes(b.round() as u64))),
            human_bytes(row.allocated_bytes),
            human_bytes(row.freed_bytes),
            or_dash(row.freed_within_bytes.map(human_bytes)),
            or_dash(row.freed_elsewhere_bytes.map(human_bytes))
        );
    }
    let frees = rec.phases.iter().flat_map(|p| &p.frees);
    for f in frees.filter(|f| f.allocated_in != f.freed_in) {
        let _ = writeln!(
            out,
            "  {} allocated in {} was freed in {}: {} in {}",
            f.class.name(),
            for_terminal(&f.allocated_in),
            for_terminal(&f.freed_in),
            human_bytes(f.bytes),
            count_of(f.count, "block")
        );
    }
}

/// Live figures per process, when the recording followed more than one.
fn text_processes(out: &mut String, rec: &Recorded) {
    let processes = per_process(rec);
    if processes.len() < 2 {
        return;
    }
    let _ = writeln!(out, "\nLive memory per process");
    for (pid, classes) in &processes {
        let parts: Vec<String> = classes
            .iter()
            .filter(|(_, c)| c.live_bytes > 0)
            .map(|(class, c)| format!("{class} {} in {}", human_bytes(c.live_bytes), c.live_count))
            .collect();
        let parts = if parts.is_empty() {
            "nothing live".to_string()
        } else {
            parts.join(", ")
        };
        let _ = writeln!(out, "  PID {pid:<8} {parts}");
    }
}

fn text_live_stacks(out: &mut String, rec: &Recorded) {
    let live: Vec<_> = cells_by_live_bytes(rec)
        .into_iter()
        .filter(|(_, c)| c.live_bytes > 0)
        .collect();
    if live.is_empty() {
        let _ = writeln!(out, "\nLive stacks: none (nothing was live at the end)");
        return;
    }
    let (statics, suspects): (Vec<_>, Vec<_>) =
        live.into_iter().partition(|(key, _)| is_static(key.class));
    let shown = suspects.len().min(TEXT_TOP_STACKS);
    let apart = if statics.is_empty() {
        ""
    } else {
        "; file mappings and thread stacks below"
    };
    let _ = writeln!(
        out,
        "\nTop live stacks ({shown} of {}; innermost frame first{apart})",
        suspects.len()
    );
    for (rank, (key, c)) in suspects.iter().take(TEXT_TOP_STACKS).enumerate() {
        let _ = writeln!(
            out,
            "  {:>2}. {:>22} in {:>11}  {}{}: {}",
            rank + 1,
            bytes_exact(c.live_bytes),
            count_of(c.live_count, "block"),
            key.class.name(),
            phase_suffix(key),
            frames_line(&rec.frames(key.stack))
        );
    }
    text_static(out, rec, &statics);
}

/// What a duty-cycled heap's figures mean, in the totals.
fn text_heap_duty_line(out: &mut String, duty: &HeapDuty) {
    let budget = match duty.budget_percent {
        Some(pct) => format!("--heap-budget {pct:.1} %: "),
        None => String::new(),
    };
    let _ = writeln!(
        out,
        "  heap duty-cycled ({budget}probes on {:.2} % of the time, {} of {:.2} s plus graces of \
         {:.2} s (at most {:.1} s), {:.1} s in all; {:.0} heap calls/s while on, {:.0} % of the \
         processes' time in probes then, {:.0} % in the grace, a trap {:.1} µs): heap figures \
         are blocks allocated inside windows, `live` those that outlived their window and grace{}",
        duty.duty * 100.0,
        count_of(duty.windows, "window"),
        duty.window_s,
        duty.grace_taken_s,
        duty.grace_s,
        duty.on_s,
        duty.calls_per_s,
        duty.probe_share * 100.0,
        duty.free_probe_share * 100.0,
        duty.trap_ns / 1e3,
        match duty.freed_unseen {
            0 => String::new(),
            n => format!(" ({} of them found freed later)", count_of(n, "block")),
        }
    );
}

/// A duty-cycled heap: the stacks whose blocks outlived their windows, with the rate they
/// leak at if they go on so (their survivors over the windows' time). Those that rose in the
/// most windows first: survivors piling up window after window are the leak signal, where a
/// start-up allocation survives the one window it was made in, however large.
fn text_heap_survivors(out: &mut String, rec: &Recorded) {
    let Some(duty) = rec
        .stack_capture
        .as_ref()
        .and_then(|s| s.heap_duty.as_ref())
    else {
        return;
    };
    let mut survivors: Vec<_> = cells_by_live_bytes(rec)
        .into_iter()
        .filter(|(key, c)| key.class == Class::Heap && c.live_bytes > 0)
        .collect();
    let windows_grown = |key: &CellKey| rec.heap_windows_grown.get(key).copied().unwrap_or(0);
    // Stable: equal window counts keep the live-bytes order.
    survivors.sort_by_key(|(key, _)| std::cmp::Reverse(windows_grown(key)));
    if survivors.is_empty() || duty.on_s <= 0.0 {
        let _ = writeln!(
            out,
            "\nHeap survivors (duty-cycled): none: every block allocated in a window was freed \
             within it or its grace"
        );
        return;
    }
    let _ = writeln!(
        out,
        "\nHeap survivors (duty-cycled): blocks that outlived their window, and the leak rate \
         they stand for (survivors over {:.1} s of windows)",
        duty.on_s
    );
    let grown_known = !rec.heap_windows_grown.is_empty();
    for (rank, (key, c)) in survivors.iter().take(TEXT_TOP_GROWING).enumerate() {
        let rate = c.live_bytes as f64 / duty.on_s;
        let windows = if grown_known {
            format!(
                ", rose in {} of {}",
                windows_grown(key),
                count_of(duty.windows, "window")
            )
        } else {
            String::new()
        };
        let _ = writeln!(
            out,
            "  {:>2}. {:>10}/s  {:>11} in {:>11} of {:>11} allocated{windows}: {}",
            rank + 1,
            human_bytes(rate as u64),
            human_bytes(c.live_bytes),
            count_of(c.live_count, "block"),
            count_of(c.allocated_count, "block"),
            frames_line(&rec.frames(key.stack))
        );
    }
}

/// One line per static class: its live total and its largest stack.
fn text_static(out: &mut String, rec: &Recorded, statics: &[(&CellKey, &StackCounters)]) {
    if statics.is_empty() {
        return;
    }
    let _ = writeln!(
        out,
        "\nStatic memory (loaded files' code and data, thread stacks reserved; their resident part \
         is in the RSS waterfall)"
    );
    for class in [Class::MmapFile, Class::ThreadStack] {
        let rows: Vec<_> = statics.iter().filter(|(k, _)| k.class == class).collect();
        let Some((largest, _)) = rows.first() else {
            continue;
        };
        let bytes: u64 = rows.iter().map(|(_, c)| c.live_bytes).sum();
        let count: u64 = rows.iter().map(|(_, c)| c.live_count).sum();
        let _ = writeln!(
            out,
            "  {:<w$} {} in {}, the most under {}",
            class.name(),
            human_bytes(bytes),
            count_of(count, "mapping"),
            frames_line(&rec.frames(largest.stack)),
            w = CLASS_WIDTH
        );
    }
}

/// Whether a failure happened at teardown: the CUDA driver was already deinitialized (the
/// process was exiting), which says nothing about memory.
fn is_teardown(key: &FailureKey) -> bool {
    key.error == "CUDA_ERROR_DEINITIALIZED"
}

fn text_failures(out: &mut String, rec: &Recorded) {
    let (teardown, failures): (Vec<_>, Vec<_>) = failures_by_count(rec)
        .into_iter()
        .partition(|(key, _)| is_teardown(key));
    if failures.is_empty() {
        let _ = writeln!(out, "\nFailed allocations: none");
    } else {
        let calls: u64 = failures.iter().map(|(_, n)| n).sum();
        let _ = writeln!(out, "\nFailed allocations: {}", count_of(calls, "call"));
        for (key, count) in failures {
            text_failure(out, rec, key, count);
        }
    }
    if !teardown.is_empty() {
        let calls: u64 = teardown.iter().map(|(_, n)| n).sum();
        let _ = writeln!(
            out,
            "\nFailed at teardown (the CUDA driver was already deinitialized): {}",
            count_of(calls, "call")
        );
        for (key, count) in teardown {
            text_failure(out, rec, key, count);
        }
    }
}

fn text_failure(out: &mut String, rec: &Recorded, key: &FailureKey, count: u64) {
    let _ = writeln!(
        out,
        "  {}({}) -> {} ×{count}: {}",
        for_terminal(&key.function),
        bytes_exact(key.size),
        for_terminal(&key.error),
        frames_line(&rec.frames(key.stack))
    );
}

fn text_unmatched_and_lost(out: &mut String, rec: &Recorded) {
    let sampled_out = (rec.stack_capture.as_ref()).map_or(0, |s| s.kernel_heap_sampled_out);
    let left_out = if sampled_out > 0 {
        ", or left out while the kernel's full heap ledger sampled"
    } else {
        ""
    };
    let _ = writeln!(
        out,
        "\nUnmatched frees: {} (frees of blocks allocated before the tracer attached, or whose \
         allocation event was lost{left_out})",
        rec.state.unmatched_frees
    );
    let lost = lost_events(rec);
    let total: u64 = lost.values().sum();
    if total == 0 {
        let _ = writeln!(out, "Lost events: none (no events lost)");
        return;
    }
    // What each cause means and its remedy are in docs/accounting.md, next to the code that
    // counts them; repeating them here would drift.
    let _ = writeln!(
        out,
        "Lost events: {total} (causes and remedies: docs/accounting.md)"
    );
    for (cause, n) in lost.iter().filter(|(_, n)| **n > 0) {
        let _ = writeln!(out, "  {:<24} {n:>10}", for_terminal(cause));
    }
}

fn text_growth(out: &mut String, rec: &Recorded) {
    let Some(g) = growth(rec) else {
        let _ = writeln!(out, "\nGrowth: no time series (nothing was committed)");
        return;
    };
    let _ = writeln!(
        out,
        "\nGrowth from {} s to {} s (live bytes)",
        g.first_t, g.last_t
    );
    let w = CLASS_WIDTH;
    for (class, (first, last)) in class_growth(rec, g.first_t) {
        if first == 0 && last == 0 {
            continue;
        }
        let _ = writeln!(
            out,
            "  {:<w$} {} at {} s -> {} at {} s ({})",
            class.name(),
            human_bytes(first),
            g.first_t,
            human_bytes(last),
            g.last_t,
            human_delta(i128::from(last) - i128::from(first))
        );
    }
    let growing = g.growing();
    if growing.is_empty() {
        let _ = writeln!(out, "  no stack grew");
        return;
    }
    let _ = writeln!(out, "  top growing stacks:");
    for (key, delta) in growing.into_iter().take(TEXT_TOP_GROWING) {
        let _ = writeln!(
            out,
            "  {:>12}  {}{}: {}",
            human_delta(delta),
            key.class.name(),
            phase_suffix(key),
            frames_line(&rec.frames(key.stack))
        );
    }
}

fn text_waterfall(out: &mut String, rec: &Recorded) {
    let Some(w) = waterfall(rec) else {
        let _ = writeln!(
            out,
            "\nResident memory: no sample (the target exited before the first second)"
        );
        return;
    };
    let _ = writeln!(
        out,
        "\nResident memory of PID {} at {} s (/proc/PID/smaps)",
        w.pid, w.t_s
    );
    for (label, bytes) in [
        ("  RSS", w.rss),
        ("  = file-backed resident", w.file),
        ("  + shared memory", w.shmem),
        ("  + anonymous", w.anon),
        ("      heap (live)", w.heap_live),
        ("      allocator-retained", w.allocator_retained),
    ] {
        let _ = writeln!(out, "{label:<29}{:>12}", human_bytes(bytes));
    }
    let _ = writeln!(
        out,
        "      traced mappings        {:>12}   (resident, of {} mapped: mmap, thread-stack, python-arena)",
        human_bytes(w.traced_mappings),
        human_bytes(w.traced_mappings_mapped)
    );
    let _ = writeln!(
        out,
        "      untraced remainder     {:>12}   {}",
        signed_bytes(w.untraced_anon),
        if w.untraced_anon < 0 {
            "(negative: the allocator's arena is not all resident)"
        } else {
            "(mapped before attach, or not traced)"
        }
    );
    if let Some(pre_attach) = w.pre_attach {
        let _ = writeln!(
            out,
            "        of which pre-attach  {:>12}   (at most what was resident at attach)",
            human_bytes(pre_attach)
        );
    }
    if w.t_s > w.first_t_s {
        let _ = writeln!(
            out,
            "  grew since {} s: RSS {}, anonymous {}, file-backed {}, shared {}",
            w.first_t_s,
            human_delta(i128::from(w.rss_growth)),
            human_delta(i128::from(w.anon_growth)),
            human_delta(i128::from(w.file_growth)),
            human_delta(i128::from(w.shmem_growth))
        );
    }
}

fn text_faults(out: &mut String, rec: &Recorded) {
    let mut rows = by_amount(&rec.state.faults);
    for row in &mut rows {
        row.amount *= PAGE;
    }
    text_bytes_by_stack(
        out,
        rec,
        "Pages faulted in (sampled; RSS growth by stack)",
        &rows,
    );
}

fn text_released(out: &mut String, rec: &Recorded) {
    let rows = by_amount(&rec.state.released);
    text_bytes_by_stack(
        out,
        rec,
        "Released with madvise (pages given back, mappings kept)",
        &rows,
    );
}

/// A section of bytes by (pid, stack), its total in the heading, the top 10 rows.
fn text_bytes_by_stack(out: &mut String, rec: &Recorded, heading: &str, rows: &[StackAmount]) {
    if rows.is_empty() {
        return;
    }
    let total: u64 = rows.iter().map(|r| r.amount).sum();
    let _ = writeln!(out, "\n{heading}: {} in all", human_bytes(total));
    for row in rows.iter().take(10) {
        let _ = writeln!(
            out,
            "  {:>12}  PID {}: {}",
            human_bytes(row.amount),
            row.pid,
            frames_line(&rec.frames(row.stack))
        );
    }
}

/// CUDA calls by function (all stacks), most first.
fn text_cuda_calls(out: &mut String, rec: &Recorded) {
    let rows = cuda_calls_by_function(rec);
    if rows.is_empty() {
        return;
    }
    let _ = writeln!(
        out,
        "\nCUDA calls (graphs, pools, IPC, registration, contexts, modules):"
    );
    for ((pid, function), n) in rows {
        let failed = if n.failed > 0 {
            format!(", {} failed", n.failed)
        } else {
            String::new()
        };
        let function = for_terminal(function);
        let _ = writeln!(out, "  {:>8}  PID {pid}: {function}{failed}", n.calls);
    }
}

fn text_stack_capture(out: &mut String, rec: &Recorded) {
    let Some(s) = &rec.stack_capture else {
        return;
    };
    let _ = writeln!(
        out,
        "\nStacks: --stack {} ({} KiB copies): {} unwound from copies ({} truncated), {} by frame \
         pointers while the ring was a quarter full",
        for_terminal(&s.mode),
        s.copy_bytes >> 10,
        s.copies,
        s.truncated,
        s.fp_under_pressure
    );
    if let Some(limit) = &s.memory_limit
        && limit.caches_dropped + limit.stacks_not_kept > 0
    {
        let _ = writeln!(
            out,
            "Tracer memory limit (--max-memory {}) reached: caches dropped {}; {} recorded \
             without their stack (every byte counted)",
            human_bytes(limit.limit_bytes),
            count_of(limit.caches_dropped, "time"),
            count_of(limit.stacks_not_kept, "event")
        );
    }
    if s.kernel_heap_stacks > 0 {
        let full = match (s.kernel_heap_full, s.kernel_heap_sampled_out) {
            (0, _) => String::new(),
            (n, 0) => format!(
                "; it was full for {}, which went through the ring instead (raise \
                 --heap-ledger-blocks)",
                count_of(n, "block")
            ),
            (n, out) => format!(
                "; it was full for {}, which went through the ring instead, byte-sampled while \
                 the ring was filling: {} left out, the heap's bytes past the ledger estimated \
                 from those sent (mean {}), and their frees among the unmatched (raise \
                 --heap-ledger-blocks)",
                count_of(n, "block"),
                count_of(out, "block"),
                human_bytes(u64::from(tracer_common::heap_ledger::FULL_SAMPLE_MEAN))
            ),
        };
        let _ = writeln!(
            out,
            "Heap blocks were held and counted in the kernel, each stack sent once ({}){full}",
            count_of(s.kernel_heap_stacks, "stack")
        );
    }
}

/// PyTorch's pinned host caching allocator: how much of the page-locked memory tensors hold.
fn text_pinned_allocator(out: &mut String, rec: &Recorded) {
    let total = |class| rec.state.totals.get(&class).copied().unwrap_or_default();
    let (held, cached) = (total(Class::TorchPinned), total(Class::TorchPinnedCached));
    if held.allocated_count == 0 && cached.allocated_count == 0 {
        return;
    }
    let _ = writeln!(
        out,
        "\nPyTorch pinned host allocator (a view inside `cuda-pinned`, not added to it): held by \
         tensors {} in {}, cached {} (peak held {})",
        human_bytes(held.live_bytes),
        count_of(held.live_count, "block"),
        human_bytes(cached.live_bytes),
        human_bytes(held.peak_bytes)
    );
}

/// PyTorch's caching allocators: what they hold, how it is split, how fragmented, and their
/// OOMs with the figures right before.
fn text_torch_allocator(out: &mut String, rec: &Recorded) {
    text_pinned_allocator(out, rec);
    let summaries = allocator_summaries(rec);
    if summaries.is_empty() && rec.torch_ooms.is_empty() {
        return;
    }
    out.push_str(
        "\nPyTorch caching allocator (`torch` + `torch-cached` + pending = reserved: a view \
         inside the device classes, not added to them)\n",
    );
    for a in &summaries {
        if a.async_backend {
            let _ = writeln!(
                out,
                "  PID {} device {}, cudaMallocAsync backend: allocated {} (peak {}) in {}; what \
                 its CUDA memory pool keeps beyond them is the driver's (gpu-untraced)",
                a.pid,
                a.device,
                human_bytes(a.allocated),
                human_bytes(a.peak_allocated),
                count_of(a.blocks, "tensor")
            );
            continue;
        }
        let _ = writeln!(
            out,
            "  PID {} device {}: reserved {} (peak {}), allocated {} (peak {}), cached {}, \
             pending {}",
            a.pid,
            a.device,
            human_bytes(a.reserved),
            human_bytes(a.peak_reserved),
            human_bytes(a.allocated),
            human_bytes(a.peak_allocated),
            human_bytes(a.cached),
            human_bytes(a.pending)
        );
        let _ = writeln!(
            out,
            "      {} in {}, {} free in {}, largest {}, fragmentation {:.3}",
            count_of(a.blocks, "block"),
            count_of(a.segments, "segment"),
            human_bytes(a.hole_bytes),
            count_of(a.holes, "hole"),
            human_bytes(a.largest_hole),
            a.fragmentation
        );
        if a.sleeping > 0 {
            let _ = writeln!(
                out,
                "      sleeping: {} of it unmapped at the driver while PyTorch holds it (vLLM's \
                 sleep mode): backed by no memory, not a leak",
                human_bytes(a.sleeping)
            );
        }
        if a.private_pools > 0 {
            let _ = writeln!(
                out,
                "      of which {} (CUDA graphs' or users' memory pools): reserved {}, \
                 allocated {}",
                count_of(a.private_pools, "private pool"),
                human_bytes(a.private_reserved),
                human_bytes(a.private_allocated)
            );
        }
        if a.first_t_s == a.last_t_s {
            continue;
        }
        let _ = writeln!(
            out,
            "      from {} s to {} s: reserved {}{}, allocated {}{}",
            a.first_t_s,
            a.last_t_s,
            if a.reserved_growth > 0 { "+" } else { "" },
            signed_bytes(a.reserved_growth),
            if a.allocated_growth > 0 { "+" } else { "" },
            signed_bytes(a.allocated_growth)
        );
    }
    for o in &rec.torch_ooms {
        let f = &o.figures;
        let _ = writeln!(
            out,
            "  OOM at {} s, PID {} device {}: asked {} with {} free on the device; reserved {}, \
             allocated {}, largest hole {} of {} free, fragmentation {:.3}",
            o.t_s,
            f.pid,
            f.device,
            human_bytes(o.requested),
            human_bytes(o.device_free),
            human_bytes(f.reserved),
            human_bytes(f.allocated),
            human_bytes(f.largest_hole),
            human_bytes(f.hole_bytes),
            fragmentation(f)
        );
        let _ = writeln!(out, "      {}", frames_line(&rec.frames(o.stack)));
    }
}

fn text_gpu(out: &mut String, rec: &Recorded) {
    let residuals = gpu_residuals(rec);
    if residuals.is_empty() {
        let used_gpu = rec
            .state
            .totals
            .iter()
            .any(|(c, t)| c.is_device() && t.allocated_count > 0);
        if let Some(source) = &rec.gpu_source
            && source.starts_with("not available")
            && used_gpu
        {
            let _ = writeln!(out, "\nGPU memory: {}", for_terminal(source));
        }
        return;
    }
    let _ = writeln!(
        out,
        "\nGPU memory per process ({})",
        for_terminal(rec.gpu_source.as_deref().unwrap_or("NVML"))
    );
    for r in residuals {
        let _ = writeln!(
            out,
            "  PID {:<8} driver {:>12}  traced {:>12}  gpu-untraced {:>12}  (at {} s)",
            r.pid,
            human_bytes(r.used),
            human_bytes(r.traced),
            signed_bytes(r.untraced),
            r.t_s
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        recording::STACK_LOST,
        views::{fixture, report::render_text},
    };

    /// File mappings and thread stacks are summarized apart; the top stacks lead to the rest.
    #[test]
    fn static_memory_is_summarized_apart_from_the_top_stacks() {
        let mut rec = fixture::recorded();
        let stack = *rec.stacks.keys().next().unwrap();
        let cell = |class| CellKey {
            class,
            pid: 4242,
            phase: PHASE_NONE.to_string(),
            stack: Some(stack),
        };
        let counters = |bytes| StackCounters {
            live_bytes: bytes,
            live_count: 2,
            allocated_bytes: bytes,
            allocated_count: 2,
            ..Default::default()
        };
        rec.state
            .cells
            .insert(cell(Class::MmapFile), counters(64 << 20));
        rec.state
            .cells
            .insert(cell(Class::ThreadStack), counters(16 << 20));
        let text = render_text(&rec);
        let top = &text[text.find("Top live stacks").unwrap()..text.find("Static memory").unwrap()];
        assert!(
            !top.contains("mmap-file") && !top.contains("thread-stack"),
            "{top}"
        );
        assert!(
            text.contains("  mmap-file           64.0 MiB in 2 mappings, the most under "),
            "{text}"
        );
        assert!(
            text.contains("  thread-stack        16.0 MiB in 2 mappings"),
            "{text}"
        );
    }

    /// Calls that failed because the driver was already gone (process exit) are not failures
    /// while serving.
    #[test]
    fn teardown_failures_are_listed_apart() {
        let mut rec = fixture::recorded();
        rec.state.failures.insert(
            FailureKey {
                class: Class::Cuda,
                pid: 4242,
                function: "cuLibraryUnload".to_string(),
                size: 0,
                error: "CUDA_ERROR_DEINITIALIZED".to_string(),
                stack: None,
            },
            35,
        );
        let text = render_text(&rec);
        assert!(text.contains("Failed allocations: 1 call\n"), "{text}");
        assert!(
            text.contains(
                "Failed at teardown (the CUDA driver was already deinitialized): 35 calls\n  \
                 cuLibraryUnload(0 B) -> CUDA_ERROR_DEINITIALIZED ×35"
            ),
            "{text}"
        );
    }

    /// Classes that saw nothing have no row, in the totals or the growth.
    #[test]
    fn classes_that_saw_nothing_are_left_out() {
        let mut rec = fixture::recorded();
        rec.state.totals.insert(Class::CudaIpc, Default::default());
        let text = render_text(&rec);
        assert!(!text.contains("cuda-ipc"), "{text}");
        assert!(text.contains("\n  heap  "), "{text}");
    }

    #[test]
    fn the_class_column_holds_every_class_name() {
        let longest = crate::model::Class::ALL
            .iter()
            .map(|c| c.name().len())
            .max()
            .unwrap();
        assert_eq!(longest, CLASS_WIDTH);
    }

    #[test]
    fn text_matches_golden() {
        fixture::assert_golden("report.txt", &render_text(&fixture::recorded()));
    }

    #[test]
    fn text_names_leaks_growth_failures_and_losses() {
        let text = render_text(&fixture::recorded());
        for needle in [
            "PID 4242: heap_fixture leaks attach",
            "4.5 s, complete",
            "75.0 KiB (76774 B)",
            "leak_malloc ← run_scenario ← main",
            "leak_pvalloc",
            STACK_LOST,
            "malloc(1.0 PiB (1125899906842624 B)) -> ENOMEM ×1",
            "Failed allocations: 1 call\n",
            "in     1 block  heap: [stack lost]",
            "started:  2023-11-14 22:13:20 UTC",
            "Unmatched frees: 1",
            "ringbuf_full                      3",
            "from 1 s to 4 s",
        ] {
            assert!(
                text.contains(needle),
                "text report lacks {needle:?}:\n{text}"
            );
        }
        // 20 at most, and this fixture has 10 live stacks.
        assert!(text.contains("Top live stacks (10 of 10"), "{text}");
        assert!(!text.contains("no events lost"), "{text}");
    }

    #[test]
    fn text_of_killed_empty_recording_says_so() {
        let text = render_text(&fixture::empty(false));
        assert!(
            text.contains("NOT FINALIZED: tracer was killed; data up to 2 s"),
            "{text}"
        );
        assert!(text.contains("no events lost"), "{text}");
        assert!(text.contains("no allocation was seen"), "{text}");
        assert!(text.contains("Growth: no time series"), "{text}");
    }

    /// The fixture with its target killed at 4.3 s, by `signal`, by the OOM killer or not.
    fn killed(signal: &str, oom_kill: bool) -> Recorded {
        let mut rec = fixture::recorded();
        rec.exits.push(ProcessExit {
            signal: Some(signal.into()),
            oom_kill,
            ..ProcessExit::unknown(4242, 4.3)
        });
        rec
    }

    #[test]
    fn a_report_of_an_oom_killed_target_opens_on_its_death_and_last_seconds() {
        let text = render_text(&killed("SIGKILL", true));
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[..3],
            [
                "Target process 4242 was killed by the OOM killer at 4.3 s.",
                "The final ledger and the last seconds before its death follow (the OOM flight \
                 recorder).",
                "  t (s)          RSS    anonymous         heap",
            ],
            "{text}"
        );
        // Seconds 0 to 4: resident memory where sampled (0 and 4), live heap carried between
        // the commits that changed it; the whole fixture leaked 76774 B (75.0 KiB) by the end.
        assert_eq!(
            lines[3].split_whitespace().collect::<Vec<_>>(),
            ["0", "10.0", "MiB", "6.0", "MiB", "0", "B"]
        );
        assert_eq!(
            lines[4].split_whitespace().take(3).collect::<Vec<_>>(),
            ["1", "-", "-"]
        );
        assert_eq!(
            lines[7],
            format!(
                "  {:>5} {:>12} {:>12} {:>12}",
                4, "12.0 MiB", "8.0 MiB", "75.0 KiB"
            )
        );
        assert_eq!(lines[8], "");
        assert!(lines[9].starts_with("alloctrace report"), "{text}");
    }

    #[test]
    fn a_report_of_a_target_killed_by_a_signal_says_which() {
        let text = render_text(&killed("SIGSEGV", false));
        assert!(
            text.starts_with(
                "Target process 4242 was killed by SIGSEGV at 4.3 s.\nThe final ledger and the \
                 last seconds before its death follow.\n"
            ),
            "{text}"
        );
        // No death, no opening: the fixture's child exited by itself.
        assert!(render_text(&fixture::recorded()).starts_with("alloctrace report"));
    }

    #[test]
    fn a_recording_cut_short_by_a_full_disk_says_so() {
        let mut rec = fixture::empty(false);
        rec.write_failure = Some(crate::recording::DISK_FULL.to_string());
        let text = render_text(&rec);
        assert!(
            text.contains(
                "duration: NOT FINALIZED: writing stopped, the file system was full (ENOSPC); data \
                 up to 2 s\n"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "  nothing was committed before writing stopped (the file system was full \
                 (ENOSPC))\n"
            ),
            "{text}"
        );
        assert!(
            !text.contains("killed") && !text.contains("no allocation was seen"),
            "{text}"
        );
    }

    #[test]
    fn utc_dates() {
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(1_700_000_000_000_000_000), "2023-11-14 22:13:20 UTC");
        assert_eq!(utc(951_782_400_000_000_000), "2000-02-29 00:00:00 UTC");
        assert_eq!(utc(4_102_444_799_000_000_000), "2099-12-31 23:59:59 UTC");
    }

    #[test]
    fn long_stacks_are_cut_in_text() {
        let frames: Vec<String> = (0..12).map(|i| format!("f{i}")).collect();
        let line = frames_line(&frames);
        assert!(line.starts_with("f0 ← f1"), "{line}");
        assert!(line.ends_with("f7 ← … (4 more)"), "{line}");
    }

    /// A stack that reaches Python shows its Python frames after two native ones, however many
    /// binding and interpreter frames lie between.
    #[test]
    fn python_frames_are_shown_past_the_bindings() {
        let mut frames: Vec<String> = (0..12).map(|i| format!("native{i}")).collect();
        frames.extend((0..10).map(|i| format!("py{i} (server.py:{i})")));
        let line = frames_line(&frames);
        assert_eq!(
            line,
            "native0 ← native1 ← … 10 native frames … ← py0 (server.py:0) ← py1 (server.py:1) \
             ← py2 (server.py:2) ← py3 (server.py:3) ← py4 (server.py:4) ← py5 (server.py:5) \
             ← … (4 more)"
        );
        // Python right after the first frames: the usual cut.
        let short = ["malloc_caller", "f (a.py:1)", "g (a.py:2)"].map(String::from);
        assert_eq!(
            frames_line(&short),
            "malloc_caller ← f (a.py:1) ← g (a.py:2)"
        );
        assert!(!is_python_frame("operator() (x.cpp:3)"));
    }
}
