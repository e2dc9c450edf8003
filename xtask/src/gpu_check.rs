//! `cargo xtask gpu-check`: a PyTorch workload (caching allocator with and without expandable
//! segments, the cudaMallocAsync backend, a captured CUDA graph, pinned memory, a planted per-request tensor leak) on a real
//! GPU under alloctrace, its ledger compared with PyTorch's own figures (`memory_reserved()`,
//! `memory_stats()`, the `_snapshot()` block list) and NVML. `--write-docs` puts the results into
//! docs/gpu-validation.md.

use std::{path::Path, process::Command};

use anyhow::{Context, Result, bail};
use serde_json::Value;

const MIB: u64 = 1 << 20;
const RESULTS_BEGIN: &str = "<!-- gpu-check results: begin -->";
const RESULTS_END: &str = "<!-- gpu-check results: end -->";

/// One comparison of the ledger with PyTorch's or the driver's own figure.
#[derive(Debug, PartialEq, Eq)]
pub struct Check {
    pub name: &'static str,
    pub expected: String,
    pub observed: String,
    pub pass: bool,
}

/// Live bytes of `class` for `pid` in a JSON report.
fn live(report: &Value, pid: &str, class: &str) -> u64 {
    report["processes"][pid][class]["live_bytes"]
        .as_u64()
        .unwrap_or(0)
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / MIB as f64)
}

/// Compares the report of one run with the figures the workload wrote.
pub fn evaluate(report: &Value, figures: &Value) -> Vec<Check> {
    let pid_number = report["target"]["pids"][0].as_u64();
    let pid = pid_number.map(|p| p.to_string()).unwrap_or_default();
    let reserved = figures["memory_reserved"].as_u64().unwrap_or(0);
    let pinned = figures["pinned_bytes"].as_u64().unwrap_or(0);
    let device: u64 = ["cuda", "cuda-pool", "cuda-vmm", "cuda-graph"]
        .iter()
        .map(|c| live(report, &pid, c))
        .sum();
    let untraced = live(report, &pid, "gpu-untraced");
    let gpu = report["gpu"]["processes"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["pid"].as_u64() == pid_number))
        .cloned()
        .unwrap_or(Value::Null);
    let nvml = gpu["used"].as_u64().unwrap_or(0);
    let attributed: u64 = report["stacks"]
        .as_array()
        .map(|rows| {
            rows.iter()
                .filter(|s| {
                    s["class"] == "gpu-untraced"
                        && s["pid"].as_u64() == pid_number
                        && !s["stack"].is_null()
                })
                .filter_map(|s| s["live_bytes"].as_u64())
                .sum()
        })
        .unwrap_or(0);
    let calls = |prefix: &str| -> u64 {
        report["cuda_calls"]
            .as_array()
            .map(|rows| {
                rows.iter()
                    .filter(|c| {
                        c["function"]
                            .as_str()
                            .is_some_and(|f| f.starts_with(prefix))
                    })
                    .filter_map(|c| c["calls"].as_u64())
                    .sum()
            })
            .unwrap_or(0)
    };
    let allocator = report["torch_allocator"]["allocators"]
        .as_array()
        .and_then(|all| all.iter().find(|a| a["pid"].as_u64() == pid_number))
        .cloned()
        .unwrap_or(Value::Null);
    let figure = |field: &str| figures[field].as_u64().unwrap_or(0);
    // The planted leak: live `torch` bytes under the Python function that keeps the tensors.
    let leak_found: u64 = report["stacks"]
        .as_array()
        .map(|rows| {
            rows.iter()
                .filter(|s| s["class"] == "torch" && s["pid"].as_u64() == pid_number)
                .filter(|s| {
                    s["frames"].as_array().is_some_and(|frames| {
                        frames.iter().any(|f| {
                            f.as_str()
                                .is_some_and(|f| f.starts_with("handle_request ("))
                        })
                    })
                })
                .filter_map(|s| s["live_bytes"].as_u64())
                .sum()
        })
        .unwrap_or(0);
    let is_async = figures["backend"] == "cudaMallocAsync";
    let (mut checks, allocator_share) = if is_async {
        (
            async_backend_checks(&allocator, figures),
            figure("memory_allocated"),
        )
    } else {
        (caching_allocator_checks(&allocator, figures), reserved)
    };
    checks.extend([
        Check {
            name: "planted per-request leak under handle_request",
            expected: format!("≥ {}", mib(figure("leak_bytes"))),
            observed: mib(leak_found),
            pass: figure("leak_bytes") > 0 && leak_found >= figure("leak_bytes"),
        },
        Check {
            // Libraries outside the caching allocator (cuBLAS's workspace) add to the device
            // classes: the allocator's share is at most what the driver layer counted.
            name: "device classes hold the allocator's memory",
            expected: format!("≥ {}", mib(allocator_share)),
            observed: mib(device),
            pass: allocator_share > 0 && device >= allocator_share,
        },
        Check {
            name: "traced + gpu-untraced vs NVML",
            expected: mib(nvml),
            observed: mib(device + untraced),
            pass: nvml > 0 && (device + untraced).abs_diff(nvml) <= MIB,
        },
        Check {
            name: "gpu-untraced charged to a call's stack",
            expected: format!("≥ half of {}", mib(untraced)),
            observed: mib(attributed),
            pass: untraced > 0 && attributed * 2 >= untraced,
        },
        Check {
            name: "cuda-pinned vs the pinned tensor",
            expected: format!("≥ {}", mib(pinned)),
            observed: mib(live(report, &pid, "cuda-pinned")),
            pass: pinned > 0 && live(report, &pid, "cuda-pinned") >= pinned,
        },
        Check {
            name: "graph captured, instantiated and replayed",
            expected: "≥ 1 capture, ≥ 1 instantiation, ≥ 5 launches".into(),
            observed: format!(
                "{} captures, {} instantiations, {} launches",
                calls("cuStreamBeginCapture"),
                calls("cuGraphInstantiate"),
                calls("cuGraphLaunch")
            ),
            pass: calls("cuStreamBeginCapture") >= 1
                && calls("cuGraphInstantiate") >= 1
                && calls("cuGraphLaunch") >= 5,
        },
        Check {
            name: "no failed CUDA calls",
            expected: "0".into(),
            observed: report["failures"]
                .as_array()
                .map_or(0, |f| f.len())
                .to_string(),
            pass: report["failures"].as_array().is_some_and(|f| f.is_empty()),
        },
    ]);
    checks
}

