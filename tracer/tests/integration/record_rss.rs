//! RSS reconciliation against a process whose memory is known by construction
//! (tests/fixtures/rss_fixture.c): mappings made with raw syscalls and fully touched must show
//! as class `mmap` at the mapping function, and the resident anonymous memory must grow by the
//! same bytes, within one page per mapping. Privileged: needs root and eBPF.

use std::{process::Command, time::Duration};

use crate::common::{
    Session, TestProcess, fixture, json_class_rows, json_rows_through, json_sum, report_value,
};

const MAPPINGS: u64 = 20;
const PAGES: u64 = 64;
const PAGE: u64 = 4096;

/// Runs the fixture (with `args`) under `record -p`, lets a resident sample see the end state,
/// and returns the JSON report.
fn record_fixture(args: &[&str]) -> serde_json::Value {
    let mut cmd = Command::new(fixture("rss_fixture"));
    cmd.args(args);
    let mut target = TestProcess::spawn("rss_fixture", cmd);
    target.expect_stdout("ready");
    // Without --heap: mappings alone, the production mode.
    let mut s = Session::attach_and_run(target, "rss", &[]);
    // Let a once-a-second resident sample see the touched pages.
    std::thread::sleep(Duration::from_millis(2200));
    s.end(libc::SIGINT);
    report_value(&s.trace)
}

#[test]
fn raw_syscall_mappings_explain_the_rss_growth() {
    require_privileges!();
    let r = record_fixture(&[]);
    let expected = MAPPINGS * PAGES * PAGE;
    let rows = json_class_rows(&r, "mmap", "map_and_touch");
    let (live, count) = (json_sum(&rows, "live_bytes"), json_sum(&rows, "live_count"));
    assert_eq!(
        (live, count),
        (expected, MAPPINGS),
        "mmap rows at map_and_touch: {r:#}"
    );
    assert_eq!(
        r["totals"]["heap"]["live_bytes"], 0,
        "no brk growth in the window: {r:#}"
    );

    let w = &r["rss"];
    let get = |k: &str| {
        w[k].as_i64()
            .unwrap_or_else(|| panic!("rss.{k} missing: {r:#}"))
    };
    // The waterfall adds up by definition...
    assert_eq!(
        get("rss"),
        get("file") + get("shmem") + get("anon"),
        "{w:#}"
    );
    assert_eq!(
        get("anon"),
        get("heap_live")
            + get("allocator_retained")
            + get("traced_mappings")
            + get("untraced_anon"),
        "{w:#}"
    );
    // ...and by measurement: the anonymous resident growth is the touched mappings, within one
    // page per mapping.
    let growth = get("anon_growth");
    let slack = (MAPPINGS * PAGE) as i64;
    assert!(
        (growth - expected as i64).abs() <= slack,
        "RssAnon grew {growth} B, traced {expected} B (slack {slack} B): {w:#}"
    );

    // Page-fault sampling (1 in 64 by default, per CPU) sees the same pages being touched, at
    // map_and_touch: exact up to a sample per CPU (the count may restart on another CPU).
    let faulted = json_sum(
        &json_rows_through(&r["page_faults"], "map_and_touch"),
        "bytes",
    );
    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get()) as u64;
    let sample = 64 * PAGE;
    assert!(
        faulted.abs_diff(expected) <= cpus * sample,
        "faulted in at map_and_touch: {faulted} B, touched {expected} B: {:#}",
        r["page_faults"]
    );
}

#[test]
fn madvise_releases_are_counted_by_stack_and_keep_the_mappings() {
    require_privileges!();
    let r = record_fixture(&["release"]);
    let released = json_sum(&json_rows_through(&r["released"], "release_half"), "bytes");
    let half = MAPPINGS * PAGES / 2 * PAGE;
    assert_eq!(released, half, "{:#}", r["released"]);
    // The mappings stay (live mapped bytes unchanged); their resident half went back.
    let w = &r["rss"];
    assert!(
        w["traced_mappings_mapped"].as_u64().unwrap() >= 2 * half,
        "{w:#}"
    );
    let resident = w["traced_mappings"].as_u64().unwrap();
    assert!(
        resident.abs_diff(half) <= MAPPINGS * PAGE,
        "traced resident {resident} B, expected {half} B: {w:#}"
    );
}
