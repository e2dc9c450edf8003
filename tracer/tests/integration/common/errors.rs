//! The bad-input contract: one `alloctrace: error:` line, a non-zero exit, nothing left behind.

use std::{path::Path, process::Output};

/// Asserts the bad-input contract: non-zero exit and exactly one stderr line, starting with
/// `alloctrace: error:` and mentioning `needle` (case-insensitive).
pub fn assert_clean_error(out: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(
        !out.status.success(),
        "expected a failure, got {}; stderr:\n{stderr}",
        out.status
    );
    assert_eq!(
        lines.len(),
        1,
        "expected exactly one stderr line, got {}:\n{stderr}",
        lines.len()
    );
    assert!(
        lines[0].starts_with("alloctrace: error:"),
        "the error line must start with `alloctrace: error:`: {:?}",
        lines[0]
    );
    assert!(
        lines[0].to_lowercase().contains(&needle.to_lowercase()),
        "the error line should name the problem ({needle:?}): {:?}",
        lines[0]
    );
}

/// Names of the entries in `dir` (to check that a failed command left nothing behind).
pub fn dir_entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}
