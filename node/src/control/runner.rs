//! The shell of the control plane: while this node leads, take a snapshot of the local store,
//! ask the scheduler and the controllers what to do, and do it through Raft.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use flotilla_raft::selector::{FieldSelector, LabelSelector};
use flotilla_raft::{
    kinds, store, Command, ObjectKey, Replica, ReplicaError, StoreError, UpdatePart,
};
use futures::StreamExt;
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use super::gc::{self, Tracked};
use super::{
    deployment, endpoints, load_balancer, node_lifecycle, replicaset, scheduler, Action, Snapshot,
};
use crate::events::{event_name, event_object, EventSpec};
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::{Endpoints, Node, Pod, Service};

/// Binding batches (log entries) committed at once.
const BINDING_BATCHES_IN_FLIGHT: usize = 4;
/// How often the garbage collector runs.
const COLLECTION_INTERVAL: Duration = Duration::from_secs(5);
/// The pause after a pass that bound pods, instead of the pass interval.
const BUSY_PASS_INTERVAL: Duration = Duration::from_millis(10);
/// After a pass that wrote something, the next one comes after `BUSY_PASS_INTERVAL` rather
/// than a whole interval, since one controller's write is often another's input (a lost node's
/// pods deleted → replacements created → bound); at most this many such passes in a row.
const MAX_FOLLOW_UP_PASSES: u32 = 5;

/// What one pass did.
struct PassOutcome {
    /// Pods bound.
    bound: usize,
    /// Other writes that committed.
    written: usize,
    /// How long taking the snapshot and deciding took (the pass's own CPU, not its writes).
    deciding: Duration,
}

/// How the control plane runs.
#[derive(Debug, Clone)]
pub struct ControlConfig {
    pub node_name: String,
    /// Missed heartbeats allowed before a node is NotReady and its pods are replaced.
    pub node_grace_ms: i64,
    pub pass_interval: Duration,
    /// Bindings committed per Raft entry at most.
    pub bindings_per_entry: usize,
    /// Concurrent writes of one pass.
    pub max_parallel_writes: usize,
}

impl Default for ControlConfig {
    fn default() -> Self {
        ControlConfig {
            node_name: String::new(),
            node_grace_ms: 3_000,
            pass_interval: Duration::from_millis(200),
            bindings_per_entry: 500,
            max_parallel_writes: 32,
        }
    }
}

/// The objects of one kind as the last pass parsed them, by storage key, with the stored JSON
/// they were parsed from: a pass parses only what changed since (a busy store holds thousands
/// of pods, and parsing all of them every pass was the control plane's main cost).
struct KindCache<T> {
    kind: &'static str,
    parsed: HashMap<StorageKey, (StoredJson, T)>,
}

type StorageKey = Box<[u8]>;
type StoredJson = Box<[u8]>;

impl<T: DeserializeOwned + Clone> KindCache<T> {
    fn new(kind: &'static str) -> Self {
        KindCache {
            kind,
            parsed: HashMap::new(),
        }
    }

    /// Every object of the kind in the local store, in key order.
    fn list(&mut self, replica: &Replica) -> Vec<T> {
        let mut items = Vec::with_capacity(self.parsed.len());
        let mut next = HashMap::with_capacity(self.parsed.len());
        let kind = self.kind;
        let scanned = replica.reader().for_each_raw(kind, |key, stored| {
            let entry = match self.parsed.remove(key) {
                Some((json, object)) if *json == *stored => Some((json, object)),
                _ => match serde_json::from_slice::<T>(stored) {
                    Ok(object) => Some((Box::from(stored), object)),
                    Err(error) => {
                        tracing::warn!(%error, kind, "parse a stored object for the control plane");
                        None
                    }
                },
            };
            if let Some((json, object)) = entry {
                items.push(object.clone());
                next.insert(Box::from(key), (json, object));
            }
        });
        if let Err(error) = scanned {
            tracing::warn!(%error, kind, "list for the control plane");
            return Vec::new();
        }
        self.parsed = next;
        items
    }
}

