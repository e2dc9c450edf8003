//! Stacks that survive code without frame pointers: stack copies unwound with DWARF call-frame
//! information (`record --stack auto|dwarf`), against fixtures built with
//! `-O2 -fomit-frame-pointer` whose exact answers are known by construction. Privileged.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use crate::common::{
    self, LEAKS, Report, Session, TestProcess, all_live, build_dir, fixture_source,
    fixture_variant, page, record_fixture_command,
};

/// Flags of the variants without frame pointers (the fixtures' defaults keep them).
const NO_FRAME_POINTERS: &[&str] = &["-O2", "-fomit-frame-pointer", "-momit-leaf-frame-pointer"];

/// Asserts that `frames` holds `chain` in this order (other frames may come between).
fn assert_chain(frames: &[String], chain: &[&str], what: &str) {
    let mut rest = frames.iter();
    for f in chain {
        assert!(
            rest.any(|g| g == f),
            "{what}: {f} missing (or out of order) in {frames:?}, expected the chain {chain:?}"
        );
    }
}

#[test]
fn heap_leaks_without_frame_pointers_are_exact_up_to_main_with_dwarf_stacks() {
    require_privileges!();
    let exe = fixture_variant("heap_fixture", "nofp", NO_FRAME_POINTERS);
    let s = Session::run_scenario_of(&exe, "leaks", "attach", &["--stack", "dwarf"]);
    let r = s.stop(libc::SIGINT);
    // The same exact attribution as with frame pointers.
    r.assert_leaks();
    for (function, _, _) in LEAKS {
        for st in r.stacks_of(function) {
            // (At -O2 scenario_leaks tail-calls its last leak: that frame is really gone.)
            assert_chain(&st.frames, &[function, "main"], function);
            assert!(
                !st.frames.iter().any(|f| f == "[truncated]"),
                "{:?}",
                st.frames
            );
        }
    }
    let capture = r.stack_capture.as_ref().expect("stack_capture");
    assert_eq!(capture.mode, "dwarf");
    assert!(capture.copies >= 126, "{capture:?}");
    r.assert_no_lost_events();
}

#[test]
fn mappings_without_frame_pointers_are_exact_up_to_main_by_default() {
    require_privileges!();
    let p = page();
    let exe = fixture_variant("map_fixture", "nofp", NO_FRAME_POINTERS);
    let dir = tempfile::tempdir().unwrap();
    let r = record_fixture_command(dir.path(), &exe, "raw", &[]);
    r.assert_class_cell("mmap", "leak_raw_mmap", all_live(5, 3 * p));
    r.assert_class_cell("mmap", "leak_libc_mmap", all_live(4, 2 * p));
    for function in ["leak_raw_mmap", "leak_libc_mmap"] {
        for st in r.class_stacks_through("mmap", function) {
            assert_chain(&st.frames, &[function, "scenario_raw", "main"], function);
        }
    }
    // glibc's mremap is a variadic, non-leaf wrapper: with frame pointers its caller was lost.
    let r = record_fixture_command(dir.path(), &exe, "remap", &[]);
    r.assert_class_cell("mmap", "grow_remap", all_live(1, 6 * p));
    for st in r.class_stacks_through("mmap", "grow_remap") {
        assert_chain(&st.frames, &["grow_remap", "main"], "grow_remap");
    }
    r.assert_no_lost_events();
}

/// The rows of `class` through `chain[2]` (the library's caller) add up to `expected`, and each
/// holds the whole chain in order.
fn assert_rows_with_chain(r: &Report, class: &str, expected: common::Cell, chain: &[&str]) {
    let rows = through(r, class, chain[2]);
    assert_eq!(common::sum_rows(&rows), expected, "{}", r.summary());
    for st in rows {
        assert_chain(&st.frames, chain, class);
    }
}

/// Rows of `class` whose frames include `function` anywhere.
fn through<'a>(r: &'a Report, class: &str, function: &str) -> Vec<&'a common::StackRow> {
    r.stacks
        .iter()
        .filter(|s| s.class == class && s.frames.iter().any(|f| f == function))
        .collect()
}

/// Builds libnofp.so (no frame pointers) and nofp_caller linked to it.
fn nofp_caller() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let dir = build_dir("nofp");
            let mut args: Vec<std::ffi::OsString> =
                ["-shared", "-fPIC", "-g"].iter().map(Into::into).collect();
            args.extend(NO_FRAME_POINTERS.iter().map(Into::into));
            args.push(fixture_source("nofp_lib.c").into());
            common::compile(&dir.join("libnofp.so"), &args);
            let exe = dir.join("nofp_caller");
            let mut args: Vec<std::ffi::OsString> = ["-O0", "-g", "-fno-omit-frame-pointer"]
                .iter()
                .map(Into::into)
                .collect();
            args.push(fixture_source("nofp_caller.c").into());
            args.push(format!("-L{}", dir.display()).into());
            args.push("-lnofp".into());
            args.push(format!("-Wl,-rpath,{}", dir.display()).into());
            common::compile(&exe, &args);
            exe
        })
        .clone()
}

