//! `alloctrace timeline`: an SVG chart of live bytes by class over the recording, with the
//! target's resident memory, bands where the phases of native rules were entered (requests,
//! for a serving phase), and marks where something happened: a death (the OOM killer's
//! included), PyTorch's allocator running out, the batches of `alloctrace check`. Drawn by hand:
//! one step line a class (fixed colours), axes in bytes and seconds. Everything from the
//! recording is escaped for XML.

use std::{collections::BTreeMap, fmt::Write as _};

use crate::{
    escape::for_xml,
    model::Class,
    recording::Recorded,
    views::{human_bytes, target_pids},
};

const WIDTH: f64 = 1200.0;
const HEIGHT: f64 = 560.0;
/// The plot inside the margins (left: the byte labels; bottom: the seconds and the legend).
const LEFT: f64 = 90.0;
const RIGHT: f64 = 1180.0;
const TOP: f64 = 70.0;
const BOTTOM: f64 = 440.0;

/// A class's colour, the same in every chart.
fn colour(class: Class) -> &'static str {
    match class {
        Class::Heap => "#d62728",
        Class::Mmap => "#1f77b4",
        Class::MmapShared => "#17becf",
        Class::MmapFile => "#7f7f7f",
        Class::ThreadStack => "#bcbd22",
        Class::PythonArena => "#9467bd",
        Class::Cuda => "#2ca02c",
        Class::CudaPool => "#98df8a",
        Class::CudaPinned => "#ff7f0e",
        Class::CudaManaged => "#ffbb78",
        Class::CudaVmm => "#8c564b",
        Class::CudaGraph => "#c49c94",
        Class::GpuUntraced => "#e377c2",
        Class::CudaIpc | Class::CudaRegistered => "#c7c7c7",
        Class::Torch | Class::TorchCached | Class::TorchPinned | Class::TorchPinnedCached => {
            "#aec7e8"
        }
    }
}

/// A vertical mark: when, what, and whether it is an alarm (a death, an OOM).
struct Mark {
    t_s: f64,
    label: String,
    alarm: bool,
}

/// The chart of `rec`.
pub fn render(rec: &Recorded) -> String {
    let mut lines: BTreeMap<Class, Vec<(f64, u64)>> = BTreeMap::new();
    for p in &rec.totals_series {
        // The classes that are memory of their own (not views inside others, not another
        // process's), file mappings and thread stacks included: they are part of RSS.
        if p.class.can_leak() || matches!(p.class, Class::MmapFile | Class::ThreadStack) {
            lines
                .entry(p.class)
                .or_default()
                .push((p.t_s as f64, p.live_bytes));
        }
    }
    lines.retain(|_, points| points.iter().any(|&(_, b)| b > 0));
    let target = rec.target.pids.first().copied();
    let rss: Vec<(f64, u64)> = (rec.rss.iter())
        .filter(|s| Some(s.pid) == target)
        .map(|s| (s.t_s as f64, s.rss))
        .collect();
    let end = rec.duration_s.max(1.0);
    let top = (lines.values().flatten().chain(&rss))
        .map(|&(_, b)| b)
        .max()
        .unwrap_or(0)
        .max(1);
    let scale = nice_ceiling(top);
    let x = |t: f64| LEFT + (RIGHT - LEFT) * (t / end).clamp(0.0, 1.0);
    let y = |b: u64| BOTTOM - (BOTTOM - TOP) * (b as f64 / scale as f64);

    let mut svg = String::new();
    let _ = writeln!(
        svg,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{HEIGHT}\" \
         viewBox=\"0 0 {WIDTH} {HEIGHT}\" font-family=\"Verdana, sans-serif\" font-size=\"12\">"
    );
    let _ = writeln!(
        svg,
        "<rect x=\"0\" y=\"0\" width=\"{WIDTH}\" height=\"{HEIGHT}\" fill=\"#ffffff\"/>"
    );
    let _ = writeln!(
        svg,
        "<text x=\"{}\" y=\"28\" font-size=\"17\" text-anchor=\"middle\">Live memory by class \
         over time</text>",
        WIDTH / 2.0
    );
    let subtitle = format!(
        "{} ({}), {:.1} s",
        rec.target.command,
        target_pids(rec),
        rec.duration_s
    );
    let _ = writeln!(
        svg,
        "<text x=\"{}\" y=\"50\" text-anchor=\"middle\" fill=\"#555555\">{}</text>",
        WIDTH / 2.0,
        for_xml(&subtitle)
    );
    axes(&mut svg, scale, end, &x, &y);
    for mark in marks(rec) {
        let (colour, dash) = if mark.alarm {
            ("#d62728", "")
        } else {
            ("#999999", " stroke-dasharray=\"3,3\"")
        };
        let at = x(mark.t_s);
        let _ = writeln!(
            svg,
            "<line x1=\"{at:.1}\" y1=\"{TOP}\" x2=\"{at:.1}\" y2=\"{BOTTOM}\" stroke=\"{colour}\"{dash}><title>{}</title></line>",
            for_xml(&mark.label)
        );
        if mark.alarm {
            let _ = writeln!(
                svg,
                "<text x=\"{:.1}\" y=\"{}\" fill=\"{colour}\" font-size=\"11\">{}</text>",
                at + 3.0,
                TOP + 12.0,
                for_xml(&mark.label)
            );
        }
    }
    let phases = phase_bands(&mut svg, rec, &x);
    for (class, points) in &lines {
        let _ = writeln!(
            svg,
            "<polyline fill=\"none\" stroke=\"{}\" stroke-width=\"2\" points=\"{}\"><title>{}</title></polyline>",
            colour(*class),
            steps(points, end, &x, &y),
            class.name()
        );
    }
    if !rss.is_empty() {
        let _ = writeln!(
            svg,
            "<polyline fill=\"none\" stroke=\"#000000\" stroke-width=\"1.5\" \
             stroke-dasharray=\"6,3\" points=\"{}\"><title>RSS</title></polyline>",
            steps(&rss, end, &x, &y)
        );
    }
    legend(&mut svg, lines.keys().copied(), !rss.is_empty(), &phases);
    svg.push_str("</svg>\n");
    svg
}

