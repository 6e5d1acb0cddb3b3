//! The node agent (the kubelet of Flotilla): registers this node, keeps its Ready condition
//! fresh, and reconciles the pods bound to it with the container runtime. Level-driven: every
//! pass lists the bound pods and the containers labelled with this node, so a restart of the
//! agent, a container killed behind its back or a pod deleted meanwhile all converge.

mod addresses;
mod containers;
pub mod plan;
mod pod_dns;
mod pod_files;
mod probes;
mod quantity;
mod resync;
pub(crate) mod routes;
mod service_env;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use anyhow::Context;
use flotilla_raft::selector::{FieldSelector, LabelSelector};
use flotilla_raft::store::EventType;
use flotilla_raft::{store, Command, ObjectKey, Replica, ReplicaError, StoreError, UpdatePart};
use flotilla_runtime::{
    labels, ContainerInfo, ContainerRuntime, ContainerSpec, ContainerSummary, Mount, NetworkMode,
    NetworkSpec, PullPolicy, RuntimeError,
};
use k8s_openapi::api::core::v1::Pod;
use serde_json::{json, Value};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::dns::resolv_conf::ResolvConf;
use crate::encryption::Keyring;
use containers::{PodContext, GRACE_LABEL};
use plan::{Action, Backoff, Observed, PodFacts, PullFailure};
use probes::ProbeResults;

/// How the agent runs.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub node_name: String,
    /// Pod volumes live under `<data_dir>/pods/<uid>/volumes`.
    pub data_dir: PathBuf,
    /// Secret volumes live under `<secret_volumes_dir>/<uid>`: a tmpfs directory (see
    /// [`default_secret_volumes_dir`]), so that no Secret value reaches a disk.
    pub secret_volumes_dir: PathBuf,
    /// The node's address as pods and other nodes see it.
    pub host_ip: String,
    pub heartbeat_interval: Duration,
    pub reconcile_interval: Duration,
    pub backoff: Backoff,
    /// The image of pod sandboxes; it must hold `sleep`.
    pub sandbox_image: String,
    /// Keep the pod network's gateway address off the host bridge: this node holds it and
    /// routes other nodes' pod subnets itself (see `agent/routes.rs`).
    pub inhibit_host_address: bool,
    /// The pod subnet this node asks for when it registers (default: the next free one).
    pub pod_cidr: Option<String>,
    /// The Docker network of this node's pods (default: one the agent names and creates), or
    /// with `pod_bridge` the host bridge's name.
    pub pod_network: Option<String>,
    /// Wire pods to a Linux bridge of this host with a veth pair each, the agent choosing their
    /// addresses, instead of putting them on a Docker network (`flotilla_runtime::host_bridge`):
    /// the node runs as root on the host.
    pub pod_bridge: bool,
    /// How many pods are started or changed at once.
    pub max_parallel_pods: usize,
    /// Pods resolve names through this node's cluster DNS server (`dns.rs`), which listens
    /// on the pod gateway address, port 53.
    pub cluster_dns: bool,
}

/// (pod uid, reason, message) of an event.
type EventKey = (String, String, String);
/// (Event object name, count, first timestamp).
type RecordedEvent = (String, u64, String);

/// State shared by the agent's tasks; each field has one writer.
#[derive(Default)]
struct Shared {
    /// Image pull failures by (pod uid, container name), written by pod workers.
    pull_failures: Mutex<HashMap<(String, String), PullFailure>>,
    /// Pods with a worker running, so a pass never starts two for one pod.
    busy_pods: Mutex<HashSet<String>>,
    /// Containers being stopped for removal.
    stopping: Mutex<HashSet<String>>,
    /// Probers by container id.
    probers: Mutex<HashMap<String, CancellationToken>>,
    probe_results: ProbeResults,
    /// Events already recorded, by (pod uid, reason, message): repeats bump the count of the
    /// same Event object, as the kubelet aggregates them. Bounded: cleared past 4096 entries.
    events: Mutex<HashMap<EventKey, RecordedEvent>>,
    /// Crashes already reported as BackOff, by (pod uid, container, attempt).
    backoffs_reported: Mutex<HashSet<(String, String, u32)>>,
    /// What each pod's last sync saw, by pod uid: a pass syncs only the pods where something
    /// changed since (`resync`).
    last_syncs: Mutex<HashMap<String, resync::LastSync>>,
    /// Pods the watch reported changed while a worker was syncing them: it goes once more.
    changed_while_busy: Mutex<HashSet<String>>,
    /// With a host bridge: the address of each pod on this node, by pod uid. Taken by the pod
    /// worker that first needs one, learnt from container labels, given up by a pass once the
    /// pod is neither bound here nor has a container.
    pod_addresses: Mutex<HashMap<String, Ipv4Addr>>,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

struct Agent {
    replica: Replica,
    /// Opens the Secrets this node's pods use.
    keyring: Keyring,
    runtime: Arc<dyn ContainerRuntime>,
    config: AgentConfig,
    cluster_id: String,
    network: String,
    shared: Arc<Shared>,
    slots: Arc<Semaphore>,
    /// The pod network's gateway address, known once the node has its pod subnet.
    pod_gateway: OnceLock<String>,
    /// This node's pod subnet, once known.
    pod_subnet: OnceLock<(std::net::Ipv4Addr, u8)>,
}

/// Of the directories named `names` (one per pod, named by its uid), those to remove: named
/// like a uid, of no pod in `live_uids`. Anything else in the directory is left alone. Pure.
fn leftover_pod_dirs(names: &[String], live_uids: &HashSet<String>) -> Vec<String> {
    names
        .iter()
        .filter(|name| uuid::Uuid::parse_str(name).is_ok() && !live_uids.contains(*name))
        .cloned()
        .collect()
}

/// Where a node keeps its pods' Secret volumes unless told otherwise: a directory of its own
/// (named after its data dir) on the `/dev/shm` tmpfs.
pub fn default_secret_volumes_dir(data_dir: &std::path::Path) -> PathBuf {
    let absolute = std::path::absolute(data_dir).unwrap_or_else(|_| data_dir.to_path_buf());
    let hash = absolute
        .to_string_lossy()
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325u64, |hash, byte| {
            (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
        });
    PathBuf::from(format!("/dev/shm/flotilla-secrets-{hash:016x}"))
}

fn now_ms() -> i64 {
    jiff::Timestamp::now().as_millisecond()
}

fn host_memory_kib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// The Node object this agent registers (spec is left to the control plane after creation).
fn node_object(config: &AgentConfig) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": config.node_name,
            "uid": uuid::Uuid::new_v4().to_string(),
            "creationTimestamp": crate::api::now_rfc3339(),
            "labels": {
                "kubernetes.io/hostname": config.node_name,
                "kubernetes.io/os": std::env::consts::OS,
                "kubernetes.io/arch": match std::env::consts::ARCH { "x86_64" => "amd64", "aarch64" => "arm64", other => other },
            }
        },
        "spec": match &config.pod_cidr {
            Some(cidr) => json!({"podCIDR": cidr, "podCIDRs": [cidr]}),
            None => json!({}),
        }
    })
}

/// How often the node's status is posted through Raft when nothing in it changed, so that
/// `lastHeartbeatTime` stays recent in `get nodes` (Kubernetes: nodeStatusReportFrequency,
/// 5 minutes). Liveness itself travels in the heartbeats, not in the status.
const NODE_STATUS_REPORT_INTERVAL: Duration = Duration::from_secs(60);

