//! `alloctrace record -p PID` against the heap fixture: every scenario has an exact answer by
//! construction (see tests/fixtures/heap_fixture.c). Privileged: needs root, eBPF and uprobes.

use crate::common::{
    Cell, LEAKS, Report, Session, TestProcess, Totals, all_freed, all_live, fixture, leaks_totals,
    record_fixture_command, record_fixture_command_env, record_scenario, report_json, report_value,
    view,
};

#[test]
fn leaks_through_every_allocator_function_are_exact() {
    require_privileges!();
    let s = Session::run_scenario("leaks", "attach", &[]);
    let pid = s.target.pid();
    // Before the heap probes went on, the malloc calls were counted: the fixture waited on
    // its stdin then, making none.
    let stderr = s.recorder.stderr_text();
    assert!(
        stderr.contains(&format!(
            "heap cost: PID {pid} makes 0 malloc calls a second"
        )),
        "{stderr}"
    );
    let r = s.stop(libc::SIGINT);
    r.assert_well_formed(Some(pid));
    assert!(
        r.complete,
        "SIGINT must finalize the recording\n{}",
        r.summary()
    );
    assert!(
        r.target.command.contains("heap_fixture leaks"),
        "target.command\n{}",
        r.summary()
    );
    r.assert_leaks();
    r.assert_totals(leaks_totals());
    // The stack is walked past the leaking function all the way up to main.
    for (function, _, _) in LEAKS {
        for st in r.stacks_of(function) {
            assert_eq!(st.frames.get(1).map(String::as_str), Some("scenario_leaks"));
            assert!(st.frames.iter().any(|f| f == "main"), "{:?}", st.frames);
        }
    }
    assert!(r.failures.is_empty(), "no failures\n{}", r.summary());
    assert_eq!(r.unmatched_frees, 0, "{}", r.summary());
    r.assert_no_lost_events();
}

/// The heap probes go on multi-uprobe links where the kernel makes them (6.6 on), else on
/// perf-event uprobes, one per point: the same exact answer either way.
#[test]
fn perf_event_uprobes_give_the_same_exact_heap_as_multi_uprobe_links() {
    require_privileges!();
    let exe = fixture("heap_fixture");
    for env in [&[][..], &[("ALLOCTRACE_PERF_UPROBES", "1")][..]] {
        let dir = tempfile::tempdir().expect("temp dir");
        let r = record_fixture_command_env(dir.path(), &exe, "leaks", &["--heap"], env);
        r.assert_leaks();
        r.assert_totals(leaks_totals());
        assert_eq!(r.unmatched_frees, 0, "{env:?}\n{}", r.summary());
        r.assert_no_lost_events();
    }
}

#[test]
fn churn_that_frees_everything_leaves_nothing_live() {
    require_privileges!();
    let r = record_scenario("churn");
    r.assert_well_formed(None);
    assert!(r.complete);
    // 500 each of 16, 48, 96 and 256 bytes.
    r.assert_cell(
        "churn_pairs",
        Cell {
            live_bytes: 0,
            live_count: 0,
            allocated_bytes: 208_000,
            allocated_count: 2000,
        },
    );
    assert_churn_exact(&r);
    assert!(r.failures.is_empty(), "{}", r.summary());
}

/// The `churn` scenario's known answer: a batch of 500 blocks of 128 bytes live at once, then
/// 2000 malloc/free pairs; everything freed, every free matched, nothing lost.
fn assert_churn_exact(r: &Report) {
    r.assert_cell("churn_batch_alloc", all_freed(500, 128));
    r.assert_totals(Totals {
        live_bytes: 0,
        live_count: 0,
        peak_bytes: 64_000, // the 500 x 128 batch, live all at once
        allocated_bytes: 272_000,
        allocated_count: 2500,
        freed_count: 2500,
    });
    assert_eq!(r.unmatched_frees, 0, "{}", r.summary());
    r.assert_no_lost_events();
}

#[test]
fn frees_from_another_thread_balance_the_allocating_thread() {
    require_privileges!();
    let r = record_scenario("xthread");
    r.assert_well_formed(None);
    assert!(
        r.stacks_of("xthread_free").is_empty(),
        "free has no stack\n{}",
        r.summary()
    );
    assert_xthread_exact(&r);
}

/// The `xthread` scenario's known answer: 1000 blocks of 72 bytes live at once, all freed by
/// another thread; every free matched, nothing lost.
fn assert_xthread_exact(r: &Report) {
    r.assert_cell("xthread_alloc", all_freed(1000, 72));
    r.assert_totals(Totals {
        live_bytes: 0,
        live_count: 0,
        peak_bytes: 72_000,
        allocated_bytes: 72_000,
        allocated_count: 1000,
        freed_count: 1000,
    });
    assert_eq!(r.unmatched_frees, 0, "{}", r.summary());
    r.assert_no_lost_events();
}

#[test]
fn realloc_chains_leave_the_final_size_at_the_last_realloc() {
    require_privileges!();
    let r = record_scenario("realloc");
    r.assert_well_formed(None);
    // realloc(p, 0) returning NULL is a free, not a failure.
    r.assert_cell("zero_alloc", all_freed(5, 333));
    assert!(r.stacks_of("zero_free").is_empty(), "{}", r.summary());
    // 8 chains: malloc 24 -> realloc 20 (in place) -> 5000 -> 300000 (mmapped) -> 250000.
    r.assert_cell("chain_start", all_freed(8, 24));
    r.assert_cell("chain_in_place", all_freed(8, 20));
    r.assert_cell("chain_grow", all_freed(8, 5000));
    r.assert_cell("chain_big", all_freed(8, 300_000));
    r.assert_cell("chain_final", all_live(8, 250_000));
    r.assert_totals(Totals {
        live_bytes: 2_000_000,
        live_count: 8,
        // The last chain's 300000-byte step on top of 7 finished chains.
        peak_bytes: 7 * 250_000 + 300_000,
        allocated_bytes: 5 * 333 + 8 * (24 + 20 + 5000 + 300_000 + 250_000),
        allocated_count: 5 + 8 * 5,
        freed_count: 5 + 8 * 4,
    });
    assert!(r.failures.is_empty(), "no failures\n{}", r.summary());
    assert_eq!(r.unmatched_frees, 0, "{}", r.summary());
    r.assert_no_lost_events();
}

