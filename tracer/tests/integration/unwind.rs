//! The DWARF stack mode's user-space unwinder on real captures: tests/fixtures/unwind_fixture.c
//! copies its own registers and stack at a known call chain (as the eBPF side will), and the
//! frames unwound from that copy are symbolized from the fixture's files and checked by name.
//! Needs a C compiler, not root.

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
};

use alloctrace::{
    proc::maps::{Mapping, parse_maps},
    stacks::unwind::{
        CfiKind, FileAccess, MissingCfi, ProcessUnwinder, Truncation, UnwindCache, UnwindEnd,
        UnwindOptions, UnwindOutcome, UserRegs,
    },
};
use blazesym::symbolize::{Input, Symbolized, Symbolizer, source::Elf, source::Source};

use crate::common::{self, TestProcess, build_dir, fixture_source, fixture_variant};

const CHAIN: [&str; 4] = ["inner_fn", "middle_fn", "outer_fn", "main"];
const LIB_CHAIN: [&str; 5] = [
    "callback_fn",
    "lib_helper",
    "lib_work",
    "via_lib_fn",
    "main",
];

/// The flags that make CFI the only way up: no frame pointers, unwind tables kept.
const NO_FP: [&str; 3] = [
    "-O2",
    "-fomit-frame-pointer",
    "-fasynchronous-unwind-tables",
];

fn exe_no_fp() -> PathBuf {
    fixture_variant("unwind_fixture", "nofp", &NO_FP)
}

/// `-O0` with frame pointers (the helper's defaults).
fn exe_fp() -> PathBuf {
    fixture_variant("unwind_fixture", "fp", &[])
}

/// The shared library, `-O2` without frame pointers.
fn lib_no_fp() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let out = build_dir("fixtures").join("libunwind_fixture.so");
            let mut args: Vec<OsString> = NO_FP.iter().map(Into::into).collect();
            args.extend(["-g", "-Wall", "-shared", "-fPIC"].map(Into::into));
            args.push(fixture_source("unwind_fixture_lib.c").into());
            common::compile(&out, &args);
            out
        })
        .clone()
}

/// What the fixture wrote at its capture point.
struct Capture {
    regs: UserRegs,
    stack: Vec<u8>,
    maps: String,
}

fn read_capture(prefix: &Path) -> Capture {
    let with = |ext: &str| PathBuf::from(format!("{}.{ext}", prefix.display()));
    let regs = std::fs::read_to_string(with("regs")).expect("the fixture wrote .regs");
    let nums: Vec<u64> = regs
        .split_whitespace()
        .map(|w| u64::from_str_radix(w, 16).expect("hex in .regs"))
        .collect();
    assert_eq!(nums.len(), 4, "malformed .regs: {regs:?}");
    let stack = std::fs::read(with("stack")).expect("the fixture wrote .stack");
    assert_eq!(
        stack.len() as u64,
        nums[3],
        "the .stack length is the one in .regs"
    );
    assert!(
        stack.len() >= 1024,
        "a short stack copy ({} bytes)",
        stack.len()
    );
    Capture {
        regs: UserRegs {
            ip: nums[0],
            sp: nums[1],
            bp: nums[2],
        },
        stack,
        maps: std::fs::read_to_string(with("maps")).expect("the fixture wrote .maps"),
    }
}