/// How long one post of the node's status may hold up the heartbeats.
const STATUS_POST_TIMEOUT: Duration = Duration::from_secs(2);

/// Whether the node's `fresh` status must go through Raft: the stored one is not Ready=True
/// (first post, or the leader marked the node unknown), something other than the heartbeat
/// time changed, or it was last posted `NODE_STATUS_REPORT_INTERVAL` ago or never by this agent.
fn status_needs_posting(
    stored_node: &Value,
    fresh: &Value,
    since_posted: Option<Duration>,
) -> bool {
    let without_heartbeat_time = |status: &Value| {
        let mut status = status.clone();
        if let Some(conditions) = status.get_mut("conditions").and_then(Value::as_array_mut) {
            for condition in conditions.iter_mut().filter_map(Value::as_object_mut) {
                condition.remove("lastHeartbeatTime");
            }
        }
        status
    };
    let stored = stored_node.get("status").cloned().unwrap_or(Value::Null);
    match since_posted {
        None => true,
        Some(elapsed) if elapsed >= NODE_STATUS_REPORT_INTERVAL => true,
        Some(_) => without_heartbeat_time(&stored) != without_heartbeat_time(fresh),
    }
}

/// The node's status as of `now`: capacity read from the host, Ready from this heartbeat.
fn node_status(config: &AgentConfig, previous: &Value, now: &str) -> Value {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let memory = format!("{}Ki", host_memory_kib());
    let ready_since = previous
        .pointer("/status/conditions")
        .and_then(Value::as_array)
        .and_then(|c| {
            c.iter()
                .find(|c| c["type"] == "Ready" && c["status"] == "True")
        })
        .and_then(|c| c.get("lastTransitionTime").cloned())
        .unwrap_or_else(|| Value::String(now.to_string()));
    json!({
        "capacity": {"cpu": cpus.to_string(), "memory": memory, "pods": "110"},
        "allocatable": {"cpu": cpus.to_string(), "memory": memory, "pods": "110"},
        "addresses": [
            {"type": "InternalIP", "address": config.host_ip},
            {"type": "Hostname", "address": config.node_name}
        ],
        "conditions": [{
            "type": "Ready", "status": "True", "reason": "FlotillaReady",
            "message": "flotilla agent is posting ready status",
            "lastHeartbeatTime": now, "lastTransitionTime": ready_since
        }],
        "nodeInfo": {
            "kubeletVersion": concat!("flotilla-", env!("CARGO_PKG_VERSION")),
            "containerRuntimeVersion": "docker",
            "operatingSystem": std::env::consts::OS,
            "architecture": std::env::consts::ARCH,
            "machineID": "", "systemUUID": "", "bootID": "", "kernelVersion": "", "osImage": "",
            "kubeProxyVersion": ""
        }
    })
}

/// The gateway of a /24 pod subnet: its `.1`.
pub(crate) fn gateway_of(cidr: &str) -> Option<String> {
    let base = cidr.split('/').next()?;
    let mut octets: Vec<&str> = base.split('.').collect();
    if octets.len() != 4 {
        return None;
    }
    octets[3] = "1";
    Some(octets.join("."))
}

