//! The control plane, run by the Raft leader only: the scheduler and the controllers. Each is a
//! pure function from a snapshot of the cluster and `now` to actions; `run` (the shell) takes
//! snapshots from the local store, executes the actions through Raft and repeats, for as long
//! as this node leads, in two lanes: the scheduler's and the other controllers'. Writes carry
//! the resourceVersion they were decided on, so a decision made on a stale snapshot (or by a
//! deposed leader, or by one lane on a state the other lane has moved on) fails with a
//! conflict instead of acting.

pub mod deployment;
pub mod endpoints;
pub mod event_budget;
pub mod gc;
pub mod load_balancer;
pub mod node_lifecycle;
mod recorder;
pub mod replicaset;
mod runner;
pub mod scheduler;

pub use runner::{run, ControlConfig};

use std::collections::HashMap;
use std::sync::Arc;

use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::{Endpoints, Node, Pod, Service};
use serde_json::Value;

/// What the control plane sees in one pass.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Shared, as are the pods: the snapshot cache parses an object once, for both lanes of
    /// the control plane and for every pass until it changes (moving whole objects from one
    /// pass's list to the next was a tenth of a busy leader's CPU).
    pub nodes: Vec<Arc<Node>>,
    pub pods: Vec<Arc<Pod>>,
    pub replica_sets: Vec<ReplicaSet>,
    pub deployments: Vec<Deployment>,
    pub services: Vec<Service>,
    pub endpoints: Vec<Endpoints>,
    /// When the leader last heard each node's heartbeat, in milliseconds since the Unix epoch
    /// (kept in its memory: `flotilla_raft::liveness`).
    pub heartbeats: HashMap<String, i64>,
    /// Milliseconds since the Unix epoch.
    pub now_ms: i64,
}

/// A change decided by a controller, executed through Raft by the shell.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Create this object (the shell fills in uid and creationTimestamp).
    Create(Value),
    /// Replace metadata and spec; the object's `metadata.resourceVersion` is the precondition.
    Update(Value),
    /// Replace status; the object's `metadata.resourceVersion`, when set, is the precondition.
    UpdateStatus(Value),
    /// Delete the object of this kind, namespace and name, if it still has this resourceVersion
    /// (when given).
    Delete {
        kind: String,
        namespace: String,
        name: String,
        resource_version: Option<String>,
    },
    /// Record an Event about an object.
    Event {
        involved_kind: String,
        namespace: String,
        name: String,
        uid: String,
        event_type: String,
        reason: String,
        message: String,
    },
}
