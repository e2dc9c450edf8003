//! `/proc/PID/stat`: a process's state, parent, flags, start time, program-break start and, once
//! it has exited, its wait status.

use super::{ProcError, read_text};

/// `PF_KTHREAD` in /proc/PID/stat's flags field.
const PF_KTHREAD: u64 = 0x0020_0000;

/// The fields of `/proc/PID/stat` the session reads.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stat {
    /// Field 3: `R`, `S`, ..., `Z` (zombie), `X` (dead); empty when unreadable.
    pub state: String,
    /// Field 4: the parent's PID (0 when unreadable).
    pub ppid: u32,
    /// Field 9: the `PF_*` flags (0 when unreadable).
    pub flags: u64,
    /// Field 22: when the process started, in clock ticks since boot; with the PID, it names
    /// one process across PID reuse.
    pub start_time: Option<u64>,
    /// Field 47: where the program break started.
    pub start_brk: Option<u64>,
    /// Field 52: the wait status (`waitpid`'s encoding), meaningful once the process is a zombie.
    pub exit_code: Option<i32>,
    /// Fields 14 and 15: CPU time in user and kernel mode of all its threads, in clock ticks.
    pub cpu_ticks: Option<u64>,
}

impl Stat {
    /// Whether the process has exited (a zombie not reaped yet, or dead). For a thread-group
    /// leader this is its main thread: other threads may still run (`proc::other_threads`).
    pub fn has_exited(&self) -> bool {
        self.state == "Z" || self.state == "X"
    }

    pub fn is_kernel_thread(&self) -> bool {
        self.flags & PF_KTHREAD != 0
    }
}

/// Parses the text of `/proc/PID/stat`. Fields are counted after the parenthesized command name
/// (which may hold spaces and parentheses itself); missing or unreadable fields stay empty.
pub fn parse_stat(text: &str) -> Stat {
    let after_comm = text.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    // Field N of the manual is fields[N - 3].
    let field = |n: usize| fields.get(n - 3);
    Stat {
        state: field(3).map(|s| s.to_string()).unwrap_or_default(),
        ppid: field(4).and_then(|f| f.parse().ok()).unwrap_or(0),
        flags: field(9).and_then(|f| f.parse().ok()).unwrap_or(0),
        start_time: field(22).and_then(|f| f.parse().ok()),
        start_brk: field(47).and_then(|f| f.parse().ok()),
        exit_code: field(52).and_then(|f| f.parse().ok()),
        cpu_ticks: field(14)
            .and_then(|f| f.parse::<u64>().ok())
            .zip(field(15).and_then(|f| f.parse::<u64>().ok()))
            .map(|(user, system)| user.saturating_add(system)),
    }
}

/// The stat of process `pid`.
pub fn read_stat(pid: u32) -> Result<Stat, ProcError> {
    read_text(pid, "stat").map(|text| parse_stat(&text))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stat line with `comm`, state, flags and start_brk; other fields are counters (field N
    /// holds N: ppid 4, utime 14, stime 15, start time 22, exit code 52).
    fn line(comm: &str, state: &str, flags: u64, start_brk: u64) -> String {
        let mut fields: Vec<String> = (3..=52).map(|n| n.to_string()).collect();
        fields[0] = state.to_string();
        fields[6] = flags.to_string();
        fields[44] = start_brk.to_string();
        format!("1234 ({comm}) {}\n", fields.join(" "))
    }

    #[test]
    fn parses_state_flags_and_start_brk() {
        let stat = parse_stat(&line("a) (b", "S", 0x40_0100, 0x5555_0000));
        assert_eq!(
            stat,
            Stat {
                state: "S".into(),
                ppid: 4,
                flags: 0x40_0100,
                start_time: Some(22),
                start_brk: Some(0x5555_0000),
                exit_code: Some(52),
                cpu_ticks: Some(14 + 15),
            }
        );
        assert!(!stat.has_exited() && !stat.is_kernel_thread());
        assert!(parse_stat(&line("x", "Z", 0, 0)).has_exited());
        assert!(parse_stat(&line("x", "X", 0, 0)).has_exited());
        assert!(parse_stat(&line("kthreadd", "S", PF_KTHREAD | 0x40, 0)).is_kernel_thread());
    }

    /// Found by the fuzzer: fields are the file's, whatever they hold.
    #[test]
    fn cpu_time_past_u64_saturates() {
        let mut fields: Vec<String> = (3..=52).map(|n| n.to_string()).collect();
        fields[11] = u64::MAX.to_string();
        fields[12] = u64::MAX.to_string();
        let stat = parse_stat(&format!("1 (x) {}", fields.join(" ")));
        assert_eq!(stat.cpu_ticks, Some(u64::MAX));
    }

    #[test]
    fn malformed_text_leaves_fields_empty() {
        assert_eq!(parse_stat(""), Stat::default());
        assert_eq!(parse_stat("1234 no parenthesis S 1 2 3"), Stat::default());
        assert_eq!(
            parse_stat("1 (short) R 1 2 3 4 5 notanumber"),
            Stat {
                state: "R".into(),
                ppid: 1,
                flags: 0,
                start_time: None,
                start_brk: None,
                exit_code: None,
                cpu_ticks: None,
            }
        );
    }
}
