//! The shell of the control plane: while this node leads, take a snapshot of the local store,
//! ask the scheduler and the controllers what to do, and do it through Raft.
//!
//! The scheduler and the controllers run as two loops (lanes) of their own, as kube-scheduler
//! and kube-controller-manager do: each lane's passes follow one another, each deciding on a
//! state that holds its previous pass's writes, but neither lane waits for the other's writes.
//! Pods a ReplicaSet's pass is still creating are bound as soon as their creates commit, and
//! the ReplicaSet creates its next pods while the scheduler's bindings commit. What one lane
//! writes on a state the other has moved on from fails on its resourceVersion and is decided
//! again.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flotilla_raft::storage::KindVersion;
use flotilla_raft::{
    kinds, store, Command, ObjectKey, Replica, ReplicaError, StoreError, UpdatePart,
};
use futures::StreamExt;
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::event_budget::EventBudget;
use super::gc::{self, Tracked};
use super::recorder::EventRecorder;
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

/// One loop of the control plane.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lane {
    /// Binds pending pods (and marks those that fit nowhere); reads nodes and pods only.
    Scheduler,
    /// Everything else: nodes, ReplicaSets, Deployments, Endpoints, load balancers, and the
    /// garbage collector.
    Controllers,
}

/// Every lane, each run as a task of its own.
const LANES: [Lane; 2] = [Lane::Scheduler, Lane::Controllers];

/// What one pass did.
struct PassOutcome {
    /// Pods bound.
    bound: usize,
    /// Pods created (by the ReplicaSet controller).
    created_pods: usize,
    /// The pass decided no write and no Event at all.
    decided_nothing: bool,
    /// Other writes that committed.
    written: usize,
    /// The CPU time taking the snapshot and deciding took (the pass's own CPU, not its
    /// writes; the wall time where the kernel does not tell a thread's CPU time).
    deciding: Duration,
    /// How long the pass then waited for its writes (the pass uses no CPU meanwhile).
    writing: Duration,
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
            max_parallel_writes: 1024,
        }
    }
}

/// The objects of one kind as the last pass parsed them, in key order, with the storage key
/// and stored JSON each was parsed from: a pass parses only what changed since (a busy store
/// holds thousands of pods, and parsing all of them every pass was the control plane's main
/// cost). The objects are lent to the pass and given back, not copied (copying every pod
/// and node each pass was the next cost).
struct KindCache<T> {
    kind: &'static str,
    /// Storage key and stored JSON of each object, in key order.
    sources: Vec<(StorageKey, StoredJson)>,
    /// The parsed objects, one per source; empty while lent out.
    objects: Vec<T>,
    /// The emptied buffers of the previous pass, filled by the next (fresh ones of a few MB
    /// each pass were page faults and copies).
    spare_sources: Vec<(StorageKey, StoredJson)>,
    spare_objects: Vec<T>,
    /// The kind's version in the store when `sources` were read.
    scanned_at: Option<KindVersion>,
}

type StorageKey = Box<[u8]>;
type StoredJson = Box<[u8]>;

impl<T: DeserializeOwned> KindCache<T> {
    fn new(kind: &'static str) -> Self {
        KindCache {
            kind,
            sources: Vec::new(),
            objects: Vec::new(),
            spare_sources: Vec::new(),
            spare_objects: Vec::new(),
            scanned_at: None,
        }
    }

    /// Every object of the kind in the local store, in key order, lent until `give_back`.
    fn lend(&mut self, replica: &Replica) -> Result<Vec<T>, StoreError> {
        let kind = self.kind;
        let reader = replica.reader();
        self.lend_at(reader.kind_version(kind), |visit| {
            reader.for_each_raw(kind, visit)
        })
    }

    /// `lend_from`, unless no object of the kind was written since the last scan (the kind is
    /// still at `version`, read before this scan would start) and its objects were given
    /// back: then those, without reading the store (an idle cluster's passes read nothing).
    fn lend_at(
        &mut self,
        version: KindVersion,
        scan: impl FnOnce(&mut dyn FnMut(&[u8], &[u8])) -> Result<(), StoreError>,
    ) -> Result<Vec<T>, StoreError> {
        if self.scanned_at == Some(version) && self.objects.len() == self.sources.len() {
            return Ok(std::mem::take(&mut self.objects));
        }
        self.scanned_at = None;
        let objects = self.lend_from(scan)?;
        self.scanned_at = Some(version);
        Ok(objects)
    }

