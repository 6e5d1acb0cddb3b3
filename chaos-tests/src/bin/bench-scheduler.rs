//! Scheduler throughput benchmark: pods per second from creation to a binding committed through
//! Raft, on a Flotilla cluster of real `flotilla serve --no-agent` processes (3 by default)
//! with 1,000 SIMULATED nodes.
//!
//! The simulated nodes are Node objects this program registers (Ready) through the Objects API
//! and keeps alive with a heartbeat each every second (`Cluster.NodeHeartbeat`, kept in the
//! leader's memory), as 1,000 agents would; no Docker, no agent, nothing runs the pods (see
//! `chaos_tests::simulated`). The control plane on the Raft leader sees ordinary Nodes.
//!
//! Then it creates 10,000 single-container pods (no `nodeName`): by default itself, with
//! bounded concurrency, as 100 owner-less label groups (kube-scheduler_perf's `createPods`);
//! with `--create-by replica-set` as one ReplicaSet of 10,000 replicas whose controller on the
//! leader creates them (Swarm's `service create --replicas`, a Nomad job's `count`). It
//! watches pods from the list's resourceVersion on the leader, and records when each pod is
//! first seen, and first seen with `spec.nodeName` set. It reports the creation rate and, for
//! its own creates, each one's latency (p50, p99; by Little's law, creates in flight / latency
//! bounds the rate), the scheduling throughput (pods / (last binding − first create) and pods / (last
//! binding − last create)) against the goal, and checks that every pod is bound, that no node
//! holds more than it allows, and how evenly the pods spread. Every process it starts is killed
//! and every temporary directory removed on exit, on error and on Ctrl-C.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use chaos_tests::cluster::{connect, FlotillaCluster};
use chaos_tests::process::{cpu_ticks, TICKS_PER_SECOND};
use chaos_tests::simulated::{self, Heartbeats};
use chaos_tests::stats::{millis, percentile};
use clap::{Parser, ValueEnum};
use flotilla_proto::cluster_client::ClusterClient;
use flotilla_proto::objects_client::ObjectsClient;
use flotilla_proto::{ListRequest, ObjectRequest, WatchRequest};
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tonic::transport::Channel;
use tonic::Code;

/// The goal: scheduling throughput in pods per second.
const GOAL_PODS_PER_SECOND: f64 = 5_000.0;
/// kube-scheduler's scheduler_perf thresholds for 5,000 nodes (SchedulingBasic), pods/s.
const KUBE_FLOOR_LOW: f64 = 680.0;
const KUBE_FLOOR_HIGH: f64 = 810.0;
/// How long opening a client connection may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one create, heartbeat or list may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How many times one pod create is tried when the outcome was not an answer.
const CREATE_ATTEMPTS: usize = 5;
/// The pause before trying a failed create again.
const CREATE_RETRY_PAUSE: Duration = Duration::from_millis(50);
/// How many times the pod watch is reopened (after a list) before giving up.
const MAX_WATCH_RESTARTS: usize = 20;
/// The largest reply this program accepts (a list of 10,000 pods is several MB).
const MAX_REPLY_BYTES: usize = 512 * 1024 * 1024;
/// The label all benchmark pods carry, and its value.
const POD_LABEL: (&str, &str) = ("bench", "scheduler");
/// The namespace of the benchmark pods.
const NAMESPACE: &str = "default";

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum SendTo {
    /// Spread requests over every node (followers forward writes to the leader).
    All,
    /// Send every request to the leader.
    Leader,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum CreateBy {
    /// This program creates every pod itself through the Objects API (kube-scheduler_perf's
    /// `createPods`), `--in-flight` at a time.
    Clients,
    /// This program creates one ReplicaSet of `--pods` replicas and the ReplicaSet controller on
    /// the leader creates the pods (as `kubectl scale`, Swarm's `service create --replicas` or a
    /// Nomad job's `count`).
    ReplicaSet,
}

#[derive(Debug, Parser)]
#[command(
    about = "Scheduler throughput: pods created → bound (committed through Raft), on simulated nodes"
)]
struct Args {
    /// The flotilla binary [default: `flotilla` next to this executable].
    #[arg(long)]
    flotilla: Option<PathBuf>,
    /// How many simulated nodes (Node objects kept Ready by this program).
    #[arg(long, default_value_t = 1000)]
    nodes: usize,
    /// How many pods to create and wait to be bound.
    #[arg(long, default_value_t = 10_000)]
    pods: usize,
    /// How many `flotilla serve --no-agent` processes.
    #[arg(long, default_value_t = 3)]
    cluster_size: usize,
    /// Give up when the pods are not all bound this long after the first create.
    #[arg(long, default_value_t = 300)]
    timeout_seconds: u64,
    /// Pod creates in flight at once.
    #[arg(long, default_value_t = 64)]
    in_flight: usize,
    /// Label groups the pods are spread over (owner-less pods spread by their labels).
    #[arg(long, default_value_t = 100)]
    groups: usize,
    /// Interval between two heartbeat rounds of the simulated nodes, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    heartbeat_ms: u64,
    /// Heartbeats (and node registrations) in flight at once.
    #[arg(long, default_value_t = 64)]
    heartbeat_concurrency: usize,
    /// Who creates the pods.
    #[arg(long, value_enum, default_value_t = CreateBy::Clients)]
    create_by: CreateBy,
    /// Where node registrations, heartbeats and pod creates go (the watch is on the leader).
    #[arg(long, value_enum, default_value_t = SendTo::All)]
    send_to: SendTo,
    /// Diagnostic: also watch Events and show how many `Scheduled` Events (one per binding)
    /// were added each second.
    #[arg(long)]
    trace_events: bool,
    /// How long the cluster may take to start, in seconds.
    #[arg(long, default_value_t = 60)]
    ready_timeout: u64,
}

