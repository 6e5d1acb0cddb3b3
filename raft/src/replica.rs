//! A node's handle on the replicated store: opens the storage and Raft, writes through the
//! leader (forwarding when this node is not the leader), reads linearizably or locally, and
//! watches.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use flotilla_proto::{NodeHeartbeatRequest, ReadIndexRequest};
use openraft::async_runtime::WatchReceiver;
use openraft::{Config, ReadPolicy, SnapshotPolicy};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::forwarder::{Attempt, Forwarder, LeaderChanged};
use crate::liveness::{self, NodeHeartbeats};
use crate::network::{Network, PeerChannels};
use crate::object::ObjectKey;
use crate::proposer::{ProposeError, Proposer};
use crate::selector::{FieldSelector, LabelSelector};
use crate::server::RaftService;
use crate::storage::{open_db, LogStore, StateMachine, StoreReader};
use crate::store::StoreError;
use crate::types::{Applied, ClusterNode, Command, CommandResponse};
use crate::watch::{run_watch, WatchFilter, WatchHub, WatchRecord};
use crate::Raft;

/// Raft timing and log retention of a node.
#[derive(Debug, Clone)]
pub struct ReplicaConfig {
    pub cluster_name: String,
    pub heartbeat_interval_ms: u64,
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    /// A snapshot is built after this many entries since the last one.
    pub snapshot_every_entries: u64,
    /// Entries kept in the log behind the last snapshot, for followers slightly behind.
    pub log_entries_kept_after_snapshot: u64,
    /// How long a write waits for a leader before it fails.
    pub write_timeout: Duration,
}

