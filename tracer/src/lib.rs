//! alloctrace: eBPF memory-allocation tracer. Data flows one way, one folder a stage:
//! `probes` (kernel programs attached to the target) → `events` (ring records decoded) →
//! `session` (the recording loop, one method per event source) → the ledger layers (`ledger`:
//! live blocks and mappings; `cuda`: the driver layer and what it hides) → `recording` (the
//! crash-safe file) → `views` (report, flamegraph). `hooks` is the hook table every stage reads;
//! `proc`, `elf`, `stacks` and `python` read the target.
pub mod arch;
pub mod check;
pub mod cuda;
pub mod elf;
pub mod escape;
pub mod events;
pub mod hooks;
pub mod ledger;
pub mod model;
pub mod output;
pub mod probes;
pub mod proc;
pub mod python;
pub mod recording;
pub mod session;
pub mod stacks;
pub mod views;

#[cfg(test)]
mod docs_tests {
    use std::{collections::BTreeSet, path::Path};

    const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    const SOURCE_DIRS: [&str; 4] = [
        "tracer/src",
        "tracer-ebpf/src",
        "tracer-common/src",
        "xtask/src",
    ];

    fn rust_files(dir: &Path, out: &mut BTreeSet<String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                rust_files(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let relative = path.strip_prefix(ROOT).unwrap();
                out.insert(relative.to_string_lossy().into_owned());
            }
        }
    }

    /// Every `path.rs` in backquotes that names a file of the source folders.
    fn documented(text: &str) -> BTreeSet<String> {
        text.split('`')
            .skip(1)
            .step_by(2)
            .filter(|s| s.ends_with(".rs") && SOURCE_DIRS.iter().any(|d| s.starts_with(d)))
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn architecture_md_lists_every_source_file_and_no_other() {
        let mut on_disk = BTreeSet::new();
        for dir in SOURCE_DIRS {
            rust_files(&Path::new(ROOT).join(dir), &mut on_disk);
        }
        let doc = std::fs::read_to_string(Path::new(ROOT).join("docs/architecture.md")).unwrap();
        let listed = documented(&doc);
        let missing: Vec<_> = on_disk.difference(&listed).collect();
        let stale: Vec<_> = listed.difference(&on_disk).collect();
        assert!(
            missing.is_empty() && stale.is_empty(),
            "docs/architecture.md: files not described: {missing:?}; described but absent: {stale:?}"
        );
    }
}
