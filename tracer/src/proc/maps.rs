//! `/proc/PID/maps`: the file-backed mappings of a process, and a path to open each one from here.

use std::path::PathBuf;

use super::{ProcError, read_text};

/// One line of `/proc/PID/maps` that maps a file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mapping {
    pub start: u64,
    pub end: u64,
    pub file_offset: u64,
    pub executable: bool,
    pub inode: u64,
    /// The path as the target sees it (its mount namespace), without a ` (deleted)` suffix.
    pub path: String,
    pub deleted: bool,
}

/// File-backed mappings of a process.
pub fn read_maps(pid: u32) -> Result<Vec<Mapping>, ProcError> {
    read_text(pid, "maps").map(|text| parse_maps(&text))
}

/// The end of the `[heap]` mapping of `pid` (the program break), `None` when it has none.
pub fn read_heap_end(pid: u32) -> Result<Option<u64>, ProcError> {
    read_text(pid, "maps").map(|text| parse_heap_end(&text))
}

/// The end of the `[heap]` mapping in a maps text.
pub fn parse_heap_end(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.ends_with("[heap]"))?;
    let range = line.split_whitespace().next()?;
    u64::from_str_radix(range.split_once('-')?.1, 16).ok()
}

pub fn parse_maps(text: &str) -> Vec<Mapping> {
    text.lines().filter_map(parse_maps_line).collect()
}

fn parse_maps_line(line: &str) -> Option<Mapping> {
    let mut fields = line.splitn(6, ' ');
    let range = fields.next()?;
    let perms = fields.next()?;
    let offset = fields.next()?;
    let _dev = fields.next()?;
    let inode: u64 = fields.next()?.parse().ok()?;
    let path = fields.next()?.trim_start();
    if inode == 0 || !path.starts_with('/') {
        return None;
    }
    let (start, end) = range.split_once('-')?;
    let (path, deleted) = match path.strip_suffix(" (deleted)") {
        Some(p) => (p, true),
        None => (path, false),
    };
    Some(Mapping {
        start: u64::from_str_radix(start, 16).ok()?,
        end: u64::from_str_radix(end, 16).ok()?,
        file_offset: u64::from_str_radix(offset, 16).ok()?,
        executable: perms.as_bytes().get(2) == Some(&b'x'),
        inode,
        path: path.to_string(),
        deleted,
    })
}

/// A path under which this process can open a file the target maps: through the target's root
/// (containers), or through map_files for deleted files.
pub fn open_path(pid: u32, m: &Mapping) -> PathBuf {
    if m.deleted {
        PathBuf::from(format!("/proc/{pid}/map_files/{:x}-{:x}", m.start, m.end))
    } else {
        PathBuf::from(format!("/proc/{pid}/root{}", m.path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_maps_lines() {
        let text = "7f00-7f80 r-xp 00028000 fe:01 1234   /usr/lib/x86_64-linux-gnu/libc.so.6\n\
                    7f80-7f90 rw-p 00000000 00:00 0 \n\
                    5500-5600 r-xp 00001000 fe:01 99 /tmp/a b (deleted)\n\
                    7ffd-7ffe r-xp 00000000 00:00 0 [vdso]\n";
        let maps = parse_maps(text);
        assert_eq!(maps.len(), 2);
        assert_eq!(maps[0].start, 0x7f00);
        assert_eq!(maps[0].file_offset, 0x28000);
        assert!(maps[0].executable && !maps[0].deleted);
        assert_eq!(maps[1].path, "/tmp/a b");
        assert!(maps[1].deleted);
    }

    #[test]
    fn skips_malformed_maps_lines() {
        let text = "zz-7f80 r-xp 00028000 fe:01 1234 /lib/a.so\n\
                    7f00-7f80 r-xp 00028000 fe:01 notanumber /lib/b.so\n\
                    7f00-7f80 r-xp\n\
                    \n\
                    7f00 r-xp 00028000 fe:01 1234 /lib/c.so\n\
                    7f00-7f80 r-xp 0002800g fe:01 1234 /lib/d.so\n\
                    7f00-7f80 r-xp 00000000 fe:01 1234 /lib/ok.so\n";
        let maps = parse_maps(text);
        assert_eq!(maps.len(), 1);
        assert_eq!(maps[0].path, "/lib/ok.so");
    }

    #[test]
    fn finds_the_heap_end() {
        let text = "55d0-55e0 r-xp 00000000 fe:01 12 /usr/bin/cat\n\
                    55e0-5a00 rw-p 00000000 00:00 0                          [heap]\n\
                    7ffd-7ffe rw-p 00000000 00:00 0                          [stack]\n";
        assert_eq!(parse_heap_end(text), Some(0x5a00));
        assert_eq!(
            parse_heap_end("55d0-55e0 r-xp 0 fe:01 12 /usr/bin/cat\n"),
            None
        );
        assert_eq!(parse_heap_end("55e0-zz rw-p 0 00:00 0 [heap]"), None);
        assert_eq!(parse_heap_end("[heap]"), None);
        assert_eq!(parse_heap_end(""), None);
    }
}
