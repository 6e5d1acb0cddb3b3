//! Local multi-node clusters: every node a container running this build of `flotilla` on the
//! host's Docker daemon, as `../shared/design/test-cluster.md` describes, plus the faults the
//! chaos harness injects (kill, pause, restart, silent partitions).
//!
//! Topology of a cluster named `NAME` whose addresses come from `10.P.0.0/16`:
//! - one cluster network `flt-NAME` (`10.P.0.0/24`); node `i` is `10.P.0.(10+i)`;
//! - one pod network per node, `flt-NAME-pods-i` (`10.P.i.0/24`), created with the bridge's
//!   own address inhibited, so the node container itself holds the gateway `10.P.i.1` and its
//!   pods route through it as they would through their host.
//!
//! Owns: the node image, the cluster's networks and node containers, and the iptables rules
//! of its faults (inside the node containers' own network namespaces). Every object carries
//! the label `io.flotilla.local=NAME`, so `down` finds all of it, including the pods' containers
//! (labelled with the cluster id by the nodes' agents). Must not depend on the store or the
//! node's internals: it knows containers, networks and the `Cluster.Status` RPC.

pub mod addressing;
mod cluster;
mod faults;
pub mod image;

use std::time::Duration;

pub use addressing::Addressing;
pub use cluster::{
    connect_docker, credentials_path, down, DownReport, LocalCluster, LocalNode, UpOptions,
};

/// The labels of everything a local cluster creates.
pub mod labels {
    /// The local cluster's name, on its networks and node containers.
    pub const LOCAL: &str = "io.flotilla.local";
    /// The node's name, on a node container.
    pub const LOCAL_NODE: &str = "io.flotilla.local.node";
    /// The node's index (1-based), on a node container.
    pub const LOCAL_INDEX: &str = "io.flotilla.local.index";
    /// The second octet of the cluster's addresses (`10.P.0.0/16`), on the cluster network.
    pub const LOCAL_PREFIX: &str = "io.flotilla.local.prefix";
    /// The cluster id, on node containers; the agents put it on the pods' containers.
    pub const CLUSTER: &str = "io.flotilla.cluster";
    /// The node name the agents put on the pods' containers.
    pub const NODE: &str = "io.flotilla.node";
    /// On node images built from a `flotilla` binary.
    pub const NODE_IMAGE: &str = "io.flotilla.node-image";
}

/// The gRPC port every node container listens on.
pub const NODE_PORT: u16 = 7070;

#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error("{action}: {source}")]
    Docker {
        action: String,
        #[source]
        source: bollard::errors::Error,
    },
    #[error("{action}: {source}")]
    Io {
        action: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{action}: {message}")]
    Command { action: String, message: String },
    #[error(
        "no local cluster named {name:?} (no container labelled {}={name})",
        labels::LOCAL
    )]
    NoSuchCluster { name: String },
    #[error("local cluster {cluster:?} has no node {node:?} (nodes: {known})")]
    NoSuchNode {
        cluster: String,
        node: String,
        known: String,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("{what} within {waited:?}: {last}")]
    Timeout {
        what: String,
        waited: Duration,
        last: String,
    },
}

pub(crate) fn docker_error(
    action: impl Into<String>,
) -> impl FnOnce(bollard::errors::Error) -> LocalError {
    let action = action.into();
    move |source| LocalError::Docker { action, source }
}

pub(crate) fn io_error(action: impl Into<String>) -> impl FnOnce(std::io::Error) -> LocalError {
    let action = action.into();
    move |source| LocalError::Io { action, source }
}

/// The HTTP status of a Docker error, if the engine answered with one.
pub(crate) fn docker_status(error: &bollard::errors::Error) -> Option<u16> {
    match error {
        bollard::errors::Error::DockerResponseServerError { status_code, .. } => Some(*status_code),
        _ => None,
    }
}