/// PyTorch's native caching allocator: segments, blocks and holes against its own figures.
fn caching_allocator_checks(allocator: &Value, figures: &Value) -> Vec<Check> {
    let layer = |field: &str| allocator[field].as_u64().unwrap_or(0);
    let figure = |field: &str| figures[field].as_u64().unwrap_or(0);
    let reserved = figure("memory_reserved");
    vec![
        Check {
            name: "allocator layer reserved vs torch.cuda.memory_reserved()",
            expected: mib(reserved),
            observed: mib(layer("reserved")),
            pass: reserved > 0 && layer("reserved") == reserved,
        },
        Check {
            name: "live tensors vs memory_stats requested_bytes",
            expected: format!("{} B", figure("requested_bytes")),
            observed: format!("{} B", layer("allocated")),
            pass: figure("requested_bytes") > 0 && layer("allocated") == figure("requested_bytes"),
        },
        Check {
            name: "live tensor blocks vs _snapshot() active blocks",
            expected: format!(
                "{} blocks, {} B",
                figure("snapshot_active_blocks"),
                figure("snapshot_active_requested")
            ),
            observed: format!(
                "{} blocks, {} B",
                layer("blocks").saturating_sub(pending_blocks(allocator)),
                layer("allocated")
            ),
            pass: figure("snapshot_active_blocks") > 0
                && layer("blocks").saturating_sub(pending_blocks(allocator))
                    == figure("snapshot_active_blocks")
                && layer("allocated") == figure("snapshot_active_requested"),
        },
        Check {
            name: "largest hole vs _snapshot() largest free block",
            expected: format!("{} B", figure("snapshot_largest_free")),
            observed: format!("{} B", layer("largest_hole")),
            pass: layer("largest_hole") == figure("snapshot_largest_free"),
        },
    ]
}

