//! The recording classified, with the evidence for each class: the categories of a memory-leak
//! triage (ends in an OOM; leaks; grows while serving, or without traffic; too noisy to judge;
//! no leak), from the deaths, the OOMs and failed allocations, the leak suspects and their
//! phases. Rules in docs/accounting.md, "The verdict".

use std::collections::BTreeMap;

use serde::Serialize;

use super::{analysis::deaths, suspects::suspects};
use crate::{
    model::{CellKey, Class, PHASE_IDLE, SERVING_PHASES, request_phase},
    recording::Recorded,
    views::{
        check::{self, Verdict},
        count_of,
    },
};

/// A category of the triage.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Category {
    /// A traced process was killed by the OOM killer, or an allocation failed for want of
    /// memory (PyTorch's caching allocator, the CUDA driver, malloc).
    EndsInOom,
    /// Allocations failed, and the live memory rose then and did not come back: an error path
    /// that leaks.
    ErrorInduced,
    /// Live memory rose in every batch after the warm-up.
    Leaks,
    /// It rose in a serving phase: it scales with traffic.
    GrowsWhileServing,
    /// It rose outside every serving phase (phases known).
    GrowsWithoutTraffic,
    /// Stacks rose in every batch by less than they swing within one.
    TooNoisy,
    /// Nothing rose in every batch after the warm-up.
    NoLeak,
    /// Too short after the warm-up to judge growth.
    NotJudged,
}

/// One category with what it rests on.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Finding {
    pub category: Category,
    /// One line each.
    pub evidence: Vec<String>,
}