/// What the control plane parsed of the store, kept from pass to pass.
struct SnapshotCache {
    nodes: KindCache<Node>,
    pods: KindCache<Pod>,
    replica_sets: KindCache<ReplicaSet>,
    deployments: KindCache<Deployment>,
    services: KindCache<Service>,
    endpoints: KindCache<Endpoints>,
}

impl SnapshotCache {
    fn new() -> Self {
        SnapshotCache {
            nodes: KindCache::new("Node"),
            pods: KindCache::new("Pod"),
            replica_sets: KindCache::new("ReplicaSet"),
            deployments: KindCache::new("Deployment"),
            services: KindCache::new("Service"),
            endpoints: KindCache::new("Endpoints"),
        }
    }

    fn take(&mut self, replica: &Replica) -> Snapshot {
        Snapshot {
            nodes: self.nodes.list(replica),
            pods: self.pods.list(replica),
            replica_sets: self.replica_sets.list(replica),
            deployments: self.deployments.list(replica),
            services: self.services.list(replica),
            endpoints: self.endpoints.list(replica),
            heartbeats: replica.node_heartbeats().last_heard_ms(),
            now_ms: jiff::Timestamp::now().as_millisecond(),
        }
    }
}

/// Every namespaced object with an owner or in a namespace, for the garbage collector.
fn gc_actions(replica: &Replica) -> Vec<Action> {
    let mut tracked = Vec::new();
    let mut namespaces = HashSet::new();
    for info in kinds::KINDS {
        let Ok((items, _)) = replica.reader().list(
            info.kind,
            None,
            &LabelSelector::default(),
            &FieldSelector::default(),
        ) else {
            return Vec::new();
        };
        for item in &items {
            if info.kind == "Namespace" {
                if let Some(name) = item.pointer("/metadata/name").and_then(Value::as_str) {
                    namespaces.insert(name.to_string());
                }
            }
        }
        tracked.extend(items.iter().map(Tracked::of));
    }
    gc::collect(&tracked, &namespaces)
}

/// A new object from a controller: validated, with a uid and creation time.
fn prepared(mut object: Value) -> Result<Value, StoreError> {
    if let Some(metadata) = object.get_mut("metadata").and_then(Value::as_object_mut) {
        metadata.insert("uid".into(), json!(uuid::Uuid::new_v4().to_string()));
        metadata.insert("creationTimestamp".into(), json!(crate::api::now_rfc3339()));
        metadata.remove("resourceVersion");
    }
    store::validate(&mut object)?;
    Ok(object)
}

fn command_of(action: Action, config: &ControlConfig) -> Result<Command, StoreError> {
    Ok(match action {
        Action::Create(object) => Command::Create {
            object: prepared(object)?,
        },
        Action::Update(mut object) => {
            store::validate(&mut object)?;
            Command::Update {
                object,
                part: UpdatePart::Main,
            }
        }
        Action::UpdateStatus(mut object) => {
            store::validate(&mut object)?;
            Command::Update {
                object,
                part: UpdatePart::Status,
            }
        }
        Action::Delete {
            kind,
            namespace,
            name,
            resource_version,
        } => Command::Delete {
            key: ObjectKey::new(&kind, &namespace, &name),
            resource_version: resource_version.and_then(|rv| rv.parse().ok()),
        },
        Action::Event {
            involved_kind,
            namespace,
            name,
            uid,
            event_type,
            reason,
            message,
        } => {
            let now = crate::api::now_rfc3339();
            let api_version = kinds::by_kind(&involved_kind)
                .map(|k| k.api_version)
                .unwrap_or("v1");
            let component = match involved_kind.as_str() {
                "Pod" => "default-scheduler",
                "Node" => "node-controller",
                "ReplicaSet" => "replicaset-controller",
                _ => "deployment-controller",
            };
            let spec = EventSpec {
                involved_kind: &involved_kind,
                involved_api_version: api_version,
                namespace: &namespace,
                name: &name,
                uid: &uid,
                event_type: &event_type,
                reason: &reason,
                message: &message,
                component,
                host: &config.node_name,
            };
            Command::Create {
                object: prepared(event_object(&spec, &event_name(&name), 1, &now, &now))?,
            }
        }
    })
}

/// A binding and the `Scheduled` Event recorded once it is committed.
type Binding = (Command, Action);

