//! `/proc/PID/status`: the kernel's memory counters of a process.

use super::{ProcError, kib_value, read_text};

/// The memory counters of `/proc/PID/status`, in bytes (0 when absent or unreadable). The
/// resident counters are per-CPU approximations (see `smaps` for exact figures); the
/// shared-memory split and swap only status has.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryStatus {
    /// VmHWM: peak resident memory.
    pub peak_rss: u64,
    /// VmRSS: resident memory.
    pub rss: u64,
    /// RssAnon, RssFile, RssShmem: the three parts of `rss`.
    pub rss_anon: u64,
    pub rss_file: u64,
    pub rss_shmem: u64,
    /// VmSwap: swapped-out anonymous memory.
    pub swap: u64,
}

/// Parses the text of `/proc/PID/status`; lines it does not know or cannot read are skipped.
pub fn parse_status(text: &str) -> MemoryStatus {
    let mut status = MemoryStatus::default();
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let field = match key {
            "VmHWM" => &mut status.peak_rss,
            "VmRSS" => &mut status.rss,
            "RssAnon" => &mut status.rss_anon,
            "RssFile" => &mut status.rss_file,
            "RssShmem" => &mut status.rss_shmem,
            "VmSwap" => &mut status.swap,
            _ => continue,
        };
        *field = kib_value(value).unwrap_or(0);
    }
    status
}

/// The memory counters of process `pid`.
pub fn read_status(pid: u32) -> Result<MemoryStatus, ProcError> {
    read_text(pid, "status").map(|text| parse_status(&text))
}

/// The memory counters of this process.
pub fn own_status() -> Result<MemoryStatus, ProcError> {
    read_status(std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_memory_counters() {
        let text = "Name:\tcat\nUmask:\t0022\nVmHWM:\t    2048 kB\nVmRSS:\t    1024 kB\n\
                    RssAnon:\t     100 kB\nRssFile:\t     900 kB\nRssShmem:\t      24 kB\n\
                    VmSwap:\t       8 kB\nThreads:\t1\n";
        assert_eq!(
            parse_status(text),
            MemoryStatus {
                peak_rss: 2048 << 10,
                rss: 1024 << 10,
                rss_anon: 100 << 10,
                rss_file: 900 << 10,
                rss_shmem: 24 << 10,
                swap: 8 << 10,
            }
        );
    }

    #[test]
    fn skips_malformed_lines() {
        let text = "VmHWM\t2048 kB\nVmRSS:\tlots kB\nRssShmem:\n:\n\n\u{0}\nVmSwap:\t4 kB";
        assert_eq!(
            parse_status(text),
            MemoryStatus {
                swap: 4 << 10,
                ..MemoryStatus::default()
            }
        );
        assert_eq!(parse_status(""), MemoryStatus::default());
    }

    #[test]
    fn reads_its_own_status() {
        let own = own_status().expect("own /proc/PID/status");
        assert!(own.peak_rss >= own.rss && own.rss > 0, "{own:?}");
    }
}
