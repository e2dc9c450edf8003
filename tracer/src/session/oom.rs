//! Telling an OOM kill from any other SIGKILL.
//!
//! The OOM killer names each victim in the kernel log ("Memory cgroup out of memory: Killed
//! process 1234 (name) ...") right after it sends the signal, before the victim can exit: read
//! from `/dev/kmsg`, from where the log stood when the recording started, it names the victim by
//! PID, whatever cgroup it had moved to. Where the kernel log cannot be read (a container
//! without `/dev/kmsg`), the oom_kill count of the process's memory cgroup tells instead
//! (`proc::cgroup`; the machine's count where it has none), which the kernel raises as it sends
//! the signal: a death by SIGKILL while that count rose. Each rise is attributed to one death, so
//! a group OOM kill of N traced processes names all N; but a `kill -9` right after an OOM kill of
//! an untraced process of the same cgroup is taken for one, and a process that moved to another
//! cgroup after it was first seen is judged by its first cgroup's count.

use std::{
    collections::{HashMap, HashSet},
    fs::File,
    io::{self, Read, Seek, SeekFrom},
    os::unix::fs::OpenOptionsExt,
    path::PathBuf,
    time::Duration,
};

use crate::proc::cgroup::{self, CgroupMounts};

/// Whether the OOM killer ended a process.
pub struct OomWitness {
    /// The kernel log from the start of the recording; None where it cannot be read.
    log: Option<KernelLog>,
    /// PIDs the kernel log named as OOM victims so far.
    victims: HashSet<u32>,
    /// Without the kernel log: the counts of the traced processes' memory cgroups.
    counts: Option<CgroupCounts>,
}

impl OomWitness {
    pub fn new() -> OomWitness {
        let log = KernelLog::open();
        let counts = log.is_none().then(CgroupCounts::new);
        OomWitness {
            log,
            victims: HashSet::new(),
            counts,
        }
    }

    /// A traced process, first seen.
    pub fn watch(&mut self, pid: u32) {
        if let Some(counts) = &mut self.counts {
            counts.watch(pid);
        }
    }

    /// Whether process `pid`, dead by SIGKILL, was killed by the OOM killer.
    pub fn was_oom_killed(&mut self, pid: u32) -> bool {
        let Some(log) = &mut self.log else {
            return self.counts.as_mut().is_some_and(|c| c.rose_for(pid));
        };
        // The log line precedes the victim's exit; one more look covers a log written from
        // another CPU a moment late.
        for attempt in 0..2 {
            if attempt > 0 {
                std::thread::sleep(Duration::from_millis(20));
            }
            log.read_victims(&mut self.victims);
            if self.victims.contains(&pid) {
                return true;
            }
        }
        false
    }
}

/// `/dev/kmsg`, one record per read, from the end it had when opened.
struct KernelLog {
    file: File,
}

impl KernelLog {
    fn open() -> Option<KernelLog> {
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open("/dev/kmsg")
            .ok()?;
        file.seek(SeekFrom::End(0)).ok()?;
        Some(KernelLog { file })
    }

    /// Adds the OOM victims named by the records logged since the last read.
    fn read_victims(&mut self, victims: &mut HashSet<u32>) {
        // A record is at most 8 KiB (the kernel's line limit plus its prefix).
        let mut record = vec![0u8; 8192];
        loop {
            match self.file.read(&mut record) {
                Ok(0) => return,
                Ok(n) => victims.extend(oom_victim(&String::from_utf8_lossy(&record[..n]))),
                // Records overwritten before we read them: reading goes on after them.
                Err(e) if e.raw_os_error() == Some(libc::EPIPE) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return, // EAGAIN: nothing more for now
            }
        }
    }
}

/// The PID an OOM kill record names: `PRIO,SEQ,USEC,FLAGS;... Killed process PID (NAME) ...`.
fn oom_victim(record: &str) -> Option<u32> {
    let (_, message) = record.split_once(';')?;
    let line = message.lines().next()?;
    let after = line.split_once("Killed process ")?.1;
    after.split(' ').next()?.parse().ok()
}

/// The oom_kill counts of memory cgroups, for a kernel log that cannot be read.
struct CgroupCounts {
    mounts: CgroupMounts,
    /// The counter file of each traced process, found when it was first seen.
    counter_of: HashMap<u32, PathBuf>,
    /// Per counter file: its count when first read, and the kills attributed since.
    counts: HashMap<PathBuf, (u64, u64)>,
}

impl CgroupCounts {
    fn new() -> CgroupCounts {
        CgroupCounts {
            mounts: CgroupMounts::read(),
            counter_of: HashMap::new(),
            counts: HashMap::new(),
        }
    }

    fn watch(&mut self, pid: u32) {
        let Ok(counter) = self.mounts.oom_counter_of(pid) else {
            return; // gone already
        };
        if !self.counts.contains_key(&counter)
            && let Some(base) = cgroup::read_oom_kills(&counter)
        {
            self.counts.insert(counter.clone(), (base, 0));
        }
        self.counter_of.insert(pid, counter);
    }

    /// Whether the count of `pid`'s memory cgroup rose by a kill not yet attributed.
    fn rose_for(&mut self, pid: u32) -> bool {
        let Some(counter) = self.counter_of.get(&pid) else {
            return false;
        };
        let (Some((base, attributed)), Some(now)) = (
            self.counts.get_mut(counter),
            cgroup::read_oom_kills(counter),
        ) else {
            return false;
        };
        if now > *base + *attributed {
            *attributed += 1;
            return true;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_victims_of_oom_kill_records_only() {
        let memcg = "3,467,4867413955,-;Memory cgroup out of memory: Killed process 1531 (hog) \
                     total-vm:35372kB, anon-rss:32640kB, file-rss:856kB, shmem-rss:0kB, UID:0 \
                     pgtables:108kB oom_score_adj:0\n";
        let global =
            "3,12,99,-;Out of memory: Killed process 77 (a b) total-vm:1kB\n SUBSYSTEM=x\n";
        assert_eq!(oom_victim(memcg), Some(1531));
        assert_eq!(oom_victim(global), Some(77));
        for other in [
            "6,466,4867413923,-;oom-kill:constraint=CONSTRAINT_MEMCG,task=hog,pid=1531,uid=0\n",
            "6,470,4867414000,-;oom_reaper: reaped process 1531 (hog), now anon-rss:0kB\n",
            "4,1,2,-;uprobe: alloctrace:23470 failed to unregister, leaking uprobe\n",
            "no prefix: Killed process 5 (x)",
        ] {
            assert_eq!(oom_victim(other), None, "{other}");
        }
    }

    #[test]
    fn without_the_kernel_log_a_rise_of_the_cgroup_count_tells_one_death_each() {
        let dir = tempfile::tempdir().unwrap();
        let counter = dir.path().join("memory.events");
        std::fs::write(&counter, "oom 0\noom_kill 4\n").unwrap();
        let mut counts = CgroupCounts::new();
        for pid in [10, 11, 12] {
            counts.counter_of.insert(pid, counter.clone());
        }
        counts.counts.insert(counter.clone(), (4, 0));
        assert!(!counts.rose_for(10), "no rise yet");
        std::fs::write(&counter, "oom 1\noom_kill 5\n").unwrap();
        assert!(counts.rose_for(11));
        // The one rise is spent.
        assert!(!counts.rose_for(12));
        assert!(!counts.rose_for(13), "a process never seen");
    }
}
