//! Reading this node's own copy of the store, for the node services that follow it level-driven
//! (the proxy, the DNS server): no read barrier, every namespace, no selector.

use flotilla_raft::selector::{FieldSelector, LabelSelector};
use flotilla_raft::Replica;
use serde_json::Value;

/// Every object of `kind` in this node's store, or `None` (logged for `component`) when the
/// store cannot be read.
pub(crate) fn list_all(replica: &Replica, kind: &str, component: &str) -> Option<Vec<Value>> {
    match replica.reader().list(
        kind,
        None,
        &LabelSelector::default(),
        &FieldSelector::default(),
    ) {
        Ok((objects, _)) => Some(objects),
        Err(error) => {
            tracing::warn!(%error, kind, "{component}: list");
            None
        }
    }
}