    /// `lend` over `scan`, which visits each storage key and stored JSON in key order.
    fn lend_from(
        &mut self,
        scan: impl FnOnce(&mut dyn FnMut(&[u8], &[u8])) -> Result<(), StoreError>,
    ) -> Result<Vec<T>, StoreError> {
        let mut sources = std::mem::take(&mut self.sources);
        let mut objects = std::mem::take(&mut self.objects);
        // Objects not given back (a pass that ended early) are parsed again.
        let kept = if objects.len() == sources.len() {
            sources.len()
        } else {
            0
        };
        let mut items = std::mem::take(&mut self.spare_objects);
        let mut next_sources = std::mem::take(&mut self.spare_sources);
        items.clear();
        next_sources.clear();
        items.reserve(kept);
        next_sources.reserve(kept);
        let mut previous = sources
            .drain(..)
            .zip(objects.drain(..))
            .take(kept)
            .peekable();
        let kind = self.kind;
        let scanned = scan(&mut |key, stored| {
            // Both walks are in key order: skip what was deleted since.
            while previous
                .peek()
                .is_some_and(|((previous_key, _), _)| **previous_key < *key)
            {
                previous.next();
            }
            let reused = match previous.peek() {
                Some(((previous_key, json), _)) if **previous_key == *key && **json == *stored => {
                    previous.next()
                }
                _ => None,
            };
            let parsed = match reused {
                Some((source, object)) => Some((source, object)),
                None => match serde_json::from_slice::<T>(stored) {
                    Ok(object) => Some(((Box::from(key), Box::from(stored)), object)),
                    Err(error) => {
                        tracing::warn!(%error, kind, "parse a stored object for the control plane");
                        None
                    }
                },
            };
            if let Some((source, object)) = parsed {
                next_sources.push(source);
                items.push(object);
            }
        });
        drop(previous);
        // Emptied, with their capacity: the next pass fills them.
        self.spare_sources = sources;
        self.spare_objects = objects;
        // A partial list is no list: a controller would take the missing pods for gone.
        scanned?;
        self.sources = next_sources;
        Ok(items)
    }

    /// Takes back what `lend` gave, unchanged.
    fn give_back(&mut self, objects: Vec<T>) {
        if objects.len() == self.sources.len() {
            self.objects = objects;
        }
    }
}

impl<T: DeserializeOwned + Clone> KindCache<T> {
    /// Every object of the kind, as `lend`, but the cache keeps them too (for objects held in
    /// `Arc`s, which a clone only counts).
    fn share(&mut self, replica: &Replica) -> Result<Vec<T>, StoreError> {
        let objects = self.lend(replica)?;
        Ok(self.keep(objects))
    }

    /// Keeps a copy of what `lend` gave and hands it on.
    fn keep(&mut self, objects: Vec<T>) -> Vec<T> {
        self.give_back(objects.clone());
        objects
    }
}

/// Nodes and pods as parsed for both lanes: a pod that changed is parsed once, not once per
/// lane.
struct SharedKinds {
    nodes: KindCache<Arc<Node>>,
    pods: KindCache<Arc<Pod>>,
}

impl SharedKinds {
    fn new() -> Arc<Mutex<SharedKinds>> {
        Arc::new(Mutex::new(SharedKinds {
            nodes: KindCache::new("Node"),
            pods: KindCache::new("Pod"),
        }))
    }
}

/// What a lane parsed of the store, kept from pass to pass.
struct SnapshotCache {
    shared: Arc<Mutex<SharedKinds>>,
    replica_sets: KindCache<ReplicaSet>,
    deployments: KindCache<Deployment>,
    services: KindCache<Service>,
    endpoints: KindCache<Endpoints>,
}

impl SnapshotCache {
    fn new(shared: Arc<Mutex<SharedKinds>>) -> Self {
        SnapshotCache {
            shared,
            replica_sets: KindCache::new("ReplicaSet"),
            deployments: KindCache::new("Deployment"),
            services: KindCache::new("Service"),
            endpoints: KindCache::new("Endpoints"),
        }
    }

