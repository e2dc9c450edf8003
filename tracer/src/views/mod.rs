//! Views of a recording: the report (text postmortem and the JSON contract) and the flamegraph of
//! live bytes. Views only read a `Recorded`; writing the result is `output::write_atomically`'s.

pub mod check;
pub mod diff;
pub mod filter;
pub mod flamegraph;
pub mod names;
pub mod pprof;
pub mod report;
pub mod timeline;

/// "PID 42" or "PIDs 42, 43": the recording's target processes.
pub fn target_pids(rec: &crate::recording::Recorded) -> String {
    let pids: Vec<String> = rec.target.pids.iter().map(u32::to_string).collect();
    let label = if pids.len() == 1 { "PID" } else { "PIDs" };
    format!("{label} {}", pids.join(", "))
}

/// `n` bytes in binary units with one decimal ("74.9 KiB"); plain bytes below 1 KiB.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// A signed byte difference in binary units ("+62.9 KiB", "-1.0 MiB", "0 B").
/// "1 block", "3 blocks".
pub fn count_of(n: u64, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

pub fn human_delta(delta: i128) -> String {
    let magnitude = human_bytes(delta.unsigned_abs().min(u128::from(u64::MAX)) as u64);
    match delta {
        d if d > 0 => format!("+{magnitude}"),
        d if d < 0 => format!("-{magnitude}"),
        _ => magnitude,
    }
}

/// `text` on one line: line breaks and tabs (a `python -c` program in the target's command line)
/// as `\n`, `\r`, `\t`.
pub fn one_line(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c => out.push(c),
        }
    }
    out
}

/// A known recording for the views' tests: the `leaks` scenario of the integration tests, a
/// churning stack, a lost stack, a failure, and a series over four seconds.
#[cfg(test)]
pub(crate) mod fixture {
    use std::collections::BTreeMap;

    use crate::{
        ledger::{CellRef, Ledger},
        model::{Class, FailureKey, SeriesPoint, Stack, TargetInfo},
        recording::{Recorded, TotalsPoint},
    };

    /// (function, blocks, bytes per block), as `LEAKS` in tests/integration/common/answers.rs.
    pub const LEAKS: [(&str, u64, u64); 9] = [
        ("leak_malloc", 10, 100),
        ("leak_calloc", 11, 3 * 70),
        ("leak_realloc", 12, 300),
        ("leak_reallocarray", 13, 5 * 80),
        ("leak_posix_memalign", 14, 500),
        ("leak_aligned_alloc", 15, 640),
        ("leak_memalign", 16, 700),
        ("leak_valloc", 17, 1000),
        ("leak_pvalloc", 18, 1100),
    ];

    /// Stack index of the churning `churn` stack: allocated and freed, nothing live.
    pub const CHURN_STACK: u32 = 9;

    /// PID 7's device 0 allocator: `reserved`, `allocated`, segments, blocks, holes (the
    /// smallest of 2 MiB − 1 KiB, the rest in the largest).
    fn torch_figures(
        reserved: u64,
        allocated: u64,
        segments: u64,
        blocks: u64,
        holes: u64,
        largest_hole: u64,
    ) -> crate::model::AllocatorFigures {
        let hole_bytes = reserved - allocated;
        crate::model::AllocatorFigures {
            pid: 7,
            device: 0,
            reserved,
            allocated,
            pending: 0,
            segments,
            blocks,
            holes,
            hole_bytes,
            largest_hole,
            private_pools: 0,
            private_reserved: 0,
            private_allocated: 0,
            async_backend: false,
            sleeping: 0,
        }
    }