/// The recording's categories, the gravest first.
pub fn classify(rec: &Recorded) -> Vec<Finding> {
    let mut findings = Vec::new();
    let oom = oom_evidence(rec);
    if !oom.is_empty() {
        findings.push(Finding {
            category: Category::EndsInOom,
            evidence: oom,
        });
    }
    let errors = error_induced(rec);
    if !errors.is_empty() {
        findings.push(Finding {
            category: Category::ErrorInduced,
            evidence: errors,
        });
    }
    // A leak test's recording (`alloctrace check`) is judged by its batches.
    if let Some(a) = rec.check.and_then(|t| check::analyse(&rec.marks, t)) {
        let (category, what, figure) = match a.verdict {
            Verdict::Leak => (Category::Leaks, "grew", a.growth_percent),
            Verdict::Pass => (Category::NoLeak, "grew", a.growth_percent),
            Verdict::TooNoisy => (Category::TooNoisy, "swung by", a.noise_percent),
        };
        let mut evidence = vec![format!(
            "the leak test: the traced live memory {what} {figure:.1} % over {} batches \
             (threshold {} %, noise {:.1} %)",
            a.batches.len(),
            a.thresholds.growth_percent,
            a.noise_percent
        )];
        if !a.suspects.is_empty() {
            evidence.push(format!(
                "{} rose in every batch",
                count_of(a.suspects.len() as u64, "stack")
            ));
        }
        findings.push(Finding { category, evidence });
        return findings;
    }
    let Some(s) = suspects(rec) else {
        findings.push(Finding {
            category: Category::NotJudged,
            evidence: vec!["under 4 s of the recording after its warm-up".to_string()],
        });
        return findings;
    };
    let window = format!("{:.0} s to {:.0} s", s.from_s, s.to_s);
    if s.rows.is_empty() {
        let category = if s.too_noisy.is_empty() {
            Category::NoLeak
        } else {
            Category::TooNoisy
        };
        let evidence = match category {
            Category::TooNoisy => vec![format!(
                "{} rose in every batch of {window} by less than it swings within one",
                count_of(s.too_noisy.len() as u64, "stack")
            )],
            _ => vec![format!(
                "no stack's live memory rose in every batch of {window}"
            )],
        };
        findings.push(Finding { category, evidence });
        return findings;
    }
    let total: u64 = s.rows.iter().map(|r| r.growth).sum();
    let rate: f64 = s.rows.iter().map(|r| r.bytes_per_s).sum();
    findings.push(Finding {
        category: Category::Leaks,
        evidence: vec![format!(
            "{} rose in every batch of {window}: +{} B, {:.0} B/s together",
            count_of(s.rows.len() as u64, "stack"),
            total,
            rate
        )],
    });
    // Where the suspects were allocated: in a serving phase, or (phases known) outside them.
    let cases = [
        (true, Category::GrowsWhileServing, "in a serving phase"),
        (
            false,
            Category::GrowsWithoutTraffic,
            "outside the serving phases",
        ),
    ];
    for (serving, category, place) in cases {
        let keys: Vec<&CellKey> = (s.rows.iter().map(|r| r.key))
            .filter(|k| SERVING_PHASES.contains(&k.phase.as_str()) == serving)
            .collect();
        if keys.is_empty() || (!serving && rec.phases.is_none()) {
            continue;
        }
        let mut evidence = vec![format!(
            "{} of them allocated {place} ({})",
            count_of(keys.len() as u64, "stack"),
            phase_list(&keys)
        )];
        // Per request: their growth over the requests' entries in the judged part.
        let counted = request_phase(&rec.phase_activity);
        let requests: u64 = (rec.phase_activity.iter())
            .filter(|a| Some(a.phase.as_str()) == counted)
            .filter(|a| (a.t_s as f64) >= s.from_s && (a.t_s as f64) < s.to_s)
            .map(|a| a.entries)
            .sum();
        let idle = keys.iter().filter(|k| k.phase == PHASE_IDLE).count() as u64;
        if !serving && idle > 0 {
            evidence.push(format!(
                "{} allocated while the process was idle: no request in flight",
                count_of(idle, "stack")
            ));
        }
        if let (true, Some(phase)) = (serving && requests > 0, counted) {
            let growth: u64 = (s.rows.iter())
                .filter(|r| keys.contains(&r.key))
                .map(|r| r.growth)
                .sum();
            evidence.push(format!(
                "about {} B per request: +{growth} B over {requests} entries of {phase}",
                growth / requests
            ));
        }
        findings.push(Finding { category, evidence });
    }
    if !s.too_noisy.is_empty() {
        findings.push(Finding {
            category: Category::TooNoisy,
            evidence: vec![format!(
                "{} more rose by less than they swing: not judged",
                count_of(s.too_noisy.len() as u64, "stack")
            )],
        });
    }
    findings
}

/// What says the memory ran out: deaths by the OOM killer, PyTorch's OOMs, allocations that
/// failed for want of memory.
fn oom_evidence(rec: &Recorded) -> Vec<String> {
    let mut evidence: Vec<String> = (deaths(rec).into_iter())
        .filter(|d| d.oom_kill)
        .map(|d| format!("PID {} killed by the OOM killer at {:.1} s", d.pid, d.t_s))
        .collect();
    if let Some(first) = rec.torch_ooms.first() {
        evidence.push(format!(
            "PyTorch's caching allocator ran out {} (first at {} s, {} B asked)",
            count_of(rec.torch_ooms.len() as u64, "time"),
            first.t_s,
            first.requested
        ));
    }
    // A request of 16 TiB or more is a bad size, not a machine out of memory.
    let out_of_memory = [
        "ENOMEM",
        "CUDA_ERROR_OUT_OF_MEMORY",
        "cudaErrorMemoryAllocation",
    ];
    let failed: u64 = (rec.state.failures.iter())
        .filter(|(k, _)| out_of_memory.contains(&k.error.as_str()) && k.size < 1 << 44)
        .map(|(_, n)| n)
        .sum();
    if failed > 0 {
        evidence.push(format!(
            "{} failed for want of memory",
            count_of(failed as usize as u64, "allocation")
        ));
    }
    evidence
}