/// Records nofp_caller (running `SCENARIO` if given) with `record --heap ARGS`; its report.
fn record_nofp_caller(scenario: Option<&str>, args: &[&str]) -> Report {
    let mut cmd = Command::new(nofp_caller());
    cmd.args(scenario);
    let name = match scenario {
        Some(scenario) => format!("nofp_caller {scenario}"),
        None => "nofp_caller".to_string(),
    };
    let mut target = TestProcess::spawn(&name, cmd);
    target.expect_stdout("ready");
    let mut all = vec!["--heap"];
    all.extend(args);
    Session::attach_and_run(target, scenario.unwrap_or("nofp"), &all).stop(libc::SIGINT)
}

#[test]
fn a_library_without_frame_pointers_does_not_hide_its_callers() {
    require_privileges!();
    let p = page();
    // Default (auto): the mappings get unwound stack copies; heap events frame pointers.
    let r = record_nofp_caller(None, &[]);
    assert_rows_with_chain(
        &r,
        "mmap",
        all_live(3, 2 * p),
        &["lib_map_inner", "lib_map_pages", "caller_maps", "main"],
    );
    // A function inlined into another is a frame of its own (from the debug info).
    assert_rows_with_chain(
        &r,
        "mmap",
        all_live(1, 4 * p),
        &[
            "lib_inline_map",
            "lib_map_inlined",
            "caller_inlined",
            "main",
        ],
    );
    // dwarf: the heap too.
    let r = record_nofp_caller(None, &["--stack", "dwarf"]);
    assert_rows_with_chain(
        &r,
        "heap",
        all_live(5, 1000),
        &["lib_alloc_inner", "lib_alloc", "caller_allocs", "main"],
    );
    // fp: the walk cannot cross the library; the caller above it is lost.
    let r = record_nofp_caller(None, &["--stack", "fp"]);
    assert!(
        through(&r, "mmap", "caller_maps").is_empty(),
        "frame pointers cannot see through the library\n{}",
        r.summary()
    );
}

/// Heap stacks walked by frame pointers through a library without them: past its function, each
/// walk reads whatever its rbp held (here two frames of garbage, other at every call). From the
/// first walks the recorder shortens the process's stack keys to the allocator's caller, and the
/// kernel, which caches that setting in the process's entry, takes it up: the 1000 blocks made
/// after the fixture's pause are one stack, where each would have been a stack of its own.
#[test]
fn heap_keys_through_garbage_frames_shrink_to_the_allocators_caller() {
    require_privileges!();
    let r = record_nofp_caller(Some("scrambled"), &[]);
    let rows = through(&r, "heap", "lib_alloc_scrambled");
    assert_eq!(
        common::sum_rows(&rows),
        all_live(1200, 48),
        "{}",
        r.summary()
    );
    let largest = (rows.iter().max_by_key(|s| s.live_count)).expect("a heap row");
    assert!(
        largest.live_count >= 1000
            && largest.frames.first().map(String::as_str) == Some("lib_alloc_scrambled"),
        "the blocks after the pause are one stack, the allocator's caller: {largest:?}\n{}",
        r.summary()
    );
    let capture = r.stack_capture.as_ref().expect("stack capture figures");
    assert!(
        capture.kernel_heap_stacks <= 400,
        "{} stacks sent for 1200 blocks\n{}",
        capture.kernel_heap_stacks,
        r.summary()
    );
}

/// The frame-pointer walk reads several frame records at once where it can; a record in the
/// last bytes before an inaccessible page (as a stack's outermost frame can be) fails such a
/// read, and is then read alone: its frame is there, not cut from the stack.
#[test]
fn a_frame_record_before_an_inaccessible_page_is_still_walked() {
    require_privileges!();
    let r = record_nofp_caller(Some("stack_end"), &[]);
    let rows = through(&r, "heap", "lib_alloc_at_stack_end");
    assert_eq!(rows.len(), 1, "one stack\n{}", r.summary());
    assert_eq!(rows[0].frames, ["lib_alloc_at_stack_end", "lib_end_frame"]);
    assert_eq!(
        common::sum_rows(&rows),
        all_live(100, 64),
        "{}",
        r.summary()
    );
}

