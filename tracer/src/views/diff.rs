//! `alloctrace diff BEFORE AFTER`: two recordings compared (a server before and after an
//! upgrade, a configuration change, a longer run): live bytes per class, per stack (stacks matched
//! by class, phase and frames, as their names read: the recordings' stack numbers differ), and the
//! leak suspects of AFTER that BEFORE did not have, or that grow at least twice as fast there.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::{
    escape::for_terminal,
    model::{Class, PHASE_NONE},
    recording::Recorded,
    views::{human_bytes, human_delta, report::suspects},
};

/// Stacks listed in the text, by change.
const TEXT_TOP_STACKS: usize = 15;

/// A stack as both recordings name it: class, phase, frames.
type StackName = (Class, String, Vec<String>);

/// The comparison.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Diff {
    pub before: Side,
    pub after: Side,
    /// Every class live in either, with its live bytes in each.
    pub totals: Vec<ClassChange>,
    /// Every stack live in either, by the size of the change, the largest first.
    pub stacks: Vec<StackChange>,
    /// Leak suspects of AFTER that BEFORE did not have, or that grow at least twice as fast
    /// there: what the change made grow.
    pub new_growth: Vec<NewGrowth>,
}

/// One recording.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Side {
    pub command: String,
    pub duration_s: f64,
    /// Whether its leak suspects could be judged (long enough after the warm-up).
    pub judged: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ClassChange {
    pub class: Class,
    pub before: u64,
    pub after: u64,
    pub delta: i64,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StackChange {
    pub class: Class,
    pub phase: String,
    pub frames: Vec<String>,
    pub before: u64,
    pub after: u64,
    pub delta: i64,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct NewGrowth {
    pub class: Class,
    pub phase: String,
    pub frames: Vec<String>,
    pub bytes_per_s: f64,
    /// Its rate in BEFORE, where it was a suspect too; null when it was not.
    pub before_bytes_per_s: Option<f64>,
}

/// Compares `before` with `after`.
pub fn diff(before: &Recorded, after: &Recorded) -> Diff {
    let mut totals: BTreeMap<Class, (u64, u64)> = BTreeMap::new();
    for (class, t) in &before.state.totals {
        totals.entry(*class).or_default().0 = t.live_bytes;
    }
    for (class, t) in &after.state.totals {
        totals.entry(*class).or_default().1 = t.live_bytes;
    }
    let totals = (totals.into_iter())
        .filter(|(_, (b, a))| *b > 0 || *a > 0)
        .map(|(class, (before, after))| ClassChange {
            class,
            before,
            after,
            delta: signed(before, after),
        })
        .collect();
    let mut stacks: BTreeMap<StackName, (u64, u64)> = BTreeMap::new();
    for (name, live) in live_by_name(before) {
        stacks.entry(name).or_default().0 += live;
    }
    for (name, live) in live_by_name(after) {
        stacks.entry(name).or_default().1 += live;
    }
    let mut stacks: Vec<StackChange> = (stacks.into_iter())
        .filter(|(_, (b, a))| b != a)
        .map(|((class, phase, frames), (before, after))| StackChange {
            class,
            phase,
            frames,
            before,
            after,
            delta: signed(before, after),
        })
        .collect();
    stacks.sort_by(|a, b| {
        (b.delta.unsigned_abs().cmp(&a.delta.unsigned_abs()))
            .then_with(|| (a.class, &a.phase, &a.frames).cmp(&(b.class, &b.phase, &b.frames)))
    });
    Diff {
        before: side(before),
        after: side(after),
        totals,
        stacks,
        new_growth: new_growth(before, after),
    }
}

fn side(rec: &Recorded) -> Side {
    Side {
        command: rec.target.command.clone(),
        duration_s: rec.duration_s,
        judged: suspects(rec).is_some(),
    }
}

fn signed(before: u64, after: u64) -> i64 {
    (i128::from(after) - i128::from(before)).clamp(i64::MIN.into(), i64::MAX.into()) as i64
}

/// Live bytes by stack name, every process together.
fn live_by_name(rec: &Recorded) -> Vec<(StackName, u64)> {
    (rec.state.cells.iter())
        .filter(|(_, c)| c.live_bytes > 0)
        .map(|(k, c)| {
            (
                (k.class, k.phase.clone(), rec.frames(k.stack)),
                c.live_bytes,
            )
        })
        .collect()
}

/// AFTER's suspects that BEFORE lacks, or that grow at least twice as fast as there.
fn new_growth(before: &Recorded, after: &Recorded) -> Vec<NewGrowth> {
    let Some(after_suspects) = suspects(after) else {
        return Vec::new();
    };
    let rates_before: BTreeMap<StackName, f64> = (suspects(before).into_iter())
        .flat_map(|s| s.rows)
        .map(|r| {
            let name = (r.key.class, r.key.phase.clone(), before.frames(r.key.stack));
            (name, r.bytes_per_s)
        })
        .collect();
    (after_suspects.rows.iter())
        .filter_map(|r| {
            let name = (r.key.class, r.key.phase.clone(), after.frames(r.key.stack));
            let was = rates_before.get(&name).copied();
            let grew = was.is_none_or(|b| r.bytes_per_s >= 2.0 * b);
            grew.then_some(NewGrowth {
                class: name.0,
                phase: name.1,
                frames: name.2,
                bytes_per_s: r.bytes_per_s,
                before_bytes_per_s: was,
            })
        })
        .collect()
}

/// The comparison as text.
pub fn render_text(d: &Diff) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let side = |label: &str, s: &Side| {
        format!(
            "{label}: {} ({:.1} s{})\n",
            for_terminal(&s.command),
            s.duration_s,
            if s.judged {
                ""
            } else {
                ", too short to judge growth"
            }
        )
    };
    out.push_str(&side("before", &d.before));
    out.push_str(&side("after ", &d.after));
    let verdict = match (d.new_growth.len(), d.before.judged && d.after.judged) {
        (0, true) => {
            "no new growth: nothing grows in AFTER that did not grow as fast in BEFORE".to_string()
        }
        (0, false) => "growth not compared: a recording is too short after its warm-up".into(),
        (n, _) => format!(
            "grows after the change: {n} stack{} grow{} in AFTER that did not, or half as fast, \
             in BEFORE",
            if n == 1 { "" } else { "s" },
            if n == 1 { "s" } else { "" }
        ),
    };
    let _ = writeln!(out, "\nVerdict: {verdict}");
    for g in &d.new_growth {
        let was = match g.before_bytes_per_s {
            Some(b) => format!("{}/s before", human_bytes(b.round() as u64)),
            None => "no suspect before".to_string(),
        };
        let _ = writeln!(
            out,
            "  {}/s ({was})  {}{}: {}",
            human_bytes(g.bytes_per_s.round() as u64),
            g.class.name(),
            phase_suffix(&g.phase),
            frames_line(&g.frames)
        );
    }
    let _ = writeln!(out, "\nLive at the end, by class");
    let _ = writeln!(
        out,
        "  {:<19} {:>12} {:>12} {:>13}",
        "class", "before", "after", "change"
    );
    for t in &d.totals {
        let _ = writeln!(
            out,
            "  {:<19} {:>12} {:>12} {:>13}",
            t.class.name(),
            human_bytes(t.before),
            human_bytes(t.after),
            human_delta(i128::from(t.delta))
        );
    }
    let _ = writeln!(
        out,
        "\nLive at the end, by stack: the largest changes ({} of {})",
        d.stacks.len().min(TEXT_TOP_STACKS),
        d.stacks.len()
    );
    for s in d.stacks.iter().take(TEXT_TOP_STACKS) {
        let _ = writeln!(
            out,
            "  {:>12}  ({} → {})  {}{}: {}",
            human_delta(i128::from(s.delta)),
            human_bytes(s.before),
            human_bytes(s.after),
            s.class.name(),
            phase_suffix(&s.phase),
            frames_line(&s.frames)
        );
    }
    out
}

fn phase_suffix(phase: &str) -> String {
    if phase == PHASE_NONE {
        String::new()
    } else {
        format!(" [{}]", for_terminal(phase))
    }
}

/// The first frames, escaped for a terminal.
fn frames_line(frames: &[String]) -> String {
    const SHOWN: usize = 6;
    let mut parts: Vec<String> = (frames.iter().take(SHOWN))
        .map(|f| for_terminal(f).into_owned())
        .collect();
    if frames.len() > SHOWN {
        parts.push(format!("… ({} more)", frames.len() - SHOWN));
    }
    parts.join(" ← ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        model::{CellKey, SeriesPoint, Stack, StackCounters},
        recording::batches::SeriesBatches,
        views::fixture::recorded,
    };

    /// A recording whose stack `frames` (index 50) rose by `rate` bytes a second for 12 s.
    fn with_growth(frames: &[&str], rate: u64) -> Recorded {
        let mut rec = recorded();
        rec.stacks.insert(
            50,
            Stack {
                index: 50,
                frames: frames.iter().map(|f| f.to_string()).collect(),
            },
        );
        let key = CellKey {
            class: Class::Heap,
            pid: 7,
            phase: PHASE_NONE.into(),
            stack: Some(50),
        };
        let series: Vec<SeriesPoint> = (0..12)
            .map(|t| SeriesPoint {
                t_s: t,
                key: key.clone(),
                live_bytes: rate * t,
                live_count: t,
            })
            .collect();
        let counters = StackCounters {
            live_bytes: rate * 11,
            live_count: 11,
            allocated_bytes: rate * 11,
            allocated_count: 11,
            ..StackCounters::default()
        };
        rec.state.cells.insert(key, counters);
        rec.state.totals.entry(Class::Heap).or_default().live_bytes += rate * 11;
        rec.duration_s = 12.0;
        rec.batches = SeriesBatches::from_points(&series, 12.0);
        rec
    }

    #[test]
    fn a_stack_that_grows_faster_after_the_change_is_new_growth() {
        let before = with_growth(&["remember_request", "serve"], 1000);
        let after = with_growth(&["remember_request", "serve"], 3000);
        let d = diff(&before, &after);
        assert_eq!(d.new_growth.len(), 1, "{d:?}");
        let g = &d.new_growth[0];
        assert_eq!(g.frames, ["remember_request", "serve"]);
        let rate = |r: f64| (r - r.round()).abs() < 1e-6;
        assert!(rate(g.bytes_per_s) && rate(g.before_bytes_per_s.unwrap()));
        assert!((g.bytes_per_s / g.before_bytes_per_s.unwrap() - 3.0).abs() < 1e-9);
        // The stack's change leads the list, matched by name across the recordings.
        assert_eq!(d.stacks[0].frames, ["remember_request", "serve"]);
        assert_eq!(d.stacks[0].delta, 22_000);
        let heap = d.totals.iter().find(|t| t.class == Class::Heap).unwrap();
        assert_eq!(heap.delta, 22_000);
        let text = render_text(&d);
        assert!(
            text.contains("Verdict: grows after the change: 1 stack grows"),
            "{text}"
        );
        // The same rate is no new growth.
        let same = diff(&before, &with_growth(&["remember_request", "serve"], 1500));
        assert!(same.new_growth.is_empty(), "{same:?}");
        assert!(render_text(&same).contains("Verdict: no new growth"));
        // A stack BEFORE never had.
        let other = diff(&before, &with_growth(&["cache_fill", "serve"], 10));
        assert_eq!(other.new_growth[0].before_bytes_per_s, None);
    }
}