/// The JSON of benchmark pod `index`: one container, small requests, no node.
fn pod_json(index: usize, groups: usize) -> Result<Vec<u8>> {
    let object = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": pod_name(index),
            "namespace": NAMESPACE,
            "labels": {
                POD_LABEL.0: POD_LABEL.1,
                "group": format!("g{:03}", index % groups.max(1)),
            },
        },
        "spec": pod_spec(),
    });
    serde_json::to_vec(&object).context("encode a pod as JSON")
}

/// The spec of every benchmark pod, created by the bench or by the ReplicaSet.
fn pod_spec() -> serde_json::Value {
    json!({
        "containers": [{
            "name": "main",
            "image": "flotilla/busybox:latest",
            "command": ["sleep", "3600"],
            "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}},
        }],
    })
}

/// The name of the ReplicaSet of `--create-by replica-set`.
const REPLICA_SET_NAME: &str = "bench-scheduler";

/// The JSON of the ReplicaSet whose controller creates `replicas` benchmark pods: the same
/// container and requests as [`pod_json`], selected by the benchmark label.
fn replica_set_json(replicas: usize) -> Result<Vec<u8>> {
    let object = json!({
        "apiVersion": "apps/v1",
        "kind": "ReplicaSet",
        "metadata": {"name": REPLICA_SET_NAME, "namespace": NAMESPACE},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {POD_LABEL.0: POD_LABEL.1}},
            "template": {
                "metadata": {"labels": {POD_LABEL.0: POD_LABEL.1}},
                "spec": pod_spec(),
            },
        },
    });
    serde_json::to_vec(&object).context("encode the ReplicaSet as JSON")
}

fn pod_name(index: usize) -> String {
    format!("bench-pod-{index:05}")
}

/// Name and `spec.nodeName` (when set and not empty) of a pod's JSON.
fn name_and_node(object_json: &[u8]) -> Result<(String, Option<String>)> {
    let pod: Value = serde_json::from_slice(object_json).context("parse a pod's JSON")?;
    let name = pod
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .ok_or_else(|| anyhow!("a pod without a name"))?
        .to_owned();
    let node = pod
        .pointer("/spec/nodeName")
        .and_then(Value::as_str)
        .filter(|node| !node.is_empty())
        .map(str::to_owned);
    Ok((name, node))
}

/// What the pod watcher observed.
#[derive(Debug, Default)]
struct Observed {
    /// When each pod was first seen bound, and to which node.
    bound: HashMap<String, (Instant, String)>,
    /// When each pod was first seen at all (its creation, as the watch delivered it).
    first_seen: HashMap<String, Instant>,
    /// DELETED events of benchmark pods (the node lifecycle deletes the pods of silent nodes).
    deleted: usize,
    /// How many times the watch was reopened after a list.
    restarts: usize,
    /// Why the watch last ended, when it did.
    last_watch_end: Option<String>,
}

impl Observed {
    fn saw(&mut self, name: String, node: Option<String>, at: Instant, counts: &WatchCounts) {
        if !self.first_seen.contains_key(&name) {
            self.first_seen.insert(name.clone(), at);
            counts.seen.store(self.first_seen.len(), Ordering::Relaxed);
        }
        if let Some(node) = node {
            if let std::collections::hash_map::Entry::Vacant(entry) = self.bound.entry(name) {
                entry.insert((at, node));
                counts.bound.store(self.bound.len(), Ordering::Relaxed);
            }
        }
    }
}

/// What the pod watcher has seen so far, for the progress lines: pods seen at all, pods bound.
#[derive(Debug, Default)]
struct WatchCounts {
    seen: AtomicUsize,
    bound: AtomicUsize,
}

/// Lists the benchmark pods through `client`; returns their JSON and the list's
/// resourceVersion.
async fn list_pods(client: &mut ObjectsClient<Channel>) -> Result<(Vec<Vec<u8>>, String)> {
    let request = ListRequest {
        kind: "Pod".to_owned(),
        namespace: NAMESPACE.to_owned(),
        label_selector: format!("{}={}", POD_LABEL.0, POD_LABEL.1),
        field_selector: String::new(),
        local: false,
    };
    let reply = tokio::time::timeout(REQUEST_TIMEOUT, client.list(request))
        .await
        .map_err(|_| anyhow!("listing pods timed out after {REQUEST_TIMEOUT:?}"))?
        .context("list pods")?
        .into_inner();
    Ok((reply.items_json, reply.resource_version))
}