impl Default for ReplicaConfig {
    fn default() -> Self {
        // Fast failover, yet no spurious elections on a busy 2-core machine: five heartbeats
        // may be missed before the shortest election timeout. openraft's leader lease equals
        // the longest election timeout, so failover takes about that long plus one election.
        ReplicaConfig {
            cluster_name: "flotilla".into(),
            heartbeat_interval_ms: 60,
            election_timeout_min_ms: 300,
            election_timeout_max_ms: 500,
            snapshot_every_entries: 10_000,
            log_entries_kept_after_snapshot: 1_000,
            write_timeout: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    /// The store refused the command (not found, conflict, invalid...).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// No leader could take the request in time; nothing was written.
    #[error("cluster unavailable: {0}")]
    Unavailable(String),
    /// The request reached a leader but its outcome is unknown (the leader failed meanwhile).
    #[error("outcome unknown: {0}")]
    Unknown(String),
    #[error("open the store: {0}")]
    Open(String),
}

/// How long a heartbeat forwarded to the leader may take; the next heartbeat is the retry.
const HEARTBEAT_FORWARD_TIMEOUT: Duration = Duration::from_secs(2);

/// Shared by the node's API servers. Cheap to clone.
#[derive(Clone)]
pub struct Replica {
    inner: Arc<Inner>,
}

struct Inner {
    node_id: u64,
    raft: Raft,
    reader: StoreReader,
    hub: WatchHub,
    channels: PeerChannels,
    write_timeout: Duration,
    heartbeats: NodeHeartbeats,
    proposer: Proposer,
    forwarder: Forwarder,
}

impl Replica {
    /// Opens the node's store under `data_dir` and starts Raft as `node_id`. Returns the replica
    /// and the service to mount on the node's gRPC server.
    pub async fn open(
        node_id: u64,
        data_dir: &Path,
        config: &ReplicaConfig,
        peer_tls: Arc<rustls::ClientConfig>,
    ) -> Result<(Replica, RaftService), ReplicaError> {
        let db = open_db(&data_dir.join("store"))
            .map_err(|e| ReplicaError::Open(format!("{e}: {:?}", std::error::Error::source(&e))))?;
        let hub = WatchHub::new();
        let log_store = LogStore::new(db.clone()).map_err(|e| ReplicaError::Open(e.to_string()))?;
        let state_machine = StateMachine::new(db.clone(), data_dir.join("snapshots"), hub.clone())
            .map_err(|e| ReplicaError::Open(e.to_string()))?;
        let reader = state_machine.reader();
        let raft_config = Config {
            cluster_name: config.cluster_name.clone(),
            heartbeat_interval: config.heartbeat_interval_ms,
            election_timeout_min: config.election_timeout_min_ms,
            election_timeout_max: config.election_timeout_max_ms,
            install_snapshot_timeout: 30_000,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(config.snapshot_every_entries),
            max_in_snapshot_log_to_keep: config.log_entries_kept_after_snapshot,
            enable_pre_vote: Some(true),
            ..Default::default()
        }
        .validate()
        .map_err(|e| ReplicaError::Open(format!("invalid Raft configuration: {e}")))?;
        let channels = PeerChannels::new(peer_tls);
        let network = Network {
            channels: channels.clone(),
        };
        let raft = Raft::new(
            node_id,
            Arc::new(raft_config),
            network,
            log_store,
            state_machine,
        )
        .await
        .map_err(|e| ReplicaError::Open(format!("start Raft: {e}")))?;
        let heartbeats = NodeHeartbeats::default();
        let proposer = Proposer::start(raft.clone());
        let watched = raft.clone();
        let leader_changed: LeaderChanged = Arc::new(move |leader_id| {
            let waiter = watched.wait(None);
            Box::pin(async move {
                let _ = waiter
                    .metrics(
                        move |m| m.current_leader != Some(leader_id),
                        "the leader to change",
                    )
                    .await;
            })
        });
        let forwarder = Forwarder::start(channels.clone(), leader_changed);
        let replica = Replica {
            inner: Arc::new(Inner {
                node_id,
                raft: raft.clone(),
                reader,
                hub,
                channels,
                write_timeout: config.write_timeout,
                heartbeats: heartbeats.clone(),
                proposer: proposer.clone(),
                forwarder,
            }),
        };
        Ok((replica, RaftService::new(raft, heartbeats, proposer)))
    }

    pub fn node_id(&self) -> u64 {
        self.inner.node_id
    }

    pub fn raft(&self) -> &Raft {
        &self.inner.raft
    }

    pub fn reader(&self) -> &StoreReader {
        &self.inner.reader
    }

    pub fn channels(&self) -> &PeerChannels {
        &self.inner.channels
    }

    /// The leader's id and address as this node knows them.
    pub fn leader(&self) -> Option<(u64, ClusterNode)> {
        let metrics = self.inner.raft.metrics().borrow_watched().clone();
        let leader = metrics.current_leader?;
        let node = metrics
            .membership_config
            .membership()
            .get_node(&leader)?
            .clone();
        Some((leader, node))
    }

    /// The node heartbeats this node received while it led (see [`liveness`]).
    pub fn node_heartbeats(&self) -> &NodeHeartbeats {
        &self.inner.heartbeats
    }

    /// Tells the leader that `node_name` is alive: recorded here when this node leads,
    /// forwarded otherwise. Not retried: the next heartbeat is the retry.
    pub async fn heartbeat(&self, node_name: &str) -> Result<(), ReplicaError> {
        let (leader_id, leader) = self
            .leader()
            .ok_or_else(|| ReplicaError::Unavailable("no leader is elected".into()))?;
        if leader_id == self.inner.node_id {
            self.inner.heartbeats.record(node_name, liveness::now_ms());
            return Ok(());
        }
        let unavailable = |why: String| {
            ReplicaError::Unavailable(format!(
                "send the heartbeat of node {node_name:?} to leader {}: {why}",
                leader.name
            ))
        };
        let mut client = self
            .inner
            .channels
            .raft_client(&leader.address)
            .map_err(|e| unavailable(e.to_string()))?;
        let request = NodeHeartbeatRequest {
            node_name: node_name.to_string(),
        };
        match tokio::time::timeout(HEARTBEAT_FORWARD_TIMEOUT, client.heartbeat(request)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(status)) => Err(unavailable(status.message().to_string())),
            Err(_) => Err(unavailable(format!(
                "no answer within {HEARTBEAT_FORWARD_TIMEOUT:?}"
            ))),
        }
    }

    /// Commits `command` through the leader and returns what the state machine made of it.
    /// Waits for a leader up to the write timeout; retries only when the write certainly was
    /// not taken.
    pub async fn write(&self, command: Command) -> Result<Applied, ReplicaError> {
        self.write_response(command)
            .await?
            .into_result()
            .map_err(ReplicaError::Store)
    }

    /// Commits several object commands as one log entry; each has its own result.
    pub async fn write_batch(
        &self,
        commands: Vec<Command>,
    ) -> Result<Vec<Result<Applied, StoreError>>, ReplicaError> {
        Ok(self.write_response(Command::Batch(commands)).await?.batch)
    }

    async fn write_response(&self, command: Command) -> Result<CommandResponse, ReplicaError> {
        let deadline = Instant::now() + self.inner.write_timeout;
        let mut pause = Duration::from_millis(20);
        loop {
            match self.try_write(&command).await {
                Ok(response) => return Ok(response),
                Err(Attempt::Ambiguous(message)) => return Err(ReplicaError::Unknown(message)),
                Err(Attempt::Retry(message)) => {
                    if Instant::now() + pause > deadline {
                        return Err(ReplicaError::Unavailable(message));
                    }
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(200));
                }
            }
        }
    }

