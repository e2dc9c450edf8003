//! `alloctrace flamegraph`: an SVG flame graph of the bytes live at the end of the recording.
//!
//! Each cell becomes one folded line `class;outermost;...;innermost BYTES`, so the frames right
//! above "all" are the memory classes (heap now; mmap and cuda later) and a stack's width is the
//! bytes it holds.

use std::collections::BTreeMap;

use inferno::flamegraph::{self, Options, Palette, color::BasicPalette};

use super::one_line;
use crate::{
    escape,
    model::{PAGE, PHASE_NONE},
    recording::Recorded,
};

pub const DEFAULT_TITLE: &str = "alloctrace: live bytes by stack";

/// What the caller may choose about the graph.
#[derive(Clone, Debug)]
pub struct FlamegraphOptions {
    pub title: String,
    /// What the widths are.
    pub kind: Kind,
    /// `None`: the target's command, PID(s) and the recording's duration.
    pub subtitle: Option<String>,
    /// Added to the subtitle: what a filter kept (`views::filter`).
    pub note: Option<String>,
}

impl Default for FlamegraphOptions {
    fn default() -> Self {
        FlamegraphOptions {
            title: DEFAULT_TITLE.to_string(),
            kind: Kind::Live,
            subtitle: None,
            note: None,
        }
    }
}

/// What a flame graph measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Bytes live at the end of the recording, under their class.
    Live,
    /// Bytes faulted in (sampled page faults × page size): which code made RSS grow.
    Faults,
    /// The leak suspects' growth after the warm-up (docs/accounting.md, "Leak suspects"),
    /// under their class: only what kept growing, none of what is merely large.
    Leaks,
    /// Bytes allocated over the recording, freed or not, by class and stack: where the
    /// allocator is busy (churn), which the live graph does not show.
    Allocated,
    /// Static memory, apart: file mappings (code and data of loaded files) and thread stacks
    /// reserved, at their mapped size (mostly not resident). `Live` leaves them out, so that
    /// they never dwarf what can grow.
    Static,
}

pub const FAULTS_TITLE: &str = "alloctrace: bytes faulted in by stack (sampled)";
pub const LEAKS_TITLE: &str = "alloctrace: leak suspects, growth after the warm-up by stack";
pub const ALLOCATED_TITLE: &str = "alloctrace: bytes allocated by stack (freed or not)";
pub const STATIC_TITLE: &str =
    "alloctrace: static memory by stack (file mappings, thread stacks; mapped, not resident)";

/// Folded lines of the leak suspects' growth, `class;outermost;...;innermost BYTES` (none when
/// the recording was too short to judge).
pub fn folded_leak_lines(rec: &Recorded) -> Vec<String> {
    let mut folded = FoldedStacks::default();
    for row in super::report::suspects(rec).map_or_else(Vec::new, |s| s.rows) {
        folded.add(
            root_of(row.key.class.name(), &row.key.phase),
            &rec.frames(row.key.stack),
            row.growth,
        );
    }
    folded.into_lines()
}

/// The frames above "all": the class, then the phase when there is one.
fn root_of(class: &str, phase: &str) -> String {
    let mut root = class.to_string();
    if phase != PHASE_NONE {
        root.push_str(&format!(";[phase {}]", folded_frame(phase)));
    }
    root
}

/// Folded lines of the sampled page faults, `page-faults;outermost;...;innermost BYTES`.
pub fn folded_fault_lines(rec: &Recorded) -> Vec<String> {
    let mut folded = FoldedStacks::default();
    for (&(_, stack), &faults) in &rec.state.faults {
        folded.add("page-faults".to_string(), &rec.frames(stack), faults * PAGE);
    }
    folded.into_lines()
}

/// The folded stack lines of the live bytes, sorted, one per distinct stack (equal stacks of
/// different cells merged), cells with nothing live left out, static memory (`Kind::Static`)
/// too.
pub fn folded_lines(rec: &Recorded) -> Vec<String> {
    folded_live(rec, false)
}

/// The folded lines of the bytes allocated over the recording (static memory left out).
pub fn folded_allocated_lines(rec: &Recorded) -> Vec<String> {
    let mut folded = FoldedStacks::default();
    for (key, counters) in &rec.state.cells {
        if counters.allocated_bytes == 0 || key.class.is_static() {
            continue;
        }
        let root = root_of(key.class.name(), &key.phase);
        folded.add(root, &rec.frames(key.stack), counters.allocated_bytes);
    }
    folded.into_lines()
}