    /// The store as `lane` sees it; give it back with `give_back` after deciding. Every kind
    /// is read whole or the pass has nothing to decide on; the scheduler's lane reads only
    /// nodes and pods (the other lists and the heartbeats are left empty).
    fn take(&mut self, replica: &Replica, lane: Lane) -> Result<Snapshot, StoreError> {
        let (nodes, pods) = {
            // The other lane held the lock only while reading the store: what it parsed stands.
            let mut shared = self
                .shared
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            (shared.nodes.share(replica)?, shared.pods.share(replica)?)
        };
        let mut snapshot = Snapshot {
            nodes,
            pods,
            now_ms: jiff::Timestamp::now().as_millisecond(),
            ..Snapshot::default()
        };
        if lane == Lane::Controllers {
            snapshot.heartbeats = replica.node_heartbeats().last_heard_ms();
            snapshot.replica_sets = self.replica_sets.lend(replica)?;
            snapshot.deployments = self.deployments.lend(replica)?;
            snapshot.services = self.services.lend(replica)?;
            snapshot.endpoints = self.endpoints.lend(replica)?;
        }
        Ok(snapshot)
    }

    fn give_back(&mut self, snapshot: Snapshot) {
        self.replica_sets.give_back(snapshot.replica_sets);
        self.deployments.give_back(snapshot.deployments);
        self.services.give_back(snapshot.services);
        self.endpoints.give_back(snapshot.endpoints);
    }
}

/// What the garbage collector reads of a stored object: its kind and metadata (the rest of
/// the JSON is skipped, not parsed: a busy store holds thousands of pods).
#[derive(serde::Deserialize)]
struct Header {
    #[serde(default)]
    kind: Value,
    #[serde(default)]
    metadata: Value,
}

/// Every namespaced object with an owner or in a namespace, for the garbage collector.
fn gc_actions(replica: &Replica) -> Vec<Action> {
    let mut tracked = Vec::new();
    let mut namespaces = HashSet::new();
    for info in kinds::KINDS {
        let scanned = replica.reader().for_each_raw(info.kind, |_, stored| {
            let Ok(Header { kind, metadata }) = serde_json::from_slice::<Header>(stored) else {
                return;
            };
            let object = json!({"kind": kind, "metadata": metadata});
            if info.kind == "Namespace" {
                if let Some(name) = object.pointer("/metadata/name").and_then(Value::as_str) {
                    namespaces.insert(name.to_string());
                }
            }
            tracked.push(Tracked::of(&object));
        });
        if scanned.is_err() {
            return Vec::new();
        }
    }
    gc::collect(&tracked, &namespaces)
}

/// A new object from a controller, created at `created` (an RFC 3339 time): validated, with
/// a uid and that creation time.
fn prepared_at(mut object: Value, created: &str) -> Result<Value, StoreError> {
    if let Some(metadata) = object.get_mut("metadata").and_then(Value::as_object_mut) {
        metadata.insert("uid".into(), json!(uuid::Uuid::new_v4().to_string()));
        metadata.insert("creationTimestamp".into(), json!(created));
        metadata.remove("resourceVersion");
    }
    store::validate(&mut object)?;
    Ok(object)
}

fn command_of(action: Action, config: &ControlConfig) -> Result<Command, StoreError> {
    command_at(action, config, &crate::api::now_rfc3339())
}

/// `command_of` for an action decided at `now` (an RFC 3339 time): an Event written later
/// says when it happened.
pub(super) fn command_at(
    action: Action,
    config: &ControlConfig,
    now: &str,
) -> Result<Command, StoreError> {
    Ok(match action {
        Action::Create(object) => Command::Create {
            object: prepared_at(object, now)?.into(),
        },
        Action::Update(mut object) => {
            store::validate(&mut object)?;
            Command::Update {
                object: object.into(),
                part: UpdatePart::Main,
            }
        }
        Action::UpdateStatus(mut object) => {
            store::validate(&mut object)?;
            Command::Update {
                object: object.into(),
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
                object: prepared_at(event_object(&spec, &event_name(&name), 1, now, now), now)?
                    .into(),
            }
        }
    })
}