/// Creates `dir` (and its parents) readable by its owner only.
fn create_private_dir(dir: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// This node's resolver, as its `/etc/resolv.conf` says now (none when it cannot be read).
fn node_resolver() -> ResolvConf {
    std::fs::read_to_string("/etc/resolv.conf")
        .map(|text| crate::dns::resolv_conf::parse(&text))
        .unwrap_or_default()
}

/// The hostname of `pod`'s containers: the first 63 characters of its name (a DNS label's
/// length).
fn pod_hostname(pod: &Pod) -> String {
    pod.metadata
        .name
        .as_deref()
        .unwrap_or("")
        .chars()
        .take(63)
        .collect()
}

fn observed_of(info: &ContainerInfo) -> Observed {
    Observed {
        id: info.id.clone(),
        container: info
            .labels
            .get(labels::CONTAINER)
            .cloned()
            .unwrap_or_default(),
        attempt: info
            .labels
            .get(labels::ATTEMPT)
            .and_then(|a| a.parse().ok())
            .unwrap_or(0),
        state: info.state.clone(),
        ip_address: info.ip_address.clone(),
    }
}

impl Agent {
    fn our_labels(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            (labels::CLUSTER.to_string(), self.cluster_id.clone()),
            (labels::NODE.to_string(), self.config.node_name.clone()),
        ])
    }

    async fn write_status(&self, object: Value) -> Result<(), ReplicaError> {
        self.replica
            .write(Command::Update {
                object: object.into(),
                part: UpdatePart::Status,
            })
            .await
            .map(drop)
    }

    /// Creates the Node object if absent and returns it (with its pod subnet).
    async fn register(&self) -> anyhow::Result<Value> {
        let key = ObjectKey::new("Node", "", &self.config.node_name);
        let mut node = node_object(&self.config);
        store::validate(&mut node).map_err(|e| anyhow::anyhow!("build the Node object: {e}"))?;
        match self
            .replica
            .write(Command::Create {
                object: node.into(),
            })
            .await
        {
            Ok(_) | Err(ReplicaError::Store(StoreError::AlreadyExists { .. })) => {}
            Err(error) => return Err(error).context("register the Node object"),
        }
        let node = self
            .replica
            .get(&key, true)
            .await
            .context("read the Node object")?;
        let status = node_status(&self.config, &node, &crate::api::now_rfc3339());
        self.post_status(&node, status)
            .await
            .context("post the first node status")?;
        Ok(node)
    }

    /// One heartbeat: tells the leader this node is alive (in its memory, not the log), and
    /// posts the node's status through Raft only when `status_needs_posting` says so.
    async fn heartbeat(&self, node: &Value, last_posted: &mut Option<tokio::time::Instant>) {
        if let Err(error) = self.replica.heartbeat(&self.config.node_name).await {
            tracing::debug!(%error, "send the node heartbeat");
        }
        let status = node_status(&self.config, node, &crate::api::now_rfc3339());
        let since_posted = last_posted.map(|at| at.elapsed());
        if !status_needs_posting(node, &status, since_posted) {
            return;
        }
        // Bounded, so that a slow write never holds the next heartbeat past the grace period;
        // a post cut short is tried again at the next heartbeat (it is idempotent).
        match tokio::time::timeout(STATUS_POST_TIMEOUT, self.post_status(node, status)).await {
            Ok(Ok(())) => *last_posted = Some(tokio::time::Instant::now()),
            Ok(Err(error)) => tracing::warn!(%error, "post node status"),
            Err(_) => tracing::warn!("post node status: no answer within {STATUS_POST_TIMEOUT:?}"),
        }
    }

    /// Writes `status` as the status of `node` (whatever its resourceVersion now).
    async fn post_status(&self, node: &Value, status: Value) -> Result<(), ReplicaError> {
        let mut object = resync::without_version(node);
        object["status"] = status;
        self.write_status(object).await
    }

    fn watch_bound_pods(
        &self,
    ) -> tokio::sync::mpsc::Receiver<Result<flotilla_raft::watch::WatchRecord, StoreError>> {
        let filter = flotilla_raft::watch::WatchFilter {
            kind: "Pod".into(),
            namespace: None,
            labels: LabelSelector::default(),
            fields: FieldSelector::parse(
                "Pod",
                &format!("spec.nodeName={}", self.config.node_name),
            )
            .unwrap_or_default(),
        };
        self.replica.watch(filter, None)
    }

    /// Records an Event about `pod` (in the background: a pod start does not wait for it).
    fn record_event(
        self: &Arc<Self>,
        pod: &Pod,
        event_type: &'static str,
        reason: &'static str,
        message: String,
    ) {
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let name = pod.metadata.name.clone().unwrap_or_default();
        let namespace = pod
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let now = crate::api::now_rfc3339();
        let (event_name, count, first) = {
            let mut events = lock(&self.shared.events);
            if events.len() > 4096 {
                events.clear();
                lock(&self.shared.backoffs_reported).clear();
            }
            let entry = events
                .entry((uid.clone(), reason.to_string(), message.clone()))
                .or_insert_with(|| (crate::events::event_name(&name), 0, now.clone()));
            entry.1 += 1;
            entry.clone()
        };
        let spec = crate::events::EventSpec {
            involved_kind: "Pod",
            involved_api_version: "v1",
            namespace: &namespace,
            name: &name,
            uid: &uid,
            event_type,
            reason,
            message: &message,
            component: "kubelet",
            host: &self.config.node_name,
        };
        let event = crate::events::event_object(&spec, &event_name, count, &first, &now);
        let agent = self.clone();
        tokio::spawn(async move {
            let mut event = event;
            if let Err(error) = store::validate(&mut event) {
                tracing::debug!(%error, "build event");
                return;
            }
            if let Err(error) = agent
                .replica
                .write(Command::Apply {
                    object: event.into(),
                })
                .await
            {
                tracing::debug!(%error, "record event");
            }
        });
    }

    fn bound_pods(&self) -> Result<Vec<Value>, StoreError> {
        let fields =
            FieldSelector::parse("Pod", &format!("spec.nodeName={}", self.config.node_name))
                .map_err(|e| StoreError::Invalid {
                    reason: e.to_string(),
                })?;
        Ok(self
            .replica
            .reader()
            .list("Pod", None, &LabelSelector::default(), &fields)?
            .0)
    }

    /// The pods bound to this node, each with its uid.
    fn bound_pods_with_uids(&self) -> anyhow::Result<Vec<(String, Value)>> {
        let pods = self
            .bound_pods()
            .context("list the pods bound to this node")?;
        Ok(pods
            .into_iter()
            .map(|pod| {
                let uid = pod
                    .pointer("/metadata/uid")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string();
                (uid, pod)
            })
            .collect())
    }

    /// Removes the volume directories (emptyDir under the data dir, Secret volumes on the
    /// tmpfs) of pods that have neither a container on this node nor a binding to it: what a
    /// node killed together with its containers leaves behind, since only the removal of a
    /// pod's last container removes them. Run at start, before any pod is synced, on a store
    /// caught up with the leader (a pod still bound here keeps its emptyDir).
    async fn remove_leftover_pod_dirs(&self) -> anyhow::Result<()> {
        self.replica
            .read_barrier()
            .await
            .context("catch up with the leader first")?;
        let mut live: HashSet<String> = self
            .bound_pods_with_uids()?
            .into_iter()
            .map(|(uid, _)| uid)
            .collect();
        let containers = self
            .runtime
            .list_container_summaries(&self.our_labels())
            .await
            .context("list this node's containers")?;
        live.extend(
            containers
                .into_iter()
                .filter_map(|container| container.labels.get(labels::POD_UID).cloned()),
        );
        for root in self.pod_dir_roots() {
            let Ok(entries) = std::fs::read_dir(&root) else {
                continue;
            };
            let names: Vec<String> = entries
                .filter_map(Result::ok)
                .filter_map(|entry| entry.file_name().into_string().ok())
                .collect();
            for name in leftover_pod_dirs(&names, &live) {
                let dir = root.join(&name);
                match std::fs::remove_dir_all(&dir) {
                    Ok(()) => {
                        tracing::info!(dir = %dir.display(), "removed the volumes of a pod that is gone")
                    }
                    Err(error) => {
                        tracing::warn!(%error, dir = %dir.display(), "remove the volumes of a pod that is gone")
                    }
                }
            }
        }
        Ok(())
    }

    /// One level-driven pass over every bound pod and every container of this node: syncs the
    /// pods where something may have changed (`changed_in_store`: pods the watch reported) and
    /// stops the containers of pods that are gone.
    async fn reconcile(self: &Arc<Self>, changed_in_store: &HashSet<String>) -> anyhow::Result<()> {
        let pods = self.bound_pods_with_uids()?;
        let containers = self
            .runtime
            .list_container_summaries(&self.our_labels())
            .await
            .context("list this node's containers")?;
        let bound: HashSet<String> = pods.iter().map(|(uid, _)| uid.clone()).collect();
        self.learn_pod_addresses(&containers, Some(&bound));
        let mut by_pod: HashMap<String, Vec<ContainerSummary>> = HashMap::new();
        for container in containers {
            let uid = container
                .labels
                .get(labels::POD_UID)
                .cloned()
                .unwrap_or_default();
            by_pod.entry(uid).or_default().push(container);
        }
        let mut live_uids = HashSet::new();
        for (uid, pod) in pods {
            live_uids.insert(uid.clone());
            let states = resync::container_states(
                by_pod
                    .get(&uid)
                    .into_iter()
                    .flatten()
                    .map(|c| (c.id.clone(), c.state.clone()))
                    .collect(),
            );
            let due = resync::needs_sync(
                lock(&self.shared.last_syncs).get(&uid),
                changed_in_store.contains(&uid),
                &states,
                &self.probes_of(&uid),
                now_ms(),
            );
            if !due || !lock(&self.shared.busy_pods).insert(uid.clone()) {
                continue;
            }
            self.spawn_sync(pod, uid);
        }
        lock(&self.shared.last_syncs).retain(|uid, _| live_uids.contains(uid));
        // Containers of pods that are gone or bound elsewhere: stop them within their grace period.
        for (uid, orphans) in by_pod {
            if live_uids.contains(&uid) {
                continue;
            }
            for container in orphans {
                if !lock(&self.shared.stopping).insert(container.id.clone()) {
                    continue;
                }
                let agent = self.clone();
                tokio::spawn(async move {
                    agent.stop_orphan(&container).await;
                    lock(&agent.shared.stopping).remove(&container.id);
                });
            }
        }
        Ok(())
    }

    /// Syncs the bound pods among `changed` (reported by the watch), each on a worker; false
    /// when one of them is no longer bound here (deleted, or bound elsewhere): then only a full
    /// pass, which lists the containers, finds what to stop.
    fn sync_changed(self: &Arc<Self>, changed: &HashSet<String>) -> anyhow::Result<bool> {
        let mut found = 0;
        for (uid, pod) in self.bound_pods_with_uids()? {
            if !changed.contains(&uid) {
                continue;
            }
            found += 1;
            if lock(&self.shared.busy_pods).insert(uid.clone()) {
                self.spawn_sync(pod, uid);
            } else {
                // A worker is on it with an older copy: it syncs once more when done.
                lock(&self.shared.changed_while_busy).insert(uid);
            }
        }
        Ok(found == changed.len())
    }

    /// Syncs one pod on a worker (its engine work at most `max_parallel_pods` at once). The
    /// caller has marked it busy; the worker unmarks it.
    fn spawn_sync(self: &Arc<Self>, pod: Value, uid: String) {
        let agent = self.clone();
        tokio::spawn(async move {
            let mut pod = pod;
            loop {
                if let Err(error) = agent.sync_pod(&pod).await {
                    lock(&agent.shared.last_syncs).remove(&uid);
                    let name = pod
                        .pointer("/metadata/name")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_string();
                    tracing::warn!(pod = %name, error = format!("{error:#}"), "sync pod");
                }
                if !lock(&agent.shared.changed_while_busy).remove(&uid) {
                    break;
                }
                // The pod changed during the sync: once more with its current copy.
                let key = ObjectKey::new(
                    "Pod",
                    pod.pointer("/metadata/namespace")
                        .and_then(Value::as_str)
                        .unwrap_or("default"),
                    pod.pointer("/metadata/name")
                        .and_then(Value::as_str)
                        .unwrap_or(""),
                );
                match agent.replica.reader().get(&key) {
                    Ok(Some(current))
                        if current.pointer("/metadata/uid").and_then(Value::as_str)
                            == Some(uid.as_str()) =>
                    {
                        pod = current
                    }
                    _ => break,
                }
            }
            lock(&agent.shared.busy_pods).remove(&uid);
        });
    }

    async fn stop_orphan(&self, container: &ContainerSummary) {
        let grace = container
            .labels
            .get(GRACE_LABEL)
            .and_then(|g| g.parse::<u64>().ok())
            .unwrap_or(30);
        let is_sandbox =
            container.labels.get(labels::CONTAINER).map(String::as_str) == Some(plan::SANDBOX);
        if let Some(token) = lock(&self.shared.probers).remove(&container.id) {
            token.cancel();
        }
        if container.state == "running" && !is_sandbox {
            tracing::info!(container = %container.name, grace_seconds = grace, "stopping container of a pod that is gone");
            if let Err(error) = self
                .runtime
                .stop_container(&container.id, Duration::from_secs(grace))
                .await
            {
                tracing::warn!(%error, container = %container.name, "stop container");
            }
        }
        if let Err(error) = self.runtime.remove_container(&container.id).await {
            tracing::warn!(%error, container = %container.name, "remove container");
        }
        // The pod's volumes go with its last container (every task removing one of them
        // lists after its own removal, so the last list sees none left).
        let Some(uid) = container.labels.get(labels::POD_UID) else {
            return;
        };
        if uid.is_empty() || uid.contains('/') || uid.contains("..") {
            return;
        }
        match self
            .runtime
            .list_container_summaries(&self.pod_labels(uid))
            .await
        {
            Ok(left) if left.is_empty() => {
                for root in self.pod_dir_roots() {
                    let _ = std::fs::remove_dir_all(root.join(uid));
                }
            }
            Ok(_) => {}
            Err(error) => tracing::warn!(%error, pod_uid = %uid, "list the pod's containers"),
        }
    }

    /// Reads the ConfigMaps and Secrets a container of this node's pod refers to from this
    /// node's store. Secrets are opened here, and only here: the agent opens only the Secrets
    /// that pods bound to its own node use, so a Secret's value reaches the node that needs it
    /// and no other (every node stores it, sealed).
    fn lookup(&self) -> impl Fn(&str, &str, &str) -> Result<Option<Value>, String> + '_ {
        move |kind: &str, namespace: &str, name: &str| {
            let stored = self
                .replica
                .reader()
                .get(&ObjectKey::new(kind, namespace, name))
                .map_err(|e| format!("read {kind} {namespace}/{name}: {e}"))?;
            stored
                .map(|object| self.keyring.open(object))
                .transpose()
                .map_err(|e| format!("open {kind} {namespace}/{name}: {e}"))
        }
    }

    fn pull_failures_of(&self, uid: &str) -> BTreeMap<String, PullFailure> {
        lock(&self.shared.pull_failures)
            .iter()
            .filter(|((pod, _), _)| pod == uid)
            .map(|((_, container), failure)| (container.clone(), failure.clone()))
            .collect()
    }

    fn probes_of(&self, uid: &str) -> BTreeMap<String, plan::ProbeResult> {
        lock(&self.shared.probe_results.by_container)
            .iter()
            .filter(|((pod, _), _)| pod == uid)
            .map(|((_, container), result)| (container.clone(), *result))
            .collect()
    }

    /// Plans and executes the next actions for one pod, then writes its status if it changed.
    async fn sync_pod(self: &Arc<Self>, pod_json: &Value) -> anyhow::Result<()> {
        // A slot bounds the pods the engine works on at once; the status write after is no
        // engine work and happens without it.
        let engine_slot = self
            .slots
            .clone()
            .acquire_owned()
            .await
            .context("take an engine slot")?;
        let pod: Pod = serde_json::from_value(pod_json.clone()).context("parse the pod")?;
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        // The pod's containers as they are now: a pass's list is stale by the time a worker
        // gets a slot, and acting on it would remove or duplicate what another worker made.
        let pod_labels = self.pod_labels(&uid);
        let mut observed = self
            .runtime
            .list_containers(&pod_labels)
            .await
            .context("list the pod's containers")?;
        let observed_now: Vec<Observed> = observed.iter().map(observed_of).collect();
        let pulls = self.pull_failures_of(&uid);
        let probes = self.probes_of(&uid);
        let facts = PodFacts {
            pod: &pod,
            observed: &observed_now,
            probes: &probes,
            pull_failures: &pulls,
            backoff: self.config.backoff,
            now_ms: now_ms(),
        };
        let actions = plan::plan(&facts);
        for (container, attempt) in plan::backing_off(&facts) {
            // Once per crash, not once per pass.
            let first_report = lock(&self.shared.backoffs_reported).insert((
                uid.clone(),
                container.clone(),
                attempt,
            ));
            if first_report {
                let pod_name = pod.metadata.name.as_deref().unwrap_or("");
                self.record_event(
                    &pod,
                    "Warning",
                    "BackOff",
                    format!("Back-off restarting failed container {container} in pod {pod_name}"),
                );
            }
        }
        let mut changed = !actions.is_empty();
        let settled = actions.is_empty()
            && plan::backing_off(&facts).is_empty()
            && facts.pull_failures.is_empty();
        // After starts only, the pod's containers are those seen before and the ones started
        // (one inspect each instead of a list and an inspect of every container); after a
        // stop, a removal or a failure, they are listed again.
        let mut started = Vec::new();
        let mut list_again = false;
        for action in actions {
            match self.execute(&pod, &observed_now, &action).await {
                Ok(Some(id)) => started.push(id),
                Ok(None) => list_again = true,
                Err(error) => {
                    tracing::warn!(pod = %pod.metadata.name.as_deref().unwrap_or(""), ?action, error = format!("{error:#}"), "pod action failed");
                    list_again = true;
                    break;
                }
            }
        }
        if changed && !list_again {
            for id in &started {
                match self.runtime.inspect_container(id).await {
                    Ok(info) => observed.push(info),
                    // Gone already (removed behind the agent's back): list what is there.
                    Err(RuntimeError::NotFound { .. }) => list_again = true,
                    Err(error) => return Err(error).context("inspect a started container"),
                }
            }
            observed.sort_by(|a, b| a.name.cmp(&b.name));
        }
        if changed && list_again {
            observed = self
                .runtime
                .list_containers(&pod_labels)
                .await
                .context("list the pod's containers")?;
        }
        let observed_after: Vec<Observed> = observed.iter().map(observed_of).collect();
        self.ensure_probers(&pod, &observed_after);
        let pulls = self.pull_failures_of(&uid);
        let probes = self.probes_of(&uid);
        let mut seen = resync::LastSync {
            object: resync::without_version(pod_json),
            containers: resync::container_states(
                observed
                    .iter()
                    .map(|c| (c.id.clone(), c.state.word().to_owned()))
                    .collect(),
            ),
            probes: probes.clone(),
            settled,
            at_ms: now_ms(),
        };
        let facts = PodFacts {
            pod: &pod,
            observed: &observed_after,
            probes: &probes,
            pull_failures: &pulls,
            backoff: self.config.backoff,
            now_ms: now_ms(),
        };
        let previous = pod_json.get("status").cloned().unwrap_or_else(|| json!({}));
        let status = plan::status(
            &facts,
            &previous,
            &self.config.host_ip,
            &crate::api::now_rfc3339(),
        );
        changed = status != previous;
        drop(engine_slot);
        if changed {
            let mut object = resync::without_version(pod_json);
            object["status"] = status;
            seen.object = object.clone();
            match self.write_status(object).await {
                Ok(()) | Err(ReplicaError::Store(StoreError::NotFound { .. })) => {}
                Err(error) => return Err(error).context("write pod status"),
            }
        }
        lock(&self.shared.last_syncs).insert(uid, seen);
        Ok(())
    }

    /// Starts a prober for every running container with probes that has none yet.
    fn ensure_probers(&self, pod: &Pod, observed: &[Observed]) {
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let pod_ip = plan::network_holder(pod, observed)
            .and_then(|o| o.ip_address.clone())
            .unwrap_or_default();
        let spec_containers = pod
            .spec
            .as_ref()
            .map(|s| s.containers.clone())
            .unwrap_or_default();
        let mut probers = lock(&self.shared.probers);
        for container in spec_containers {
            let has_probes = container.liveness_probe.is_some()
                || container.readiness_probe.is_some()
                || container.startup_probe.is_some();
            let running = observed
                .iter()
                .filter(|o| o.container == container.name)
                .max_by_key(|o| o.attempt)
                .filter(|o| matches!(o.state, flotilla_runtime::ContainerState::Running { .. }));
            let Some(running) = running else { continue };
            if !has_probes || probers.contains_key(&running.id) {
                continue;
            }
            let stop = CancellationToken::new();
            probers.insert(running.id.clone(), stop.clone());
            tokio::spawn(probes::run_probes(
                self.runtime.clone(),
                self.shared.probe_results.clone(),
                (uid.clone(), container.name.clone()),
                running.id.clone(),
                pod_ip.clone(),
                container,
                stop,
            ));
        }
    }

    fn pod_context<'a>(&'a self, pod: &'a Pod, pod_ip: Option<&'a str>) -> PodContext<'a> {
        let uid = pod.metadata.uid.as_deref().unwrap_or("unknown");
        let [pods_dir, secret_volumes_dir] = self.pod_dir_roots();
        PodContext {
            pod,
            cluster_id: &self.cluster_id,
            node_name: &self.config.node_name,
            pod_ip,
            volumes_dir: pods_dir.join(uid).join("volumes"),
            secrets_dir: secret_volumes_dir.join(uid),
            service_env: Vec::new(),
        }
    }

    /// The directories holding one directory per pod, named by its uid: its volumes under the
    /// data dir, its Secret volumes on the tmpfs.
    fn pod_dir_roots(&self) -> [PathBuf; 2] {
        [
            self.config.data_dir.join("pods"),
            self.config.secret_volumes_dir.clone(),
        ]
    }

    /// A namespace of the pod's own on this node's pod network, with its hostname and
    /// resolver: the sandbox's, or the only container's of a pod that needs no sandbox.
    /// With a host bridge, the address comes from this node's table (the pod's own, else
    /// `ipv4_address` when free, else the lowest free one); without, the engine picks one when
    /// `ipv4_address` is none.
    fn own_namespace(
        &self,
        pod: &Pod,
        ipv4_address: Option<String>,
    ) -> anyhow::Result<NetworkMode> {
        let ipv4_address = if self.config.pod_bridge {
            let uid = pod.metadata.uid.as_deref().unwrap_or_default();
            Some(self.pod_address(uid, ipv4_address.as_deref())?.to_string())
        } else {
            ipv4_address
        };
        let dns = self.pod_dns(pod, &node_resolver());
        Ok(NetworkMode::OwnNamespace {
            network: self.network.clone(),
            hostname: pod_hostname(pod),
            dns_servers: dns.servers,
            dns_search: dns.searches,
            dns_options: dns.options,
            ipv4_address,
        })
    }

    /// On a host bridge, where the engine writes neither: writes the pod's resolv.conf and
    /// hosts file (at `pod_ip`) into its directory and returns their mounts, leaving out a
    /// path `container_mounts` already has (a volume the pod mounts there wins, as with the
    /// kubelet). Rewritten at each container start, so a restart finds them whatever became
    /// of the directory.
    fn pod_etc_mounts(
        &self,
        pod: &Pod,
        pod_ip: &str,
        container_mounts: &[Mount],
    ) -> anyhow::Result<Vec<Mount>> {
        if !self.config.pod_bridge {
            return Ok(Vec::new());
        }
        let uid = pod.metadata.uid.as_deref().unwrap_or("unknown");
        let [pods_dir, _] = self.pod_dir_roots();
        let dir = pods_dir.join(uid);
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("create the pod directory {}", dir.display()))?;
        let node_resolver = node_resolver();
        let files = [
            (
                pod_files::RESOLV_CONF_FILE,
                "/etc/resolv.conf",
                pod_files::resolv_conf(&self.pod_dns(pod, &node_resolver), &node_resolver),
            ),
            (
                pod_files::HOSTS_FILE,
                "/etc/hosts",
                pod_files::hosts(pod_ip, &pod_hostname(pod)),
            ),
        ];
        let mut mounts = Vec::new();
        for (file, container_path, text) in files {
            if container_mounts
                .iter()
                .any(|mount| mount.container_path.trim_end_matches('/') == container_path)
            {
                continue;
            }
            let path = dir.join(file);
            containers::write_file(&path, text.as_bytes()).with_context(|| {
                format!("write the pod's {container_path} to {}", path.display())
            })?;
            mounts.push(Mount {
                host_path: path.display().to_string(),
                container_path: container_path.to_owned(),
                read_only: false,
            });
        }
        Ok(mounts)
    }

    /// The host bridge address of the pod `uid`: the one it has, or a free one taken for it.
    fn pod_address(&self, uid: &str, preferred: Option<&str>) -> anyhow::Result<Ipv4Addr> {
        let mut table = lock(&self.shared.pod_addresses);
        if let Some(address) = table.get(uid) {
            return Ok(*address);
        }
        let (Some(subnet), Some(gateway)) = (
            self.pod_subnet.get(),
            self.pod_gateway.get().and_then(|g| g.parse().ok()),
        ) else {
            anyhow::bail!("this node has no pod subnet yet");
        };
        let taken: HashSet<Ipv4Addr> = table.values().copied().collect();
        let preferred = preferred.and_then(|address| address.parse().ok());
        let address =
            addresses::choose(*subnet, gateway, &taken, preferred).with_context(|| {
                format!(
                    "find a free address in the pod subnet {}/{} ({} taken)",
                    subnet.0,
                    subnet.1,
                    taken.len()
                )
            })?;
        table.insert(uid.to_owned(), address);
        Ok(address)
    }

    /// Learns the host bridge addresses the containers of `containers` carry (a restarted
    /// agent finds its pods' addresses so), and with `live` gives up those of pods that are
    /// neither in it nor have a container left.
    fn learn_pod_addresses(&self, containers: &[ContainerSummary], live: Option<&HashSet<String>>) {
        if !self.config.pod_bridge {
            return;
        }
        let mut table = lock(&self.shared.pod_addresses);
        let mut with_containers = HashSet::new();
        for container in containers {
            let Some(uid) = container.labels.get(labels::POD_UID) else {
                continue;
            };
            with_containers.insert(uid.as_str());
            let address = container
                .labels
                .get(labels::POD_IP)
                .and_then(|address| address.parse().ok());
            if let Some(address) = address {
                table.entry(uid.clone()).or_insert(address);
            }
        }
        if let Some(live) = live {
            let busy = lock(&self.shared.busy_pods);
            table.retain(|uid, _| {
                live.contains(uid) || with_containers.contains(uid.as_str()) || busy.contains(uid)
            });
        }
    }

    /// Makes the image of container `name` of `pod` present as `policy` says; a failed pull
    /// is recorded for the pod's status (ErrImagePull, then ImagePullBackOff) and as Events.
    async fn make_image_present(
        self: &Arc<Self>,
        pod: &Pod,
        uid: &str,
        name: &str,
        image: &str,
        policy: PullPolicy,
    ) -> anyhow::Result<()> {
        // With no registry reachable, `Always` falls back to a present image, with a
        // warning, rather than failing every start.
        let mut pulled = self.runtime.ensure_image(image, policy).await;
        if policy == PullPolicy::Always && pulled.is_err() {
            tracing::warn!(%image, "pull failed; using the image present on this node");
            pulled = self
                .runtime
                .ensure_image(image, PullPolicy::IfNotPresent)
                .await;
        }
        match pulled {
            Ok(()) => {
                lock(&self.shared.pull_failures).remove(&(uid.to_owned(), name.to_owned()));
                Ok(())
            }
            Err(error @ (RuntimeError::ImagePull { .. } | RuntimeError::ImageNeverPull { .. })) => {
                let mut failures = lock(&self.shared.pull_failures);
                let entry =
                    failures
                        .entry((uid.to_owned(), name.to_owned()))
                        .or_insert(PullFailure {
                            message: String::new(),
                            failures: 0,
                            last_failure_ms: 0,
                        });
                entry.failures += 1;
                entry.last_failure_ms = now_ms();
                entry.message = error.to_string();
                let first = entry.failures == 1;
                drop(failures);
                self.record_event(
                    pod,
                    "Warning",
                    "Failed",
                    format!("Failed to pull image {image:?}: {error}"),
                );
                if !first {
                    self.record_event(
                        pod,
                        "Normal",
                        "BackOff",
                        format!("Back-off pulling image {image:?}"),
                    );
                }
                Err(error).context("pull the image")
            }
            Err(error) => Err(error).context("make the image present"),
        }
    }

    /// Creates and starts the container of `spec`; its id.
    async fn create_and_start(&self, spec: &ContainerSpec) -> anyhow::Result<String> {
        let id = self
            .runtime
            .create_container(spec)
            .await
            .context("create container")?;
        self.runtime
            .start_container(&id)
            .await
            .context("start container")?;
        Ok(id)
    }

    /// The labels every container of the pod `uid` carries.
    fn pod_labels(&self, uid: &str) -> BTreeMap<String, String> {
        BTreeMap::from([
            (labels::CLUSTER.to_string(), self.cluster_id.clone()),
            (labels::POD_UID.to_string(), uid.to_string()),
        ])
    }

    /// Whether `address` is in this node's pod subnet.
    fn is_pod_address(&self, address: &str) -> bool {
        match (self.pod_subnet.get(), address.parse()) {
            (Some(subnet), Ok(address)) => routes::contains(*subnet, address),
            _ => false,
        }
    }

    /// The resolver of `pod`'s sandbox, on a node whose own is `node_resolver`.
    fn pod_dns(&self, pod: &Pod, node_resolver: &ResolvConf) -> pod_dns::PodDns {
        let cluster = self
            .pod_gateway
            .get()
            .filter(|_| self.config.cluster_dns)
            .map(|gateway| pod_dns::ClusterDns {
                server: gateway.clone(),
                domain: crate::dns::CLUSTER_DOMAIN.to_owned(),
                node_searches: node_resolver.searches.clone(),
            });
        pod_dns::pod_dns(pod, cluster.as_ref())
    }

    /// The Service variables of a container of `pod` created now: the Services of its
    /// namespace and the `kubernetes` Service of `default`, as this node's store has them.
    fn service_env(&self, pod: &Pod) -> Vec<(String, String)> {
        let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
        let enable_links = pod
            .spec
            .as_ref()
            .and_then(|s| s.enable_service_links)
            .unwrap_or(true);
        let reader = self.replica.reader();
        let mut services = if enable_links {
            match reader.list(
                "Service",
                Some(namespace),
                &LabelSelector::default(),
                &FieldSelector::default(),
            ) {
                Ok((services, _)) => services,
                Err(error) => {
                    tracing::warn!(%error, %namespace, "list the Services for container environment");
                    Vec::new()
                }
            }
        } else {
            Vec::new()
        };
        if let Ok(Some(master)) = reader.get(&ObjectKey::new("Service", "default", "kubernetes")) {
            services.push(master);
        }
        service_env::service_environment(namespace, enable_links, &services)
    }

    async fn execute(
        self: &Arc<Self>,
        pod: &Pod,
        observed: &[Observed],
        action: &Action,
    ) -> anyhow::Result<Option<String>> {
        match action {
            Action::Remove { id } => {
                if let Some(token) = lock(&self.shared.probers).remove(id) {
                    token.cancel();
                }
                self.runtime
                    .remove_container(id)
                    .await
                    .context("remove container")?;
                Ok(None)
            }
            Action::Kill { id } => {
                if let Some(token) = lock(&self.shared.probers).remove(id) {
                    token.cancel();
                }
                let ctx = self.pod_context(pod, None);
                tracing::info!(pod = %ctx.name(), container = %id, "liveness probe failed, restarting the container");
                let name = observed
                    .iter()
                    .find(|o| &o.id == id)
                    .map(|o| o.container.clone())
                    .unwrap_or_default();
                self.record_event(
                    pod,
                    "Warning",
                    "Unhealthy",
                    format!("Container {name} failed its liveness probe, will be restarted"),
                );
                self.record_event(
                    pod,
                    "Normal",
                    "Killing",
                    format!("Stopping container {name}"),
                );
                self.runtime
                    .stop_container(id, Duration::from_secs(ctx.grace_seconds().max(0) as u64))
                    .await
                    .context("stop container")?;
                Ok(None)
            }
            Action::StartSandbox => {
                let ctx = self.pod_context(pod, None);
                self.runtime
                    .ensure_image(&self.config.sandbox_image, PullPolicy::IfNotPresent)
                    .await
                    .context("make the sandbox image present")?;
                let attempt = observed
                    .iter()
                    .filter(|o| o.container == plan::SANDBOX)
                    .map(|o| o.attempt + 1)
                    .max()
                    .unwrap_or(0);
                let network = self.own_namespace(pod, None)?;
                let mounts = match &network {
                    NetworkMode::OwnNamespace {
                        ipv4_address: Some(address),
                        ..
                    } => self.pod_etc_mounts(pod, address, &[])?,
                    _ => Vec::new(),
                };
                let spec = ContainerSpec {
                    name: ctx.container_name(plan::SANDBOX, attempt),
                    image: self.config.sandbox_image.clone(),
                    entrypoint: Some(vec!["sleep".into(), "2147483647".into()]),
                    args: None,
                    working_dir: None,
                    env: Vec::new(),
                    labels: ctx.labels(plan::SANDBOX, attempt),
                    mounts,
                    memory_limit_bytes: None,
                    nano_cpus: None,
                    network,
                };
                self.create_and_start(&spec)
                    .await
                    .context("run the pod sandbox")
                    .map(Some)
            }
            Action::StartContainer {
                name,
                init,
                attempt,
            } => {
                let spec_container = pod
                    .spec
                    .as_ref()
                    .and_then(|s| {
                        let list = if *init {
                            s.init_containers.as_deref().unwrap_or(&[])
                        } else {
                            s.containers.as_slice()
                        };
                        list.iter().find(|c| &c.name == name)
                    })
                    .context("the planned container is in the pod spec")?;
                // In the sandbox's namespace, or (a pod that needs no sandbox) in its own, at
                // the address the pod had before this restart when that address is free.
                let (network, sandbox_ip) = if plan::needs_sandbox(pod, observed) {
                    let sandbox = observed
                        .iter()
                        .filter(|o| o.container == plan::SANDBOX)
                        .max_by_key(|o| o.attempt)
                        .context("the pod has a sandbox")?;
                    let network = NetworkMode::JoinSandbox {
                        sandbox_id: sandbox.id.clone(),
                    };
                    (network, sandbox.ip_address.as_deref())
                } else {
                    let previous_ip = pod
                        .status
                        .as_ref()
                        .and_then(|s| s.pod_ip.clone())
                        .filter(|ip| self.is_pod_address(ip));
                    (self.own_namespace(pod, previous_ip)?, None)
                };
                let uid = pod.metadata.uid.clone().unwrap_or_default();
                let image = spec_container.image.clone().unwrap_or_default();
                let policy = match spec_container.image_pull_policy.as_deref() {
                    Some("Always") => PullPolicy::Always,
                    Some("Never") => PullPolicy::Never,
                    Some(_) => PullPolicy::IfNotPresent,
                    None if image.ends_with(":latest") || !image.contains(':') => {
                        PullPolicy::IfNotPresent
                    }
                    None => PullPolicy::IfNotPresent,
                };
                // The engine is asked for the image only when the create finds it missing
                // (one call less per start); `Always` pulls first.
                let image_checked = policy == PullPolicy::Always;
                if image_checked {
                    self.make_image_present(pod, &uid, name, &image, policy)
                        .await?;
                }
                let mut ctx = self.pod_context(pod, sandbox_ip);
                ctx.service_env = self.service_env(pod);
                let lookup = self.lookup();
                let has_secret_volumes = pod
                    .spec
                    .as_ref()
                    .and_then(|s| s.volumes.as_ref())
                    .is_some_and(|volumes| volumes.iter().any(|v| v.secret.is_some()));
                if has_secret_volumes {
                    create_private_dir(&self.config.secret_volumes_dir).with_context(|| {
                        format!(
                            "create the Secret volumes directory {}",
                            self.config.secret_volumes_dir.display()
                        )
                    })?;
                }
                containers::materialize_volumes(&ctx, &lookup).map_err(anyhow::Error::msg)?;
                let pod_ip = match &network {
                    NetworkMode::OwnNamespace { ipv4_address, .. } => ipv4_address.clone(),
                    NetworkMode::JoinSandbox { .. } => sandbox_ip.map(str::to_owned),
                };
                let mut spec =
                    containers::container_spec(&ctx, spec_container, *attempt, network, &lookup)
                        .map_err(anyhow::Error::msg)?;
                if let Some(pod_ip) = &pod_ip {
                    let etc_mounts = self.pod_etc_mounts(pod, pod_ip, &spec.mounts)?;
                    spec.mounts.extend(etc_mounts);
                }
                self.record_event(
                    pod,
                    "Normal",
                    "Pulled",
                    format!("Container image {image:?} already present on machine"),
                );
                let id = match self.runtime.create_container(&spec).await {
                    Err(RuntimeError::ImageNotPresent { .. }) if !image_checked => {
                        self.make_image_present(pod, &uid, name, &image, policy)
                            .await?;
                        self.runtime.create_container(&spec).await
                    }
                    created => created,
                }
                .context("create container")?;
                lock(&self.shared.pull_failures).remove(&(uid.clone(), name.clone()));
                self.record_event(
                    pod,
                    "Normal",
                    "Created",
                    format!("Created container {name}"),
                );
                // The container that runs: this one, or one at another address.
                let running_id = if let Err(error) = self.runtime.start_container(&id).await {
                    let NetworkMode::OwnNamespace {
                        ipv4_address: Some(address),
                        ..
                    } = &spec.network
                    else {
                        return Err(error).context("start container");
                    };
                    // On a host bridge the address is this node's to give, and taken for
                    // this pod: the failure is not about it.
                    if self.config.pod_bridge {
                        return Err(error).context("start container");
                    }
                    // The pod's old address is taken: any free one will do.
                    tracing::info!(pod = %ctx.name(), %address, %error, "the pod's previous address is not free, starting at another");
                    self.runtime
                        .remove_container(&id)
                        .await
                        .context("remove the container that could not start")?;
                    let mut anywhere = spec.clone();
                    if let NetworkMode::OwnNamespace { ipv4_address, .. } = &mut anywhere.network {
                        *ipv4_address = None;
                    }
                    self.create_and_start(&anywhere).await?
                } else {
                    id
                };
                self.record_event(
                    pod,
                    "Normal",
                    "Started",
                    format!("Started container {name}"),
                );
                Ok(Some(running_id))
            }
        }
    }
}

