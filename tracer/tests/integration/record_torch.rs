//! PyTorch's caching-allocator layer against a stub `libc10_cuda.so` (tests/fixtures/
//! stub_c10_cuda.cpp): a small caching allocator that calls the hidden, `.symtab`-only
//! `DeviceCachingAllocator::record_trace` under its real mangled name in each torch form, driven
//! by known-answer scenarios (tests/fixtures/torch_fixture.c, py_torch_fixture.py) whose figures
//! are worked out by hand in their headers. Privileged: needs root and eBPF.

use std::{path::PathBuf, process::Command};

use crate::common::{
    self, TestProcess, build_dir, fixture_source, fixture_variant, json_class_rows, json_sum,
    python, report_value,
};

const MIB: u64 = 1 << 20;

/// The stub built as `libc10_cuda.so` (the name alloctrace looks for) in the form of torch
/// `abi` (`TORCH_ABI`: 214, 211, 208, 206, 204, 203, 202, 201), once per test run.
fn stub_c10_cuda(abi: u32) -> PathBuf {
    stub_library("stub_c10_cuda.cpp", "libc10_cuda.so", "TORCH_ABI", abi)
}

/// The stub pinned host caching allocator (tests/fixtures/stub_torch_cuda.cpp) built as
/// `libtorch_cuda.so` in the form of torch `abi` (`PINNED_ABI`: 208 for 2.8–2.15, 207 for
/// 2.4–2.7), once per test run.
fn stub_torch_cuda(abi: u32) -> PathBuf {
    stub_library("stub_torch_cuda.cpp", "libtorch_cuda.so", "PINNED_ABI", abi)
}

/// The C++ stub `source` built as `library` with `-D{form}={abi}`, hidden visibility (its
/// functions only in `.symtab`, as PyTorch's), once per test run.
fn stub_library(source: &str, library: &str, form: &str, abi: u32) -> PathBuf {
    let dir = format!("stub-{}-{abi}", library.trim_end_matches(".so"));
    let lib = build_dir(&dir).join(library);
    static BUILT: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if !built.contains(&lib) {
        let args: Vec<std::ffi::OsString> = vec![
            "-x".into(),
            "c++".into(),
            "-shared".into(),
            "-fPIC".into(),
            "-fvisibility=hidden".into(),
            "-O1".into(),
            "-g".into(),
            "-fno-omit-frame-pointer".into(),
            format!("-D{form}={abi}").into(),
            fixture_source(source).into(),
            "-ldl".into(),
            "-lstdc++".into(),
        ];
        common::compile(&lib, &args);
        built.push(lib.clone());
    }
    lib
}

/// `pinned_fixture STUB SCENARIO LIBCUDA` in the attach protocol.
fn pinned_fixture(abi: u32, scenario: &str) -> TestProcess {
    let exe = fixture_variant("pinned_fixture", "", &["-ldl"]);
    let mut cmd = Command::new(exe);
    cmd.arg(stub_torch_cuda(abi))
        .arg(scenario)
        .arg(stub_libcuda());
    cmd.env("FIXTURE_PROTOCOL", "attach");
    TestProcess::spawn(&format!("pinned_fixture {scenario}"), cmd)
}

/// The repository's stub CUDA driver (tests/fixtures/stub_cuda.c) as `libcuda.so.1`.
fn stub_libcuda() -> PathBuf {
    let lib = build_dir("stub-torch-cuda").join("libcuda.so.1");
    static BUILT: std::sync::Once = std::sync::Once::new();
    BUILT.call_once(|| {
        let args: Vec<std::ffi::OsString> = vec![
            "-O1".into(),
            "-fno-omit-frame-pointer".into(),
            "-shared".into(),
            "-fPIC".into(),
            "-Wl,-soname,libcuda.so.1".into(),
            fixture_source("stub_cuda.c").into(),
            "-ldl".into(),
        ];
        common::compile(&lib, &args);
    });
    lib
}