    pub fn recorded() -> Recorded {
        let mut ledger = Ledger::new();
        let mut series: Vec<SeriesPoint> = Vec::new();
        let mut totals_series: Vec<TotalsPoint> = Vec::new();
        // What the writer appends to `totals_series` at a commit.
        let mut commit_totals = |ledger: &Ledger, t_s: u64| {
            let t = ledger.totals(Class::Heap);
            totals_series.push(TotalsPoint {
                t_s,
                class: Class::Heap,
                live_bytes: t.live_bytes,
                live_count: t.live_count,
            });
        };
        let mut stacks = BTreeMap::new();
        let mut addr = 0x10_0000u64;
        for (i, (function, _, _)) in LEAKS.iter().enumerate() {
            stacks.insert(
                i as u32,
                Stack {
                    index: i as u32,
                    frames: vec![
                        function.to_string(),
                        "run_scenario".to_string(),
                        "main".to_string(),
                    ],
                },
            );
        }
        // Half of each stack's blocks in the first second, the rest in the second: it grows.
        for half in [0, 1] {
            for (i, (_, blocks, size)) in LEAKS.iter().enumerate() {
                let n = if half == 0 {
                    blocks / 2
                } else {
                    blocks - blocks / 2
                };
                for _ in 0..n {
                    ledger.alloc(7, addr, *size, CellRef::new(7, Class::Heap, Some(i as u32)));
                    addr += 0x1000;
                }
            }
            series.extend(ledger.take_series(half + 1));
            commit_totals(&ledger, half + 1);
        }
        stacks.insert(
            CHURN_STACK,
            Stack {
                index: CHURN_STACK,
                frames: vec!["churn".to_string(), "main".to_string()],
            },
        );
        // Made and freed by the requests of a `--phase` rule.
        ledger.count_phase_frees();
        let serve = ledger.phase("serve");
        for _ in 0..5 {
            let at = CellRef {
                phase: serve,
                thread_phase: serve,
                ..CellRef::new(7, Class::Heap, Some(CHURN_STACK))
            };
            ledger.alloc(7, 0x9000_0000, 4096, at);
            ledger.free_in(7, 0x9000_0000, serve);
        }
        // A block whose stack was lost.
        ledger.alloc(7, 0xa000_0000, 64, CellRef::new(7, Class::Heap, None));
        ledger.free(7, 0xdead); // allocated before attach
        ledger.failure(FailureKey {
            class: Class::Heap,
            pid: 7,
            function: "malloc".to_string(),
            size: 1 << 50,
            error: "ENOMEM".to_string(),
            stack: Some(0),
        });
        // A CUDA graph replayed 3 times, once failing, at the churn stack.
        for ok in [true, true, false] {
            ledger.cuda_call(7, "cuGraphLaunch", Some(CHURN_STACK), ok);
        }
        series.extend(ledger.take_series(4));
        commit_totals(&ledger, 4);
        // The user-space cause stays at 0 (listed because present); the kernel causes are
        // listed anyway.
        let lost = BTreeMap::from([
            ("ringbuf_full".to_string(), 3),
            ("missed_free".to_string(), 0),
        ]);
        Recorded {
            schema: 1,
            tool_version: "0.0.0-test".to_string(),
            target: TargetInfo {
                pids: vec![4242],
                command: "heap_fixture leaks attach".to_string(),
                attached: true,
            },
            started_unix_ns: 1_700_000_000_000_000_000,
            ended_unix_ns: Some(1_700_000_004_500_000_000),
            duration_s: 4.5,
            complete: true,
            state: ledger.state(&lost),
            stacks,
            series,
            totals_series,
            batches: None,
            // Anonymous memory grew by 2 MiB; the heap fixture's live bytes are part of it.
            rss: vec![
                crate::model::RssSample {
                    t_s: 0,
                    pid: 4242,
                    rss: 10 << 20,
                    anon: 6 << 20,
                    file: 4 << 20,
                    shmem: 0,
                    swap: 0,
                    arena: 0,
                    traced_resident: 0,
                    arena_resident: 0,
                },
                crate::model::RssSample {
                    t_s: 4,
                    pid: 4242,
                    rss: 12 << 20,
                    anon: 8 << 20,
                    file: 4 << 20,
                    shmem: 0,
                    swap: 0,
                    arena: 132 << 10,
                    traced_resident: 1 << 20,
                    arena_resident: 128 << 10,
                },
            ],
            gpu: vec![crate::model::GpuSample {
                t_s: 4,
                pid: 7,
                used: 3 << 30,
                traced: (2 << 30) + (512 << 20),
            }],
            // A caching allocator that grew from 2 to 50 MiB reserved, then failed a 20 MiB
            // request with 16 MiB of its 18 MiB free in one hole.
            torch: vec![
                crate::model::AllocatorSample {
                    t_s: 1,
                    figures: torch_figures(2 << 20, 1024, 1, 1, 1, (2 << 20) - 1024),
                },
                crate::model::AllocatorSample {
                    t_s: 4,
                    figures: torch_figures(50 << 20, (32 << 20) + 1024, 2, 3, 2, 16 << 20),
                },
            ],
            torch_ooms: vec![crate::model::AllocatorOom {
                t_s: 4,
                requested: 20 << 20,
                device_free: 14 << 20,
                stack: Some(CHURN_STACK),
                figures: torch_figures(50 << 20, (32 << 20) + 1024, 2, 3, 2, 16 << 20),
            }],
            gpu_source: Some("recorded samples".into()),
            check: None,
            failure_seconds: Vec::new(),
            phase_activity: Vec::new(),
            phase_seconds: Vec::new(),
            marks: Vec::new(),
            phases: Some(crate::model::Phases {
                profiles: Vec::new(),
                rules: vec![crate::model::PhaseRuleFigures {
                    name: "serve".into(),
                    rule: "serve=heap_fixture:handle".into(),
                    file: Some("/opt/heap_fixture".into()),
                    entries: Some(5),
                }],
                frees: (ledger.phase_frees().into_iter())
                    .map(|((class, a, f), (bytes, count))| crate::model::PhaseFrees {
                        class,
                        allocated_in: a.into(),
                        freed_in: f.into(),
                        bytes,
                        count,
                    })
                    .collect(),
            }),
            stack_capture: Some(crate::model::StackCapture {
                mode: "auto".into(),
                copy_bytes: 16384,
                copies: 40,
                truncated: 2,
                fp_under_pressure: 5,
                heap_sample_bytes: 0,
                kernel_heap_stacks: 0,
                kernel_heap_full: 0,
                kernel_heap_sampled_out: 0,
                heap_duty: None,
                memory_limit: None,
            }),
            stop_reason: Some("duration elapsed".into()),
            write_failure: None,
            // A child that exited by itself: no death to open the report on.
            exits: vec![crate::recording::ProcessExit {
                code: Some(0),
                ..crate::recording::ProcessExit::unknown(4243, 3.25)
            }],
            heap_windows_grown: BTreeMap::new(),
        }
    }

