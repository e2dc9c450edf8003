//! The ELF files a target maps are the target's: bytes parsed by the one ELF reader, then every
//! question the tracer asks of it (symbols, file offsets, load bias, build id, sections).
#![no_main]

use std::path::Path;

use alloctrace::elf::{self, Elf};
use libfuzzer_sys::fuzz_target;

/// Symbols the probes and the Python reader look up.
const WANTED: [&str; 5] = [
    "malloc",
    "free",
    "cuMemAlloc_v2",
    "_PyRuntime",
    "Py_Version",
];
const SECTIONS: [&str; 6] = [
    ".text",
    ".eh_frame",
    ".eh_frame_hdr",
    ".debug_frame",
    ".got",
    ".PyRuntime",
];

fuzz_target!(|data: &[u8]| {
    let Ok(obj) = Elf::parse(Path::new("input.elf"), data) else {
        return;
    };
    // Bounded: a file may claim millions of symbols.
    for symbol in obj.symbols().take(4096) {
        let _ = obj.file_offset(symbol.address);
        let _ = obj.data_at(symbol.address, symbol.size.min(64));
    }
    let _ = obj.function_offsets(&WANTED);
    let segments = obj.load_segments();
    for segment in segments {
        for start in [0, 0x5555_5555_4000, u64::MAX & !0xfff] {
            let offset = segment.file_offset & !0xfff;
            let _ = segment.bias(start, offset);
            let _ = elf::load_bias(segments, start, offset, segment.executable);
        }
        let _ = segment.file_offset_of(segment.address.wrapping_add(segment.file_size / 2));
    }
    let _ = obj.build_id();
    let _ = obj.architecture();
    for name in SECTIONS {
        let _ = obj.section_range(name);
        let _ = obj.section_data(name);
    }
});
