//! Mapping tracing (mmap, munmap, mremap, mprotect, brk) against the mapping fixture: every figure
//! is known by construction (see tests/fixtures/map_fixture.c). Mappings are always traced;
//! `--heap` adds the allocator. Privileged: needs root, eBPF and tracepoints.
//!
//! Most scenarios run as `record -- map_fixture SCENARIO run`: the dynamic loader's own mappings
//! are then recorded too, so class totals are not exact there; the fixture's rows are. The
//! attach tests (`-p PID`) see only the scenario, so their class totals are exact.

use std::path::Path;

use crate::common::{self, Cell, Report, Session, Totals, all_freed, all_live, fixture, page};

/// Runs `alloctrace record ARGS... -- map_fixture SCENARIO run` to completion; its report,
/// checked complete and well formed.
fn record_map_command(dir: &Path, scenario: &str, args: &[&str]) -> Report {
    common::record_fixture_command(dir, &fixture("map_fixture"), scenario, args)
}

/// A `PROT_NONE`-born mapping's cell without its `allocated_bytes`, which the contract leaves
/// open for reservations (only accessible pages are ever live): (live bytes, live count,
/// allocated count).
fn reservation(r: &Report, class: &str, function: &str) -> (u64, u64, u64) {
    let c = r.class_cell(class, function);
    (c.live_bytes, c.live_count, c.allocated_count)
}

/// Asserts that no row of any class goes through `function` (it only unmaps or protects).
fn assert_no_rows(r: &Report, function: &str) {
    assert!(
        r.stacks_through(function).is_empty(),
        "{function} makes no mapping: no row may go through it\n{}",
        r.summary()
    );
}

#[test]
fn raw_syscall_and_libc_mmaps_are_exact_at_their_callers() {
    require_privileges!();
    let p = page();
    let dir = tempfile::tempdir().unwrap();
    let r = record_map_command(dir.path(), "raw", &[]);
    // 5 x 3 pages through syscall(SYS_mmap), 4 x 2 pages through mmap(), never unmapped.
    r.assert_class_cell("mmap", "leak_raw_mmap", all_live(5, 3 * p));
    r.assert_class_cell("mmap", "leak_libc_mmap", all_live(4, 2 * p));
    // 100 x (mmap 1 page, munmap it).
    r.assert_class_cell("mmap", "churn_mmap", all_freed(100, p));
    for function in ["leak_raw_mmap", "leak_libc_mmap", "churn_mmap"] {
        assert_eq!(
            r.stacks_through(function).len(),
            r.class_stacks_through("mmap", function).len(),
            "{function} maps only private anonymous memory\n{}",
            r.summary()
        );
    }
    r.assert_no_lost_events();
}

#[test]
fn partial_munmap_removes_exactly_the_unmapped_pages() {
    require_privileges!();
    let p = page();
    let dir = tempfile::tempdir().unwrap();
    let r = record_map_command(dir.path(), "partial", &[]);
    let rows = r.class_stacks_through("mmap", "map_four_pages");
    let by_caller = |caller: &str| {
        let mine: Vec<_> = rows
            .iter()
            .copied()
            .filter(|s| s.frames.iter().any(|f| f == caller))
            .collect();
        common::sum_rows(&mine)
    };
    // Page 1 of 4 unmapped: pages 0 and 2-3 remain, two pieces of one mapping.
    let split = Cell {
        live_bytes: 3 * p,
        live_count: 1,
        allocated_bytes: 4 * p,
        allocated_count: 1,
    };
    assert_eq!(by_caller("partial_split"), split, "{}", r.summary());
    // Then page 0 too: pages 2-3 remain, still one mapping.
    let trim = Cell {
        live_bytes: 2 * p,
        ..split
    };
    assert_eq!(by_caller("partial_trim"), trim, "{}", r.summary());
    r.assert_class_cell(
        "mmap",
        "map_four_pages",
        Cell {
            live_bytes: 5 * p,
            live_count: 2,
            allocated_bytes: 8 * p,
            allocated_count: 2,
        },
    );
    assert_no_rows(&r, "unmap_middle");
    assert_no_rows(&r, "unmap_rest");
    r.assert_no_lost_events();
}

#[test]
fn map_fixed_takes_the_overlap_from_the_old_mapping() {
    require_privileges!();
    let p = page();
    let dir = tempfile::tempdir().unwrap();
    let r = record_map_command(dir.path(), "fixed", &[]);
    // 8 pages at A, then 3 pages MAP_FIXED at A + 2 pages: map_big keeps 2 + 3 pages in two
    // pieces, still one mapping.
    r.assert_class_cell(
        "mmap",
        "map_big",
        Cell {
            live_bytes: 5 * p,
            live_count: 1,
            allocated_bytes: 8 * p,
            allocated_count: 1,
        },
    );
    r.assert_class_cell("mmap", "map_over", all_live(1, 3 * p));
    r.assert_no_lost_events();
}

