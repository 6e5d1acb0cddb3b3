//! Watch events: how they are recorded, fanned out to watchers, and replayed from history so
//! that a watcher resuming from a resourceVersion misses none and sees none twice.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::{broadcast, mpsc};

use crate::object::ObjectKey;
use crate::selector::{FieldSelector, LabelSelector};
use crate::storage::StoreReader;
use crate::store::{EventType, StoreError};

/// How many committed events the in-memory fan-out holds for slow watchers; a watcher that
/// falls further behind reloads from the on-disk history.
const FANOUT_CAPACITY: usize = 4096;

/// One change of one object at one resourceVersion, as stored in the event history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WatchRecord {
    pub resource_version: u64,
    /// Orders several events committed by one log entry.
    pub seq: u32,
    pub event_type: EventType,
    pub key: ObjectKey,
    pub object: Value,
}

impl WatchRecord {
    fn position(&self) -> (u64, u32) {
        (self.resource_version, self.seq)
    }
}

#[derive(Debug, Clone)]
pub(crate) enum HubMessage {
    Event(Arc<WatchRecord>),
    /// The state machine was replaced by a snapshot: watchers must relist.
    Reset,
}

/// Fans committed events out to every watcher of this node. Cloned into the state machine,
/// which is its only sender.
#[derive(Debug, Clone)]
pub struct WatchHub {
    sender: broadcast::Sender<HubMessage>,
}

impl Default for WatchHub {
    fn default() -> Self {
        WatchHub::new()
    }
}

impl WatchHub {
    pub fn new() -> WatchHub {
        let (sender, _) = broadcast::channel(FANOUT_CAPACITY);
        WatchHub { sender }
    }

    pub(crate) fn publish(&self, records: Vec<WatchRecord>) {
        for record in records {
            // No receiver is fine: nobody is watching.
            let _ = self.sender.send(HubMessage::Event(Arc::new(record)));
        }
    }

    pub(crate) fn reset(&self) {
        let _ = self.sender.send(HubMessage::Reset);
    }

    pub(crate) fn subscribe(&self) -> broadcast::Receiver<HubMessage> {
        self.sender.subscribe()
    }
}

/// What a watcher wants to see.
#[derive(Debug, Clone)]
pub struct WatchFilter {
    pub kind: String,
    /// `None`: all namespaces.
    pub namespace: Option<String>,
    pub labels: LabelSelector,
    pub fields: FieldSelector,
}

impl WatchFilter {
    fn matches(&self, record: &WatchRecord) -> bool {
        record.key.kind == self.kind
            && self
                .namespace
                .as_ref()
                .is_none_or(|ns| *ns == record.key.namespace)
            && self.labels.matches(&record.object)
            && self.fields.matches(&record.object)
    }
}

/// Streams events matching `filter` with a resourceVersion above `from` (or above the current
/// one when `None`) into `sink` until the receiver is dropped. Ends with `Expired` when `from`
/// is older than the retained history or when this node's state was replaced by a snapshot.
pub async fn run_watch(
    reader: StoreReader,
    hub: WatchHub,
    filter: WatchFilter,
    from: Option<u64>,
    sink: mpsc::Sender<Result<WatchRecord, StoreError>>,
) {
    // Subscribe before reading history: anything committed after the read arrives here.
    let mut live = hub.subscribe();
    let mut position = match from {
        Some(rv) => (rv, u32::MAX),
        None => match reader.applied_resource_version() {
            Ok(rv) => (rv, u32::MAX),
            Err(error) => {
                tracing::warn!(%error, "read applied resource version for a watch");
                return;
            }
        },
    };
    if !replay_history(&reader, &filter, &mut position, &sink).await {
        return;
    }
    loop {
        let message = tokio::select! {
            _ = sink.closed() => return,
            message = live.recv() => message,
        };
        match message {
            Ok(HubMessage::Event(record)) => {
                if record.position() <= position {
                    continue;
                }
                position = record.position();
                if filter.matches(&record)
                    && sink.send(Ok(WatchRecord::clone(&record))).await.is_err()
                {
                    return;
                }
            }
            Ok(HubMessage::Reset) => {
                let oldest = reader.compacted_resource_version().unwrap_or(0);
                let _ = sink
                    .send(Err(StoreError::Expired {
                        requested: position.0,
                        oldest,
                    }))
                    .await;
                return;
            }
            Err(broadcast::error::RecvError::Lagged(_)) => {
                if !replay_history(&reader, &filter, &mut position, &sink).await {
                    return;
                }
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

/// Sends the stored events after `position`; false when the watch must end.
async fn replay_history(
    reader: &StoreReader,
    filter: &WatchFilter,
    position: &mut (u64, u32),
    sink: &mpsc::Sender<Result<WatchRecord, StoreError>>,
) -> bool {
    let history = match reader.events_after(position.0) {
        Ok(history) => history,
        Err(error) => {
            let _ = sink.send(Err(error)).await;
            return false;
        }
    };
    for record in history {
        if record.position() <= *position {
            continue;
        }
        *position = record.position();
        if filter.matches(&record) && sink.send(Ok(record)).await.is_err() {
            return false;
        }
    }
    true
}
