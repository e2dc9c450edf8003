//! Developer tasks: `cargo xtask bench`, `cargo xtask gpu-check`.

mod gpu_check;

use std::{
    env,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context, Result, bail};

fn main() -> Result<()> {
    let args: Vec<String> = env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("bench") => bench(&args[1..]),
        Some("gpu-check") => gpu_check::gpu_check(&workspace_root(), &args[1..]),
        _ => {
            eprintln!(
                "usage: cargo xtask bench [--pairs N] [--rounds N] [--live N] [--baseline ALLOCTRACE]\n       \
                 cargo xtask gpu-check [--python PATH] [--write-docs]"
            );
            std::process::exit(2);
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// Builds alloctrace (release); its path.
fn build_alloctrace(root: &Path) -> Result<PathBuf> {
    run_ok(Command::new("cargo").current_dir(root).args([
        "build",
        "--release",
        "-q",
        "-p",
        "tracer",
    ]))?;
    Ok(root.join("target/release/alloctrace"))
}

fn run_ok(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

/// Runs `argv` and waits for it, returning its stdout and stderr.
fn run_measured(argv: &[String]) -> Result<(String, String)> {
    let child = Command::new(&argv[0])
        .args(&argv[1..])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", argv[0]))?;
    let out = child.wait_with_output()?;
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    if !out.status.success() {
        bail!("{} failed ({}): {stderr}", argv.join(" "), out.status);
    }
    Ok((stdout, stderr))
}

/// The tracer's own peak RSS, from its closing line `... (tracer peak RSS N KiB)`.
fn tracer_peak_kib(stderr: &str) -> Result<u64> {
    stderr
        .rsplit_once("tracer peak RSS ")
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("no tracer peak RSS in {stderr:?}"))
}

fn parse_ns(out: &str) -> Result<f64> {
    out.lines()
        .find_map(|l| l.strip_prefix("ns_per_pair "))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no ns_per_pair in {out:?}"))
}

/// Runs each configuration `rounds` times, interleaved so that machine noise hits every one
/// alike; returns each one's median ns per pair and the events lost over its runs (counted for
/// those flagged).
fn measure(
    trace: &Path,
    rounds: usize,
    configs: &[(&str, Vec<String>, bool)],
) -> Result<Vec<(f64, u64)>> {
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); configs.len()];
    let mut lost = vec![0u64; configs.len()];
    for _ in 0..rounds {
        for (i, (_, argv, count_lost)) in configs.iter().enumerate() {
            samples[i].push(parse_ns(&run_measured(argv)?.0)?);
            if *count_lost || argv.iter().any(|a| a == "--stack-copy-always") {
                // Read by the build that wrote it (a baseline's recording may be an older format).
                lost[i] += lost_events(Path::new(&argv[0]), trace)?;
            }
        }
    }
    Ok(samples.into_iter().map(median).zip(lost).collect())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn lost_events(alloctrace: &Path, trace: &Path) -> Result<u64> {
    let out = Command::new(alloctrace)
        .args(["report", "--format", "json"])
        .arg(trace)
        .output()?;
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).context("report json")?;
    Ok(json["lost_events"]
        .as_object()
        .map(|m| m.values().filter_map(|v| v.as_u64()).sum())
        .unwrap_or(0))
}

