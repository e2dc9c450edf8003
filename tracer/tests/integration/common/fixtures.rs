//! The test programs of tests/fixtures, compiled on first use into the target directory (once
//! per test run: the suites share one process).

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Command,
    sync::Mutex,
};

/// The path of `tests/fixtures/NAME` (a source file or a script).
pub fn fixture_source(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// The directory `NAME` under the target's scratch directory (created), where fixtures are built.
pub fn build_dir(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    std::fs::create_dir_all(&dir).expect("create the fixture build directory");
    dir
}

/// Compiles `tests/fixtures/NAME.c` (once per test run) with frame pointers and returns the
/// executable's path.
pub fn fixture(name: &str) -> PathBuf {
    fixture_variant(name, "", &[])
}

/// Like `fixture`, built with `extra` compiler flags into `NAME-VARIANT`.
pub fn fixture_variant(name: &str, variant: &str, extra: &[&str]) -> PathBuf {
    static BUILT: Mutex<BTreeMap<String, PathBuf>> = Mutex::new(BTreeMap::new());
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    let exe_name = if variant.is_empty() {
        name.to_string()
    } else {
        format!("{name}-{variant}")
    };
    if let Some(path) = built.get(&exe_name) {
        return path.clone();
    }
    let src = fixture_source(&format!("{name}.c"));
    let out = build_dir("fixtures").join(&exe_name);
    let mut args: Vec<std::ffi::OsString> = [
        "-O0",
        "-g",
        "-fno-omit-frame-pointer",
        "-mno-omit-leaf-frame-pointer",
        "-pthread",
        "-Wall",
    ]
    .iter()
    .map(Into::into)
    .collect();
    args.extend(extra.iter().map(Into::into));
    args.push(src.into_os_string());
    compile(&out, &args);
    built.insert(exe_name, out.clone());
    out
}

/// Runs `cc ARGS... -o OUT`, building under a private name renamed to `out` at the end (another
/// test run may be running the old file meanwhile); panics with cc's message if it fails.
pub fn compile(out: &Path, args: &[std::ffi::OsString]) {
    let tmp = out.with_extension(format!("{}.tmp", std::process::id()));
    let result = Command::new("cc")
        .args(args)
        .arg("-o")
        .arg(&tmp)
        .output()
        .unwrap_or_else(|e| panic!("cannot run cc to build {}: {e}", out.display()));
    assert!(
        result.status.success(),
        "cc failed to build {}:\n{}",
        out.display(),
        String::from_utf8_lossy(&result.stderr)
    );
    std::fs::rename(&tmp, out).expect("move the build into place");
}

/// The real interpreter behind `python3` (not a shim script such as pyenv's), so that the
/// traced process is CPython itself.
pub fn python() -> String {
    let out = Command::new("python3")
        .args(["-c", "import sys; print(sys.executable)"])
        .output()
        .expect("python3 is needed for this test");
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// `tests/fixtures/late_lib.c` built as the shared library `late_lib.so` (once per test run).
pub fn late_lib() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let lib = build_dir("late-lib").join("late_lib.so");
            let args: Vec<std::ffi::OsString> =
                ["-O1", "-fno-omit-frame-pointer", "-shared", "-fPIC"]
                    .iter()
                    .map(Into::into)
                    .chain([fixture_source("late_lib.c").into_os_string()])
                    .collect();
            compile(&lib, &args);
            lib
        })
        .clone()
}
