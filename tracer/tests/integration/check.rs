//! `alloctrace check`: the leak test from outside the process, against a request server whose
//! memory per request is known by construction (tests/fixtures/server_fixture.c). The load
//! writes 50 requests to the server's FIFO and waits for their 50 answers. Privileged.

use std::path::Path;

use crate::common::{alloctrace_cmd, fixture, report_value, run};

/// The server's request and answer FIFOs, made in `dir`.
fn fifos(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let (requests, answers) = (dir.join("requests"), dir.join("answers"));
    for fifo in [&requests, &answers] {
        let path = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid C string.
        assert_eq!(unsafe { libc::mkfifo(path.as_ptr(), 0o600) }, 0);
    }
    (requests, answers)
}

/// Runs `alloctrace check` against `server_fixture MODE` (2 warm-up runs, 6 batches); returns
/// its exit code, standard output and the recording's JSON report.
fn check(dir: &Path, mode: &str) -> (i32, String, serde_json::Value) {
    let (requests, answers) = fifos(dir);
    let load = format!(
        "for i in $(seq 50); do echo r; done > {} && head -c 50 {} > /dev/null",
        requests.display(),
        answers.display()
    );
    let trace = dir.join(format!("{mode}.trace"));
    let mut cmd = alloctrace_cmd(&["check", "--heap", "--warmup", "2", "--batches", "6"]);
    cmd.arg("--load").arg(&load).arg("-o").arg(&trace).arg("--");
    cmd.arg(fixture("server_fixture"))
        .arg(&requests)
        .arg(&answers)
        .arg(mode);
    let out = run(&format!("alloctrace check ({mode})"), cmd);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("load: 8 runs, 0 failed"),
        "{mode}: {stderr}\n{stdout}"
    );
    let code = out.status.code().unwrap_or(-1);
    (code, format!("{stdout}\n{stderr}"), report_value(&trace))
}

#[test]
fn a_per_request_leak_fails_the_check_and_names_its_stack() {
    require_privileges!();
    let dir = tempfile::tempdir().unwrap();
    let (code, out, json) = check(dir.path(), "leak");
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("Memory Growth Analysis"), "{out}");
    assert!(out.contains("verdict:       LEAK"), "{out}");
    let check = &json["check"];
    let batches: Vec<u64> = (check["batches"].as_array().unwrap().iter())
        .map(|b| b.as_u64().unwrap())
        .collect();
    assert_eq!(batches.len(), 6, "{check}");
    // 50 requests of 512 leaked bytes per batch, every batch, exactly.
    for pair in batches.windows(2) {
        assert_eq!(pair[1] - pair[0], 50 * 512, "{check}");
    }
    assert_eq!(
        check["growth_bytes"].as_f64(),
        Some(4.0 * 50.0 * 512.0),
        "{check}"
    );
    assert_eq!(check["verdict"], "leak");
    let first = &check["suspects"][0];
    assert_eq!(first["frames"][0], "remember_request", "{check}");
    // Grown since the warm-up's end: six batches of 50 leaks.
    assert_eq!(
        first["growth_bytes"].as_i64(),
        Some(6 * 50 * 512),
        "{check}"
    );
    assert_eq!(check["suspects"].as_array().unwrap().len(), 1, "{check}");
    // The text names the stack too.
    let line = out.lines().find(|l| l.contains(" 1. ")).unwrap_or_default();
    assert!(line.contains("remember_request"), "{out}");
    // The timeline draws the heap's line and marks each batch.
    let svg_path = dir.path().join("t.svg");
    let mut cmd = alloctrace_cmd(&["timeline", "-o"]);
    cmd.arg(&svg_path).arg(dir.path().join("leak.trace"));
    assert!(run("alloctrace timeline", cmd).status.success());
    let svg = std::fs::read_to_string(&svg_path).unwrap();
    assert!(svg.contains("<title>heap</title>"), "{svg}");
    for i in 1..=6 {
        assert!(svg.contains(&format!("<title>batch {i}</title>")), "{svg}");
    }
    pprof_reads_the_leak(dir.path(), &dir.path().join("leak.trace"));
    html_renders_in_chromium(dir.path(), &dir.path().join("leak.trace"));
    assert_eq!(
        json["verdict"][0]["category"], "leaks",
        "{}",
        json["verdict"]
    );
}

