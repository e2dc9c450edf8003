//! Finding the CPython interpreters of traced processes, whose Python frames the probes then
//! read with each stack.

use crate::{probes::Probes, python::PythonProcess, session::sink::EventSink};

/// Starts reading the Python frames of `pid` if it runs a supported CPython not known yet (at
/// attach, fork, and when it maps code). Says so on stderr.
pub fn detect_python(pid: u32, sink: &mut EventSink, probes: &mut Probes) {
    if !sink.wants_python(pid) {
        return;
    }
    let Ok(py) = PythonProcess::attach(pid) else {
        return; // no CPython mapped (yet), or one this version cannot read
    };
    let interp = py.interpreter();
    match probes.set_python(pid, &interp.offsets) {
        Ok(()) => {
            eprintln!(
                "Python frames: CPython {} in PID {pid} ({})",
                interp.version,
                crate::escape::for_terminal(&interp.path.to_string_lossy())
            );
            sink.add_python(pid, py);
        }
        Err(e) => log::warn!("PID {pid}: Python frames not read: {e}"),
    }
}
