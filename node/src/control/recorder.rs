//! The control plane's Event recorder: the Events a pass decides are written by a task of
//! their own, off the pass's path, as client-go's event broadcaster does for kube-scheduler
//! and the controllers. A pass waits for its bindings and object writes (the next pass must
//! see them), never for its Events, which no controller reads. The queue is bounded; when it
//! is full the Events are dropped with a warning, as the broadcaster drops them, rather than
//! slowing the control plane.

use flotilla_raft::{Command, Replica};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Batches of Events waiting to be written at most.
const QUEUE_BATCHES: usize = 64;
/// Events written as one log entry at most (the proposer's own limit per entry).
const EVENTS_PER_ENTRY: usize = 128;

/// A handle to the recorder task. Cheap to clone.
#[derive(Clone)]
pub(super) struct EventRecorder {
    queue: mpsc::Sender<Vec<Command>>,
}

impl EventRecorder {
    /// Starts the recorder task, which writes through `replica` until `shutdown` or until
    /// every handle is dropped.
    pub(super) fn start(replica: Replica, shutdown: CancellationToken) -> EventRecorder {
        let (queue, batches) = mpsc::channel(QUEUE_BATCHES);
        tokio::spawn(run(replica, batches, shutdown));
        EventRecorder { queue }
    }

    /// Hands `events` (Event creates) to the recorder without waiting; returns false when the
    /// queue is full or the recorder has stopped, and the Events were dropped.
    pub(super) fn record(&self, events: Vec<Command>) -> bool {
        if events.is_empty() {
            return true;
        }
        let count = events.len();
        match self.queue.try_send(events) {
            Ok(()) => true,
            Err(error) => {
                tracing::warn!(count, %error, "Event queue full or closed: Events dropped");
                false
            }
        }
    }
}

async fn run(
    replica: Replica,
    mut batches: mpsc::Receiver<Vec<Command>>,
    shutdown: CancellationToken,
) {
    loop {
        let batch = tokio::select! {
            _ = shutdown.cancelled() => return,
            batch = batches.recv() => match batch {
                Some(batch) => batch,
                None => return,
            },
        };
        let mut batch = batch.into_iter().peekable();
        while batch.peek().is_some() {
            let entry: Vec<Command> = batch.by_ref().take(EVENTS_PER_ENTRY).collect();
            let written = tokio::select! {
                _ = shutdown.cancelled() => return,
                written = replica.write_batch(entry) => written,
            };
            // An Event is only a record: one that did not commit (a lost leadership, a name
            // taken) is not tried again.
            if let Err(error) = written {
                tracing::debug!(%error, "record Events");
            }
        }
    }
}
