//! Following the process tree: children forked after attach, and what they exec, are traced
//! from birth; every figure carries its PID; the recording lasts until the last one exits.
//! Fixture: tests/fixtures/proc_fixture.c. Privileged: needs root and eBPF.

use std::collections::BTreeSet;

use crate::common::{alloctrace_cmd, fixture, json_class_rows, json_sum, report_value, run};

/// `alloctrace record --heap -- proc_fixture MODE` to completion; the JSON report.
fn record_proc_fixture(mode: &str) -> serde_json::Value {
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("children.trace");
    let mut cmd = alloctrace_cmd(&["record", "--heap", "-o"]);
    cmd.arg(&trace)
        .arg("--")
        .arg(fixture("proc_fixture"))
        .arg(mode);
    let out = run("alloctrace record -- proc_fixture", cmd);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = report_value(&trace);
    assert_eq!(r["complete"], true, "{r:#}");
    r
}

/// The stack rows of `class` that pass through `child_leak`.
fn child_leak_rows<'a>(r: &'a serde_json::Value, class: &str) -> Vec<&'a serde_json::Value> {
    json_class_rows(r, class, "child_leak")
}

#[test]
fn forked_and_execed_children_are_traced_with_their_pids() {
    require_privileges!();
    let r = record_proc_fixture("run");
    let heap = child_leak_rows(&r, "heap");
    let mmap = child_leak_rows(&r, "mmap");
    // 3 + 4 + 7 leaks, each 1000 heap bytes and 2 mapped pages.
    assert_eq!(
        (json_sum(&heap, "live_bytes"), json_sum(&heap, "live_count")),
        (14 * 1000, 14),
        "{r:#}"
    );
    assert_eq!(
        (json_sum(&mmap, "live_bytes"), json_sum(&mmap, "live_count")),
        (14 * 2 * 4096, 14),
        "{r:#}"
    );

    // Three distinct child processes, each with its own exact figures.
    let mut per_pid: Vec<(u64, u64)> = Vec::new();
    let pids: BTreeSet<u64> = mmap.iter().map(|s| s["pid"].as_u64().unwrap()).collect();
    for pid in &pids {
        let rows: Vec<&serde_json::Value> = heap
            .iter()
            .copied()
            .filter(|s| s["pid"].as_u64() == Some(*pid))
            .collect();
        per_pid.push((json_sum(&rows, "live_count"), json_sum(&rows, "live_bytes")));
    }
    per_pid.sort();
    assert_eq!(per_pid, vec![(3, 3000), (4, 4000), (7, 7000)], "{r:#}");

    // The target list has the parent and its three children; the per-process totals agree.
    let target_pids: BTreeSet<u64> = r["target"]["pids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_u64().unwrap())
        .collect();
    assert_eq!(target_pids.len(), 4, "{r:#}");
    assert!(pids.is_subset(&target_pids), "{r:#}");
    for pid in &pids {
        let mmap_live = r["processes"][pid.to_string()]["mmap"]["live_bytes"]
            .as_u64()
            .unwrap();
        assert!(mmap_live >= 3 * 2 * 4096, "process {pid}: {r:#}");
    }
    let lost: u64 = r["lost_events"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert_eq!(lost, 0, "{r:#}");
}

/// Children that allocate from their first instructions (a forked one, and one that execs at
/// once): the heap probes cover every process mapping the allocator from the start, so nothing
/// they do before the recorder hears of them is missed.
#[test]
fn children_allocating_at_once_are_traced_from_their_first_instruction() {
    require_privileges!();
    let r = record_proc_fixture("at-once");
    let heap = child_leak_rows(&r, "heap");
    assert_eq!(
        (json_sum(&heap, "live_bytes"), json_sum(&heap, "live_count")),
        (10 * 1000, 10),
        "{r:#}"
    );
    let big = json_class_rows(&r, "heap", "child_big_leak");
    assert_eq!(
        (json_sum(&big, "live_bytes"), json_sum(&big, "live_count")),
        (16 << 20, 2),
        "{r:#}"
    );
    let pids: BTreeSet<u64> = (heap.iter().chain(&big))
        .map(|s| s["pid"].as_u64().unwrap())
        .collect();
    assert_eq!(pids.len(), 2, "{r:#}");
    // Nothing of the untraced processes that trapped meanwhile (the recorder's own tools, the
    // system's daemons) is in the recording: every stack row is a target's.
    let targets: BTreeSet<u64> = r["target"]["pids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_u64().unwrap())
        .collect();
    for row in r["stacks"].as_array().unwrap() {
        assert!(targets.contains(&row["pid"].as_u64().unwrap()), "{row:#}");
    }
}

#[test]
fn a_sigkilled_child_keeps_what_it_had_at_exit_and_the_recording_completes() {
    require_privileges!();
    let r = record_proc_fixture("killed");
    let rows = |class: &str| {
        let rows = child_leak_rows(&r, class);
        (json_sum(&rows, "live_bytes"), json_sum(&rows, "live_count"))
    };
    assert_eq!(rows("heap"), (5 * 1000, 5), "{r:#}");
    assert_eq!(rows("mmap"), (5 * 2 * 4096, 5), "{r:#}");
    assert_eq!(r["target"]["pids"].as_array().unwrap().len(), 2, "{r:#}");
}