/// `report --format html`, opened in headless Chromium (Debian's, from scripts/setup): the
/// page's sections are in the DOM it built, the console logs no error, and the screenshot is
/// the size asked with something drawn (a blank page compresses to a few KiB).
fn html_renders_in_chromium(dir: &Path, trace: &Path) {
    let page = dir.join("postmortem.html");
    let mut cmd = alloctrace_cmd(&["report", "--format", "html", "-o"]);
    cmd.arg(&page).arg(trace);
    assert!(run("alloctrace report --format html", cmd).status.success());
    let chromium = |extra: &[&str]| {
        std::process::Command::new("chromium")
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--enable-logging=stderr",
            ])
            .arg(format!(
                "--user-data-dir={}",
                dir.join("chromium").display()
            ))
            .args(extra)
            .arg(format!("file://{}", page.display()))
            .env("HOME", dir)
            .output()
    };
    let dom = match chromium(&["--dump-dom"]) {
        Ok(out) => out,
        Err(e) if std::env::var_os("CI").is_none() => {
            eprintln!("chromium not run ({e}); scripts/setup installs it");
            return;
        }
        Err(e) => panic!("chromium is missing under CI=true (scripts/setup installs it): {e}"),
    };
    let html = String::from_utf8_lossy(&dom.stdout);
    for id in [
        "verdict",
        "check",
        "totals",
        "timeline",
        "flamegraphs",
        "stacks",
    ] {
        assert!(
            html.contains(&format!("<section id=\"{id}\">")),
            "{id}:\n{html}"
        );
    }
    assert!(html.contains("remember_request"), "{html}");
    let log = String::from_utf8_lossy(&dom.stderr);
    assert!(
        !log.lines()
            .any(|l| l.contains("CONSOLE") || l.contains("Uncaught")),
        "the page logged errors:\n{log}"
    );
    let shot = dir.join("postmortem.png");
    let out = chromium(&[
        &format!("--screenshot={}", shot.display()),
        "--window-size=1280,2000",
    ])
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let png = std::fs::read(&shot).unwrap();
    let dimension = |at: usize| u32::from_be_bytes(png[at..at + 4].try_into().unwrap());
    assert_eq!(&png[1..4], b"PNG");
    assert_eq!((dimension(16), dimension(20)), (1280, 2000));
    assert!(
        png.len() > 50_000,
        "a near-blank screenshot: {} bytes",
        png.len()
    );
}

/// `report --format pprof`: `go tool pprof` (Debian's golang, from scripts/setup) opens the
/// profile and puts the leak's 8 runs × 50 × 512 bytes at remember_request.
fn pprof_reads_the_leak(dir: &Path, trace: &Path) {
    let profile = dir.join("leak.pb.gz");
    let mut cmd = alloctrace_cmd(&["report", "--format", "pprof", "-o"]);
    cmd.arg(&profile).arg(trace);
    assert!(
        run("alloctrace report --format pprof", cmd)
            .status
            .success()
    );
    let go = std::process::Command::new("go")
        .args([
            "tool",
            "pprof",
            "-top",
            "-sample_index=inuse_space",
            "-unit=B",
        ])
        .arg(&profile)
        .env("HOME", dir)
        .output();
    let out = match go {
        Ok(out) => out,
        Err(e) if std::env::var_os("CI").is_none() => {
            eprintln!("go tool pprof not run (no go: {e}); scripts/setup installs it");
            return;
        }
        Err(e) => panic!("go is missing under CI=true (scripts/setup installs golang-go): {e}"),
    };
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = (text.lines())
        .find(|l| l.trim_end().ends_with("remember_request"))
        .unwrap_or_else(|| panic!("no remember_request in\n{text}"));
    assert!(line.trim_start().starts_with("204800B"), "{line}\n{text}");
}