/// Watches the benchmark pods from `resource_version` until `target` of them were seen bound,
/// `stop` is set, or the watch cannot be reopened; reopens a broken watch after a list.
async fn watch_pods(
    mut client: ObjectsClient<Channel>,
    mut resource_version: String,
    target: usize,
    counts: Arc<WatchCounts>,
    mut stop: watch::Receiver<bool>,
) -> Observed {
    let mut observed = Observed::default();
    loop {
        let request = WatchRequest {
            kind: "Pod".to_owned(),
            namespace: NAMESPACE.to_owned(),
            label_selector: format!("{}={}", POD_LABEL.0, POD_LABEL.1),
            field_selector: String::new(),
            resource_version: resource_version.clone(),
        };
        let ended = match client.watch(request).await {
            Err(status) => format!("open the watch: {}", status.message()),
            Ok(reply) => {
                let mut stream = reply.into_inner();
                loop {
                    if observed.bound.len() >= target {
                        return observed;
                    }
                    let message = tokio::select! {
                        message = stream.message() => message,
                        _ = stop.changed() => return observed,
                    };
                    match message {
                        Ok(Some(event)) => {
                            let at = Instant::now();
                            match name_and_node(&event.object_json) {
                                Ok((name, node)) => {
                                    if event.r#type == "DELETED" {
                                        observed.deleted += 1;
                                    } else {
                                        observed.saw(name, node, at, &counts);
                                    }
                                }
                                Err(err) => {
                                    observed.last_watch_end = Some(format!("{err:#}"));
                                }
                            }
                        }
                        Ok(None) => break "the server ended the watch".to_owned(),
                        Err(status) => break format!("the watch failed: {}", status.message()),
                    }
                }
            }
        };
        println!("  pod watch ended ({ended}); listing and watching again");
        observed.last_watch_end = Some(ended);
        if observed.restarts >= MAX_WATCH_RESTARTS || *stop.borrow() {
            return observed;
        }
        observed.restarts += 1;
        // Catch up through a list (its bound pods count as seen now) and watch from it.
        match list_pods(&mut client).await {
            Ok((items, rv)) => {
                let at = Instant::now();
                for item in items {
                    if let Ok((name, node)) = name_and_node(&item) {
                        observed.saw(name, node, at, &counts);
                    }
                }
                resource_version = rv;
            }
            Err(err) => {
                observed.last_watch_end = Some(format!("{err:#}"));
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// The pod creates: when they ran and how they went.
#[derive(Debug)]
struct Creation {
    first_sent: Instant,
    last_acked: Instant,
    retried: usize,
    /// How long each create took, from its first attempt to its answer, sorted.
    latencies: Vec<Duration>,
}

/// Creates pods `0..args.pods` with `args.in_flight` workers, spread over `clients`.
async fn create_pods(
    clients: &[ObjectsClient<Channel>],
    args: &Args,
    created: Arc<AtomicUsize>,
    first_sent: Arc<OnceLock<Instant>>,
) -> Result<Creation> {
    if clients.is_empty() {
        bail!("no client to create pods through");
    }
    let next = Arc::new(AtomicUsize::new(0));
    let retried = Arc::new(AtomicUsize::new(0));
    let mut workers = JoinSet::new();
    for worker in 0..args.in_flight.max(1) {
        let mut client = clients[worker % clients.len()].clone();
        let (next, retried, created, first_sent) = (
            Arc::clone(&next),
            Arc::clone(&retried),
            Arc::clone(&created),
            Arc::clone(&first_sent),
        );
        let (pods, groups) = (args.pods, args.groups);
        workers.spawn(async move {
            let mut last_acked = None;
            let mut latencies = Vec::new();
            loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                if index >= pods {
                    return Ok::<_, anyhow::Error>((last_acked, latencies));
                }
                let object_json = pod_json(index, groups)?;
                let started = Instant::now();
                let mut attempt = 0;
                loop {
                    attempt += 1;
                    first_sent.get_or_init(Instant::now);
                    let call = client.create(ObjectRequest {
                        object_json: object_json.clone(),
                    });
                    let outcome = tokio::time::timeout(REQUEST_TIMEOUT, call).await;
                    let error = match outcome {
                        Ok(Ok(_)) => None,
                        // An earlier attempt whose answer was lost was taken after all.
                        Ok(Err(status)) if attempt > 1 && status.code() == Code::AlreadyExists => {
                            None
                        }
                        Ok(Err(status)) => {
                            Some(format!("{:?}: {}", status.code(), status.message()))
                        }
                        Err(_) => Some(format!("timed out after {REQUEST_TIMEOUT:?}")),
                    };
                    match error {
                        None => break,
                        Some(error) if attempt >= CREATE_ATTEMPTS => {
                            bail!("create {} ({attempt} attempts): {error}", pod_name(index))
                        }
                        Some(_) => {
                            retried.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(CREATE_RETRY_PAUSE).await;
                        }
                    }
                }
                created.fetch_add(1, Ordering::Relaxed);
                let acked = Instant::now();
                latencies.push(acked - started);
                last_acked = Some(acked);
            }
        });
    }
    let mut last_acked: Option<Instant> = None;
    let mut latencies = Vec::with_capacity(args.pods);
    while let Some(joined) = workers.join_next().await {
        let (worker_last, worker_latencies) = joined.context("join a create worker")??;
        last_acked = last_acked.max(worker_last);
        latencies.extend(worker_latencies);
    }
    latencies.sort();
    let first_sent = first_sent
        .get()
        .copied()
        .ok_or_else(|| anyhow!("no create was sent"))?;
    Ok(Creation {
        first_sent,
        last_acked: last_acked.ok_or_else(|| anyhow!("no create was acknowledged"))?,
        retried: retried.load(Ordering::Relaxed),
        latencies,
    })
}

/// Creates the ReplicaSet of `args.pods` replicas through `client`, retrying a create whose
/// outcome was not an answer; its controller on the leader creates the pods.
async fn create_replica_set(
    client: &ObjectsClient<Channel>,
    args: &Args,
    first_sent: &OnceLock<Instant>,
) -> Result<Creation> {
    let object_json = replica_set_json(args.pods)?;
    let started = *first_sent.get_or_init(Instant::now);
    let mut retried = 0;
    let mut client = client.clone();
    for attempt in 1..=CREATE_ATTEMPTS {
        let call = client.create(ObjectRequest {
            object_json: object_json.clone(),
        });
        let error = match tokio::time::timeout(REQUEST_TIMEOUT, call).await {
            Ok(Ok(_)) => None,
            Ok(Err(status)) if attempt > 1 && status.code() == Code::AlreadyExists => None,
            Ok(Err(status)) => Some(format!("{:?}: {}", status.code(), status.message())),
            Err(_) => Some(format!("timed out after {REQUEST_TIMEOUT:?}")),
        };
        match error {
            None => {
                let acked = Instant::now();
                return Ok(Creation {
                    first_sent: started,
                    last_acked: acked,
                    retried,
                    latencies: vec![acked - started],
                });
            }
            Some(error) if attempt == CREATE_ATTEMPTS => {
                bail!("create replicaset/{REPLICA_SET_NAME} ({attempt} attempts): {error}")
            }
            Some(_) => {
                retried += 1;
                tokio::time::sleep(CREATE_RETRY_PAUSE).await;
            }
        }
    }
    bail!("create replicaset/{REPLICA_SET_NAME}: no attempt made")
}

/// The CPU seconds each process used since `before` (its ticks then, in the same order).
fn cpu_seconds_since(processes: &[(String, String)], before: &[Option<u64>]) -> Vec<(String, f64)> {
    processes
        .iter()
        .zip(before)
        .filter_map(|((label, pid), before)| {
            let used = cpu_ticks(pid)?.saturating_sub((*before)?);
            Some((label.clone(), used as f64 / TICKS_PER_SECOND))
        })
        .collect()
}

/// What the progress lines show.
struct Progress {
    /// Pod creates this program had answered (none with `--create-by replica-set`).
    created: Arc<AtomicUsize>,
    /// Pods the watch has seen, and seen bound.
    counts: Arc<WatchCounts>,
    /// `Scheduled` Events seen, when they are traced.
    scheduled_events: Option<Arc<AtomicUsize>>,
    first_sent: Arc<OnceLock<Instant>>,
    heartbeats: Arc<simulated::HeartbeatStats>,
    /// The processes whose CPU use is shown: a label and a PID (`self` for this program).
    processes: Vec<(String, String)>,
}

/// Prints one progress line a second until `stop` is set: pods created and seen bound, the
/// heartbeat loop's state, and the CPU use of the nodes and of this program.
async fn progress(progress: Progress, mut stop: watch::Receiver<bool>, max_lines: u64) {
    let started = Instant::now();
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut previous_bound = 0;
    let mut previous_events = 0;
    let mut previous_cpu: Vec<Option<u64>> = progress
        .processes
        .iter()
        .map(|(_, pid)| cpu_ticks(pid))
        .collect();
    let mut previous_tick = Instant::now();
    for _ in 0..max_lines {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.changed() => return,
        }
        let since = progress.first_sent.get().copied().unwrap_or(started);
        let now_bound = progress.counts.bound.load(Ordering::Relaxed);
        let events = match &progress.scheduled_events {
            Some(events) => {
                let now_events = events.load(Ordering::Relaxed);
                let line = format!(
                    " Scheduled events {now_events:>6} (+{:>5}/s)",
                    now_events.saturating_sub(previous_events)
                );
                previous_events = now_events;
                line
            }
            None => String::new(),
        };
        let elapsed = previous_tick.elapsed().as_secs_f64().max(0.001);
        previous_tick = Instant::now();
        let mut cpu = Vec::new();
        for ((label, pid), previous) in progress.processes.iter().zip(previous_cpu.iter_mut()) {
            let now = cpu_ticks(pid);
            if let (Some(now), Some(before)) = (now, *previous) {
                let percent = (now.saturating_sub(before)) as f64 / TICKS_PER_SECOND / elapsed;
                cpu.push(format!("{label} {:.0}%", percent * 100.0));
            }
            *previous = now;
        }
        let heartbeats = &progress.heartbeats;
        println!(
            "  t={:>6.2}s created {:>6} seen {:>6} bound {:>6} (+{:>5}/s){events}  heartbeat \
             rounds {} (last {} ms, {} failed)  cpu {}",
            since.elapsed().as_secs_f64(),
            progress.created.load(Ordering::Relaxed),
            progress.counts.seen.load(Ordering::Relaxed),
            now_bound,
            now_bound.saturating_sub(previous_bound),
            heartbeats.rounds.load(Ordering::Relaxed),
            heartbeats.last_round_ms.load(Ordering::Relaxed),
            heartbeats.failed.load(Ordering::Relaxed),
            cpu.join(", "),
        );
        previous_bound = now_bound;
    }
}

/// Counts the `Scheduled` Events (one per binding, written by the control plane) added after
/// `resource_version`, until `stop` is set or the watch ends. A diagnostic of `--trace-events`.
async fn count_scheduled_events(
    mut client: ObjectsClient<Channel>,
    resource_version: String,
    count: Arc<AtomicUsize>,
    mut stop: watch::Receiver<bool>,
) -> Option<String> {
    let request = WatchRequest {
        kind: "Event".to_owned(),
        namespace: NAMESPACE.to_owned(),
        resource_version,
        ..WatchRequest::default()
    };
    let mut stream = match client.watch(request).await {
        Ok(reply) => reply.into_inner(),
        Err(status) => return Some(format!("open the Event watch: {}", status.message())),
    };
    loop {
        let message = tokio::select! {
            message = stream.message() => message,
            _ = stop.changed() => return None,
        };
        match message {
            Ok(Some(event)) if event.r#type == "ADDED" => {
                let scheduled = serde_json::from_slice::<Value>(&event.object_json)
                    .ok()
                    .is_some_and(|e| e["reason"] == "Scheduled");
                if scheduled {
                    count.fetch_add(1, Ordering::Relaxed);
                }
            }
            Ok(Some(_)) => {}
            Ok(None) => return Some("the server ended the Event watch".to_owned()),
            Err(status) => return Some(format!("the Event watch failed: {}", status.message())),
        }
    }
}

