//! CUDA driver hooks against a stub `libcuda.so.1` with the real exported names and ABI
//! (tests/fixtures/stub_cuda.c), loaded with dlopen after attach as real CUDA libraries are:
//! exact bytes and counts per class and function, and the out-of-memory failure with its
//! CUresult name. Privileged: needs root and eBPF.

mod common;

use std::{path::PathBuf, process::Command};

use common::{TestProcess, fixture_variant, json_class_rows, privileged, report_value};

const MIB: u64 = 1 << 20;

/// Builds the stub driver as `libcuda.so.1` (its soname and file name, like the real one), once
/// per test binary (the tests run in parallel threads).
fn stub_libcuda() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT.get_or_init(build_stub_libcuda).clone()
}

fn build_stub_libcuda() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("stub-cuda");
    std::fs::create_dir_all(&dir).unwrap();
    let lib = dir.join("libcuda.so.1");
    let tmp = dir.join(format!("libcuda.so.1.{}.tmp", std::process::id()));
    let src = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/stub_cuda.c");
    let out = Command::new("cc")
        .args([
            "-O1",
            "-fno-omit-frame-pointer",
            "-shared",
            "-fPIC",
            "-Wl,-soname,libcuda.so.1",
            "-o",
        ])
        .arg(&tmp)
        .arg(src)
        .output()
        .expect("cc");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::rename(&tmp, &lib).unwrap();
    lib
}

fn rows_at(r: &serde_json::Value, class: &str, function: &str) -> (u64, u64) {
    r["stacks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["class"] == class && s["frames"][0] == function)
        .fold((0, 0), |(b, c), s| {
            (
                b + s["live_bytes"].as_u64().unwrap(),
                c + s["live_count"].as_u64().unwrap(),
            )
        })
}

/// Runs `cuda_fixture LIB ARGS...` under `record -p`: the driver is dlopen'ed after attach and
/// must be hooked within a second; returns the JSON report and the fixture's stdout.
fn trace_cuda_fixture(lib: &std::path::Path, args: &[&str]) -> (serde_json::Value, String) {
    trace_cuda_fixture_with(lib, args, None, None)
}

/// Like `trace_cuda_fixture`, with GPU memory samples replayed from `gpu_samples` (the NVML
/// stand-in), and a second-and-more after "done" so that a sample sees the end state.
fn trace_cuda_fixture_with(
    lib: &std::path::Path,
    args: &[&str],
    gpu_samples: Option<&std::path::Path>,
    library_path: Option<&std::path::Path>,
) -> (serde_json::Value, String) {
    let exe = fixture_variant("cuda_fixture", "", &["-ldl"]);
    let mut cmd = Command::new(&exe);
    cmd.arg(lib).args(args);
    if let Some(dir) = library_path {
        cmd.env("LD_LIBRARY_PATH", dir);
    }
    let mut target = TestProcess::spawn("cuda_fixture", cmd);
    target.expect_stdout("ready");
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("cuda.trace");
    let mut rec_cmd = Command::new(common::alloctrace());
    rec_cmd
        .args(["record", "-p", &target.pid().to_string(), "-o"])
        .arg(&trace);
    if let Some(samples) = gpu_samples {
        rec_cmd.env("ALLOCTRACE_GPU_SAMPLES", samples);
    }
    let mut recorder = TestProcess::spawn("alloctrace record", rec_cmd);
    recorder.expect_stderr_prefix("attached");
    target.send_line("load");
    target.expect_stdout("loaded");
    // The driver is hooked within a second of being mapped.
    recorder.expect_stderr_prefix("hooked");
    target.send_line("go");
    target.expect_stdout("done");
    if gpu_samples.is_some() {
        std::thread::sleep(std::time::Duration::from_millis(1500));
    }
    recorder.signal(libc::SIGINT);
    recorder.wait_success();
    target.close_stdin();
    target.wait_success();
    let stdout = target.stdout_text();
    let r = report_value(&trace);
    (r, stdout)
}

#[test]
fn driver_allocations_loaded_after_attach_are_exact_per_class() {
    if !privileged() {
        return;
    }
    let (r, _) = trace_cuda_fixture(&stub_libcuda(), &[]);
    assert_eq!(
        rows_at(&r, "cuda", "load_weights"),
        (1024 * MIB, 4),
        "{r:#}"
    );
    assert_eq!(
        rows_at(&r, "cuda", "per_request_leak"),
        (5 * MIB, 5),
        "{r:#}"
    );
    assert_eq!(
        rows_at(&r, "cuda-pool", "kv_blocks"),
        (128 * MIB, 2),
        "{r:#}"
    );
    assert_eq!(
        rows_at(&r, "cuda-pinned", "pinned_staging"),
        (3 * MIB, 2),
        "{r:#}"
    );
    assert_eq!(
        rows_at(&r, "cuda-managed", "managed_table"),
        (8 * MIB, 1),
        "{r:#}"
    );
    assert_eq!(r["totals"]["cuda"]["live_bytes"], 1029 * MIB, "{r:#}");
    let failures = r["failures"].as_array().unwrap();
    assert_eq!(failures.len(), 1, "{r:#}");
    let f = &failures[0];
    assert_eq!(
        (
            &f["class"],
            &f["function"],
            &f["size"],
            &f["count"],
            &f["error"],
            &f["frames"][0]
        ),
        (
            &serde_json::json!("cuda"),
            &serde_json::json!("cuMemAlloc_v2"),
            &serde_json::json!(1u64 << 50),
            &serde_json::json!(1),
            &serde_json::json!("CUDA_ERROR_OUT_OF_MEMORY"),
            &serde_json::json!("oom")
        ),
        "{f:#}"
    );
    assert_eq!(r["unmatched_frees"], 0, "{r:#}");
    // The driver's own mappings for pinned memory are not counted again as mappings.
    let double = json_class_rows(&r, "mmap", "pinned_staging");
    assert!(double.is_empty(), "counted twice: {double:#?}");
}

/// Debian's non-free libcuda1, extracted by scripts/setup (never installed).
fn real_libcuda() -> PathBuf {
    let lib = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../target/real-cuda/libcuda.so.1"
    ));
    assert!(
        lib.exists(),
        "{} is missing: run ./scripts/setup (it extracts Debian's libcuda1 there)",
        lib.display()
    );
    lib
}

