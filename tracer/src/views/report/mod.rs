//! `alloctrace report`: the JSON contract (docs/recording.md, "The JSON report") and the text
//! postmortem.

use std::{
    collections::{BTreeMap, HashMap},
    fmt::Write as _,
};

use serde::Serialize;
use tracer_common::drop_cause;

use super::{human_bytes, human_delta, one_line};
use crate::{
    model::{CellKey, Class, ClassTotals, StackCounters, StackIndex},
    recording::Recorded,
};

/// Version of the JSON report contract. Fields may be added within a version, never removed or
/// changed in meaning.
pub const JSON_SCHEMA: u32 = 1;

/// How many live stacks the text report lists.
const TEXT_TOP_STACKS: usize = 20;
/// How many growing stacks the text report lists.
const TEXT_TOP_GROWING: usize = 10;
/// Frames shown per stack in the text report; the JSON has them all.
const TEXT_FRAMES: usize = 8;

#[derive(Serialize)]
struct JsonReport<'a> {
    schema: u32,
    tool_version: &'a str,
    complete: bool,
    target: JsonTarget<'a>,
    started_unix_ns: u64,
    duration_s: f64,
    totals: BTreeMap<&'static str, ClassTotals>,
    /// Per process and class: the cells' figures summed (peaks are per class only).
    processes: BTreeMap<u32, BTreeMap<&'static str, StackCounters>>,
    stacks: Vec<JsonStack>,
    failures: Vec<JsonFailure<'a>>,
    unmatched_frees: u64,
    lost_events: BTreeMap<&'a str, u64>,
    /// Resident memory reconciled with what was traced, at the last sample; null without one.
    rss: Option<Waterfall>,
    /// Sampled page faults by stack, most first: which code made RSS grow.
    page_faults: Vec<JsonFaults>,
    /// Bytes released with madvise by stack, most first: which code gave pages back.
    released: Vec<JsonReleased>,
    /// GPU memory the driver reports per process against what the device classes traced.
    gpu: JsonGpu,
    /// Non-allocating CUDA driver calls (graphs, pools, IPC, registration, contexts, modules) by
    /// process, function and stack.
    cuda_calls: Vec<JsonCudaCalls<'a>>,
    /// How stacks were taken (`record --stack`); null for an older recording.
    stack_capture: Option<&'a crate::model::StackCapture>,
}

#[derive(Serialize)]
struct JsonCudaCalls<'a> {
    pid: u32,
    function: &'a str,
    calls: u64,
    failed: u64,
    stack: Option<StackIndex>,
    frames: Vec<String>,
}

#[derive(Serialize)]
struct JsonGpu {
    /// Where the samples came from, or why there are none.
    source: Option<String>,
    /// The last sample of each process.
    processes: Vec<GpuResidual>,
}

/// NVML's figure for a process and what alloctrace traced: `untraced` is the memory nobody
/// traced (driver context, modules, graph pools, ...), class `gpu-untraced` of the accounting.
#[derive(Serialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct GpuResidual {
    pub pid: u32,
    pub t_s: u64,
    pub used: u64,
    pub traced: u64,
    /// `used - traced`; negative when traced device memory exceeds what the driver reports.
    pub untraced: i64,
}

/// The last GPU sample of each process.
pub fn gpu_residuals(rec: &Recorded) -> Vec<GpuResidual> {
    let mut last: BTreeMap<u32, crate::model::GpuSample> = BTreeMap::new();
    for s in &rec.gpu {
        last.insert(s.pid, *s);
    }
    last.into_values()
        .map(|s| GpuResidual {
            pid: s.pid,
            t_s: s.t_s,
            used: s.used,
            traced: s.traced,
            untraced: s.used as i64 - s.traced as i64,
        })
        .collect()
}

#[derive(Serialize)]
struct JsonReleased {
    pid: u32,
    bytes: u64,
    stack: Option<StackIndex>,
    frames: Vec<String>,
}

#[derive(Serialize)]
struct JsonFaults {
    pid: u32,
    /// Faults the samples stand for (samples × sampling period).
    faults: u64,
    /// `faults` × the page size.
    bytes: u64,
    stack: Option<StackIndex>,
    frames: Vec<String>,
}

