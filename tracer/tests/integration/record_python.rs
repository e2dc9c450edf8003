//! CPython's object arenas are recognized from the caller of their mmap and reported as class
//! `python-arena`, apart from other anonymous mappings. Fixture: tests/fixtures/py_arena_fixture.py
//! run by the machine's python3. Privileged: needs root and eBPF.

use std::{path::Path, process::Command};

use crate::common::{Session, TestProcess, fixture_source, python, report_value, view};

#[test]
fn cpython_arenas_are_their_own_class() {
    require_privileges!();
    let script = fixture_source("py_arena_fixture.py");
    let mut cmd = Command::new(python());
    cmd.arg(script);
    let mut target = TestProcess::spawn("python3 py_arena_fixture.py", cmd);
    target.expect_stdout("ready");
    let mut s = Session::attach_and_run(target, "py", &[]);
    s.end(libc::SIGINT);

    let r = report_value(&s.trace);
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

/// The line of `# at:NAME` in a fixture script.
fn marked_line(script: &Path, name: &str) -> usize {
    let text = std::fs::read_to_string(script).unwrap();
    1 + text
        .lines()
        .position(|l| l.ends_with(&format!("# at:{name}")))
        .unwrap_or_else(|| panic!("no `# at:{name}` in {}", script.display()))
}

/// Interpreters to run the Python-frames test with: the machine's `python3`, and the other
/// CPython versions pyenv has installed here (3.10 to 3.13 layouts).
fn interpreters() -> Vec<String> {
    let mut all = vec![python()];
    for minor in [10, 11, 12, 13] {
        let pattern = format!("/root/.pyenv/versions/3.{minor}.");
        if let Ok(dir) = std::fs::read_dir("/root/.pyenv/versions") {
            for e in dir.flatten() {
                let exe = e.path().join(format!("bin/python3.{minor}"));
                if e.path().to_string_lossy().starts_with(&pattern) && exe.exists() {
                    let exe = exe.to_string_lossy().into_owned();
                    if !all.contains(&exe) {
                        all.push(exe);
                    }
                }
            }
        }
    }
    all
}

#[test]
fn leaks_appear_under_the_python_functions_that_made_them() {
    require_privileges!();
    for interpreter in interpreters() {
        python_leaks_under_their_functions(&interpreter);
    }
}

fn python_leaks_under_their_functions(interpreter: &str) {
    let script = &fixture_source("py_leak_fixture.py");
    let mut cmd = Command::new(interpreter);
    cmd.arg(script);
    let mut target = TestProcess::spawn(&format!("{interpreter} py_leak_fixture.py"), cmd);
    target.expect_stdout("ready");
    let mut s = Session::attach_and_run(target, "py", &["--heap"]);
    s.end(libc::SIGINT);
    let r = report_value(&s.trace);
    assert!(
        s.recorder
            .stderr_text()
            .contains("Python frames: CPython 3."),
        "{}",
        s.recorder.stderr_text()
    );

    let frame = |name: &str| {
        let line = marked_line(script, name);
        format!("{name} ({}:{line})", script.display())
    };
    let rows_with = |class: &str, frame: &str| -> Vec<serde_json::Value> {
        r["stacks"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| {
                s["class"] == class && s["frames"].as_array().unwrap().iter().any(|f| f == frame)
            })
            .cloned()
            .collect()
    };
    let live = |rows: &[serde_json::Value]| -> u64 {
        rows.iter().map(|s| s["live_bytes"].as_u64().unwrap()).sum()
    };

    // Through malloc: 100 x (64 KiB + NUL), plus the list's own growth in the same function.
    let buffers = rows_with("heap", &frame("leak_buffers"));
    let bytes = live(&buffers);
    assert!(
        (100 * 65537..100 * 65537 + 4096).contains(&bytes),
        "{interpreter}: heap under leak_buffers: {bytes} B: {r:#}"
    );
    // The Python chain, innermost first, in place of the interpreter's loop, native frames
    // around it.
    let chain = [frame("leak_buffers"), frame("serve"), frame("<module>")];
    for s in &buffers {
        let frames: Vec<&str> = s["frames"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f.as_str().unwrap())
            .collect();
        let at = frames.iter().position(|f| *f == chain[0]).unwrap();
        assert_eq!(
            frames[at..at + 3],
            chain.each_ref().map(String::as_str),
            "{frames:?}"
        );
        assert!(
            at > 0,
            "native frames (the allocator's callers) come first: {frames:?}"
        );
        assert!(
            !frames.contains(&"_PyEval_EvalFrameDefault"),
            "the evaluation loop is replaced: {frames:?}"
        );
    }
    // Through arenas: pymalloc's 1 MiB mappings under leak_objects (300,000 x 16 B at least).
    let arenas = rows_with("python-arena", &frame("leak_objects"));
    let bytes = live(&arenas);
    assert!(
        bytes >= 300_000 * 16 - (1 << 20) && bytes % (1 << 20) == 0,
        "{interpreter}: python-arena under leak_objects: {bytes} B: {r:#}"
    );
    for s in &arenas {
        let frames = s["frames"].as_array().unwrap();
        let serve = frame("serve_objects").replace("serve_objects (", "serve (");
        assert!(frames.iter().any(|f| *f == serve), "{frames:?}");
    }
}

/// `--debug-bpf` prints the programs' log: the main thread of a process with 20 more threads
/// has its thread state past the 16 the frame walker searches, and the log says so for each of
/// its allocations.
#[test]
fn debug_bpf_logs_why_python_frames_are_missing() {
    require_privileges!();
    let mut cmd = Command::new(python());
    cmd.arg(fixture_source("py_threads_fixture.py"));
    let mut target = TestProcess::spawn("python3 py_threads_fixture.py", cmd);
    target.expect_stdout("ready");
    let pid = target.pid();
    let mut s = Session::attach_and_run(target, "py", &["--heap", "--debug-bpf"]);
    s.end(libc::SIGINT);
    let expected = format!(
        "alloctrace: bpf DEBUG: Python frames skipped, thread {pid}: not among the first 16 thread \
         states"
    );
    let log = s.recorder.stderr_text();
    assert!(log.lines().any(|l| l == expected), "{expected:?} in\n{log}");
}

/// `--phase NAME=py:MODULE:QUALNAME`: a Python function's phase is told from the Python frames
/// of each stack (the innermost rule's function wins); it has no entry count, and the split of
/// its frees by phase is unknown (a free has no stack).
#[test]
fn python_functions_are_phases_told_from_the_stacks() {
    require_privileges!();
    let script = &fixture_source("py_leak_fixture.py");
    let mut cmd = Command::new(python());
    cmd.arg(script);
    let mut target = TestProcess::spawn("python3 py_leak_fixture.py", cmd);
    target.expect_stdout("ready");
    let rules = [
        "--heap",
        "--phase",
        "serve=py:py_leak_fixture:serve",
        "--phase",
        "buffers=py:py_leak_fixture:leak_buffers",
    ];
    let mut s = Session::attach_and_run(target, "py", &rules);
    s.end(libc::SIGINT);
    let r = report_value(&s.trace);
    let phases = &r["phases"];
    let rules = phases["rules"].as_array().unwrap();
    assert_eq!(rules.len(), 2, "{phases}");
    for rule in rules {
        assert_eq!(rule["entries"], serde_json::Value::Null, "{rule}");
        assert_eq!(rule["file"], serde_json::Value::Null, "{rule}");
    }
    let frame = |name: &str| {
        let line = marked_line(script, name);
        format!("{name} ({}:{line})", script.display())
    };
    let live_in = |class: &str, frame: &str, phase: &str| -> u64 {
        (r["stacks"].as_array().unwrap().iter())
            .filter(|s| s["class"] == class && s["phase"] == phase)
            .filter(|s| s["frames"].as_array().unwrap().iter().any(|f| f == frame))
            .map(|s| s["live_bytes"].as_u64().unwrap())
            .sum()
    };
    // leak_buffers runs inside serve: its own rule, the innermost, names the phase.
    let buffers = live_in("heap", &frame("leak_buffers"), "buffers");
    assert!(
        (100 * 65537..100 * 65537 + 4096).contains(&buffers),
        "heap under leak_buffers in phase buffers: {buffers} B\n{phases:#}"
    );
    assert_eq!(live_in("heap", &frame("leak_buffers"), "serve"), 0);
    assert_eq!(live_in("heap", &frame("leak_buffers"), "none"), 0);
    // The arenas leak_objects maps are serve's.
    let arenas = live_in("python-arena", &frame("leak_objects"), "serve");
    assert!(arenas >= 300_000 * 16 - (1 << 20), "{arenas} B\n{phases:#}");
    let rows = phases["by_phase"].as_array().unwrap();
    let row = |name: &str| rows.iter().find(|r| r["phase"] == name).unwrap().clone();
    let buffers_row = row("buffers");
    assert!(buffers_row["live_bytes"].as_u64().unwrap() >= buffers);
    assert_eq!(buffers_row["entries"], serde_json::Value::Null);
    assert_eq!(buffers_row["live_per_entry"], serde_json::Value::Null);
    assert_eq!(buffers_row["freed_within_bytes"], serde_json::Value::Null);
    assert_eq!(
        buffers_row["freed_elsewhere_bytes"],
        serde_json::Value::Null
    );
    assert!(row("serve")["live_bytes"].as_u64().unwrap() >= arenas);
    // The timeline draws both phases' bands over the seconds their memory changed.
    let svg_path = s.dir.path().join("timeline.svg");
    view(&["timeline", "-o", svg_path.to_str().unwrap()], &s.trace);
    let svg = std::fs::read_to_string(&svg_path).unwrap();
    for phase in ["serve", "buffers"] {
        assert!(
            svg.contains(&format!("<title>phase {phase}: its memory changed at ")),
            "{phase}: {svg}"
        );
    }
}

/// The built-in vLLM profile, with no `--phase`: a package laid out as vLLM's, whose
/// `GPUModelRunner.load_model` and `execute_model` are where vLLM has them, puts what they
/// allocate in phases `load` and `serve`; the report names the profile.
#[test]
fn the_vllm_profile_names_the_phases_of_a_vllm_shaped_program() {
    require_privileges!();
    let root = tempfile::tempdir().unwrap();
    let worker = root.path().join("vllm/v1/worker");
    std::fs::create_dir_all(&worker).unwrap();
    for init in ["vllm", "vllm/v1", "vllm/v1/worker"] {
        std::fs::write(root.path().join(init).join("__init__.py"), "").unwrap();
    }
    std::fs::write(
        worker.join("gpu_model_runner.py"),
        "kept = []\n\n\nclass GPUModelRunner:\n    def load_model(self):\n        \
         kept.append(bytearray(4 << 20))\n\n    def execute_model(self):\n        \
         kept.append(bytearray(256 << 10))\n",
    )
    .unwrap();
    let driver = root.path().join("serve.py");
    std::fs::write(
        &driver,
        "import sys\nfrom vllm.v1.worker.gpu_model_runner import GPUModelRunner\n\
         runner = GPUModelRunner()\nprint('ready', flush=True)\nsys.stdin.readline()\n\
         runner.load_model()\nfor _ in range(8):\n    runner.execute_model()\n\
         print('done', flush=True)\nsys.stdin.read()\n",
    )
    .unwrap();
    let mut cmd = Command::new(python());
    cmd.arg(&driver).env("PYTHONPATH", root.path());
    let mut target = TestProcess::spawn("python3 serve.py", cmd);
    target.expect_stdout("ready");
    let mut s = Session::attach_and_run(target, "vllm", &["--heap"]);
    s.end(libc::SIGINT);
    let r = report_value(&s.trace);
    let phases = &r["phases"];
    assert_eq!(
        phases["profiles"],
        serde_json::json!(["vLLM"]),
        "{phases:#}"
    );
    let rules: Vec<&str> = (phases["rules"].as_array().unwrap().iter())
        .map(|r| r["rule"].as_str().unwrap())
        .collect();
    assert_eq!(
        rules,
        [
            "load=py:vllm.v1.worker.gpu_model_runner:GPUModelRunner.load_model",
            "serve=py:vllm.v1.worker.gpu_model_runner:GPUModelRunner.execute_model"
        ],
        "only the rules that matched are listed"
    );
    let live = |phase: &str| -> u64 {
        (r["stacks"].as_array().unwrap().iter())
            .filter(|s| s["class"] == "heap" && s["phase"] == phase)
            .map(|s| s["live_bytes"].as_u64().unwrap())
            .sum()
    };
    // The bytearrays (and their NUL), with at most a list's growth beside them.
    let serve = live("serve");
    assert!(
        (8 * ((256 << 10) + 1)..8 * ((256 << 10) + 1) + 4096).contains(&serve),
        "serve: {serve} B\n{phases:#}"
    );
    let load = live("load");
    assert!(
        ((4 << 20) + 1..(4 << 20) + 4096).contains(&load),
        "load: {load} B\n{phases:#}"
    );
}