/// Runs the agent until `shutdown`. Containers keep running when the agent stops; a restarted
/// agent adopts them by their labels.
pub async fn run(
    replica: Replica,
    runtime: Arc<dyn ContainerRuntime>,
    config: AgentConfig,
    keyring: Keyring,
    shutdown: CancellationToken,
) {
    let cluster_id = loop {
        match replica.reader().registry() {
            Ok(registry) if !registry.cluster_id.is_empty() => break registry.cluster_id,
            _ => {}
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    };
    let short_cluster: String = cluster_id.chars().take(8).collect();
    let default_network = if config.pod_bridge {
        addresses::bridge_name(&cluster_id, &config.node_name)
    } else {
        format!("flotilla-{short_cluster}-{}", config.node_name)
    };
    let agent = Arc::new(Agent {
        network: config.pod_network.clone().unwrap_or(default_network),
        slots: Arc::new(Semaphore::new(config.max_parallel_pods.max(1))),
        replica,
        keyring,
        runtime,
        config,
        cluster_id,
        shared: Arc::default(),
        pod_gateway: OnceLock::new(),
        pod_subnet: OnceLock::new(),
    });
    let node = loop {
        match agent.register().await {
            Ok(node) => break node,
            Err(error) => {
                tracing::warn!(error = format!("{error:#}"), "register this node, retrying")
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    };
    let Some(pod_cidr) = store::pod_cidr(&node).map(str::to_string) else {
        tracing::error!("the Node object has no pod subnet; the agent cannot run pods");
        return;
    };
    if let Some(gateway) = gateway_of(&pod_cidr) {
        let _ = agent.pod_gateway.set(gateway);
    }
    if let Some(subnet) = routes::parse_cidr(&pod_cidr) {
        let _ = agent.pod_subnet.set(subnet);
    }
    let network = NetworkSpec {
        name: agent.network.clone(),
        subnet: pod_cidr.clone(),
        gateway: gateway_of(&pod_cidr),
        labels: agent.our_labels(),
        inhibit_host_address: agent.config.inhibit_host_address,
        host_bridge: agent.config.pod_bridge,
    };
    loop {
        match agent.runtime.ensure_network(&network).await {
            Ok(()) => break,
            Err(error) => {
                tracing::warn!(%error, network = %network.name, "create the pod network, retrying")
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
    }
    // The addresses this node's pods hold on its bridge, before any pod is given one.
    if agent.config.pod_bridge {
        loop {
            match agent
                .runtime
                .list_container_summaries(&agent.our_labels())
                .await
            {
                Ok(containers) => {
                    agent.learn_pod_addresses(&containers, None);
                    break;
                }
                Err(error) => tracing::warn!(
                    %error,
                    "list this node's containers for their addresses, retrying"
                ),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            }
        }
    }
    if let Err(error) = agent.remove_leftover_pod_dirs().await {
        tracing::warn!(
            error = format!("{error:#}"),
            "remove the volume directories of pods that are gone"
        );
    }
    tracing::info!(pod_cidr = %pod_cidr, network = %network.name, "agent running");
    let routes = agent.config.inhibit_host_address.then(|| {
        tokio::spawn(routes::run(
            agent.replica.clone(),
            agent.config.node_name.clone(),
            pod_cidr.clone(),
            shutdown.clone(),
        ))
    });
    let mut reconcile_tick = tokio::time::interval(agent.config.reconcile_interval);
    reconcile_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Heartbeats have a task of their own: a slow pass (a busy Docker daemon) must not delay
    // them past the control plane's grace period.
    let heartbeats = {
        let agent = agent.clone();
        let shutdown = shutdown.clone();
        let node_key = ObjectKey::new("Node", "", &agent.config.node_name);
        tokio::spawn(async move {
            let mut heartbeat_tick = tokio::time::interval(agent.config.heartbeat_interval);
            heartbeat_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            // `register` has just posted the status.
            let mut last_posted = Some(tokio::time::Instant::now());
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = heartbeat_tick.tick() => {}
                }
                let current = agent
                    .replica
                    .reader()
                    .get(&node_key)
                    .ok()
                    .flatten()
                    .unwrap_or_else(|| node.clone());
                agent.heartbeat(&current, &mut last_posted).await;
            }
        })
    };
    // Changes to the pods bound here start a pass at once; the tick is the level-driven
    // safety net (and restarts the watch when it ends, e.g. after a snapshot install).
    let mut pod_events = agent.watch_bound_pods();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            event = pod_events.recv() => {
                if event.is_none() {
                    pod_events = agent.watch_bound_pods();
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
                // Gather what arrives within a moment: one pass covers them all.
                tokio::time::sleep(Duration::from_millis(50)).await;
                // A changed pod is synced at once, without listing every container; a pod
                // that went (or a failed watch) takes a full pass.
                let mut changed = HashSet::new();
                let mut full_pass = false;
                let mut next = event;
                while let Some(record) = next {
                    match record {
                        Ok(record) if record.event_type == EventType::Deleted => full_pass = true,
                        Ok(record) => {
                            let last_syncs = lock(&agent.shared.last_syncs);
                            let uid = record.object.pointer("/metadata/uid").and_then(Value::as_str);
                            if let Some(uid) = uid {
                                if !resync::is_echo(last_syncs.get(uid), &record.object) {
                                    changed.insert(uid.to_owned());
                                }
                            }
                        }
                        Err(_) => {
                            lock(&agent.shared.last_syncs).clear();
                            full_pass = true;
                        }
                    }
                    next = pod_events.try_recv().ok();
                }
                let outcome = match agent.sync_changed(&changed) {
                    Ok(all_bound) if all_bound && !full_pass => Ok(()),
                    Ok(_) => agent.reconcile(&changed).await,
                    Err(error) => Err(error),
                };
                if let Err(error) = outcome {
                    tracing::warn!(error = format!("{error:#}"), "reconcile pods");
                }
            }
            _ = agent.shared.probe_results.changed.notified() => {
                if let Err(error) = agent.reconcile(&HashSet::new()).await {
                    tracing::warn!(error = format!("{error:#}"), "reconcile pods");
                }
            }
            _ = reconcile_tick.tick() => {
                if let Err(error) = agent.reconcile(&HashSet::new()).await {
                    tracing::warn!(error = format!("{error:#}"), "reconcile pods");
                }
            }
        }
    }
    let _ = heartbeats.await;
    if let Some(routes) = routes {
        let _ = routes.await;
    }
    for (_, token) in lock(&agent.shared.probers).drain() {
        token.cancel();
    }
}

#[cfg(test)]
mod heartbeat_tests {
    use super::*;

    fn node_with_ready(status: &str, heartbeat: &str) -> Value {
        json!({
            "apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1"},
            "status": {"conditions": [{
                "type": "Ready", "status": status,
                "lastHeartbeatTime": heartbeat, "lastTransitionTime": "2026-01-01T00:00:00Z"
            }]}
        })
    }

    #[test]
    fn a_status_that_only_renews_its_heartbeat_time_is_not_posted_again() {
        let stored = node_with_ready("True", "2026-01-01T00:00:10Z");
        let fresh = node_with_ready("True", "2026-01-01T00:00:11Z")["status"].clone();
        assert!(!status_needs_posting(
            &stored,
            &fresh,
            Some(Duration::from_secs(1))
        ));
    }

    #[test]
    fn a_node_the_leader_marked_unknown_posts_ready_at_its_next_heartbeat() {
        let stored = node_with_ready("Unknown", "2026-01-01T00:00:10Z");
        let fresh = node_with_ready("True", "2026-01-01T00:00:11Z")["status"].clone();
        assert!(status_needs_posting(
            &stored,
            &fresh,
            Some(Duration::from_secs(1))
        ));
    }

    #[test]
    fn an_unchanged_status_is_posted_after_the_report_interval_and_at_agent_start() {
        let stored = node_with_ready("True", "2026-01-01T00:00:10Z");
        let fresh = stored["status"].clone();
        assert!(status_needs_posting(&stored, &fresh, None));
        assert!(status_needs_posting(
            &stored,
            &fresh,
            Some(NODE_STATUS_REPORT_INTERVAL)
        ));
    }
}

#[cfg(test)]
mod leftover_tests {
    use super::*;

    #[test]
    fn only_uid_named_directories_of_pods_that_are_gone_are_removed() {
        let live = "0b6d4c52-3c56-4ad4-8a3e-0f1c8f3b6a11";
        let gone = "5f0e2a9c-1d7b-4c1e-9b8a-7e6d5c4b3a29";
        let names = vec![live.to_string(), gone.to_string(), "lost+found".to_string()];
        let live_uids = HashSet::from([live.to_string()]);
        assert_eq!(
            leftover_pod_dirs(&names, &live_uids),
            vec![gone.to_string()]
        );
        assert!(leftover_pod_dirs(&names, &HashSet::from([live.into(), gone.into()])).is_empty());
    }
}