/// Runs `target` (it prints "ready", waits for a line, loads its libraries, prints "loaded",
/// waits for a line, works, prints "done", waits for EOF) under `record -p`; the libraries are
/// loaded after attach and must be hooked within a second: the recorder's stderr lines starting
/// with `said` come first. Returns the JSON report and the recorder's stderr.
fn record(target: TestProcess, said: &[&str]) -> (serde_json::Value, String) {
    record_with(target, said, &[])
}

/// `record` with the recorder's options `args`.
fn record_with(
    mut target: TestProcess,
    said: &[&str],
    args: &[&str],
) -> (serde_json::Value, String) {
    target.expect_stdout("ready");
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("torch.trace");
    let mut recorder = common::start_recorder_args(target.pid(), &trace, args);
    target.send_line("load");
    target.expect_stdout("loaded");
    for prefix in said {
        recorder.expect_stderr_prefix(prefix);
    }
    target.send_line("go");
    target.expect_stdout("done");
    common::stop_recording(&mut recorder, &mut target);
    (report_value(&trace), recorder.stderr_text())
}

/// `torch_fixture STUB SCENARIO [LIBCUDA]` in the attach protocol.
fn torch_fixture(abi: u32, scenario: &str, libcuda: bool) -> TestProcess {
    let exe = fixture_variant("torch_fixture", "", &["-ldl"]);
    let mut cmd = Command::new(exe);
    cmd.arg(stub_c10_cuda(abi)).arg(scenario);
    if libcuda {
        cmd.arg(stub_libcuda());
    }
    cmd.env("FIXTURE_PROTOCOL", "attach");
    TestProcess::spawn(&format!("torch_fixture {scenario}"), cmd)
}

/// (live bytes, live blocks) of `class` in rows whose stack passes through `function`.
fn live(r: &serde_json::Value, class: &str, function: &str) -> (u64, u64) {
    let rows = json_class_rows(r, class, function);
    (json_sum(&rows, "live_bytes"), json_sum(&rows, "live_count"))
}

