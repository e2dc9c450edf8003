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
//!
//! A file read through a mapping can also be truncated under it by whoever may write it (a
//! target's own library in its virtual environment): touching a page past the new end raises
//! SIGBUS, which would kill the recorder. `guard_truncated_files` maps a page of zeros there
//! instead: the reader sees zeros (a section that does not parse, a name that does not decode)
//! and the recording goes on; `truncated_pages` counts them.

use std::{
    fs,
    sync::atomic::{AtomicU64, Ordering},
};

use crate::model::PAGE;

/// `si_code` of a SIGBUS for an address past the end of a mapped file (Linux's
/// `asm-generic/siginfo.h`; the libc crate does not export it for Linux).
const BUS_ADRERR: libc::c_int = 2;

static TRUNCATED_PAGES: AtomicU64 = AtomicU64::new(0);

/// Pages of files truncated under the recorder's mappings that read as zeros since start.
pub fn truncated_pages() -> u64 {
    TRUNCATED_PAGES.load(Ordering::Relaxed)
}

/// Installs the SIGBUS handler that maps zeros over a page of a truncated file.
pub fn guard_truncated_files() {
    // SAFETY: a sigaction with a handler that only makes async-signal-safe calls (mmap, signal)
    // and an atomic add.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_sigbus as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut action.sa_mask);
        libc::sigaction(libc::SIGBUS, &action, std::ptr::null_mut());
    }
}

extern "C" fn on_sigbus(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo to an SA_SIGINFO handler.
    let (code, addr) = unsafe { ((*info).si_code, (*info).si_addr() as usize) };
    if code == BUS_ADRERR {
        let page = addr & !(PAGE as usize - 1);
        // SAFETY: replaces one page of a file mapping whose file no longer reaches it with a
        // private page of zeros; the faulting read then completes on it.
        let mapped = unsafe {
            libc::mmap(
                page as *mut libc::c_void,
                PAGE as usize,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        if mapped != libc::MAP_FAILED {
            TRUNCATED_PAGES.fetch_add(1, Ordering::Relaxed);
            return;
        }
    }
    // Not a truncated file: the default action, when the access repeats on return.
    // SAFETY: signal() is async-signal-safe.
    unsafe { libc::signal(libc::SIGBUS, libc::SIG_DFL) };
}

/// A read-only shared file mapping (how blazesym and `unwind::cfi` map files; a shared mapping
/// holds no private copy-on-write data) that is not one of the tracer's own objects.
fn is_read_only_data_file(perms: &str, path: &str, own_objects: &[&str]) -> bool {
    perms == "r--s" && path.starts_with('/') && !own_objects.contains(&path)
}

/// Gives the kernel back the heap pages the recorder freed. mimalloc keeps freed pages for a
/// moment to reuse them and purges them only when a later call of its own comes round to it:
/// after torch's import, 87 MB of the recorder's anonymous memory stayed resident for about
/// 20 s where 68 MB was left once purged. Once a tick.
pub fn release_freed_heap() {
    // SAFETY: mi_collect has no preconditions; forced, it purges the calling thread's free
    // pages and the arenas' delayed purges.
    unsafe { libmimalloc_sys::mi_collect(true) };
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

    /// A file truncated under its mapping reads as zeros past its new end; the process lives.
    #[test]
    fn a_file_truncated_under_its_mapping_reads_as_zeros() {
        guard_truncated_files();
        let file = tempfile::tempfile().unwrap();
        file.set_len(4 * PAGE).unwrap();
        file.write_all_at(&[7u8; 4 * PAGE as usize], 0).unwrap();
        // SAFETY: a read-only mapping of a private temporary file; its truncation is the test.
        let map = unsafe { memmap2::Mmap::map(&file) }.unwrap();
        assert_eq!(map[PAGE as usize], 7);
        let before = truncated_pages();
        file.set_len(PAGE).unwrap();
        assert_eq!(map[0], 7, "still in the file");
        assert_eq!(map[2 * PAGE as usize + 5], 0, "past the end: zeros");
        assert_eq!(map[3 * PAGE as usize], 0);
        assert_eq!(truncated_pages() - before, 2);
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
