//! The replicated object store: Kubernetes-shaped objects in a RocksDB state machine behind
//! openraft, the Raft network over gRPC, and the handle (`Replica`) through which a node writes
//! (forwarding to the leader when it is not the leader) and reads (linearizably by default).
//!
//! Owns: the Raft log, vote and state machine on disk; the store's semantics (create, update,
//! delete, resourceVersion, generation, selectors, watch history); the kinds it accepts.
//! Must not depend on: the container runtime, the node agent or the CLI. Its pure core
//! (`store`, `selector`, `kinds`) does no IO.

mod forwarder;
pub mod kinds;
pub mod liveness;
pub mod network;
pub mod object;
pub mod proposer;
pub mod replica;
pub mod selector;
pub mod server;
pub mod storage;
pub mod store;
pub mod types;
pub mod watch;

pub use object::ObjectKey;
pub use replica::{Replica, ReplicaConfig, ReplicaError};
pub use store::StoreError;
pub use types::{
    Applied, ClusterNode, Command, CommandResponse, Outcome, SharedObject, TypeConfig, UpdatePart,
};

/// The openraft handle with Flotilla's types.
pub type Raft = openraft::Raft<TypeConfig, storage::StateMachine>;