/// What the controllers (all but the scheduler) decide on `snapshot`.
fn controller_actions(
    snapshot: &Snapshot,
    config: &ControlConfig,
    leading_since_ms: i64,
) -> Vec<Action> {
    let mut actions =
        node_lifecycle::reconcile_nodes(snapshot, config.node_grace_ms, leading_since_ms);
    actions.extend(replicaset::reconcile_replica_sets(snapshot));
    actions.extend(deployment::reconcile_deployments(snapshot));
    actions.extend(endpoints::reconcile_endpoints(snapshot));
    actions.extend(load_balancer::reconcile_load_balancers(snapshot));
    actions
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
        let Ok(resource_version) = binding.pod_resource_version.parse::<u64>() else {
            continue;
        };
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
            Command::Bind {
                key,
                resource_version,
                node: binding.node.clone(),
            },
            event,
        ));
    }
    // What the snapshot's pods already say of why they wait: a pod the last pass marked is
    // not read from the store again (a thousand pods that fit nowhere would be a thousand
    // reads and parses every pass of an idle cluster).
    let marked: HashMap<(&str, &str), &str> = if decisions.unschedulable.is_empty() {
        HashMap::new()
    } else {
        snapshot
            .pods
            .iter()
            .filter_map(|pod| {
                let message = pod_scheduled_message(pod)?;
                let metadata = &pod.metadata;
                Some((
                    (metadata.namespace.as_deref()?, metadata.name.as_deref()?),
                    message,
                ))
            })
            .collect()
    };
    for pending in decisions.unschedulable {
        let said = marked.get(&(pending.namespace.as_str(), pending.name.as_str()));
        if said == Some(&pending.message.as_str()) {
            continue;
        }
        let key = ObjectKey::new("Pod", &pending.namespace, &pending.name);
        let Ok(Some(pod)) = replica.reader().get(&key) else {
            continue;
        };
        // The snapshot may be older than the store: the store's copy decides.
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

/// The message of a pod's PodScheduled condition, if it has one.
fn pod_scheduled_message(pod: &Pod) -> Option<&str> {
    pod.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|condition| condition.type_ == "PodScheduled")?
        .message
        .as_deref()
}

/// Commits one batch of bindings as one log entry, then hands the `Scheduled` Events of the
/// bindings that were taken to the recorder.
async fn commit_bindings(replica: &Replica, recorder: &EventRecorder, batch: Vec<Binding>) {
    let (bindings, events): (Vec<Command>, Vec<Action>) = batch.into_iter().unzip();
    let results = match replica.write_batch(bindings).await {
        Ok(results) => results,
        Err(error) => {
            tracing::warn!(%error, "commit bindings");
            return;
        }
    };
    let scheduled: Vec<Action> = results
        .into_iter()
        .zip(events)
        .filter_map(|(result, event)| match result {
            Ok(_) => Some(event),
            Err(error) => {
                tracing::debug!(%error, "binding refused");
                None
            }
        })
        .collect();
    recorder.record(scheduled);
}

/// The CPU time the calling thread has run (the kernel's `/proc/thread-self/schedstat`), or
/// `None` where the kernel does not tell.
fn thread_cpu_time() -> Option<Duration> {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let nanos: u64 = text.split_whitespace().next()?.parse().ok()?;
    Some(Duration::from_nanos(nanos))
}

/// The writes of a pass, waited for together.
type WriteFuture<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'a>>;

/// The versions of what the scheduler decides on: the store's nodes and pods.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SchedulerInputs {
    nodes: KindVersion,
    pods: KindVersion,
}

impl SchedulerInputs {
    fn of(replica: &Replica) -> SchedulerInputs {
        let reader = replica.reader();
        SchedulerInputs {
            nodes: reader.kind_version("Node"),
            pods: reader.kind_version("Pod"),
        }
    }
}