/// The folded lines of the static memory alone.
pub fn folded_static_lines(rec: &Recorded) -> Vec<String> {
    folded_live(rec, true)
}

fn folded_live(rec: &Recorded, statics: bool) -> Vec<String> {
    let mut folded = FoldedStacks::default();
    for (key, counters) in &rec.state.cells {
        if counters.live_bytes == 0 || key.class.is_static() != statics {
            continue;
        }
        let root = root_of(key.class.name(), &key.phase);
        folded.add(root, &rec.frames(key.stack), counters.live_bytes);
    }
    folded.into_lines()
}

/// Stacks in the folded format, summed by line: what both kinds of graph are drawn from.
#[derive(Default)]
struct FoldedStacks(BTreeMap<String, u64>);

impl FoldedStacks {
    /// Adds `amount` to the stack of `frames` (innermost first, as stored) under the frames of
    /// `root` (already folded).
    fn add(&mut self, root: String, frames: &[String], amount: u64) {
        let mut line = root;
        // Flame graphs read from the root up.
        for frame in frames.iter().rev() {
            line.push(';');
            line.push_str(&folded_frame(frame));
        }
        *self.0.entry(line).or_default() += amount;
    }

    /// `STACK AMOUNT` lines, sorted by stack.
    fn into_lines(self) -> Vec<String> {
        self.0
            .into_iter()
            .map(|(stack, amount)| format!("{stack} {amount}"))
            .collect()
    }
}

/// A frame name made safe for the folded format (`;` separates frames and a line is one stack)
/// and for the SVG: inferno escapes markup but passes control characters through, which XML
/// forbids and a terminal showing the file would act on, so they become visible escapes here.
fn folded_frame(name: &str) -> String {
    if name.is_empty() {
        return "[unnamed]".to_string();
    }
    escape::visible(&name.replace(';', ":")).into_owned()
}

fn subtitle(rec: &Recorded) -> String {
    let state = if rec.complete {
        String::new()
    } else {
        " (NOT FINALIZED: tracer was killed)".to_string()
    };
    format!(
        "{} ({}), {:.1} s{state}",
        escape::visible(&one_line(&rec.target.command)),
        super::target_pids(rec),
        rec.duration_s
    )
}

/// The flame graph as SVG bytes. A recording with nothing live still gives a valid SVG, with
/// the titles and a line saying so.
pub fn render_svg(rec: &Recorded, options: &FlamegraphOptions) -> anyhow::Result<Vec<u8>> {
    // The title and a given subtitle come from the command line, where they may also carry
    // control characters (a title pasted from the target's command line).
    let title = escape::visible(&options.title).into_owned();
    let mut subtitle = match &options.subtitle {
        Some(given) => escape::visible(given).into_owned(),
        None => subtitle(rec),
    };
    if let Some(note) = &options.note {
        subtitle.push_str(&format!(" · only {}", escape::visible(note)));
    }
    let lines = match options.kind {
        Kind::Live => folded_lines(rec),
        Kind::Faults => folded_fault_lines(rec),
        Kind::Leaks => folded_leak_lines(rec),
        Kind::Static => folded_static_lines(rec),
        Kind::Allocated => folded_allocated_lines(rec),
    };
    if lines.is_empty() {
        let nothing = match options.kind {
            Kind::Live => "Nothing was live at the end of the recording: no stack holds any bytes.",
            Kind::Faults => "No page fault was sampled.",
            Kind::Leaks => {
                "No leak suspect: no stack grew in every batch after the warm-up (or the \
                 recording is too short to judge)."
            }
            Kind::Static => "No file mapping or thread stack was live at the end.",
            Kind::Allocated => "Nothing was allocated during the recording.",
        };
        return Ok(nothing_svg(&title, &subtitle, nothing).into_bytes());
    }
    let options = |min_width: f64, pruned: &str| {
        let mut opts = Options::default();
        opts.title = title.clone();
        opts.subtitle = Some(format!("{subtitle}{pruned}"));
        opts.count_name = "bytes".to_string();
        opts.colors = Palette::Basic(BasicPalette::Mem);
        // Colours from the function names, so the same recording always gives the same file.
        opts.deterministic = true;
        opts.min_width = min_width;
        opts
    };
    render_within_budget(&lines, options)
}

/// The most an SVG may weigh: a browser opens it at once, and search stays quick.
const SVG_BUDGET: usize = 1 << 20;