/// Page-fault rows, most faults first.
/// Rows of a per-(pid, stack) amount (page faults, released bytes), largest first.
fn by_amount(
    map: &BTreeMap<(u32, Option<StackIndex>), u64>,
) -> Vec<(u32, Option<StackIndex>, u64)> {
    let mut rows: Vec<_> = map
        .iter()
        .map(|(&(pid, stack), &n)| (pid, stack, n))
        .collect();
    rows.sort_by(|a, b| b.2.cmp(&a.2).then_with(|| (a.0, a.1).cmp(&(b.0, b.1))));
    rows
}

/// RSS = file-backed resident + shared memory + anonymous, and the anonymous part broken down
/// into what alloctrace traced (docs/accounting.md, "RSS reconciliation").
#[derive(Serialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct Waterfall {
    pub pid: u32,
    pub t_s: u64,
    pub rss: u64,
    pub file: u64,
    pub shmem: u64,
    pub anon: u64,
    /// Live bytes of class `heap`: malloc blocks with --heap, else the program break's growth.
    pub heap_live: u64,
    /// Resident allocator arena traced since attach minus live malloc bytes (free chunks the
    /// allocator keeps).
    pub allocator_retained: u64,
    /// Resident bytes of the traced anonymous mappings (classes `mmap`, `thread-stack`,
    /// `python-arena`), from /proc/PID/smaps.
    pub traced_mappings: u64,
    /// Their live (accessible, mapped) bytes, resident or not.
    pub traced_mappings_mapped: u64,
    /// `anon` minus the three above; negative when the allocator's mapped arena is not all
    /// resident.
    pub untraced_anon: i64,
    /// Changes since the first sample (t = `first_t_s`).
    pub first_t_s: u64,
    pub rss_growth: i64,
    pub anon_growth: i64,
    pub file_growth: i64,
    pub shmem_growth: i64,
}

/// The waterfall at the last resident sample of the first target process.
pub fn waterfall(rec: &Recorded) -> Option<Waterfall> {
    let pid = *rec.target.pids.first()?;
    let samples: Vec<_> = rec.rss.iter().filter(|s| s.pid == pid).collect();
    let (first, last) = (samples.first()?, samples.last()?);
    let live = |class: Class| rec.state.totals.get(&class).map_or(0, |t| t.live_bytes);
    let heap_live = live(Class::Heap);
    // Resident arena the live blocks do not use. (Blocks that live in arena mapped before
    // attach make this an underestimate, and show in the untraced remainder instead.)
    let allocator_retained = last.arena_resident.saturating_sub(heap_live);
    let traced_mappings_mapped =
        live(Class::Mmap) + live(Class::ThreadStack) + live(Class::PythonArena);
    let traced_mappings = last.traced_resident;
    let d = |a: u64, b: u64| b as i64 - a as i64;
    Some(Waterfall {
        pid,
        t_s: last.t_s,
        rss: last.rss,
        file: last.file,
        shmem: last.shmem,
        anon: last.anon,
        heap_live,
        allocator_retained,
        traced_mappings,
        traced_mappings_mapped,
        untraced_anon: last.anon as i64 - (heap_live + allocator_retained + traced_mappings) as i64,
        first_t_s: first.t_s,
        rss_growth: d(first.rss, last.rss),
        anon_growth: d(first.anon, last.anon),
        file_growth: d(first.file, last.file),
        shmem_growth: d(first.shmem, last.shmem),
    })
}

#[derive(Serialize)]
struct JsonTarget<'a> {
    pids: &'a [u32],
    command: &'a str,
}

#[derive(Serialize)]
struct JsonStack {
    class: &'static str,
    pid: u32,
    phase: String,
    /// Index in the recording's `stacks` table; null when the stack was lost.
    stack: Option<StackIndex>,
    live_bytes: u64,
    live_count: u64,
    allocated_bytes: u64,
    allocated_count: u64,
    freed_bytes: u64,
    freed_count: u64,
    frames: Vec<String>,
}

#[derive(Serialize)]
struct JsonFailure<'a> {
    class: &'static str,
    pid: u32,
    function: &'a str,
    size: u64,
    count: u64,
    error: &'a str,
    stack: Option<StackIndex>,
    frames: Vec<String>,
}

