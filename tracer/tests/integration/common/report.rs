//! The JSON report (`alloctrace report --format json`): typed for the contract's fields, untyped
//! for the rest, with the sums and assertions the suites share.

use std::{
    collections::{BTreeMap, HashMap},
    path::Path,
};

use serde::Deserialize;

use super::{LEAKS, alloctrace_cmd, is_libc_frame, run};

#[derive(Clone, Debug, Deserialize)]
pub struct Report {
    pub schema: u64,
    pub complete: bool,
    pub target: Target,
    pub duration_s: f64,
    pub totals: HashMap<String, Totals>,
    pub stacks: Vec<StackRow>,
    pub failures: Vec<FailureRow>,
    pub unmatched_frees: u64,
    pub lost_events: BTreeMap<String, u64>,
    pub stack_capture: Option<StackCapture>,
    /// `record --phase`: the rules (null without).
    pub phases: Option<Phases>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct Phases {
    pub rules: Vec<PhaseRule>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct PhaseRule {
    pub name: String,
}

/// How the recording's stacks were taken (`record --stack`).
#[derive(Clone, Debug, Deserialize)]
pub struct StackCapture {
    pub mode: String,
    #[expect(dead_code, reason = "parsed: the report must have it (the contract)")]
    pub copy_bytes: u32,
    pub copies: u64,
    pub truncated: u64,
    #[expect(dead_code, reason = "parsed: the report must have it (the contract)")]
    pub fp_under_pressure: u64,
    #[serde(default)]
    pub kernel_heap_stacks: u64,
    #[serde(default)]
    pub kernel_heap_full: u64,
    #[serde(default)]
    pub kernel_heap_sampled_out: u64,
}

#[derive(Clone, Debug, Deserialize)]
pub struct Target {
    pub pids: Vec<u32>,
    pub command: String,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct Totals {
    pub live_bytes: u64,
    pub live_count: u64,
    pub peak_bytes: u64,
    pub allocated_bytes: u64,
    pub allocated_count: u64,
    pub freed_count: u64,
}

#[derive(Clone, Debug, Deserialize)]
pub struct StackRow {
    pub class: String,
    pub phase: String,
    pub live_bytes: u64,
    pub live_count: u64,
    pub allocated_bytes: u64,
    pub allocated_count: u64,
    pub frames: Vec<String>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct FailureRow {
    pub class: String,
    pub function: String,
    pub size: u64,
    pub count: u64,
    pub error: String,
    pub frames: Vec<String>,
}

/// The four counters of a function's heap stacks, summed over the stacks whose innermost frame is
/// that function.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cell {
    pub live_bytes: u64,
    pub live_count: u64,
    pub allocated_bytes: u64,
    pub allocated_count: u64,
}

/// A cell with `count` blocks of `size` bytes allocated, all still live.
pub fn all_live(count: u64, size: u64) -> Cell {
    Cell {
        live_bytes: count * size,
        live_count: count,
        allocated_bytes: count * size,
        allocated_count: count,
    }
}

/// A cell with `count` blocks of `size` bytes allocated, none live.
pub fn all_freed(count: u64, size: u64) -> Cell {
    Cell {
        live_bytes: 0,
        live_count: 0,
        allocated_bytes: count * size,
        allocated_count: count,
    }
}

impl Report {
    /// Readable summary for assertion messages.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "report: complete={} duration_s={} target={:?} totals={:?} unmatched_frees={} \
             lost_events={:?}\nstacks:\n",
            self.complete,
            self.duration_s,
            self.target,
            self.totals,
            self.unmatched_frees,
            self.lost_events
        );
        for st in &self.stacks {
            s.push_str(&format!(
                "  {}/{} live {} B in {}, allocated {} B in {}: {}\n",
                st.class,
                st.phase,
                st.live_bytes,
                st.live_count,
                st.allocated_bytes,
                st.allocated_count,
                st.frames.join(" <- ")
            ));
        }
        s.push_str("failures:\n");
        for f in &self.failures {
            s.push_str(&format!(
                "  {} {} size {} x{} {}: {}\n",
                f.class,
                f.function,
                f.size,
                f.count,
                f.error,
                f.frames.join(" <- ")
            ));
        }
        s
    }

    pub fn heap_totals(&self) -> Totals {
        *self
            .totals
            .get("heap")
            .unwrap_or_else(|| panic!("no heap totals\n{}", self.summary()))
    }

    /// Heap totals, zero when the recording has none (nothing was allocated or freed).
    pub fn heap_totals_or_zero(&self) -> Totals {
        self.totals.get("heap").copied().unwrap_or_default()
    }

    /// Heap stacks whose innermost frame (the allocator's caller) is `function`.
    pub fn stacks_of(&self, function: &str) -> Vec<&StackRow> {
        self.stacks
            .iter()
            .filter(|s| s.class == "heap" && s.frames.first().map(String::as_str) == Some(function))
            .collect()
    }

    /// The summed counters of `function`'s heap stacks; panics if there is none.
    pub fn cell(&self, function: &str) -> Cell {
        let stacks = self.stacks_of(function);
        assert!(
            !stacks.is_empty(),
            "no heap stack with frames[0] == {function:?}\n{}",
            self.summary()
        );
        sum_rows(&stacks)
    }

    pub fn assert_cell(&self, function: &str, expected: Cell) {
        assert_eq!(
            self.cell(function),
            expected,
            "counters of {function}\n{}",
            self.summary()
        );
    }

    /// Every leaking function of the `leaks` scenario at its exact live bytes and count.
    pub fn assert_leaks(&self) {
        for (function, n, size) in LEAKS {
            self.assert_cell(function, all_live(n, size));
        }
    }

    pub fn assert_totals(&self, expected: Totals) {
        assert_eq!(
            self.heap_totals(),
            expected,
            "heap totals\n{}",
            self.summary()
        );
    }

    /// The well-formedness every report must have: schema 2, one target PID, a sane duration, and
    /// stack rows that add up to the totals.
    pub fn assert_well_formed(&self, pid: Option<u32>) {
        assert_eq!(self.schema, 2, "schema\n{}", self.summary());
        assert!(
            self.duration_s.is_finite() && self.duration_s >= 0.0,
            "duration_s\n{}",
            self.summary()
        );
        if let Some(pid) = pid {
            assert_eq!(
                self.target.pids,
                vec![pid],
                "target.pids\n{}",
                self.summary()
            );
        }
        // A cell's phase is none, a rule's, graph-capture (CUDA), or idle (where rules are).
        let rules = self.phases.iter().flat_map(|p| &p.rules);
        let mut phases: Vec<&str> = rules.map(|r| r.name.as_str()).collect();
        if !phases.is_empty() {
            phases.push("idle");
        }
        phases.extend(["none", "graph-capture"]);
        for s in &self.stacks {
            assert!(
                phases.contains(&s.phase.as_str()),
                "phase of {:?}",
                s.frames
            );
            assert!(
                !s.frames.is_empty(),
                "a stack without frames\n{}",
                self.summary()
            );
        }
        let heap: Vec<&StackRow> = self.stacks.iter().filter(|s| s.class == "heap").collect();
        let live: u64 = heap.iter().map(|s| s.live_bytes).sum();
        let count: u64 = heap.iter().map(|s| s.live_count).sum();
        let t = self.heap_totals_or_zero();
        assert_eq!(
            (live, count),
            (t.live_bytes, t.live_count),
            "stack rows do not add up to the heap totals\n{}",
            self.summary()
        );
    }

    /// No event was lost: every cause is absent or zero.
    pub fn assert_no_lost_events(&self) {
        assert!(
            self.lost_events.values().all(|&n| n == 0),
            "lost events in a deterministic scenario\n{}",
            self.summary()
        );
    }
}

/// `alloctrace ARGS... TRACE` run to completion: its stdout, asserted successful.
pub fn view(args: &[&str], trace: &Path) -> Vec<u8> {
    let mut cmd = alloctrace_cmd(args);
    cmd.arg(trace);
    let out = cmd.output().expect("run alloctrace");
    assert!(
        out.status.success(),
        "alloctrace {args:?} failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// `alloctrace report TRACE --format json`, asserted successful, as untyped JSON (for the fields
/// the typed `Report` does not model: per-process, gpu, rss, page faults...).
pub fn report_value(trace: &Path) -> serde_json::Value {
    serde_json::from_str(&report_text(trace)).expect("report JSON")
}

/// The text of `alloctrace report TRACE --format json`, asserted successful.
fn report_text(trace: &Path) -> String {
    let mut cmd = alloctrace_cmd(&["report", "--format", "json"]);
    cmd.arg(trace);
    let out = run("alloctrace report --format json", cmd);
    assert!(
        out.status.success(),
        "alloctrace report failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The rows of a report list (`stacks`, `page_faults`, `released`, ...) whose frames include
/// `function`.
pub fn json_rows_through<'a>(
    list: &'a serde_json::Value,
    function: &str,
) -> Vec<&'a serde_json::Value> {
    list.as_array()
        .expect("a list of rows")
        .iter()
        .filter(|s| {
            s["frames"]
                .as_array()
                .is_some_and(|f| f.iter().any(|f| f == function))
        })
        .collect()
}

/// The `stacks` rows of `class` whose frames include `function`.
pub fn json_class_rows<'a>(
    r: &'a serde_json::Value,
    class: &str,
    function: &str,
) -> Vec<&'a serde_json::Value> {
    json_rows_through(&r["stacks"], function)
        .into_iter()
        .filter(|s| s["class"] == class)
        .collect()
}

/// The sum of a numeric field over JSON rows.
pub fn json_sum(rows: &[&serde_json::Value], field: &str) -> u64 {
    rows.iter().map(|s| s[field].as_u64().expect(field)).sum()
}

/// `alloctrace report TRACE --format json`, asserted successful and parsed.
pub fn report_json(trace: &Path) -> Report {
    let text = report_text(trace);
    serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("the JSON report does not match the contract: {e}\n{text}"))
}