    async fn try_write(&self, command: &Command) -> Result<CommandResponse, Attempt> {
        let Some((leader_id, leader)) = self.leader() else {
            return Err(Attempt::Retry("no leader is elected".into()));
        };
        if leader_id == self.inner.node_id {
            return match self.inner.proposer.propose(command.clone()).await {
                Ok(response) => Ok(response),
                Err(ProposeError::NotLeader(message)) => Err(Attempt::Retry(message)),
                Err(ProposeError::Unknown(message)) => Err(Attempt::Ambiguous(message)),
            };
        }
        self.inner
            .forwarder
            .forward(command.clone(), leader_id, leader)
            .await
    }

    /// Waits until this node's state machine reflects every write acknowledged before the call.
    pub async fn read_barrier(&self) -> Result<(), ReplicaError> {
        let deadline = Instant::now() + self.inner.write_timeout;
        let mut pause = Duration::from_millis(20);
        loop {
            let attempt = self.try_read_barrier().await;
            match attempt {
                Ok(()) => return Ok(()),
                Err(message) => {
                    if Instant::now() + pause > deadline {
                        return Err(ReplicaError::Unavailable(message));
                    }
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(200));
                }
            }
        }
    }

    async fn try_read_barrier(&self) -> Result<(), String> {
        let (leader_id, leader) = self.leader().ok_or("no leader is elected")?;
        if leader_id == self.inner.node_id {
            return self
                .inner
                .raft
                .ensure_linearizable(ReadPolicy::ReadIndex)
                .await
                .map(drop)
                .map_err(|e| e.to_string());
        }
        let mut client = self
            .inner
            .channels
            .raft_client(&leader.address)
            .map_err(|e| e.to_string())?;
        let read_index = client
            .read_index(ReadIndexRequest {})
            .await
            .map_err(|status| {
                format!(
                    "ask leader {} for a read index: {}",
                    leader.name,
                    status.message()
                )
            })?
            .into_inner()
            .read_index;
        self.inner
            .raft
            .wait(Some(self.inner.write_timeout))
            .applied_index_at_least(Some(read_index), "linearizable read")
            .await
            .map(drop)
            .map_err(|e| e.to_string())
    }

    pub async fn get(
        &self,
        key: &ObjectKey,
        linearizable: bool,
    ) -> Result<serde_json::Value, ReplicaError> {
        if linearizable {
            self.read_barrier().await?;
        }
        self.inner
            .reader
            .get(key)?
            .ok_or_else(|| ReplicaError::Store(StoreError::NotFound { key: key.clone() }))
    }

    pub async fn list(
        &self,
        kind: &str,
        namespace: Option<&str>,
        labels: &LabelSelector,
        fields: &FieldSelector,
        linearizable: bool,
    ) -> Result<(Vec<serde_json::Value>, u64), ReplicaError> {
        if linearizable {
            self.read_barrier().await?;
        }
        Ok(self.inner.reader.list(kind, namespace, labels, fields)?)
    }

    /// Starts a watch; events arrive on the returned channel until it is dropped.
    pub fn watch(
        &self,
        filter: WatchFilter,
        from: Option<u64>,
    ) -> mpsc::Receiver<Result<WatchRecord, StoreError>> {
        // Bounded: a client that does not read stalls only its own watch task.
        let (sink, events) = mpsc::channel(256);
        tokio::spawn(run_watch(
            self.inner.reader.clone(),
            self.inner.hub.clone(),
            filter,
            from,
            sink,
        ));
        events
    }
}
