//! Simulated nodes: Node objects that the harness itself registers (Ready) through the Objects
//! API and keeps alive with heartbeats through `Cluster.NodeHeartbeat`, the way an agent
//! would, with no Docker and no agent behind them. Nothing runs the pods bound to them; they exist so that the scheduler
//! and the controllers can be measured on far more nodes than one machine could run.
//!
//! A simulated node is named `sim-0000`, `sim-0001`, … It offers a fixed capacity, and carries
//! its own pod subnet (`spec.podCIDR`, from 10.128.0.0/10, away from the cluster CIDR 10.244/16
//! that the store hands out a /24 at a time): the store would otherwise assign one and it has
//! only 256.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use flotilla_proto::cluster_client::ClusterClient;
use flotilla_proto::objects_client::ObjectsClient;
use flotilla_proto::{NodeHeartbeatRequest, ObjectRequest};
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tonic::transport::Channel;

/// The label that names a node.
pub const HOSTNAME_LABEL: &str = "kubernetes.io/hostname";
/// The label every simulated node carries, so that they can be told from real ones.
pub const SIMULATED_LABEL: &str = "flotilla.io/simulated";
/// What one simulated node offers, as capacity and as allocatable.
pub const NODE_CPU: &str = "32";
pub const NODE_MEMORY: &str = "128Gi";
pub const NODE_PODS: &str = "110";
/// Pod subnets of simulated nodes are /24s carved from 10.128.0.0/10 (16,384 of them).
const MAX_SIMULATED_NODES: usize = 1 << 14;

/// The name of simulated node `index`: `sim-0000`, `sim-0001`, …
pub fn node_name(index: usize) -> String {
    format!("sim-{index:04}")
}

/// The pod subnet of simulated node `index`, from 10.128.0.0/10.
pub fn pod_cidr(index: usize) -> Result<String> {
    if index >= MAX_SIMULATED_NODES {
        bail!("at most {MAX_SIMULATED_NODES} simulated nodes have a pod subnet");
    }
    Ok(format!("10.{}.{}.0/24", 128 + index / 256, index % 256))
}

/// Formats seconds since the Unix epoch as RFC 3339 in UTC with whole seconds
/// (`2024-05-01T12:34:56Z`), as Kubernetes writes `lastHeartbeatTime`.
pub fn rfc3339_seconds(unix_seconds: u64) -> String {
    let days = unix_seconds / 86_400;
    let rest = unix_seconds % 86_400;
    let (hour, minute, second) = (rest / 3600, rest % 3600 / 60, rest % 60);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let mp = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}Z")
}

/// Now, as [`rfc3339_seconds`] formats it.
pub fn now_rfc3339() -> String {
    let seconds = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_secs());
    rfc3339_seconds(seconds)
}

/// The status a simulated node posts: its fixed capacity and a Ready condition whose
/// `lastHeartbeatTime` is `now`; Ready since `ready_since`.
pub fn node_status(now: &str, ready_since: &str) -> Value {
    let resources = json!({"cpu": NODE_CPU, "memory": NODE_MEMORY, "pods": NODE_PODS});
    json!({
        "capacity": resources,
        "allocatable": resources,
        "conditions": [{
            "type": "Ready", "status": "True", "reason": "SimulatedReady",
            "message": "simulated node (no Docker): status posted by the benchmark",
            "lastHeartbeatTime": now, "lastTransitionTime": ready_since,
        }],
        "nodeInfo": {
            "kubeletVersion": "simulated", "containerRuntimeVersion": "none",
            "operatingSystem": "linux", "architecture": "amd64",
            "machineID": "", "systemUUID": "", "bootID": "", "kernelVersion": "", "osImage": "",
            "kubeProxyVersion": "",
        },
    })
}

/// The Node object that registers simulated node `index`, Ready as of `now`.
pub fn node_json(index: usize, now: &str) -> Result<Vec<u8>> {
    let name = node_name(index);
    let cidr = pod_cidr(index)?;
    let object = json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": {
                HOSTNAME_LABEL: name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                SIMULATED_LABEL: "true",
            },
        },
        "spec": {"podCIDR": cidr, "podCIDRs": [cidr]},
        "status": node_status(now, now),
    });
    serde_json::to_vec(&object).context("encode a simulated Node as JSON")
}

/// Runs `count` calls `call(index)` for `index` in `0..count`, at most `concurrency` at a time;
/// fails with the first error (after the calls in flight finished).
pub async fn bounded<F, Fut>(count: usize, concurrency: usize, call: F) -> Result<()>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Result<()>> + Send + 'static,
{
    let mut tasks = JoinSet::new();
    let mut first_error = None;
    for index in 0..count {
        while tasks.len() >= concurrency.max(1) {
            if let Some(joined) = tasks.join_next().await {
                record(joined, &mut first_error);
            }
        }
        if first_error.is_some() {
            break;
        }
        tasks.spawn(call(index));
    }
    while let Some(joined) = tasks.join_next().await {
        record(joined, &mut first_error);
    }
    match first_error {
        Some(err) => Err(err),
        None => Ok(()),
    }
}

fn record(joined: Result<Result<()>, tokio::task::JoinError>, first: &mut Option<anyhow::Error>) {
    let outcome = joined.map_err(|err| anyhow!("a task failed: {err}"));
    if let Err(err) | Ok(Err(err)) = outcome {
        first.get_or_insert(err);
    }
}