/// Runs the fixture to completion in `mode` and returns its capture.
fn capture(exe: &Path, mode: &[&str]) -> (Capture, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let prefix = dir.path().join("cap");
    let mut cmd = Command::new(exe);
    cmd.arg(&prefix).args(mode);
    let out = common::run("unwind_fixture", cmd);
    assert!(
        out.status.success(),
        "the fixture failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (read_capture(&prefix), dir)
}

/// One unwound frame, symbolized independently of the unwinder (blazesym, by file offset).
#[derive(Debug)]
struct Frame {
    name: String,
    module: String,
}

fn symbolize(maps: &str, frames: &[u64]) -> Vec<Frame> {
    let maps: Vec<Mapping> = parse_maps(maps);
    let symbolizer = Symbolizer::new();
    frames
        .iter()
        .enumerate()
        .map(|(i, &addr)| {
            // A return address is the instruction after the call.
            let addr = if i == 0 { addr } else { addr - 1 };
            let Some(m) = maps
                .iter()
                .find(|m| m.executable && m.start <= addr && addr < m.end)
            else {
                return Frame {
                    name: format!("{addr:#x}"),
                    module: "?".into(),
                };
            };
            let offset = addr - m.start + m.file_offset;
            let src = Source::Elf(Elf::new(&m.path));
            let name = match symbolizer.symbolize_single(&src, Input::FileOffset(offset)) {
                Ok(Symbolized::Sym(sym)) => sym.name.to_string(),
                _ => format!("{}+{offset:#x}", m.path),
            };
            Frame {
                name,
                module: m.path.clone(),
            }
        })
        .collect()
}

fn names(frames: &[Frame]) -> Vec<&str> {
    frames.iter().map(|f| f.name.as_str()).collect()
}

fn unwind(u: &mut ProcessUnwinder, cap: &Capture, stack_len: usize) -> (Vec<u64>, UnwindOutcome) {
    let mut out = Vec::new();
    let outcome = u.unwind(cap.regs, &cap.stack[..stack_len], &mut out);
    (out, outcome)
}

fn unwinder_for(cap: &Capture, cache: &UnwindCache) -> ProcessUnwinder {
    let mut u = ProcessUnwinder::from_maps(&cap.maps, FileAccess::Root("/".into()), cache);
    u.load_all();
    let errors: Vec<_> = u.load_errors().collect();
    assert!(errors.is_empty(), "modules that did not load: {errors:?}");
    u
}

fn assert_is_libc(frame: &Frame) {
    assert!(
        frame.module.contains("libc.so") || frame.module.contains("libc-"),
        "expected a C library frame, got {frame:?}"
    );
}

/// main's callers: the C library's start code, then `_start` in the executable, the end.
fn assert_start_frames(frames: &[Frame], exe: &Path) {
    let (last, libc) = frames.split_last().expect("frames above main");
    assert!(
        !libc.is_empty(),
        "no C library frame between main and _start"
    );
    libc.iter().for_each(assert_is_libc);
    assert_eq!(last.name, "_start", "outermost frame: {frames:#?}");
    assert_eq!(Path::new(&last.module), exe);
}

// ---- whole stacks --------------------------------------------------------------------------

fn check_direct_chain(exe: &Path) {
    let (cap, _dir) = capture(exe, &["direct"]);
    let cache = UnwindCache::new();
    let mut u = unwinder_for(&cap, &cache);
    let (frames, outcome) = unwind(&mut u, &cap, cap.stack.len());
    let syms = symbolize(&cap.maps, &frames);
    assert_eq!(
        outcome,
        UnwindOutcome {
            end: UnwindEnd::Complete,
            fp_fallback_steps: 0
        },
        "frames: {syms:#?}"
    );
    assert_eq!(names(&syms)[..4], CHAIN, "frames: {syms:#?}");
    for f in &syms[..4] {
        assert_eq!(Path::new(&f.module), exe);
    }
    assert_start_frames(&syms[4..], exe);

    // Stopping at uncovered addresses changes nothing: every frame had CFI.
    u.set_options(UnwindOptions {
        missing_cfi: MissingCfi::Stop,
        ..UnwindOptions::default()
    });
    let (again, outcome) = unwind(&mut u, &cap, cap.stack.len());
    assert!(outcome.is_complete(), "{outcome:?}");
    assert_eq!(again, frames);
}

#[test]
fn unwinds_a_binary_without_frame_pointers() {
    let exe = exe_no_fp();
    check_direct_chain(&exe);
}

#[test]
fn unwinds_a_binary_with_frame_pointers() {
    check_direct_chain(&exe_fp());
}

/// Code built `-fno-asynchronous-unwind-tables -g` has CFI only in .debug_frame; the C
/// runtime's start files still bring a small .eh_frame, which framehop would prefer.
#[test]
fn unwinds_with_debug_frame() {
    let exe = fixture_variant(
        "unwind_fixture",
        "debugframe",
        &[
            "-O2",
            "-fomit-frame-pointer",
            "-fno-asynchronous-unwind-tables",
            "-fno-unwind-tables",
        ],
    );
    let (cap, _dir) = capture(&exe, &["direct"]);
    let cache = UnwindCache::new();
    let mut u = unwinder_for(&cap, &cache);
    let module = u
        .modules()
        .find(|m| Path::new(&m.path) == exe)
        .expect("the executable is a module");
    assert_eq!(module.info.cfi_kind(), CfiKind::DebugFrame);
    let (frames, outcome) = unwind(&mut u, &cap, cap.stack.len());
    let syms = symbolize(&cap.maps, &frames);
    assert_eq!(names(&syms)[..4], CHAIN, "frames: {syms:#?}");
    assert_start_frames(&syms[4..], &exe);
    // _start's CFI is in the .eh_frame that framehop was not given: the end there is not
    // trusted, and says so.
    assert_eq!(
        outcome.truncation(),
        Some(&Truncation::NoUnwindInfo {
            address: frames.last().unwrap() - 1,
            module: exe.to_str().map(String::from),
        }),
        "frames: {syms:#?}"
    );
}

/// The caller of the executable's callback is a library frame without a frame pointer, and its
/// caller another: only the library's CFI leads back to the executable.
#[test]
fn crosses_a_library_without_frame_pointers() {
    let exe = exe_no_fp();
    let lib = lib_no_fp();
    let (cap, _dir) = capture(&exe, &["lib", lib.to_str().unwrap()]);
    let cache = UnwindCache::new();
    let mut u = unwinder_for(&cap, &cache);
    u.set_options(UnwindOptions {
        missing_cfi: MissingCfi::Stop,
        ..UnwindOptions::default()
    });
    let (frames, outcome) = unwind(&mut u, &cap, cap.stack.len());
    let syms = symbolize(&cap.maps, &frames);
    assert!(outcome.is_complete(), "{outcome:?}: {syms:#?}");
    assert_eq!(names(&syms)[..5], LIB_CHAIN, "frames: {syms:#?}");
    let modules: Vec<&Path> = syms[..5].iter().map(|f| Path::new(&f.module)).collect();
    assert_eq!(modules, [&*exe, &*lib, &*lib, &*exe, &*exe]);
    assert_start_frames(&syms[5..], &exe);

    // Without the library's unwind data the walk cannot cross it, and says where it stopped.
    let maps_without_lib: String = cap
        .maps
        .lines()
        .filter(|l| !l.ends_with(lib.to_str().unwrap()))
        .map(|l| format!("{l}\n"))
        .collect();
    let mut blind =
        ProcessUnwinder::from_maps(&maps_without_lib, FileAccess::Root("/".into()), &cache);
    blind.set_options(u.options());
    let (partial, outcome) = unwind(&mut blind, &cap, cap.stack.len());
    assert_eq!(partial, frames[..2], "stops at the first library frame");
    let lib_frame = frames[1] - 1;
    assert_eq!(
        outcome.truncation(),
        Some(&Truncation::NoUnwindInfo {
            address: lib_frame,
            module: None
        })
    );
}

// ---- truncation ----------------------------------------------------------------------------

/// A 64-byte copy holds none of inner_fn's callers.
#[test]
fn a_short_copy_is_reported_as_truncated() {
    let (cap, _dir) = capture(&exe_no_fp(), &["direct"]);
    let cache = UnwindCache::new();
    let mut u = unwinder_for(&cap, &cache);
    let (frames, outcome) = unwind(&mut u, &cap, 64);
    assert_eq!(frames, [cap.regs.ip]);
    match outcome.truncation() {
        Some(Truncation::StackNotCopied { addr, copied }) => {
            assert!(*addr >= cap.regs.sp + 64, "{outcome:?}");
            assert_eq!(*copied, cap.regs.sp..cap.regs.sp + 64);
        }
        other => panic!("expected a short-copy truncation, got {other:?}"),
    }
}

/// For every copy length, the frames are a prefix of the full stack, and a stack that is not
/// the full one is never reported complete.
#[test]
fn every_cut_of_the_copy_is_a_reported_prefix() {
    let (cap, _dir) = capture(&exe_no_fp(), &["direct"]);
    let cache = UnwindCache::new();
    let mut u = unwinder_for(&cap, &cache);
    let (full, outcome) = unwind(&mut u, &cap, cap.stack.len());
    assert!(outcome.is_complete());
    let mut complete = Vec::new();
    for len in (0..=cap.stack.len()).step_by(8) {
        let (frames, outcome) = unwind(&mut u, &cap, len);
        assert_eq!(frames, full[..frames.len()], "copy of {len} bytes");
        if outcome.is_complete() {
            assert_eq!(frames, full, "copy of {len} bytes reported complete");
        } else {
            assert!(
                matches!(
                    outcome.truncation(),
                    Some(Truncation::StackNotCopied { .. })
                ),
                "copy of {len} bytes: {outcome:?}"
            );
        }
        complete.push(outcome.is_complete());
    }
    // Once long enough, always long enough: the walk reads a fixed set of stack words.
    let first = complete
        .iter()
        .position(|&c| c)
        .expect("some copy is complete");
    assert!(complete[first..].iter().all(|&c| c), "{complete:?}");
    assert!(
        first > 8,
        "a {}-byte copy cannot hold seven frames",
        first * 8
    );
}

/// Frame pointers alone (no module known) in code without them: one frame, reported as a
/// frame-pointer guess that ended, not as a complete stack.
#[test]
fn frame_pointer_fallback_is_reported() {
    let cache = UnwindCache::new();
    let (cap, _dir) = capture(&exe_no_fp(), &["direct"]);
    let mut u = ProcessUnwinder::empty(FileAccess::Root("/".into()), &cache);
    let (frames, outcome) = unwind(&mut u, &cap, cap.stack.len());
    assert!(!outcome.is_complete(), "{outcome:?}");
    assert!(outcome.fp_fallback_steps >= 1);
    let syms = symbolize(&cap.maps, &frames);
    assert_ne!(
        names(&syms).get(..4),
        Some(&CHAIN[..]),
        "frame pointers found the chain in code without them?"
    );
    u.set_options(UnwindOptions {
        missing_cfi: MissingCfi::Stop,
        ..UnwindOptions::default()
    });
    let (frames, outcome) = unwind(&mut u, &cap, cap.stack.len());
    assert_eq!(frames, [cap.regs.ip]);
    assert_eq!(
        outcome.truncation(),
        Some(&Truncation::NoUnwindInfo {
            address: cap.regs.ip,
            module: None
        })
    );

    // In code with frame pointers the same fallback finds the chain, and still counts as a
    // guess.
    let (cap, _dir) = capture(&exe_fp(), &["direct"]);
    let mut u = ProcessUnwinder::empty(FileAccess::Root("/".into()), &cache);
    let (frames, outcome) = unwind(&mut u, &cap, cap.stack.len());
    let syms = symbolize(&cap.maps, &frames);
    assert_eq!(names(&syms)[..4], CHAIN, "frames: {syms:#?}");
    assert!(outcome.fp_fallback_steps >= 4, "{outcome:?}");
    assert!(!outcome.is_complete(), "{outcome:?}");
}

// ---- live processes, dlopen, the shared cache ----------------------------------------------

/// A live process: files opened through /proc/PID/root, a library dlopened after the unwinder
/// was built appears on refresh.
#[test]
fn refresh_adds_a_dlopened_library() {
    let exe = exe_no_fp();
    let lib = lib_no_fp();
    let dir = tempfile::tempdir().expect("temp dir");
    let prefix = dir.path().join("cap");
    let mut cmd = Command::new(&exe);
    cmd.arg(&prefix).args(["live-lib", lib.to_str().unwrap()]);
    let mut p = TestProcess::spawn("unwind_fixture", cmd);
    p.expect_stdout("ready");

    let cache = UnwindCache::new();
    let mut u = ProcessUnwinder::new(p.pid(), &cache).expect("unwinder of the live fixture");
    u.load_all();
    let lib_str = lib.to_str().unwrap();
    assert!(u.modules().any(|m| Path::new(&m.path) == exe));
    assert!(u.modules().all(|m| m.path != lib_str), "not loaded yet");

    p.send_line("go");
    p.expect_stdout("captured");
    let cap = read_capture(&prefix);
    let report = u.refresh().expect("refresh");
    assert_eq!(report.added, [lib_str], "{report:?}");
    assert_eq!(report.removed, 0);
    let again = u.refresh().expect("second refresh");
    assert!(again.added.is_empty() && again.removed == 0, "{again:?}");

    let (frames, outcome) = unwind(&mut u, &cap, cap.stack.len());
    let syms = symbolize(&cap.maps, &frames);
    assert!(outcome.is_complete(), "{outcome:?}: {syms:#?}");
    assert_eq!(names(&syms)[..5], LIB_CHAIN, "frames: {syms:#?}");
    p.send_line("done");
    p.wait_success();

    let err = ProcessUnwinder::from_maps("", FileAccess::Root("/".into()), &cache)
        .refresh()
        .expect_err("saved maps cannot refresh");
    assert!(err.to_string().contains("saved maps"), "{err}");
}

/// Two processes of one program parse nothing twice; a second program shares the C library.
#[test]
fn processes_share_parsed_modules() {
    let cache = UnwindCache::new();
    let (a, _da) = capture(&exe_no_fp(), &["direct"]);
    let (b, _db) = capture(&exe_no_fp(), &["direct"]);
    let (c, _dc) = capture(&exe_fp(), &["direct"]);

    let ua = unwinder_for(&a, &cache);
    let modules = ua.modules().count();
    assert!(modules >= 3, "executable, C library, loader: {modules}");
    let first = cache.stats();
    assert_eq!(first.parsed as usize, cache.len());

    let mut ub = unwinder_for(&b, &cache);
    let second = cache.stats();
    assert_eq!(second.parsed, first.parsed, "second process parsed again");
    assert_eq!(second.hits - first.hits, ub.modules().count() as u64);
    let (frames, outcome) = unwind(&mut ub, &b, b.stack.len());
    assert!(outcome.is_complete());
    assert_eq!(names(&symbolize(&b.maps, &frames))[..4], CHAIN);

    let _uc = unwinder_for(&c, &cache);
    assert_eq!(
        cache.stats().parsed,
        second.parsed + 1,
        "only the other executable is new"
    );
}

// ---- golden capture ------------------------------------------------------------------------

/// tests/golden/unwind: a capture taken once (`recapture_golden_unwind`, ignored by default)
/// from the fixture built without frame pointers, with that very binary, so that the unwinder is
/// checked against fixed bytes whatever compiler this machine has.
fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/unwind")
}

