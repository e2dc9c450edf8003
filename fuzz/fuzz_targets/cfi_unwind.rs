//! An object file the target maps, as the unwinder reads it: its call-frame information loaded
//! through the cache (`.eh_frame` with or without its search table, `.debug_frame`), mapped at
//! a synthetic address, and a synthetic stack unwound through it.
//!
//! Input: an 8-byte header (`ip_offset: u32`, `bp_offset: u16`, `stack_len: u16`, little
//! endian), `stack_len` bytes of stack (fewer if the input is shorter), then the object file.
#![no_main]

use std::cell::RefCell;

use alloctrace::{
    elf::Elf,
    stacks::unwind::{FileAccess, MissingCfi, ProcessUnwinder, UnwindCache, UnwindOptions},
};
use libfuzzer_sys::fuzz_target;

thread_local! {
    static DIR: RefCell<tempfile::TempDir> =
        RefCell::new(tempfile::tempdir().expect("a temporary directory"));
}

/// Where the object's executable segment is mapped, and where the stack copy starts.
const BASE: u64 = 0x5555_5555_0000;
const STACK: u64 = 0x7ffd_0000_0000;

/// A /proc/PID/maps line mapping the first executable segment of `object` (a page if it has
/// none, so that the loader's path still runs).
fn maps_line(object: &[u8]) -> (String, u64, u64) {
    let segment = Elf::parse(std::path::Path::new("input.o"), object)
        .ok()
        .and_then(|e| e.load_segments().iter().copied().find(|s| s.executable));
    let (address, offset, size) = segment.map_or((0, 0, 0x1000), |s| {
        (
            s.address & !0xfff,
            s.file_offset & !0xfff,
            s.file_size.clamp(1, 1 << 30),
        )
    });
    let start = BASE.wrapping_add(address) & !0xfff;
    let end = start.saturating_add((size + 0xfff) & !0xfff);
    let line = format!("{start:x}-{end:x} r-xp {offset:08x} 00:00 1 /input.o\n");
    (line, start, end)
}

fuzz_target!(|data: &[u8]| {
    let Some((header, rest)) = data.split_first_chunk::<8>() else {
        return;
    };
    let ip_offset = u64::from(u32::from_le_bytes(header[0..4].try_into().unwrap()));
    let bp_offset = u64::from(u16::from_le_bytes([header[4], header[5]]));
    let stack_len = usize::from(u16::from_le_bytes([header[6], header[7]])).min(rest.len());
    let (stack, object) = rest.split_at(stack_len);
    DIR.with_borrow(|dir| {
        std::fs::write(dir.path().join("input.o"), object).expect("write the object");
        let (maps, start, end) = maps_line(object);
        // A new cache each run: the file is rewritten in place, and a cache may take a file of
        // the same size and time for the one it read.
        let cache = UnwindCache::new();
        let files = FileAccess::Root(dir.path().to_path_buf());
        let mut unwinder = ProcessUnwinder::from_maps(&maps, files, &cache);
        unwinder.load_all();
        let ip = start.wrapping_add(ip_offset % (end - start).max(1));
        for module in unwinder.modules() {
            let _ = (
                module.info.covers(ip.wrapping_sub(module.bias)),
                module.info.cfi_kind(),
            );
        }
        let _ = unwinder.load_errors().count();
        let mut frames = Vec::new();
        for missing_cfi in [MissingCfi::FramePointer, MissingCfi::Stop] {
            unwinder.set_options(UnwindOptions {
                max_frames: 64,
                missing_cfi,
            });
            let outcome = unwinder.unwind((ip, STACK, STACK + bp_offset), stack, &mut frames);
            let _ = (outcome.is_complete(), outcome.truncation());
        }
    });
});
