//! CPython's object arenas are recognized from the caller of their mmap and reported as class
//! `python-arena`, apart from other anonymous mappings. Fixture: tests/fixtures/py_arena_fixture.py
//! run by the machine's python3. Privileged: needs root and eBPF.

mod common;

use std::process::Command;

use common::{TestProcess, privileged, report_value, start_recorder_args};

/// The real interpreter behind `python3` (not a shim script), so that the traced process is
/// CPython itself.
fn python() -> String {
    let out = Command::new("python3")
        .args(["-c", "import sys; print(sys.executable)"])
        .output()
        .expect("python3 is needed for this test");
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

#[test]
fn cpython_arenas_are_their_own_class() {
    if !privileged() {
        return;
    }
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/py_arena_fixture.py"
    );
    let mut cmd = Command::new(python());
    cmd.arg(script);
    let mut target = TestProcess::spawn("python3 py_arena_fixture.py", cmd);
    target.expect_stdout("ready");
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("py.trace");
    let mut recorder = start_recorder_args(target.pid(), &trace, &[]);
    target.send_line("go");
    target.expect_stdout("done");
    recorder.signal(libc::SIGINT);
    recorder.wait_success();
    target.close_stdin();
    target.wait_success();

    let r = report_value(&trace);
    let arena = &r["totals"]["python-arena"];
    let live = arena["live_bytes"].as_u64().unwrap();
    // 1,000,000 objects of 16 bytes need 16 MB of arena; arenas that existed before attach
    // may hold a few MiB of them.
    assert!(
        live >= 1_000_000 * 16 - (4 << 20),
        "python-arena live {live} B: {r:#}"
    );
    assert_eq!(live % (1 << 20), 0, "arenas are 1 MiB each: {r:#}");
    for s in r["stacks"].as_array().unwrap() {
        let by_arena_mmap = s["frames"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f == "_PyObject_ArenaMmap");
        assert_eq!(
            s["class"] == "python-arena",
            by_arena_mmap && s["class"] != "heap",
            "every arena mapping is python-arena and nothing else is: {s:#}"
        );
    }
}
