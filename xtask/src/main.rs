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
                "usage: cargo xtask bench [--pairs N] [--rounds N] [--live N]\n       \
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
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let v = it.next().context("flag needs a value")?;
        match a.as_str() {
            "--pairs" => pairs = v.parse()?,
            "--rounds" => rounds = v.parse()?,
            "--live" => live = v.parse()?,
            _ => bail!("unknown flag {a}"),
        }
    }
    let root = workspace_root();
    run_ok(Command::new("cargo").current_dir(&root).args([
        "build",
        "--release",
        "-q",
        "-p",
        "tracer",
    ]))?;
    let alloctrace = root.join("target/release/alloctrace");
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

    let untraced = vec![w.clone(), "pairs".into(), pairs_s.clone()];
    let floor = vec![
        a.clone(),
        "record".into(),
        "--heap".into(),
        "--probe-floor".into(),
        "-f".into(),
        "-o".into(),
        t.clone(),
        "--".into(),
        w.clone(),
        "pairs".into(),
        pairs_s.clone(),
    ];
    let traced = vec![
        a.clone(),
        "record".into(),
        "--heap".into(),
        "-f".into(),
        "-o".into(),
        t.clone(),
        "--".into(),
        w.clone(),
        "pairs".into(),
        pairs_s.clone(),
    ];

    println!(
        "alloctrace bench: {pairs} malloc/free pairs per run, {rounds} rounds, median of each (ns per pair)"
    );
    let (mut u, mut f, mut r) = (Vec::new(), Vec::new(), Vec::new());
    let mut lost = 0;
    // Interleaved so that machine noise hits every configuration alike.
    for _ in 0..rounds {
        u.push(parse_ns(&run_measured(&untraced)?.0)?);
        f.push(parse_ns(&run_measured(&floor)?.0)?);
        r.push(parse_ns(&run_measured(&traced)?.0)?);
        lost += lost_events(&alloctrace, &trace)?;
    }
    let (u, f, r) = (median(u), median(f), median(r));
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

    let live_argv = vec![
        a,
        "record".into(),
        "--heap".into(),
        "-f".into(),
        "-o".into(),
        t,
        "--".into(),
        w,
        "live".into(),
        live.to_string(),
    ];
    let peak_kib = tracer_peak_kib(&run_measured(&live_argv)?.1)?;
    println!(
        "tracer peak RSS with {live} live allocations: {:.1} MB   (target <= 150 MB)",
        peak_kib as f64 * 1024.0 / 1e6
    );
    Ok(())
}