    /// A recording of PID 1 (`idle`, 2 s) that saw nothing; `complete` as given.
    pub fn empty(complete: bool) -> Recorded {
        Recorded {
            schema: 1,
            tool_version: "0.0.0-test".to_string(),
            target: TargetInfo {
                pids: vec![1],
                command: "idle".to_string(),
                attached: false,
            },
            started_unix_ns: 0,
            ended_unix_ns: None,
            duration_s: 2.0,
            complete,
            state: crate::model::LedgerState::default(),
            stacks: BTreeMap::new(),
            series: Vec::new(),
            totals_series: Vec::new(),
            batches: None,
            rss: Vec::new(),
            gpu: Vec::new(),
            torch: Vec::new(),
            torch_ooms: Vec::new(),
            gpu_source: None,
            check: None,
            failure_seconds: Vec::new(),
            phase_activity: Vec::new(),
            phase_seconds: Vec::new(),
            marks: Vec::new(),
            phases: None,
            stack_capture: None,
            stop_reason: None,
            write_failure: None,
            exits: Vec::new(),
            heap_windows_grown: BTreeMap::new(),
        }
    }

    /// Control sequences a hostile target can put in its command line or symbol names: a window
    /// title (OSC ... BEL), a colour (CSI), the 8-bit CSI, NUL, a line break, a bidi override.
    pub const HOSTILE: &str = "\u{1b}]0;X\u{7}evil\u{1b}[31m\u{9b}2J\u{0}\n\u{202e}";