/// The pods per node and the Ready nodes, read back through a linearizable list.
#[derive(Debug)]
struct Verification {
    pods_listed: usize,
    pods_bound: usize,
    /// Bound pods per simulated node, every simulated node included.
    per_node: BTreeMap<String, usize>,
    /// Pods bound to a node that is not one of the simulated ones.
    elsewhere: usize,
    nodes_ready: usize,
    nodes_tainted: usize,
}

async fn verify(client: &mut ObjectsClient<Channel>, nodes: usize) -> Result<Verification> {
    let (items, _) = list_pods(client).await?;
    let mut per_node: BTreeMap<String, usize> =
        (0..nodes).map(|i| (simulated::node_name(i), 0)).collect();
    let mut pods_bound = 0;
    let mut elsewhere = 0;
    for item in &items {
        let (_, node) = name_and_node(item)?;
        if let Some(node) = node {
            pods_bound += 1;
            match per_node.get_mut(&node) {
                Some(count) => *count += 1,
                None => elsewhere += 1,
            }
        }
    }
    let request = ListRequest {
        kind: "Node".to_owned(),
        label_selector: format!("{}=true", simulated::SIMULATED_LABEL),
        ..ListRequest::default()
    };
    let reply = tokio::time::timeout(REQUEST_TIMEOUT, client.list(request))
        .await
        .map_err(|_| anyhow!("listing nodes timed out after {REQUEST_TIMEOUT:?}"))?
        .context("list nodes")?
        .into_inner();
    let mut nodes_ready = 0;
    let mut nodes_tainted = 0;
    for item in &reply.items_json {
        let node: Value = serde_json::from_slice(item).context("parse a node's JSON")?;
        let ready = node
            .pointer("/status/conditions")
            .and_then(Value::as_array)
            .is_some_and(|c| {
                c.iter()
                    .any(|c| c["type"] == "Ready" && c["status"] == "True")
            });
        if ready {
            nodes_ready += 1;
        }
        if node
            .pointer("/spec/taints")
            .and_then(Value::as_array)
            .is_some_and(|taints| !taints.is_empty())
        {
            nodes_tainted += 1;
        }
    }
    Ok(Verification {
        pods_listed: items.len(),
        pods_bound,
        per_node,
        elsewhere,
        nodes_ready,
        nodes_tainted,
    })
}