/// Cells in report order: live bytes, then allocated bytes, descending; ties by key so the
/// order is the same on every run.
fn cells_by_live_bytes(rec: &Recorded) -> Vec<(&CellKey, &StackCounters)> {
    let mut cells: Vec<_> = rec.state.cells.iter().collect();
    cells.sort_by(|(ka, a), (kb, b)| {
        (b.live_bytes, b.allocated_bytes)
            .cmp(&(a.live_bytes, a.allocated_bytes))
            .then_with(|| ka.cmp(kb))
    });
    cells
}

/// Cells summed per process and class.
fn per_process(rec: &Recorded) -> BTreeMap<u32, BTreeMap<&'static str, StackCounters>> {
    let mut out: BTreeMap<u32, BTreeMap<&'static str, StackCounters>> = BTreeMap::new();
    for (key, counters) in &rec.state.cells {
        out.entry(key.pid)
            .or_default()
            .entry(key.class.name())
            .or_default()
            .add(counters);
    }
    out
}

/// Failures by count, descending, then by key.
fn failures_by_count(rec: &Recorded) -> Vec<(&crate::model::FailureKey, u64)> {
    let mut failures: Vec<_> = rec.state.failures.iter().map(|(k, &n)| (k, n)).collect();
    failures.sort_by(|(ka, a), (kb, b)| b.cmp(a).then_with(|| ka.cmp(kb)));
    failures
}

/// Every kernel drop cause (zero when absent), then any other cause the recording has.
fn lost_events(rec: &Recorded) -> BTreeMap<&str, u64> {
    let mut lost: BTreeMap<&str, u64> = drop_cause::NAMES.iter().map(|&n| (n, 0)).collect();
    for (cause, &n) in &rec.state.lost_events {
        *lost.entry(cause.as_str()).or_default() += n;
    }
    lost
}

/// The JSON report, pretty-printed, ending in a newline.
pub fn render_json(rec: &Recorded) -> String {
    let report = JsonReport {
        schema: JSON_SCHEMA,
        tool_version: &rec.tool_version,
        complete: rec.complete,
        target: JsonTarget {
            pids: &rec.target.pids,
            command: &rec.target.command,
        },
        started_unix_ns: rec.started_unix_ns,
        // Milliseconds are all the precision a duration needs; more is noise in diffs.
        duration_s: (rec.duration_s * 1000.0).round() / 1000.0,
        totals: rec
            .state
            .totals
            .iter()
            .map(|(class, totals)| (class.name(), *totals))
            .collect(),
        processes: per_process(rec),
        stacks: cells_by_live_bytes(rec)
            .into_iter()
            .map(|(key, c)| JsonStack {
                class: key.class.name(),
                pid: key.pid,
                phase: key.phase.clone(),
                stack: key.stack,
                live_bytes: c.live_bytes,
                live_count: c.live_count,
                allocated_bytes: c.allocated_bytes,
                allocated_count: c.allocated_count,
                freed_bytes: c.freed_bytes,
                freed_count: c.freed_count,
                frames: rec.frames(key.stack),
            })
            .collect(),
        failures: failures_by_count(rec)
            .into_iter()
            .map(|(key, count)| JsonFailure {
                class: key.class.name(),
                pid: key.pid,
                function: &key.function,
                size: key.size,
                count,
                error: &key.error,
                stack: key.stack,
                frames: rec.frames(key.stack),
            })
            .collect(),
        unmatched_frees: rec.state.unmatched_frees,
        lost_events: lost_events(rec),
        rss: waterfall(rec),
        gpu: JsonGpu {
            source: rec.gpu_source.clone(),
            processes: gpu_residuals(rec),
        },
        stack_capture: rec.stack_capture.as_ref(),
        cuda_calls: rec
            .state
            .cuda_calls
            .iter()
            .map(|((pid, function, stack), n)| JsonCudaCalls {
                pid: *pid,
                function,
                calls: n.calls,
                failed: n.failed,
                stack: *stack,
                frames: rec.frames(*stack),
            })
            .collect(),
        released: by_amount(&rec.state.released)
            .into_iter()
            .map(|(pid, stack, bytes)| JsonReleased {
                pid,
                bytes,
                stack,
                frames: rec.frames(stack),
            })
            .collect(),
        page_faults: by_amount(&rec.state.faults)
            .into_iter()
            .map(|(pid, stack, faults)| JsonFaults {
                pid,
                faults,
                bytes: faults * crate::model::PAGE,
                stack,
                frames: rec.frames(stack),
            })
            .collect(),
    };
    let mut json = serde_json::to_string_pretty(&report).expect("the report serializes");
    json.push('\n');
    json
}