/// (live bytes, live blocks) of `class` in rows with the Python frame of `function` (Python
/// frames read "function (file:line)").
fn python_live(r: &serde_json::Value, class: &str, function: &str) -> (u64, u64) {
    let prefix = format!("{function} (");
    let rows: Vec<&serde_json::Value> = r["stacks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|row| row["class"] == class)
        .filter(|row| {
            let frames = row["frames"].as_array().unwrap();
            frames
                .iter()
                .any(|f| f.as_str().is_some_and(|f| f.starts_with(&prefix)))
        })
        .collect();
    (json_sum(&rows, "live_bytes"), json_sum(&rows, "live_count"))
}

/// The one allocator of the report.
fn allocator(r: &serde_json::Value) -> &serde_json::Value {
    let all = r["torch_allocator"]["allocators"].as_array().unwrap();
    assert_eq!(all.len(), 1, "{r:#}");
    &all[0]
}

fn figures(a: &serde_json::Value, fields: &[&str]) -> Vec<u64> {
    fields.iter().map(|f| a[*f].as_u64().unwrap()).collect()
}

/// The case: a request handler that keeps a 16 MiB tensor per request, served from
/// cached segments (no driver call), is found under its function; the segments' bytes are the
/// driver's `cuda` class once, split by the layer into `torch` and `torch-cached` (never added).
#[test]
fn a_per_request_leak_served_from_the_cache_is_found_under_its_function() {
    require_privileges!();
    let (r, _) = record(torch_fixture(211, "leak", true), &["hooked", "hooked"]);
    assert_eq!(live(&r, "torch", "handle_request"), (80 * MIB, 5), "{r:#}");
    assert_eq!(live(&r, "torch", "warm_cache"), (0, 0), "{r:#}");
    assert_eq!(live(&r, "torch-cached", "warm_cache").0, 48 * MIB, "{r:#}");
    assert_eq!(
        live(&r, "torch-cached", "handle_request").0,
        2 * MIB,
        "{r:#}"
    );
    let total = |class: &str| r["totals"][class]["live_bytes"].as_u64().unwrap();
    // The driver's truth: the nine segments' cuMemAlloc_v2, under the allocator's alloc_block.
    assert_eq!(total("cuda"), 130 * MIB, "{r:#}");
    assert_eq!(live(&r, "cuda", "alloc_block").0, 130 * MIB, "{r:#}");
    assert_eq!(
        total("torch") + total("torch-cached"),
        total("cuda"),
        "{r:#}"
    );
    let a = allocator(&r);
    assert_eq!(
        figures(
            a,
            &[
                "reserved",
                "allocated",
                "cached",
                "pending",
                "segments",
                "blocks"
            ]
        ),
        [130 * MIB, 80 * MIB, 50 * MIB, 0, 9, 5],
        "{a:#}"
    );
    assert_eq!(
        figures(a, &["holes", "hole_bytes", "largest_hole"]),
        [4, 50 * MIB, 16 * MIB],
        "{a:#}"
    );
    assert_eq!(a["fragmentation"], 0.68, "{a:#}");
    // GPU memory as NVML would see it is the driver's: the view adds nothing to it.
    assert!(r["torch_allocator"]["ooms"].as_array().unwrap().is_empty());
}

/// `--no-torch-allocator`: the driver layer alone, as before the allocator layer.
#[test]
fn the_allocator_layer_can_be_turned_off() {
    require_privileges!();
    let (r, stderr) = record_with(
        torch_fixture(211, "leak", true),
        &["hooked"],
        &["--no-torch-allocator"],
    );
    assert!(!stderr.contains("PyTorch caching allocator"), "{stderr}");
    assert_eq!(r["totals"]["cuda"]["live_bytes"], 130 * MIB, "{r:#}");
    assert_eq!(r["totals"]["torch"]["allocated_count"], 0, "{r:#}");
    assert!(
        r["torch_allocator"]["allocators"]
            .as_array()
            .unwrap()
            .is_empty()
    );
}

/// The "OOM with memory free" case: the failed request, the free device bytes the allocator
/// saw and the fragmentation at that moment, worked out by hand (torch_fixture.c, `oom`); the
/// 2.8–2.10 form of `record_trace`.
#[test]
fn an_oom_is_recorded_with_the_fragmentation_before_it() {
    require_privileges!();
    let (r, _) = record(torch_fixture(208, "oom", false), &["hooked"]);
    let ooms = r["torch_allocator"]["ooms"].as_array().unwrap();
    assert_eq!(ooms.len(), 1, "{r:#}");
    let o = &ooms[0];
    assert_eq!(
        figures(o, &["requested", "device_free", "reserved", "allocated"]),
        [20 * MIB, 14 * MIB, 52_428_800, 33_555_456],
        "{o:#}"
    );
    assert_eq!(
        figures(o, &["holes", "hole_bytes", "largest_hole"]),
        [2, 18_873_344, 16_777_216],
        "{o:#}"
    );
    assert_eq!(o["fragmentation"], 0.111, "{o:#}");
    let frames: Vec<&str> = o["frames"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap())
        .collect();
    assert!(frames.contains(&"oom_request"), "{frames:?}");
    assert_eq!(live(&r, "torch", "fragment_small"), (1024, 1), "{r:#}");
    assert_eq!(live(&r, "torch", "fragment_large"), (32 * MIB, 2), "{r:#}");
}

/// A CUDA graph's private pool (2.8+ forms pass the pool): counted apart, its blocks never
/// mixed with the default pools' (torch_fixture.c, `graph_pool_kept`, `graph_pool`).
#[test]
fn a_cuda_graph_private_pool_is_counted_apart() {
    require_privileges!();
    let (r, _) = record(torch_fixture(211, "graph_pool_kept", false), &["hooked"]);
    let a = allocator(&r);
    assert_eq!(
        figures(
            a,
            &[
                "reserved",
                "allocated",
                "private_pools",
                "private_reserved",
                "private_allocated"
            ]
        ),
        [42 * MIB, 13 * MIB, 1, 20 * MIB, 12 * MIB],
        "{a:#}"
    );
    assert_eq!(live(&r, "torch", "capture_graph"), (12 * MIB, 3), "{r:#}");
    // Released, its segment is freed: the default pools remain.
    let (r, _) = record(torch_fixture(208, "graph_pool", false), &["hooked"]);
    let a = allocator(&r);
    assert_eq!(
        figures(
            a,
            &["reserved", "allocated", "private_pools", "private_reserved"]
        ),
        [22 * MIB, MIB, 0, 0],
        "{a:#}"
    );
    // Before 2.8 the pool is not passed: the same memory, no pool told apart.
    let (r, _) = record(torch_fixture(204, "graph_pool_kept", false), &["hooked"]);
    let a = allocator(&r);
    assert_eq!(
        figures(a, &["reserved", "allocated", "private_pools"]),
        [42 * MIB, 13 * MIB, 0],
        "{a:#}"
    );
}

/// Blocks freed while another stream still uses them are pending: in neither view.
#[test]
fn blocks_freed_while_another_stream_uses_them_are_pending() {
    require_privileges!();
    let (r, _) = record(torch_fixture(211, "streams", false), &["hooked"]);
    let a = allocator(&r);
    assert_eq!(
        figures(a, &["reserved", "allocated", "pending", "cached", "blocks"]),
        [2 * MIB, 0, 8192, 2 * MIB - 8192, 2],
        "{a:#}"
    );
    assert_eq!(r["totals"]["torch"]["live_bytes"], 0, "{r:#}");
    assert_eq!(
        r["totals"]["torch-cached"]["live_bytes"],
        2 * MIB - 8192,
        "{r:#}"
    );
}

/// Expandable segments (ranges mapped into one segment, the 2.4–2.7 form): the same leak, the
/// mapped ranges one span.
#[test]
fn expandable_segments_are_followed_range_by_range() {
    require_privileges!();
    let (r, _) = record(torch_fixture(204, "expandable", false), &["hooked"]);
    assert_eq!(live(&r, "torch", "handle_request"), (80 * MIB, 5), "{r:#}");
    let a = allocator(&r);
    assert_eq!(
        figures(
            a,
            &["reserved", "allocated", "cached", "holes", "largest_hole"]
        ),
        [130 * MIB, 80 * MIB, 50 * MIB, 2, 48 * MIB],
        "{a:#}"
    );
}

/// The 2.2 and 2.3 forms (int64 addresses; an int, then a signed char device); churn leaves
/// nothing live, and `empty_cache` (release) gives every segment back.
#[test]
fn the_torch_2_2_and_2_3_forms_are_hooked_and_churn_and_release_leave_nothing() {
    require_privileges!();
    for abi in [202, 203] {
        let (r, _) = record(torch_fixture(abi, "churn", false), &["hooked"]);
        let a = allocator(&r);
        assert_eq!(
            figures(a, &["reserved", "allocated", "cached"]),
            [2 * MIB, 0, 2 * MIB]
        );
        let rows = json_class_rows(&r, "torch", "churn_tensors");
        assert_eq!(
            (
                json_sum(&rows, "allocated_count"),
                json_sum(&rows, "live_count")
            ),
            (1000, 0),
            "{abi}: {r:#}"
        );
    }
    let (r, _) = record(torch_fixture(211, "release", false), &["hooked"]);
    let a = allocator(&r);
    assert_eq!(
        figures(a, &["reserved", "allocated", "segments"]),
        [0, 0, 0]
    );
    assert_eq!(r["totals"]["torch-cached"]["live_bytes"], 0, "{r:#}");
}

/// A torch whose allocator has none of the known forms (2.1: no device argument, history-only
/// calls): one line says so, and the rest is recorded.
#[test]
fn an_unknown_torch_version_is_said_in_one_line() {
    require_privileges!();
    let (r, stderr) = record(
        torch_fixture(201, "churn", false),
        &["torch allocator layer: not available"],
    );
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("torch allocator layer: not available"))
        .collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(lines[0].contains("(no known hook symbols in "), "{stderr}");
    assert!(
        r["torch_allocator"]["allocators"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    assert_eq!(r["complete"], true);
}

/// Tensors allocated from Python are charged to the Python function that allocated them.
#[test]
fn tensors_allocated_from_python_are_charged_to_the_python_function() {
    require_privileges!();
    let mut cmd = Command::new(python());
    cmd.arg(fixture_source("py_torch_fixture.py"))
        .arg(stub_c10_cuda(211));
    let mut target = TestProcess::spawn("python3 py_torch_fixture.py", cmd);
    target.expect_stdout("ready");
    let mut s = common::Session::attach_and_run(target, "py_torch", &[]);
    s.end(libc::SIGINT);
    let r = report_value(&s.trace);
    assert_eq!(
        python_live(&r, "torch", "handle_request"),
        (48 * MIB, 3),
        "{r:#}"
    );
    assert_eq!(
        python_live(&r, "torch-cached", "warm_cache").0,
        16 * MIB,
        "{r:#}"
    );
    let a = allocator(&r);
    assert_eq!(
        figures(
            a,
            &["reserved", "allocated", "cached", "holes", "largest_hole"]
        ),
        [66 * MIB, 48 * MIB, 18 * MIB, 2, 16 * MIB],
        "{a:#}"
    );
}

/// A Python server launched through a wrapper that execs the interpreter (a shell script, `env`,
/// pyenv's shim): the exec and the interpreter's own code arrive in one batch of events, and
/// its frames must still be read from the new image on.
#[test]
fn python_launched_through_an_exec_keeps_its_python_frames() {
    // Alone: beside other recorders, this one could fall behind by more than the margin below.
    require_privileges!(alone);
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("exec.trace");
    let script = format!(
        "exec {} {} {}",
        python(),
        fixture_source("py_torch_fixture.py").display(),
        stub_c10_cuda(211).display()
    );
    let mut cmd = common::alloctrace_cmd(&["record", "-o"]);
    cmd.arg(&trace).args(["--", "sh", "-c", &script]);
    let mut recorder = TestProcess::spawn("record -- sh -c exec python3", cmd);
    recorder.expect_stdout("ready");
    recorder.expect_stderr_prefix("Python frames: CPython");
    recorder.expect_stderr_prefix("hooked");
    recorder.send_line("go");
    recorder.expect_stdout("done");
    // Python frames are named from the process's code objects when the events are applied; a
    // debug build reading the unwind tables of the modules the interpreter just loaded can be a
    // second behind, and the code objects go with the process.
    std::thread::sleep(std::time::Duration::from_millis(1500));
    recorder.close_stdin();
    recorder.wait_success();
    let r = report_value(&trace);
    assert_eq!(
        python_live(&r, "torch", "handle_request"),
        (48 * MIB, 3),
        "{r:#}"
    );
}

/// The newest form (torch 2.14–2.15: `record_trace` also takes a compile context): the same
/// per-request leak, the same figures.
#[test]
fn the_torch_2_14_form_is_hooked() {
    require_privileges!();
    let (r, _) = record(torch_fixture(214, "leak", true), &["hooked", "hooked"]);
    assert_eq!(live(&r, "torch", "handle_request"), (80 * MIB, 5), "{r:#}");
    let a = allocator(&r);
    assert_eq!(
        figures(a, &["reserved", "allocated", "cached", "segments"]),
        [130 * MIB, 80 * MIB, 50 * MIB, 9],
        "{a:#}"
    );
}

/// The cudaMallocAsync backend records no trace: each tensor is the driver allocation made
/// inside `mallocAsync`, charged in the `torch` view to the function that asked for it; the
/// driver layer counts the same bytes once, as device memory.
#[test]
fn the_cuda_malloc_async_backend_is_followed_tensor_by_tensor() {
    require_privileges!();
    let (r, _) = record(
        torch_fixture(211, "async_leak", true),
        &["hooked", "hooked"],
    );
    assert_eq!(live(&r, "torch", "handle_request"), (80 * MIB, 5), "{r:#}");
    assert_eq!(live(&r, "torch", "warm_async_cache"), (0, 0), "{r:#}");
    let rows = json_class_rows(&r, "torch", "handle_request");
    assert_eq!(json_sum(&rows, "allocated_count"), 10, "{r:#}");
    assert_eq!(r["totals"]["torch-cached"]["live_bytes"], 0, "{r:#}");
    let device: u64 = ["cuda", "cuda-pool"]
        .iter()
        .filter_map(|c| r["totals"][*c]["live_bytes"].as_u64())
        .sum();
    assert_eq!(device, 80 * MIB, "{r:#}");
    let a = allocator(&r);
    assert_eq!(a["async_backend"], true, "{a:#}");
    assert_eq!(
        figures(a, &["allocated", "blocks", "reserved", "segments", "holes"]),
        [80 * MIB, 5, 0, 0, 0],
        "{a:#}"
    );
    // torch 2.2's mallocAsync (int device), with churn: nothing live.
    let (r, stderr) = record(
        torch_fixture(202, "async_churn", true),
        &["hooked", "hooked"],
    );
    assert!(!stderr.contains("not available"), "{stderr}");
    let rows = json_class_rows(&r, "torch", "churn_tensors");
    assert_eq!(
        (
            json_sum(&rows, "allocated_count"),
            json_sum(&rows, "live_count")
        ),
        (1000, 0),
        "{r:#}"
    );
}

/// vLLM's sleep mode: the memory behind PyTorch's segments is unmapped and released at the
/// driver while PyTorch keeps its blocks. Named sleeping, not a leak; woken, it is memory again.
#[test]
fn memory_put_to_sleep_under_the_allocator_is_named_sleeping() {
    require_privileges!();
    let (r, _) = record(torch_fixture(211, "sleep", true), &["hooked", "hooked"]);
    assert_eq!(live(&r, "torch", "load_weights"), (40 * MIB, 1), "{r:#}");
    assert_eq!(
        live(&r, "torch", "allocate_kv_cache"),
        (20 * MIB, 1),
        "{r:#}"
    );
    assert_eq!(r["totals"]["cuda-vmm"]["live_bytes"], 0, "{r:#}");
    let a = allocator(&r);
    assert_eq!(
        figures(a, &["sleeping", "allocated", "reserved"]),
        [60 * MIB, 60 * MIB, 60 * MIB],
        "{a:#}"
    );
    let (r, _) = record(
        torch_fixture(211, "sleep_wake", true),
        &["hooked", "hooked"],
    );
    assert_eq!(r["totals"]["cuda-vmm"]["live_bytes"], 60 * MIB, "{r:#}");
    assert_eq!(allocator(&r)["sleeping"], 0, "{r:#}");
}

/// PyTorch's pinned host caching allocator: blocks a tensor holds (`torch-pinned`, at the
/// tensor's stack) and blocks it caches (`torch-pinned-cached`, at the stack that made them),
/// a view inside the driver's `cuda-pinned`; a per-request staging buffer kept is found under
/// its function although it was served from the cache.
#[test]
fn pinned_host_blocks_are_split_into_held_and_cached() {
    require_privileges!();
    let (r, _) = record(pinned_fixture(208, "pinned_leak"), &["hooked", "hooked"]);
    assert_eq!(
        live(&r, "torch-pinned", "stage_request"),
        (3 * MIB, 3),
        "{r:#}"
    );
    assert_eq!(live(&r, "torch-pinned", "warm_pinned"), (0, 0), "{r:#}");
    assert_eq!(
        live(&r, "torch-pinned-cached", "warm_pinned").0,
        MIB,
        "{r:#}"
    );
    assert_eq!(
        live(&r, "torch-pinned-cached", "stage_request").0,
        131072,
        "{r:#}"
    );
    let total = |class: &str| r["totals"][class]["live_bytes"].as_u64().unwrap();
    assert_eq!(total("cuda-pinned"), 4 * MIB + 131072, "{r:#}");
    assert_eq!(
        total("torch-pinned") + total("torch-pinned-cached"),
        total("cuda-pinned"),
        "{r:#}"
    );
    // The 2.4–2.7 form; the cache emptied gives every block back.
    let (r, _) = record(pinned_fixture(207, "pinned_release"), &["hooked", "hooked"]);
    for class in ["torch-pinned", "torch-pinned-cached", "cuda-pinned"] {
        assert_eq!(r["totals"][class]["live_bytes"], 0, "{class}: {r:#}");
    }
    let rows = json_class_rows(&r, "torch-pinned", "stage_request");
    assert_eq!(json_sum(&rows, "allocated_count"), 6, "{r:#}");
}