#[test]
fn failed_allocations_are_failures_and_never_live() {
    require_privileges!();
    let r = record_scenario("failures");
    r.assert_well_formed(None);
    // (caller, function, requested size, calls, error)
    let expected: [(&str, &str, u64, u64, &str); 4] = [
        ("fail_malloc", "malloc", 1 << 63, 3, "ENOMEM"),
        // (2^63 - 1) * 4 overflows: the request is reported saturated.
        ("fail_calloc", "calloc", u64::MAX, 2, "ENOMEM"),
        ("fail_posix_memalign", "posix_memalign", 100, 4, "EINVAL"),
        ("fail_realloc", "realloc", 1 << 63, 1, "ENOMEM"),
    ];
    for (caller, function, size, count, error) in expected {
        let rows: Vec<_> = r
            .failures
            .iter()
            .filter(|f| f.frames.first().map(String::as_str) == Some(caller))
            .collect();
        assert_eq!(
            rows.len(),
            1,
            "one failure row for {caller}\n{}",
            r.summary()
        );
        let f = rows[0];
        assert_eq!(
            (
                f.class.as_str(),
                f.function.as_str(),
                f.size,
                f.count,
                f.error.as_str()
            ),
            ("heap", function, size, count, error),
            "failure at {caller}\n{}",
            r.summary()
        );
        assert!(r.stacks_of(caller).is_empty(), "{caller} is never live");
    }
    assert_eq!(r.failures.len(), 4, "{}", r.summary());
    // The block whose realloc failed stays live until its free.
    r.assert_cell("fail_realloc_base", all_freed(1, 50));
    r.assert_totals(Totals {
        live_bytes: 0,
        live_count: 0,
        peak_bytes: 50,
        allocated_bytes: 50,
        allocated_count: 1,
        freed_count: 1,
    });
    assert_eq!(r.unmatched_frees, 0, "{}", r.summary());
    r.assert_no_lost_events();
}

#[test]
fn frees_of_blocks_allocated_before_attach_are_unmatched() {
    require_privileges!();
    let r = record_scenario("unmatched");
    r.assert_well_formed(None);
    assert_eq!(r.unmatched_frees, 25, "{}", r.summary());
    assert!(
        r.stacks_of("pre_attach_alloc").is_empty(),
        "{}",
        r.summary()
    );
    r.assert_cell("leak_malloc", all_live(10, 100));
    r.assert_totals(Totals {
        live_bytes: 1000,
        live_count: 10,
        peak_bytes: 1000,
        allocated_bytes: 1000,
        allocated_count: 10,
        freed_count: 0,
    });
    r.assert_no_lost_events();
}

#[test]
fn many_threads_leak_an_exact_total() {
    require_privileges!();
    let r = record_scenario("threads");
    r.assert_well_formed(None);
    // 8 threads x 1000 x 40 bytes.
    r.assert_cell("thread_leak", all_live(8000, 40));
    r.assert_totals(Totals {
        live_bytes: 320_000,
        live_count: 8000,
        peak_bytes: 320_000,
        allocated_bytes: 320_000,
        allocated_count: 8000,
        freed_count: 0,
    });
    assert_eq!(r.unmatched_frees, 0, "{}", r.summary());
    r.assert_no_lost_events();
}

/// `--heap-sample`: each allocation recorded with probability `p = 1 − exp(−size / mean)` and
/// counted as `size / p` bytes. Blocks of 16 means and more are always recorded (exact), churn
/// leaves nothing (frees of unrecorded blocks never reach user space, those of recorded ones
/// do), a realloc of an unrecorded block is a new allocation, and 100000 small blocks are
/// estimated within five standard deviations of the sampling error (`n s² (1 − p) / p`). The
/// same on uprobe sessions (an unsampled call's return not probed; this kernel has them) and on
/// perf-event uprobes (every return probed).
#[test]
fn sampled_heap_estimates_are_exact_for_large_blocks_and_within_the_sampling_error() {
    require_privileges!();
    for env in [&[][..], &[("ALLOCTRACE_PERF_UPROBES", "1")][..]] {
        sampled_heap_estimates(env);
    }
}

fn sampled_heap_estimates(env: &[(&str, &str)]) {
    let dir = tempfile::tempdir().unwrap();
    let args = ["--heap", "--heap-sample", "65536"];
    let exe = fixture("heap_fixture");
    let r = record_fixture_command_env(dir.path(), &exe, "sampled", &args, env);
    let live = |f: &str| live_under(&r, f);
    assert_eq!(live("sample_large"), (20 << 21, 20), "{}", r.summary());
    assert_eq!(live("sample_churn"), (0, 0), "{}", r.summary());
    assert_eq!(live("sample_grow"), (100 << 20, 100), "{}", r.summary());
    assert_sampled_estimate(&r, "sample_small", (100_000.0, 1000.0), 65536.0);
    let (_, recorded) = live("sample_small");
    // A sample: about n·p = 1514 blocks recorded (sd 39), not 100000.
    assert!(
        (1300..1750).contains(&recorded),
        "{recorded}\n{}",
        r.summary()
    );
    assert_eq!(r.unmatched_frees, 0, "{}", r.summary());
    r.assert_no_lost_events();
}

/// Live bytes and blocks of the stacks under function `f`.
fn live_under(r: &Report, f: &str) -> (u64, u64) {
    let rows = r.stacks_of(f);
    (
        rows.iter().map(|s| s.live_bytes).sum(),
        rows.iter().map(|s| s.live_count).sum(),
    )
}

/// The live bytes under `f` estimate `n` blocks of `size` bytes, sampled at `mean` bytes, within
/// five standard deviations of the sampling error (`n s² (1 − p) / p`).
fn assert_sampled_estimate(r: &Report, f: &str, (n, size): (f64, f64), mean: f64) {
    let p = 1.0 - (-size / mean).exp();
    let sd = (n * size * size * (1.0 - p) / p).sqrt();
    let (estimate, _) = live_under(r, f);
    assert!(
        (estimate as f64 - n * size).abs() <= 5.0 * sd,
        "{f}: estimate {estimate} for {} (sd {sd:.0})\n{}",
        n * size,
        r.summary()
    );
}