/// The axes: bytes on the left (five steps up to `scale`), seconds below.
fn axes(svg: &mut String, scale: u64, end: f64, x: &impl Fn(f64) -> f64, y: &impl Fn(u64) -> f64) {
    let _ = writeln!(
        svg,
        "<path d=\"M{LEFT},{TOP} V{BOTTOM} H{RIGHT}\" fill=\"none\" stroke=\"#333333\"/>"
    );
    for i in 0..=5 {
        let bytes = scale / 5 * i;
        let at = y(bytes);
        let _ = writeln!(
            svg,
            "<line x1=\"{LEFT}\" y1=\"{at:.1}\" x2=\"{RIGHT}\" y2=\"{at:.1}\" stroke=\"#eeeeee\"/>\
             <text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            LEFT - 6.0,
            at + 4.0,
            human_bytes(bytes)
        );
    }
    let step = nice_step(end);
    let mut t = 0.0;
    while t <= end + 1e-9 {
        let at = x(t);
        let _ = writeln!(
            svg,
            "<line x1=\"{at:.1}\" y1=\"{BOTTOM}\" x2=\"{at:.1}\" y2=\"{}\" stroke=\"#333333\"/>\
             <text x=\"{at:.1}\" y=\"{}\" text-anchor=\"middle\">{} s</text>",
            BOTTOM + 5.0,
            BOTTOM + 20.0,
            trim(t)
        );
        t += step;
    }
}

/// Colours of the phase bands, by a phase's rank of first entry.
const PHASE_COLOURS: [&str; 6] = [
    "#ffd54f", "#81c784", "#64b5f6", "#ba68c8", "#ff8a65", "#a1887f",
];

