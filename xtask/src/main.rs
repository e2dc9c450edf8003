//! Developer tasks: `cargo xtask bench`, `cargo xtask gpu-check`.

mod gpu_check;

use std::{
    env,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context, Result, bail};

const USAGE: &str = "usage: cargo xtask bench [--pairs N] [--rounds N] [--live N] [--baseline ALLOCTRACE] [--serve-seconds N] [--torch-rounds N] [--skip-torch yes]\n       \
                     cargo xtask gpu-check [--python PATH] [--write-docs]";

fn main() -> Result<()> {
    let args: Vec<String> = env::args().skip(1).collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("{USAGE}");
        return Ok(());
    }
    match args.first().map(String::as_str) {
        Some("bench") => bench(&args[1..]),
        Some("gpu-check") => gpu_check::gpu_check(&workspace_root(), &args[1..]),
        _ => {
            eprintln!("{USAGE}");
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
    Ok(measure_rounds(trace, rounds, configs)?.0)
}

/// `measure`, with each configuration's ns per pair in every round (in round order).
type Rounds = Vec<Vec<f64>>;

fn measure_rounds(
    trace: &Path,
    rounds: usize,
    configs: &[(&str, Vec<String>, bool)],
) -> Result<(Vec<(f64, u64)>, Rounds)> {
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
    let medians = samples.iter().cloned().map(median).zip(lost).collect();
    Ok((medians, samples))
}

/// The median over rounds of configuration `traced`'s time over configuration `floor`'s in the
/// same round: run next to each other, the two see the same machine, where the medians of
/// each (taken over different rounds) can be a noisy round apart.
fn median_round_ratio(rounds: &Rounds, traced: usize, floor: usize) -> f64 {
    let ratios = rounds[traced]
        .iter()
        .zip(&rounds[floor])
        .map(|(t, f)| t / f)
        .collect();
    median(ratios)
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
    let mut serve_seconds: u64 = 60;
    // Three rounds of a minute: one round of this loop moves by 10-20 % (docs/performance.md).
    let mut torch_rounds = 3;
    let mut skip_torch = false;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let v = (it.next()).with_context(|| format!("{a} needs a value\n{USAGE}"))?;
        match a.as_str() {
            "--pairs" => pairs = v.parse()?,
            "--rounds" => rounds = v.parse()?,
            "--live" => live = v.parse()?,
            "--baseline" => baseline = Some(PathBuf::from(v)),
            "--serve-seconds" => serve_seconds = v.parse()?,
            "--torch-rounds" => torch_rounds = v.parse()?,
            "--skip-torch" => skip_torch = v == "yes",
            _ => bail!("unknown flag {a}\n{USAGE}"),
        }
    }
    if rounds == 0 || torch_rounds == 0 {
        bail!("--rounds and --torch-rounds need at least 1 round\n{USAGE}");
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
    // Byte-sampled heap: the work behind the traps a fraction, and on uprobe sessions (Linux
    // 6.13) no return trap for an unsampled call. Its own floor: empty programs at its attach
    // points, sessions that set no return probe (the entry-trap floor).
    let sampled_row = configs.len();
    configs.push((
        "--heap-sample 512 KiB",
        record(&["--heap-sample", "524288"], &churn),
        true,
    ));
    configs.push((
        "sampled floor",
        record(&["--probe-floor", "--heap-sample", "524288"], &churn),
        false,
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
    let (ns, per_round) = measure_rounds(&trace, rounds, &configs)?;
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
    println!(
        "ratio traced / floor:     {:.3}   (target <= 1.25; median of the rounds' ratios {:.3})",
        r / f,
        median_round_ratio(&per_round, 2, 1)
    );
    println!("ratio traced / untraced:  {:.3}", r / u);
    println!("ratio floor / untraced:   {:.3}", f / u);
    println!("overhead above the floor: {:.1} ns/pair", r - f);
    println!("lost events over all traced runs: {lost}   (target 0)");
    let (sampled, sampled_floor) = (ns[sampled_row].0, ns[sampled_row + 1].0);
    println!(
        "{:<34} {:>10.1}   ratio / floor {:.3}   (events lost: {})",
        "--heap-sample 512 KiB",
        sampled,
        sampled / f,
        ns[sampled_row].1
    );
    println!(
        "{:<34} {:>10.1}   sampled / its floor {:.3}   (target <= 1.1; the entry trap alone for an unsampled call where the kernel makes uprobe sessions)",
        "sampled floor",
        sampled_floor,
        sampled / sampled_floor
    );
    println!("\nstack modes (heap events; ratio to the floor; --stack fp is `alloctrace record`):");
    if baseline.is_some() {
        let (bf, br) = (ns[stack_modes].0, ns[stack_modes + 1].0);
        println!(
            "baseline: floor {bf:.1}, traced {br:.1}, ratio traced / floor {:.3}, {:.1} ns/pair above its floor, median of the rounds' ratios {:.3} (this build: {:.3}, {:.1}, {:.3})",
            br / bf,
            br - bf,
            median_round_ratio(&per_round, stack_modes + 1, stack_modes),
            r / f,
            r - f,
            median_round_ratio(&per_round, 2, 1)
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
    let py_churn = vec![python.clone(), py, py_pairs];
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

    deep_stacks(&root, &dir, &a, &t, rounds, &python)?;
    if skip_torch {
        println!("\nPyTorch serving loop: skipped (--skip-torch yes)");
    } else {
        torch_serving(&root, &a, &t, (serve_seconds, torch_rounds))?;
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

/// How each workload of the multi-mode benches is recorded: flags after `record`.
const MODES: [(&str, &[&str]); 5] = [
    ("untraced", &[]),
    ("default (mappings, faults)", &[]),
    ("exact heap (--heap)", &["--heap"]),
    (
        "sampled heap (--heap-sample 512 KiB)",
        &["--heap", "--heap-sample", "524288"],
    ),
    (
        "duty-cycled heap (--heap-budget 5)",
        &["--heap", "--heap-budget", "5"],
    ),
];

/// One run of a workload in each of `MODES`: its figure, the events lost, the tracer's peak
/// RSS and what the report says, per mode.
struct ModeRun {
    figure: f64,
    lost: u64,
    peak_mb: f64,
    leak_first: Option<bool>,
}

/// Runs `workload` in mode `i` of `MODES`, recording into `trace` with `alloctrace`; `key` names
/// the figure the workload prints; `leak` the function a planted leak is made in.
fn run_mode(
    alloctrace: &str,
    trace: &str,
    i: usize,
    workload: &[String],
    key: &str,
    leak: Option<&str>,
) -> Result<ModeRun> {
    let argv: Vec<String> = if i == 0 {
        workload.to_vec()
    } else {
        let mut argv = vec![alloctrace.to_string(), "record".into()];
        argv.extend(MODES[i].1.iter().map(|f| f.to_string()));
        argv.extend(["-f".into(), "-o".into(), trace.to_string(), "--".into()]);
        argv.extend(workload.iter().cloned());
        argv
    };
    let (stdout, stderr) = run_measured(&argv)?;
    let figure = stdout
        .lines()
        .find_map(|l| l.strip_prefix(key)?.trim().parse().ok())
        .with_context(|| format!("no {key} in {stdout:?}"))?;
    if i == 0 {
        return Ok(ModeRun {
            figure,
            lost: 0,
            peak_mb: 0.0,
            leak_first: None,
        });
    }
    let lost = lost_events(Path::new(alloctrace), Path::new(trace))?;
    let peak_mb = tracer_peak_kib(&stderr)? as f64 * 1024.0 / 1e6;
    let leak_first = match leak {
        Some(function) => Some(leak_ranked_first(alloctrace, trace, function)?),
        None => None,
    };
    Ok(ModeRun {
        figure,
        lost,
        peak_mb,
        leak_first,
    })
}

/// Whether the report names `function` as the first suspect: the first leak suspect (what rose
/// in every batch after the warm-up), else the first of a duty-cycled heap's survivors.
fn leak_ranked_first(alloctrace: &str, trace: &str, function: &str) -> Result<bool> {
    let out = Command::new(alloctrace).args(["report", trace]).output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let first_after = |heading: &str| {
        text.split_once(heading)
            .and_then(|(_, rest)| rest.lines().nth(1).map(str::to_string))
            .filter(|line| line.starts_with("  "))
    };
    let first =
        first_after("Leak suspects: live").or_else(|| first_after("Heap survivors (duty-cycled)"));
    Ok(first.is_some_and(|line| line.contains(function)))
}

/// Runs `workload` in every mode, `rounds` times interleaved (the order reversed every other
/// round, so that a drift of the machine over a round weighs on no mode more than another);
/// prints a table of the median figure, the slowdown (the median over rounds of the mode's
/// figure against the untraced run of the same round: a round's runs see the same machine,
/// where medians taken over different rounds can be a noisy round apart), the events lost
/// over all runs, the tracer's peak RSS and, with `leak`, in how many rounds the report
/// ranked it first.
fn modes_table(
    title: &str,
    alloctrace: &str,
    trace: &str,
    rounds: usize,
    workload: &[String],
    (key, higher_is_better): (&str, bool),
    leak: Option<&str>,
) -> Result<()> {
    let mut runs: Vec<Vec<ModeRun>> = (0..MODES.len()).map(|_| Vec::new()).collect();
    for round in 0..rounds {
        let order: Vec<usize> = if round % 2 == 0 {
            (0..MODES.len()).collect()
        } else {
            (0..MODES.len()).rev().collect()
        };
        for i in order {
            runs[i].push(run_mode(alloctrace, trace, i, workload, key, leak)?);
        }
    }
    println!("\n{title} ({rounds} rounds interleaved, median):");
    println!(
        "{:<40} {:>12} {:>10} {:>8} {:>12} {:>12}",
        "mode", key, "slowdown", "lost", "tracer MB", "leak first"
    );
    let median_of = |r: &[ModeRun]| median(r.iter().map(|m| m.figure).collect());
    for (i, mode_runs) in runs.iter().enumerate() {
        let slowdown = median(
            mode_runs
                .iter()
                .zip(&runs[0])
                .map(|(m, untraced)| {
                    if higher_is_better {
                        untraced.figure / m.figure
                    } else {
                        m.figure / untraced.figure
                    }
                })
                .collect(),
        );
        let lost: u64 = mode_runs.iter().map(|m| m.lost).sum();
        let peak = mode_runs.iter().map(|m| m.peak_mb).fold(0.0, f64::max);
        let first = match mode_runs
            .iter()
            .map(|m| m.leak_first)
            .collect::<Option<Vec<_>>>()
        {
            Some(firsts) if !firsts.is_empty() => {
                format!("{}/{}", firsts.iter().filter(|f| **f).count(), firsts.len())
            }
            _ => "-".to_string(),
        };
        println!(
            "{:<40} {:>12.1} {:>10.2} {:>8} {:>12.1} {:>12}",
            MODES[i].0,
            median_of(mode_runs),
            slowdown,
            if i == 0 {
                "-".to_string()
            } else {
                lost.to_string()
            },
            peak,
            first
        );
    }
    Ok(())
}

/// Two threads making malloc/free pairs from 32768 distinct deep stacks: 1024 C++ call paths
/// ten levels deep under 32 Python ones (`deep_stacks.cpp`, `deep_stacks.py`).
fn deep_stacks(
    root: &Path,
    dir: &Path,
    alloctrace: &str,
    trace: &str,
    rounds: usize,
    python: &str,
) -> Result<()> {
    let lib = dir.join("libdeep_stacks.so");
    run_ok(
        Command::new("c++")
            .args(["-O2", "-fno-omit-frame-pointer", "-shared", "-fPIC", "-o"])
            .arg(&lib)
            .arg(root.join("xtask/bench/deep_stacks.cpp")),
    )?;
    let workload = vec![
        python.to_string(),
        root.join("xtask/bench/deep_stacks.py")
            .display()
            .to_string(),
        lib.display().to_string(),
        "2".into(),
        "4".into(),
        "40000".into(),
    ];
    modes_table(
        "32768 distinct deep stacks (C++ and Python frames), 2 threads, ns per malloc/free pair",
        alloctrace,
        trace,
        rounds,
        &workload,
        ("ns_per_pair", false),
        None,
    )
}

/// The torch and transformers the PyTorch loop runs on, pinned: a newer torch serves the same
/// requests with another call rate, and figures of different versions do not compare (torch
/// 2.11 is the GPU node's, issue 11).
const TORCH: &str = "2.11.0";
const TRANSFORMERS: &str = "5.24.0";

/// The venv with the pinned torch and transformers (`target/bench-venv`), made (or brought to
/// the pins) when it has other versions: its Python, or None (said) when it cannot be made here.
fn torch_python(root: &Path) -> Option<PathBuf> {
    let venv = root.join("target/bench-venv");
    let python = venv.join("bin/python");
    let has_torch = |python: &Path| {
        let check = format!(
            "import torch, transformers; \
             assert torch.__version__.split('+')[0] == '{TORCH}', torch.__version__; \
             assert transformers.__version__ == '{TRANSFORMERS}', transformers.__version__"
        );
        Command::new(python)
            .args(["-c", &check])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if has_torch(&python) {
        println!("\nPyTorch serving loop: torch {TORCH}, transformers {TRANSFORMERS}");
        return Some(python);
    }
    println!(
        "\nPyTorch serving loop: installing torch {TORCH} and transformers {TRANSFORMERS} into {} ...",
        venv.display()
    );
    let made = run_ok(Command::new("python3").arg("-m").arg("venv").arg(&venv)).is_ok()
        && run_ok(Command::new(&python).args([
            "-m",
            "pip",
            "install",
            "-q",
            &format!("torch=={TORCH}"),
            &format!("transformers=={TRANSFORMERS}"),
        ]))
        .is_ok();
    if made && has_torch(&python) {
        Some(python)
    } else {
        println!("PyTorch serving loop: skipped (torch and transformers could not be installed)");
        None
    }
}

/// A tiny Llama served on the CPU for `seconds` with a per-request leak planted at
/// `remember_request` (`torch_serve.py`): requests a second in each mode.
fn torch_serving(
    root: &Path,
    alloctrace: &str,
    trace: &str,
    (seconds, rounds): (u64, usize),
) -> Result<()> {
    let Some(python) = torch_python(root) else {
        return Ok(());
    };
    let workload = vec![
        python.display().to_string(),
        root.join("xtask/bench/torch_serve.py")
            .display()
            .to_string(),
        seconds.to_string(),
    ];
    modes_table(
        &format!(
            "PyTorch CPU serving loop, {seconds} s (requests per second; slowdown = untraced / traced)"
        ),
        alloctrace,
        trace,
        rounds,
        &workload,
        ("requests_per_s", true),
        Some("remember_request"),
    )
}