/// The kernel's heap ledger: two threads make ten million traced calls at once, through a
/// ring buffer of one MiB. After the first block of each stack, blocks are held and counted in
/// the kernel and their frees matched there: nothing is lost, the figures are exact, and the
/// recorder handled a few hundred records, not millions.
#[test]
fn ten_million_calls_from_two_threads_lose_nothing() {
    require_privileges!();
    let s = Session::run_scenario("flood", "attach", &["--ring-size", "1"]);
    let r = s.stop(libc::SIGINT);
    r.assert_well_formed(None);
    r.assert_no_lost_events();
    r.assert_cell("flood_leak", all_live(100, 4096));
    // 2 x 2,500,000 pairs of 64, 96, 128, 160 bytes in turn.
    r.assert_cell(
        "flood_churn",
        Cell {
            live_bytes: 0,
            live_count: 0,
            allocated_bytes: 560_000_000,
            allocated_count: 5_000_000,
        },
    );
    let heap = r.totals.get("heap").copied().unwrap_or_default();
    assert_eq!(
        (heap.live_bytes, heap.live_count, heap.allocated_count),
        (409_600, 100, 5_000_100),
        "{}",
        r.summary()
    );
    // The kernel's peak: the leaks and at most one churn block per thread on top.
    assert!(
        (409_600..=409_600 + 2 * 160).contains(&heap.peak_bytes),
        "peak {}\n{}",
        heap.peak_bytes,
        r.summary()
    );
    let capture = r.stack_capture.as_ref().expect("stack capture figures");
    assert!(capture.kernel_heap_stacks >= 2, "{}", r.summary());
    assert_eq!(capture.kernel_heap_full, 0, "{}", r.summary());
}

/// A kernel ledger too small for the live blocks: the blocks past it go through the ring to
/// user space, counted in the report, and every figure stays exact.
#[test]
fn a_full_kernel_ledger_sends_blocks_through_the_ring_and_stays_exact() {
    require_privileges!();
    let mut s = Session::run_scenario("leaks", "attach", &["--heap-ledger-blocks", "16"]);
    s.end(libc::SIGINT);
    let r = report_json(&s.trace);
    r.assert_well_formed(None);
    r.assert_leaks();
    r.assert_totals(leaks_totals());
    r.assert_no_lost_events();
    let capture = r.stack_capture.as_ref().expect("stack capture figures");
    assert!(capture.kernel_heap_full > 0, "{}", r.summary());
    let text = String::from_utf8_lossy(&view(&["report"], &s.trace)).into_owned();
    assert!(
        text.contains("it was full for"),
        "the report says so\n{text}"
    );
}

/// A kernel ledger too small while the ring fills: past a quarter-full ring, the blocks the
/// ledger has no room for go through the ring byte-sampled (at `FULL_SAMPLE_MEAN`, forced here
/// whatever the ring holds with the hidden `--heap-full-sample-always`), each counted as
/// `size / p`, the others counted left out. The `sampled` scenario's figures are then estimates
/// within five standard deviations of the sampling error (`n s² (1 − p) / p`), churn leaves
/// nothing, the report says what was left out, and nothing is lost.
#[test]
fn a_full_kernel_ledger_degrades_to_sampling_and_says_so() {
    require_privileges!();
    let dir = tempfile::tempdir().unwrap();
    let args = [
        "--heap",
        "--heap-ledger-blocks",
        "16",
        "--heap-full-sample-always",
    ];
    let exe = fixture("heap_fixture");
    let r = record_fixture_command_env(dir.path(), &exe, "sampled", &args, &[]);
    let mean = f64::from(tracer_common::heap_ledger::FULL_SAMPLE_MEAN);
    assert_sampled_estimate(&r, "sample_small", (100_000.0, 1000.0), mean);
    assert_sampled_estimate(&r, "sample_large", (20.0, f64::from(2u32 << 20)), mean);
    assert_eq!(live_under(&r, "sample_churn"), (0, 0), "{}", r.summary());
    // About n·p = 191 of the 100000 small blocks sent (sd 14), not all of them.
    let (_, recorded) = live_under(&r, "sample_small");
    assert!(
        (100..300).contains(&recorded),
        "{recorded}\n{}",
        r.summary()
    );
    let capture = r.stack_capture.as_ref().expect("stack capture figures");
    assert!(capture.kernel_heap_sampled_out > 100_000, "{}", r.summary());
    // The frees of blocks left out reach user space as frees of blocks it never saw.
    assert!(
        r.unmatched_frees <= capture.kernel_heap_sampled_out,
        "{}",
        r.summary()
    );
    r.assert_no_lost_events();
    let trace = dir.path().join("sampled.trace");
    let text = String::from_utf8_lossy(&view(&["report"], &trace)).into_owned();
    assert!(text.contains("left out"), "the report says so\n{text}");
}

/// Small kernel ledgers: the blocks live at once fill the recent slots, then the hash table,
/// then go through the ring; blocks freed by another thread, and reallocated ones, are found
/// wherever they are held, and every figure stays exact (the peak, once blocks went through the
/// ring, is the higher of the kernel's and user space's, as docs/accounting.md says).
#[test]
fn recent_slots_hash_table_and_ring_together_stay_exact() {
    require_privileges!();
    // 512 blocks: 32 recent slots, 480 in the hash table.
    let small = ["--heap-ledger-blocks", "512"];
    // 500 blocks of 128 bytes live at once (slots and hash table), then 2000 pairs.
    let r = Session::run_scenario("churn", "attach", &small).stop(libc::SIGINT);
    assert_churn_exact(&r);
    // Realloc chains: the old block released wherever it is held.
    let r = Session::run_scenario("realloc", "attach", &small).stop(libc::SIGINT);
    r.assert_cell("chain_start", all_freed(8, 24));
    r.assert_cell("chain_in_place", all_freed(8, 20));
    r.assert_cell("chain_final", all_live(8, 250_000));
    assert_eq!(r.unmatched_frees, 0, "{}", r.summary());
    r.assert_no_lost_events();
    // 1000 blocks live at once, freed by another thread: 128 slots and the hash table.
    let r = Session::run_scenario("xthread", "attach", &["--heap-ledger-blocks", "2048"])
        .stop(libc::SIGINT);
    assert_xthread_exact(&r);
    // 8 threads leaking 8000 blocks: past the 512 the kernel holds, through the ring.
    let r = Session::run_scenario("threads", "attach", &small).stop(libc::SIGINT);
    r.assert_cell("thread_leak", all_live(8000, 40));
    let heap = &r.totals["heap"];
    assert_eq!(
        (
            heap.live_bytes,
            heap.live_count,
            heap.allocated_count,
            heap.freed_count
        ),
        (320_000, 8000, 8000, 0),
        "{}",
        r.summary()
    );
    assert!(
        (7488 * 40..=320_000).contains(&heap.peak_bytes),
        "the peak is user space's part at least\n{}",
        r.summary()
    );
    let capture = r.stack_capture.as_ref().expect("stack capture figures");
    assert!(capture.kernel_heap_full > 0, "{}", r.summary());
    assert_eq!(r.unmatched_frees, 0, "{}", r.summary());
    r.assert_no_lost_events();
}

