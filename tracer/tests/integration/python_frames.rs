//! Python frames read out of live CPython processes (3.10-3.13: the Debian python3 and pyenv's
//! builds where present), checked against the fixture's own source; the line table decoders
//! checked against what each interpreter's `co_lines()` / `co_positions()` say; the offset table
//! checked against `offsetof` in each installed set of internal headers. Interpreters that are
//! not installed are skipped with a notice. Needs ptrace access to its own children only.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use alloctrace::python::{
    self, ABSENT, GLIBC_PTHREAD_TID, Location, ProcMem, PyFrame, PyVersion, PythonOffsets,
    PythonProcess,
};

use crate::common::{self, TestProcess, fixture_source};

const SYSTEM_PYTHON: &str = "/usr/bin/python3";

/// pyenv's CPython 3.`minor` (any micro), or `None` with a notice.
fn pyenv(minor: u32) -> Option<PathBuf> {
    let root = Path::new("/root/.pyenv/versions");
    let found = std::fs::read_dir(root).ok().and_then(|d| {
        d.filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| {
                let n = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
                n.starts_with(&format!("3.{minor}.")) && n[5..].chars().all(|c| c.is_ascii_digit())
            })
            .map(|p| p.join(format!("bin/python3.{minor}")))
            .find(|p| p.exists())
    });
    if found.is_none() {
        eprintln!(
            "SKIPPED: no pyenv CPython 3.{minor} under {}",
            root.display()
        );
    }
    found
}

/// Every interpreter this machine has, for the table-driven tests.
fn interpreters() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = (10..=13).filter_map(pyenv).collect();
    assert!(
        Path::new(SYSTEM_PYTHON).exists(),
        "{SYSTEM_PYTHON} is needed for this test"
    );
    v.push(SYSTEM_PYTHON.into());
    v
}

/// `name → line` from the fixture's `# at:NAME` markers.
fn markers(script: &Path) -> BTreeMap<String, u32> {
    let text = std::fs::read_to_string(script).unwrap();
    text.lines()
        .enumerate()
        .filter_map(|(i, l)| {
            let name = l.split("# at:").nth(1)?;
            Some((name.trim().to_string(), i as u32 + 1))
        })
        .collect()
}