/// The cudaMallocAsync backend: tensors only, each a driver allocation.
fn async_backend_checks(allocator: &Value, figures: &Value) -> Vec<Check> {
    let layer = |field: &str| allocator[field].as_u64().unwrap_or(0);
    let allocated = figures["memory_allocated"].as_u64().unwrap_or(0);
    vec![
        Check {
            name: "cudaMallocAsync backend recognized",
            expected: "true".into(),
            observed: allocator["async_backend"].to_string(),
            pass: allocator["async_backend"] == true,
        },
        Check {
            name: "live tensors vs torch.cuda.memory_allocated()",
            expected: format!("{allocated} B"),
            observed: format!("{} B", layer("allocated")),
            pass: allocated > 0 && layer("allocated") == allocated,
        },
    ]
}

/// Blocks freed on one stream but still used on another: in the layer's block count, not among
/// the snapshot's active ones. The report gives pending bytes, not blocks; none is pending at the
/// workload's end (it synchronizes), so any pending byte counts as one block to stay honest.
fn pending_blocks(allocator: &Value) -> u64 {
    u64::from(allocator["pending"].as_u64().unwrap_or(0) > 0)
}

/// Markdown for one run.
fn markdown(title: &str, figures: &Value, checks: &[Check]) -> String {
    let mut out = format!(
        "### {title}\n\nPyTorch {} (CUDA {}) on {}\n\n| check | expected | observed | |\n|---|---|---|---|\n",
        figures["torch_version"].as_str().unwrap_or("?"),
        figures["cuda_version"].as_str().unwrap_or("?"),
        figures["device"].as_str().unwrap_or("?"),
    );
    for c in checks {
        out.push_str(&format!(
            "| {} | {} | {} | {} |\n",
            c.name,
            c.expected,
            c.observed,
            if c.pass { "pass" } else { "**FAIL**" }
        ));
    }
    out
}

/// Why this machine cannot run the check, if it cannot.
fn missing_prerequisite(python: &str) -> Option<String> {
    let probe = Command::new(python)
        .args([
            "-c",
            "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 3)",
        ])
        .output();
    match probe {
        Err(e) => Some(format!("cannot run {python}: {e}")),
        Ok(o) if o.status.code() == Some(3) => {
            Some("PyTorch sees no CUDA GPU (torch.cuda.is_available() is false)".into())
        }
        Ok(o) if !o.status.success() => Some(format!(
            "{python} has no PyTorch ({})",
            String::from_utf8_lossy(&o.stderr)
                .lines()
                .last()
                .unwrap_or("import torch failed")
        )),
        Ok(_) => None,
    }
}

