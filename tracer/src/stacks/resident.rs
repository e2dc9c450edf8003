//! The file pages naming and unwinding leave resident in the tracer.
//!
//! Symbols (blazesym) and unwind sections (`unwind::cfi`) are read through read-only mappings of
//! the target's files. Each page touched stays mapped, and the kernel maps its already-cached
//! neighbours with it (fault-around: 64 KiB per fault, whatever `MADV_RANDOM` says): a few
//! hundred names looked up in libtorch's 74 MiB string table left 57 MB of it in the tracer's
//! RSS. The pages are the page cache's, clean and shared with the target, but RSS is what a node's
//! monitoring and the OOM killer weigh. Once a tick has named its stacks, those pages are
//! unmapped from the tracer (`MADV_DONTNEED`: the mapping stays, the cache keeps the data, the
//! next lookup faults them back in).

use std::fs;

/// A read-only shared file mapping (how blazesym and `unwind::cfi` map files; a shared mapping
/// holds no private copy-on-write data) that is not one of the tracer's own objects.
fn is_read_only_data_file(perms: &str, path: &str, own_objects: &[&str]) -> bool {
    perms == "r--s" && path.starts_with('/') && !own_objects.contains(&path)
}

/// Unmaps the resident pages of the files the tracer reads symbols and unwind tables through:
/// every read-only shared file mapping whose file is not one of the tracer's own loaded objects
/// (those have an executable mapping). Returns the bytes of mappings released.
pub fn release_file_pages() -> u64 {
    let Ok(maps) = fs::read_to_string("/proc/self/maps") else {
        return 0;
    };
    let lines: Vec<Vec<&str>> = maps
        .lines()
        .map(|l| l.splitn(6, ' ').map(str::trim).collect())
        .filter(|f: &Vec<&str>| f.len() == 6)
        .collect();
    let own_objects: Vec<&str> = lines
        .iter()
        .filter(|f| f[1].contains('x'))
        .map(|f| f[5])
        .collect();
    let mut released = 0;
    for f in &lines {
        if !is_read_only_data_file(f[1], f[5], &own_objects) {
            continue;
        }
        let Some((start, end)) = f[0].split_once('-') else {
            continue;
        };
        let (Ok(start), Ok(end)) = (
            usize::from_str_radix(start, 16),
            usize::from_str_radix(end, 16),
        ) else {
            continue;
        };
        // SAFETY: a read-only file mapping of this process, as /proc/self/maps lists it now:
        // MADV_DONTNEED only drops its page-table entries, and the next read of any byte of it
        // faults the same file contents back in (nothing was written to it).
        if unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED) }
            == 0
        {
            released += (end - start) as u64;
        }
    }
    released
}

#[cfg(test)]
mod tests {
    use std::{io::Write, os::unix::fs::FileExt};

    use super::*;

    fn rss_of_range(start: usize) -> u64 {
        let smaps = fs::read_to_string("/proc/self/smaps").unwrap();
        let mut inside = false;
        for line in smaps.lines() {
            if let Some((range, _)) = line.split_once(' ')
                && let Some((s, _)) = range.split_once('-')
                && let Ok(s) = usize::from_str_radix(s, 16)
            {
                inside = s == start;
                continue;
            }
            if inside && let Some(kb) = line.strip_prefix("Rss:") {
                return kb
                    .trim()
                    .trim_end_matches(" kB")
                    .trim()
                    .parse::<u64>()
                    .unwrap()
                    << 10;
            }
        }
        panic!("no mapping at {start:#x}");
    }

    /// A file read through a mapping is resident after the reads and not after the release;
    /// its bytes read the same afterwards.
    #[test]
    fn read_file_pages_are_released_and_read_back_the_same() {
        let mut file = tempfile::tempfile().unwrap();
        let data: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 251) as u8).collect();
        file.write_all(&data).unwrap();
        let mut check = [0u8; 1];
        file.read_exact_at(&mut check, 4096).unwrap();
        // SAFETY: a read-only mapping of a private temporary file nobody else writes.
        let map = unsafe { memmap2::Mmap::map(&file) }.unwrap();
        let touched: u64 = map.iter().step_by(4096).map(|&b| u64::from(b)).sum();
        let start = map.as_ptr() as usize;
        assert_eq!(rss_of_range(start), 1 << 20, "every page was read");
        assert!(release_file_pages() >= 1 << 20);
        assert_eq!(rss_of_range(start), 0, "released");
        let again: u64 = map.iter().step_by(4096).map(|&b| u64::from(b)).sum();
        assert_eq!(touched, again);
        assert_eq!(&map[..], &data[..]);
    }

    #[test]
    fn only_read_only_data_files_that_are_not_the_tracers_own_are_released() {
        let own = ["/usr/lib/libc.so.6"];
        assert!(is_read_only_data_file("r--s", "/lib/libtorch.so", &own));
        assert!(!is_read_only_data_file("r--p", "/lib/libtorch.so", &own));
        assert!(!is_read_only_data_file("r--s", "/usr/lib/libc.so.6", &own));
        assert!(!is_read_only_data_file("rw-p", "/lib/libtorch.so", &own));
        assert!(!is_read_only_data_file("r-xp", "/lib/libtorch.so", &own));
        assert!(!is_read_only_data_file("r--s", "[vvar]", &own));
        assert!(!is_read_only_data_file("r--s", "", &own));
    }
}