/// The `requests` fixture recorded in `dir` with a duty-cycled heap: the probes on a fifth of
/// the time, windows of 0.2 s, graces of 0.3 s at most, and `extra` flags. Its report (no event
/// lost) and its `heap_duty` figures.
fn record_duty_cycled_requests(
    dir: &std::path::Path,
    extra: &[&str],
) -> (Report, serde_json::Value) {
    let mut args = vec![
        "--heap",
        "--heap-duty",
        "20",
        "--heap-window",
        "0.2",
        "--heap-grace",
        "0.3",
    ];
    args.extend_from_slice(extra);
    let r = record_fixture_command(dir, &fixture("heap_fixture"), "requests", &args);
    r.assert_no_lost_events();
    let json = report_value(&dir.join("requests.trace"));
    let duty = json["stack_capture"]["heap_duty"].clone();
    (r, duty)
}

/// A duty-cycled heap (`--heap-duty`): the heap probes attached a fifth of the time, in
/// windows of 0.2 s with at most 0.3 s of grace. A server leaking 512 bytes per request at 1000
/// requests a second is found from the windows alone: every block remember_request made in a
/// window survived it, and the survivors over the windows' time give its leak rate; the churn
/// of each request leaves nothing; the program break the allocator grows between windows is
/// not counted on top. The churn dies within a millisecond: each grace ends once the window's
/// blocks stop dying, after its first two steps of 50 ms, not at its 0.3 s.
#[test]
fn a_duty_cycled_heap_finds_a_steady_leak_and_its_rate_and_leaves_churn() {
    require_privileges!();
    let dir = tempfile::tempdir().unwrap();
    let (r, duty) = record_duty_cycled_requests(dir.path(), &[]);
    let cells = |f: &str| -> (u64, u64, u64) {
        let rows = r.stacks_of(f);
        let sum = |get: fn(&crate::common::StackRow) -> u64| rows.iter().map(|s| get(s)).sum();
        (
            sum(|s| s.live_bytes),
            sum(|s| s.live_count),
            sum(|s| s.allocated_count),
        )
    };
    let (leaked, survivors, made) = cells("remember_request");
    assert!(survivors > 0, "{}", r.summary());
    assert_eq!((leaked, survivors), (512 * made, made), "{}", r.summary());
    let (churn_live, _, churn_made) = cells("request_churn");
    assert_eq!(churn_live, 0, "{}", r.summary());
    assert!(churn_made >= 20, "{}", r.summary());
    // Nothing else in the heap class: the survivors are all of it.
    let heap = r.totals.get("heap").copied().unwrap_or_default();
    assert_eq!(heap.live_bytes, leaked, "{}", r.summary());
    let (windows, on_s) = (
        duty["windows"].as_u64().unwrap(),
        duty["on_s"].as_f64().unwrap(),
    );
    assert!(windows >= 2, "{duty}");
    let grace_taken = duty["grace_taken_s"].as_f64().unwrap();
    assert!((0.1..0.3).contains(&grace_taken), "{duty}");
    // 512 bytes a request, 1000 requests a second: 512000 bytes a second.
    let rate = leaked as f64 / on_s;
    assert!(
        (rate - 512_000.0).abs() <= 0.25 * 512_000.0,
        "leak rate {rate:.0} B/s over {on_s:.2} s of windows\n{duty}"
    );
    let text = String::from_utf8_lossy(&view(&["report"], &dir.path().join("requests.trace")))
        .into_owned();
    let survivors_section = text
        .split("Heap survivors (duty-cycled)")
        .nth(1)
        .unwrap_or_default();
    let first = survivors_section.lines().nth(1).unwrap_or_default();
    assert!(first.contains("remember_request"), "{text}");
    // A block leaked per request rises in every window that sees requests: all but perhaps
    // the last, cut short by the end of the recording.
    let rose_in = format!("rose in {} of {windows} windows", windows.saturating_sub(1));
    let rose_in_all = format!("rose in {windows} of {windows} windows");
    assert!(
        first.contains(&rose_in_all) || first.contains(&rose_in),
        "{first}\n{text}"
    );
}

/// A duty-cycled heap without the kernel's ledger (`--stack dwarf`: every block through the
/// ring): nothing counts the window's blocks dying, so each grace lasts its full `--heap-grace`;
/// the leak is found all the same, and the churn leaves nothing.
#[test]
fn without_the_kernel_ledger_a_grace_lasts_its_full_time() {
    require_privileges!();
    let dir = tempfile::tempdir().unwrap();
    let (r, duty) = record_duty_cycled_requests(dir.path(), &["--stack", "dwarf"]);
    let live_under = |f: &str| -> u64 { r.stacks_of(f).iter().map(|s| s.live_bytes).sum() };
    assert!(live_under("remember_request") > 0, "{}", r.summary());
    assert_eq!(live_under("request_churn"), 0, "{}", r.summary());
    assert!(duty["windows"].as_u64().unwrap() >= 2, "{duty}");
    assert!(duty["grace_taken_s"].as_f64().unwrap() >= 0.3, "{duty}");
}