/// Failures followed by growth that stayed: at each second with failed allocations (not the
/// teardown's), the traced live memory of the classes that can leak rose from the second before
/// to the second after, and never fell back by half that rise afterwards.
fn error_induced(rec: &Recorded) -> Vec<String> {
    let Some(last) = rec.totals_series.iter().map(|p| p.t_s).max() else {
        return Vec::new();
    };
    // Each second's total, from the classes' step functions.
    let mut totals = vec![0u64; last as usize + 2];
    let mut current: BTreeMap<Class, u64> = BTreeMap::new();
    let mut points = rec
        .totals_series
        .iter()
        .filter(|p| p.class.can_leak())
        .peekable();
    for (t, total) in totals.iter_mut().enumerate() {
        while let Some(p) = points.next_if(|p| p.t_s <= t as u64) {
            current.insert(p.class, p.live_bytes);
        }
        *total = current.values().sum();
    }
    let at = |t: u64| totals[(t as usize).min(totals.len() - 1)];
    let mut by_second: BTreeMap<u64, (u64, &str, &str)> = BTreeMap::new();
    for f in rec
        .failure_seconds
        .iter()
        .filter(|f| f.error != "CUDA_ERROR_DEINITIALIZED")
    {
        let e = by_second.entry(f.t_s).or_insert((0, &f.function, &f.error));
        e.0 += f.count;
    }
    let mut evidence = Vec::new();
    for (&t, &(n, function, error)) in &by_second {
        let (before, after) = (at(t.saturating_sub(1)), at(t + 1));
        if after <= before {
            continue;
        }
        let rise = after - before;
        let lowest_since = (t + 1..=last + 1).map(at).min().unwrap_or(after);
        if lowest_since >= before + rise / 2 {
            evidence.push(format!(
                "{} at {t} s ({function} → {error}); the traced live memory rose by {rise} B \
                 then and did not come back",
                count_of(n, "failed allocation")
            ));
        }
    }
    evidence
}