/// The scheduler's decisions as writes: bindings batched (each with its Event), unschedulable
/// pods marked.
fn scheduling_commands(
    replica: &Replica,
    snapshot: &Snapshot,
    config: &ControlConfig,
) -> (Vec<Vec<Binding>>, Vec<Action>) {
    let decisions = scheduler::schedule(&snapshot.nodes, &snapshot.pods, snapshot.now_ms);
    let mut bindings = Vec::new();
    let mut others = Vec::new();
    for binding in decisions.bindings {
        let key = ObjectKey::new("Pod", &binding.namespace, &binding.name);
        let Ok(Some(mut pod)) = replica.reader().get(&key) else {
            continue;
        };
        pod["metadata"]["resourceVersion"] = json!(binding.pod_resource_version);
        pod["spec"]["nodeName"] = json!(binding.node);
        let event = Action::Event {
            involved_kind: "Pod".into(),
            namespace: binding.namespace.clone(),
            name: binding.name.clone(),
            uid: String::new(),
            event_type: "Normal".into(),
            reason: "Scheduled".into(),
            message: format!(
                "Successfully assigned {}/{} to {}",
                binding.namespace, binding.name, binding.node
            ),
        };
        bindings.push((
            Command::Update {
                object: pod,
                part: UpdatePart::Main,
            },
            event,
        ));
    }
    for pending in decisions.unschedulable {
        let key = ObjectKey::new("Pod", &pending.namespace, &pending.name);
        let Ok(Some(pod)) = replica.reader().get(&key) else {
            continue;
        };
        let current = pod
            .pointer("/status/conditions")
            .and_then(Value::as_array)
            .and_then(|c| c.iter().find(|c| c["type"] == "PodScheduled"))
            .and_then(|c| c.get("message"))
            .and_then(Value::as_str)
            .unwrap_or("");
        if current == pending.message {
            continue;
        }
        let mut status = pod.get("status").cloned().unwrap_or_else(|| json!({}));
        status["phase"] = json!("Pending");
        status["conditions"] = json!([{
            "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
            "message": pending.message, "lastTransitionTime": crate::api::now_rfc3339()
        }]);
        let mut object = pod.clone();
        object["status"] = status;
        others.push(Action::UpdateStatus(object));
        others.push(Action::Event {
            involved_kind: "Pod".into(),
            namespace: pending.namespace.clone(),
            name: pending.name.clone(),
            uid: String::new(),
            event_type: "Warning".into(),
            reason: "FailedScheduling".into(),
            message: pending.message.clone(),
        });
    }
    let mut batches = Vec::new();
    let mut bindings = bindings.into_iter().peekable();
    while bindings.peek().is_some() {
        batches.push(
            bindings
                .by_ref()
                .take(config.bindings_per_entry.max(1))
                .collect(),
        );
    }
    (batches, others)
}

/// Commits one batch of bindings as one log entry, then the `Scheduled` Events of the bindings
/// that were taken, as one more entry.
async fn commit_bindings(replica: &Replica, config: &ControlConfig, batch: Vec<Binding>) {
    let (bindings, events): (Vec<Command>, Vec<Action>) = batch.into_iter().unzip();
    let results = match replica.write_batch(bindings).await {
        Ok(results) => results,
        Err(error) => {
            tracing::warn!(%error, "commit bindings");
            return;
        }
    };
    let scheduled: Vec<Command> = results
        .into_iter()
        .zip(events)
        .filter_map(|(result, event)| match result {
            Ok(_) => command_of(event, config).ok(),
            Err(error) => {
                tracing::debug!(%error, "binding refused");
                None
            }
        })
        .collect();
    if scheduled.is_empty() {
        return;
    }
    if let Err(error) = replica.write_batch(scheduled).await {
        tracing::debug!(%error, "record Scheduled events");
    }
}

