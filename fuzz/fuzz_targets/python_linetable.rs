//! A CPython code object's line table is read from the target's memory: the 3.10 table and the
//! 3.11+ location table decoded from arbitrary bytes, and lines looked up in the result.
#![no_main]

use alloctrace::python as linetable;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first four bytes: the code object's first line; the rest: the table.
    let Some((first, table)) = data.split_first_chunk::<4>() else {
        return;
    };
    let first_line = i32::from_le_bytes(*first);
    let ranges = linetable::decode_line_table_310(table, first_line);
    let locations = linetable::decode_location_table(table, first_line);
    let from_locations = linetable::line_ranges(&locations);
    for offset in [0, 1, 2, 40, 1000, u64::MAX] {
        let _ = linetable::line_at(&ranges, offset);
        let _ = linetable::line_at(&from_locations, offset);
    }
});