pub fn gpu_check(root: &Path, args: &[String]) -> Result<()> {
    let mut python = "python3".to_string();
    let mut write_docs = false;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--python" => python = it.next().context("--python needs a path")?.clone(),
            "--write-docs" => write_docs = true,
            _ => bail!(
                "unknown flag {a} (usage: cargo xtask gpu-check [--python PATH] [--write-docs])"
            ),
        }
    }
    if let Some(why) = missing_prerequisite(&python) {
        eprintln!("gpu-check needs a CUDA GPU and PyTorch with CUDA: {why}");
        std::process::exit(2);
    }
    let alloctrace = crate::build_alloctrace(root)?;
    let dir = root.join("target/gpu-check");
    std::fs::create_dir_all(&dir)?;
    let workload = root.join("xtask/gpu/torch_workload.py");
    let mut doc = String::new();
    let mut failed = 0;
    for (title, conf) in [
        (
            "caching allocator (cudaMalloc segments)",
            "expandable_segments:False",
        ),
        (
            "expandable segments (cuMemCreate/cuMemMap)",
            "expandable_segments:True",
        ),
        (
            "cudaMallocAsync backend (a CUDA memory pool, no segments)",
            "backend:cudaMallocAsync",
        ),
    ] {
        let trace = dir.join("run.trace");
        let figures_path = dir.join("figures.json");
        let _ = std::fs::remove_file(&figures_path);
        crate::run_ok(
            Command::new(&alloctrace)
                .args(["record", "-f", "-o"])
                .arg(&trace)
                .arg("--")
                .arg(&python)
                .arg(&workload)
                .arg(&figures_path)
                .env("PYTORCH_CUDA_ALLOC_CONF", conf),
        )?;
        let report = Command::new(&alloctrace)
            .args(["report", "--format", "json"])
            .arg(&trace)
            .output()?;
        if !report.status.success() {
            bail!(
                "alloctrace report failed: {}",
                String::from_utf8_lossy(&report.stderr)
            );
        }
        let report: Value = serde_json::from_slice(&report.stdout)?;
        let figures: Value = serde_json::from_str(
            &std::fs::read_to_string(&figures_path)
                .with_context(|| format!("the workload wrote no {}", figures_path.display()))?,
        )?;
        let checks = evaluate(&report, &figures);
        failed += checks.iter().filter(|c| !c.pass).count();
        let section = markdown(title, &figures, &checks);
        println!("{section}");
        doc.push_str(&section);
        doc.push('\n');
    }
    if write_docs {
        let path = root.join("docs/gpu-validation.md");
        let old = std::fs::read_to_string(&path)?;
        let date = String::from_utf8(Command::new("date").arg("-u").arg("+%F").output()?.stdout)?;
        let results = format!(
            "{RESULTS_BEGIN}\n## Latest results ({}, `cargo xtask gpu-check`)\n\n{doc}{RESULTS_END}",
            date.trim()
        );
        std::fs::write(&path, replace_results(&old, &results))?;
        println!("wrote {}", path.display());
    }
    if failed > 0 {
        bail!("{failed} check(s) failed");
    }
    Ok(())
}

