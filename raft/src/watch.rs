//! Watch events: how they are recorded, fanned out to watchers, and replayed from history so
//! that a watcher resuming from a resourceVersion misses none and sees none twice.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc};

use crate::object::ObjectKey;
use crate::selector::{FieldSelector, LabelSelector};
use crate::storage::StoreReader;
use crate::store::{EventType, StoreError};
use crate::types::SharedObject;

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
    pub object: SharedObject,
}

impl WatchRecord {
    /// The record as the event history stores it (its JSON), given its object's JSON: the
    /// same bytes as encoding the whole record, but the object, already encoded to be stored
    /// itself, is not encoded a second time.
    pub(crate) fn encode_with_object_json(
        &self,
        object_json: &[u8],
    ) -> Result<Vec<u8>, serde_json::Error> {
        /// The record's fields before `object`, in the same order.
        #[derive(Serialize)]
        struct Head<'a> {
            resource_version: u64,
            seq: u32,
            event_type: EventType,
            key: &'a ObjectKey,
        }
        let mut json = serde_json::to_vec(&Head {
            resource_version: self.resource_version,
            seq: self.seq,
            event_type: self.event_type,
            key: &self.key,
        })?;
        json.pop(); // the closing brace
        json.extend_from_slice(b",\"object\":");
        json.extend_from_slice(object_json);
        json.push(b'}');
        Ok(json)
    }

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

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_record_encoded_around_its_object_json_is_the_record_encoded_whole() {
        let object = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "web-\"1\"", "namespace": "default", "resourceVersion": "7"},
            "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "i"}]},
        });
        for event_type in [EventType::Added, EventType::Modified, EventType::Deleted] {
            let record = WatchRecord {
                resource_version: 7,
                seq: 3,
                event_type,
                key: ObjectKey::new("Pod", "default", "web-\"1\""),
                object: object.clone().into(),
            };
            let object_json = serde_json::to_vec(&object).expect("encodes");
            let spliced = record
                .encode_with_object_json(&object_json)
                .expect("encodes");
            assert_eq!(
                String::from_utf8_lossy(&spliced),
                String::from_utf8_lossy(&serde_json::to_vec(&record).expect("encodes"))
            );
            let decoded: WatchRecord = serde_json::from_slice(&spliced).expect("decodes");
            assert_eq!(decoded, record);
        }
    }
}
