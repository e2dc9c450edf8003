//! What `record` is asked to do, and what it reports when done.

use std::{ffi::OsString, path::PathBuf, time::Duration};

use crate::{
    probes::ProbeConfig,
    session::{heap_duty::DutyOptions, phases::PhaseRule},
};

/// What to trace.
#[derive(Clone, Debug)]
pub enum TargetSpec {
    Pid(u32),
    Command(Vec<OsString>),
}

#[derive(Clone, Debug)]
pub struct RecordOptions {
    pub target: TargetSpec,
    pub output: PathBuf,
    pub force: bool,
    pub duration: Option<Duration>,
    pub probes: ProbeConfig,
    /// Trace the C allocator with uprobes (exact live heap by stack; costs a trap per call).
    /// Mappings and the program break are always traced, with tracepoints.
    pub heap: bool,
    /// `--phase` rules.
    pub phases: Vec<PhaseRule>,
    /// The built-in phase profiles' rules too (`hooks::PROFILES`).
    pub phase_profiles: bool,
    /// `--idle-after`: quiet ms after which a process with phases is idle (0: never).
    pub idle_after_ms: u32,
    /// `alloctrace check`'s thresholds, written into the recording it makes.
    pub check: Option<crate::model::Thresholds>,
    /// Duty-cycled heap (`--heap-budget`, `--heap-duty`): the heap probes attached in windows.
    pub heap_duty: Option<DutyOptions>,
    /// Hook PyTorch's CUDA caching allocator where a process maps it.
    pub torch_allocator: bool,
    /// `--max-memory`: the recorder's resident memory, in bytes, past which it sheds detail.
    pub max_memory: Option<u64>,
    /// How often the ring buffer is drained.
    pub poll_interval: Duration,
}

/// What `record` reports when it is done.
#[derive(Debug)]
pub struct RecordSummary {
    pub events: u64,
    pub lost: u64,
    pub stop_reason: String,
    /// This process's peak resident memory (VmHWM), KiB.
    pub tracer_peak_kib: u64,
    /// A launched command's exit status (128 + N when killed by signal N), when the recording
    /// ended because it ended by itself.
    pub command_status: Option<u8>,
}