#[test]
fn the_real_driver_without_a_gpu_reports_failures_with_their_names() {
    if !privileged() {
        return;
    }
    let (r, stdout) = trace_cuda_fixture(&real_libcuda(), &["real"]);
    // The fixture prints the CUresults it got: "rc ALLOC PINNED".
    let rc: Vec<i32> = stdout
        .lines()
        .find_map(|l| l.strip_prefix("rc "))
        .expect("an rc line")
        .split(' ')
        .map(|v| v.parse().unwrap())
        .collect();
    assert!(
        rc[0] != 0 && rc[1] != 0,
        "no GPU here: both calls fail ({rc:?})"
    );
    let failure = |function: &str| {
        r["failures"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["function"] == function)
            .unwrap_or_else(|| panic!("no failure of {function}: {r:#}"))
            .clone()
    };
    let alloc = failure("cuMemAlloc_v2");
    assert_eq!(
        (&alloc["class"], &alloc["size"], &alloc["count"]),
        (
            &serde_json::json!("cuda"),
            &serde_json::json!(MIB),
            &serde_json::json!(1)
        )
    );
    assert_eq!(
        alloc["error"],
        alloctrace::hooks::cuda_error_name(rc[0]),
        "{alloc:#}"
    );
    assert_eq!(alloc["frames"][0], "real_alloc", "{alloc:#}");
    let pinned = failure("cuMemAllocHost_v2");
    assert_eq!(
        (&pinned["class"], &pinned["size"]),
        (
            &serde_json::json!("cuda-pinned"),
            &serde_json::json!(2 * MIB)
        )
    );
    assert_eq!(
        pinned["error"],
        alloctrace::hooks::cuda_error_name(rc[1]),
        "{pinned:#}"
    );
    assert_eq!(pinned["frames"][0], "real_pinned", "{pinned:#}");
    assert_eq!(r["totals"]["cuda"]["live_bytes"], 0, "{r:#}");
}

#[test]
fn vmm_handles_count_while_referenced_or_mapped() {
    if !privileged() {
        return;
    }
    let (r, _) = trace_cuda_fixture(&stub_libcuda(), &["vmm"]);
    let cell = |function: &str| -> (u64, u64, u64) {
        r["stacks"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["class"] == "cuda-vmm" && s["frames"][0] == function)
            .fold((0, 0, 0), |(b, c, a), s| {
                (
                    b + s["live_bytes"].as_u64().unwrap(),
                    c + s["live_count"].as_u64().unwrap(),
                    a + s["allocated_count"].as_u64().unwrap(),
                )
            })
    };
    // (live bytes, live count, allocated count)
    assert_eq!(
        cell("llama_pool_fill"),
        (0, 0, 4),
        "one unmap frees the whole pool: {r:#}"
    );
    assert_eq!(
        cell("llama_pool_grow"),
        (6 * MIB, 3, 3),
        "released but mapped: {r:#}"
    );
    assert_eq!(cell("vllm_weights"), (0, 0, 1), "slept: {r:#}");
    assert_eq!(
        cell("vllm_wake"),
        (16 * MIB, 1, 1),
        "woken at the same address: {r:#}"
    );
    assert_eq!(
        cell("retained_scratch"),
        (0, 0, 1),
        "retain then two releases: {r:#}"
    );
    // Reservations (32 GiB and more) are address space, not memory.
    assert_eq!(r["totals"]["cuda-vmm"]["live_bytes"], 22 * MIB, "{r:#}");
    // The peak: pool grown (6) + woken weights (16) + the retained scratch (4) before its
    // last release.
    assert_eq!(r["totals"]["cuda-vmm"]["peak_bytes"], 26 * MIB, "{r:#}");
}

