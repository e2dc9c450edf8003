//! The JSON report: a contract (docs/recording.md, "The JSON report"). Fields may be added within
//! a version, never removed or changed in meaning; field order is declaration order.

use std::collections::BTreeMap;

use serde::Serialize;

use super::{
    GpuResidual, Waterfall,
    analysis::{
        AllocatorSummary, allocator_summaries, by_amount, cells_by_live_bytes, failures_by_count,
        fragmentation, gpu_residuals, lost_events, per_process, target_exit, waterfall,
    },
    phases::{PhaseRow, phase_rows},
    verdict::{Finding, classify},
};
use crate::{
    model::{
        ClassTotals, PAGE, PhaseActivity, PhaseFrees, PhaseRuleFigures, StackCapture,
        StackCounters, StackIndex,
    },
    recording::{ProcessExit, Recorded},
    views::check::{Thresholds, Verdict, analyse},
};

/// Version of the JSON report contract. Fields may be added within a version, never removed or
/// changed in meaning.
pub const JSON_SCHEMA: u32 = 2;

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
    /// What kept growing once the program was warm; null when the recording is too short to
    /// judge.
    suspects: Option<JsonSuspects>,
    /// The recording classified: each category (`ends-in-oom`, `error-induced`, `leaks`, `grows-while-serving`,
    /// `grows-without-traffic`, `too-noisy`, `no-leak`, `not-judged`) with its evidence, the
    /// gravest first.
    verdict: Vec<Finding>,
    /// Memory by request phase (`record --phase`); null without phase rules.
    phases: Option<JsonPhases<'a>>,
    /// The leak test's judgement (a recording `alloctrace check` made); null otherwise, or with
    /// fewer than two batches.
    check: Option<JsonCheck>,
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
    /// PyTorch's caching allocators: figures per process and device, and OOMs.
    torch_allocator: JsonTorchAllocator,
    /// How stacks were taken (`record --stack`); null for an older recording.
    stack_capture: Option<&'a StackCapture>,
    /// Why the recording ended; null unless finalized.
    stop_reason: Option<&'a str>,
    /// Why writing stopped before the end (a full file system); null when it did not.
    write_failure: Option<&'a str>,
    /// The traced processes that ended during the recording, in the order seen.
    exits: &'a [ProcessExit],
    /// The target's end (also in `exits`); null when it outlived the recording.
    target_exit: Option<&'a ProcessExit>,
}

#[derive(Serialize)]
struct JsonCheck {
    thresholds: Thresholds,
    /// Traced live bytes at the end of each batch after the warm-up.
    batches: Vec<u64>,
    /// Batches each average covers.
    averaged: usize,
    initial_avg: f64,
    final_avg: f64,
    growth_bytes: f64,
    growth_percent: f64,
    noise_percent: f64,
    verdict: Verdict,
    /// Cells whose live bytes rose from each batch to the next, by growth since the warm-up.
    suspects: Vec<JsonCheckSuspect>,
}

#[derive(Serialize)]
struct JsonCheckSuspect {
    class: &'static str,
    pid: u32,
    phase: String,
    stack: Option<StackIndex>,
    growth_bytes: i64,
    frames: Vec<String>,
}

/// The leak test's figures, with the suspects' frames.
fn check(rec: &Recorded) -> Option<JsonCheck> {
    let a = analyse(&rec.marks, rec.check?)?;
    Some(JsonCheck {
        thresholds: a.thresholds,
        batches: a.batches,
        averaged: a.averaged,
        initial_avg: a.initial_avg,
        final_avg: a.final_avg,
        growth_bytes: a.growth_bytes,
        growth_percent: a.growth_percent,
        noise_percent: a.noise_percent,
        verdict: a.verdict,
        suspects: (a.suspects.iter())
            .map(|(key, growth)| JsonCheckSuspect {
                class: key.class.name(),
                pid: key.pid,
                phase: key.phase.clone(),
                stack: key.stack,
                growth_bytes: i64::try_from(*growth).unwrap_or(i64::MAX),
                frames: rec.frames(key.stack),
            })
            .collect(),
    })
}