/// One pass: decide and execute. Returns how many pods it bound and what else it wrote.
async fn pass(
    replica: &Replica,
    cache: &mut SnapshotCache,
    config: &ControlConfig,
    with_gc: bool,
    leading_since_ms: i64,
) -> PassOutcome {
    let started = Instant::now();
    let snapshot = cache.take(replica);
    let (binding_batches, mut actions) = scheduling_commands(replica, &snapshot, config);
    actions.extend(node_lifecycle::reconcile_nodes(
        &snapshot,
        config.node_grace_ms,
        leading_since_ms,
    ));
    actions.extend(replicaset::reconcile_replica_sets(&snapshot));
    actions.extend(deployment::reconcile_deployments(&snapshot));
    actions.extend(endpoints::reconcile_endpoints(&snapshot));
    actions.extend(load_balancer::reconcile_load_balancers(&snapshot));
    if with_gc {
        actions.extend(gc_actions(replica));
        let known: HashSet<&str> = snapshot
            .nodes
            .iter()
            .filter_map(|node| node.metadata.name.as_deref())
            .collect();
        replica
            .node_heartbeats()
            .retain(&|name| known.contains(name));
    }
    let bound = binding_batches.iter().map(Vec::len).sum();
    let deciding = started.elapsed();
    // Batches are independent (each binding carries its pod's resourceVersion), so several
    // are in the log pipeline at once.
    futures::stream::iter(binding_batches)
        .for_each_concurrent(BINDING_BATCHES_IN_FLIGHT, |batch| {
            commit_bindings(replica, config, batch)
        })
        .await;
    let commands: Vec<Command> = actions
        .into_iter()
        .filter_map(|action| match command_of(action, config) {
            Ok(command) => Some(command),
            Err(error) => {
                tracing::warn!(%error, "controller produced an invalid object");
                None
            }
        })
        .collect();
    let written = std::sync::atomic::AtomicUsize::new(0);
    let written_ref = &written;
    futures::stream::iter(commands)
        .for_each_concurrent(config.max_parallel_writes.max(1), |command| async move {
            match replica.write(command).await {
                Ok(_) => {
                    written_ref.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                // Decided on a snapshot that moved on: the next pass decides again.
                Err(ReplicaError::Store(
                    StoreError::Conflict { .. }
                    | StoreError::NotFound { .. }
                    | StoreError::AlreadyExists { .. },
                )) => {}
                Err(error) => tracing::debug!(%error, "control plane write"),
            }
        })
        .await;
    PassOutcome {
        bound,
        written: written.into_inner(),
        deciding,
    }
}

/// Runs on every node; acts only while this node is the Raft leader.
pub async fn run(replica: Replica, config: ControlConfig, shutdown: CancellationToken) {
    let mut leading = false;
    let mut leading_since_ms = 0;
    let mut last_collection: Option<Instant> = None;
    let mut pause = config.pass_interval;
    let mut follow_ups = 0;
    let mut cache = SnapshotCache::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(pause) => {}
        }
        pause = config.pass_interval;
        if !replica.raft().is_leader() {
            if leading {
                tracing::info!("lost leadership: control plane stopped");
                leading = false;
                cache = SnapshotCache::new();
            }
            continue;
        }
        if !leading {
            // Decide only on a state that includes everything committed before this term.
            if replica.read_barrier().await.is_err() {
                continue;
            }
            tracing::info!("leading: control plane started");
            leading = true;
            leading_since_ms = jiff::Timestamp::now().as_millisecond();
        }
        // Garbage collection reads every object: once every few seconds keeps its cost off
        // the write path of a busy store.
        let collect = last_collection.is_none_or(|at| at.elapsed() >= COLLECTION_INTERVAL);
        if collect {
            last_collection = Some(Instant::now());
        }
        let outcome = pass(&replica, &mut cache, &config, collect, leading_since_ms).await;
        // A busy pass is followed by the next soon, but not sooner than its deciding took: the
        // control plane leaves at least half a core to the writes it is reacting to.
        let busy_pause = BUSY_PASS_INTERVAL.max(outcome.deciding);
        if outcome.bound > 0 {
            // Pods are arriving: the next ones are bound without waiting a whole interval.
            pause = busy_pause;
        } else if outcome.written > 0 && follow_ups < MAX_FOLLOW_UP_PASSES {
            follow_ups += 1;
            pause = busy_pause;
        } else if outcome.written == 0 {
            follow_ups = 0;
        }
    }
}