/// Leak suspects from a whole recording: a server leaking 512 bytes per request at 1000
/// requests a second, traced exactly, has one stack whose live bytes rose in every batch after
/// the warm-up, `remember_request`, at about 512000 bytes a second; the churn of each request
/// (allocated and freed) is no suspect. The text report names it first.
#[test]
fn a_steady_per_request_leak_is_the_first_suspect_with_its_rate() {
    require_privileges!();
    let dir = tempfile::tempdir().unwrap();
    let exe = fixture("heap_fixture");
    let r = record_fixture_command(dir.path(), &exe, "requests", &["--heap"]);
    r.assert_no_lost_events();
    let trace = dir.path().join("requests.trace");
    let json = report_value(&trace);
    let suspects = &json["suspects"];
    let stacks = suspects["stacks"].as_array().expect("judged");
    assert_eq!(suspects["batches"].as_u64(), Some(4), "{suspects}");
    let frames = |s: &serde_json::Value| {
        (s["frames"].as_array().unwrap().iter())
            .map(|f| f.as_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    let first = &stacks[0];
    assert_eq!(first["class"].as_str(), Some("heap"), "{suspects}");
    assert_eq!(
        json["verdict"][0]["category"], "leaks",
        "{}",
        json["verdict"]
    );
    assert_eq!(frames(first)[0], "remember_request", "{suspects}");
    let rate = first["bytes_per_s"].as_f64().unwrap();
    assert!(
        (rate - 512_000.0).abs() <= 0.25 * 512_000.0,
        "leak rate {rate:.0} B/s\n{suspects}"
    );
    let means: Vec<u64> = (first["batch_means"].as_array().unwrap().iter())
        .map(|m| m.as_u64().unwrap())
        .collect();
    assert!(means.windows(2).all(|w| w[1] > w[0]), "{suspects}");
    assert!(
        stacks
            .iter()
            .all(|s| !frames(s).iter().any(|f| f == "request_churn")),
        "churn is no suspect\n{suspects}"
    );
    let text = String::from_utf8_lossy(&view(&["report"], &trace)).into_owned();
    let section = text.split("Leak suspects: live").nth(1).unwrap_or_default();
    let line = section.lines().nth(1).unwrap_or_default();
    assert!(line.contains("remember_request"), "{text}");
    // The leaks flame graph is the suspects' growth: remember_request's, nothing of the churn.
    let svg_path = dir.path().join("leaks.svg");
    let svg_arg = svg_path.to_str().unwrap();
    view(&["flamegraph", "--kind", "leaks", "-o", svg_arg], &trace);
    let svg = std::fs::read_to_string(&svg_path).unwrap();
    assert!(svg.contains("remember_request"), "{svg}");
    assert!(!svg.contains("request_churn"), "{svg}");
    // The differential graph of the end against second 1: the leak drawn as grown.
    let since_path = dir.path().join("since.svg");
    let args = [
        "flamegraph",
        "--since",
        "1",
        "-o",
        since_path.to_str().unwrap(),
    ];
    view(&args, &trace);
    let since = std::fs::read_to_string(&since_path).unwrap();
    assert!(since.contains("remember_request") && since.contains("after against before"));
    // A warm-up given: judged from there, the same leak first.
    let json = view(&["report", "--format", "json", "--warmup", "1"], &trace);
    let json: serde_json::Value = serde_json::from_slice(&json).unwrap();
    assert_eq!(json["suspects"]["from_s"].as_f64(), Some(1.0), "{json}");
    assert_eq!(
        json["suspects"]["stacks"][0]["frames"][0],
        "remember_request"
    );
}

/// `--heap-budget`: the first window measures the heap calls and the CPU time they cost; the
/// period chosen spreads a cycle's expected slowdown (window and grace) to the budget. The leak
/// is still found.
#[test]
fn a_heap_budget_chooses_the_duty_from_what_the_first_window_measured() {
    require_privileges!();
    let dir = tempfile::tempdir().unwrap();
    let args = ["--heap", "--heap-budget", "5", "--heap-window", "0.2"];
    let exe = fixture("heap_fixture");
    let r = record_fixture_command(dir.path(), &exe, "requests", &args);
    r.assert_no_lost_events();
    let json = report_value(&dir.path().join("requests.trace"));
    let duty = &json["stack_capture"]["heap_duty"];
    let (chosen, share) = (
        duty["duty"].as_f64().unwrap(),
        duty["probe_share"].as_f64().unwrap(),
    );
    assert_eq!(duty["budget_percent"].as_f64(), Some(5.0), "{duty}");
    // 21 mallocs and 20 frees a millisecond: the probes take a good share of the time.
    assert!(
        share > 0.05 && duty["calls_per_s"].as_f64().unwrap() > 20_000.0,
        "{duty}"
    );
    // A cycle costs its window of 0.2 s with every probe on, the allocation probes' detach
    // (as timed, 75 ms until one was) with their traps alone, and its grace with the free
    // probe alone, as long as the last graces lasted (at most 0.5 s). The shares come from the kernel's count of the programs' run time,
    // the probes' counts of calls and frees, and the trap's cost measured on the process.
    // Each share is measured over a span of its own: measured (above 0, below the 0.99 cap),
    // not compared with the window's, which a preempted probe in one span on a loaded machine
    // can turn around (seen once beside CI's fuzzing). The unit tests of `heap_duty::shares`
    // check each share's figure on fixed spans.
    let free_share = duty["free_probe_share"].as_f64().unwrap();
    let detach_share = duty["detach_probe_share"].as_f64().unwrap();
    assert!(free_share > 0.0 && free_share < 0.99, "{duty}");
    assert!(detach_share > 0.0 && detach_share < 0.99, "{duty}");
    assert!(duty["trap_ns"].as_f64().unwrap() > 0.0, "{duty}");
    let detach = match duty["detach_s"].as_f64().unwrap() {
        0.0 => 0.075,
        timed => timed,
    };
    let slowdown = |f: f64| f / (1.0 - f);
    let grace = duty["grace_taken_s"].as_f64().unwrap();
    assert!(grace > 0.0 && grace <= 0.5 + 0.1, "{duty}");
    let cost =
        0.2 * slowdown(share) + detach * slowdown(detach_share) + grace * slowdown(free_share);
    let expected = (0.2 / (cost / 0.05)).clamp(0.001, 1.0);
    assert!((chosen - expected).abs() < 1e-9, "{duty}");
    assert!(chosen < 1.0, "{duty}");
    let leaked: u64 = r
        .stacks_of("remember_request")
        .iter()
        .map(|s| s.live_bytes)
        .sum();
    assert!(leaked > 0, "{}", r.summary());
}

/// `--max-memory` below what the recorder needs from the start (1 MiB): it drops its caches,
/// then records events without their stacks, under one frame that says so. Every figure stays
/// exact and the report says what was given up.
#[test]
fn over_max_memory_the_recorder_keeps_every_figure_and_gives_up_stacks() {
    require_privileges!();
    let mut s = Session::run_scenario("leaks", "attach", &["--max-memory", "1"]);
    s.end(libc::SIGINT);
    let r = report_json(&s.trace);
    r.assert_well_formed(None);
    r.assert_totals(leaks_totals());
    r.assert_no_lost_events();
    let heap_rows: Vec<_> = r.stacks.iter().filter(|s| s.class == "heap").collect();
    assert!(!heap_rows.is_empty(), "{}", r.summary());
    for row in heap_rows {
        assert_eq!(
            row.frames,
            ["[stack not kept: tracer over --max-memory]"],
            "{}",
            r.summary()
        );
    }
    let json = report_value(&s.trace);
    let limit = &json["stack_capture"]["memory_limit"];
    assert_eq!(limit["limit_bytes"], 1 << 20, "{limit}");
    assert!(limit["caches_dropped"].as_u64() >= Some(1), "{limit}");
    assert!(limit["stacks_not_kept"].as_u64() >= Some(1), "{limit}");
    let text = String::from_utf8_lossy(&view(&["report"], &s.trace)).into_owned();
    assert!(
        text.contains("Tracer memory limit (--max-memory 1.0 MiB) reached"),
        "{text}"
    );
}

/// `--phase`: what each phase's calls allocated, still live or freed (within the phase or in
/// another), exact, in both heap paths: the kernel's heap ledger (frame-pointer heap stacks) and
/// every block through the ring (`--stack dwarf`). Nested phases stack, and a phase ends when
/// its call returns (no return probe: the stacks keep every caller).
#[test]
fn phases_split_live_memory_by_the_request_phase_that_allocated_it() {
    require_privileges!();
    let exe = fixture("heap_fixture");
    let rules = [
        "--phase",
        "load=heap_fixture:load_model",
        "--phase",
        "serve=heap_fixture:serve_request",
        "--phase",
        "decode=heap_fixture:decode_step",
    ];
    for mode in [&["--heap"][..], &["--heap", "--stack", "dwarf"]] {
        let dir = tempfile::tempdir().unwrap();
        let args: Vec<&str> = mode.iter().chain(&rules).copied().collect();
        let r = record_fixture_command(dir.path(), &exe, "phases", &args);
        r.assert_no_lost_events();
        let trace = dir.path().join("phases.trace");
        let json = report_value(&trace);
        let phases = &json["phases"];
        let entries: Vec<(&str, u64)> = (phases["rules"].as_array().unwrap().iter())
            .map(|r| (r["name"].as_str().unwrap(), r["entries"].as_u64().unwrap()))
            .collect();
        assert_eq!(
            entries,
            [("load", 1), ("serve", 50), ("decode", 50)],
            "{mode:?}"
        );
        // The same entries, second by second (the timeline's bands).
        let mut by_second: std::collections::BTreeMap<&str, u64> = Default::default();
        for a in phases["activity"].as_array().unwrap() {
            *by_second.entry(a["phase"].as_str().unwrap()).or_default() +=
                a["entries"].as_u64().unwrap();
        }
        let expected = [("decode", 50), ("load", 1), ("serve", 50)];
        assert_eq!(
            by_second.into_iter().collect::<Vec<_>>(),
            expected,
            "{phases}"
        );
        let row = |name: &str| {
            let rows = phases["by_phase"].as_array().unwrap();
            let row = rows.iter().find(|r| r["phase"] == name).unwrap();
            let n = |f: &str| row[f].as_u64().unwrap();
            [
                n("live_bytes"),
                n("live_count"),
                n("allocated_bytes"),
                n("freed_within_bytes"),
                n("freed_within_count"),
                n("freed_elsewhere_bytes"),
                n("freed_elsewhere_count"),
            ]
        };
        // serve: 40 x 512 (heap) and 64 KiB mapped live; 200 x 1000 churned within; 10 x 512
        // freed after the requests, outside every phase.
        let serve = [
            86_016,
            41,
            200_000 + 25_600 + 65_536,
            200_000,
            200,
            5_120,
            10,
        ];
        assert_eq!(row("serve"), serve, "{mode:?}\n{phases}");
        assert_eq!(row("decode"), [12_800, 50, 12_800, 0, 0, 0, 0], "{mode:?}");
        let load = [1_048_576, 1, 1_048_576, 0, 0, 0, 0];
        assert_eq!(row("load"), load, "{mode:?}");
        let frees: Vec<(&str, &str, &str, u64, u64)> = (phases["frees"].as_array().unwrap())
            .iter()
            .map(|f| {
                let s = |k: &str| f[k].as_str().unwrap();
                let n = |k: &str| f[k].as_u64().unwrap();
                (
                    s("class"),
                    s("allocated_in"),
                    s("freed_in"),
                    n("bytes"),
                    n("count"),
                )
            })
            .collect();
        assert_eq!(
            frees,
            [
                ("heap", "serve", "none", 5_120, 10),
                ("heap", "serve", "serve", 200_000, 200)
            ],
            "{mode:?}"
        );
        // Each live stack in its phase, with the caller of the phase's function still there.
        let stack = |first: &str| {
            let stacks = json["stacks"].as_array().unwrap();
            let s = (stacks.iter())
                .find(|s| s["frames"].as_array().unwrap().iter().any(|f| f == first))
                .unwrap_or_else(|| panic!("no stack with {first}"));
            let frames: Vec<&str> = (s["frames"].as_array().unwrap().iter())
                .map(|f| f.as_str().unwrap())
                .collect();
            assert!(frames.contains(&"scenario_phases"), "{frames:?}");
            (
                s["class"].as_str().unwrap().to_string(),
                s["phase"].as_str().unwrap().to_string(),
                s["live_bytes"].as_u64().unwrap(),
            )
        };
        let own = |c: &str, p: &str, n| (c.to_string(), p.to_string(), n);
        assert_eq!(stack("serve_leak"), own("heap", "serve", 20_480));
        assert_eq!(stack("decode_step"), own("heap", "decode", 12_800));
        assert_eq!(stack("load_model"), own("heap", "load", 1_048_576));
        assert_eq!(stack("serve_map"), own("mmap", "serve", 65_536));
        let text = String::from_utf8_lossy(&view(&["report"], &trace)).into_owned();
        assert!(text.contains("\nPhases: memory by the phase"), "{text}");
        assert!(
            text.contains("heap allocated in serve was freed in none: 5.0 KiB in 10 blocks"),
            "{text}"
        );
        // The flame graph of one phase: serve's stacks, none of load's.
        let svg_path = dir.path().join("serve.svg");
        let args = ["flamegraph", "--phase", "serve", "--layer", "host", "-o"];
        view(&[&args[..], &[svg_path.to_str().unwrap()]].concat(), &trace);
        let svg = std::fs::read_to_string(&svg_path).unwrap();
        assert!(
            svg.contains("serve_leak") && svg.contains("only class heap"),
            "{svg}"
        );
        assert!(!svg.contains("load_model"), "{svg}");
    }
}

/// The idle phase: what a process allocates outside every phase once it has shown no activity
/// for `--idle-after` ms is idle; right after a request, or before the first one (start-up), it
/// is none. In both heap paths, and with the idle phase off.
#[test]
fn memory_allocated_with_no_request_in_flight_is_idle() {
    require_privileges!();
    let exe = fixture("heap_fixture");
    let rule = ["--phase", "serve=heap_fixture:serve_request"];
    let cases: [(&[&str], &str); 3] = [
        (&["--heap", "--idle-after", "100"], "idle"),
        (
            &["--heap", "--stack", "dwarf", "--idle-after", "100"],
            "idle",
        ),
        (&["--heap", "--idle-after", "0"], "none"),
    ];
    for (mode, idle) in cases {
        let dir = tempfile::tempdir().unwrap();
        let args: Vec<&str> = mode.iter().chain(&rule).copied().collect();
        let r = record_fixture_command(dir.path(), &exe, "idle", &args);
        r.assert_no_lost_events();
        let json = report_value(&dir.path().join("idle.trace"));
        let phase_of = |first: &str| {
            let stacks = json["stacks"].as_array().unwrap();
            let s = (stacks.iter())
                .find(|s| s["frames"].as_array().unwrap().iter().any(|f| f == first))
                .unwrap_or_else(|| panic!("no stack with {first}"));
            (
                s["phase"].as_str().unwrap().to_string(),
                s["live_bytes"].as_u64().unwrap(),
                s["live_count"].as_u64().unwrap(),
            )
        };
        let own = |p: &str, bytes, count| (p.to_string(), bytes, count);
        assert_eq!(phase_of("idle_leak"), own(idle, 2_100, 3), "{mode:?}");
        assert_eq!(phase_of("after_requests"), own("none", 900, 3), "{mode:?}");
        assert_eq!(phase_of("before_requests"), own("none", 400, 1), "{mode:?}");
        assert_eq!(phase_of("serve_leak"), own("serve", 2_560, 5), "{mode:?}");
        let rows = json["phases"]["by_phase"].as_array().unwrap();
        let idle_row = rows.iter().find(|r| r["phase"] == "idle");
        match idle {
            "idle" => {
                let row = idle_row.unwrap_or_else(|| panic!("no idle row: {rows:?}"));
                assert_eq!(row["live_bytes"], 2_100, "{row}");
                assert_eq!(row["live_count"], 3, "{row}");
            }
            _ => assert!(idle_row.is_none(), "{rows:?}"),
        }
    }
}

/// A phase rule whose library the target loads after attach (dlopen) is pending until a traced
/// process maps it, then attached within a second: the calls made after that are in its phase,
/// exact, with their entries.
#[test]
fn a_phase_rule_on_a_library_loaded_later_is_attached_when_it_is_mapped() {
    require_privileges!();
    let lib = crate::common::late_lib();
    let mut cmd = std::process::Command::new(fixture("heap_fixture"));
    cmd.args(["late_lib", "attach"]).env("LATE_LIB", &lib);
    let mut target = TestProcess::spawn("heap_fixture late_lib attach", cmd);
    target.expect_stdout("ready");
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("late.trace");
    let rule = "serve=late_lib.so:late_serve";
    let mut recorder =
        crate::common::start_recorder_args(target.pid(), &trace, &["--heap", "--phase", rule]);
    assert!(
        recorder.stderr_text().contains(&format!(
            "phase rule {rule}: no traced process maps 'late_lib.so' yet: attached when one does"
        )),
        "{}",
        recorder.stderr_text()
    );
    target.send_line("go");
    target.expect_stdout("loaded");
    let line = recorder.expect_stderr_prefix(&format!("phase rule {rule} attached: "));
    assert!(line.ends_with("/late_lib.so"), "{line}");
    target.send_line("serve");
    target.expect_stdout("done");
    crate::common::stop_recording(&mut recorder, &mut target);
    let json = report_value(&trace);
    let phases = &json["phases"];
    let rules: Vec<(&str, u64)> = (phases["rules"].as_array().unwrap().iter())
        .map(|r| (r["rule"].as_str().unwrap(), r["entries"].as_u64().unwrap()))
        .collect();
    assert_eq!(rules, [(rule, 5)], "{phases:#}");
    let rows = phases["by_phase"].as_array().unwrap();
    let serve = rows.iter().find(|r| r["phase"] == "serve").unwrap();
    assert_eq!(
        (&serve["live_bytes"], &serve["live_count"]),
        (&serde_json::json!(15_000), &serde_json::json!(5)),
        "{serve:#}"
    );
}

/// Conditions on a rule's call: llama.cpp's prefill/decode split (a batch passed by value, on
/// the stack, token count first) and an integer argument; a call whose condition fails is in
/// no phase and not an entry. Exact, in both heap paths.
#[test]
fn a_condition_on_the_call_splits_one_function_into_phases() {
    require_privileges!();
    let exe = fixture("heap_fixture");
    let rules = [
        "--phase",
        "prefill=heap_fixture:batch_decode[sp+8:i32>1]",
        "--phase",
        "decode=heap_fixture:batch_decode[sp+8:i32<=1]",
        "--phase",
        "large=heap_fixture:sized_request[arg1>=1000]",
    ];
    for mode in [&["--heap"][..], &["--heap", "--stack", "dwarf"]] {
        let dir = tempfile::tempdir().unwrap();
        let args: Vec<&str> = mode.iter().chain(&rules).copied().collect();
        let r = record_fixture_command(dir.path(), &exe, "conditions", &args);
        r.assert_no_lost_events();
        let json = report_value(&dir.path().join("conditions.trace"));
        let phases = &json["phases"];
        let entries: Vec<(&str, u64)> = (phases["rules"].as_array().unwrap().iter())
            .map(|r| (r["rule"].as_str().unwrap(), r["entries"].as_u64().unwrap()))
            .collect();
        assert_eq!(
            entries,
            [
                ("prefill=heap_fixture:batch_decode[sp+8:i32>1]", 2),
                ("decode=heap_fixture:batch_decode[sp+8:i32<=1]", 5),
                ("large=heap_fixture:sized_request[arg1:i64>=1000]", 2)
            ],
            "{mode:?}"
        );
        let live = |phase: &str, first: &str| -> (u64, u64) {
            let stacks = json["stacks"].as_array().unwrap();
            (stacks.iter())
                .filter(|s| s["phase"] == phase)
                .filter(|s| s["frames"].as_array().unwrap().iter().any(|f| f == first))
                .map(|s| {
                    (
                        s["live_bytes"].as_u64().unwrap(),
                        s["live_count"].as_u64().unwrap(),
                    )
                })
                .fold((0, 0), |(b, c), (sb, sc)| (b + sb, c + sc))
        };
        assert_eq!(live("prefill", "batch_decode"), (1_600, 2), "{mode:?}");
        assert_eq!(live("decode", "batch_decode"), (500, 5), "{mode:?}");
        assert_eq!(live("large", "sized_request"), (5_000, 2), "{mode:?}");
        assert_eq!(live("none", "sized_request"), (500, 1), "{mode:?}");
    }
}

/// A USDT probe as a phase's start (`NAME=usdt:LIB:PROVIDER:PROBE`): the phase runs from the
/// probe until the function around it returns; what that function allocated before the probe,
/// and what is allocated after it returned, is not in it. Exact, in both heap paths.
#[test]
fn a_usdt_probe_starts_a_phase_until_its_function_returns() {
    require_privileges!();
    let exe = fixture("heap_fixture");
    let rule = "serve=usdt:heap_fixture:alloctrace_fixture:request__start";
    for mode in [&["--heap"][..], &["--heap", "--stack", "dwarf"]] {
        let dir = tempfile::tempdir().unwrap();
        let args: Vec<&str> = mode.iter().chain(&["--phase", rule]).copied().collect();
        let r = record_fixture_command(dir.path(), &exe, "usdt", &args);
        r.assert_no_lost_events();
        let json = report_value(&dir.path().join("usdt.trace"));
        let phases = &json["phases"];
        assert_eq!(phases["rules"][0]["rule"], rule, "{phases:#}");
        assert_eq!(phases["rules"][0]["entries"], 4, "{phases:#}");
        let live = |phase: &str, first: &str, size: u64| -> (u64, u64) {
            let stacks = json["stacks"].as_array().unwrap();
            (stacks.iter())
                .filter(|s| s["phase"] == phase && s["frames"][0] == first)
                .map(|s| {
                    (
                        s["live_bytes"].as_u64().unwrap(),
                        s["live_count"].as_u64().unwrap(),
                    )
                })
                .filter(|&(bytes, count)| count > 0 && bytes % size == 0 && bytes / count == size)
                .fold((0, 0), |(b, c), (sb, sc)| (b + sb, c + sc))
        };
        assert_eq!(live("serve", "usdt_request", 222), (888, 4), "{mode:?}");
        assert_eq!(live("serve", "usdt_helper", 333), (1_332, 4), "{mode:?}");
        assert_eq!(live("none", "usdt_request", 111), (444, 4), "{mode:?}");
        assert_eq!(live("serve", "usdt_request", 111), (0, 0), "{mode:?}");
        let rows = phases["by_phase"].as_array().unwrap();
        let serve = rows.iter().find(|r| r["phase"] == "serve").unwrap();
        assert_eq!(serve["live_bytes"], 2_220, "{serve:#}");
    }
}

/// An error-induced leak: allocations fail, the error path keeps memory that never comes back;
/// the verdict says "grows after errors" with the failures and the rise, exact.
#[test]
fn memory_kept_by_an_error_path_is_an_error_induced_leak() {
    require_privileges!();
    let dir = tempfile::tempdir().unwrap();
    let exe = fixture("heap_fixture");
    let r = record_fixture_command(dir.path(), &exe, "error_leak", &["--heap"]);
    r.assert_no_lost_events();
    let json = report_value(&dir.path().join("error_leak.trace"));
    let verdict = json["verdict"].as_array().unwrap();
    let errors = (verdict.iter())
        .find(|f| f["category"] == "error-induced")
        .unwrap_or_else(|| panic!("no error-induced finding: {verdict:#?}"));
    let evidence = errors["evidence"][0].as_str().unwrap();
    assert!(
        evidence.starts_with("3 failed allocations at ")
            && evidence.ends_with(
                " s (malloc → ENOMEM); the traced live memory rose by 262144 B then and did \
                 not come back"
            ),
        "{evidence}"
    );
    let text = String::from_utf8_lossy(&view(&["report"], &dir.path().join("error_leak.trace")))
        .into_owned();
    assert!(text.contains("grows after errors"), "{text}");
}
