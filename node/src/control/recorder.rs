//! The control plane's Event recorder: the Events a pass decides are written by a task of
//! their own, off the pass's path, as client-go's event broadcaster does for kube-scheduler
//! and the controllers. A pass waits for its bindings and object writes (the next pass must
//! see them), never for its Events, which no controller reads.
//!
//! Events are best effort, as in Kubernetes: they are written at most
//! `EVENTS_PER_SECOND` a second after a burst of `EVENT_BURST` (kube-scheduler's client
//! limits, 50 and 100), and at most `QUEUED_EVENTS` wait (the broadcaster's queue, 1000);
//! beyond that they are dropped with a warning rather than slowing the control plane or
//! filling the log with records nobody reads while thousands of pods are placed.

use std::collections::VecDeque;
use std::time::Duration;

use flotilla_raft::{Command, Replica};
use tokio::sync::mpsc;

use super::runner::{command_at, ControlConfig};
use super::Action;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Batches handed over by passes and not yet taken by the recorder task, at most.
const HANDOFF_BATCHES: usize = 64;
/// Events waiting to be written at most; more are dropped (client-go's `maxQueuedEvents`).
const QUEUED_EVENTS: usize = 1000;
/// Events written a second at most, after a burst (kube-scheduler's client QPS and burst).
const EVENTS_PER_SECOND: f64 = 50.0;
const EVENT_BURST: f64 = 100.0;
/// Events written as one log entry at most (the proposer's own limit per entry).
const EVENTS_PER_ENTRY: usize = 128;

/// An Event decided by a pass, with the time it was decided (RFC 3339): it is made an object
/// only when it is written, so a dropped Event costs nothing more.
type Recorded = (Action, String);

/// A handle to the recorder task. Cheap to clone.
#[derive(Clone)]
pub(super) struct EventRecorder {
    handoff: mpsc::Sender<Vec<Recorded>>,
}

impl EventRecorder {
    /// Starts the recorder task, which writes through `replica` until `shutdown` or until
    /// every handle is dropped.
    pub(super) fn start(
        replica: Replica,
        config: ControlConfig,
        shutdown: CancellationToken,
    ) -> EventRecorder {
        let (handoff, batches) = mpsc::channel(HANDOFF_BATCHES);
        tokio::spawn(run(replica, config, batches, shutdown));
        EventRecorder { handoff }
    }

    /// Hands `events` (`Action::Event`s decided now) to the recorder without waiting; when the
    /// hand-off is full or the recorder has stopped, the Events are dropped with a warning.
    pub(super) fn record(&self, events: Vec<Action>) {
        if events.is_empty() {
            return;
        }
        let count = events.len();
        let now = crate::api::now_rfc3339();
        let events: Vec<Recorded> = events
            .into_iter()
            .map(|event| (event, now.clone()))
            .collect();
        if let Err(error) = self.handoff.try_send(events) {
            tracing::warn!(count, %error, "Event hand-off full or closed: Events dropped");
        }
    }
}

/// A token bucket: `per_second` tokens a second, at most `burst` saved up.
#[derive(Debug, Clone)]
struct TokenBucket {
    per_second: f64,
    burst: f64,
    tokens: f64,
    updated: Instant,
}

impl TokenBucket {
    /// A full bucket.
    fn new(per_second: f64, burst: f64, now: Instant) -> TokenBucket {
        TokenBucket {
            per_second,
            burst,
            tokens: burst,
            updated: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed_seconds = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens = (self.tokens + elapsed_seconds * self.per_second).min(self.burst);
        self.updated = now;
    }

    /// Takes up to `wanted` whole tokens; returns how many were taken.
    fn take(&mut self, now: Instant, wanted: usize) -> usize {
        self.refill(now);
        let taken = (self.tokens.floor() as usize).min(wanted);
        self.tokens -= taken as f64;
        taken
    }

    /// How long until a whole token is there.
    fn wait(&mut self, now: Instant) -> Duration {
        self.refill(now);
        if self.tokens >= 1.0 {
            return Duration::ZERO;
        }
        Duration::from_secs_f64((1.0 - self.tokens) / self.per_second)
    }
}

/// Queues `batch` behind `queue` up to `QUEUED_EVENTS`; returns how many were dropped.
fn enqueue<T>(queue: &mut VecDeque<T>, batch: Vec<T>) -> usize {
    let room = QUEUED_EVENTS.saturating_sub(queue.len());
    let dropped = batch.len().saturating_sub(room);
    queue.extend(batch.into_iter().take(room));
    dropped
}

async fn run(
    replica: Replica,
    config: ControlConfig,
    mut batches: mpsc::Receiver<Vec<Recorded>>,
    shutdown: CancellationToken,
) {
    let mut queue: VecDeque<Recorded> = VecDeque::new();
    let mut bucket = TokenBucket::new(EVENTS_PER_SECOND, EVENT_BURST, Instant::now());
    let mut dropped_total: u64 = 0;
    loop {
        let token_wait = if queue.is_empty() {
            None
        } else {
            Some(bucket.wait(Instant::now()))
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            batch = batches.recv() => match batch {
                Some(batch) => {
                    let dropped = enqueue(&mut queue, batch);
                    if dropped > 0 {
                        dropped_total += dropped as u64;
                        tracing::warn!(
                            dropped,
                            dropped_total,
                            "Event queue full ({QUEUED_EVENTS} waiting): Events dropped"
                        );
                    }
                }
                None => return,
            },
            _ = tokio::time::sleep(token_wait.unwrap_or_default()), if token_wait.is_some() => {}
        }
        let allowed = bucket.take(Instant::now(), queue.len().min(EVENTS_PER_ENTRY));
        if allowed == 0 {
            continue;
        }
        let entry: Vec<Command> = queue
            .drain(..allowed)
            .filter_map(|(event, at)| match command_at(event, &config, &at) {
                Ok(command) => Some(command),
                Err(error) => {
                    tracing::warn!(%error, "controller produced an invalid Event");
                    None
                }
            })
            .collect();
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

#[cfg(test)]
mod tests {
    use super::*;

    fn events(count: usize) -> Vec<usize> {
        (0..count).collect()
    }

    #[test]
    fn a_full_bucket_gives_its_burst_at_once_then_its_rate() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(50.0, 100.0, start);
        assert_eq!(bucket.take(start, 500), 100);
        assert_eq!(bucket.take(start, 500), 0);
        assert_eq!(bucket.wait(start), Duration::from_millis(20));
        assert_eq!(bucket.take(start + Duration::from_millis(100), 500), 5);
        assert_eq!(bucket.take(start + Duration::from_secs(60), 500), 100);
    }

    #[test]
    fn a_bucket_gives_no_more_than_is_asked_and_keeps_the_rest() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(50.0, 100.0, start);
        assert_eq!(bucket.take(start, 30), 30);
        assert_eq!(bucket.take(start, 100), 70);
        assert_eq!(
            bucket.wait(start + Duration::from_millis(20)),
            Duration::ZERO
        );
    }

    #[test]
    fn events_beyond_the_queue_limit_are_dropped_and_counted() {
        let mut queue = VecDeque::new();
        assert_eq!(enqueue(&mut queue, events(600)), 0);
        assert_eq!(enqueue(&mut queue, events(600)), 200);
        assert_eq!(queue.len(), QUEUED_EVENTS);
        assert_eq!(enqueue(&mut queue, events(1)), 1);
        queue.drain(..10);
        assert_eq!(enqueue(&mut queue, events(4)), 0);
        assert_eq!(queue.len(), QUEUED_EVENTS - 6);
    }
}
