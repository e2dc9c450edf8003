//! The target's /proc files are the target's to shape (its command line, the names of the files
//! it maps): every parser of tracer/src/proc over arbitrary text.
#![no_main]

use alloctrace::proc::{cmdline, maps, smaps, stat, status};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = cmdline::parse_cmdline(data);
    let text = String::from_utf8_lossy(data);
    for mapping in maps::parse_maps(&text) {
        let _ = maps::open_path(1, &mapping);
    }
    let _ = maps::parse_heap_end(&text);
    let _ = smaps::parse_smaps(&text);
    let parsed = stat::parse_stat(&text);
    let _ = (parsed.has_exited(), parsed.is_kernel_thread());
    let _ = status::parse_status(&text);
});