/// Renders `lines` with inferno's options from `options(min_width, note)`, pruning frames
/// narrower than `min_width` percent of the whole (inferno's default first: a tenth of a
/// pixel), and doubling it until the SVG is within `SVG_BUDGET`: a deep stack (a PyTorch
/// process's, over a hundred frames with the Python ones) adds a box a frame, and thousands of
/// them weigh megabytes. The subtitle says what was left out.
fn render_within_budget(
    lines: &[String],
    options: impl Fn(f64, &str) -> Options<'static>,
) -> anyhow::Result<Vec<u8>> {
    let mut min_width = Options::default().min_width;
    let mut note = String::new();
    loop {
        let mut opts = options(min_width, &note);
        let mut svg = Vec::new();
        flamegraph::from_lines(&mut opts, lines.iter().map(String::as_str), &mut svg)
            .map_err(|e| anyhow::anyhow!("cannot render the flame graph: {e}"))?;
        // Past a twentieth of the width the graph says nothing small anyway: kept as it is.
        if svg.len() <= SVG_BUDGET || min_width >= 5.0 {
            return Ok(svg);
        }
        min_width *= 2.0;
        note = format!(
            " · frames under {} % of the total not drawn (to keep the file under 1 MB)",
            trim_percent(min_width)
        );
    }
}