fn bench(args: &[String]) -> Result<()> {
    let mut pairs: u64 = 2_000_000;
    let mut rounds = 5;
    let mut live: u64 = 1_000_000;
    let mut baseline: Option<PathBuf> = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let v = it.next().context("flag needs a value")?;
        match a.as_str() {
            "--pairs" => pairs = v.parse()?,
            "--rounds" => rounds = v.parse()?,
            "--live" => live = v.parse()?,
            "--baseline" => baseline = Some(PathBuf::from(v)),
            _ => bail!("unknown flag {a}"),
        }
    }
    let root = workspace_root();
    let alloctrace = build_alloctrace(&root)?;
    let dir = root.join("target/bench");
    std::fs::create_dir_all(&dir)?;
    let workload = dir.join("heap_churn");
    run_ok(
        Command::new("cc")
            .args(["-O2", "-fno-omit-frame-pointer", "-o"])
            .arg(&workload)
            .arg(root.join("xtask/bench/heap_churn.c")),
    )?;
    let trace = dir.join("bench.trace");
    let w = workload.display().to_string();
    let a = alloctrace.display().to_string();
    let t = trace.display().to_string();
    let pairs_s = pairs.to_string();
    // `alloctrace record --heap FLAGS... -- CMD`.
    let record_with = |binary: &str, flags: &[&str], cmd: &[String]| -> Vec<String> {
        let mut argv = vec![binary.to_string(), "record".into(), "--heap".into()];
        argv.extend(flags.iter().map(|f| f.to_string()));
        argv.extend(["-f".into(), "-o".into(), t.clone(), "--".into()]);
        argv.extend(cmd.iter().cloned());
        argv
    };
    let record = |flags: &[&str], cmd: &[String]| record_with(&a, flags, cmd);
    let churn = vec![w.clone(), "pairs".into(), pairs_s.clone()];

    println!(
        "alloctrace bench: {pairs} malloc/free pairs per run, {rounds} rounds, median of each (ns per pair)"
    );
    let mut configs: Vec<(&str, Vec<String>, bool)> = vec![
        ("untraced", churn.clone(), false),
        (
            "empty probes (floor)",
            record(&["--probe-floor"], &churn),
            false,
        ),
        ("alloctrace record", record(&[], &churn), true),
    ];
    // Byte-sampled heap: the traps are the same, the work behind them a fraction.
    let sampled_row = configs.len();
    configs.push((
        "--heap-sample 512 KiB",
        record(&["--heap-sample", "524288"], &churn),
        true,
    ));
    // Stack modes, each event copying its stack (none falling back under ring pressure).
    let dwarf: [(&str, &str); 3] = [
        ("--stack dwarf, 8 KiB copies", "8"),
        ("--stack dwarf, 16 KiB copies", "16"),
        ("--stack dwarf, 32 KiB copies", "32"),
    ];
    for (name, kib) in dwarf {
        let flags = [
            "--stack",
            "dwarf",
            "--stack-copy",
            kib,
            "--stack-copy-always",
        ];
        configs.push((name, record(&flags, &churn), false));
    }
    // Another build (an earlier commit's release binary), interleaved with this one so that both
    // ratios see the same machine: a regression shows as a difference measured side by side.
    let stack_modes = configs.len();
    if let Some(b) = &baseline {
        let b = b.display().to_string();
        configs.push((
            "baseline: floor",
            record_with(&b, &["--probe-floor"], &churn),
            false,
        ));
        configs.push(("baseline: record", record_with(&b, &[], &churn), true));
    }
    let ns = measure(&trace, rounds, &configs)?;
    let (u, f, r) = (ns[0].0, ns[1].0, ns[2].0);
    let lost = ns[2].1;
    println!("{:<34} {:>10.1}", "untraced", u);
    println!(
        "{:<34} {:>10.1}   (trap floor: {:.1} ns/pair over untraced)",
        "empty probes (floor)",
        f,
        f - u
    );
    println!(
        "{:<34} {:>10.1}   ({:.1} ns/pair over untraced)",
        "alloctrace record",
        r,
        r - u
    );
    println!("ratio traced / floor:     {:.3}   (target <= 1.25)", r / f);
    println!("ratio traced / untraced:  {:.3}", r / u);
    println!("ratio floor / untraced:   {:.3}", f / u);
    println!("overhead above the floor: {:.1} ns/pair", r - f);
    println!("lost events over all traced runs: {lost}   (target 0)");
    println!(
        "{:<34} {:>10.1}   ratio / floor {:.3}   (events lost: {})",
        "--heap-sample 512 KiB",
        ns[sampled_row].0,
        ns[sampled_row].0 / f,
        ns[sampled_row].1
    );
    println!("\nstack modes (heap events; ratio to the floor; --stack fp is `alloctrace record`):");
    if baseline.is_some() {
        let (bf, br) = (ns[stack_modes].0, ns[stack_modes + 1].0);
        println!(
            "baseline: floor {bf:.1}, traced {br:.1}, ratio traced / floor {:.3}, {:.1} ns/pair above its floor (this build: {:.3}, {:.1})",
            br / bf,
            br - bf,
            r / f,
            r - f
        );
    }
    for (i, (name, _, _)) in configs
        .iter()
        .enumerate()
        .take(stack_modes)
        .skip(sampled_row + 1)
    {
        println!(
            "{:<34} {:>10.1}   ratio / floor {:.3}   (events lost to a full ring: {})",
            name,
            ns[i].0,
            ns[i].0 / f,
            ns[i].1
        );
    }

    // Python frames: the same pairs from three calls deep in Python code.
    // The interpreter itself, not a launcher script (pyenv's python3 is one).
    let python = String::from_utf8(
        Command::new("python3")
            .args(["-c", "import sys; print(sys.executable)"])
            .output()
            .context("python3 is needed for the Python frames benchmark")?
            .stdout,
    )?
    .trim()
    .to_string();
    let py = root.join("xtask/bench/py_churn.py").display().to_string();
    let py_pairs = (pairs / 10).to_string();
    let py_churn = vec![python, py, py_pairs];
    let py_configs: Vec<(&str, Vec<String>, bool)> = vec![
        ("python, untraced", py_churn.clone(), false),
        (
            "python, empty probes (floor)",
            record(&["--probe-floor"], &py_churn),
            false,
        ),
        (
            "python, --no-python-frames",
            record(&["--no-python-frames"], &py_churn),
            true,
        ),
        ("python, with Python frames", record(&[], &py_churn), true),
    ];
    let py_ns = measure(&trace, rounds, &py_configs)?;
    println!(
        "\nPython frames ({} pairs from Python code; ratio to the floor):",
        pairs / 10
    );
    for (i, (name, _, _)) in py_configs.iter().enumerate() {
        println!(
            "{:<34} {:>10.1}   ratio / floor {:.3}",
            name,
            py_ns[i].0,
            py_ns[i].0 / py_ns[1].0
        );
    }

    let live_argv = record(&[], &[w.clone(), "live".into(), live.to_string()]);
    let peak_kib = tracer_peak_kib(&run_measured(&live_argv)?.1)?;
    println!(
        "tracer peak RSS with {live} live allocations: {:.1} MB   (target <= 150 MB)",
        peak_kib as f64 * 1024.0 / 1e6
    );
    big_libraries(&root, &dir, &a, &t)
}