/// The golden maps keep only the fixture's own mappings, renamed `/unwind_fixture-nofp` (found
/// under the golden directory): the C library's frames above main are outside them.
fn golden_maps(maps: &str, exe: &Path) -> String {
    maps.lines()
        .filter(|l| l.ends_with(&*exe.to_string_lossy()))
        .map(|l| l.replace(&*exe.to_string_lossy(), "/unwind_fixture-nofp") + "\n")
        .collect()
}

/// Bytes of the golden stack copy kept: enough to go from inner_fn past main, short of the
/// arguments, environment and auxiliary vector at the top of the stack (never committed).
const GOLDEN_STACK_BYTES: usize = 2048;

#[test]
#[ignore = "rewrites tests/golden/unwind from a fresh capture; run by hand after changing the fixture"]
fn recapture_golden_unwind() {
    let exe = exe_no_fp();
    let dir = tempfile::tempdir().unwrap();
    let prefix = dir.path().join("cap");
    let mut cmd = Command::new(&exe);
    cmd.env_clear().arg(&prefix).arg("direct");
    let out = common::run("unwind_fixture", cmd);
    assert!(out.status.success());
    let cap = read_capture(&prefix);
    let golden = golden_dir();
    std::fs::create_dir_all(&golden).unwrap();
    std::fs::copy(&exe, golden.join("unwind_fixture-nofp")).unwrap();
    let stack = &cap.stack[..GOLDEN_STACK_BYTES.min(cap.stack.len())];
    std::fs::write(golden.join("cap.stack"), stack).unwrap();
    let regs = format!(
        "{:x} {:x} {:x} {:x}\n",
        cap.regs.ip,
        cap.regs.sp,
        cap.regs.bp,
        stack.len()
    );
    std::fs::write(golden.join("cap.regs"), regs).unwrap();
    std::fs::write(golden.join("cap.maps"), golden_maps(&cap.maps, &exe)).unwrap();
}

