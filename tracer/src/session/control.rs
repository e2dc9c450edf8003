//! A recording driven from inside alloctrace (`alloctrace check`): the driver is told when the
//! recording started (the target attached, a launched command released), asks the recorder to
//! mark moments (it applies what the ring holds and notes the traced live memory then, `Mark`)
//! and to stop.

use std::time::Instant;

use tokio::sync::{mpsc, oneshot};

use crate::model::Mark;

/// What the driver asks of the recorder.
pub enum Request {
    /// Note the traced live memory now (after applying every record the ring holds); `label`
    /// names the moment in the recording.
    Mark {
        label: String,
        reply: oneshot::Sender<Mark>,
    },
    /// End the recording (a launched command is stopped, as at the end of `-d`).
    Stop,
}

/// The recorder's side of the control.
pub struct Control {
    /// Told the instant the recording's clock starts from, once the target runs traced.
    pub started: Option<oneshot::Sender<Instant>>,
    pub requests: mpsc::UnboundedReceiver<Request>,
}

/// The driver's side: where it asks.
pub struct Driver {
    pub requests: mpsc::UnboundedSender<Request>,
}

/// The driver's side: when the recording started (an error if it never did).
pub type Started = oneshot::Receiver<Instant>;

/// A control and its driver.
pub fn channel() -> (Control, Started, Driver) {
    let (started_tx, started_rx) = oneshot::channel();
    let (tx, rx) = mpsc::unbounded_channel();
    (
        Control {
            started: Some(started_tx),
            requests: rx,
        },
        started_rx,
        Driver { requests: tx },
    )
}

impl Driver {
    /// Asks for a mark; None once the recording has ended.
    pub async fn mark(&self, label: &str) -> Option<Mark> {
        let (reply, answer) = oneshot::channel();
        let request = Request::Mark {
            label: label.to_string(),
            reply,
        };
        self.requests.send(request).ok()?;
        answer.await.ok()
    }

    /// Asks the recording to end (nothing if it already has).
    pub fn stop(&self) {
        let _ = self.requests.send(Request::Stop);
    }
}

/// The next request; never, without a control or once its driver is gone.
pub async fn next_request(control: &mut Option<mpsc::UnboundedReceiver<Request>>) -> Request {
    match control {
        Some(rx) => match rx.recv().await {
            Some(request) => request,
            None => std::future::pending().await,
        },
        None => std::future::pending().await,
    }
}