/// A percentage without trailing zeros: 0.08, 0.16, 1.28.
fn trim_percent(p: f64) -> String {
    let s = format!("{p:.2}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// The differential flame graph of two recordings' live bytes (`alloctrace diff --flamegraph`):
/// widths are AFTER's bytes, colours the change from BEFORE (red grew, blue shrank; a stack only
/// BEFORE had is a thin sliver, as flamegraph.pl draws them).
pub fn render_diff_svg(before: &Recorded, after: &Recorded) -> anyhow::Result<Vec<u8>> {
    let parse = |lines: Vec<String>| -> BTreeMap<String, u64> {
        (lines.into_iter())
            .filter_map(|l| {
                let (stack, n) = l.rsplit_once(' ')?;
                Some((stack.to_string(), n.parse().ok()?))
            })
            .collect()
    };
    let (old, new) = (parse(folded_lines(before)), parse(folded_lines(after)));
    let mut stacks: Vec<&String> = old.keys().chain(new.keys()).collect();
    stacks.sort();
    stacks.dedup();
    let lines: Vec<String> = (stacks.into_iter())
        .map(|s| {
            let (b, a) = (old.get(s).copied(), new.get(s).copied());
            format!("{s} {} {}", b.unwrap_or(0), a.unwrap_or(0))
        })
        .collect();
    let title = "alloctrace: live bytes, after against before".to_string();
    let subtitle = escape::visible(&format!(
        "before: {} · after: {} (red: grew, blue: shrank)",
        before.target.command, after.target.command
    ))
    .into_owned();
    if lines.is_empty() {
        return Ok(
            nothing_svg(&title, &subtitle, "Nothing was live in either recording.").into_bytes(),
        );
    }
    let options = |min_width: f64, pruned: &str| {
        let mut opts = Options::default();
        opts.title = title.clone();
        opts.subtitle = Some(format!("{subtitle}{pruned}"));
        opts.count_name = "bytes".to_string();
        opts.deterministic = true;
        opts.min_width = min_width;
        opts
    };
    render_within_budget(&lines, options)
}

/// The recording as it stood at second `t_s`: each cell's live bytes from its series (the last
/// point at or before `t_s`; none yet: nothing), for a differential graph of two time points.
/// Needs the series read whole (`SeriesRead::All`).
pub fn at_second(rec: &Recorded, t_s: u64) -> Recorded {
    let mut then = rec.clone();
    for counters in then.state.cells.values_mut() {
        counters.live_bytes = 0;
        counters.live_count = 0;
    }
    for p in rec.series.iter().filter(|p| p.t_s <= t_s) {
        if let Some(counters) = then.state.cells.get_mut(&p.key) {
            counters.live_bytes = p.live_bytes;
            counters.live_count = p.live_count;
        }
    }
    then
}

/// inferno refuses an empty input: this is the graph of nothing, in inferno's look, saying what
/// there was none of.
fn nothing_svg(title: &str, subtitle: &str, nothing: &str) -> String {
    format!(
        r##"<?xml version="1.0" standalone="no"?>
<!DOCTYPE svg PUBLIC "-//W3C//DTD SVG 1.1//EN" "http://www.w3.org/Graphics/SVG/1.1/DTD/svg11.dtd">
<svg version="1.1" width="1200" height="130" viewBox="0 0 1200 130" xmlns="http://www.w3.org/2000/svg">
<rect x="0" y="0" width="100%" height="100%" fill="#eef2ee"/>
<text x="600" y="24" text-anchor="middle" font-size="17" font-family="Verdana">{title}</text>
<text x="600" y="48" text-anchor="middle" font-size="12" font-family="Verdana" fill="#a0a0a0">{subtitle}</text>
<text x="600" y="90" text-anchor="middle" font-size="14" font-family="Verdana">{nothing}</text>
</svg>
"##,
        title = escape::for_xml(title),
        subtitle = escape::for_xml(subtitle),
        nothing = escape::for_xml(nothing)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        model::{CellKey, Class, Stack, StackCounters, TargetInfo},
        views::fixture::{self, LEAKS},
    };

    /// `--kind leaks`: only the stacks that grew in every batch after the warm-up, as wide as
    /// their growth; a recording too short to judge draws a graph that says so.
    #[test]
    fn the_leaks_graph_shows_only_what_grew_in_every_batch() {
        use crate::{model::SeriesPoint, recording::batches::SeriesBatches};
        let mut rec = fixture::recorded();
        let cell = |stack| CellKey {
            class: Class::Heap,
            pid: 7,
            phase: PHASE_NONE.to_string(),
            stack: Some(stack),
        };
        let (leak, flat) = (cell(0), cell(1));
        let point = |t_s, key: &CellKey, live_bytes| SeriesPoint {
            t_s,
            key: key.clone(),
            live_bytes,
            live_count: 1,
        };
        let series: Vec<SeriesPoint> = (0..12)
            .flat_map(|t| [point(t, &leak, 100 * (t + 1)), point(t, &flat, 5000)])
            .collect();
        rec.batches = SeriesBatches::from_points(&series, 12.0);
        // Judged from 4 s to 12 s in batches of 2 s: means 550, 750, 950, 1150.
        assert_eq!(
            folded_leak_lines(&rec),
            vec!["heap;main;run_scenario;leak_malloc 600".to_string()]
        );
        rec.batches = None;
        let options = FlamegraphOptions {
            kind: Kind::Leaks,
            ..FlamegraphOptions::default()
        };
        let svg = String::from_utf8(render_svg(&rec, &options).unwrap()).unwrap();
        assert!(svg.contains("No leak suspect"), "{svg}");
    }

    /// `flamegraph --since`: the recording as it stood at a second, from its series.
    #[test]
    fn a_recording_at_a_second_has_each_cells_value_then() {
        use crate::model::SeriesPoint;
        let mut rec = fixture::recorded();
        let key = rec.state.cells.keys().next().unwrap().clone();
        rec.series = [(1, 100), (3, 300), (5, 500)]
            .map(|(t_s, live_bytes)| SeriesPoint {
                t_s,
                key: key.clone(),
                live_bytes,
                live_count: 1,
            })
            .to_vec();
        let live_at = |t| at_second(&rec, t).state.cells[&key].live_bytes;
        assert_eq!(
            (live_at(0), live_at(1), live_at(4), live_at(9)),
            (0, 100, 300, 500)
        );
        // Another cell without points had nothing then.
        let then = at_second(&rec, 9);
        assert!(
            then.state
                .cells
                .iter()
                .filter(|(k, _)| **k != key)
                .all(|(_, c)| c.live_bytes == 0)
        );
    }

    /// `diff --flamegraph`: AFTER's widths, the change from BEFORE as colour; a stack only
    /// BEFORE had is still there (as zero wide).
    #[test]
    fn the_differential_graph_draws_after_coloured_by_the_change() {
        let before = fixture::recorded();
        let mut after = fixture::recorded();
        for counters in after.state.cells.values_mut() {
            counters.live_bytes *= 2;
        }
        let svg = String::from_utf8(render_diff_svg(&before, &after).unwrap()).unwrap();
        assert!(svg.contains("leak_malloc"), "{svg}");
        assert!(svg.contains("after against before"), "{svg}");
        // inferno colours a grown frame red (rgb(255,..)): every live stack doubled.
        assert!(svg.contains("rgb(255,"), "{svg}");
        let mut empty = fixture::recorded();
        empty.state.cells.clear();
        let svg = String::from_utf8(render_diff_svg(&empty, &empty).unwrap()).unwrap();
        assert!(
            svg.contains("Nothing was live in either recording"),
            "{svg}"
        );
    }

    /// A recording with 20,000 distinct stacks (deep, C++-length names) still draws in under
    /// 1 MB: frames narrower than a pixel's tenth are pruned (inferno), and a live graph of
    /// thousands of slivers stays small and searchable.
    #[test]
    fn many_small_stacks_keep_the_svg_under_a_megabyte() {
        let mut rec = fixture::recorded();
        rec.state.cells.clear();
        for i in 0..20_000u32 {
            let frames: Vec<String> = (0..24)
                .map(|d| format!("at::native::some_long_operator_name_{d}_{}", i % 500))
                .chain([format!("leaf_{i}")])
                .collect();
            rec.stacks.insert(
                1000 + i,
                Stack {
                    index: 1000 + i,
                    frames,
                },
            );
            let key = CellKey {
                class: Class::Heap,
                pid: 7,
                phase: PHASE_NONE.to_string(),
                stack: Some(1000 + i),
            };
            let bytes = if i == 0 { 1 << 30 } else { 4096 };
            let counters = StackCounters {
                live_bytes: bytes,
                live_count: 1,
                ..StackCounters::default()
            };
            rec.state.cells.insert(key, counters);
        }
        let svg = render_svg(&rec, &FlamegraphOptions::default()).unwrap();
        assert!(svg.len() < 1 << 20, "{} bytes", svg.len());
        let svg = String::from_utf8(svg).unwrap();
        assert!(svg.contains("leaf_0"), "the big stack is drawn");
    }

    /// Deep stacks of every weight (a PyTorch process's: a hundred frames with the Python ones,
    /// no stack dominating), whose boxes would weigh megabytes at inferno's default pruning:
    /// the narrowest are left out until the file is under 1 MB, and the subtitle says so.
    #[test]
    fn deep_stacks_are_pruned_to_a_megabyte_and_say_so() {
        let mut rec = fixture::recorded();
        rec.state.cells.clear();
        for i in 0..3000u32 {
            // Innermost first: a leaf of its own under one of 300 paths of 100 frames.
            let frames: Vec<String> = std::iter::once(format!("leaf_{i}"))
                .chain((0..100).map(|d| {
                    format!(
                        "Module._call_impl_{d}_{} (torch/nn/modules/module.py:1798)",
                        i % 300
                    )
                }))
                .collect();
            let index = 1000 + i;
            rec.stacks.insert(index, Stack { index, frames });
            let key = CellKey {
                class: Class::Heap,
                pid: 7,
                phase: PHASE_NONE.to_string(),
                stack: Some(index),
            };
            // Paths of every weight, the last the widest.
            let counters = StackCounters {
                live_bytes: 4096 * u64::from(i % 300 + 1),
                live_count: 1,
                ..StackCounters::default()
            };
            rec.state.cells.insert(key, counters);
        }
        let svg = render_svg(&rec, &FlamegraphOptions::default()).unwrap();
        assert!(svg.len() <= SVG_BUDGET, "{} bytes", svg.len());
        let svg = String::from_utf8(svg).unwrap();
        assert!(svg.contains("% of the total not drawn (to keep the file under 1 MB)"));
        assert!(
            svg.contains("Module._call_impl_99_299 "),
            "the widest path is drawn whole"
        );
    }

    /// Thread stacks and file mappings go to their own graph, never into the live one.
    #[test]
    fn static_memory_has_a_graph_of_its_own() {
        let mut rec = fixture::recorded();
        let key = CellKey {
            class: Class::ThreadStack,
            pid: 7,
            phase: PHASE_NONE.to_string(),
            stack: Some(0),
        };
        let counters = StackCounters {
            live_bytes: 8 << 20,
            live_count: 1,
            ..StackCounters::default()
        };
        rec.state.cells.insert(key, counters);
        assert!(
            folded_lines(&rec)
                .iter()
                .all(|l| !l.starts_with("thread-stack"))
        );
        assert_eq!(
            folded_static_lines(&rec),
            ["thread-stack;main;run_scenario;leak_malloc 8388608"]
        );
        // The allocated graph: the churn (nothing live) is there, the thread stack is not.
        let allocated = folded_allocated_lines(&rec);
        assert!(
            allocated.iter().any(|l| l.contains("churn")),
            "{allocated:?}"
        );
        assert!(allocated.iter().all(|l| !l.starts_with("thread-stack")));
    }

    #[test]
    fn svg_matches_golden() {
        let svg = render_svg(&fixture::recorded(), &FlamegraphOptions::default()).unwrap();
        fixture::assert_golden("flamegraph.svg", &String::from_utf8(svg).unwrap());
    }

    #[test]
    fn folded_lines_match_golden() {
        let lines = folded_lines(&fixture::recorded());
        fixture::assert_golden("flamegraph.folded", &(lines.join("\n") + "\n"));
    }

    #[test]
    fn folded_lines_start_at_the_class_and_skip_dead_cells() {
        let lines = folded_lines(&fixture::recorded());
        // Nine leaking stacks and the lost stack; the churning stack holds nothing.
        assert_eq!(lines.len(), LEAKS.len() + 1);
        assert!(lines.contains(&"heap;main;run_scenario;leak_malloc 1000".to_string()));
        assert!(lines.contains(&"heap;[stack lost] 64".to_string()));
        assert!(lines.iter().all(|l| l.starts_with("heap;")));
        assert!(!lines.iter().any(|l| l.contains("churn")));
        let mut sorted = lines.clone();
        sorted.sort();
        assert_eq!(lines, sorted);
    }

    #[test]
    fn frames_are_sanitized_and_equal_stacks_merge() {
        let mut rec = fixture::recorded();
        rec.stacks.insert(
            50,
            Stack {
                index: 50,
                frames: vec!["operator new(a;b)".into(), "".into()],
            },
        );
        rec.state.cells.clear();
        let live = |n| StackCounters {
            live_bytes: n,
            live_count: 1,
            allocated_bytes: n,
            allocated_count: 1,
            ..Default::default()
        };
        for (phase, n) in [("none", 10), ("prefill", 20)] {
            rec.state.cells.insert(
                CellKey {
                    class: Class::Heap,
                    pid: 1,
                    phase: phase.into(),
                    stack: Some(50),
                },
                live(n),
            );
        }
        // The same stack in two phases: two lines, the phase right above the class.
        assert_eq!(
            folded_lines(&rec),
            vec![
                "heap;[phase prefill];[unnamed];operator new(a:b) 20".to_string(),
                "heap;[unnamed];operator new(a:b) 10".to_string(),
            ]
        );
    }

    #[test]
    fn svg_shows_classes_functions_and_titles() {
        let rec = fixture::recorded();
        let svg =
            String::from_utf8(render_svg(&rec, &FlamegraphOptions::default()).unwrap()).unwrap();
        assert!(svg.starts_with("<?xml"), "{}", &svg[..100]);
        assert!(svg.contains("<svg"));
        assert!(svg.contains(DEFAULT_TITLE));
        assert!(svg.contains("heap_fixture leaks attach (PID 4242), 4.5 s"));
        assert!(svg.contains("bytes"));
        for frame in ["heap", "leak_malloc", "leak_pvalloc", "run_scenario"] {
            assert!(
                svg.contains(&format!("<title>{frame} (")),
                "no frame {frame}"
            );
        }
        // The same input renders the same bytes (deterministic colours).
        let again = render_svg(&rec, &FlamegraphOptions::default()).unwrap();
        assert_eq!(svg.as_bytes(), again.as_slice());
    }

    #[test]
    fn custom_title_and_escaped_subtitle() {
        let mut rec = fixture::recorded();
        rec.target.command = "sh -c 'a < b && c'".to_string();
        rec.complete = false;
        let svg = render_svg(
            &rec,
            &FlamegraphOptions {
                title: "prefill leak".into(),
                kind: Kind::Live,
                subtitle: None,
                note: None,
            },
        )
        .unwrap();
        let svg = String::from_utf8(svg).unwrap();
        assert!(svg.contains("prefill leak"));
        assert!(svg.contains("NOT FINALIZED"));
        assert!(!svg.contains("a < b"), "unescaped subtitle");
    }

    #[test]
    fn nothing_live_gives_a_valid_svg_with_a_message() {
        let mut rec = fixture::empty(true);
        rec.target = TargetInfo {
            pids: vec![9],
            command: "x <&> y".into(),
            attached: false,
        };
        rec.duration_s = 1.0;
        let svg =
            String::from_utf8(render_svg(&rec, &FlamegraphOptions::default()).unwrap()).unwrap();
        assert!(svg.contains("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains(DEFAULT_TITLE));
        assert!(svg.contains("Nothing was live"));
        assert!(svg.contains("x &lt;&amp;&gt; y (PID 9)"));
        // Well-formed enough for an XML parser: every `&` starts an entity.
        assert!(!svg.contains("<&"));
    }
}
