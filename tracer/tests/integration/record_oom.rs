//! A target the OOM killer ends: the recording names the death (PID, signal, OOM kill), the
//! report opens on it, and `alloctrace record -- CMD` exits as the command did. The command runs
//! in a memory cgroup of its own with a small limit (cgroup v2's `memory.max` where the memory
//! controller is on the unified hierarchy, v1's `memory.limit_in_bytes` where it is not).
//! Privileged: needs root, eBPF and cgroups.

use std::path::PathBuf;

use crate::common::{alloctrace_cmd, fixture, report_value, run};

/// The limit of the test's cgroup.
const LIMIT_MIB: u64 = 32;

/// A memory cgroup with a limit, removed when dropped.
struct MemoryCgroup {
    dir: PathBuf,
}

impl MemoryCgroup {
    /// Creates `alloctrace-test-PID` under the root of the hierarchy that has the memory
    /// controller, limited to `LIMIT_MIB`, without swap.
    fn create() -> MemoryCgroup {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let Some((root, v2)) = memory_hierarchy(&mountinfo) else {
            panic!("no memory cgroup hierarchy is mounted:\n{mountinfo}");
        };
        let (limit, no_swap) = if v2 {
            ("memory.max", ("memory.swap.max", "0"))
        } else {
            ("memory.limit_in_bytes", ("memory.swappiness", "0"))
        };
        let dir = root.join(format!("alloctrace-test-{}", std::process::id()));
        std::fs::create_dir(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        let cgroup = MemoryCgroup { dir };
        let write = |file: &str, value: &str| {
            let path = cgroup.dir.join(file);
            std::fs::write(&path, value)
                .unwrap_or_else(|e| panic!("write {value} to {}: {e}", path.display()));
        };
        write(limit, &(LIMIT_MIB << 20).to_string());
        // Present only with swap accounting; without, there is no swap to limit.
        if cgroup.dir.join(no_swap.0).exists() {
            write(no_swap.0, no_swap.1);
        }
        cgroup
    }

    fn procs(&self) -> PathBuf {
        self.dir.join("cgroup.procs")
    }
}

impl Drop for MemoryCgroup {
    fn drop(&mut self) {
        // Empty once its process is reaped: a few tries while the kernel lets go of it.
        for _ in 0..100 {
            if std::fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

/// Where to make a memory cgroup: (the mount point, whether it is cgroup v2). v2 when the unified
/// hierarchy has the memory controller, else the v1 hierarchy that has it.
fn memory_hierarchy(mountinfo: &str) -> Option<(PathBuf, bool)> {
    let mut v1 = None;
    for line in mountinfo.lines() {
        let Some((before, after)) = line.split_once(" - ") else {
            continue;
        };
        let Some(point) = before.split(' ').nth(4).map(PathBuf::from) else {
            continue;
        };
        let mut rest = after.split(' ');
        match (rest.next(), rest.nth(1)) {
            (Some("cgroup2"), _) => {
                let controllers =
                    std::fs::read_to_string(point.join("cgroup.controllers")).unwrap_or_default();
                if controllers.split_whitespace().any(|c| c == "memory") {
                    let _ = std::fs::write(point.join("cgroup.subtree_control"), "+memory");
                    return Some((point, true));
                }
            }
            (Some("cgroup"), Some(options)) if options.split(',').any(|o| o == "memory") => {
                v1 = Some((point, false));
            }
            _ => {}
        }
    }
    v1
}

/// `lifecycle_fixture oom MIB`'s 1 MiB blocks: glibc maps each with a page of header.
const BLOCK_MAPPING: u64 = (1 << 20) + 4096;

/// The live mappings of `grow` in the JSON report `v`, asserted to be whole blocks; how many.
/// (Named: it grew for over a second, and stacks are named once a second.)
fn grown_blocks(v: &serde_json::Value) -> u64 {
    let grown: Vec<&serde_json::Value> = v["stacks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["class"] == "mmap" && s["frames"].to_string().contains("\"grow\""))
        .collect();
    let (bytes, blocks): (u64, u64) = grown.iter().fold((0, 0), |(b, n), s| {
        (
            b + s["live_bytes"].as_u64().unwrap(),
            n + s["live_count"].as_u64().unwrap(),
        )
    });
    assert_eq!(bytes, blocks * BLOCK_MAPPING, "{grown:?}");
    blocks
}

#[test]
fn an_oom_killed_command_is_stored_exited_as_and_opens_the_report() {
    require_privileges!();
    let cgroup = MemoryCgroup::create();
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("oom.trace");
    // The fixture moves itself into the cgroup: alloctrace stays outside the limit.
    let mut cmd = alloctrace_cmd(&["record", "-o"]);
    cmd.arg(&trace)
        .arg("--")
        .arg(fixture("lifecycle_fixture"))
        .args(["oom", &(4 * LIMIT_MIB).to_string()])
        .arg(cgroup.procs());
    let out = run("alloctrace record -- oom fixture", cmd);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // As a shell reports a command SIGKILL ended: 128 + 9.
    assert_eq!(out.status.code(), Some(137), "{stderr}");
    assert!(
        stderr.contains("target ended: killed by SIGKILL (the OOM killer)"),
        "{stderr}"
    );

    // The PID alloctrace launched, as it said when it attached.
    let pid: u64 = stderr
        .lines()
        .find_map(|l| l.strip_prefix("attached to PID "))
        .and_then(|rest| rest.split(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no `attached to PID` line:\n{stderr}"));
    let v = report_value(&trace);
    assert_eq!(v["target"]["pids"][0], pid);
    let exit = &v["target_exit"];
    assert_eq!(exit["pid"], pid, "{exit}");
    assert_eq!(exit["signal"], "SIGKILL", "{exit}");
    assert_eq!(exit["oom_kill"], true, "{exit}");
    assert_eq!(exit["stopped_by_alloctrace"], false, "{exit}");
    assert_eq!(v["complete"], true);

    // The final ledger holds what it grew, block by block, until the limit.
    let blocks = grown_blocks(&v);
    assert!(
        (LIMIT_MIB / 4..=LIMIT_MIB).contains(&blocks),
        "{blocks} blocks of 1 MiB under a {LIMIT_MIB} MiB limit"
    );

    let mut cmd = alloctrace_cmd(&["report"]);
    cmd.arg(&trace);
    let text = String::from_utf8_lossy(&run("alloctrace report", cmd).stdout).into_owned();
    let t_s = exit["t_s"].as_f64().unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines[..2],
        [
            format!("Target process {pid} was killed by the OOM killer at {t_s:.1} s.").as_str(),
            "The final ledger and the last seconds before its death follow (the OOM flight \
             recorder).",
        ],
        "{text}"
    );
}