impl Report {
    /// Totals of `class`, zero when the recording has none.
    pub fn class_totals_or_zero(&self, class: &str) -> Totals {
        self.totals.get(class).copied().unwrap_or_default()
    }

    /// Rows (any class) whose first frame outside the C library (`is_libc_frame`) is `function`:
    /// `frames[0] == function`, or libc wrappers such as `mmap64` or `syscall` first, then it.
    pub fn stacks_through(&self, function: &str) -> Vec<&StackRow> {
        self.stacks
            .iter()
            .filter(|s| {
                s.frames
                    .iter()
                    .find(|f| !is_libc_frame(f))
                    .map(String::as_str)
                    == Some(function)
            })
            .collect()
    }

    /// Rows of `class` through `function` (see `stacks_through`).
    pub fn class_stacks_through(&self, class: &str, function: &str) -> Vec<&StackRow> {
        self.stacks_through(function)
            .into_iter()
            .filter(|s| s.class == class)
            .collect()
    }

    /// The summed counters of `class`'s rows through `function`; panics if there is none.
    pub fn class_cell(&self, class: &str, function: &str) -> Cell {
        let stacks = self.class_stacks_through(class, function);
        assert!(
            !stacks.is_empty(),
            "no {class} stack through {function:?}\n{}",
            self.summary()
        );
        sum_rows(&stacks)
    }

    pub fn assert_class_cell(&self, class: &str, function: &str, expected: Cell) {
        assert_eq!(
            self.class_cell(class, function),
            expected,
            "{class} counters of {function}\n{}",
            self.summary()
        );
    }

    /// Every class's rows add up to its totals (live bytes and count).
    pub fn assert_rows_add_up(&self) {
        for (class, t) in &self.totals {
            let rows: Vec<&StackRow> = self.stacks.iter().filter(|s| &s.class == class).collect();
            let c = sum_rows(&rows);
            assert_eq!(
                (c.live_bytes, c.live_count),
                (t.live_bytes, t.live_count),
                "{class} rows do not add up to the {class} totals\n{}",
                self.summary()
            );
        }
    }
}

/// The four counters of `rows`, summed.
pub fn sum_rows(rows: &[&StackRow]) -> Cell {
    rows.iter().fold(Cell::default(), |c, s| Cell {
        live_bytes: c.live_bytes + s.live_bytes,
        live_count: c.live_count + s.live_count,
        allocated_bytes: c.allocated_bytes + s.allocated_bytes,
        allocated_count: c.allocated_count + s.allocated_count,
    })
}
