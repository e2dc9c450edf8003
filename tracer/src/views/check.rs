//! The leak test's judgement (`alloctrace check`, and the report of a recording it made): the
//! traced live memory at the end of each batch of load after the warm-up, its growth from the
//! first batches to the last against a threshold, a noise guard, and the stacks that grew in
//! every batch. Rules in docs/accounting.md, "The leak test".

use std::collections::BTreeMap;

use serde::Serialize;

pub use crate::model::Thresholds;
use crate::model::{CellKey, Mark};

/// The label of the mark at the end of the warm-up.
pub const WARMUP_MARK: &str = "warm-up";
/// The label of the mark at the end of batch `i` (from 1).
pub fn batch_mark(i: usize) -> String {
    format!("batch {i}")
}

/// What the test concluded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    /// No growth past the threshold, and quiet enough to say so.
    Pass,
    /// Growth past the threshold, well above the noise.
    Leak,
    /// Too noisy to judge.
    TooNoisy,
}

impl Verdict {
    /// `alloctrace check`'s exit status.
    pub fn exit_code(self) -> u8 {
        match self {
            Verdict::Pass => 0,
            Verdict::Leak => 1,
            Verdict::TooNoisy => 2,
        }
    }
}

/// The figures the verdict rests on.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct GrowthAnalysis {
    /// Traced live bytes at the end of each batch.
    pub batches: Vec<u64>,
    /// Batches each average covers (the first and the last third, at least one).
    pub averaged: usize,
    pub initial_avg: f64,
    pub final_avg: f64,
    pub growth_bytes: f64,
    pub growth_percent: f64,
    /// The batches' spread around their least-squares line, percent of their mean.
    pub noise_percent: f64,
    pub thresholds: Thresholds,
    pub verdict: Verdict,
    /// Cells whose live bytes rose from each batch to the next, by growth from the warm-up's
    /// end to the last batch, most first.
    pub suspects: Vec<(CellKey, i128)>,
}

/// The judgement of a recording's marks (`WARMUP_MARK`, then the batches'); None without at
/// least two batch marks.
pub fn analyse(marks: &[Mark], thresholds: Thresholds) -> Option<GrowthAnalysis> {
    let batch_marks: Vec<&Mark> = (1..)
        .map_while(|i| marks.iter().find(|m| m.label == batch_mark(i)))
        .collect();
    if batch_marks.len() < 2 {
        return None;
    }
    let batches: Vec<u64> = batch_marks.iter().map(|m| m.traced_live).collect();
    let n = batches.len();
    let averaged = (n / 3).max(1);
    let mean = |v: &[u64]| v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64;
    let initial_avg = mean(&batches[..averaged]);
    let final_avg = mean(&batches[n - averaged..]);
    let growth_bytes = final_avg - initial_avg;
    let growth_percent = percent(growth_bytes, initial_avg);
    let noise_percent = percent(residual_spread(&batches), mean(&batches));
    let verdict =
        if noise_percent > thresholds.noise_percent && noise_percent * 2.0 > growth_percent.abs() {
            // The swings are as large as the growth, or larger than the limit with no clear
            // growth: nothing is concluded.
            Verdict::TooNoisy
        } else if growth_percent > thresholds.growth_percent {
            Verdict::Leak
        } else {
            Verdict::Pass
        };
    let warmup = marks.iter().find(|m| m.label == WARMUP_MARK);
    Some(GrowthAnalysis {
        batches,
        averaged,
        initial_avg,
        final_avg,
        growth_bytes,
        growth_percent,
        noise_percent,
        thresholds,
        verdict,
        suspects: rising_cells(warmup, &batch_marks),
    })
}

/// `part` as a percent of `whole` (0 when `whole` is).
fn percent(part: f64, whole: f64) -> f64 {
    if whole > 0.0 {
        100.0 * part / whole
    } else {
        0.0
    }
}

/// The standard deviation of `values` around their least-squares line (index against value):
/// a steady ramp has none, whatever its slope.
fn residual_spread(values: &[u64]) -> f64 {
    let n = values.len() as f64;
    let xs = (0..values.len()).map(|i| i as f64);
    let (mx, my) = (
        xs.clone().sum::<f64>() / n,
        values.iter().map(|&v| v as f64).sum::<f64>() / n,
    );
    let (mut sxy, mut sxx) = (0.0, 0.0);
    for (x, &y) in xs.clone().zip(values) {
        sxy += (x - mx) * (y as f64 - my);
        sxx += (x - mx) * (x - mx);
    }
    let slope = if sxx > 0.0 { sxy / sxx } else { 0.0 };
    let square: f64 = (xs.zip(values))
        .map(|(x, &y)| {
            let r = y as f64 - (my + slope * (x - mx));
            r * r
        })
        .sum();
    (square / n).sqrt()
}