/// A band a phase along the plot's top: a box over each second the phase was entered in, its
/// entries in the box's title; for a Python function's phase (no entry count), over each second
/// its memory changed. The phases drawn, in band order.
fn phase_bands(svg: &mut String, rec: &Recorded, x: &impl Fn(f64) -> f64) -> Vec<String> {
    let mut phases: Vec<String> = Vec::new();
    let named = (rec.phase_activity.iter().map(|a| &a.phase))
        .chain(rec.phase_seconds.iter().map(|(_, p)| p));
    for phase in named {
        if !phases.contains(phase) {
            phases.push(phase.clone());
        }
    }
    for (t_s, phase) in &rec.phase_seconds {
        let row = phases.iter().position(|p| p == phase).unwrap_or(0);
        let (from, to) = (x(*t_s as f64), x(*t_s as f64 + 1.0));
        let _ = writeln!(
            svg,
            "<rect x=\"{from:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"8\" fill=\"{}\" \
             fill-opacity=\"0.5\"><title>phase {}: its memory changed at {} s (a Python \
             function's phase: calls not counted)</title></rect>",
            TOP + 2.0 + 10.0 * row as f64,
            (to - from).max(1.0),
            PHASE_COLOURS[row % PHASE_COLOURS.len()],
            for_xml(phase),
            t_s
        );
    }
    for a in &rec.phase_activity {
        let row = phases.iter().position(|p| *p == a.phase).unwrap_or(0);
        let (from, to) = (x(a.t_s as f64), x(a.t_s as f64 + 1.0));
        let _ = writeln!(
            svg,
            "<rect x=\"{from:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"8\" fill=\"{}\" \
             fill-opacity=\"0.8\"><title>phase {}: {} entries at {} s</title></rect>",
            TOP + 2.0 + 10.0 * row as f64,
            (to - from).max(1.0),
            PHASE_COLOURS[row % PHASE_COLOURS.len()],
            for_xml(&a.phase),
            a.entries,
            a.t_s
        );
    }
    phases
}

/// The legend under the plot: a swatch and a name per class, then RSS, then the phases.
fn legend(svg: &mut String, classes: impl Iterator<Item = Class>, rss: bool, phases: &[String]) {
    let mut entries: Vec<(&str, String, &str)> = classes
        .map(|c| (colour(c), c.name().to_string(), ""))
        .collect();
    if rss {
        entries.push(("#000000", "RSS".into(), " stroke-dasharray=\"6,3\""));
    }
    for (i, phase) in phases.iter().enumerate() {
        let name = format!("phase {}", for_xml(phase));
        entries.push((
            PHASE_COLOURS[i % PHASE_COLOURS.len()],
            name,
            " stroke-width=\"8\"",
        ));
    }
    for (i, (colour, name, dash)) in entries.iter().enumerate() {
        let (col, row) = (i % 6, i / 6);
        let (lx, ly) = (LEFT + 180.0 * col as f64, BOTTOM + 50.0 + 20.0 * row as f64);
        let _ = writeln!(
            svg,
            "<line x1=\"{lx}\" y1=\"{ly}\" x2=\"{}\" y2=\"{ly}\" stroke=\"{colour}\" \
             stroke-width=\"3\"{dash}/><text x=\"{}\" y=\"{}\">{name}</text>",
            lx + 24.0,
            lx + 30.0,
            ly + 4.0
        );
    }
}

/// What happened when: deaths (the OOM killer's), PyTorch's OOMs, the check's marks.
fn marks(rec: &Recorded) -> Vec<Mark> {
    let mut marks: Vec<Mark> = (rec.exits.iter())
        .filter(|e| e.is_death())
        .map(|e| Mark {
            t_s: e.t_s,
            label: match (e.oom_kill, &e.signal) {
                (true, _) => format!("PID {} OOM-killed", e.pid),
                (false, Some(s)) => format!("PID {} killed by {s}", e.pid),
                (false, None) => format!("PID {} died", e.pid),
            },
            alarm: true,
        })
        .collect();
    marks.extend(rec.torch_ooms.iter().map(|o| Mark {
        t_s: o.t_s as f64,
        label: format!("PyTorch OOM ({} asked)", human_bytes(o.requested)),
        alarm: true,
    }));
    // Failed allocations, one mark a second with failures (teardown's, after the driver was
    // deinitialized, are no alarm).
    let mut failed: Vec<(u64, u64, bool)> = Vec::new();
    for f in &rec.failure_seconds {
        let teardown = f.error == "CUDA_ERROR_DEINITIALIZED";
        match failed.last_mut() {
            Some((t, n, all_teardown)) if *t == f.t_s => {
                *n += f.count;
                *all_teardown &= teardown;
            }
            _ => failed.push((f.t_s, f.count, teardown)),
        }
    }
    marks.extend(failed.into_iter().map(|(t_s, n, teardown)| Mark {
        t_s: t_s as f64,
        label: format!("{n} failed allocation{}", if n == 1 { "" } else { "s" }),
        alarm: !teardown,
    }));
    marks.extend(rec.marks.iter().map(|m| Mark {
        t_s: m.t_s,
        label: m.label.clone(),
        alarm: false,
    }));
    marks
}