/// The command line, quoted for a POSIX shell where needed.
fn command_line() -> String {
    std::env::args()
        .map(|arg| {
            let plain = !arg.is_empty()
                && arg
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./=,:+@".contains(c));
            if plain {
                arg
            } else {
                format!("'{}'", arg.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn rate(count: usize, over: Duration) -> f64 {
    let seconds = over.as_secs_f64();
    if seconds > 0.0 {
        count as f64 / seconds
    } else {
        f64::INFINITY
    }
}

/// An Objects client of the node at `addr` that accepts large replies.
async fn objects_client(addr: SocketAddr) -> Result<ObjectsClient<Channel>> {
    Ok(ObjectsClient::new(connect(addr, CONNECT_TIMEOUT).await?)
        .max_decoding_message_size(MAX_REPLY_BYTES))
}

async fn connect_all(addrs: &[SocketAddr]) -> Result<Vec<(SocketAddr, ObjectsClient<Channel>)>> {
    let mut clients = Vec::with_capacity(addrs.len());
    for &addr in addrs {
        clients.push((addr, objects_client(addr).await?));
    }
    Ok(clients)
}

async fn run(args: &Args, command: &str) -> Result<bool> {
    let flotilla = chaos_tests::process::flotilla_binary(args.flotilla.as_deref())?;
    if args.nodes == 0 || args.pods == 0 || args.cluster_size == 0 {
        bail!("--nodes, --pods and --cluster-size must be at least 1");
    }
    let pods_per_node: usize = simulated::NODE_PODS.parse().context("parse NODE_PODS")?;
    if args.pods > args.nodes * pods_per_node {
        bail!(
            "{} pods do not fit on {} nodes of {pods_per_node} pods each",
            args.pods,
            args.nodes
        );
    }
    println!("flotilla: {}", flotilla.display());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!("cores: {cores} (this program and the cluster share them)");

    let ready_timeout = Duration::from_secs(args.ready_timeout);
    let mut cluster = FlotillaCluster::start(&flotilla, args.cluster_size, ready_timeout)
        .await
        .with_context(|| format!("start a {}-node Flotilla cluster", args.cluster_size))?;
    let (leader, status) = cluster.wait_ready(ready_timeout).await?;
    let members: Vec<String> = cluster
        .nodes()
        .iter()
        .map(|n| {
            let pid = n
                .pid()
                .map_or_else(|| "-".to_owned(), |pid| pid.to_string());
            format!("{} {} pid {pid}", n.name(), n.addr())
        })
        .collect();
    println!(
        "Flotilla {}-node cluster ready (--no-agent): {}; leader {}",
        args.cluster_size,
        members.join(", "),
        status.leader.as_deref().unwrap_or("?")
    );
    let leader_addr = cluster
        .nodes()
        .get(leader)
        .map(|n| n.addr())
        .ok_or_else(|| anyhow!("no node {leader}"))?;
    let targets = match args.send_to {
        SendTo::All => cluster.addresses(),
        SendTo::Leader => vec![leader_addr],
    };

    // Simulated nodes: registered and kept Ready by this program, no Docker behind them.
    let registration_clients: Vec<_> = connect_all(&targets)
        .await?
        .into_iter()
        .map(|(_, client)| client)
        .collect();
    let registering = Instant::now();
    simulated::register_nodes(
        &registration_clients,
        args.nodes,
        args.heartbeat_concurrency,
        REQUEST_TIMEOUT,
    )
    .await
    .context("register the simulated nodes")?;
    println!(
        "simulated nodes (no Docker): {} Node objects (cpu {}, memory {}, pods {}) registered \
         in {:.2} s; this program sends their heartbeats every {} ms ({} in flight)",
        args.nodes,
        simulated::NODE_CPU,
        simulated::NODE_MEMORY,
        simulated::NODE_PODS,
        registering.elapsed().as_secs_f64(),
        args.heartbeat_ms,
        args.heartbeat_concurrency
    );
    let mut heartbeat_clients = Vec::with_capacity(targets.len());
    for &addr in &targets {
        heartbeat_clients.push((
            addr,
            ClusterClient::new(connect(addr, CONNECT_TIMEOUT).await?),
        ));
    }
    let heartbeats = Heartbeats::start(
        heartbeat_clients,
        args.nodes,
        Duration::from_millis(args.heartbeat_ms.max(1)),
        args.heartbeat_concurrency,
        REQUEST_TIMEOUT,
    );
    let heartbeat_stats = Arc::clone(&heartbeats.stats);
    // Let one heartbeat round pass, so that the pods meet a cluster in its steady state.
    let settle_deadline = Instant::now() + Duration::from_secs(30);
    while heartbeat_stats.rounds.load(Ordering::Relaxed) < 2 && Instant::now() < settle_deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Watch the pods on the leader (where the scheduler commits) from the list's version.
    let mut watch_client = objects_client(leader_addr).await?;
    let (existing, resource_version) = list_pods(&mut watch_client).await?;
    if !existing.is_empty() {
        bail!("{} benchmark pods exist before the run", existing.len());
    }
    let (stop_sender, stop) = watch::channel(false);
    let counts = Arc::new(WatchCounts::default());
    let created = Arc::new(AtomicUsize::new(0));
    let first_sent = Arc::new(OnceLock::new());
    let watcher = tokio::spawn(watch_pods(
        watch_client,
        resource_version,
        args.pods,
        Arc::clone(&counts),
        stop.clone(),
    ));
    let scheduled_events = if args.trace_events {
        let count = Arc::new(AtomicUsize::new(0));
        let (_, rv) = list_pods(&mut objects_client(leader_addr).await?).await?;
        tokio::spawn(count_scheduled_events(
            objects_client(leader_addr).await?,
            rv,
            Arc::clone(&count),
            stop.clone(),
        ));
        Some(count)
    } else {
        None
    };
    let mut processes: Vec<(String, String)> = cluster
        .nodes()
        .iter()
        .filter_map(|n| Some((n.name().to_owned(), n.pid()?.to_string())))
        .collect();
    processes.push(("bench".to_owned(), "self".to_owned()));
    let cpu_processes = processes.clone();
    let progress_task = tokio::spawn(progress(
        Progress {
            created: Arc::clone(&created),
            counts: Arc::clone(&counts),
            scheduled_events: scheduled_events.clone(),
            first_sent: Arc::clone(&first_sent),
            heartbeats: Arc::clone(&heartbeat_stats),
            processes,
        },
        stop.clone(),
        args.timeout_seconds + 60,
    ));
    match args.create_by {
        CreateBy::Clients => println!(
            "creating {} pods ({} in flight, {} label groups, cpu 10m memory 16Mi each) ...",
            args.pods, args.in_flight, args.groups
        ),
        CreateBy::ReplicaSet => println!(
            "creating replicaset/{REPLICA_SET_NAME} of {} replicas (cpu 10m memory 16Mi each); \
             the controller on the leader creates the pods ...",
            args.pods
        ),
    }
    let create_clients: Vec<_> = connect_all(&targets)
        .await?
        .into_iter()
        .map(|(_, client)| client)
        .collect();
    let timeout = Duration::from_secs(args.timeout_seconds);
    let heartbeats_before = heartbeat_stats.posted.load(Ordering::Relaxed);
    let cpu_before: Vec<Option<u64>> = cpu_processes
        .iter()
        .map(|(_, pid)| cpu_ticks(pid))
        .collect();
    let creation = match args.create_by {
        CreateBy::Clients => tokio::time::timeout(
            timeout,
            create_pods(&create_clients, args, Arc::clone(&created), first_sent),
        )
        .await
        .map_err(|_| anyhow!("the pods were not all created within {timeout:?}"))??,
        CreateBy::ReplicaSet => {
            let client = create_clients
                .first()
                .ok_or_else(|| anyhow!("no client to create the ReplicaSet through"))?;
            create_replica_set(client, args, &first_sent).await?
        }
    };
    if args.create_by == CreateBy::Clients {
        let creation_time = creation.last_acked - creation.first_sent;
        println!(
            "  all {} pods created in {:.2} s ({:.0} pods/s, {} retried)",
            args.pods,
            creation_time.as_secs_f64(),
            rate(args.pods, creation_time),
            creation.retried
        );
    }

    // Wait until every pod was seen bound, or the time is up.
    let deadline = tokio::time::Instant::from_std(creation.first_sent + timeout);
    let mut watcher = watcher;
    let observed = tokio::select! {
        joined = &mut watcher => Some(joined.context("join the pod watcher")?),
        _ = tokio::time::sleep_until(deadline) => None,
    };
    let cpu_used = cpu_seconds_since(&cpu_processes, &cpu_before);
    let heartbeats_during = heartbeat_stats
        .posted
        .load(Ordering::Relaxed)
        .saturating_sub(heartbeats_before);
    let events_during = scheduled_events
        .as_ref()
        .map(|count| count.load(Ordering::Relaxed) as u64);
    let _ = stop_sender.send(true);
    let observed = match observed {
        Some(observed) => observed,
        None => watcher.await.context("join the pod watcher")?,
    };
    let _ = progress_task.await;

    let mut verify_client = objects_client(leader_addr).await?;
    let verification = verify(&mut verify_client, args.nodes).await?;
    let heartbeat_error = heartbeats.stop().await?;
    cluster
        .wait_ready(ready_timeout)
        .await
        .context("the cluster after the run")?;

    // The report. The last create is the last answer to this program's creates, or, when the
    // controller created the pods, the moment the watch first showed the last of them.
    let last_created = match args.create_by {
        CreateBy::Clients => creation.last_acked,
        CreateBy::ReplicaSet => observed
            .first_seen
            .values()
            .copied()
            .max()
            .unwrap_or(creation.last_acked),
    };
    let creation_time = last_created.saturating_duration_since(creation.first_sent);
    let last_binding = observed.bound.values().map(|(at, _)| *at).max();
    let all_bound = observed.bound.len() == args.pods;
    println!();
    println!("command: {command}");
    println!(
        "setup: {}-node Flotilla cluster (flotilla serve --no-agent) on 127.0.0.1, {cores} cores \
         shared with this program; pods created by {}; requests sent to {}; binding watch on \
         the leader",
        args.cluster_size,
        match args.create_by {
            CreateBy::Clients => "this program",
            CreateBy::ReplicaSet => "one ReplicaSet (the controller on the leader)",
        },
        match args.send_to {
            SendTo::All => "every node",
            SendTo::Leader => "the leader",
        }
    );
    println!(
        "simulated nodes (no Docker): {} Node objects registered and heartbeated by this \
         program every {} ms: {} heartbeat rounds, longest {} ms, {} heartbeat(s) failed{}",
        args.nodes,
        args.heartbeat_ms,
        heartbeat_stats.rounds.load(Ordering::Relaxed),
        heartbeat_stats.max_round_ms.load(Ordering::Relaxed),
        heartbeat_stats.failed.load(Ordering::Relaxed),
        heartbeat_stats
            .first_failure
            .lock()
            .ok()
            .and_then(|first| first.clone())
            .map(|first| format!(" (first: {first})"))
            .unwrap_or_default()
    );
    if let Some(err) = heartbeat_error {
        println!("  heartbeat loop error: {err}");
    }
    println!();
    println!(
        "{:<58} {:>12} {:>10} {:>12}",
        "measure", "value", "goal", "value/goal"
    );
    println!("{}", "-".repeat(95));
    println!(
        "{:<58} {:>12} {:>10} {:>12}",
        match args.create_by {
            CreateBy::Clients => format!("pods created ({} in flight), pods/s", args.in_flight),
            CreateBy::ReplicaSet =>
                "pods created by the ReplicaSet (seen by the watch), pods/s".to_owned(),
        },
        format!("{:.0}", rate(args.pods, creation_time)),
        "-",
        "-"
    );
    println!(
        "{:<58} {:>12} {:>10} {:>12}",
        "  creation time, s",
        format!("{:.2}", creation_time.as_secs_f64()),
        "-",
        "-"
    );
    if args.create_by == CreateBy::Clients {
        println!(
            "{:<58} {:>12} {:>10} {:>12}",
            "  create latency p50 / p99, ms",
            format!(
                "{} / {}",
                percentile(&creation.latencies, 50.0).map_or_else(|| "-".into(), millis),
                percentile(&creation.latencies, 99.0).map_or_else(|| "-".into(), millis)
            ),
            "-",
            "-"
        );
    }
    let mut throughput = None;
    if let Some(last) = last_binding {
        let from_first = last.saturating_duration_since(creation.first_sent);
        let from_last_create = last.saturating_duration_since(last_created);
        let total = rate(observed.bound.len(), from_first);
        throughput = Some(total);
        for (label, value, over) in [
            (
                "scheduling: pods / (last binding - first create), pods/s",
                total,
                from_first,
            ),
            (
                "scheduling: pods / (last binding - last create), pods/s",
                rate(observed.bound.len(), from_last_create),
                from_last_create,
            ),
        ] {
            println!(
                "{label:<58} {:>12} {:>10} {:>12}",
                format!("{value:.0}"),
                format!("{GOAL_PODS_PER_SECOND:.0}"),
                format!("{:.2}", value / GOAL_PODS_PER_SECOND)
            );
            println!(
                "{:<58} {:>12} {:>10} {:>12}",
                "  over, s",
                format!("{:.2}", over.as_secs_f64()),
                "-",
                "-"
            );
        }
    }
    if let Some(total) = throughput {
        println!(
            "{:<58} {:>12} {:>10} {:>12}",
            "kube-scheduler_perf floor (5,000 nodes), pods/s",
            format!("{total:.0}"),
            format!("{KUBE_FLOOR_LOW:.0}-{KUBE_FLOOR_HIGH:.0}"),
            format!(
                "{:.2}-{:.2}",
                total / KUBE_FLOOR_HIGH,
                total / KUBE_FLOOR_LOW
            )
        );
    }
    if let Some(last) = last_binding {
        // Every one of these is a Raft log entry of its own; bindings go many per entry.
        let seconds = last
            .saturating_duration_since(creation.first_sent)
            .as_secs_f64();
        let events = events_during;
        // The ReplicaSet controller records a SuccessfulCreate Event per pod it creates, at
        // most 25 about one ReplicaSet at once (the control plane's Event budget, as
        // client-go's spam filter).
        let create_events = match args.create_by {
            CreateBy::Clients => 0,
            CreateBy::ReplicaSet => args.pods.min(25) as u64,
        };
        let writes = args.pods as u64 + create_events + events.unwrap_or(0);
        println!();
        println!(
            "single-object writes from first create to last binding: {} pod creates{}{} = \
             {writes} in {seconds:.2} s ({:.0}/s), plus the bindings (many per log entry); \
             {heartbeats_during} node heartbeats (kept in the leader's memory, not the log)",
            args.pods,
            if create_events > 0 {
                format!(" + {create_events} SuccessfulCreate Events")
            } else {
                String::new()
            },
            match events {
                Some(events) => format!(" + {events} Scheduled Events"),
                None => " (+ the Scheduled Events: see --trace-events)".to_owned(),
            },
            writes as f64 / seconds.max(0.001)
        );
    }
    let cpu_total: f64 = cpu_used.iter().map(|(_, seconds)| seconds).sum();
    println!(
        "CPU from first create to last binding seen: {cpu_total:.2} s ({:.0} ms per 1,000 pods): {}",
        cpu_total * 1000.0 / args.pods.max(1) as f64 * 1000.0,
        cpu_used
            .iter()
            .map(|(label, seconds)| format!("{label} {seconds:.2} s"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!();
    let counts: Vec<usize> = verification.per_node.values().copied().collect();
    let min = counts.iter().min().copied().unwrap_or(0);
    let max = counts.iter().max().copied().unwrap_or(0);
    let empty = counts.iter().filter(|&&c| c == 0).count();
    let over = counts.iter().filter(|&&c| c > pods_per_node).count();
    let checks = [
        (
            "every pod seen bound through the watch",
            all_bound,
            format!(
                "{}/{} (watch reopened {} time(s){})",
                observed.bound.len(),
                args.pods,
                observed.restarts,
                observed
                    .last_watch_end
                    .as_deref()
                    .map(|why| format!(", last end: {why}"))
                    .unwrap_or_default()
            ),
        ),
        (
            "every pod bound in the store (linearizable list)",
            verification.pods_listed == args.pods && verification.pods_bound == args.pods,
            format!(
                "{} listed, {} bound, {} on a node that is not simulated",
                verification.pods_listed, verification.pods_bound, verification.elsewhere
            ),
        ),
        (
            "no pod deleted",
            observed.deleted == 0,
            format!("{} DELETED event(s)", observed.deleted),
        ),
        (
            "no node over its pod capacity",
            over == 0 && max <= pods_per_node,
            format!("max {max} of {pods_per_node}; {over} node(s) over"),
        ),
        (
            "spread: min/max pods per node",
            max.saturating_sub(min) <= 2 || max <= 2 * min.max(1),
            format!(
                "min {min}, max {max}, mean {:.1}; {empty} node(s) empty",
                verification.pods_bound as f64 / args.nodes as f64
            ),
        ),
        (
            "simulated nodes Ready and untainted at the end",
            verification.nodes_ready == args.nodes && verification.nodes_tainted == 0,
            format!(
                "{} Ready, {} tainted, of {}",
                verification.nodes_ready, verification.nodes_tainted, args.nodes
            ),
        ),
    ];
    let mut passed = true;
    for (label, ok, detail) in &checks {
        passed &= *ok;
        println!("{} {label:<50} {detail}", if *ok { "ok  " } else { "FAIL" });
    }
    Ok(passed)
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let command = command_line();
    println!("command: {command}");
    // Dropping `run`'s future on a signal drops the cluster guard, which kills its processes
    // and removes its directory.
    let result = tokio::select! {
        result = run(&args, &command) => result,
        signal = chaos_tests::process::shutdown_signal() => match signal {
            Ok(()) => Err(anyhow!("interrupted; stopped every process started")),
            Err(err) => Err(err),
        },
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("error: a check failed (see above)");
            ExitCode::FAILURE
        }
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