/// The cells whose live bytes rose from each batch mark to the next, with their growth from the
/// warm-up mark (or the first batch) to the last, most first.
fn rising_cells(warmup: Option<&Mark>, batches: &[&Mark]) -> Vec<(CellKey, i128)> {
    let mut series: BTreeMap<&CellKey, Vec<u64>> = BTreeMap::new();
    for (i, mark) in batches.iter().enumerate() {
        for cell in &mark.cells {
            series
                .entry(&cell.key)
                .or_insert_with(|| vec![0; batches.len()])[i] = cell.live_bytes;
        }
    }
    let at_warmup = |key: &CellKey| -> u64 {
        (warmup.into_iter().flat_map(|m| &m.cells))
            .find(|c| c.key == *key)
            .map_or(0, |c| c.live_bytes)
    };
    let mut rising: Vec<(CellKey, i128)> = (series.into_iter())
        .filter(|(_, values)| values.windows(2).all(|w| w[1] > w[0]))
        .map(|(key, values)| {
            let from = match warmup {
                Some(_) => at_warmup(key),
                None => values[0],
            };
            let last = *values.last().expect("two batches at least");
            (key.clone(), i128::from(last) - i128::from(from))
        })
        .filter(|(_, growth)| *growth > 0)
        .collect();
    rising.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    rising
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Class, MarkCell};

    fn key(stack: u32) -> CellKey {
        CellKey {
            class: Class::Heap,
            pid: 7,
            phase: "none".into(),
            stack: Some(stack),
        }
    }

    /// Marks: the warm-up's, then one per batch, with `cells(i)` at batch `i` (0: warm-up).
    fn marks(totals: &[u64], cells: impl Fn(usize) -> Vec<(u32, u64)>) -> Vec<Mark> {
        let mark = |label: String, i: usize, traced_live| Mark {
            label,
            t_s: i as f64,
            traced_live,
            rss: None,
            cells: (cells(i).into_iter())
                .map(|(stack, live_bytes)| MarkCell {
                    key: key(stack),
                    live_bytes,
                })
                .collect(),
        };
        let mut all = vec![mark(WARMUP_MARK.to_string(), 0, totals[0])];
        for (i, &t) in totals.iter().enumerate().skip(1) {
            all.push(mark(batch_mark(i), i, t));
        }
        all
    }

    #[test]
    fn a_steady_leak_is_a_leak_and_its_stack_the_suspect() {
        // 100 KB of baseline, a cache that fills in the first two batches, 25.6 KB leaked per
        // batch.
        let cache = |i: usize| (i.min(2) * 50_000) as u64;
        let leak = |i: usize| (i * 25_600) as u64;
        let totals: Vec<u64> = (0..=10).map(|i| 100_000 + cache(i) + leak(i)).collect();
        let marks = marks(&totals, |i| vec![(1, 100_000), (2, cache(i)), (3, leak(i))]);
        let a = analyse(&marks, Thresholds::default()).unwrap();
        assert_eq!(a.batches.len(), 10);
        assert_eq!(a.averaged, 3);
        // Batches 1-3: 100000 + {50000, 100000, 100000} + {25600, 51200, 76800}.
        let close = |a: f64, b: f64| (a - b).abs() < 1e-6;
        assert!(
            close(a.initial_avg, 100_000.0 + 250_000.0 / 3.0 + 51_200.0),
            "{a:?}"
        );
        assert!(close(a.final_avg, 200_000.0 + 230_400.0), "{a:?}");
        assert_eq!(a.verdict, Verdict::Leak, "{a:?}");
        assert_eq!(a.suspects, [(key(3), 256_000)], "the cache levelled off");
        assert_eq!(a.verdict.exit_code(), 1);
    }

    #[test]
    fn a_flat_program_passes_and_a_noisy_one_is_not_judged() {
        let flat = marks(&[100_000; 11], |_| vec![(1, 100_000)]);
        let a = analyse(&flat, Thresholds::default()).unwrap();
        assert_eq!(
            (a.verdict, a.growth_percent, a.noise_percent),
            (Verdict::Pass, 0.0, 0.0)
        );
        assert!(a.suspects.is_empty());
        // Swinging by ±30 % around a flat line.
        let noisy: Vec<u64> = (0..=10)
            .map(|i| if i % 2 == 0 { 70_000 } else { 130_000 })
            .collect();
        let a = analyse(&marks(&noisy, |_| vec![]), Thresholds::default()).unwrap();
        assert_eq!(a.verdict, Verdict::TooNoisy, "{a:?}");
        assert_eq!(a.verdict.exit_code(), 2);
        // A ramp has no noise, whatever its slope.
        let ramp: Vec<u64> = (0..=10).map(|i| 100_000 + 10_000 * i).collect();
        let a = analyse(&marks(&ramp, |_| vec![]), Thresholds::default()).unwrap();
        assert!(a.noise_percent < 1e-9, "{a:?}");
    }

    #[test]
    fn fewer_than_two_batches_are_not_judged() {
        assert_eq!(
            analyse(&marks(&[1, 2], |_| vec![]), Thresholds::default()),
            None
        );
        assert_eq!(analyse(&[], Thresholds::default()), None);
    }
}