/// A step function's points: each value holds until the next point, the last to `end`.
fn steps(
    points: &[(f64, u64)],
    end: f64,
    x: &impl Fn(f64) -> f64,
    y: &impl Fn(u64) -> f64,
) -> String {
    let mut out = String::new();
    for (i, &(t, b)) in points.iter().enumerate() {
        let next = points.get(i + 1).map_or(end, |p| p.0);
        let _ = write!(out, "{:.1},{:.1} {:.1},{:.1} ", x(t), y(b), x(next), y(b));
    }
    out.trim_end().to_string()
}

/// The smallest of 1, 2 or 5 times a power of two's 1024 multiples (bytes) at or above `n`, so
/// that five ticks fall on round figures.
fn nice_ceiling(n: u64) -> u64 {
    let mut unit = 1u64;
    while unit.saturating_mul(1024) <= n {
        unit *= 1024;
    }
    for m in [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 1024] {
        let candidate = unit.saturating_mul(m);
        if candidate >= n {
            return candidate;
        }
    }
    unit.saturating_mul(1024)
}

/// A step of 1, 2 or 5 times a power of ten giving at most ten ticks over `end` seconds.
fn nice_step(end: f64) -> f64 {
    let mut step = 0.1;
    loop {
        for m in [1.0, 2.0, 5.0] {
            if end / (step * m) <= 10.0 {
                return step * m;
            }
        }
        step *= 10.0;
    }
}

/// `t` without a trailing `.0`.
fn trim(t: f64) -> String {
    let s = format!("{t:.1}");
    s.strip_suffix(".0").map(str::to_string).unwrap_or(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::views::fixture::{self, HOSTILE};

    #[test]
    fn timeline_matches_golden() {
        fixture::assert_golden("timeline.svg", &render(&fixture::recorded()));
    }

    /// Phase bands: a box over each second a phase was entered, in the phase's band.
    #[test]
    fn phases_are_bands_over_the_seconds_they_were_entered() {
        let mut rec = fixture::recorded();
        rec.phase_activity = [(1, "serve", 3), (2, "serve", 5), (1, "load", 1)]
            .map(|(t_s, phase, entries)| crate::model::PhaseActivity {
                t_s,
                phase: phase.into(),
                entries,
            })
            .to_vec();
        let svg = render(&rec);
        assert!(
            svg.contains("<title>phase serve: 3 entries at 1 s</title>"),
            "{svg}"
        );
        assert!(
            svg.contains("<title>phase load: 1 entries at 1 s</title>"),
            "{svg}"
        );
        assert!(svg.contains(">phase serve</text>") && svg.contains(">phase load</text>"));
        // A Python function's phase: over the seconds its memory changed, in a row of its own.
        rec.phase_seconds = vec![(3, "prefill".into())];
        let svg = render(&rec);
        assert!(
            svg.contains(
                "<title>phase prefill: its memory changed at 3 s (a Python function's phase: \
                 calls not counted)</title>"
            ),
            "{svg}"
        );
        assert!(svg.contains(">phase prefill</text>"), "{svg}");
        // Failed allocations are marked where they happened.
        rec.failure_seconds = vec![crate::model::FailureSecond {
            t_s: 2,
            class: Class::Heap,
            function: "malloc".into(),
            error: "ENOMEM".into(),
            count: 3,
        }];
        assert!(render(&rec).contains("<title>3 failed allocations</title>"));
    }

    #[test]
    fn round_figures_for_the_axes() {
        assert_eq!(nice_ceiling(900), 1000);
        assert_eq!(nice_ceiling(3 << 20), 5 << 20);
        assert_eq!(nice_ceiling(1), 1);
        assert_eq!(nice_step(4.5), 0.5);
        assert_eq!(nice_step(60.0), 10.0);
        assert_eq!(trim(2.0), "2");
    }

    #[test]
    fn what_the_recording_says_is_escaped() {
        let svg = render(&fixture::hostile());
        assert!(!svg.contains(HOSTILE), "raw hostile string in the SVG");
        assert!(!svg.contains('\u{1b}'));
        // Well-formed: every element closes.
        assert_eq!(svg.matches("<svg").count(), svg.matches("</svg>").count());
    }
}