#[test]
fn a_clean_server_and_a_cache_that_levels_off_pass() {
    require_privileges!();
    for mode in ["clean", "cache"] {
        let dir = tempfile::tempdir().unwrap();
        let (code, out, json) = check(dir.path(), mode);
        assert_eq!(code, 0, "{mode}: {out}");
        assert!(out.contains("verdict:       PASS"), "{mode}: {out}");
        let check = &json["check"];
        assert_eq!(check["growth_bytes"].as_f64(), Some(0.0), "{mode}: {check}");
        assert_eq!(check["suspects"], serde_json::json!([]), "{mode}: {check}");
    }
}

#[test]
fn a_swinging_server_is_too_noisy_to_judge() {
    require_privileges!();
    let dir = tempfile::tempdir().unwrap();
    let (code, out, json) = check(dir.path(), "noisy");
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("TOO NOISY"), "{out}");
    assert_eq!(json["check"]["verdict"], "too-noisy");
}

/// A target that exits before the batches ran: exit status 3 and one line that says so; the
/// load command left waiting on the dead server is not left behind.
#[test]
fn a_target_that_dies_before_the_batches_cannot_be_judged() {
    require_privileges!();
    let dir = tempfile::tempdir().unwrap();
    let (requests, answers) = fifos(dir.path());
    let load = format!(
        "echo r > {} && head -c 1 {}",
        requests.display(),
        answers.display()
    );
    let trace = dir.path().join("x.trace");
    let mut cmd = alloctrace_cmd(&["check", "--load", &load, "-o"]);
    cmd.arg(&trace).arg("--").arg(fixture("server_fixture"));
    cmd.arg(&requests).arg(&answers).arg("no-such-mode");
    let out = run("alloctrace check (dies)", cmd);
    assert_eq!(out.status.code(), Some(3));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("alloctrace: error: the load ran 0 of 10 batches before the recording ended (target ended: exited with status 2)"),
        "{stderr}"
    );
    assert!(out.stdout.is_empty());
    // No process runs the load any more.
    let needle = requests.to_string_lossy().into_owned();
    let left: Vec<String> = (std::fs::read_dir("/proc").unwrap().flatten())
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains(&needle) && !c.contains("server_fixture"))
        .collect();
    assert_eq!(left, Vec::<String>::new());
}

/// `alloctrace diff`: the clean run against the leaking one names what the leak left, exactly
/// (50 requests of 512 bytes in each of the 8 runs), matched by stack across the recordings.
#[test]
fn diff_of_a_clean_and_a_leaking_run_names_the_leak() {
    require_privileges!();
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    check(dirs[0].path(), "clean");
    check(dirs[1].path(), "leak");
    let svg = dirs[0].path().join("diff.svg");
    let mut cmd = alloctrace_cmd(&["diff", "--format", "json", "--flamegraph"]);
    cmd.arg(&svg)
        .arg(dirs[0].path().join("clean.trace"))
        .arg(dirs[1].path().join("leak.trace"));
    let out = run("alloctrace diff", cmd);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let d: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let first = &d["stacks"][0];
    assert_eq!(first["frames"][0], "remember_request", "{d:#}");
    assert_eq!(first["delta"].as_i64(), Some(8 * 50 * 512), "{d:#}");
    assert_eq!(first["before"].as_u64(), Some(0));
    let heap = (d["totals"].as_array().unwrap().iter())
        .find(|t| t["class"] == "heap")
        .unwrap();
    assert_eq!(heap["delta"].as_i64(), Some(8 * 50 * 512), "{d:#}");
    // The differential flame graph: the leak's stack, drawn as grown.
    let svg = std::fs::read_to_string(&svg).unwrap();
    assert!(svg.contains("remember_request"), "{svg}");
    assert!(svg.contains("after against before"), "{svg}");
}