    /// `recorded()` with `HOSTILE` in every string a view prints: the command, a frame, a phase,
    /// a failed call, a CUDA call, a lost-event cause, the GPU source, the stack mode, the
    /// version, and a page-fault stack.
    pub fn hostile() -> Recorded {
        use crate::model::{CallCounts, CellKey, FailureKey, StackCounters};
        let mut rec = recorded();
        let evil = |what: &str| format!("{what}{HOSTILE}");
        rec.target.command = evil("cmd");
        rec.tool_version = evil("v");
        rec.stacks.get_mut(&0).unwrap().frames[0] = evil("frame");
        let counters = StackCounters {
            live_bytes: 5000,
            live_count: 1,
            allocated_bytes: 5000,
            allocated_count: 1,
            ..Default::default()
        };
        let key = |phase: String| CellKey {
            class: Class::Heap,
            pid: 7,
            phase,
            stack: Some(1),
        };
        rec.state.cells.insert(key(evil("phase")), counters);
        rec.state.failures.insert(
            FailureKey {
                class: Class::Heap,
                pid: 7,
                function: evil("function"),
                size: 8,
                error: evil("error"),
                stack: Some(0),
            },
            1,
        );
        let calls = CallCounts {
            calls: 1,
            failed: 0,
        };
        rec.state.cuda_calls.insert((7, evil("cuda"), None), calls);
        rec.state.lost_events.insert(evil("cause"), 1);
        rec.state.faults.insert((7, Some(0)), 3);
        rec.gpu_source = Some(evil("source"));
        rec.stack_capture.as_mut().unwrap().mode = evil("mode");
        rec
    }

    /// Panics unless `svg` is well-formed XML: only the control characters XML 1.0 allows
    /// (tab, line feed, carriage return), and a parser reads it to the end, every element
    /// closed by its own end tag.
    pub fn assert_well_formed_xml(svg: &[u8]) {
        let text = std::str::from_utf8(svg).expect("an SVG is UTF-8");
        if let Some(c) = text
            .chars()
            .find(|c| c.is_control() && !matches!(c, '\t' | '\n' | '\r'))
        {
            panic!("control character {c:?} in the SVG");
        }
        let mut reader = quick_xml::Reader::from_str(text);
        let mut depth = 0usize;
        loop {
            match reader.read_event() {
                Ok(quick_xml::events::Event::Start(_)) => depth += 1,
                Ok(quick_xml::events::Event::End(_)) => depth -= 1,
                // No DTD declares entities: only XML's own and character references resolve.
                Ok(quick_xml::events::Event::GeneralRef(r)) => {
                    let name = r.decode().expect("reference decodes");
                    let known = ["amp", "lt", "gt", "quot", "apos"].contains(&&*name);
                    let char_ref = r.resolve_char_ref().is_ok_and(|c| c.is_some());
                    assert!(known || char_ref, "unknown entity &{name};");
                }
                Ok(quick_xml::events::Event::Eof) => break,
                Ok(_) => {}
                Err(e) => panic!("not XML at byte {}: {e}", reader.buffer_position()),
            }
        }
        assert_eq!(depth, 0, "unclosed elements");
    }

