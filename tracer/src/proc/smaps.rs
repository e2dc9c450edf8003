//! `/proc/PID/smaps`: resident memory per mapping (page-table walks, exact).

use super::{ProcError, kib_value, read_text};

/// What /proc/PID/smaps says: `(start, end, Rss bytes)` of every VMA, and the exact resident and
/// anonymous totals (page-table walks; /proc/PID/status's counters are per-CPU approximations
/// that can be off by megabytes on a busy machine).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Smaps {
    pub vmas: Vec<(u64, u64, u64)>,
    pub rss: u64,
    pub anon: u64,
}

/// Parses the text of `/proc/PID/smaps`; lines it cannot read are skipped (an unreadable size
/// counts as 0).
pub fn parse_smaps(text: &str) -> Smaps {
    let mut out = Smaps::default();
    let mut current: Option<(u64, u64)> = None;
    for line in text.lines() {
        if let Some(rss) = line.strip_prefix("Rss:") {
            let rss = kib_value(rss).unwrap_or(0);
            // Saturating: a forged file's sum need not fit (the kernel's always does).
            out.rss = out.rss.saturating_add(rss);
            if let Some((start, end)) = current.take() {
                out.vmas.push((start, end, rss));
            }
        } else if let Some(anon) = line.strip_prefix("Anonymous:") {
            out.anon = out.anon.saturating_add(kib_value(anon).unwrap_or(0));
        } else if let Some(range) = vma_range(line) {
            current = Some(range);
        }
    }
    out
}

/// The address range of a VMA header line (`start-end perms offset dev inode path`).
fn vma_range(line: &str) -> Option<(u64, u64)> {
    let (range, _) = line.split_once(' ')?;
    let (start, end) = range.split_once('-')?;
    Some((
        u64::from_str_radix(start, 16).ok()?,
        u64::from_str_radix(end, 16).ok()?,
    ))
}

/// The smaps of process `pid`.
pub fn read_smaps(pid: u32) -> Result<Smaps, ProcError> {
    read_text(pid, "smaps").map(|text| parse_smaps(&text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_vmas_and_totals() {
        let text = "\
00400000-00401000 r-xp 00000000 fe:01 12 /usr/bin/cat
Size:                  4 kB
Rss:                   4 kB
Anonymous:             0 kB
VmFlags: rd ex mr mw me
7f0000000000-7f0000021000 rw-p 00000000 00:00 0
Size:                132 kB
Rss:                  12 kB
Anonymous:            12 kB
";
        assert_eq!(
            parse_smaps(text),
            Smaps {
                vmas: vec![
                    (0x400000, 0x401000, 4096),
                    (0x7f0000000000, 0x7f0000021000, 12 << 10)
                ],
                rss: 16 << 10,
                anon: 12 << 10,
            }
        );
    }

    #[test]
    fn totals_that_would_overflow_saturate() {
        // Two huge VMAs overflowed the sums (a forged smaps file; in the proc_parsers corpus).
        let huge = "Rss: 18014398509481983 kB\nAnonymous: 18014398509481983 kB\n";
        let text = format!("1000-2000 rw-p 0 00:00 0\n{huge}2000-3000 rw-p 0 00:00 0\n{huge}");
        let smaps = parse_smaps(&text);
        assert_eq!((smaps.rss, smaps.anon), (u64::MAX, u64::MAX));
        assert_eq!(smaps.vmas[1], (0x2000, 0x3000, u64::MAX - 1023));
    }

    #[test]
    fn skips_malformed_lines() {
        let text = "\
zz-00401000 r-xp 00000000 fe:01 12 /x
Rss:                   4 kB
1000-2000 rw-p 0 00:00 0
Rss:                  many kB
Anonymous:
2000-3000
Rss: 8 kB
";
        // The first Rss has no VMA (bad header); the second is unreadable (0); the third's
        // header has no space after the range.
        assert_eq!(
            parse_smaps(text),
            Smaps {
                vmas: vec![(0x1000, 0x2000, 0)],
                rss: 12 << 10,
                anon: 0,
            }
        );
        assert_eq!(parse_smaps(""), Smaps::default());
    }
}
