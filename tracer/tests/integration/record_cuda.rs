//! CUDA driver hooks against a stub `libcuda.so.1` with the real exported names and ABI
//! (tests/fixtures/stub_cuda.c), loaded with dlopen after attach as real CUDA libraries are:
//! exact bytes and counts per class and function, and the out-of-memory failure with its
//! CUresult name. Privileged: needs root and eBPF.

use std::{path::PathBuf, process::Command};

use crate::common::{
    self, TestProcess, build_dir, fixture_source, fixture_variant, json_class_rows, report_value,
};

const MIB: u64 = 1 << 20;

/// Builds the stub driver as `libcuda.so.1` (its soname and file name, like the real one), once
/// per test binary (the tests run in parallel threads), with the stub NVML and runtimes beside it.
fn stub_libcuda() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            build_stub("libnvidia-ml.so.1", &["stub_nvml.c"], &[]);
            build_stub("libcudart.so.12", &["stub_cudart.c"], &[]);
            // The runtime linked into another library, hidden (only in .symtab).
            build_stub(
                "libmodel.so",
                &["model_lib.c", "stub_cudart.c"],
                &["-fvisibility=hidden", "-fno-inline"],
            );
            build_stub("libcuda.so.1", &["stub_cuda.c"], &[])
        })
        .clone()
}

/// The directory of the stub libraries (an LD_LIBRARY_PATH for the fixtures and the recorder).
fn stub_dir() -> PathBuf {
    stub_libcuda().parent().unwrap().to_path_buf()
}

fn build_stub(name: &str, sources: &[&str], extra: &[&str]) -> PathBuf {
    let lib = build_dir("stub-cuda").join(name);
    let mut args: Vec<std::ffi::OsString> = ["-O1", "-fno-omit-frame-pointer", "-shared", "-fPIC"]
        .iter()
        .map(Into::into)
        .collect();
    args.push(format!("-Wl,-soname,{name}").into());
    args.extend(extra.iter().map(Into::into));
    args.extend(sources.iter().map(|s| fixture_source(s).into()));
    args.push("-ldl".into());
    common::compile(&lib, &args);
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
    Run::default().trace("cuda_fixture", &[], lib.as_os_str(), args)
}

/// How a CUDA fixture runs under the recorder.
#[derive(Default)]
struct Run<'a> {
    /// GPU memory samples replayed by the recorder (ALLOCTRACE_GPU_SAMPLES).
    gpu_samples: Option<&'a std::path::Path>,
    /// LD_LIBRARY_PATH of the fixture.
    library_path: Option<&'a std::path::Path>,
    /// The stub NVML's directory: the stub driver writes the process's GPU memory there and the
    /// recorder loads the stub NVML (stub_nvml.c) that reads it.
    nvml_dir: Option<&'a std::path::Path>,
    /// The fixture forks a child that says "forked" and waits for a line: sent once the
    /// recorder has hooked the child.
    child: bool,
    /// Where to keep the recording (it is removed otherwise).
    keep_trace: Option<&'a std::path::Path>,
}

