//! A recording is input alloctrace does not trust: bytes written to a file, read by
//! `Reader::open` and, when it opens, rendered by every view. Nothing may panic, and reading may
//! leave nothing beside the file.
#![no_main]

use std::cell::RefCell;

use alloctrace::{
    recording::Reader,
    views::{
        flamegraph::{self, FlamegraphOptions, Kind},
        report,
    },
};
use libfuzzer_sys::fuzz_target;

thread_local! {
    /// One directory for the whole run: a file a run, rewritten.
    static DIR: RefCell<tempfile::TempDir> =
        RefCell::new(tempfile::tempdir().expect("a temporary directory"));
}

fuzz_target!(|data: &[u8]| {
    DIR.with_borrow(|dir| {
        let path = dir.path().join("input.trace");
        std::fs::write(&path, data).expect("write the input");
        if let Ok(recorded) = Reader::open(&path) {
            let _ = report::render_text(&recorded);
            let _ = report::render_json(&recorded);
            for kind in [Kind::Live, Kind::Faults] {
                let options = FlamegraphOptions {
                    kind,
                    ..FlamegraphOptions::default()
                };
                let _ = flamegraph::render_svg(&recorded, &options);
            }
        }
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .expect("list the directory")
            .map(|e| e.expect("an entry").file_name())
            .filter(|name| name != "input.trace")
            .collect();
        assert!(
            left.is_empty(),
            "reading left {left:?} beside the recording"
        );
    });
});