/// Registers simulated nodes `0..count` with `Objects.Create`, `concurrency` at a time, spread
/// over `clients` (node `i` through client `i % len`).
pub async fn register_nodes(
    clients: &[ObjectsClient<Channel>],
    count: usize,
    concurrency: usize,
    timeout: Duration,
) -> Result<()> {
    if clients.is_empty() {
        bail!("no client to register simulated nodes through");
    }
    let now = now_rfc3339();
    bounded(count, concurrency, |index| {
        let mut client = clients[index % clients.len()].clone();
        let body = node_json(index, &now);
        async move {
            let object_json = body?;
            tokio::time::timeout(timeout, client.create(ObjectRequest { object_json }))
                .await
                .map_err(|_| anyhow!("creating {} timed out after {timeout:?}", node_name(index)))?
                .with_context(|| format!("create simulated node {}", node_name(index)))?;
            Ok(())
        }
    })
    .await
}

/// What the heartbeat loop saw, shared with whoever wants to report progress.
#[derive(Debug, Default)]
pub struct HeartbeatStats {
    pub rounds: AtomicU64,
    pub posted: AtomicU64,
    pub failed: AtomicU64,
    /// The longest round (one heartbeat of every node), in milliseconds.
    pub max_round_ms: AtomicU64,
    /// The last round's duration, in milliseconds.
    pub last_round_ms: AtomicU64,
    /// The first failed heartbeat, as a message.
    pub first_failure: Mutex<Option<String>>,
}

impl HeartbeatStats {
    fn fail(&self, message: impl FnOnce() -> String) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        let mut first = self
            .first_failure
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if first.is_none() {
            *first = Some(message());
        }
    }
}

/// A running heartbeat loop; [`Heartbeats::stop`] ends it.
pub struct Heartbeats {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Option<String>>,
    pub stats: Arc<HeartbeatStats>,
}

impl Heartbeats {
    /// Starts sending the heartbeats of simulated nodes `0..count` (`Cluster.NodeHeartbeat`,
    /// as an agent does: kept in the leader's memory) every `interval`, `concurrency` calls at
    /// a time spread over `clients`, each call bounded by `timeout`. A round that takes longer
    /// than the interval is followed by the next one at once. Their status, Ready since
    /// registration, stays as `register_nodes` wrote it.
    pub fn start(
        clients: Vec<(SocketAddr, ClusterClient<Channel>)>,
        count: usize,
        interval: Duration,
        concurrency: usize,
        timeout: Duration,
    ) -> Self {
        let (stop, mut stopped) = watch::channel(false);
        let stats = Arc::new(HeartbeatStats::default());
        let shared = Arc::clone(&stats);
        let task = tokio::spawn(async move {
            let mut first_error: Option<String> = None;
            let mut ticker = tokio::time::interval(interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = ticker.tick() => {}
                    _ = stopped.changed() => return first_error,
                }
                if *stopped.borrow() || clients.is_empty() {
                    return first_error;
                }
                let started = Instant::now();
                let round = bounded(count, concurrency, |index| {
                    let (addr, client) = &clients[index % clients.len()];
                    let (addr, mut client) = (*addr, client.clone());
                    let stats = Arc::clone(&shared);
                    async move {
                        let call = client.node_heartbeat(NodeHeartbeatRequest {
                            node_name: node_name(index),
                        });
                        let outcome = tokio::time::timeout(timeout, call).await;
                        match outcome {
                            Ok(Ok(_)) => {
                                stats.posted.fetch_add(1, Ordering::Relaxed);
                                Ok(())
                            }
                            // Keep going: a missed heartbeat is counted, not fatal.
                            Ok(Err(status)) => {
                                stats.fail(|| {
                                    format!(
                                        "heartbeat of {} via {addr}: {}",
                                        node_name(index),
                                        status.message()
                                    )
                                });
                                Ok(())
                            }
                            Err(_) => {
                                stats.fail(|| {
                                    format!(
                                        "heartbeat of {} via {addr}: timed out after {timeout:?}",
                                        node_name(index)
                                    )
                                });
                                Ok(())
                            }
                        }
                    }
                });
                tokio::select! {
                    result = round => {
                        if let Err(err) = result {
                            first_error.get_or_insert_with(|| format!("{err:#}"));
                        }
                    }
                    _ = stopped.changed() => return first_error,
                }
                let millis = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
                shared.rounds.fetch_add(1, Ordering::Relaxed);
                shared.last_round_ms.store(millis, Ordering::Relaxed);
                shared.max_round_ms.fetch_max(millis, Ordering::Relaxed);
            }
        });
        Self { stop, task, stats }
    }

    /// Stops the loop; returns the first error it met, if any.
    pub async fn stop(self) -> Result<Option<String>> {
        let _ = self.stop.send(true);
        self.task.await.context("join the heartbeat loop")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_of_known_instants() {
        assert_eq!(rfc3339_seconds(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339_seconds(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339_seconds(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339_seconds(4_102_444_799), "2099-12-31T23:59:59Z");
    }

    #[test]
    fn names_and_subnets() -> Result<()> {
        assert_eq!(node_name(7), "sim-0007");
        assert_eq!(pod_cidr(0)?, "10.128.0.0/24");
        assert_eq!(pod_cidr(999)?, "10.131.231.0/24");
        assert!(pod_cidr(MAX_SIMULATED_NODES).is_err());
        Ok(())
    }
}