#[test]
fn mremap_moves_the_whole_new_range_to_the_remap_caller() {
    require_privileges!();
    let p = page();
    let dir = tempfile::tempdir().unwrap();
    let r = record_map_command(dir.path(), "remap", &[]);
    // 2 pages grown to 6 with MREMAP_MAYMOVE: the old range leaves map_small's row, the whole new
    // range counts at grow_remap.
    r.assert_class_cell("mmap", "map_small", all_freed(1, 2 * p));
    r.assert_class_cell("mmap", "grow_remap", all_live(1, 6 * p));
    // 2 pages moved with MREMAP_FIXED onto a 2-page PROT_NONE reservation: the source and the
    // replaced reservation are gone, the moved range counts at move_remap.
    r.assert_class_cell("mmap", "map_move_source", all_freed(1, 2 * p));
    assert_eq!(
        reservation(&r, "mmap", "reserve_move_target"),
        (0, 0, 1),
        "the reservation replaced by the move: (live bytes, live count, allocated count)\n{}",
        r.summary()
    );
    r.assert_class_cell("mmap", "move_remap", all_live(1, 2 * p));
    r.assert_no_lost_events();
}

#[test]
fn mprotect_opens_pages_of_a_reservation_in_its_own_row() {
    require_privileges!();
    let p = page();
    let dir = tempfile::tempdir().unwrap();
    let r = record_map_command(dir.path(), "protect", &[]);
    // 16 pages PROT_NONE (nothing live), then pages 4-7 made read-write.
    assert_eq!(
        reservation(&r, "mmap", "reserve_region"),
        (4 * p, 1, 1),
        "(live bytes, live count, allocated count)\n{}",
        r.summary()
    );
    assert_no_rows(&r, "commit_region");
    r.assert_no_lost_events();
}

#[test]
fn shared_anonymous_mapping_is_mmap_shared() {
    require_privileges!();
    let p = page();
    let dir = tempfile::tempdir().unwrap();
    let r = record_map_command(dir.path(), "shared", &[]);
    r.assert_class_cell("mmap-shared", "map_shared_anon", all_live(1, 3 * p));
    assert_eq!(
        r.stacks_through("map_shared_anon").len(),
        r.class_stacks_through("mmap-shared", "map_shared_anon")
            .len(),
        "MAP_SHARED|MAP_ANONYMOUS is mmap-shared only\n{}",
        r.summary()
    );
    r.assert_no_lost_events();
}

#[test]
fn file_mapping_is_mmap_file() {
    require_privileges!();
    let p = page();
    let dir = tempfile::tempdir().unwrap();
    let r = record_map_command(dir.path(), "file", &[]);
    // A 5-page temporary file, MAP_PRIVATE, PROT_READ.
    r.assert_class_cell("mmap-file", "map_file", all_live(1, 5 * p));
    assert_eq!(
        r.stacks_through("map_file").len(),
        r.class_stacks_through("mmap-file", "map_file").len(),
        "a file mapping is mmap-file only\n{}",
        r.summary()
    );
    r.assert_no_lost_events();
}

#[test]
fn brk_growth_is_heap_at_the_brk_caller_without_heap_tracing() {
    require_privileges!();
    let p = page();
    let dir = tempfile::tempdir().unwrap();
    let r = record_map_command(dir.path(), "brk", &[]);
    // brk(cur + 16 pages), never shrunk.
    r.assert_class_cell("heap", "grow_brk", all_live(1, 16 * p));
    // Nothing else moves the break: the loader only asks for it (brk(NULL)), and the fixture
    // allocates nothing (checked with `strace -e trace=memory`).
    let t = r.class_totals_or_zero("heap");
    assert_eq!(
        (t.live_bytes, t.live_count),
        (16 * p, 1),
        "heap totals\n{}",
        r.summary()
    );
    r.assert_no_lost_events();
}

#[test]
fn thread_stacks_by_pid_are_their_accessible_pages() {
    require_privileges!();
    let s = Session::run_map_scenario("threads", &[]);
    let pid = s.target.pid();
    let r = s.stop(libc::SIGINT);
    r.assert_well_formed(Some(pid));
    r.assert_rows_add_up();
    assert!(r.complete, "{}", r.summary());
    // pthread_attr_setstacksize(1 MiB), setguardsize(1 page): glibc 2.36 (allocatestack.c) maps
    // stacksize + guard = 1 MiB + 1 page PROT_NONE with MAP_STACK, then mprotects everything above
    // the guard page read-write: 1 MiB accessible per thread (as strace and /proc/PID/maps show:
    // `---p` 1 page + `rw-p` 256 pages, 4 times). The threads are parked, so the stacks are live.
    const THREADS: u64 = 4;
    const STACK: u64 = 1 << 20;
    let t = r.class_totals_or_zero("thread-stack");
    assert_eq!(
        (t.live_bytes, t.live_count, t.allocated_count),
        (THREADS * STACK, THREADS, THREADS),
        "thread-stack totals: (live bytes, live count, allocated count)\n{}",
        r.summary()
    );
    // The stacks are mapped by pthread_create (a libc function that makes the mmap syscall,
    // through allocate_stack, inlined into it: a frame of its own).
    for row in r.stacks.iter().filter(|s| s.class == "thread-stack") {
        assert!(
            row.frames
                .iter()
                .take(3)
                .any(|f| f.contains("pthread_create")),
            "a thread stack mapped outside pthread_create: {:?}\n{}",
            row.frames,
            r.summary()
        );
    }
    // MAP_STACK mappings are thread-stack, never mmap; nothing else maps anonymous memory.
    let m = r.class_totals_or_zero("mmap");
    assert_eq!(
        (m.live_bytes, m.allocated_count),
        (0, 0),
        "mmap totals\n{}",
        r.summary()
    );
    r.assert_no_lost_events();
}

