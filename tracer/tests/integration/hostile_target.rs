//! A target that controls the strings alloctrace prints: its argv[0] (as `exec -a` sets it) and
//! the symbol name of a library function both hold terminal control sequences. Neither may reach
//! the operator's terminal, the text report or the SVG as control bytes: each shows them as
//! visible escapes; the JSON keeps the exact bytes, escaped as JSON. Privileged: needs root,
//! eBPF and uprobes.

use std::{
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
};

use crate::common::{
    Session, TestProcess, all_live, alloctrace_cmd, build_dir, compile, fixture_source,
    report_json, run, view,
};

/// The name of the library function that allocates: a colour change (CSI) and a bell.
const SYMBOL: &str = "evil\u{1b}[31mname\u{7}";
/// `SYMBOL` as `escape::for_terminal` and `escape::visible` show it.
const SYMBOL_SHOWN: &str = "evil\\x1b[31mname\\x07";
/// The argv[0] the fixture runs under: a window-title sequence (OSC ... BEL), then a screen clear.
const ARGV0: &str = "\u{1b}]0;X\u{7}pwned\u{1b}[2J";
const ARGV0_SHOWN: &str = "\\x1b]0;X\\x07pwned\\x1b[2J";
/// The fixture's blocks (HOSTILE_BLOCKS, HOSTILE_SIZE in hostile_fixture.c).
const BLOCKS: u64 = 3;
const SIZE: u64 = 1234;

/// `libhostile.so`: `SYMBOL` returns malloc(size); `hostile_alloc` calls it, so that it is a frame
/// of its own. Assembly, because C compilers write asm labels unquoted and the assembler refuses
/// control bytes in them; quoted, it takes them (as raw bytes: it does not read escapes there).
fn library_assembly() -> String {
    let name = format!("\"{SYMBOL}\"");
    format!(
        "\t.text
\t.globl {name}
\t.type {name}, @function
{name}:
\tpushq %rbp
\tmovq %rsp, %rbp
\tcall malloc@PLT
\tpopq %rbp
\tret
\t.size {name}, .-{name}
\t.globl hostile_alloc
\t.type hostile_alloc, @function
hostile_alloc:
\tpushq %rbp
\tmovq %rsp, %rbp
\tcall {name}@PLT
\tpopq %rbp
\tret
\t.size hostile_alloc, .-hostile_alloc
\t.section .note.GNU-stack,\"\",@progbits
"
    )
}

/// The fixture, linked with `libhostile.so` beside it (built once per test run).
fn hostile_fixture() -> &'static Path {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| {
        let dir = build_dir("hostile");
        let asm = dir.join("libhostile.s");
        std::fs::write(&asm, library_assembly()).expect("write the library's assembly");
        compile(
            &dir.join("libhostile.so"),
            &["-shared".into(), "-fPIC".into(), asm.into_os_string()],
        );
        let exe = dir.join("hostile_fixture");
        let args: Vec<std::ffi::OsString> = vec![
            "-O0".into(),
            "-fno-omit-frame-pointer".into(),
            fixture_source("hostile_fixture.c").into_os_string(),
            "-L".into(),
            dir.clone().into_os_string(),
            "-lhostile".into(),
            format!("-Wl,-rpath,{}", dir.display()).into(),
        ];
        compile(&exe, &args);
        exe
    })
}

/// Panics if `bytes` hold a control character other than those in `allowed` (C0, DEL, or C1 in
/// its UTF-8 form), naming `what` and showing where.
fn assert_no_control_bytes(what: &str, bytes: &[u8], allowed: &[u8]) {
    let text = String::from_utf8_lossy(bytes);
    let bad = text
        .char_indices()
        .find(|&(_, c)| c.is_control() && !(c.is_ascii() && allowed.contains(&(c as u8))));
    if let Some((at, c)) = bad {
        let from = text[..at]
            .char_indices()
            .rev()
            .nth(60)
            .map_or(0, |(i, _)| i);
        panic!(
            "{what}: control character {c:?} after {:?}",
            &text[from..at]
        );
    }
}

/// The flame graph of `trace` under `title`, as bytes, checked well-formed XML.
fn flamegraph_svg(trace: &Path, title: &str) -> String {
    let svg_path = trace.with_extension("svg");
    let mut cmd = alloctrace_cmd(&["flamegraph", "--title", title, "-o"]);
    cmd.arg(&svg_path).arg(trace);
    let out = run("alloctrace flamegraph", cmd);
    assert!(out.status.success(), "flamegraph failed: {out:?}");
    // `wrote PATH` names our own path: nothing of the target's.
    assert_no_control_bytes("flamegraph's stderr", &out.stderr, b"\n");
    let svg = std::fs::read(&svg_path).expect("read the SVG");
    assert_no_control_bytes("SVG", &svg, b"\t\n\r");
    assert_well_formed_xml(&svg);
    String::from_utf8(svg).expect("UTF-8 SVG")
}