/// "74.9 KiB (76710 B)": readable and exact.
fn bytes_exact(n: u64) -> String {
    if n < 1024 {
        format!("{n} B")
    } else {
        format!("{} ({n} B)", human_bytes(n))
    }
}

/// Innermost frames joined by " ← ", cut after `TEXT_FRAMES`.
fn frames_line(frames: &[String]) -> String {
    let mut line = frames
        .iter()
        .take(TEXT_FRAMES)
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join(" ← ");
    if frames.len() > TEXT_FRAMES {
        let _ = write!(line, " ← … ({} more)", frames.len() - TEXT_FRAMES);
    }
    line
}

/// "1 block", "2 blocks".
fn count_of(n: u64, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
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

fn phase_suffix(key: &CellKey) -> String {
    if key.phase == crate::model::PHASE_NONE {
        String::new()
    } else {
        format!(" [{}]", key.phase)
    }
}

/// The human postmortem: what the target held when the recording ended, where, and how it grew.
pub fn render_text(rec: &Recorded) -> String {
    let mut out = String::new();
    text_header(&mut out, rec);
    text_totals(&mut out, rec);
    text_processes(&mut out, rec);
    text_live_stacks(&mut out, rec);
    text_failures(&mut out, rec);
    text_unmatched_and_lost(&mut out, rec);
    text_growth(&mut out, rec);
    text_waterfall(&mut out, rec);
    text_faults(&mut out, rec);
    text_released(&mut out, rec);
    text_cuda_calls(&mut out, rec);
    text_stack_capture(&mut out, rec);
    text_gpu(&mut out, rec);
    out
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
            let _ = writeln!(out, "\nGPU memory: {source}");
        }
        return;
    }
    let _ = writeln!(
        out,
        "\nGPU memory per process ({})",
        rec.gpu_source.as_deref().unwrap_or("NVML")
    );
    for r in residuals {
        let untraced = if r.untraced < 0 {
            format!("-{}", human_bytes(r.untraced.unsigned_abs()))
        } else {
            human_bytes(r.untraced as u64)
        };
        let _ = writeln!(
            out,
            "  PID {:<8} driver {:>12}  traced {:>12}  gpu-untraced {:>12}  (at {} s)",
            r.pid,
            human_bytes(r.used),
            human_bytes(r.traced),
            untraced,
            r.t_s
        );
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
        s.mode,
        s.copy_bytes >> 10,
        s.copies,
        s.truncated,
        s.fp_under_pressure
    );
}