/// The distinct phases of `keys`, in order.
fn phase_list(keys: &[&CellKey]) -> String {
    let mut phases: Vec<&str> = keys.iter().map(|k| k.phase.as_str()).collect();
    phases.sort_unstable();
    phases.dedup();
    phases.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        model::{Class, FailureKey, PHASE_NONE, SeriesPoint},
        recording::batches::SeriesBatches,
        views::fixture::recorded,
    };

    fn key(phase: &str, stack: u32) -> CellKey {
        CellKey {
            class: Class::Heap,
            pid: 7,
            phase: phase.into(),
            stack: Some(stack),
        }
    }

    /// A recording of 12 s (no OOM, no failure) where each of `growing` rose by 1000 B a
    /// second, and a stack stayed flat.
    fn growing(keys: &[CellKey]) -> Recorded {
        let mut rec = recorded();
        rec.torch_ooms.clear();
        rec.state.failures.clear();
        let flat = key(PHASE_NONE, 99);
        let series: Vec<SeriesPoint> = (0..12)
            .flat_map(|t| {
                let point = move |k: &CellKey, live_bytes| SeriesPoint {
                    t_s: t,
                    key: k.clone(),
                    live_bytes,
                    live_count: 1,
                };
                let mut points: Vec<SeriesPoint> =
                    keys.iter().map(|k| point(k, 1000 * t)).collect();
                points.push(point(&flat, 5000));
                points
            })
            .collect();
        rec.duration_s = 12.0;
        rec.batches = SeriesBatches::from_points(&series, rec.duration_s);
        rec
    }

    fn categories(rec: &Recorded) -> Vec<Category> {
        classify(rec).iter().map(|f| f.category).collect()
    }

    #[test]
    fn growth_is_a_leak_and_its_phase_says_whether_it_scales_with_traffic() {
        let mut rec = growing(&[key("serve", 1), key("load", 2), key(PHASE_IDLE, 3)]);
        assert_eq!(
            categories(&rec),
            [
                Category::Leaks,
                Category::GrowsWhileServing,
                Category::GrowsWithoutTraffic
            ]
        );
        assert_eq!(
            classify(&rec)[2].evidence,
            [
                "2 stacks of them allocated outside the serving phases (idle, load)",
                "1 stack allocated while the process was idle: no request in flight"
            ]
        );
        let evidence = &classify(&rec)[1].evidence[0];
        assert_eq!(
            evidence,
            "1 stack of them allocated in a serving phase (serve)"
        );
        // With the requests counted (entries by second), the growth per request.
        rec.phase_activity = (0..12)
            .map(|t_s| crate::model::PhaseActivity {
                t_s,
                phase: "serve".into(),
                entries: 10,
            })
            .collect();
        let findings = classify(&rec);
        // Judged from 4 s to 12 s: 80 entries; the stack's means rose 1000 B a second over the
        // 6 s between the first and last batches' middles: +6000 B.
        assert_eq!(
            findings[1].evidence[1],
            "about 75 B per request: +6000 B over 80 entries of serve"
        );
        // Without phases, where it grew is not known.
        rec = growing(&[key(PHASE_NONE, 1)]);
        rec.phases = None;
        assert_eq!(categories(&rec), [Category::Leaks]);
    }

    #[test]
    fn an_oom_comes_first_and_a_flat_recording_has_no_leak() {
        let mut rec = growing(&[]);
        rec.phases = None;
        assert_eq!(categories(&rec), [Category::NoLeak]);
        rec.state.failures.insert(
            FailureKey {
                class: Class::Heap,
                pid: 7,
                function: "malloc".into(),
                size: 4096,
                error: "ENOMEM".into(),
                stack: None,
            },
            3,
        );
        let findings = classify(&rec);
        assert_eq!(findings[0].category, Category::EndsInOom);
        assert_eq!(
            findings[0].evidence,
            ["3 allocations failed for want of memory"]
        );
        // 2^50 bytes asked: a bad size, not a full machine.
        rec.state.failures = [(k_huge(), 1)].into_iter().collect();
        assert_eq!(categories(&rec), [Category::NoLeak]);
        rec.duration_s = 3.0;
        rec.batches = None;
        assert_eq!(categories(&rec), [Category::NotJudged]);
    }

    /// Growth at failures that stays is error-induced; growth that comes back is not; the
    /// teardown's failures are no error path.
    #[test]
    fn growth_that_stays_after_failures_is_error_induced() {
        use crate::{model::FailureSecond, recording::TotalsPoint};
        let mut rec = growing(&[]);
        let heap = |t_s, live_bytes| TotalsPoint {
            t_s,
            class: Class::Heap,
            live_bytes,
            live_count: 1,
        };
        let failed = |t_s, error: &str| FailureSecond {
            t_s,
            class: Class::Cuda,
            function: "cuMemAlloc_v2".into(),
            error: error.into(),
            count: 2,
        };
        rec.totals_series = vec![heap(0, 100), heap(3, 5100), heap(8, 5000)];
        rec.failure_seconds = vec![failed(3, "CUDA_ERROR_OUT_OF_MEMORY")];
        let findings = classify(&rec);
        let errors = findings
            .iter()
            .find(|f| f.category == Category::ErrorInduced);
        assert_eq!(
            errors.unwrap().evidence,
            [
                "2 failed allocations at 3 s (cuMemAlloc_v2 → CUDA_ERROR_OUT_OF_MEMORY); the \
              traced live memory rose by 5000 B then and did not come back"
            ]
        );
        // It came back: no error path kept it.
        rec.totals_series.push(heap(9, 100));
        assert!(!categories(&rec).contains(&Category::ErrorInduced));
        // The teardown's failures are not looked at.
        rec.totals_series.pop();
        rec.failure_seconds = vec![failed(3, "CUDA_ERROR_DEINITIALIZED")];
        assert!(!categories(&rec).contains(&Category::ErrorInduced));
    }

    fn k_huge() -> FailureKey {
        FailureKey {
            class: Class::Heap,
            pid: 7,
            function: "malloc".into(),
            size: 1 << 50,
            error: "ENOMEM".into(),
            stack: None,
        }
    }
}