impl Run<'_> {
    /// Runs fixture `name` (built with `cflags`) with `first` and `args`; the fixture prints
    /// "ready", waits for a line, loads its CUDA libraries, prints "loaded", waits for a line,
    /// works, prints "done" and waits for stdin EOF.
    fn trace(
        &self,
        name: &str,
        cflags: &[&str],
        first: &std::ffi::OsStr,
        args: &[&str],
    ) -> (serde_json::Value, String) {
        let mut flags = vec!["-ldl"];
        flags.extend(cflags);
        let variant = if cflags.is_empty() { "" } else { "static" };
        let exe = fixture_variant(name, variant, &flags);
        let mut cmd = Command::new(&exe);
        cmd.arg(first).args(args);
        if let Some(dir) = self.library_path {
            cmd.env("LD_LIBRARY_PATH", dir);
        }
        if let Some(dir) = self.nvml_dir {
            cmd.env("STUB_NVML_DIR", dir);
        }
        let mut target = TestProcess::spawn(name, cmd);
        target.expect_stdout("ready");
        let dir = tempfile::tempdir().unwrap();
        let trace = dir.path().join("cuda.trace");
        let mut rec_cmd = Command::new(common::alloctrace());
        rec_cmd
            .args(["record", "-p", &target.pid().to_string(), "-o"])
            .arg(&trace);
        if let Some(samples) = self.gpu_samples {
            rec_cmd.env("ALLOCTRACE_GPU_SAMPLES", samples);
        }
        if let Some(nvml) = self.nvml_dir {
            rec_cmd
                .env("STUB_NVML_DIR", nvml)
                .env("LD_LIBRARY_PATH", stub_dir());
        }
        let mut recorder = TestProcess::spawn("alloctrace record", rec_cmd);
        recorder.expect_stderr_prefix("attached");
        target.send_line("load");
        target.expect_stdout("loaded");
        // The driver is hooked within a second of being mapped; so is the runtime (shared or
        // static) of the runtime fixture.
        // (A runtime linked into the executable is hooked at attach.)
        let objects = if name == "cudart_fixture" && first != "static" {
            2
        } else {
            1
        };
        for _ in 0..objects {
            recorder.expect_stderr_prefix("hooked");
        }
        target.send_line("go");
        if self.child {
            target.expect_stdout("forked");
            recorder.expect_stderr_prefix("hooked");
            target.send_line("import");
        }
        target.expect_stdout("done");
        if self.gpu_samples.is_some() || self.nvml_dir.is_some() {
            std::thread::sleep(std::time::Duration::from_millis(1500));
        }
        common::stop_recording(&mut recorder, &mut target);
        let stdout = target.stdout_text();
        let r = report_value(&trace);
        if let Some(keep) = self.keep_trace {
            std::fs::copy(&trace, keep).unwrap();
        }
        (r, stdout)
    }
}

#[test]
fn driver_allocations_loaded_after_attach_are_exact_per_class() {
    require_privileges!();
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
    require_privileges!();
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
    require_privileges!();
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
    // Reservations are address space: counted calls, no bytes (32 GiB, 16 MiB and 4 MiB here).
    assert_eq!(calls_of(&r, "cuMemAddressReserve"), (3, 0), "{r:#}");
}

