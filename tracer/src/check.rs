//! `alloctrace check`: a CI leak test run from outside the process. It records the target (by
//! PID, or a command it launches) while it runs a load command: a warm-up, then batches, marking
//! the traced live memory at the end of each (`session::control`); then it judges the recording
//! (`views::check`) and ends the recording (a launched command is stopped as at the end of
//! `-d`).

use std::process::Stdio;

use tokio::process::Command;

use crate::{
    session::{self, RecordOptions, RecordSummary, control},
    views::check::{WARMUP_MARK, batch_mark},
};

/// The load to run against the target.
#[derive(Clone, Debug)]
pub struct LoadPlan {
    /// A shell command (`sh -c`): one batch of load. It must return once its requests are
    /// answered, so that the mark after it sees their memory.
    pub command: String,
    /// Runs before the first mark.
    pub warmup: u32,
    /// Runs marked after the warm-up.
    pub batches: u32,
}

/// How the load went.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LoadOutcome {
    /// Load runs made (warm-up included), and those that exited non-zero.
    pub runs: u32,
    pub failed_runs: u32,
    /// Batches marked after the warm-up.
    pub batches_marked: u32,
}

/// Records per `opts` while running `plan`; the recording ends when the load is done (or when
/// the target does).
pub async fn run(
    opts: RecordOptions,
    plan: &LoadPlan,
) -> (anyhow::Result<RecordSummary>, LoadOutcome) {
    let (control, started, driver) = control::channel();
    tokio::join!(
        session::record_controlled(opts, Some(control)),
        drive(started, driver, plan)
    )
}

/// Runs the warm-up and the batches once the recording has started, marking after the warm-up
/// and each batch; asks the recording to end when done. Stops early when the recording ended.
async fn drive(started: control::Started, driver: control::Driver, plan: &LoadPlan) -> LoadOutcome {
    let mut outcome = LoadOutcome::default();
    if started.await.is_err() {
        return outcome;
    }
    let requests = driver.requests.clone();
    let run_load = async |outcome: &mut LoadOutcome| -> bool {
        outcome.runs += 1;
        let mut child = match Command::new("sh")
            .arg("-c")
            .arg(&plan.command)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
        {
            Ok(child) => child,
            Err(e) => {
                log::warn!("cannot run the load command: {e}");
                outcome.failed_runs += 1;
                return true;
            }
        };
        tokio::select! {
            status = child.wait() => {
                outcome.failed_runs += u32::from(!status.is_ok_and(|s| s.success()));
                true
            }
            // The recording ended (the target exited): the load is pointless now.
            () = requests.closed() => false,
        }
    };
    for _ in 0..plan.warmup {
        if !run_load(&mut outcome).await {
            return outcome;
        }
    }
    if driver.mark(WARMUP_MARK).await.is_none() {
        return outcome;
    }
    for i in 1..=plan.batches as usize {
        if !run_load(&mut outcome).await || driver.mark(&batch_mark(i)).await.is_none() {
            return outcome;
        }
        outcome.batches_marked += 1;
    }
    driver.stop();
    outcome
}