#[test]
fn allocations_during_graph_capture_are_cuda_graph_in_phase_graph_capture() {
    if !privileged() {
        return;
    }
    let (r, _) = trace_cuda_fixture(&stub_libcuda(), &["graph"]);
    let row = |function: &str| -> (String, String, u64, u64) {
        let s = r["stacks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["frames"][0] == function)
            .unwrap_or_else(|| panic!("no row at {function}: {r:#}"));
        (
            s["class"].as_str().unwrap().to_string(),
            s["phase"].as_str().unwrap().to_string(),
            s["live_bytes"].as_u64().unwrap(),
            s["live_count"].as_u64().unwrap(),
        )
    };
    assert_eq!(
        row("capture_graph"),
        ("cuda-graph".into(), "graph-capture".into(), 64 * MIB, 2),
        "{r:#}"
    );
    assert_eq!(
        row("after_capture"),
        ("cuda".into(), "none".into(), MIB, 1),
        "{r:#}"
    );
}

#[test]
fn gpu_memory_nobody_traced_is_the_driver_figure_minus_the_device_classes() {
    if !privileged() {
        return;
    }
    // The NVML stand-in: the driver says 2 GiB for the process from the start.
    let dir = tempfile::tempdir().unwrap();
    let samples = dir.path().join("gpu.samples");
    std::fs::write(
        &samples,
        "# second pid bytes (pid 0: every traced process)\n0 0 2147483648\n",
    )
    .unwrap();
    let (r, _) = trace_cuda_fixture_with(&stub_libcuda(), &[], Some(&samples), None);
    let p = &r["gpu"]["processes"][0];
    // Device classes: cuda 1029 MiB + cuda-pool 128 MiB + cuda-managed 8 MiB; pinned memory is
    // host memory.
    let traced = (1029 + 128 + 8) * MIB;
    assert_eq!(p["used"], 2048 * MIB, "{:#}", r["gpu"]);
    assert_eq!(p["traced"], traced, "{:#}", r["gpu"]);
    assert_eq!(
        p["untraced"],
        (2048 * MIB - traced) as i64,
        "{:#}",
        r["gpu"]
    );
    assert!(
        r["gpu"]["source"]
            .as_str()
            .unwrap()
            .starts_with("recorded samples"),
        "{:#}",
        r["gpu"]
    );
}

#[test]
fn the_real_runtime_without_a_gpu_reports_its_failure_by_name() {
    if !privileged() {
        return;
    }
    let cudart = real_libcuda().with_file_name("libcudart.so.12");
    assert!(
        cudart.exists(),
        "{} is missing: run ./scripts/setup",
        cudart.display()
    );
    // The runtime loads the driver by name: the extracted one.
    let driver_dir = real_libcuda().parent().unwrap().to_path_buf();
    let (r, stdout) = trace_cuda_fixture_with(&cudart, &["runtime"], None, Some(&driver_dir));
    let rc: i32 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("rc "))
        .expect("an rc line")
        .parse()
        .unwrap();
    assert_ne!(rc, 0, "no GPU here: cudaMalloc fails");
    let f = r["failures"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["function"].as_str().unwrap().starts_with("cudaMalloc"))
        .unwrap_or_else(|| panic!("no cudaMalloc failure: {r:#}"))
        .clone();
    assert_eq!(
        (&f["class"], &f["size"], &f["count"]),
        (
            &serde_json::json!("cuda"),
            &serde_json::json!(MIB),
            &serde_json::json!(1)
        ),
        "{f:#}"
    );
    assert_eq!(
        f["error"],
        alloctrace::hooks::runtime_error_name(rc),
        "{f:#}"
    );
    assert_eq!(f["frames"][0], "rt_alloc", "{f:#}");
    assert_eq!(r["totals"]["cuda"]["live_bytes"], 0, "{r:#}");
}