#[test]
fn unwinds_the_golden_capture_to_the_golden_frames() {
    let golden = golden_dir();
    let cap = read_capture(&golden.join("cap"));
    let cache = UnwindCache::new();
    let mut u = ProcessUnwinder::from_maps(&cap.maps, FileAccess::Root(golden.clone()), &cache);
    u.load_all();
    assert_eq!(u.load_errors().count(), 0);
    let (ips, outcome) = unwind(&mut u, &cap, cap.stack.len());
    let exe = golden.join("unwind_fixture-nofp");
    let exe_maps = cap
        .maps
        .replace("/unwind_fixture-nofp", &exe.to_string_lossy());
    let mut text: String = symbolize(&exe_maps, &ips)
        .iter()
        .map(|f| {
            let name = if f.module == "?" {
                "[outside the capture's modules]"
            } else {
                &f.name
            };
            format!("{name}\n")
        })
        .collect();
    // How it ended (the capture's fixed addresses: deterministic).
    text.push_str(&format!("{:?}\n", outcome.end));
    let expected_path = golden.join("frames.txt");
    if std::env::var_os("ALLOCTRACE_BLESS").is_some_and(|v| v == "1") {
        std::fs::write(&expected_path, &text).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&expected_path).unwrap();
    assert_eq!(
        text,
        expected,
        "ALLOCTRACE_BLESS=1 rewrites {}",
        expected_path.display()
    );
}