/// Panics unless a parser reads `svg` to its end: tags balanced, attributes quoted, no
/// reference but XML's own and character references.
fn assert_well_formed_xml(svg: &[u8]) {
    use quick_xml::events::Event;
    let mut reader = quick_xml::Reader::from_reader(svg);
    let mut buf = Vec::new();
    let mut open = 0usize;
    loop {
        match reader.read_event_into(&mut buf) {
            Ok(Event::Start(_)) => open += 1,
            Ok(Event::End(_)) => open -= 1,
            Ok(Event::GeneralRef(r)) => {
                let predefined = [&b"amp"[..], b"lt", b"gt", b"quot", b"apos"].contains(&&*r);
                let char_ref = matches!(r.resolve_char_ref(), Ok(Some(_)));
                assert!(predefined || char_ref, "undeclared entity &{r:?};");
            }
            Ok(Event::Eof) => break,
            Ok(_) => {}
            Err(e) => panic!("SVG is not XML at byte {}: {e}", reader.buffer_position()),
        }
        buf.clear();
    }
    assert_eq!(open, 0, "SVG has unclosed elements");
}

#[test]
fn hostile_argv0_and_symbol_are_escaped_in_every_view() {
    require_privileges!();
    let mut cmd = Command::new(hostile_fixture());
    cmd.arg0(ARGV0).arg("attach");
    let mut target = TestProcess::spawn("hostile_fixture attach", cmd);
    target.expect_stdout("ready");
    let mut session = Session::attach_and_run(target, "hostile", &["--heap"]);
    session.end(libc::SIGINT);

    // The terminal: the recorder's `attached` line names the command line, escaped.
    let stderr = session.recorder.stderr_text();
    assert_no_control_bytes("recorder's stderr", stderr.as_bytes(), b"\n");
    let attached = stderr.lines().find(|l| l.starts_with("attached")).unwrap();
    assert!(
        attached.contains(&format!("({ARGV0_SHOWN} attach)")),
        "{attached}"
    );

    // The JSON keeps the exact bytes (as JSON escapes), and the figures are exact.
    let json = view(&["report", "--format", "json"], &session.trace);
    assert_no_control_bytes("JSON report", &json, b"\n");
    let r = report_json(&session.trace);
    assert_eq!(
        r.target.command,
        format!("{ARGV0} attach"),
        "{}",
        r.summary()
    );
    r.assert_cell(SYMBOL, all_live(BLOCKS, SIZE));

    // The text report shows both, escaped.
    let text = view(&["report"], &session.trace);
    assert_no_control_bytes("text report", &text, b"\n");
    let text = String::from_utf8(text).unwrap();
    assert!(
        text.contains(&format!(": {ARGV0_SHOWN} attach\n")),
        "{text}"
    );
    assert!(
        text.contains(&format!("heap: {SYMBOL_SHOWN} ← hostile_alloc ← main")),
        "{text}"
    );

    // The SVG: well-formed XML, the frame and a hostile --title shown escaped.
    let svg = flamegraph_svg(&session.trace, "title \u{1b}]0;T\u{7}");
    assert!(
        svg.contains(&format!("<title>{SYMBOL_SHOWN} (")),
        "no frame"
    );
    assert!(svg.contains("title \\x1b]0;T\\x07"), "no escaped title");
    assert!(svg.contains(ARGV0_SHOWN), "no escaped command line");
}

#[test]
fn launched_command_under_exec_a_is_escaped_in_the_attached_line() {
    require_privileges!();
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("exec-a.trace");
    let exe = hostile_fixture();
    // `bash -c 'exec -a "$0" "$1" run' ARGV0 EXE`: the command line alloctrace launches holds
    // ARGV0, and the process it traces runs under it after the exec. (Its stacks are not asserted:
    // naming the frames of an image exec'd under a second is issue 14's `env prog` item.)
    let mut cmd = alloctrace_cmd(&["record", "--heap", "-o"]);
    cmd.arg(&trace)
        .args(["--", "bash", "-c", "exec -a \"$0\" \"$1\" run", ARGV0])
        .arg(exe);
    let out = run("alloctrace record -- bash -c 'exec -a ...'", cmd);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "record failed ({}):\n{stderr}",
        out.status
    );
    assert_no_control_bytes("recorder's stderr", &out.stderr, b"\n");
    let attached = stderr.lines().find(|l| l.starts_with("attached")).unwrap();
    assert!(
        attached.contains(&format!("exec -a \"$0\" \"$1\" run {ARGV0_SHOWN} ")),
        "{attached}"
    );
    // The recording keeps the command line as it was.
    let r = report_json(&trace);
    let expected = format!(
        "bash -c exec -a \"$0\" \"$1\" run {ARGV0} {}",
        exe.display()
    );
    assert_eq!(r.target.command, expected, "{}", r.summary());
}