/// One pass of `lane`: decide and execute. Returns how many pods it bound and what else it
/// wrote.
#[allow(clippy::too_many_arguments)]
async fn pass(
    lane: Lane,
    replica: &Replica,
    cache: &mut SnapshotCache,
    event_budget: &mut EventBudget,
    recorder: &EventRecorder,
    config: &ControlConfig,
    with_gc: bool,
    leading_since_ms: i64,
) -> PassOutcome {
    let started = Instant::now();
    let cpu_started = thread_cpu_time();
    let snapshot = match cache.take(replica, lane) {
        Ok(snapshot) => snapshot,
        Err(error) => {
            // Deciding on part of the store would undo what the missing part holds; the next
            // pass reads it again.
            tracing::warn!(%error, "read the local store for the control plane; pass skipped");
            return PassOutcome {
                bound: 0,
                created_pods: 0,
                decided_nothing: false,
                written: 0,
                deciding: started.elapsed(),
                writing: Duration::ZERO,
            };
        }
    };
    let (binding_batches, mut actions) = match lane {
        Lane::Scheduler => scheduling_commands(replica, &snapshot, config),
        Lane::Controllers => (
            Vec::new(),
            controller_actions(&snapshot, config, leading_since_ms),
        ),
    };
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
    let now_ms = snapshot.now_ms;
    cache.give_back(snapshot);
    let (events, actions): (Vec<Action>, Vec<Action>) = event_budget
        .admit(actions, now_ms)
        .into_iter()
        .partition(|action| matches!(action, Action::Event { .. }));
    let decided_nothing = binding_batches.is_empty() && actions.is_empty() && events.is_empty();
    recorder.record(events);
    let bound = binding_batches.iter().map(Vec::len).sum();
    // Deciding does not await: it runs on this thread from start to here. Its wall time would
    // also count the time other processes had the CPU (the nodes' own writes among them).
    let deciding = match (cpu_started, thread_cpu_time()) {
        (Some(before), Some(after)) => after.saturating_sub(before),
        _ => started.elapsed(),
    };
    let created_pods = actions
        .iter()
        .filter(|action| {
            matches!(action, Action::Create(object)
                if object.get("kind").and_then(Value::as_str) == Some("Pod"))
        })
        .count();
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
    let writing_started = Instant::now();
    // Batches are independent (each binding carries its pod's resourceVersion), so several
    // are in the log pipeline at once; so are the other writes (each decided on the
    // resourceVersion it read, or a create that a second try finds taken), all at the same
    // time as the bindings: the proposer packs what is waiting into shared log entries.
    // (Boxed as `dyn Future`: joined as their own opaque types, the two futures' closures
    // keep rustc from proving the pass's future `Send`.)
    let bindings: WriteFuture<'_> = Box::pin(
        futures::stream::iter(binding_batches)
            .for_each_concurrent(BINDING_BATCHES_IN_FLIGHT, |batch| {
                commit_bindings(replica, recorder, batch)
            }),
    );
    let others: WriteFuture<'_> = Box::pin(futures::stream::iter(commands).for_each_concurrent(
        config.max_parallel_writes.max(1),
        |command| async move {
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
        },
    ));
    futures::join!(bindings, others);
    let writing = writing_started.elapsed();
    tracing::debug!(
        ?lane,
        deciding_ms = deciding.as_millis(),
        writing_ms = writing.as_millis(),
        bound,
        written = written.load(std::sync::atomic::Ordering::Relaxed),
        "control pass"
    );
    PassOutcome {
        bound,
        created_pods,
        decided_nothing,
        written: written.into_inner(),
        deciding,
        writing,
    }
}

/// Runs on every node; acts only while this node is the Raft leader: the scheduler's lane
/// and the controllers' lane, each a task of its own, until `shutdown`.
pub async fn run(replica: Replica, config: ControlConfig, shutdown: CancellationToken) {
    let recorder = EventRecorder::start(replica.clone(), config.clone(), shutdown.clone());
    let controllers_wrote = Arc::new(Notify::new());
    let shared = SharedKinds::new();
    let lanes = LANES.map(|lane| {
        tokio::spawn(run_lane(
            lane,
            replica.clone(),
            config.clone(),
            recorder.clone(),
            SnapshotCache::new(shared.clone()),
            controllers_wrote.clone(),
            shutdown.clone(),
        ))
    });
    for (lane, task) in LANES.iter().zip(lanes) {
        if let Err(error) = task.await {
            tracing::error!(?lane, %error, "control plane lane ended abnormally");
        }
    }
}