#[test]
fn mappings_made_before_attach_are_unknown() {
    require_privileges!();
    let s = Session::run_map_scenario("preattach", &[]);
    let pid = s.target.pid();
    let r = s.stop(libc::SIGINT);
    r.assert_well_formed(Some(pid));
    r.assert_rows_add_up();
    assert!(r.complete, "{}", r.summary());
    let p = page();
    // Traced: munmap of a 4-page pre-attach mapping and mprotect RW of a 4-page pre-attach
    // reservation change nothing; leak_libc_mmap's 4 x 2 pages are all there is.
    r.assert_class_cell("mmap", "leak_libc_mmap", all_live(4, 2 * p));
    let t = r.class_totals_or_zero("mmap");
    assert_eq!(
        t,
        Totals {
            live_bytes: 8 * p,
            live_count: 4,
            peak_bytes: 8 * p,
            allocated_bytes: 8 * p,
            allocated_count: 4,
            freed_count: 0,
        },
        "mmap totals\n{}",
        r.summary()
    );
    for function in [
        "pre_attach_map",
        "pre_attach_reserve",
        "unmap_pre_attach",
        "protect_pre_attach",
    ] {
        assert_no_rows(&r, function);
    }
    r.assert_no_lost_events();
}

#[test]
fn raw_mappings_show_under_a_flat_heap_with_heap_tracing() {
    require_privileges!();
    let dir = tempfile::tempdir().unwrap();
    let r = record_map_command(dir.path(), "leak_under_flat_heap", &["--heap"]);
    // The "phantom leak": 20 x 64 KiB through syscall(SYS_mmap), written to and never unmapped,
    // while malloc churns and the heap stays flat.
    r.assert_class_cell("mmap", "ucx_like_register", all_live(20, 64 * 1024));
    r.assert_class_cell("heap", "heap_churn", all_freed(2000, 256));
    // The allocator's own arena (its brk growth) is not counted a second time: class heap holds
    // exactly the blocks, and nothing else in the process mallocs.
    r.assert_totals(Totals {
        live_bytes: 0,
        live_count: 0,
        peak_bytes: 256,
        allocated_bytes: 2000 * 256,
        allocated_count: 2000,
        freed_count: 2000,
    });
    assert!(r.failures.is_empty(), "{}", r.summary());
    assert_eq!(r.unmatched_frees, 0, "{}", r.summary());
    r.assert_no_lost_events();
}

#[test]
fn terabyte_prot_none_reservation_is_not_live() {
    require_privileges!();
    let p = page();
    let dir = tempfile::tempdir().unwrap();
    let r = record_map_command(dir.path(), "huge", &[]);
    // 2 TiB PROT_NONE, MAP_NORESERVE: one mapping, nothing accessible.
    assert_eq!(
        reservation(&r, "mmap", "reserve_huge"),
        (0, 1, 1),
        "(live bytes, live count, allocated count)\n{}",
        r.summary()
    );
    // Accounting goes on after it.
    r.assert_class_cell("mmap", "leak_libc_mmap", all_live(4, 2 * p));
    // Not even for an instant counted: the class peak stays far below a terabyte.
    let t = r.class_totals_or_zero("mmap");
    assert!(
        t.peak_bytes < 1 << 40 && t.live_bytes < 1 << 40,
        "mmap totals\n{}",
        r.summary()
    );
    r.assert_no_lost_events();
}

#[test]
fn twenty_thousand_mappings_made_and_unmapped_leave_nothing_live() {
    require_privileges!();
    let p = page();
    let dir = tempfile::tempdir().unwrap();
    // `run` fails the test if the recording takes longer than TIMEOUT (30 s).
    let r = record_map_command(dir.path(), "many", &[]);
    // 20000 x 1 page, all live at once, then every one unmapped.
    r.assert_class_cell("mmap", "map_many", all_freed(20_000, p));
    assert_no_rows(&r, "unmap_many");
    let t = r.class_totals_or_zero("mmap");
    assert!(
        t.peak_bytes >= 20_000 * p,
        "the 20000 pages were live at once\n{}",
        r.summary()
    );
    r.assert_no_lost_events();
}