    /// Compares `actual` with the golden file `tests/golden/NAME`, or rewrites the file when
    /// ALLOCTRACE_BLESS=1.
    pub fn assert_golden(name: &str, actual: &str) {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/golden")
            .join(name);
        if std::env::var_os("ALLOCTRACE_BLESS").is_some_and(|v| v == "1") {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, actual).unwrap();
            return;
        }
        let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!(
                "golden file {}: {e} (run with ALLOCTRACE_BLESS=1 to create it)",
                path.display()
            )
        });
        assert!(
            expected == actual,
            "{} differs from the output (ALLOCTRACE_BLESS=1 rewrites it after review):\n\
             --- expected\n{expected}\n--- actual\n{actual}",
            path.display()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::views::{
        fixture::{self, HOSTILE},
        flamegraph::{FlamegraphOptions, Kind, render_svg},
        report::{render_json, render_text},
    };

    /// No C0/C1 control character but the line breaks `allowed`, and no bidi override.
    fn assert_no_control(what: &str, text: &str, allowed: &[char]) {
        let bad = text.char_indices().find(|&(_, c)| {
            (c.is_control() && !allowed.contains(&c)) || ('\u{202a}'..='\u{202e}').contains(&c)
        });
        assert!(bad.is_none(), "{what}: {bad:?} in\n{text}");
    }

    #[test]
    fn hostile_strings_are_visible_escapes_in_the_text_report() {
        let text = render_text(&fixture::hostile());
        assert_no_control("text report", &text, &['\n']);
        // The line break of the command is `\n` (one_line), everywhere else `\x0a`.
        let escaped = "\\x1b]0;X\\x07evil\\x1b[31m\\u{9b}2J\\x00\\x0a\\u{202e}";
        let in_command = "cmd\\x1b]0;X\\x07evil\\x1b[31m\\u{9b}2J\\x00\\n\\u{202e}";
        assert!(
            text.contains(&format!("PID 4242: {in_command}\n")),
            "{text}"
        );
        for what in [
            "v", "frame", "phase", "function", "error", "cuda", "cause", "source", "mode",
        ] {
            let expected = format!("{what}{escaped}");
            assert!(text.contains(&expected), "no {expected:?} in\n{text}");
        }
    }

    #[test]
    fn json_escapes_every_control_character() {
        let json = render_json(&fixture::hostile());
        assert_no_control("JSON", &json, &['\n']);
        // C0 as serde_json writes it, C1 and the bidi override as escape::for_json does: the
        // same value read back.
        let value: serde_json::Value = serde_json::from_str(&json).unwrap();
        let escaped = r"cmd\u001b]0;X\u0007evil\u001b[31m\u009b2J\u0000\n\u202e";
        assert!(json.contains(escaped), "{json}");
        assert_eq!(value["target"]["command"], format!("cmd{HOSTILE}"));
    }

    #[test]
    fn svg_of_hostile_names_is_well_formed_xml_with_visible_escapes() {
        let rec = fixture::hostile();
        for kind in [Kind::Live, Kind::Faults] {
            let options = FlamegraphOptions {
                title: format!("title{HOSTILE}<&>"),
                kind,
                subtitle: None,
                note: Some(format!("phase {HOSTILE}")),
            };
            let svg = render_svg(&rec, &options).unwrap();
            fixture::assert_well_formed_xml(&svg);
            let svg = String::from_utf8(svg).unwrap();
            assert_no_control("SVG", &svg, &['\t', '\n', '\r']);
            for expected in [
                "title\\x1b]0;X\\x07evil\\x1b[31m\\u{9b}2J\\x00\\x0a\\u{202e}&lt;&amp;&gt;",
                "cmd\\x1b]0;X\\x07evil",
                // `;` separates frames in the folded format: a frame's own is `:`.
                "frame\\x1b]0:X\\x07evil\\x1b[31m",
            ] {
                assert!(svg.contains(expected), "{kind:?}: no {expected:?}");
            }
        }
        // The graph of nothing has its own writer: the same guarantees.
        let mut empty = fixture::empty(true);
        empty.target.command = format!("cmd{HOSTILE}<&>");
        let svg = render_svg(&empty, &FlamegraphOptions::default()).unwrap();
        fixture::assert_well_formed_xml(&svg);
        let svg = String::from_utf8(svg).unwrap();
        assert!(svg.contains("cmd\\x1b]0;X\\x07evil"), "{svg}");
        assert!(svg.contains("&lt;&amp;&gt;"), "{svg}");
    }

    #[test]
    fn human_bytes_uses_binary_units() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1024), "1.0 KiB");
        assert_eq!(human_bytes(76710), "74.9 KiB");
        assert_eq!(human_bytes(3 << 30), "3.0 GiB");
        assert_eq!(human_bytes(u64::MAX), "16384.0 PiB");
    }

    #[test]
    fn one_line_escapes_line_breaks() {
        assert_eq!(
            one_line("python3 -c \nimport x\n\tx.y()"),
            "python3 -c \\nimport x\\n\\tx.y()"
        );
        assert_eq!(one_line("plain"), "plain");
    }

    #[test]
    fn human_delta_is_signed() {
        assert_eq!(human_delta(2048), "+2.0 KiB");
        assert_eq!(human_delta(-100), "-100 B");
        assert_eq!(human_delta(0), "0 B");
    }
}