/// The passes of `lane` while this node leads, until `shutdown`. The controllers' lane
/// signals `controllers_wrote` after a pass that wrote (new pods, a node gone NotReady); the
/// scheduler's lane, when idle, starts its next pass on that signal rather than a whole
/// interval later.
async fn run_lane(
    lane: Lane,
    replica: Replica,
    config: ControlConfig,
    recorder: EventRecorder,
    mut cache: SnapshotCache,
    controllers_wrote: Arc<Notify>,
    shutdown: CancellationToken,
) {
    let mut leading = false;
    let mut leading_since_ms = 0;
    let mut last_collection: Option<Instant> = None;
    let mut pause = config.pass_interval;
    let mut follow_ups = 0;
    let mut event_budget = EventBudget::default();
    // The scheduler's inputs when its last pass decided nothing.
    let mut quiet_at: Option<SchedulerInputs> = None;
    loop {
        let wakeable = lane == Lane::Scheduler && pause > BUSY_PASS_INTERVAL;
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(pause) => {}
            _ = controllers_wrote.notified(), if wakeable => {}
        }
        pause = config.pass_interval;
        if !replica.raft().is_leader() {
            if leading {
                tracing::info!(?lane, "lost leadership: control plane stopped");
                leading = false;
                cache = SnapshotCache::new(cache.shared.clone());
                quiet_at = None;
                event_budget = EventBudget::default();
            }
            continue;
        }
        if !leading {
            // Decide only on a state that includes everything committed before this term.
            if replica.read_barrier().await.is_err() {
                continue;
            }
            tracing::info!(?lane, "leading: control plane started");
            leading = true;
            leading_since_ms = jiff::Timestamp::now().as_millisecond();
        }
        // Garbage collection reads every object: once every few seconds keeps its cost off
        // the write path of a busy store.
        let collect = lane == Lane::Controllers
            && last_collection.is_none_or(|at| at.elapsed() >= COLLECTION_INTERVAL);
        if collect {
            last_collection = Some(Instant::now());
        }
        // The scheduler decides on nodes and pods alone: after a pass that decided nothing, a
        // pass on the same nodes and pods would decide nothing again (kube-scheduler's queue of
        // unschedulable pods likewise waits for nodes or pods to change).
        let inputs = (lane == Lane::Scheduler).then(|| SchedulerInputs::of(&replica));
        if inputs.is_some() && inputs == quiet_at {
            continue;
        }
        let outcome = pass(
            lane,
            &replica,
            &mut cache,
            &mut event_budget,
            &recorder,
            &config,
            collect,
            leading_since_ms,
        )
        .await;
        quiet_at = inputs.filter(|_| outcome.decided_nothing);
        if lane == Lane::Controllers && (outcome.written > 0 || outcome.created_pods > 0) {
            controllers_wrote.notify_one();
        }
        (pause, follow_ups) = next_pause(&outcome, follow_ups, config.pass_interval);
    }
}

