//! `/proc/PID/cgroup` with `/proc/self/mountinfo`: the file that counts the OOM kills of a
//! process's memory cgroup. The kernel counts an OOM kill in the victim's memory cgroup, whether
//! the cgroup's limit or the whole machine ran out: `oom_kill` in cgroup v2's `memory.events`, in
//! cgroup v1's `memory.oom_control`. Where a process has no such file (no memory controller, the
//! v2 root cgroup), `/proc/vmstat` counts every OOM kill of the machine.

use std::path::{Path, PathBuf};

use super::{ProcError, read_text};

/// The machine-wide count, the fallback.
const VMSTAT: &str = "/proc/vmstat";

/// Where the cgroup hierarchies that have memory counters are mounted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CgroupMounts {
    /// The cgroup v2 (unified) hierarchy: (its root, where it is mounted).
    v2: Option<(String, PathBuf)>,
    /// The cgroup v1 hierarchy with the memory controller: (its root, where it is mounted).
    v1_memory: Option<(String, PathBuf)>,
}

impl CgroupMounts {
    /// This process's view of the cgroup mounts; none when mountinfo is unreadable.
    pub fn read() -> CgroupMounts {
        std::fs::read_to_string("/proc/self/mountinfo")
            .map(|text| parse_mountinfo(&text))
            .unwrap_or_default()
    }

    /// The file counting the OOM kills of process `pid`'s memory cgroup (`/proc/vmstat` when it
    /// has none).
    pub fn oom_counter_of(&self, pid: u32) -> Result<PathBuf, ProcError> {
        let text = read_text(pid, "cgroup")?;
        Ok(self
            .counter_in(&text, Path::exists)
            .unwrap_or_else(|| PathBuf::from(VMSTAT)))
    }

    /// The counter file named by the text of `/proc/PID/cgroup`: v1's memory controller first
    /// (where it is mounted, v2 has no memory controller), then v2's `memory.events`; `exists`
    /// says whether a file is there (the v2 root cgroup has none).
    fn counter_in(&self, cgroup: &str, exists: impl Fn(&Path) -> bool) -> Option<PathBuf> {
        for line in cgroup.lines() {
            let mut parts = line.splitn(3, ':');
            let (Some(_), Some(controllers), Some(path)) =
                (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            let (mount, file) = if controllers.split(',').any(|c| c == "memory") {
                (self.v1_memory.as_ref(), "memory.oom_control")
            } else if controllers.is_empty() {
                (self.v2.as_ref(), "memory.events")
            } else {
                continue;
            };
            if let Some(counter) = mount.map(|(root, at)| under_mount(root, at, path).join(file))
                && exists(&counter)
            {
                return Some(counter);
            }
        }
        None
    }
}

/// Where cgroup `path` is, in a hierarchy whose `root` is mounted `at` (a mount of a sub-tree
/// shows the paths below its root).
fn under_mount(root: &str, at: &Path, path: &str) -> PathBuf {
    let below = path
        .strip_prefix(root.trim_end_matches('/'))
        .unwrap_or(path);
    at.join(below.trim_start_matches('/'))
}

/// The cgroup mounts of a mountinfo text: `ID PARENT DEV ROOT POINT OPTIONS [TAGS...] - TYPE
/// SOURCE SUPER_OPTIONS`.
pub fn parse_mountinfo(text: &str) -> CgroupMounts {
    let mut mounts = CgroupMounts::default();
    for line in text.lines() {
        let Some((before, after)) = line.split_once(" - ") else {
            continue;
        };
        let fields: Vec<&str> = before.split(' ').collect();
        let rest: Vec<&str> = after.split(' ').collect();
        let (Some(root), Some(point), Some(fstype)) = (fields.get(3), fields.get(4), rest.first())
        else {
            continue;
        };
        let mount = Some((unescape(root), PathBuf::from(unescape(point))));
        let super_options = rest.get(2).copied().unwrap_or("");
        match *fstype {
            "cgroup2" if mounts.v2.is_none() => mounts.v2 = mount,
            "cgroup"
                if mounts.v1_memory.is_none()
                    && super_options.split(',').any(|o| o == "memory") =>
            {
                mounts.v1_memory = mount
            }
            _ => {}
        }
    }
    mounts
}

/// A mountinfo field with its octal escapes (`\040` for a space) decoded.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| bytes[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match octal {
            Some(d) => {
                let value = d.iter().fold(0u32, |v, c| v * 8 + u32::from(c - b'0'));
                out.push(value as u8);
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The `oom_kill N` count of a counter file (`memory.events`, `memory.oom_control`,
/// `/proc/vmstat`); None when unreadable.
pub fn read_oom_kills(counter: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(counter).ok()?;
    parse_oom_kills(&text)
}

fn parse_oom_kills(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|line| line.strip_prefix("oom_kill "))
        .and_then(|n| n.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime shared:9 - cgroup2 cgroup2 rw
";

    #[test]
    fn finds_the_cgroup_mounts() {
        let m = parse_mountinfo(HYBRID);
        assert_eq!(
            m.v1_memory,
            Some(("/".into(), PathBuf::from("/sys/fs/cgroup/memory")))
        );
        assert_eq!(
            m.v2,
            Some(("/".into(), PathBuf::from("/sys/fs/cgroup/unified")))
        );
        let escaped = "9 1 0:5 /ctr /sys/fs/my\\040cgroup rw - cgroup2 cgroup2 rw\n";
        assert_eq!(
            parse_mountinfo(escaped).v2,
            Some(("/ctr".into(), PathBuf::from("/sys/fs/my cgroup")))
        );
        assert_eq!(
            parse_mountinfo("garbage\n\n1 2 3\n"),
            CgroupMounts::default()
        );
    }

    #[test]
    fn counter_is_v1_memory_first_then_v2_then_none() {
        let m = parse_mountinfo(HYBRID);
        let all = |_: &Path| true;
        let cgroup = "4:memory:/process_api/abc\n0::/user.slice\n";
        assert_eq!(
            m.counter_in(cgroup, all),
            Some(PathBuf::from(
                "/sys/fs/cgroup/memory/process_api/abc/memory.oom_control"
            ))
        );
        assert_eq!(
            m.counter_in("0::/user.slice/x\n", all),
            Some(PathBuf::from(
                "/sys/fs/cgroup/unified/user.slice/x/memory.events"
            ))
        );
        // The v2 root cgroup has no memory.events.
        let none = |_: &Path| false;
        assert_eq!(m.counter_in("0::/\n", none), None);
        assert_eq!(m.counter_in("not a cgroup file", all), None);
    }

    #[test]
    fn a_mount_of_a_sub_tree_shows_paths_below_its_root() {
        let m = parse_mountinfo("5 1 0:9 /docker/c1 /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n");
        assert_eq!(
            m.counter_in("0::/docker/c1/app\n", |_: &Path| true),
            Some(PathBuf::from("/sys/fs/cgroup/app/memory.events"))
        );
    }

    #[test]
    fn reads_oom_kill_counts() {
        let v1 = "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n";
        let v2 = "low 0\nhigh 0\nmax 12\noom 2\noom_kill 2\noom_group_kill 0\n";
        assert_eq!(parse_oom_kills(v1), Some(3));
        assert_eq!(parse_oom_kills(v2), Some(2));
        assert_eq!(parse_oom_kills("oom_kill_disable 0\n"), None);
        // This machine's own counters read.
        assert!(read_oom_kills(Path::new(VMSTAT)).is_some());
        let own = CgroupMounts::read().oom_counter_of(std::process::id());
        assert!(read_oom_kills(&own.unwrap()).is_some());
    }
}
