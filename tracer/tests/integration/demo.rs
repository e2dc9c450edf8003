//! The demo's workload (`examples/llm_server_sim.c`, what `./scripts/demo` records): its
//! postmortem must lead with the leak the README promises — `register_session` — with the exact
//! bytes the simulator says it never freed; the bounded caches and pools are not suspects, and
//! the default flame graph is not thread-stack reservations. (Its figures vary from run to run
//! with the request count, so this is asserted, not a byte-for-byte golden.)

use std::path::Path;

use crate::common::{self, view};

#[test]
fn the_demo_report_leads_with_register_session_and_its_exact_bytes() {
    require_privileges!();
    let dir = tempfile::tempdir().unwrap();
    let sim = dir.path().join("llm_server_sim");
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/llm_server_sim.c");
    let args: Vec<std::ffi::OsString> = [
        "-O2",
        "-g",
        "-fno-omit-frame-pointer",
        "-mno-omit-leaf-frame-pointer",
        "-pthread",
    ]
    .iter()
    .map(Into::into)
    .chain([source.into_os_string()])
    .collect();
    common::compile(&sim, &args);
    let trace = dir.path().join("demo.trace");
    let mut cmd = common::alloctrace_cmd(&["record", "--heap", "-o"]);
    cmd.arg(&trace).arg("--").arg(&sim).arg("8");
    let out = common::run("alloctrace record -- llm_server_sim 8", cmd);
    assert!(out.status.success(), "{out:?}");
    // "llm_server_sim: accepted N, served N requests; N sessions never freed (B bytes); ..."
    let said =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    let summary = said
        .lines()
        .find(|l| l.contains("sessions never freed"))
        .unwrap_or_else(|| panic!("no summary from the simulator: {said}"));
    let number_before = |word: &str| -> u64 {
        let at = summary.find(word).unwrap();
        let digits: String = summary[..at]
            .trim_end()
            .chars()
            .rev()
            .take_while(|c| c.is_ascii_digit())
            .collect();
        digits.chars().rev().collect::<String>().parse().unwrap()
    };
    let (sessions, bytes) = (number_before("sessions never"), number_before("bytes)"));

    let json = common::report_value(&trace);
    let leak = (json["stacks"].as_array().unwrap().iter())
        .find(|s| s["frames"][0] == "register_session")
        .unwrap_or_else(|| panic!("no register_session stack: {json:#}"));
    assert_eq!(
        (&leak["live_bytes"], &leak["live_count"]),
        (&serde_json::json!(bytes), &serde_json::json!(sessions)),
        "{summary}"
    );
    let suspects = json["suspects"]["stacks"].as_array().unwrap();
    assert_eq!(
        suspects[0]["frames"][0], "register_session",
        "{suspects:#?}"
    );
    // The tokenizer cache is bounded (it evicts at 2048 entries): flat once full.
    assert!(
        !(suspects.iter()).any(|s| s["frames"][0] == "tokenizer_cache_insert"),
        "{suspects:#?}"
    );
    assert_eq!(
        json["verdict"][0]["category"], "leaks",
        "{:#}",
        json["verdict"]
    );

    // The text report's first screen: the verdict, then the suspect named.
    let text = String::from_utf8_lossy(&view(&["report"], &trace)).into_owned();
    let first_screen: Vec<&str> = text.lines().take(24).collect();
    assert!(
        first_screen.iter().any(|l| l.starts_with("Verdict: leaks")),
        "{text}"
    );
    assert!(
        (first_screen.iter())
            .any(|l| l.trim_start().starts_with("1.") && l.contains("heap: register_session")),
        "{text}"
    );

    // The default flame graph: live memory, no thread-stack reservations in it; the leaks
    // graph (grown since the warm-up, still live) is register_session alone.
    let svg = |kind: &[&str]| {
        let path = dir.path().join("f.svg");
        let _ = std::fs::remove_file(&path);
        let args: Vec<&str> = [&["flamegraph"][..], kind, &["-o", path.to_str().unwrap()]].concat();
        view(&args, &trace);
        std::fs::read_to_string(&path).unwrap()
    };
    let live = svg(&[]);
    assert!(
        live.contains("register_session"),
        "no register_session in the live graph"
    );
    assert!(
        !live.contains("thread-stack"),
        "thread stacks in the default graph"
    );
    let leaks = svg(&["--kind", "leaks"]);
    let frames: Vec<&str> = leaks
        .split("<title>")
        .skip(1)
        .filter_map(|t| t.split(" (").next())
        .collect();
    assert!(frames.contains(&"register_session"), "{frames:?}");
    assert!(
        !frames
            .iter()
            .any(|f| ["kv_pool_grow", "tokenizer_cache_insert"].contains(f)),
        "{frames:?}"
    );
}