#[test]
fn allocations_during_graph_capture_are_cuda_graph_in_phase_graph_capture() {
    require_privileges!();
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
    require_privileges!();
    // The NVML stand-in: the driver says 2 GiB for the process from the start.
    let dir = tempfile::tempdir().unwrap();
    let samples = dir.path().join("gpu.samples");
    std::fs::write(
        &samples,
        "# second pid bytes (pid 0: every traced process)\n0 0 2147483648\n",
    )
    .unwrap();
    let run = Run {
        gpu_samples: Some(&samples),
        ..Run::default()
    };
    let (r, _) = run.trace("cuda_fixture", &[], stub_libcuda().as_os_str(), &[]);
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
    require_privileges!();
    let cudart = real_libcuda().with_file_name("libcudart.so.12");
    assert!(
        cudart.exists(),
        "{} is missing: run ./scripts/setup",
        cudart.display()
    );
    // The runtime loads the driver by name: the extracted one.
    let driver_dir = real_libcuda().parent().unwrap().to_path_buf();
    let run = Run {
        library_path: Some(&driver_dir),
        ..Run::default()
    };
    let (r, stdout) = run.trace("cuda_fixture", &[], cudart.as_os_str(), &["runtime"]);
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

/// Calls of `function` in the report's `cuda_calls`: (calls, failed), all stacks.
fn calls_of(r: &serde_json::Value, function: &str) -> (u64, u64) {
    r["cuda_calls"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["function"] == function)
        .fold((0, 0), |(n, f), c| {
            (
                n + c["calls"].as_u64().unwrap(),
                f + c["failed"].as_u64().unwrap(),
            )
        })
}

#[test]
fn pitch_pools_registration_graph_nodes_and_executables_are_exact() {
    require_privileges!();
    let (r, _) = trace_cuda_fixture(&stub_libcuda(), &["more"]);
    assert_eq!(rows_at(&r, "cuda", "pitched_rows"), (102400, 1), "{r:#}");
    assert_eq!(
        rows_at(&r, "cuda-pool", "pool_allocs"),
        (8 * MIB, 2),
        "{r:#}"
    );
    // Registration marks host memory the mmap class already counts: both show, nothing added.
    assert_eq!(
        rows_at(&r, "cuda-registered", "register_staging"),
        (2 * MIB, 1),
        "{r:#}"
    );
    let mmaps = common::json_class_rows(&r, "mmap", "register_staging");
    assert_eq!(
        (
            common::json_sum(&mmaps, "live_bytes"),
            common::json_sum(&mmaps, "live_count")
        ),
        (3 * MIB, 2),
        "{r:#}"
    );
    assert_eq!(
        rows_at(&r, "cuda-graph", "graph_nodes"),
        (6 * MIB, 1),
        "{r:#}"
    );
    for (function, calls, failed) in [
        ("cuMemPoolCreate", 2, 0),
        ("cuMemPoolDestroy", 1, 0),
        ("cuMemPoolTrimTo", 1, 0),
        ("cuMemHostRegister_v2", 2, 0),
        ("cuMemHostUnregister", 1, 0),
        ("cuGraphAddMemFreeNode", 1, 0),
        ("cuGraphInstantiateWithFlags", 3, 1),
        ("cuGraphLaunch", 5, 0),
        ("cuGraphUpload", 1, 0),
        ("cuGraphExecDestroy", 2, 0),
        ("cuGraphDestroy", 1, 0),
    ] {
        assert_eq!(calls_of(&r, function), (calls, failed), "{function}: {r:#}");
    }
    let calls = r["cuda_calls"].as_array().unwrap();
    let launches = calls
        .iter()
        .find(|c| c["function"] == "cuGraphLaunch")
        .unwrap();
    assert_eq!(launches["frames"][0], "graph_execs", "{launches:#}");
    let f = r["failures"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["function"] == "cuGraphInstantiateWithFlags")
        .unwrap_or_else(|| panic!("no failed instantiation: {r:#}"));
    assert_eq!(
        (&f["error"], &f["count"], &f["frames"][0]),
        (
            &serde_json::json!("CUDA_ERROR_INVALID_VALUE"),
            &serde_json::json!(1),
            &serde_json::json!("graph_execs")
        ),
        "{f:#}"
    );
}

#[test]
fn driver_memory_is_charged_to_the_opaque_call_after_which_it_appeared() {
    // Each call's memory is charged to it only if the recorder samples within the fixture's
    // 400 ms pause after the call: other recorders running beside it starved those samples.
    require_privileges!(alone);
    let nvml = tempfile::tempdir().unwrap();
    let kept = nvml.path().join("hidden.trace");
    let run = Run {
        nvml_dir: Some(nvml.path()),
        keep_trace: Some(&kept),
        ..Run::default()
    };
    let (r, _) = run.trace("cuda_fixture", &[], stub_libcuda().as_os_str(), &["hidden"]);
    // The flamegraph shows the driver's memory under the calls that made it.
    let svg = nvml.path().join("hidden.svg");
    let mut cmd = common::alloctrace_cmd(&["flamegraph"]);
    cmd.arg(&kept).arg("-o").arg(&svg);
    let out = common::run("alloctrace flamegraph", cmd);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let svg = std::fs::read_to_string(&svg).unwrap();
    for frame in ["gpu-untraced", "ctx_init", "load_kernels", "build_graph"] {
        assert!(svg.contains(frame), "{frame} missing from the flamegraph");
    }
    assert!(
        r["gpu"]["source"].as_str().unwrap().starts_with("NVML"),
        "{:#}",
        r["gpu"]
    );
    // The stub driver holds 300 MiB per context, 20 MiB per module, 8 MiB per executable.
    assert_eq!(
        rows_at(&r, "gpu-untraced", "ctx_init"),
        (300 * MIB, 1),
        "{r:#}"
    );
    assert_eq!(
        rows_at(&r, "gpu-untraced", "load_kernels"),
        (20 * MIB, 1),
        "{r:#}"
    );
    assert_eq!(
        rows_at(&r, "gpu-untraced", "build_graph"),
        (8 * MIB, 1),
        "{r:#}"
    );
    assert_eq!(
        r["totals"]["gpu-untraced"]["live_bytes"],
        328 * MIB,
        "{r:#}"
    );
    // Traced device memory is not residual: 128 MiB of weights, 16 MiB captured.
    assert_eq!(
        rows_at(&r, "cuda", "hidden_weights"),
        (128 * MIB, 2),
        "{r:#}"
    );
    assert_eq!(
        rows_at(&r, "cuda-graph", "build_graph"),
        (16 * MIB, 1),
        "{r:#}"
    );
    let p = &r["gpu"]["processes"][0];
    assert_eq!(
        (&p["used"], &p["traced"], &p["untraced"]),
        (
            &serde_json::json!(472 * MIB),
            &serde_json::json!(144 * MIB),
            &serde_json::json!(328 * MIB)
        ),
        "{:#}",
        r["gpu"]
    );
    assert_eq!(calls_of(&r, "cuDevicePrimaryCtxRetain"), (1, 0), "{r:#}");
    assert_eq!(calls_of(&r, "cuModuleLoadData"), (1, 0), "{r:#}");
}

#[test]
fn ipc_imports_are_sized_by_their_exporter_and_never_owned() {
    // Two processes of 36 CUDA probes each: detaching them one by one (an RCU grace period each)
    // outlasts the 30 s stop timeout when other recorders detach at the same time.
    require_privileges!(alone);
    let run = Run {
        child: true,
        ..Run::default()
    };
    let (r, _) = run.trace("cuda_fixture", &[], stub_libcuda().as_os_str(), &["ipc"]);
    assert_eq!(rows_at(&r, "cuda", "ipc_export"), (4 * MIB, 1), "{r:#}");
    assert_eq!(rows_at(&r, "cuda-ipc", "ipc_import"), (4 * MIB, 1), "{r:#}");
    assert_eq!(rows_at(&r, "cuda-ipc", "ipc_reopen"), (0, 0), "{r:#}");
    let importer = r["stacks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["class"] == "cuda-ipc")
        .unwrap()["pid"]
        .clone();
    let exporter = r["stacks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["class"] == "cuda")
        .unwrap()["pid"]
        .clone();
    assert_ne!(importer, exporter, "opened in the child: {r:#}");
    assert_eq!(calls_of(&r, "cuIpcGetMemHandle"), (1, 0), "{r:#}");
    assert_eq!(calls_of(&r, "cuIpcOpenMemHandle_v2"), (2, 0), "{r:#}");
    assert_eq!(calls_of(&r, "cuIpcCloseMemHandle"), (1, 0), "{r:#}");
    // Imported memory is another process's: not in the importer's device total.
    assert_eq!(r["totals"]["cuda"]["live_bytes"], 4 * MIB, "{r:#}");
}

/// The stub runtime reaches the stub driver through cuGetProcAddress_v2 pointers, shared,
/// linked into the executable, and linked hidden into another library: each allocation counts
/// once, by the driver, at the stack of the runtime's caller; the failure is named after both.
#[test]
fn runtime_calls_count_once_at_the_runtime_callers_stack_however_linked() {
    require_privileges!();
    let dir = stub_dir();
    let run = Run {
        library_path: Some(&dir),
        ..Run::default()
    };
    let stub_src = fixture_source("stub_cudart.c");
    let stub_src = stub_src.to_str().unwrap();
    let cases: [(&str, &[&str], PathBuf); 3] = [
        ("shared", &[], dir.join("libcudart.so.12")),
        (
            "static",
            &["-DSTATIC_RUNTIME", stub_src],
            PathBuf::from("static"),
        ),
        ("lib", &[], dir.join("libmodel.so")),
    ];
    for (mode, cflags, lib) in cases {
        let args: Vec<&str> = if mode == "static" {
            vec![]
        } else {
            vec![lib.to_str().unwrap()]
        };
        let (r, _) = run.trace("cudart_fixture", cflags, std::ffi::OsStr::new(mode), &args);
        let through = |class: &str, function: &str| {
            common::json_rows_through(&r["stacks"], function)
                .into_iter()
                .filter(|s| s["class"] == class)
                .fold((0, 0), |(b, c), s| {
                    (
                        b + s["live_bytes"].as_u64().unwrap(),
                        c + s["live_count"].as_u64().unwrap(),
                    )
                })
        };
        assert_eq!(through("cuda", "rt_weights"), (6 * MIB, 3), "{mode}: {r:#}");
        assert_eq!(
            through("cuda-pinned", "rt_pinned"),
            (MIB, 1),
            "{mode}: {r:#}"
        );
        assert_eq!(r["totals"]["cuda"]["live_bytes"], 6 * MIB, "{mode}: {r:#}");
        // The stack starts at the runtime's caller, not inside the runtime.
        let first = if mode == "lib" {
            "model_malloc"
        } else {
            "rt_weights"
        };
        assert_eq!(rows_at(&r, "cuda", first), (6 * MIB, 3), "{mode}: {r:#}");
        let f = r["failures"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["error"] == "CUDA_ERROR_OUT_OF_MEMORY")
            .unwrap_or_else(|| panic!("{mode}: no OOM: {r:#}"));
        assert_eq!(
            (&f["function"], &f["size"], &f["count"]),
            (
                &serde_json::json!("cudaMalloc → cuMemAlloc_v2"),
                &serde_json::json!(1u64 << 50),
                &serde_json::json!(1)
            ),
            "{mode}: {f:#}"
        );
        assert_eq!(r["failures"].as_array().unwrap().len(), 1, "{mode}: {r:#}");
    }
}

/// A process attached to by PID held memory no probe saw made: on the host, the resident
/// mappings it made before the recorder (5 MiB, `rss_fixture preattach`) are the untraced
/// remainder's `pre-attach` part; on the GPU, what the driver reported at attach (64 MiB, the
/// stub NVML) is `gpu-untraced` in phase `pre-attach`, with no stack.
#[test]
fn memory_held_before_attach_is_pre_attach() {
    require_privileges!();
    let nvml = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(common::fixture("rss_fixture"));
    cmd.arg("preattach");
    let mut target = TestProcess::spawn("rss_fixture preattach", cmd);
    target.expect_stdout("ready");
    std::fs::write(
        nvml.path().join(target.pid().to_string()),
        format!("{}\n", 64 * MIB),
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("preattach.trace");
    let mut rec_cmd = Command::new(common::alloctrace());
    rec_cmd
        .args(["record", "-p", &target.pid().to_string(), "-o"])
        .arg(&trace)
        .env("STUB_NVML_DIR", nvml.path())
        .env("LD_LIBRARY_PATH", stub_dir());
    let mut recorder = TestProcess::spawn("alloctrace record", rec_cmd);
    recorder.expect_stderr_prefix("attached");
    target.send_line("go");
    target.expect_stdout("done");
    std::thread::sleep(std::time::Duration::from_millis(1500));
    common::stop_recording(&mut recorder, &mut target);
    let r = report_value(&trace);
    assert_eq!(r["target"]["attached"], true, "{:#}", r["target"]);
    let untraced: Vec<(&str, &serde_json::Value, u64)> = (r["stacks"].as_array().unwrap().iter())
        .filter(|s| s["class"] == "gpu-untraced")
        .map(|s| {
            let phase = s["phase"].as_str().unwrap();
            (phase, &s["frames"], s["live_bytes"].as_u64().unwrap())
        })
        .collect();
    let no_stack = serde_json::json!(["[stack lost]"]);
    assert_eq!(untraced, [("pre-attach", &no_stack, 64 * MIB)], "{r:#}");
    let w = &r["rss"];
    let mapped = 20 * 64 * common::page();
    let pre_attach = w["pre_attach"].as_u64().unwrap();
    // The mappings, and what the process had resident besides them (a C program's data,
    // stack and libc's: well under 1 MiB).
    assert!(
        pre_attach >= mapped && pre_attach < mapped + MIB,
        "pre-attach {pre_attach} B, mapped before attach {mapped} B: {w:#}"
    );
    assert!(
        pre_attach as i64 <= w["untraced_anon"].as_i64().unwrap(),
        "{w:#}"
    );
    let text = String::from_utf8_lossy(&common::view(&["report"], &trace)).into_owned();
    assert!(text.contains("of which pre-attach"), "{text}");
}