/// The pause before the next pass after `outcome`, and the follow-up passes in a row then
/// (`follow_ups` before). Pure.
///
/// A busy pass is followed by the next soon, but its deciding takes at most half of the time
/// from its start to the next one's (the wait for its writes counts: it uses no CPU
/// meanwhile): the control plane leaves at least half a core to the writes it is reacting to.
fn next_pause(outcome: &PassOutcome, follow_ups: u32, pass_interval: Duration) -> (Duration, u32) {
    let busy_pause = BUSY_PASS_INTERVAL.max(outcome.deciding.saturating_sub(outcome.writing));
    if outcome.bound > 0 || outcome.created_pods > 0 {
        // Pods are arriving: the next ones are created or bound without waiting a whole
        // interval.
        (busy_pause, follow_ups)
    } else if outcome.written > 0 && follow_ups < MAX_FOLLOW_UP_PASSES {
        (busy_pause, follow_ups + 1)
    } else if outcome.written == 0 {
        (pass_interval, 0)
    } else {
        (pass_interval, follow_ups)
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use serde::{Deserialize, Deserializer};

    use super::*;

    thread_local! {
        static PARSED: Cell<usize> = const { Cell::new(0) };
    }

    /// An object that counts how often it was parsed (on this test's thread).
    #[derive(Debug, PartialEq)]
    struct Counted(String);

    impl<'de> Deserialize<'de> for Counted {
        fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
            PARSED.with(|parsed| parsed.set(parsed.get() + 1));
            String::deserialize(deserializer).map(Counted)
        }
    }

    fn parsed() -> usize {
        PARSED.with(Cell::take)
    }

    fn lend(cache: &mut KindCache<Counted>, store: &[(&str, &str)]) -> Vec<Counted> {
        cache
            .lend_from(|visit| {
                for (key, json) in store {
                    visit(key.as_bytes(), json.as_bytes());
                }
                Ok(())
            })
            .expect("a scan that cannot fail")
    }

    fn names(items: &[Counted]) -> Vec<&str> {
        items.iter().map(|item| item.0.as_str()).collect()
    }

    fn outcome(bound: usize, written: usize, deciding_ms: u64, writing_ms: u64) -> PassOutcome {
        PassOutcome {
            bound,
            created_pods: 0,
            decided_nothing: bound == 0 && written == 0,
            written,
            deciding: Duration::from_millis(deciding_ms),
            writing: Duration::from_millis(writing_ms),
        }
    }

    #[test]
    fn a_pass_that_bound_pods_is_followed_soon_but_deciding_stays_under_half_the_time() {
        let interval = Duration::from_millis(200);
        assert_eq!(
            next_pause(&outcome(500, 0, 2, 30), 0, interval),
            (BUSY_PASS_INTERVAL, 0)
        );
        // 60 ms deciding, 20 ms waiting for writes: 40 ms more pause makes deciding half.
        assert_eq!(
            next_pause(&outcome(500, 10, 60, 20), 0, interval),
            (Duration::from_millis(40), 0)
        );
        // Writes that took longer than deciding already left the CPU to others.
        assert_eq!(
            next_pause(&outcome(500, 10, 60, 150), 0, interval),
            (BUSY_PASS_INTERVAL, 0)
        );
    }

    #[test]
    fn a_pass_that_created_pods_is_followed_soon_however_many_busy_passes_came_before() {
        let interval = Duration::from_millis(200);
        let created = PassOutcome {
            created_pods: 500,
            ..outcome(0, 501, 15, 35)
        };
        assert_eq!(
            next_pause(&created, MAX_FOLLOW_UP_PASSES, interval),
            (BUSY_PASS_INTERVAL, MAX_FOLLOW_UP_PASSES)
        );
    }

    #[test]
    fn passes_that_only_wrote_follow_each_other_a_few_times_then_wait_the_interval() {
        let interval = Duration::from_millis(200);
        let mut follow_ups = 0;
        for expected in 1..=MAX_FOLLOW_UP_PASSES {
            let (pause, next) = next_pause(&outcome(0, 3, 1, 5), follow_ups, interval);
            assert_eq!((pause, next), (BUSY_PASS_INTERVAL, expected));
            follow_ups = next;
        }
        assert_eq!(
            next_pause(&outcome(0, 3, 1, 5), follow_ups, interval),
            (interval, follow_ups)
        );
        assert_eq!(
            next_pause(&outcome(0, 0, 1, 0), follow_ups, interval),
            (interval, 0)
        );
    }

    #[test]
    fn a_thread_that_computes_is_charged_cpu_time_and_never_more_than_the_time_that_passed() {
        let Some(before) = thread_cpu_time() else {
            panic!("this kernel does not tell a thread's CPU time");
        };
        let wall = Instant::now();
        let mut spins = 0_u64;
        let mut used = Duration::ZERO;
        while used < Duration::from_millis(5) && wall.elapsed() < Duration::from_secs(5) {
            spins = std::hint::black_box(spins.wrapping_add(1));
            if spins.is_multiple_of(10_000) {
                used = thread_cpu_time().unwrap_or_default().saturating_sub(before);
            }
        }
        assert!(
            used >= Duration::from_millis(5),
            "5 s of spinning gave {used:?} of CPU"
        );
        assert!(used <= wall.elapsed() + Duration::from_millis(1));
    }

    #[test]
    fn a_pass_parses_only_objects_whose_stored_json_changed_and_sees_adds_and_deletes() {
        let mut cache = KindCache::new("Pod");
        let first = lend(
            &mut cache,
            &[("a", "\"a1\""), ("b", "\"b1\""), ("c", "\"c1\"")],
        );
        assert_eq!(names(&first), ["a1", "b1", "c1"]);
        assert_eq!(parsed(), 3);
        cache.give_back(first);

        let same = lend(
            &mut cache,
            &[("a", "\"a1\""), ("b", "\"b1\""), ("c", "\"c1\"")],
        );
        assert_eq!(names(&same), ["a1", "b1", "c1"]);
        assert_eq!(parsed(), 0, "nothing changed, nothing parsed");
        cache.give_back(same);

        let changed = lend(
            &mut cache,
            &[
                ("a", "\"a1\""),
                ("b", "\"b2\""),
                ("bb", "\"new\""),
                ("d", "\"d1\""),
            ],
        );
        assert_eq!(names(&changed), ["a1", "b2", "new", "d1"]);
        assert_eq!(parsed(), 3, "b changed, bb and d are new, c is gone");
        cache.give_back(changed);
    }

    #[test]
    fn objects_shared_by_both_lanes_are_parsed_once_and_kept_while_lent() {
        let mut cache: KindCache<Arc<Counted>> = KindCache::new("Pod");
        let store = [("a", "\"a1\""), ("b", "\"b1\"")];
        let scan = |visit: &mut dyn FnMut(&[u8], &[u8])| {
            for (key, json) in store {
                visit(key.as_bytes(), json.as_bytes());
            }
            Ok(())
        };
        let lent = cache.lend_from(scan).expect("a scan that cannot fail");
        let scheduler_lane = cache.keep(lent);
        assert_eq!(parsed(), 2);
        // The other lane reads while the first still holds its list: nothing is parsed again,
        // and both hold the same objects.
        let lent = cache.lend_from(scan).expect("a scan that cannot fail");
        let controllers_lane = cache.keep(lent);
        assert_eq!(parsed(), 0);
        assert_eq!(names_of(&controllers_lane), ["a1", "b1"]);
        assert!(Arc::ptr_eq(&scheduler_lane[1], &controllers_lane[1]));
        drop(scheduler_lane);
        let lent = cache
            .lend_from(|visit| {
                visit(b"a", b"\"a1\"");
                visit(b"b", b"\"b2\"");
                Ok(())
            })
            .expect("a scan that cannot fail");
        let changed = cache.keep(lent);
        assert_eq!(names_of(&changed), ["a1", "b2"]);
        assert_eq!(parsed(), 1, "only b changed");
    }

    fn names_of(items: &[Arc<Counted>]) -> Vec<&str> {
        items.iter().map(|item| item.0.as_str()).collect()
    }

    #[test]
    fn a_kind_still_at_the_version_of_the_last_scan_is_not_read_again() {
        let mut cache = KindCache::new("Pod");
        let at = |writes| KindVersion {
            replaced: 0,
            writes,
        };
        let store = [("a", "\"a1\""), ("b", "\"b1\"")];
        let scans = Cell::new(0);
        let scan = |visit: &mut dyn FnMut(&[u8], &[u8])| {
            scans.set(scans.get() + 1);
            for (key, json) in store {
                visit(key.as_bytes(), json.as_bytes());
            }
            Ok(())
        };
        let first = cache.lend_at(at(7), scan).expect("a scan that cannot fail");
        cache.give_back(first);
        let again = cache.lend_at(at(7), scan).expect("a scan that cannot fail");
        assert_eq!(names(&again), ["a1", "b1"]);
        assert_eq!(
            (scans.get(), parsed()),
            (1, 2),
            "one scan, each object parsed once"
        );
        // Not given back: read again even at the same version.
        drop(again);
        let lent = cache.lend_at(at(7), scan).expect("a scan that cannot fail");
        assert_eq!(scans.get(), 2);
        cache.give_back(lent);
        // Written since: read again.
        let written = cache.lend_at(at(8), scan).expect("a scan that cannot fail");
        assert_eq!(names(&written), ["a1", "b1"]);
        assert_eq!(scans.get(), 3);
    }

    #[test]
    fn a_scan_that_failed_is_made_again_at_the_same_version() {
        let mut cache: KindCache<Counted> = KindCache::new("Pod");
        let at = KindVersion {
            replaced: 0,
            writes: 1,
        };
        let failed = cache.lend_at(at, |_| {
            Err(StoreError::Invalid {
                reason: "the disk failed".into(),
            })
        });
        assert!(failed.is_err());
        let lent = cache
            .lend_at(at, |visit| {
                visit(b"a", b"\"a1\"");
                Ok(())
            })
            .expect("a scan that cannot fail");
        assert_eq!(names(&lent), ["a1"]);
    }

    #[test]
    fn objects_not_given_back_are_parsed_again() {
        let mut cache = KindCache::new("Pod");
        let store = [("a", "\"a1\""), ("b", "\"b1\"")];
        drop(lend(&mut cache, &store));
        assert_eq!(parsed(), 2);
        let again = lend(&mut cache, &store);
        assert_eq!(names(&again), ["a1", "b1"]);
        assert_eq!(parsed(), 2);
    }

    #[test]
    fn an_object_that_does_not_parse_is_left_out() {
        let mut cache = KindCache::new("Pod");
        let items = lend(
            &mut cache,
            &[("a", "\"a1\""), ("b", "{not json"), ("c", "\"c1\"")],
        );
        assert_eq!(names(&items), ["a1", "c1"]);
        cache.give_back(items);
        let again = lend(&mut cache, &[("a", "\"a1\""), ("c", "\"c1\"")]);
        assert_eq!(names(&again), ["a1", "c1"]);
    }

    #[test]
    fn a_store_that_fails_half_way_through_a_list_lends_nothing_and_the_next_pass_reads_it_whole() {
        let mut cache = KindCache::new("Pod");
        let first = lend(&mut cache, &[("a", "\"a1\""), ("b", "\"b1\"")]);
        cache.give_back(first);
        let failed = cache.lend_from(|visit| {
            visit(b"a", b"\"a1\"");
            Err(StoreError::Invalid {
                reason: "the disk failed".into(),
            })
        });
        assert!(failed.is_err(), "a partial list is not lent");
        let again = lend(&mut cache, &[("a", "\"a1\""), ("b", "\"b1\"")]);
        assert_eq!(names(&again), ["a1", "b1"]);
    }
}
