//! The gRPC API every node serves: objects and cluster membership. A follower forwards writes
//! to the leader through its `Replica`; the client never sees "not the leader".

mod cluster;
pub mod limits;
mod objects;
mod pods;

pub use cluster::{ClusterService, ClusterStatus, MemberStatus};
pub use objects::ObjectsService;
pub use pods::PodsService;

use flotilla_raft::object::metadata_mut;
use flotilla_raft::{ReplicaError, StoreError};
use serde_json::Value;
use tonic::Status;

/// The gRPC status a client sees for a store or replication error.
pub(crate) fn status_of(error: ReplicaError) -> Status {
    match error {
        ReplicaError::Store(error) => {
            let message = error.to_string();
            match error {
                StoreError::AlreadyExists { .. } | StoreError::NodeNameTaken { .. } => {
                    Status::already_exists(message)
                }
                StoreError::NotFound { .. }
                | StoreError::NamespaceNotFound { .. }
                | StoreError::NodeNotFound { .. } => Status::not_found(message),
                StoreError::Conflict { .. } => Status::aborted(message),
                StoreError::Invalid { .. } => Status::invalid_argument(message),
                StoreError::Expired { .. } => Status::out_of_range(message),
                StoreError::Forbidden { .. } => Status::permission_denied(message),
            }
        }
        ReplicaError::Unavailable(message) => {
            Status::unavailable(format!("cluster unavailable: {message}"))
        }
        ReplicaError::Unknown(message) => Status::unknown(format!("outcome unknown: {message}")),
        ReplicaError::Open(message) => Status::internal(message),
    }
}

/// The gRPC status a client sees when a Secret cannot be sealed or opened.
pub(crate) fn status_of_encryption(error: crate::encryption::EncryptionError) -> Status {
    use crate::encryption::EncryptionError;
    match error {
        EncryptionError::Store(error) => status_of(error),
        EncryptionError::Contended { .. } => Status::aborted(error.to_string()),
        other => Status::internal(format!("encryption at rest: {other}")),
    }
}

/// The current time as Kubernetes writes timestamps (RFC 3339, seconds, UTC).
pub(crate) fn now_rfc3339() -> String {
    jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

/// Sets the server-owned fields of a new object; on updates the store keeps the stored ones.
pub(crate) fn with_new_identity(mut object: Value) -> Value {
    let metadata = metadata_mut(&mut object);
    metadata.insert(
        "uid".into(),
        Value::String(uuid::Uuid::new_v4().to_string()),
    );
    metadata.insert("creationTimestamp".into(), Value::String(now_rfc3339()));
    metadata.remove("resourceVersion");
    metadata.remove("generation");
    object
}
