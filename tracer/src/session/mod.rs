//! `alloctrace record`: attach, drain events into the ledger, commit the recording every second,
//! finalize on duration, signal or target exit.
//!
//! `setup` checks, attaches and opens the recording (`launch` starts a command under ptrace and
//! holds it where the recorder needs it still); `lock` keeps a second recorder off a traced
//! process; `recorder` is the loop, one method per event source; `batch` hands ring records to
//! `sink`, which applies them to the ledger layers one event kind at a time; `children` keeps the
//! set of traced processes, `exits` how they ended (`oom`: whether by the OOM killer);
//! `cuda_hooking`, `python_detection`, `gpu_sampling` and `rss_sampling` are what the loop does
//! besides; `heap_duty` opens and closes a duty-cycled heap's windows.

mod batch;
mod children;
pub mod control;
mod cuda_hooking;
mod exits;
mod gpu_sampling;
pub mod heap_duty;
mod launch;
mod lock;
mod oom;
mod options;
pub mod phase_predicate;
pub mod phases;
mod python_detection;
mod recorder;
mod rss_sampling;
mod setup;
mod sink;
pub mod target;

pub use options::{RecordOptions, RecordSummary, TargetSpec};

/// Attaches to the target and records until done.
pub async fn record(opts: RecordOptions) -> anyhow::Result<RecordSummary> {
    record_controlled(opts, None).await
}

/// `record`, driven by `control` when given (`alloctrace check`).
pub async fn record_controlled(
    opts: RecordOptions,
    control: Option<control::Control>,
) -> anyhow::Result<RecordSummary> {
    let signals = setup::prepare(&opts)?;
    let attached = setup::attach(&opts)?;
    let mut recorder = setup::open_recording(&opts, attached)?;
    let held_exits = recorder.launched.as_mut().and_then(|l| l.take_held_exits());
    let (started, requests) = match control {
        Some(c) => (c.started, Some(c.requests)),
        None => (None, None),
    };
    let sources = recorder::EventSources::new(signals, &recorder.exit_watch, held_exits, &opts)?
        .with_control(requests);
    if let Some(started) = started {
        let _ = started.send(recorder.started);
    }
    match recorder.run(sources).await {
        Ok(stop_reason) => recorder.finish(stop_reason),
        Err(e) => {
            recorder.leave_command();
            Err(e)
        }
    }
}