/// `doc` with its results section replaced by `results` (appended when it has none).
fn replace_results(doc: &str, results: &str) -> String {
    match (doc.find(RESULTS_BEGIN), doc.find(RESULTS_END)) {
        (Some(b), Some(e)) if e > b => {
            format!("{}{results}{}", &doc[..b], &doc[e + RESULTS_END.len()..])
        }
        _ => format!("{}\n\n{results}\n", doc.trim_end()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn report(device: u64, untraced: u64, nvml: u64, attributed: bool) -> Value {
        let mut r = base_report(device, untraced, nvml, attributed);
        r["torch_allocator"] = json!({"allocators": [{
            "pid": 42, "reserved": 300 * MIB, "allocated": 100 * MIB + 4096, "pending": 0,
            "blocks": 7, "largest_hole": 16 * MIB,
        }], "ooms": []});
        r["stacks"].as_array_mut().unwrap().push(json!({
            "class": "torch", "pid": 42, "stack": 9, "live_bytes": 80 * MIB,
            "frames": ["alloc_found_block", "handle_request (torch_workload.py:37)", "serve (torch_workload.py:43)"],
        }));
        r
    }

    fn figures() -> Value {
        json!({
            "memory_reserved": 300 * MIB, "pinned_bytes": 64 * MIB,
            "requested_bytes": 100 * MIB + 4096, "leak_bytes": 80 * MIB,
            "snapshot_active_blocks": 7, "snapshot_active_requested": 100 * MIB + 4096,
            "snapshot_largest_free": 16 * MIB,
        })
    }

    fn base_report(device: u64, untraced: u64, nvml: u64, attributed: bool) -> Value {
        json!({
            "target": {"pids": [42]},
            "processes": {"42": {
                "cuda": {"live_bytes": device},
                "cuda-pinned": {"live_bytes": 128 * MIB},
                "gpu-untraced": {"live_bytes": untraced},
            }},
            "gpu": {"processes": [{"pid": 42, "used": nvml}]},
            "stacks": [{"class": "gpu-untraced", "pid": 42, "stack": if attributed { json!(3) } else { Value::Null }, "live_bytes": untraced}],
            "cuda_calls": [
                {"function": "cuStreamBeginCapture_v2", "calls": 1},
                {"function": "cuGraphInstantiateWithFlags", "calls": 1},
                {"function": "cuGraphLaunch", "calls": 5},
            ],
            "failures": [],
        })
    }

    #[test]
    fn a_consistent_ledger_passes_every_check() {
        // cuBLAS's 64 MiB workspace is device memory outside the caching allocator.
        let checks = evaluate(&report(364 * MIB, 500 * MIB, 864 * MIB, true), &figures());
        assert!(checks.iter().all(|c| c.pass), "{checks:#?}");
    }

    /// The cudaMallocAsync backend: no segments, no snapshot; live tensors against
    /// `memory_allocated()`, and the device classes hold at least them.
    #[test]
    fn the_cuda_malloc_async_backend_is_checked_by_its_own_figures() {
        let mut r = report(364 * MIB, 500 * MIB, 864 * MIB, true);
        r["torch_allocator"]["allocators"][0] =
            json!({"pid": 42, "async_backend": true, "allocated": 100 * MIB, "reserved": 0});
        let figures = json!({
            "backend": "cudaMallocAsync", "memory_allocated": 100 * MIB,
            "memory_reserved": 200 * MIB, "pinned_bytes": 64 * MIB, "leak_bytes": 80 * MIB,
        });
        let checks = evaluate(&r, &figures);
        assert!(checks.iter().all(|c| c.pass), "{checks:#?}");
        assert!(
            checks
                .iter()
                .any(|c| c.name == "cudaMallocAsync backend recognized")
        );
        r["torch_allocator"]["allocators"][0]["async_backend"] = json!(false);
        r["torch_allocator"]["allocators"][0]["allocated"] = json!(99 * MIB);
        let failing: Vec<&str> = (evaluate(&r, &figures).into_iter())
            .filter(|c| !c.pass)
            .map(|c| c.name)
            .collect();
        assert_eq!(
            failing,
            [
                "cudaMallocAsync backend recognized",
                "live tensors vs torch.cuda.memory_allocated()"
            ]
        );
    }

    #[test]
    fn each_inconsistency_fails_its_own_check() {
        let figures = figures();
        let failing = |r: Value| -> Vec<&'static str> {
            evaluate(&r, &figures)
                .into_iter()
                .filter(|c| !c.pass)
                .map(|c| c.name)
                .collect()
        };
        assert_eq!(
            failing(report(100 * MIB, 700 * MIB, 800 * MIB, true)),
            vec!["device classes hold the allocator's memory"]
        );
        let with = |field: &str, value: Value| {
            let mut r = report(300 * MIB, 500 * MIB, 800 * MIB, true);
            r["torch_allocator"]["allocators"][0][field] = value;
            r
        };
        assert_eq!(
            failing(with("reserved", json!(236 * MIB))),
            vec!["allocator layer reserved vs torch.cuda.memory_reserved()"]
        );
        assert_eq!(
            failing(with("allocated", json!(100 * MIB))),
            vec![
                "live tensors vs memory_stats requested_bytes",
                "live tensor blocks vs _snapshot() active blocks"
            ]
        );
        assert_eq!(
            failing(with("largest_hole", json!(2 * MIB))),
            vec!["largest hole vs _snapshot() largest free block"]
        );
        let mut no_leak = report(300 * MIB, 500 * MIB, 800 * MIB, true);
        no_leak["stacks"].as_array_mut().unwrap().pop();
        assert_eq!(
            failing(no_leak),
            vec!["planted per-request leak under handle_request"]
        );
        assert_eq!(
            failing(report(300 * MIB, 400 * MIB, 800 * MIB, true)),
            vec!["traced + gpu-untraced vs NVML"]
        );
        assert_eq!(
            failing(report(300 * MIB, 500 * MIB, 800 * MIB, false)),
            vec!["gpu-untraced charged to a call's stack"]
        );
    }

    #[test]
    fn results_replace_the_previous_section() {
        let doc = format!("# GPU validation\n\nintro\n{RESULTS_BEGIN}\nold\n{RESULTS_END}\ntail\n");
        let new = replace_results(&doc, &format!("{RESULTS_BEGIN}\nnew\n{RESULTS_END}"));
        assert_eq!(
            new,
            format!("# GPU validation\n\nintro\n{RESULTS_BEGIN}\nnew\n{RESULTS_END}\ntail\n")
        );
        let appended = replace_results("# GPU validation\n", "R");
        assert_eq!(appended, "# GPU validation\n\nR\n");
    }
}
