//! The openraft type configuration and the commands that go through the log.

use std::fmt;
use std::ops::Deref;
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

use crate::object::ObjectKey;
use crate::store::StoreError;

/// The address book entry of a Raft member, carried in the membership config.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterNode {
    /// The node's unique name (`--name`).
    pub name: String,
    /// `HOST:PORT` of the node's gRPC server.
    pub address: String,
}

impl fmt::Display for ClusterNode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.name, self.address)
    }
}

openraft::declare_raft_types!(
    /// Flotilla's Raft: JSON-shaped object commands, `u64` node ids, named nodes.
    pub TypeConfig:
        D = Command,
        R = CommandResponse,
        NodeId = u64,
        Node = ClusterNode,
);

/// Which part of a stored object an update replaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum UpdatePart {
    /// Metadata and spec (everything but status).
    Main,
    /// Status only.
    Status,
}

/// The object a command carries, shared: a log entry is copied for the recent-entries cache,
/// for every follower's replication stream and for the apply, and a deep copy of every object
/// each time was a tenth of a busy leader's CPU. Encoded as the object itself.
#[derive(Debug, Clone, PartialEq)]
pub struct SharedObject(Arc<Value>);

impl SharedObject {
    /// Whether both are the same shared object (not merely equal ones).
    pub fn is_same(&self, other: &SharedObject) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }

    /// The object, copied only when another holder still shares it.
    pub fn into_value(self) -> Value {
        Arc::unwrap_or_clone(self.0)
    }
}

impl From<Value> for SharedObject {
    fn from(object: Value) -> Self {
        SharedObject(Arc::new(object))
    }
}

impl Deref for SharedObject {
    type Target = Value;

    fn deref(&self) -> &Value {
        &self.0
    }
}

impl Serialize for SharedObject {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for SharedObject {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Value::deserialize(deserializer).map(SharedObject::from)
    }
}

/// A state change proposed through Raft. Every field that is not a pure function of the log
/// (uids, timestamps) is filled in by the proposer, so applying a command is deterministic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Command {
    /// The first command of a new cluster: registers the first node and creates the
    /// built-in namespaces. A no-op when the cluster is already bootstrapped.
    Bootstrap {
        cluster_id: String,
        node_name: String,
        node_address: String,
        namespaces: Vec<Value>,
        /// The `/16` node pod subnets come from; empty means the default.
        #[serde(default)]
        cluster_cidr: String,
    },
    /// Gives a new node name a Raft id. Ids are never reused.
    RegisterNode {
        name: String,
        address: String,
    },
    /// Forgets a node name after the node left the membership.
    ForgetNode {
        name: String,
    },
    Create {
        object: SharedObject,
    },
    /// Create, or replace metadata and spec of the existing object.
    Apply {
        object: SharedObject,
    },
    /// Replace a part of an existing object; `metadata.resourceVersion` of `object`, when set,
    /// is a precondition.
    Update {
        object: SharedObject,
        part: UpdatePart,
    },
    Delete {
        key: ObjectKey,
        resource_version: Option<u64>,
    },
    /// Binds an unbound pod to a node (sets `spec.nodeName`), the pod's resourceVersion a
    /// precondition: the scheduler's bindings, a few bytes each instead of the whole pod.
    Bind {
        key: ObjectKey,
        resource_version: u64,
        node: String,
    },
    /// Several object commands in one log entry (the scheduler's bindings under load); each
    /// succeeds or fails on its own.
    Batch(Vec<Command>),
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Command::Bootstrap { node_name, .. } => write!(f, "bootstrap({node_name})"),
            Command::RegisterNode { name, .. } => write!(f, "register-node({name})"),
            Command::ForgetNode { name } => write!(f, "forget-node({name})"),
            Command::Create { .. } => write!(f, "create"),
            Command::Apply { .. } => write!(f, "apply"),
            Command::Update { part, .. } => write!(f, "update({part:?})"),
            Command::Delete { key, .. } => write!(f, "delete({key})"),
            Command::Bind { key, node, .. } => write!(f, "bind({key} to {node})"),
            Command::Batch(commands) => write!(f, "batch({})", commands.len()),
        }
    }
}

/// What applying a command did to an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    Created,
    Configured,
    Unchanged,
    Deleted,
    /// Not an object command (bootstrap, membership bookkeeping).
    Done,
}

impl Outcome {
    /// The word kubectl prints for this outcome.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Created => "created",
            Outcome::Configured => "configured",
            Outcome::Unchanged => "unchanged",
            Outcome::Deleted => "deleted",
            Outcome::Done => "done",
        }
    }
}

/// The successful result of a command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Applied {
    pub outcome: Outcome,
    /// The object as stored after the command (for deletes: as it was deleted).
    pub object: Option<SharedObject>,
    /// For `RegisterNode`: the id given to the node.
    pub node_id: Option<u64>,
}

/// The state machine's answer to one command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct CommandResponse {
    pub result: Option<Result<Applied, StoreError>>,
    /// For `Batch`: one result per command, in order.
    #[serde(default)]
    pub batch: Vec<Result<Applied, StoreError>>,
}

impl CommandResponse {
    pub fn into_result(self) -> Result<Applied, StoreError> {
        self.result.unwrap_or(Ok(Applied {
            outcome: Outcome::Done,
            object: None,
            node_id: None,
        }))
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_shared_object_is_encoded_as_the_object_itself_so_stored_logs_still_read() {
        let object = json!({"kind": "ConfigMap", "metadata": {"name": "a"}, "data": {"k": "v"}});
        let command = Command::Update {
            object: object.clone().into(),
            part: UpdatePart::Main,
        };
        let encoded = serde_json::to_value(&command).expect("encodes");
        assert_eq!(
            encoded,
            json!({"Update": {"object": object, "part": "Main"}})
        );
        let decoded: Command = serde_json::from_value(encoded).expect("decodes");
        assert_eq!(decoded, command);
    }

    #[test]
    fn a_copied_command_shares_its_object_and_gives_it_up_intact() {
        let object = json!({"kind": "Pod", "spec": {"nodeName": "n1"}});
        let shared = SharedObject::from(object.clone());
        let copy = shared.clone();
        assert!(
            std::ptr::eq(&*shared, &*copy),
            "a copy points at the same object"
        );
        assert_eq!(copy.into_value(), object);
        assert_eq!(shared.into_value(), object);
    }
}