#[derive(Serialize)]
struct JsonPhases<'a> {
    /// The built-in profiles in use (`vLLM`, `SGLang`, `TGI`, `llama.cpp`).
    profiles: &'a [String],
    /// The rules as given (the profiles' in use after them), with the file of each native
    /// function and its entries.
    rules: &'a [PhaseRuleFigures],
    /// Per phase, summed over classes and processes: the rules' phases in order, then the
    /// others (none last).
    by_phase: Vec<PhaseRow>,
    /// Blocks by (class, allocated-in, freed-in phase).
    frees: &'a [PhaseFrees],
    /// Native phases' entries by second (`t_s`, `phase`, `entries`).
    activity: &'a [PhaseActivity],
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
struct JsonTorchAllocator {
    allocators: Vec<AllocatorSummary>,
    ooms: Vec<JsonTorchOom>,
}

#[derive(Serialize)]
struct JsonTorchOom {
    t_s: u64,
    pid: u32,
    device: i32,
    requested: u64,
    /// Free device bytes the allocator saw.
    device_free: u64,
    /// The allocator's figures right before.
    reserved: u64,
    allocated: u64,
    pending: u64,
    holes: u64,
    hole_bytes: u64,
    largest_hole: u64,
    fragmentation: f64,
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

#[derive(Serialize)]
struct JsonTarget<'a> {
    pids: &'a [u32],
    command: &'a str,
    /// Attached to by PID (false: launched by the recorder).
    attached: bool,
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

/// Leak suspects (docs/accounting.md, "Leak suspects").
#[derive(Serialize)]
struct JsonSuspects {
    /// The judged part of the recording: from the end of the warm-up to the end (seconds).
    from_s: f64,
    to_s: f64,
    batches: usize,
    /// Steady growers, the most growth first.
    stacks: Vec<JsonSuspect>,
    /// Stacks that grew but not in every batch.
    not_steady: usize,
    /// Stacks that rose in every batch by less than they swing within one: too noisy to judge.
    too_noisy: Vec<JsonNoisy>,
}

#[derive(Serialize)]
struct JsonNoisy {
    class: &'static str,
    pid: u32,
    phase: String,
    stack: Option<StackIndex>,
    frames: Vec<String>,
}

#[derive(Serialize)]
struct JsonSuspect {
    class: &'static str,
    pid: u32,
    phase: String,
    stack: Option<StackIndex>,
    growth_bytes: u64,
    bytes_per_s: f64,
    /// Of the first batch's mean; null when that was 0.
    growth_percent: Option<f64>,
    batch_means: Vec<u64>,
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

/// The JSON report, pretty-printed, ending in a newline.
pub(super) fn render(rec: &Recorded) -> String {
    let report = JsonReport {
        schema: JSON_SCHEMA,
        tool_version: &rec.tool_version,
        complete: rec.complete,
        target: JsonTarget {
            pids: &rec.target.pids,
            command: &rec.target.command,
            attached: rec.target.attached,
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
        stacks: stacks(rec),
        suspects: suspects(rec),
        check: check(rec),
        verdict: classify(rec),
        phases: rec.phases.as_ref().map(|p| JsonPhases {
            profiles: &p.profiles,
            rules: &p.rules,
            by_phase: phase_rows(rec).unwrap_or_default(),
            frees: &p.frees,
            activity: &rec.phase_activity,
        }),
        failures: failures(rec),
        unmatched_frees: rec.state.unmatched_frees,
        lost_events: lost_events(rec),
        rss: waterfall(rec),
        gpu: JsonGpu {
            source: rec.gpu_source.clone(),
            processes: gpu_residuals(rec),
        },
        stack_capture: rec.stack_capture.as_ref(),
        cuda_calls: cuda_calls(rec),
        torch_allocator: JsonTorchAllocator {
            allocators: allocator_summaries(rec),
            ooms: torch_ooms(rec),
        },
        released: released(rec),
        page_faults: page_faults(rec),
        stop_reason: rec.stop_reason.as_deref(),
        write_failure: rec.write_failure.as_deref(),
        exits: &rec.exits,
        target_exit: target_exit(rec),
    };
    // Plain structs of numbers and strings with string keys: serializing cannot fail.
    let mut json = serde_json::to_string_pretty(&report).expect("the report serializes");
    json.push('\n');
    json
}

fn stacks(rec: &Recorded) -> Vec<JsonStack> {
    cells_by_live_bytes(rec)
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
        .collect()
}

fn suspects(rec: &Recorded) -> Option<JsonSuspects> {
    let s = super::suspects::suspects(rec)?;
    Some(JsonSuspects {
        from_s: s.from_s,
        to_s: s.to_s,
        batches: crate::recording::batches::BATCHES,
        stacks: (s.rows.iter())
            .map(|row| JsonSuspect {
                class: row.key.class.name(),
                pid: row.key.pid,
                phase: row.key.phase.clone(),
                stack: row.key.stack,
                growth_bytes: row.growth,
                bytes_per_s: row.bytes_per_s,
                growth_percent: row.growth_percent,
                batch_means: row.batch_means.to_vec(),
                frames: rec.frames(row.key.stack),
            })
            .collect(),
        not_steady: s.not_steady,
        too_noisy: (s.too_noisy.iter())
            .map(|key| JsonNoisy {
                class: key.class.name(),
                pid: key.pid,
                phase: key.phase.clone(),
                stack: key.stack,
                frames: rec.frames(key.stack),
            })
            .collect(),
    })
}

fn failures(rec: &Recorded) -> Vec<JsonFailure<'_>> {
    failures_by_count(rec)
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
        .collect()
}

fn torch_ooms(rec: &Recorded) -> Vec<JsonTorchOom> {
    rec.torch_ooms
        .iter()
        .map(|o| {
            let f = &o.figures;
            JsonTorchOom {
                t_s: o.t_s,
                pid: f.pid,
                device: f.device,
                requested: o.requested,
                device_free: o.device_free,
                reserved: f.reserved,
                allocated: f.allocated,
                pending: f.pending,
                holes: f.holes,
                hole_bytes: f.hole_bytes,
                largest_hole: f.largest_hole,
                fragmentation: fragmentation(f),
                stack: o.stack,
                frames: rec.frames(o.stack),
            }
        })
        .collect()
}

fn cuda_calls(rec: &Recorded) -> Vec<JsonCudaCalls<'_>> {
    rec.state
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
        .collect()
}

fn released(rec: &Recorded) -> Vec<JsonReleased> {
    by_amount(&rec.state.released)
        .into_iter()
        .map(|row| JsonReleased {
            pid: row.pid,
            bytes: row.amount,
            stack: row.stack,
            frames: rec.frames(row.stack),
        })
        .collect()
}

fn page_faults(rec: &Recorded) -> Vec<JsonFaults> {
    by_amount(&rec.state.faults)
        .into_iter()
        .map(|row| JsonFaults {
            pid: row.pid,
            faults: row.amount,
            bytes: row.amount * PAGE,
            stack: row.stack,
            frames: rec.frames(row.stack),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use serde_json::Value;
    use tracer_common::drop_cause;

    use crate::{
        model::PHASE_NONE,
        recording::STACK_LOST,
        views::{
            fixture::{self, CHURN_STACK, LEAKS},
            report::render_json,
        },
    };

    #[test]
    fn json_has_the_contract_fields_with_exact_figures() {
        let rec = fixture::recorded();
        let v: Value = serde_json::from_str(&render_json(&rec)).unwrap();
        assert_eq!(v["schema"], 2);
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
        let mut rec = fixture::empty(false);
        rec.state
            .lost_events
            .insert("undecodable_record".to_string(), 3);
        let v: Value = serde_json::from_str(&render_json(&rec)).unwrap();
        assert_eq!(v["lost_events"]["undecodable_record"], 3);
        assert_eq!(
            v["lost_events"].as_object().unwrap().len(),
            drop_cause::NAMES.len() + 1
        );
        assert_eq!(v["complete"], false);
        assert_eq!(v["stacks"], serde_json::json!([]));
        assert_eq!(v["totals"], serde_json::json!({}));
    }

    #[test]
    fn json_says_how_the_target_and_its_children_ended() {
        let mut rec = fixture::recorded();
        rec.exits.push(crate::recording::ProcessExit {
            signal: Some("SIGKILL".into()),
            oom_kill: true,
            ..crate::recording::ProcessExit::unknown(4242, 4.3)
        });
        let v: Value = serde_json::from_str(&render_json(&rec)).unwrap();
        assert_eq!(v["target_exit"]["pid"], 4242);
        assert_eq!(v["target_exit"]["signal"], "SIGKILL");
        assert_eq!(v["target_exit"]["oom_kill"], true);
        assert_eq!(v["target_exit"]["code"], Value::Null);
        let exits = v["exits"].as_array().unwrap();
        assert_eq!(exits.len(), 2);
        assert_eq!(
            (exits[0]["pid"].as_u64(), exits[0]["code"].as_i64()),
            (Some(4243), Some(0))
        );
        assert_eq!(v["stop_reason"], "duration elapsed");
        assert_eq!(v["write_failure"], Value::Null);
    }

    #[test]
    fn json_matches_golden() {
        fixture::assert_golden("report.json", &render_json(&fixture::recorded()));
    }
}