/// CUDA calls by function (all stacks), most first.
fn text_cuda_calls(out: &mut String, rec: &Recorded) {
    let mut by_function: BTreeMap<(u32, &str), (u64, u64)> = BTreeMap::new();
    for ((pid, function, _), n) in &rec.state.cuda_calls {
        let e = by_function.entry((*pid, function)).or_default();
        e.0 += n.calls;
        e.1 += n.failed;
    }
    if by_function.is_empty() {
        return;
    }
    let mut rows: Vec<_> = by_function.into_iter().collect();
    rows.sort_by(|a, b| b.1.0.cmp(&a.1.0).then_with(|| a.0.cmp(&b.0)));
    let _ = writeln!(
        out,
        "\nCUDA calls (graphs, pools, IPC, registration, contexts, modules):"
    );
    for ((pid, function), (calls, failed)) in rows {
        let failed = if failed > 0 {
            format!(", {failed} failed")
        } else {
            String::new()
        };
        let _ = writeln!(out, "  {calls:>8}  PID {pid}: {function}{failed}");
    }
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

fn text_faults(out: &mut String, rec: &Recorded) {
    let mut rows = by_amount(&rec.state.faults);
    for row in &mut rows {
        row.2 *= crate::model::PAGE;
    }
    text_bytes_by_stack(
        out,
        rec,
        "Pages faulted in (sampled; RSS growth by stack)",
        &rows,
    );
}

/// A section of bytes by (pid, stack), its total in the heading, the top 10 rows.
fn text_bytes_by_stack(
    out: &mut String,
    rec: &Recorded,
    heading: &str,
    rows: &[(u32, Option<StackIndex>, u64)],
) {
    if rows.is_empty() {
        return;
    }
    let total: u64 = rows.iter().map(|r| r.2).sum();
    let _ = writeln!(out, "\n{heading}: {} in all", human_bytes(total));
    for (pid, stack, bytes) in rows.iter().take(10) {
        let _ = writeln!(
            out,
            "  {:>12}  PID {pid}: {}",
            human_bytes(*bytes),
            frames_line(&rec.frames(*stack))
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

fn text_waterfall(out: &mut String, rec: &Recorded) {
    let Some(w) = waterfall(rec) else {
        let _ = writeln!(
            out,
            "\nResident memory: no sample (the target exited before the first second)"
        );
        return;
    };
    let signed = |v: i64| {
        if v < 0 {
            format!("-{}", human_bytes(v.unsigned_abs()))
        } else {
            human_bytes(v as u64)
        }
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
        signed(w.untraced_anon),
        if w.untraced_anon < 0 {
            "(negative: the allocator's arena is not all resident)"
        } else {
            "(mapped before attach, or not traced)"
        }
    );
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

fn text_header(out: &mut String, rec: &Recorded) {
    let _ = writeln!(out, "alloctrace report (alloctrace {})", rec.tool_version);
    let _ = writeln!(
        out,
        "target:   {}: {}",
        super::target_pids(rec),
        one_line(&rec.target.command)
    );
    if rec.started_unix_ns > 0 {
        let _ = writeln!(out, "started:  {}", utc(rec.started_unix_ns));
    }
    if rec.complete {
        let _ = writeln!(out, "duration: {:.1} s, complete", rec.duration_s);
    } else {
        let _ = writeln!(
            out,
            "duration: NOT FINALIZED: tracer was killed; data up to {:.0} s",
            rec.duration_s
        );
    }
}

fn text_totals(out: &mut String, rec: &Recorded) {
    let _ = writeln!(out, "\nTotals at the end of the recording");
    if rec.state.totals.is_empty() {
        let _ = writeln!(out, "  no allocation was seen");
        return;
    }
    let _ = writeln!(
        out,
        "  {:<6} {:>22} {:>12} {:>22} {:>22} {:>13} {:>13}",
        "class", "live", "live blocks", "peak", "allocated", "alloc blocks", "freed blocks"
    );
    for (class, t) in &rec.state.totals {
        let _ = writeln!(
            out,
            "  {:<6} {:>22} {:>12} {:>22} {:>22} {:>13} {:>13}",
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

fn text_live_stacks(out: &mut String, rec: &Recorded) {
    let live: Vec<_> = cells_by_live_bytes(rec)
        .into_iter()
        .filter(|(_, c)| c.live_bytes > 0)
        .collect();
    if live.is_empty() {
        let _ = writeln!(out, "\nLive stacks: none (nothing was live at the end)");
        return;
    }
    let shown = live.len().min(TEXT_TOP_STACKS);
    let _ = writeln!(
        out,
        "\nTop live stacks ({shown} of {}; innermost frame first)",
        live.len()
    );
    for (rank, (key, c)) in live.iter().take(TEXT_TOP_STACKS).enumerate() {
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
}

fn text_failures(out: &mut String, rec: &Recorded) {
    let failures = failures_by_count(rec);
    if failures.is_empty() {
        let _ = writeln!(out, "\nFailed allocations: none");
        return;
    }
    let calls: u64 = failures.iter().map(|(_, n)| n).sum();
    let _ = writeln!(out, "\nFailed allocations: {}", count_of(calls, "call"));
    for (key, count) in failures {
        let _ = writeln!(
            out,
            "  {}({}) -> {} ×{count}: {}",
            key.function,
            bytes_exact(key.size),
            key.error,
            frames_line(&rec.frames(key.stack))
        );
    }
}

fn text_unmatched_and_lost(out: &mut String, rec: &Recorded) {
    let _ = writeln!(
        out,
        "\nUnmatched frees: {} (frees of blocks allocated before the tracer attached, or whose \
         allocation event was lost)",
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
        let _ = writeln!(out, "  {cause:<24} {n:>10}");
    }
}

/// Live figures of every cell at the first and the last second of the series.
struct Growth<'a> {
    first_t: u64,
    last_t: u64,
    /// (live bytes at the first second, at the last), by cell.
    cells: HashMap<&'a CellKey, (u64, u64)>,
}

fn growth(rec: &Recorded) -> Option<Growth<'_>> {
    let first_t = rec.series.iter().map(|p| p.t_s).min()?;
    let last_t = rec.series.iter().map(|p| p.t_s).max()?;
    let mut cells: HashMap<&CellKey, (u64, u64)> = HashMap::new();
    // Points are in commit order: the last one of a cell is its latest value. A cell without a
    // point at the first second did not exist yet (the ledger reports a cell when it is made).
    for p in &rec.series {
        let entry = cells.entry(&p.key).or_insert((0, 0));
        if p.t_s == first_t {
            entry.0 = p.live_bytes;
        }
        entry.1 = p.live_bytes;
    }
    Some(Growth {
        first_t,
        last_t,
        cells,
    })
}

/// Live bytes of each class at second `first_t` and at the end, from the per-class series
/// (a class without a point at `first_t` had nothing live then).
fn class_growth(rec: &Recorded, first_t: u64) -> BTreeMap<Class, (u64, u64)> {
    let mut classes: BTreeMap<Class, (u64, u64)> = BTreeMap::new();
    for p in &rec.totals_series {
        let entry = classes.entry(p.class).or_default();
        if p.t_s <= first_t {
            entry.0 = p.live_bytes;
        }
        entry.1 = p.live_bytes;
    }
    classes
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
    for (class, (first, last)) in class_growth(rec, g.first_t) {
        let _ = writeln!(
            out,
            "  {:<6} {} at {} s -> {} at {} s ({})",
            class.name(),
            human_bytes(first),
            g.first_t,
            human_bytes(last),
            g.last_t,
            human_delta(i128::from(last) - i128::from(first))
        );
    }
    let mut growing: Vec<(&CellKey, i128)> = g
        .cells
        .iter()
        .map(|(key, (first, last))| (*key, i128::from(*last) - i128::from(*first)))
        .filter(|(_, d)| *d > 0)
        .collect();
    growing.sort_by(|(ka, a), (kb, b)| b.cmp(a).then_with(|| ka.cmp(kb)));
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

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::*;
    use crate::{
        model::{LedgerState, PHASE_NONE, TargetInfo},
        recording::STACK_LOST,
        views::fixture::{self, CHURN_STACK, LEAKS},
    };

    fn empty_recorded(complete: bool) -> Recorded {
        Recorded {
            schema: 1,
            tool_version: "0.0.0-test".to_string(),
            target: TargetInfo {
                pids: vec![1],
                command: "idle".to_string(),
            },
            started_unix_ns: 0,
            ended_unix_ns: None,
            duration_s: 2.0,
            complete,
            state: LedgerState::default(),
            stacks: BTreeMap::new(),
            series: Vec::new(),
            totals_series: Vec::new(),
            rss: Vec::new(),
            gpu: Vec::new(),
            gpu_source: None,
            stack_capture: None,
        }
    }

    #[test]
    fn json_has_the_contract_fields_with_exact_figures() {
        let rec = fixture::recorded();
        let v: Value = serde_json::from_str(&render_json(&rec)).unwrap();
        assert_eq!(v["schema"], 1);
        assert_eq!(v["complete"], true);
        assert_eq!(v["tool_version"], "0.0.0-test");
        assert_eq!(v["target"]["pids"], serde_json::json!([4242]));
        assert_eq!(v["target"]["command"], "heap_fixture leaks attach");
        assert_eq!(v["duration_s"], 4.5);

        let heap = &v["totals"]["heap"];
        let leaked: u64 = LEAKS.iter().map(|(_, n, s)| n * s).sum();
        assert_eq!(leaked, 76710);
        assert_eq!(heap["live_bytes"], leaked + 64);
        assert_eq!(heap["live_count"], 126 + 1);
        assert_eq!(heap["allocated_bytes"], leaked + 5 * 4096 + 64);
        assert_eq!(heap["allocated_count"], 126 + 5 + 1);
        assert_eq!(heap["freed_count"], 5);
        assert_eq!(heap["peak_bytes"], leaked + 4096);

        let stacks = v["stacks"].as_array().unwrap();
        assert_eq!(stacks.len(), LEAKS.len() + 2);
        // Largest first: leak_pvalloc, 18 × 1100.
        let top = &stacks[0];
        assert_eq!(top["class"], "heap");
        assert_eq!(top["phase"], PHASE_NONE);
        assert_eq!(top["live_bytes"], 18 * 1100);
        assert_eq!(top["live_count"], 18);
        assert_eq!(top["allocated_bytes"], 18 * 1100);
        assert_eq!(top["allocated_count"], 18);
        assert_eq!(
            top["frames"],
            serde_json::json!(["leak_pvalloc", "run_scenario", "main"])
        );
        // Sorted by live bytes, then allocated bytes, both descending.
        let order: Vec<(u64, u64)> = stacks
            .iter()
            .map(|s| {
                (
                    s["live_bytes"].as_u64().unwrap(),
                    s["allocated_bytes"].as_u64().unwrap(),
                )
            })
            .collect();
        assert!(order.windows(2).all(|w| w[0] >= w[1]), "{order:?}");
        // The churning stack is listed, with nothing live.
        let churn = stacks
            .iter()
            .find(|s| s["stack"] == CHURN_STACK)
            .expect("churn stack listed");
        assert_eq!(churn["live_bytes"], 0);
        assert_eq!(churn["allocated_count"], 5);
        assert_eq!(churn["freed_count"], 5);
        // The lost stack has a placeholder frame.
        let lost = stacks.iter().find(|s| s["stack"].is_null()).unwrap();
        assert_eq!(lost["frames"], serde_json::json!([STACK_LOST]));
        assert_eq!(lost["live_bytes"], 64);
        // Stack rows add up to the totals, as the integration tests check.
        let sum: u64 = stacks
            .iter()
            .map(|s| s["live_bytes"].as_u64().unwrap())
            .sum();
        assert_eq!(sum, leaked + 64);

        let failures = v["failures"].as_array().unwrap();
        assert_eq!(failures.len(), 1);
        assert_eq!(failures[0]["function"], "malloc");
        assert_eq!(failures[0]["size"], 1u64 << 50);
        assert_eq!(failures[0]["count"], 1);
        assert_eq!(failures[0]["error"], "ENOMEM");
        assert_eq!(failures[0]["frames"][0], "leak_malloc");

        assert_eq!(v["unmatched_frees"], 1);
        let lost = v["lost_events"].as_object().unwrap();
        for cause in drop_cause::NAMES {
            assert!(lost.contains_key(cause), "lost_events lacks {cause}");
        }
        assert_eq!(lost["ringbuf_full"], 3);
        assert_eq!(lost["missed_free"], 0);
    }

    #[test]
    fn json_lists_user_space_loss_causes_too() {
        let mut rec = empty_recorded(false);
        rec.state.lost_events.insert("missed_free".to_string(), 3);
        let v: Value = serde_json::from_str(&render_json(&rec)).unwrap();
        assert_eq!(v["lost_events"]["missed_free"], 3);
        assert_eq!(
            v["lost_events"].as_object().unwrap().len(),
            drop_cause::NAMES.len() + 1
        );
        assert_eq!(v["complete"], false);
        assert_eq!(v["stacks"], serde_json::json!([]));
        assert_eq!(v["totals"], serde_json::json!({}));
    }

    #[test]
    fn json_matches_golden() {
        fixture::assert_golden("report.json", &render_json(&fixture::recorded()));
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
        let text = render_text(&empty_recorded(false));
        assert!(
            text.contains("NOT FINALIZED: tracer was killed; data up to 2 s"),
            "{text}"
        );
        assert!(text.contains("no events lost"), "{text}");
        assert!(text.contains("no allocation was seen"), "{text}");
        assert!(text.contains("Growth: no time series"), "{text}");
    }

    #[test]
    fn growth_counts_cells_created_later_from_zero() {
        let rec = fixture::recorded();
        let g = growth(&rec).unwrap();
        assert_eq!((g.first_t, g.last_t), (1, 4));
        let key = |stack| CellKey {
            class: Class::Heap,
            pid: 7,
            phase: PHASE_NONE.to_string(),
            stack,
        };
        // leak_malloc: 5 of 10 blocks of 100 B in the first second.
        assert_eq!(g.cells[&key(Some(0))], (500, 1000));
        // The lost-stack block appeared at 4 s.
        assert_eq!(g.cells[&key(None)], (0, 64));
        assert_eq!(g.cells[&key(Some(CHURN_STACK))], (0, 0));
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
}