#[test]
fn a_short_stack_copy_is_marked_truncated_never_cut_silently() {
    require_privileges!();
    // 1 KiB holds the library's frames but not deep_caller's 8 KiB frame: that stack is
    // marked truncated; the shallow ones reach main.
    let p = page();
    let r = record_nofp_caller(None, &["--stack-copy", "1"]);
    let truncated: Vec<_> = r
        .stacks
        .iter()
        .filter(|s| s.class == "mmap" && s.frames.iter().any(|f| f == "lib_map_pages"))
        .filter(|s| !s.frames.iter().any(|f| f == "main"))
        .collect();
    assert_eq!(
        common::sum_rows(&truncated),
        all_live(1, p),
        "{}",
        r.summary()
    );
    for st in truncated {
        assert_eq!(
            st.frames.last().map(String::as_str),
            Some("[truncated]"),
            "{:?}",
            st.frames
        );
    }
    assert_eq!(
        common::sum_rows(&through(&r, "mmap", "caller_maps")),
        all_live(3, 2 * p)
    );
    let capture = r.stack_capture.as_ref().expect("stack_capture");
    assert!(capture.truncated >= 1, "{capture:?}");
}

/// Every stack configuration loads: the verifier accepts each combination of stack copies,
/// frame-pointer walks, Python frames and fault sampling, with and without the programs' log
/// (`--debug-bpf`) (a program too complex for it would only fail at load, on the user's machine).
#[test]
fn every_stack_configuration_passes_the_verifier() {
    require_privileges!();
    let exe = common::fixture("heap_fixture");
    for flags in [
        &["--stack", "fp", "--fault-sample", "1"][..],
        &["--stack", "auto", "--fault-sample", "1"],
        &[
            "--stack",
            "dwarf",
            "--stack-copy",
            "32",
            "--fault-sample",
            "1",
        ],
        &[
            "--stack",
            "dwarf",
            "--stack-copy",
            "1",
            "--fault-sample",
            "1",
        ],
        &["--no-python-frames", "--fault-sample", "1"],
        &["--stack", "fp", "--no-python-frames", "--fault-sample", "0"],
    ]
    .into_iter()
    .flat_map(|flags| [flags.to_vec(), [flags, &["--debug-bpf"]].concat()])
    {
        let dir = tempfile::tempdir().unwrap();
        let trace = dir.path().join("t.trace");
        let mut cmd = common::alloctrace_cmd(&["record", "--heap"]);
        cmd.args(&flags)
            .arg("-o")
            .arg(&trace)
            .arg("--")
            .arg(&exe)
            .args(["churn", "run"]);
        let out = common::run(&format!("record {flags:?}"), cmd);
        assert!(
            out.status.success(),
            "record {flags:?} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn cpp_names_are_demangled() {
    require_privileges!();
    let p = page();
    let exe = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("cpp_fixture");
    let args: Vec<std::ffi::OsString> = vec![
        "-O1".into(),
        "-g".into(),
        "-fno-exceptions".into(),
        fixture_source("cpp_fixture.cpp").into(),
    ];
    common::compile(&exe, &args);
    let mut target = TestProcess::spawn("cpp_fixture", Command::new(&exe));
    target.expect_stdout("ready");
    let r = Session::attach_and_run(target, "cpp", &[]).stop(libc::SIGINT);
    for (function, pages) in [
        ("engine::KvCache::grow(unsigned long)", 2),
        ("void* engine::reserve<int>(int)", 3),
    ] {
        assert_eq!(
            common::sum_rows(&through(&r, "mmap", function)),
            all_live(1, pages * p),
            "{function}\n{}",
            r.summary()
        );
    }
}

/// Runs `tool ARGS`, panicking with its message if it fails.
fn tool(tool: &str, args: &[&std::ffi::OsStr]) {
    let out = Command::new(tool).args(args).output().expect(tool);
    assert!(
        out.status.success(),
        "{tool} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Where a stripped library's symbols are.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Symbols {
    /// Nowhere.
    Stripped,
    /// In its `.gnu_debugdata` section (MiniDebugInfo).
    MiniDebugInfo,
    /// In a separate debug file beside it, named by its `.gnu_debuglink`.
    DebugLink,
    /// In the system's build-id debug directory (`/usr/lib/debug/.build-id/xx/yyyy.debug`), as a
    /// distribution's debug-symbol package installs it; the library keeps its debug link.
    BuildIdDir,
}

/// A file under /usr/lib/debug/.build-id made for a test, removed when dropped.
struct InstalledDebugFile(PathBuf);

impl Drop for InstalledDebugFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
        if let Some(dir) = self.0.parent() {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// libmini.so stripped of its symbol table, with its symbols where `symbols` says, and
/// minidebug_caller linked to it; in `dir`.
fn minidebug_caller(dir: &Path, symbols: Symbols) -> (PathBuf, Option<InstalledDebugFile>) {
    let full = dir.join("libmini.full.so");
    // A build id of this run's own (the debug directory is the system's).
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let build_id = format!("{:08x}{:032x}", std::process::id(), nanos);
    let args: Vec<std::ffi::OsString> = ["-shared", "-fPIC", "-O1", "-fno-omit-frame-pointer"]
        .iter()
        .map(Into::into)
        .chain([
            fixture_source("minidebug_lib.c").into(),
            format!("-Wl,--build-id=0x{build_id}").into(),
        ])
        .collect();
    common::compile(&full, &args);
    let (mini, lib) = (dir.join("mini.debug"), dir.join("libmini.so"));
    // The symbol table alone (no DWARF, no code), compressed, as distributions make it.
    tool(
        "objcopy",
        &[
            "--only-keep-debug".as_ref(),
            "--strip-debug".as_ref(),
            full.as_os_str(),
            mini.as_os_str(),
        ],
    );
    tool("xz", &["-f".as_ref(), mini.as_os_str()]);
    tool(
        "strip",
        &[
            "--strip-all".as_ref(),
            "-o".as_ref(),
            lib.as_os_str(),
            full.as_os_str(),
        ],
    );
    let mut installed = None;
    match symbols {
        Symbols::Stripped => {}
        Symbols::MiniDebugInfo => {
            let section = format!(".gnu_debugdata={}.xz", mini.display());
            tool(
                "objcopy",
                &["--add-section".as_ref(), section.as_ref(), lib.as_os_str()],
            );
        }
        Symbols::DebugLink | Symbols::BuildIdDir => {
            let debug = dir.join("libmini.so.debug");
            let keep = [
                "--only-keep-debug".as_ref(),
                full.as_os_str(),
                debug.as_os_str(),
            ];
            tool("objcopy", &keep);
            let link = format!("--add-gnu-debuglink={}", debug.display());
            tool("objcopy", &[link.as_ref(), lib.as_os_str()]);
            if symbols == Symbols::BuildIdDir {
                let at = Path::new("/usr/lib/debug/.build-id")
                    .join(&build_id[..2])
                    .join(format!("{}.debug", &build_id[2..]));
                std::fs::create_dir_all(at.parent().unwrap()).unwrap();
                std::fs::copy(&debug, &at).unwrap();
                std::fs::remove_file(&debug).unwrap();
                installed = Some(InstalledDebugFile(at));
            }
        }
    }
    let exe = dir.join("minidebug_caller");
    let args: Vec<std::ffi::OsString> = vec![
        "-O0".into(),
        "-fno-omit-frame-pointer".into(),
        fixture_source("minidebug_caller.c").into(),
        format!("-L{}", dir.display()).into(),
        "-lmini".into(),
        format!("-Wl,-rpath,{}", dir.display()).into(),
    ];
    common::compile(&exe, &args);
    (exe, installed)
}

/// A stripped library's static function is named from its MiniDebugInfo (`.gnu_debugdata`, an
/// xz-compressed symbol table), or from the separate debug file its `.gnu_debuglink` names,
/// beside it or in the system's build-id debug directory:
/// the 7 blocks of 3000 bytes are at `hidden_alloc`; with neither, that frame has no name.
#[test]
fn a_stripped_library_is_named_from_its_minidebuginfo_or_debug_file() {
    require_privileges!();
    for symbols in [
        Symbols::MiniDebugInfo,
        Symbols::DebugLink,
        Symbols::BuildIdDir,
        Symbols::Stripped,
    ] {
        let with = symbols != Symbols::Stripped;
        let dir = tempfile::tempdir().unwrap();
        let (exe, _installed) = minidebug_caller(dir.path(), symbols);
        let mut target = TestProcess::spawn("minidebug_caller", Command::new(exe));
        target.expect_stdout("ready");
        let r = Session::attach_and_run(target, "mini", &["--heap"]).stop(libc::SIGINT);
        let named = through(&r, "heap", "hidden_alloc");
        if with {
            assert_eq!(named.len(), 1, "{symbols:?}\n{}", r.summary());
            assert_eq!(
                (named[0].live_bytes, named[0].live_count),
                (7 * 3000, 7),
                "{}",
                r.summary()
            );
            let frames = &named[0].frames;
            assert_eq!(frames[..2], ["hidden_alloc", "mini_alloc"], "{frames:?}");
        } else {
            assert!(
                named.is_empty(),
                "no symbol table, no name\n{}",
                r.summary()
            );
            assert_eq!(
                through(&r, "heap", "mini_alloc").len(),
                1,
                "{}",
                r.summary()
            );
        }
    }
}