/// Polls the stack of `tid` until `done` accepts it (the fixture's threads reach their blocking
/// calls shortly after "ready"), returning the last stack read.
fn settle(p: &mut PythonProcess, tid: u32, done: impl Fn(&[PyFrame]) -> bool) -> Vec<PyFrame> {
    let start = Instant::now();
    loop {
        let stack = p
            .stack(tid)
            .unwrap_or_else(|e| panic!("stack of {tid}: {e}"));
        if done(&stack) || start.elapsed() > common::TIMEOUT {
            return stack;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn line_text(file: &str, line: u32) -> String {
    let text = std::fs::read_to_string(file).unwrap_or_else(|e| panic!("{file}: {e}"));
    text.lines()
        .nth(line as usize - 1)
        .unwrap_or("")
        .to_string()
}

fn check_fixture_frames(python: &Path) {
    let script = fixture_source("py_frames_fixture.py");
    let marks = markers(&script);
    let mut cmd = Command::new(python);
    cmd.arg(&script);
    let mut target = TestProcess::spawn(&format!("{} fixture", python.display()), cmd);
    target.expect_stdout("ready");
    let worker_tid: u32 = target
        .stdout_text()
        .lines()
        .find_map(|l| l.strip_prefix("worker "))
        .and_then(|t| t.parse().ok())
        .expect("fixture prints its worker's tid");

    let mut p = PythonProcess::attach(target.pid()).unwrap_or_else(|e| panic!("attach: {e}"));
    let version = p.interpreter().version;
    // 3.10 has co_name only; 3.11+ qualified names.
    let name = |q: &str| {
        if version.minor >= 11 {
            q.to_string()
        } else {
            q.rsplit('.').next().unwrap().to_string()
        }
    };
    let file = script.to_str().unwrap().to_string();
    let at = |q: &str| PyFrame {
        function: name(q),
        file: file.clone(),
        line: Some(marks[q]),
    };

    // Main thread: exactly the fixture's call chain, innermost first.
    let expected = vec![
        at("allocate_buffer"),
        at("build_layer"),
        at("Model.load_weights"),
        at("<module>"),
    ];
    let main = settle(&mut p, target.pid(), |s| s == expected);
    assert_eq!(main, expected, "{} main thread", python.display());

    // The same frames through the BPF path: raw (code, offset) pairs, then the symbolizer.
    let t = p.thread(target.pid()).unwrap();
    let raw = p.raw_stack(t.tstate).unwrap();
    assert_eq!(raw.len(), 4);
    let again: Vec<PyFrame> = raw.iter().map(|&f| p.symbolize(f).unwrap()).collect();
    assert_eq!(again, expected);

    // Worker thread: threading.py's Condition.wait → Event.wait, then the fixture's function,
    // then threading.py's bootstrap frames; lines checked against threading.py's source.
    let worker = settle(&mut p, worker_tid, |s| {
        s.iter()
            .any(|f| f.file == file && f.line == Some(marks["worker_wait"]))
            && s.first()
                .and_then(|f| f.line)
                .is_some_and(|l| line_text(&s[0].file, l).contains(".acquire("))
    });
    let i = worker
        .iter()
        .position(|f| f.file == file)
        .unwrap_or_else(|| panic!("worker stack without the fixture: {worker:#?}"));
    assert_eq!(worker[i], at("worker_wait"), "{worker:#?}");
    assert_eq!(i, 2, "Condition.wait and Event.wait inside: {worker:#?}");
    let wait_names = [name("Condition.wait"), name("Event.wait")];
    for (f, n) in worker[..2].iter().zip(&wait_names) {
        assert!(f.file.ends_with("/threading.py"), "{f}");
        assert_eq!(&f.function, n);
    }
    let acquire = line_text(&worker[0].file, worker[0].line.unwrap());
    assert!(
        acquire.contains(".acquire("),
        "Condition.wait at {acquire:?}"
    );
    let cond_wait = line_text(&worker[1].file, worker[1].line.unwrap());
    assert!(
        cond_wait.contains("_cond.wait("),
        "Event.wait at {cond_wait:?}"
    );
    let outer: Vec<&str> = worker[i + 1..].iter().map(|f| &*f.function).collect();
    assert_eq!(
        outer,
        [
            name("Thread.run"),
            name("Thread._bootstrap_inner"),
            name("Thread._bootstrap")
        ],
        "{worker:#?}"
    );

    // Every thread state maps to its kernel tid; glibc's pthread tid offset (which 3.10 relies
    // on) agrees with native_thread_id where the interpreter has it.
    let threads = p.threads().unwrap();
    let mut tids: Vec<u32> = threads.iter().filter_map(|t| t.native_thread_id).collect();
    tids.sort();
    let mut want = vec![target.pid(), worker_tid];
    want.sort();
    assert_eq!(tids, want);
    if version.minor >= 11 {
        let mem = ProcMem::open(target.pid()).unwrap();
        for t in &threads {
            let via_glibc = mem.u32(t.thread_id + GLIBC_PTHREAD_TID).unwrap();
            assert_eq!(Some(via_glibc), t.native_thread_id);
        }
    }

    // The layout used is the table's, also where 3.13 published its own debug offsets.
    let i = p.interpreter();
    let mut table = python::offsets_for(i.version).unwrap();
    table.runtime_addr = i.offsets.runtime_addr;
    table.code_type_addr = i.offsets.code_type_addr;
    table.tls_tstate = i.offsets.tls_tstate;
    assert_eq!(i.offsets, table);
    assert_eq!(i.from_debug_offsets, version.minor >= 13);
    assert_ne!(i.offsets.code_type_addr, ABSENT);

    target.send_line("done");
    target.wait_success();
}

#[test]
fn frames_system_python3() {
    check_fixture_frames(Path::new(SYSTEM_PYTHON));
}

#[test]
fn frames_pyenv_3_10() {
    if let Some(p) = pyenv(10) {
        check_fixture_frames(&p);
    }
}

#[test]
fn frames_pyenv_3_11() {
    if let Some(p) = pyenv(11) {
        check_fixture_frames(&p);
    }
}

#[test]
fn frames_pyenv_3_12() {
    if let Some(p) = pyenv(12) {
        check_fixture_frames(&p);
    }
}

#[test]
fn frames_pyenv_3_13() {
    if let Some(p) = pyenv(13) {
        check_fixture_frames(&p);
    }
}

/// Starts `python` blocked on stdin.
fn idle(python: &Path) -> TestProcess {
    let mut cmd = Command::new(python);
    cmd.args([
        "-c",
        "import sys; print('ready', flush=True); sys.stdin.read()",
    ]);
    let mut t = TestProcess::spawn("idle python", cmd);
    t.expect_stdout("ready");
    t
}

#[test]
fn detection_names_interpreter_and_version() {
    for py in interpreters() {
        let mut t = idle(&py);
        let i = python::detect(t.pid()).unwrap_or_else(|e| panic!("{}: {e}", py.display()));
        let out = Command::new(&py)
            .args([
                "-c",
                "import sys; print(sys.version_info[0], sys.version_info[1], sys.version_info[2])",
            ])
            .output()
            .unwrap();
        let v: Vec<u32> = String::from_utf8(out.stdout)
            .unwrap()
            .split_whitespace()
            .map(|s| s.parse().unwrap())
            .collect();
        assert_eq!((i.version.major, i.version.minor), (v[0], v[1]));
        if v[1] >= 11 {
            assert_eq!(i.version.micro, v[2], "micro from Py_Version");
        }
        let name = i.path.file_name().unwrap().to_str().unwrap();
        assert!(name.contains(&format!("python3.{}", v[1])), "{name}");
        t.close_stdin();
        t.wait_success();
    }
}

#[test]
fn unsupported_version_is_one_clear_error() {
    let err = python::offsets_for(PyVersion {
        major: 3,
        minor: 14,
        micro: 0,
    })
    .unwrap_err()
    .to_string();
    assert_eq!(
        err,
        "CPython 3.14 is not supported (supported: 3.10 to 3.13)"
    );

    let Some(py39) = pyenv(9) else { return };
    let mut t = idle(&py39);
    let err = PythonProcess::attach(t.pid())
        .err()
        .expect("3.9 is refused");
    assert_eq!(
        err.to_string(),
        "CPython 3.9 is not supported (supported: 3.10 to 3.13)"
    );
    t.close_stdin();
    t.wait_success();
}

#[test]
fn non_python_and_exited_processes_are_clear_errors() {
    let mut cmd = Command::new("sleep");
    cmd.arg("30");
    let mut t = TestProcess::spawn("sleep", cmd);
    let pid = t.pid();
    let err = PythonProcess::attach(pid)
        .err()
        .expect("sleep is not Python");
    assert_eq!(
        err.to_string(),
        format!(
            "process {pid} has no CPython interpreter mapped (no libpython3.X.so or python3.X)"
        )
    );
    t.signal(libc::SIGKILL);
    t.wait();
    let err = PythonProcess::attach(pid).err().expect("exited");
    let msg = err.to_string();
    assert!(
        msg.starts_with(&format!("process {pid}: read /proc/PID/maps:")),
        "{msg}"
    );
    assert!(!msg.contains('\n'));
}

// ---- line tables ---------------------------------------------------------------------------

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn opt(v: &serde_json::Value) -> Option<i32> {
    v.as_i64().map(|x| x as i32)
}

/// Every code unit of every code object of the dump: our line equals co_lines()'s, and (3.11+)
/// our full position equals co_positions()'s.
#[test]
fn line_tables_match_the_interpreters() {
    for py in interpreters() {
        let out = Command::new(&py)
            .arg(fixture_source("py_linetable_dump.py"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let dump: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let ver = Command::new(&py)
            .args(["-c", "import sys; print(sys.version_info[1])"])
            .output()
            .unwrap();
        let minor: u32 = String::from_utf8(ver.stdout)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let codes = dump.as_array().unwrap();
        assert!(codes.len() > 50, "{}: too few code objects", py.display());
        let (mut units, mut long_form) = (0, false);
        for c in codes {
            let what = format!("{} {}", py.display(), c["name"]);
            let first = c["firstlineno"].as_i64().unwrap() as i32;
            let table = hex(c["linetable"].as_str().unwrap());
            let n = c["code_bytes"].as_u64().unwrap();
            let (ranges, locations) = if minor >= 11 {
                let locs = python::decode_location_table(&table, first);
                (python::line_ranges(&locs), Some(locs))
            } else {
                (python::decode_line_table_310(&table, first), None)
            };
            let lines = c["lines"].as_array().unwrap();
            for off in (0..n).step_by(2) {
                let want = lines
                    .iter()
                    .find(|r| r[0].as_u64().unwrap() <= off && off < r[1].as_u64().unwrap())
                    .and_then(|r| opt(&r[2]));
                assert_eq!(python::line_at(&ranges, off), want, "{what} offset {off}");
                units += 1;
            }
            if let Some(locs) = locations {
                long_form |= table.iter().any(|&b| b & 0x80 != 0 && (b >> 3) & 15 == 14);
                let per_unit: Vec<[Option<i32>; 4]> = locs
                    .iter()
                    .flat_map(|l: &Location| {
                        let p = [l.line, l.end_line, l.column, l.end_column];
                        std::iter::repeat_n(p, ((l.end - l.start) / 2) as usize)
                    })
                    .collect();
                let want: Vec<[Option<i32>; 4]> = c["positions"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|p| [opt(&p[0]), opt(&p[1]), opt(&p[2]), opt(&p[3])])
                    .collect();
                assert_eq!(per_unit, want, "{what}");
            }
        }
        assert!(units > 1000, "{}: only {units} code units", py.display());
        assert!(
            minor < 11 || long_form,
            "{}: no long-form entry",
            py.display()
        );
    }
}

// ---- offsets against the headers -----------------------------------------------------------

fn field(o: &PythonOffsets, name: &str) -> u64 {
    match name {
        "runtime_interpreters_head" => o.runtime_interpreters_head,
        "runtime_tstate_current" => o.runtime_tstate_current,
        "runtime_main_thread" => o.runtime_main_thread,
        "interp_next" => o.interp_next,
        "interp_threads_head" => o.interp_threads_head,
        "tstate_next" => o.tstate_next,
        "tstate_thread_id" => o.tstate_thread_id,
        "tstate_native_thread_id" => o.tstate_native_thread_id,
        "tstate_frame" => o.tstate_frame,
        "cframe_current_frame" => o.cframe_current_frame,
        "frame_code" => o.frame_code,
        "frame_previous" => o.frame_previous,
        "frame_instr" => o.frame_instr,
        "frame_owner" => o.frame_owner,
        "owner_cstack" => o.owner_cstack,
        "code_qualname" => o.code_qualname,
        "code_name" => o.code_name,
        "code_filename" => o.code_filename,
        "code_firstlineno" => o.code_firstlineno,
        "code_linetable" => o.code_linetable,
        "code_code_adaptive" => o.code_code_adaptive,
        "object_type" => o.object_type,
        "var_size" => o.var_size,
        "bytes_data" => o.bytes_data,
        "unicode_length" => o.unicode_length,
        "unicode_state" => o.unicode_state,
        "unicode_ascii_data" => o.unicode_ascii_data,
        "unicode_compact_data" => o.unicode_compact_data,
        other => panic!("probe prints unknown field {other}"),
    }
}

/// Compiles tests/fixtures/py_offsets_probe.c against every installed set of CPython internal
/// headers and compares each `offsetof` with the table; fields the probe does not print must be
/// ABSENT in the table (that version has no such member).
#[test]
fn offsets_match_installed_headers() {
    let mut dirs: Vec<Vec<PathBuf>> = Vec::new();
    for minor in 10..=13 {
        if let Some(py) = pyenv(minor) {
            let inc = py
                .parent()
                .unwrap()
                .parent()
                .unwrap()
                .join(format!("include/python3.{minor}"));
            dirs.push(vec![inc.clone(), inc.join("internal")]);
        }
    }
    let sys = PathBuf::from("/usr/include/python3.11");
    if sys.join("internal").exists() {
        dirs.push(vec![
            sys.clone(),
            sys.join("internal"),
            "/usr/include/x86_64-linux-gnu/python3.11".into(),
        ]);
    }
    assert!(!dirs.is_empty(), "no CPython headers installed");
    let tmp = tempfile::tempdir().unwrap();
    let all = [
        "runtime_interpreters_head",
        "runtime_tstate_current",
        "runtime_main_thread",
        "interp_next",
        "interp_threads_head",
        "tstate_next",
        "tstate_thread_id",
        "tstate_native_thread_id",
        "tstate_frame",
        "cframe_current_frame",
        "frame_code",
        "frame_previous",
        "frame_instr",
        "frame_owner",
        "owner_cstack",
        "code_qualname",
        "code_name",
        "code_filename",
        "code_firstlineno",
        "code_linetable",
        "code_code_adaptive",
        "object_type",
        "var_size",
        "bytes_data",
        "unicode_length",
        "unicode_state",
        "unicode_ascii_data",
        "unicode_compact_data",
    ];
    for (n, incs) in dirs.iter().enumerate() {
        let exe = tmp.path().join(format!("probe{n}"));
        let mut cc = Command::new("cc");
        cc.arg(fixture_source("py_offsets_probe.c"))
            .arg("-o")
            .arg(&exe);
        for i in incs {
            cc.arg("-I").arg(i);
        }
        let out = cc.output().expect("a C compiler (cc) is needed");
        assert!(
            out.status.success(),
            "{incs:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let out = Command::new(&exe).output().unwrap();
        let text = String::from_utf8(out.stdout).unwrap();
        let mut lines = text.lines();
        let ver = lines.next().unwrap().strip_prefix("version 3.").unwrap();
        let minor: u32 = ver.parse().unwrap();
        let table = python::offsets_for(PyVersion {
            major: 3,
            minor,
            micro: 0,
        })
        .unwrap();
        let probed: BTreeMap<&str, u64> = lines
            .map(|l| {
                let (k, v) = l.split_once(' ').unwrap();
                (k, v.parse().unwrap())
            })
            .collect();
        for name in all {
            let want = probed.get(name).copied().unwrap_or(ABSENT);
            assert_eq!(field(&table, name), want, "3.{minor} {name} ({incs:?})");
        }
    }
}