/// Tracer memory in default mode for a process that maps large libraries (a PyTorch process
/// maps gigabytes of them): the largest shared objects of this machine (LLVM's, rustc's: the
/// toolchain `scripts/setup` installs), mapped by `map_libraries.c`.
fn big_libraries(root: &Path, dir: &Path, alloctrace: &str, trace: &str) -> Result<()> {
    let exe = dir.join("map_libraries");
    run_ok(
        Command::new("cc")
            .args(["-O1", "-fno-omit-frame-pointer", "-o"])
            .arg(&exe)
            .arg(root.join("xtask/bench/map_libraries.c")),
    )?;
    let mut libs: Vec<(u64, PathBuf)> = Vec::new();
    let home = std::env::var("HOME").unwrap_or_default();
    for top in [
        "/usr/lib/x86_64-linux-gnu",
        &format!("{home}/.rustup/toolchains"),
    ] {
        collect_shared_objects(Path::new(top), 3, &mut libs);
    }
    libs.sort_by_key(|l| std::cmp::Reverse(l.0));
    libs.truncate(8);
    if libs.is_empty() {
        println!("tracer peak RSS with large libraries mapped: no shared object over 50 MB here");
        return Ok(());
    }
    let total: u64 = libs.iter().map(|(s, _)| s).sum();
    let mut argv = vec![
        alloctrace.to_string(),
        "record".into(),
        "-f".into(),
        "-o".into(),
        trace.to_string(),
        "--".into(),
        exe.display().to_string(),
    ];
    argv.extend(libs.iter().map(|(_, p)| p.display().to_string()));
    let peak_kib = tracer_peak_kib(&run_measured(&argv)?.1)?;
    println!(
        "tracer peak RSS, default mode, target mapping {} libraries of {:.0} MB: {:.1} MB   (target <= 150 MB)",
        libs.len(),
        total as f64 / 1e6,
        peak_kib as f64 * 1024.0 / 1e6
    );
    Ok(())
}

/// Shared objects over 50 MB under `dir`, `depth` levels down.
fn collect_shared_objects(dir: &Path, depth: u32, out: &mut Vec<(u64, PathBuf)>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        let name = entry.file_name().to_string_lossy().into_owned();
        if meta.is_dir() && depth > 0 {
            collect_shared_objects(&path, depth - 1, out);
        } else if meta.is_file() && name.contains(".so") && meta.len() > 50_000_000 {
            out.push((meta.len(), path));
        }
    }
}
