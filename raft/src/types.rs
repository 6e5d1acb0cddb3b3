//! The openraft type configuration and the commands that go through the log.

use std::fmt;

use serde::{Deserialize, Serialize};
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
        object: Value,
    },
    /// Create, or replace metadata and spec of the existing object.
    Apply {
        object: Value,
    },
    /// Replace a part of an existing object; `metadata.resourceVersion` of `object`, when set,
    /// is a precondition.
    Update {
        object: Value,
        part: UpdatePart,
    },
    Delete {
        key: ObjectKey,
        resource_version: Option<u64>,
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
    pub object: Option<Value>,
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
