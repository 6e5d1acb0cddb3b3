//! The scheduler: a pure function from the cluster's nodes and pods to bindings, in the style of
//! kube-scheduler. Each pending pod (no `spec.nodeName`, not being deleted, not finished) is
//! taken in turn (higher `spec.priority` first, then oldest, then by namespace and name); every
//! node is run through the filters (cordon, readiness, taints, node selector and required node
//! affinity, requests against allocatable, required inter-pod (anti-)affinity) and the nodes
//! that pass are scored (least allocated, spreading of pods of one owner, preferred node and pod
//! (anti-)affinity, PreferNoSchedule taints); the highest score wins, ties going to the first
//! node by name. A binding counts against its node for the pods after it in the same call. A pod
//! that fits nowhere gets the message kube-scheduler would give, e.g.
//! `0/3 nodes are available: 1 node(s) were not ready, 2 Insufficient cpu.`
//!
//! Kept cheap for large clusters: per-node usage, per-owner counts and the list of placed pods
//! are computed once and updated as bindings are made, so a call is O(pending pods × nodes)
//! plus, for pods with inter-pod terms, O(pending pods × placed pods).
//!
//! Not modelled: resources other than cpu, memory and pods; host ports; volumes; topology
//! spread constraints; preemption; `namespaceSelector` with requirements (the snapshot has no
//! Namespace labels, so only `namespaces` and the empty selector, meaning all namespaces,
//! count); `matchLabelKeys`; the preferred terms of pods already placed.

use std::borrow::Borrow;
use std::cmp::Reverse;
use std::collections::{BTreeMap, HashMap, HashSet};

use k8s_openapi::api::core::v1::{
    Container, Node, NodeSelectorRequirement, NodeSelectorTerm, Pod, PodAffinityTerm, PodSpec,
    Taint, Toleration,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

/// A pending pod to bind to a node. `pod_resource_version` is the pod's resourceVersion when
/// this was decided: the binding is a precondition-checked write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binding {
    pub namespace: String,
    pub name: String,
    pub node: String,
    pub pod_resource_version: String,
}

/// A pending pod that fits on no node, and why (kube-scheduler's message).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unschedulable {
    pub namespace: String,
    pub name: String,
    pub pod_resource_version: String,
    pub message: String,
}

/// What one scheduling pass decided, in the order the pods were considered.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Decisions {
    pub bindings: Vec<Binding>,
    pub unschedulable: Vec<Unschedulable>,
}

/// The node label that names a node; a node without it is its own hostname domain.
const HOSTNAME_LABEL: &str = "kubernetes.io/hostname";
/// The taint a cordoned node has in Kubernetes; tolerating it lets a pod onto a cordoned node.
const UNSCHEDULABLE_TAINT_KEY: &str = "node.kubernetes.io/unschedulable";
/// The taint a node that is not ready has in Kubernetes; tolerating it lets a pod onto it.
const NOT_READY_TAINT_KEY: &str = "node.kubernetes.io/not-ready";
const NO_SCHEDULE: &str = "NoSchedule";
const NO_EXECUTE: &str = "NoExecute";
const PREFER_NO_SCHEDULE: &str = "PreferNoSchedule";
/// Pods a node takes when its status does not say (the kubelet's default).
const DEFAULT_MAX_PODS: i64 = 110;
/// For scoring only, a container without a cpu request counts as this much (as Kubernetes).
const DEFAULT_SCORE_CPU_MILLIS: i64 = 100;
/// For scoring only, a container without a memory request counts as this much (as Kubernetes).
const DEFAULT_SCORE_MEMORY_BYTES: i64 = 200 * 1024 * 1024;
/// Score taken off a node per pod of the same owner already on it: more than the whole range
/// of the least-allocated score, so replicas spread before resources are weighed.
const SPREAD_PENALTY_PER_POD: i64 = 100;
/// Score taken off a node per PreferNoSchedule taint the pod does not tolerate.
const PREFER_NO_SCHEDULE_PENALTY: i64 = 50;
/// Scores are summed in thousandths of a point.
const SCORE_SCALE: i64 = 1000;

/// Decides where the pending pods in `pods` go. `pods` is every pod of the cluster: pods already
/// bound (and not finished) count against their nodes. `now_ms` is the pass's time; no rule
/// depends on it today (stale heartbeats are for whoever maintains the Ready condition).
pub fn schedule<N: Borrow<Node>, P: Borrow<Pod>>(
    nodes: &[N],
    pods: &[P],
    now_ms: i64,
) -> Decisions {
    let _ = now_ms;
    if !pods.iter().any(|pod| is_pending(pod.borrow())) {
        // Nothing to place: the summary of every node and bound pod would go unused.
        return Decisions::default();
    }
    let mut cluster = Cluster::new(nodes, pods);
    let mut pending: Vec<PendingPod<'_>> = pods
        .iter()
        .map(Borrow::borrow)
        .filter(|pod| is_pending(pod))
        .map(|pod| PendingPod::new(pod, &mut cluster.spread_keys))
        .collect();
    pending.sort_by(|a, b| a.order_key().cmp(&b.order_key()));

    let mut decisions = Decisions::default();
    for pod in &pending {
        match cluster.place(pod) {
            Ok(node_index) => decisions.bindings.push(Binding {
                namespace: pod.namespace.to_string(),
                name: pod.name.to_string(),
                node: cluster.nodes[node_index].name.to_string(),
                pod_resource_version: pod.resource_version.to_string(),
            }),
            Err(message) => decisions.unschedulable.push(Unschedulable {
                namespace: pod.namespace.to_string(),
                name: pod.name.to_string(),
                pod_resource_version: pod.resource_version.to_string(),
                message,
            }),
        }
    }
    decisions
}

type Labels = BTreeMap<String, String>;

/// Cpu and memory, as requested by a pod or offered by a node.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Resources {
    cpu_millis: i64,
    memory_bytes: i64,
}

impl Resources {
    fn plus(self, other: Resources) -> Resources {
        Resources {
            cpu_millis: self.cpu_millis.saturating_add(other.cpu_millis),
            memory_bytes: self.memory_bytes.saturating_add(other.memory_bytes),
        }
    }

    fn max(self, other: Resources) -> Resources {
        Resources {
            cpu_millis: self.cpu_millis.max(other.cpu_millis),
            memory_bytes: self.memory_bytes.max(other.memory_bytes),
        }
    }
}

/// What pods are grouped by for spreading: their controller, or (without one) their labels.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum SpreadKey<'a> {
    Owner(&'a str),
    Labels(&'a str, &'a Labels),
}

/// Spread keys numbered in the order first seen.
#[derive(Default)]
struct SpreadKeys<'a> {
    ids: HashMap<SpreadKey<'a>, usize>,
}

impl<'a> SpreadKeys<'a> {
    fn id(&mut self, pod: &'a Pod) -> Option<usize> {
        let metadata = &pod.metadata;
        let owner = metadata
            .owner_references
            .as_ref()
            .and_then(|owners| owners.first());
        let key = match (owner, metadata.labels.as_ref()) {
            (Some(owner), _) => SpreadKey::Owner(&owner.uid),
            (None, Some(labels)) if !labels.is_empty() => {
                SpreadKey::Labels(metadata.namespace.as_deref().unwrap_or_default(), labels)
            }
            (None, _) => return None,
        };
        let next = self.ids.len();
        Some(*self.ids.entry(key).or_insert(next))
    }
}

/// A node as the filters and scores see it, with what is placed on it so far.
struct NodeState<'a> {
    name: &'a str,
    labels: Option<&'a Labels>,
    cordoned: bool,
    ready: bool,
    /// NoSchedule and NoExecute taints: a pod must tolerate them all.
    hard_taints: Vec<&'a Taint>,
    /// PreferNoSchedule taints: a score penalty each when not tolerated.
    soft_taints: Vec<&'a Taint>,
    allocatable: Resources,
    allocatable_pods: i64,
    /// Sum of the requests of the pods on the node.
    requested: Resources,
    /// The same with Kubernetes' defaults for containers without requests (for scoring).
    requested_for_score: Resources,
    pod_count: i64,
}

impl<'a> NodeState<'a> {
    fn new(node: &'a Node) -> NodeState<'a> {
        let spec = node.spec.as_ref();
        let status = node.status.as_ref();
        let ready = status
            .and_then(|status| status.conditions.as_ref())
            .is_some_and(|conditions| {
                conditions
                    .iter()
                    .any(|condition| condition.type_ == "Ready" && condition.status == "True")
            });
        let taints: &[Taint] = spec
            .and_then(|spec| spec.taints.as_deref())
            .unwrap_or_default();
        let offered = |resource: &str| {
            status
                .and_then(|status| {
                    status
                        .allocatable
                        .as_ref()
                        .and_then(|allocatable| allocatable.get(resource))
                        .or_else(|| {
                            status
                                .capacity
                                .as_ref()
                                .and_then(|capacity| capacity.get(resource))
                        })
                })
                .map(|quantity| quantity.0.as_str())
        };
        NodeState {
            name: node.metadata.name.as_deref().unwrap_or_default(),
            labels: node.metadata.labels.as_ref(),
            cordoned: spec.and_then(|spec| spec.unschedulable) == Some(true),
            ready,
            hard_taints: taints
                .iter()
                .filter(|taint| taint.effect == NO_SCHEDULE || taint.effect == NO_EXECUTE)
                .collect(),
            soft_taints: taints
                .iter()
                .filter(|taint| taint.effect == PREFER_NO_SCHEDULE)
                .collect(),
            allocatable: Resources {
                cpu_millis: offered("cpu").and_then(cpu_millis).unwrap_or(0),
                memory_bytes: offered("memory").and_then(whole_units).unwrap_or(0),
            },
            allocatable_pods: offered("pods")
                .and_then(whole_units)
                .unwrap_or(DEFAULT_MAX_PODS),
            requested: Resources::default(),
            requested_for_score: Resources::default(),
            pod_count: 0,
        }
    }

    /// The node's value for a topology key; the hostname key defaults to the node's name.
    fn topology_value(&self, key: &str) -> Option<&'a str> {
        match self.labels.and_then(|labels| labels.get(key)) {
            Some(value) => Some(value.as_str()),
            None if key == HOSTNAME_LABEL => Some(self.name),
            None => None,
        }
    }
}

/// A pod on a node (bound before this call or in it), as inter-pod terms see it.
struct PlacedPod<'a> {
    node_index: usize,
    namespace: &'a str,
    labels: Option<&'a Labels>,
}

/// A required anti-affinity term of a placed pod: pods it matches may not join its domain.
struct PlacedAntiAffinity<'a> {
    node_index: usize,
    namespace: &'a str,
    term: &'a PodAffinityTerm,
}

/// A pod waiting for a node, with what the filters need computed once.
struct PendingPod<'a> {
    namespace: &'a str,
    name: &'a str,
    resource_version: &'a str,
    labels: Option<&'a Labels>,
    priority: i32,
    created: Option<jiff::Timestamp>,
    spec: Option<&'a PodSpec>,
    request: Resources,
    request_for_score: Resources,
    spread_key: Option<usize>,
}

impl<'a> PendingPod<'a> {
    fn new(pod: &'a Pod, spread_keys: &mut SpreadKeys<'a>) -> PendingPod<'a> {
        let metadata = &pod.metadata;
        PendingPod {
            namespace: metadata.namespace.as_deref().unwrap_or_default(),
            name: metadata.name.as_deref().unwrap_or_default(),
            resource_version: metadata.resource_version.as_deref().unwrap_or_default(),
            labels: metadata.labels.as_ref(),
            priority: pod
                .spec
                .as_ref()
                .and_then(|spec| spec.priority)
                .unwrap_or(0),
            created: metadata.creation_timestamp.as_ref().map(|time| time.0),
            spec: pod.spec.as_ref(),
            request: pod_request(pod.spec.as_ref(), false),
            request_for_score: pod_request(pod.spec.as_ref(), true),
            spread_key: spread_keys.id(pod),
        }
    }

    fn order_key(&self) -> (Reverse<i32>, Option<jiff::Timestamp>, &'a str, &'a str) {
        (
            Reverse(self.priority),
            self.created,
            self.namespace,
            self.name,
        )
    }

    fn tolerations(&self) -> &'a [Toleration] {
        self.spec
            .and_then(|spec| spec.tolerations.as_deref())
            .unwrap_or_default()
    }

    fn node_selector(&self) -> Option<&'a Labels> {
        self.spec.and_then(|spec| spec.node_selector.as_ref())
    }

    fn required_node_terms(&self) -> Option<&'a [NodeSelectorTerm]> {
        self.spec
            .and_then(|spec| spec.affinity.as_ref())
            .and_then(|affinity| affinity.node_affinity.as_ref())
            .and_then(|node_affinity| {
                node_affinity
                    .required_during_scheduling_ignored_during_execution
                    .as_ref()
            })
            .map(|selector| selector.node_selector_terms.as_slice())
    }

    fn required_anti_affinity_terms(&self) -> &'a [PodAffinityTerm] {
        required_anti_affinity_terms(self.spec)
    }
}

fn required_anti_affinity_terms(spec: Option<&PodSpec>) -> &[PodAffinityTerm] {
    spec.and_then(|spec| spec.affinity.as_ref())
        .and_then(|affinity| affinity.pod_anti_affinity.as_ref())
        .and_then(|anti| {
            anti.required_during_scheduling_ignored_during_execution
                .as_deref()
        })
        .unwrap_or_default()
}

fn phase_is_finished(pod: &Pod) -> bool {
    matches!(
        pod.status
            .as_ref()
            .and_then(|status| status.phase.as_deref()),
        Some("Succeeded" | "Failed")
    )
}

fn bound_node(pod: &Pod) -> Option<&str> {
    pod.spec
        .as_ref()
        .and_then(|spec| spec.node_name.as_deref())
        .filter(|node| !node.is_empty())
}

fn is_pending(pod: &Pod) -> bool {
    bound_node(pod).is_none()
        && pod.metadata.deletion_timestamp.is_none()
        && !phase_is_finished(pod)
}

/// A pod's effective request as Kubernetes computes it: the sum over its containers (and
/// restartable init containers, which keep running), or the peak during initialisation if that
/// is higher, plus the pod overhead. A missing request falls back to the limit (API defaulting);
/// `for_score` replaces a still missing cpu or memory request with Kubernetes' scoring defaults.
fn pod_request(spec: Option<&PodSpec>, for_score: bool) -> Resources {
    let Some(spec) = spec else {
        return Resources::default();
    };
    let running = spec
        .containers
        .iter()
        .fold(Resources::default(), |sum, container| {
            sum.plus(container_request(container, for_score))
        });
    let mut sidecars = Resources::default();
    let mut init_peak = Resources::default();
    for container in spec.init_containers.as_deref().unwrap_or_default() {
        let request = container_request(container, for_score);
        if container.restart_policy.as_deref() == Some("Always") {
            sidecars = sidecars.plus(request);
            init_peak = init_peak.max(sidecars);
        } else {
            init_peak = init_peak.max(sidecars.plus(request));
        }
    }
    let overhead = |resource: &str, parse: fn(&str) -> Option<i64>| {
        spec.overhead
            .as_ref()
            .and_then(|overhead| overhead.get(resource))
            .and_then(|quantity| parse(&quantity.0))
            .unwrap_or(0)
            .max(0)
    };
    running.plus(sidecars).max(init_peak).plus(Resources {
        cpu_millis: overhead("cpu", cpu_millis),
        memory_bytes: overhead("memory", whole_units),
    })
}

fn container_request(container: &Container, for_score: bool) -> Resources {
    let resources = container.resources.as_ref();
    let quantity = |resource: &str| -> Option<&Quantity> {
        resources.and_then(|resources| {
            resources
                .requests
                .as_ref()
                .and_then(|requests| requests.get(resource))
                .or_else(|| {
                    resources
                        .limits
                        .as_ref()
                        .and_then(|limits| limits.get(resource))
                })
        })
    };
    let amount =
        |resource: &str, parse: fn(&str) -> Option<i64>, default: i64| match quantity(resource) {
            Some(quantity) => parse(&quantity.0).unwrap_or(0).max(0),
            None if for_score => default,
            None => 0,
        };
    Resources {
        cpu_millis: amount("cpu", cpu_millis, DEFAULT_SCORE_CPU_MILLIS),
        memory_bytes: amount("memory", whole_units, DEFAULT_SCORE_MEMORY_BYTES),
    }
}

/// Why a node was filtered out; one per node (the first filter that failed), except that a
/// node short of several resources reports each.
#[derive(Debug, Clone, Copy)]
enum Failure<'a> {
    Cordoned,
    NotReady,
    UntoleratedTaint(&'a Taint),
    NodeAffinity,
    Resources { cpu: bool, memory: bool, pods: bool },
    PodAffinity,
    PodAntiAffinity,
    ExistingPodsAntiAffinity,
}

impl Failure<'_> {
    /// The reasons in kube-scheduler's words.
    fn reasons(&self) -> Vec<String> {
        let reason = |text: &str| vec![text.to_string()];
        match self {
            Failure::Cordoned => reason("node(s) were unschedulable"),
            Failure::NotReady => reason("node(s) were not ready"),
            Failure::UntoleratedTaint(taint) => vec![format!(
                "node(s) had untolerated taint {{{}: {}}}",
                taint.key,
                taint.value.as_deref().unwrap_or_default()
            )],
            Failure::NodeAffinity => reason("node(s) didn't match Pod's node affinity/selector"),
            Failure::Resources { cpu, memory, pods } => [
                (*cpu, "Insufficient cpu"),
                (*memory, "Insufficient memory"),
                (*pods, "Too many pods"),
            ]
            .into_iter()
            .filter(|(short, _)| *short)
            .map(|(_, text)| text.to_string())
            .collect(),
            Failure::PodAffinity => reason("node(s) didn't match pod affinity rules"),
            Failure::PodAntiAffinity => reason("node(s) didn't match pod anti-affinity rules"),
            Failure::ExistingPodsAntiAffinity => {
                reason("node(s) didn't satisfy existing pods anti-affinity rules")
            }
        }
    }
}

/// One topology domain set per term: the values of the topology key where matching pods are.
struct DomainTerm<'a> {
    topology_key: &'a str,
    pod_counts: HashMap<&'a str, i64>,
}

impl DomainTerm<'_> {
    fn count(&self, node: &NodeState<'_>) -> i64 {
        node.topology_value(self.topology_key)
            .and_then(|value| self.pod_counts.get(value))
            .copied()
            .unwrap_or(0)
    }
}

/// What inter-pod (anti-)affinity means for one pending pod, computed once for all nodes.
#[derive(Default)]
struct InterPod<'a> {
    /// Domains (topology key, value) placed pods' required anti-affinity keeps this pod out of.
    excluded_by_placed: HashSet<(&'a str, &'a str)>,
    required_anti_affinity: Vec<DomainTerm<'a>>,
    /// Empty when the pod has no required affinity, or when nothing matches it yet but the pod
    /// matches its own terms (the first of a group may go anywhere, as in Kubernetes).
    required_affinity: Vec<DomainTerm<'a>>,
    /// Weight (negative for anti-affinity) per matching pod in the node's domain.
    preferred: Vec<(i64, DomainTerm<'a>)>,
}

impl<'a> InterPod<'a> {
    fn check(&self, node: &NodeState<'a>) -> Result<(), Failure<'a>> {
        if self
            .required_affinity
            .iter()
            .any(|term| term.count(node) == 0)
        {
            return Err(Failure::PodAffinity);
        }
        if self
            .required_anti_affinity
            .iter()
            .any(|term| term.count(node) > 0)
        {
            return Err(Failure::PodAntiAffinity);
        }
        if self.excluded_by_placed.iter().any(|(key, value)| {
            node.topology_value(key)
                .is_some_and(|node_value| node_value == *value)
        }) {
            return Err(Failure::ExistingPodsAntiAffinity);
        }
        Ok(())
    }

    fn score(&self, node: &NodeState<'a>) -> i64 {
        self.preferred
            .iter()
            .map(|(weight, term)| weight.saturating_mul(term.count(node)))
            .sum()
    }
}

/// The nodes (by name) and everything placed on them, updated as bindings are made.
struct Cluster<'a> {
    nodes: Vec<NodeState<'a>>,
    placed: Vec<PlacedPod<'a>>,
    placed_anti_affinity: Vec<PlacedAntiAffinity<'a>>,
    spread_keys: SpreadKeys<'a>,
    /// Per spread key id: pods of that key per node index.
    spread_counts: Vec<HashMap<usize, i64>>,
    /// Scratch for one pending pod: pods of its spread key per node index.
    spread_scratch: Vec<i64>,
}

impl<'a> Cluster<'a> {
    fn new<N: Borrow<Node>, P: Borrow<Pod>>(nodes: &'a [N], pods: &'a [P]) -> Cluster<'a> {
        let mut nodes: Vec<NodeState<'a>> = nodes
            .iter()
            .map(|node| NodeState::new(node.borrow()))
            .collect();
        nodes.sort_by(|a, b| a.name.cmp(b.name));
        let node_indices: HashMap<&str, usize> = nodes
            .iter()
            .enumerate()
            .map(|(index, node)| (node.name, index))
            .collect();
        let mut cluster = Cluster {
            spread_scratch: vec![0; nodes.len()],
            nodes,
            placed: Vec::new(),
            placed_anti_affinity: Vec::new(),
            spread_keys: SpreadKeys::default(),
            spread_counts: Vec::new(),
        };
        for pod in pods {
            let pod: &'a Pod = pod.borrow();
            if phase_is_finished(pod) {
                continue;
            }
            let Some(&node_index) = bound_node(pod).and_then(|node| node_indices.get(node)) else {
                continue;
            };
            let spread_key = cluster.spread_keys.id(pod);
            cluster.add(
                node_index,
                PlacedPodRequest {
                    namespace: pod.metadata.namespace.as_deref().unwrap_or_default(),
                    labels: pod.metadata.labels.as_ref(),
                    request: pod_request(pod.spec.as_ref(), false),
                    request_for_score: pod_request(pod.spec.as_ref(), true),
                    spread_key,
                    anti_affinity_terms: required_anti_affinity_terms(pod.spec.as_ref()),
                },
            );
        }
        cluster
    }

    /// Counts a pod against a node.
    fn add(&mut self, node_index: usize, pod: PlacedPodRequest<'a>) {
        let Some(node) = self.nodes.get_mut(node_index) else {
            return;
        };
        node.requested = node.requested.plus(pod.request);
        node.requested_for_score = node.requested_for_score.plus(pod.request_for_score);
        node.pod_count += 1;
        if let Some(key) = pod.spread_key {
            if self.spread_counts.len() <= key {
                self.spread_counts.resize_with(key + 1, HashMap::new);
            }
            *self.spread_counts[key].entry(node_index).or_insert(0) += 1;
        }
        self.placed.push(PlacedPod {
            node_index,
            namespace: pod.namespace,
            labels: pod.labels,
        });
        for term in pod.anti_affinity_terms {
            self.placed_anti_affinity.push(PlacedAntiAffinity {
                node_index,
                namespace: pod.namespace,
                term,
            });
        }
    }

    /// Picks a node for `pod` and counts the pod against it, or explains why none fits.
    fn place(&mut self, pod: &PendingPod<'a>) -> Result<usize, String> {
        let inter_pod = self.inter_pod(pod);
        let spread_nodes = pod
            .spread_key
            .and_then(|key| self.spread_counts.get(key))
            .filter(|counts| !counts.is_empty());
        if let Some(counts) = spread_nodes {
            for (&node_index, &count) in counts {
                self.spread_scratch[node_index] = count;
            }
        }
        let mut best: Option<(i64, usize)> = None;
        for (node_index, node) in self.nodes.iter().enumerate() {
            if filter(pod, &inter_pod, node).is_err() {
                continue;
            }
            let score = score(pod, &inter_pod, node, self.spread_scratch[node_index]);
            // Nodes are in name order, so on equal scores the first by name stays.
            if best.is_none_or(|(best_score, _)| score > best_score) {
                best = Some((score, node_index));
            }
        }
        if let Some(counts) = spread_nodes {
            for &node_index in counts.keys() {
                self.spread_scratch[node_index] = 0;
            }
        }
        let Some((_, node_index)) = best else {
            return Err(self.explain(pod, &inter_pod));
        };
        self.add(
            node_index,
            PlacedPodRequest {
                namespace: pod.namespace,
                labels: pod.labels,
                request: pod.request,
                request_for_score: pod.request_for_score,
                spread_key: pod.spread_key,
                anti_affinity_terms: pod.required_anti_affinity_terms(),
            },
        );
        Ok(node_index)
    }

    /// kube-scheduler's message for a pod no node passes: reasons counted over nodes, sorted.
    fn explain(&self, pod: &PendingPod<'a>, inter_pod: &InterPod<'a>) -> String {
        if self.nodes.is_empty() {
            return "no nodes available to schedule pods".to_string();
        }
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        for node in &self.nodes {
            if let Err(failure) = filter(pod, inter_pod, node) {
                for reason in failure.reasons() {
                    *counts.entry(reason).or_insert(0) += 1;
                }
            }
        }
        let mut reasons: Vec<String> = counts
            .into_iter()
            .map(|(reason, count)| format!("{count} {reason}"))
            .collect();
        reasons.sort();
        format!(
            "0/{} nodes are available: {}.",
            self.nodes.len(),
            reasons.join(", ")
        )
    }

    /// Evaluates the pod's inter-pod terms, and placed pods' anti-affinity, against every
    /// placed pod once.
    fn inter_pod(&self, pod: &PendingPod<'a>) -> InterPod<'a> {
        let mut inter_pod = InterPod::default();
        for placed in &self.placed_anti_affinity {
            let node = &self.nodes[placed.node_index];
            if term_matches(placed.term, placed.namespace, pod.namespace, pod.labels) {
                if let Some(value) = node.topology_value(&placed.term.topology_key) {
                    inter_pod
                        .excluded_by_placed
                        .insert((placed.term.topology_key.as_str(), value));
                }
            }
        }
        let Some(affinity) = pod.spec.and_then(|spec| spec.affinity.as_ref()) else {
            return inter_pod;
        };
        let domains = |term: &'a PodAffinityTerm| self.domains(term, pod.namespace);
        if let Some(anti) = affinity.pod_anti_affinity.as_ref() {
            for term in anti
                .required_during_scheduling_ignored_during_execution
                .as_deref()
                .unwrap_or_default()
            {
                inter_pod.required_anti_affinity.push(domains(term));
            }
            for weighted in anti
                .preferred_during_scheduling_ignored_during_execution
                .as_deref()
                .unwrap_or_default()
            {
                let term = &weighted.pod_affinity_term;
                inter_pod
                    .preferred
                    .push((-i64::from(weighted.weight), domains(term)));
            }
        }
        if let Some(positive) = affinity.pod_affinity.as_ref() {
            let terms = positive
                .required_during_scheduling_ignored_during_execution
                .as_deref()
                .unwrap_or_default();
            let required: Vec<DomainTerm<'a>> = terms.iter().map(domains).collect();
            let nothing_matches_yet = required.iter().all(|term| term.pod_counts.is_empty());
            let matches_itself = terms
                .iter()
                .all(|term| term_matches(term, pod.namespace, pod.namespace, pod.labels));
            if !(nothing_matches_yet && matches_itself) {
                inter_pod.required_affinity = required;
            }
            for weighted in positive
                .preferred_during_scheduling_ignored_during_execution
                .as_deref()
                .unwrap_or_default()
            {
                let term = &weighted.pod_affinity_term;
                inter_pod
                    .preferred
                    .push((i64::from(weighted.weight), domains(term)));
            }
        }
        inter_pod
    }

    /// Where the placed pods a term (of a pod in `namespace`) selects are, by topology value.
    fn domains(&self, term: &'a PodAffinityTerm, namespace: &'a str) -> DomainTerm<'a> {
        let mut pod_counts = HashMap::new();
        for placed in &self.placed {
            if term_matches(term, namespace, placed.namespace, placed.labels) {
                let node = &self.nodes[placed.node_index];
                if let Some(value) = node.topology_value(&term.topology_key) {
                    *pod_counts.entry(value).or_insert(0) += 1;
                }
            }
        }
        DomainTerm {
            topology_key: &term.topology_key,
            pod_counts,
        }
    }
}

/// What `Cluster::add` counts against a node.
struct PlacedPodRequest<'a> {
    namespace: &'a str,
    labels: Option<&'a Labels>,
    request: Resources,
    request_for_score: Resources,
    spread_key: Option<usize>,
    anti_affinity_terms: &'a [PodAffinityTerm],
}

/// Runs the filters in kube-scheduler's order; the first that fails says why.
fn filter<'a>(
    pod: &PendingPod<'a>,
    inter_pod: &InterPod<'a>,
    node: &NodeState<'a>,
) -> Result<(), Failure<'a>> {
    let tolerations = pod.tolerations();
    if node.cordoned && !tolerates(tolerations, UNSCHEDULABLE_TAINT_KEY, "", NO_SCHEDULE) {
        return Err(Failure::Cordoned);
    }
    if !node.ready && !tolerates(tolerations, NOT_READY_TAINT_KEY, "", NO_SCHEDULE) {
        return Err(Failure::NotReady);
    }
    if let Some(taint) = node.hard_taints.iter().find(|taint| {
        !tolerates(
            tolerations,
            &taint.key,
            taint.value.as_deref().unwrap_or_default(),
            &taint.effect,
        )
    }) {
        return Err(Failure::UntoleratedTaint(taint));
    }
    if !matches_node_selector(pod, node) {
        return Err(Failure::NodeAffinity);
    }
    let free = Resources {
        cpu_millis: node.allocatable.cpu_millis - node.requested.cpu_millis,
        memory_bytes: node.allocatable.memory_bytes - node.requested.memory_bytes,
    };
    // As Kubernetes: a resource the pod does not request never makes it not fit.
    let cpu = pod.request.cpu_millis > 0 && pod.request.cpu_millis > free.cpu_millis;
    let memory = pod.request.memory_bytes > 0 && pod.request.memory_bytes > free.memory_bytes;
    let pods = node.pod_count >= node.allocatable_pods;
    if cpu || memory || pods {
        return Err(Failure::Resources { cpu, memory, pods });
    }
    inter_pod.check(node)
}

fn matches_node_selector(pod: &PendingPod<'_>, node: &NodeState<'_>) -> bool {
    if let Some(selector) = pod.node_selector() {
        let labels = node.labels;
        let all_present = selector
            .iter()
            .all(|(key, value)| labels.and_then(|labels| labels.get(key)) == Some(value));
        if !all_present {
            return false;
        }
    }
    match pod.required_node_terms() {
        Some(terms) => terms.iter().any(|term| node_term_matches(term, node)),
        None => true,
    }
}

/// A node selector term: all its expressions (on labels) and fields (on `metadata.name`) hold.
/// A term with neither matches no node, as in Kubernetes.
fn node_term_matches(term: &NodeSelectorTerm, node: &NodeState<'_>) -> bool {
    let expressions = term.match_expressions.as_deref().unwrap_or_default();
    let fields = term.match_fields.as_deref().unwrap_or_default();
    if expressions.is_empty() && fields.is_empty() {
        return false;
    }
    expressions.iter().all(|requirement| {
        let value = node
            .labels
            .and_then(|labels| labels.get(&requirement.key))
            .map(String::as_str);
        node_requirement_matches(requirement, value)
    }) && fields.iter().all(|requirement| {
        requirement.key == "metadata.name"
            && matches!(requirement.operator.as_str(), "In" | "NotIn")
            && node_requirement_matches(requirement, Some(node.name))
    })
}

/// One node selector requirement against the value of its key (None: the key is absent).
fn node_requirement_matches(requirement: &NodeSelectorRequirement, value: Option<&str>) -> bool {
    let values = requirement.values.as_deref().unwrap_or_default();
    let contains = |value: &str| values.iter().any(|candidate| candidate == value);
    let compare = |ordering: std::cmp::Ordering| match (value, values) {
        (Some(value), [bound]) => match (value.parse::<i64>(), bound.parse::<i64>()) {
            (Ok(value), Ok(bound)) => value.cmp(&bound) == ordering,
            _ => false,
        },
        _ => false,
    };
    match requirement.operator.as_str() {
        "In" => value.is_some_and(contains),
        "NotIn" => !value.is_some_and(contains),
        "Exists" => value.is_some(),
        "DoesNotExist" => value.is_none(),
        "Gt" => compare(std::cmp::Ordering::Greater),
        "Lt" => compare(std::cmp::Ordering::Less),
        _ => false,
    }
}

/// Whether some toleration tolerates a taint, with Kubernetes' rules: an empty effect matches
/// every effect, an empty key every key (with `Exists`), `Equal` (or no operator) compares values.
fn tolerates(tolerations: &[Toleration], key: &str, value: &str, effect: &str) -> bool {
    tolerations.iter().any(|toleration| {
        let toleration_effect = toleration.effect.as_deref().unwrap_or_default();
        let toleration_key = toleration.key.as_deref().unwrap_or_default();
        if !toleration_effect.is_empty() && toleration_effect != effect {
            return false;
        }
        if !toleration_key.is_empty() && toleration_key != key {
            return false;
        }
        match toleration.operator.as_deref().unwrap_or_default() {
            "" | "Equal" => toleration.value.as_deref().unwrap_or_default() == value,
            "Exists" => true,
            _ => false,
        }
    })
}

/// Whether a pod affinity term of a pod in `term_namespace` selects a pod in `namespace` with
/// `labels`. No label selector selects nothing; an empty one selects every pod.
fn term_matches(
    term: &PodAffinityTerm,
    term_namespace: &str,
    namespace: &str,
    labels: Option<&Labels>,
) -> bool {
    let listed = term.namespaces.as_deref().unwrap_or_default();
    let all_namespaces = term
        .namespace_selector
        .as_ref()
        .is_some_and(selector_is_empty);
    let in_namespace = all_namespaces
        || if listed.is_empty() && term.namespace_selector.is_none() {
            namespace == term_namespace
        } else {
            listed.iter().any(|listed| listed == namespace)
        };
    in_namespace
        && term
            .label_selector
            .as_ref()
            .is_some_and(|selector| label_selector_matches(selector, labels))
}

fn selector_is_empty(selector: &LabelSelector) -> bool {
    selector
        .match_labels
        .as_ref()
        .is_none_or(BTreeMap::is_empty)
        && selector
            .match_expressions
            .as_ref()
            .is_none_or(Vec::is_empty)
}

/// A label selector (matchLabels and matchExpressions In, NotIn, Exists, DoesNotExist).
fn label_selector_matches(selector: &LabelSelector, labels: Option<&Labels>) -> bool {
    let value_of = |key: &str| {
        labels
            .and_then(|labels| labels.get(key))
            .map(String::as_str)
    };
    let labels_match = selector.match_labels.as_ref().is_none_or(|wanted| {
        wanted
            .iter()
            .all(|(key, value)| value_of(key) == Some(value.as_str()))
    });
    labels_match
        && selector
            .match_expressions
            .as_deref()
            .unwrap_or_default()
            .iter()
            .all(|requirement| {
                let values = requirement.values.as_deref().unwrap_or_default();
                let value = value_of(&requirement.key);
                let listed = value.is_some_and(|value| values.iter().any(|v| v == value));
                match requirement.operator.as_str() {
                    "In" => listed,
                    "NotIn" => !listed,
                    "Exists" => value.is_some(),
                    "DoesNotExist" => value.is_none(),
                    _ => false,
                }
            })
}

/// The sum of the scores, in thousandths of a point so that small differences in allocation
/// still count; higher is better.
fn score(
    pod: &PendingPod<'_>,
    inter_pod: &InterPod<'_>,
    node: &NodeState<'_>,
    same_owner_pods: i64,
) -> i64 {
    let mut points: i64 = 0;
    points -= SPREAD_PENALTY_PER_POD.saturating_mul(same_owner_pods);
    if let Some(affinity) = pod
        .spec
        .and_then(|spec| spec.affinity.as_ref())
        .and_then(|affinity| affinity.node_affinity.as_ref())
    {
        for preferred in affinity
            .preferred_during_scheduling_ignored_during_execution
            .as_deref()
            .unwrap_or_default()
        {
            if node_term_matches(&preferred.preference, node) {
                points += i64::from(preferred.weight);
            }
        }
    }
    points = points.saturating_add(inter_pod.score(node));
    let tolerations = pod.tolerations();
    for taint in &node.soft_taints {
        let value = taint.value.as_deref().unwrap_or_default();
        if !tolerates(tolerations, &taint.key, value, &taint.effect) {
            points -= PREFER_NO_SCHEDULE_PENALTY;
        }
    }
    points
        .saturating_mul(SCORE_SCALE)
        .saturating_add(least_allocated_score(pod, node))
}

/// kube-scheduler's LeastAllocated: the mean over cpu and memory of the share left free after
/// placing the pod, 0..100 points (in thousandths).
fn least_allocated_score(pod: &PendingPod<'_>, node: &NodeState<'_>) -> i64 {
    let after = node.requested_for_score.plus(pod.request_for_score);
    let free_share = |allocatable: i64, requested: i64| -> i64 {
        if allocatable <= 0 || requested > allocatable {
            return 0;
        }
        let free = allocatable - requested;
        // 64-bit first: a 128-bit division per node and pod was a tenth of the scheduler.
        match free.checked_mul(100 * SCORE_SCALE) {
            Some(scaled) => scaled / allocatable,
            None => {
                let free =
                    i128::from(free) * i128::from(100 * SCORE_SCALE) / i128::from(allocatable);
                i64::try_from(free).unwrap_or(0)
            }
        }
    };
    (free_share(node.allocatable.cpu_millis, after.cpu_millis)
        + free_share(node.allocatable.memory_bytes, after.memory_bytes))
        / 2
}

/// A cpu quantity in millicores ("500m" is 500, "1.5" is 1500), rounded up.
fn cpu_millis(quantity: &str) -> Option<i64> {
    parse_quantity(quantity, 3)
}

/// A quantity in whole units (bytes for memory, a count for pods), rounded up.
fn whole_units(quantity: &str) -> Option<i64> {
    parse_quantity(quantity, 0)
}

/// Parses a Kubernetes quantity (`<sign><digits>[.<digits>]<suffix>`, suffix a binary SI one
/// like `Ki`, a decimal SI one like `m` or `G`, or an exponent like `e3`) into units of
/// 10^-`scale_exponent`, rounded away from zero as Kubernetes does; saturates at the bounds of
/// i64. None when the text is not a quantity.
fn parse_quantity(text: &str, scale_exponent: i32) -> Option<i64> {
    let text = text.trim();
    let (negative, unsigned) = match text.as_bytes().first() {
        Some(b'-') => (true, &text[1..]),
        Some(b'+') => (false, &text[1..]),
        _ => (false, text),
    };
    let number_length = unsigned
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(unsigned.len());
    let (number, suffix) = unsigned.split_at(number_length);
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if (whole.is_empty() && fraction.is_empty()) || fraction.contains('.') {
        return None;
    }
    let mut mantissa: i128 = 0;
    for digit in whole.bytes().chain(fraction.bytes()) {
        mantissa = mantissa
            .checked_mul(10)?
            .checked_add(i128::from(digit - b'0'))?;
    }
    let (suffix_exponent, binary_exponent): (i32, u32) = match suffix {
        "" => (0, 0),
        "n" => (-9, 0),
        "u" => (-6, 0),
        "m" => (-3, 0),
        "k" => (3, 0),
        "M" => (6, 0),
        "G" => (9, 0),
        "T" => (12, 0),
        "P" => (15, 0),
        "E" => (18, 0),
        "Ki" => (0, 10),
        "Mi" => (0, 20),
        "Gi" => (0, 30),
        "Ti" => (0, 40),
        "Pi" => (0, 50),
        "Ei" => (0, 60),
        _ => {
            let exponent = suffix.strip_prefix(['e', 'E'])?;
            if !exponent
                .trim_start_matches(['+', '-'])
                .bytes()
                .all(|byte| byte.is_ascii_digit())
            {
                return None;
            }
            (exponent.parse::<i32>().ok()?, 0)
        }
    };
    let exponent = i32::try_from(fraction.len())
        .ok()
        .and_then(|digits| suffix_exponent.checked_sub(digits))
        .and_then(|exponent| exponent.checked_add(scale_exponent))?;
    let magnitude: Option<i128> =
        mantissa
            .checked_mul(1_i128 << binary_exponent)
            .and_then(|scaled| {
                if exponent >= 0 {
                    10_i128
                        .checked_pow(exponent.unsigned_abs())
                        .and_then(|factor| scaled.checked_mul(factor))
                } else {
                    match 10_i128.checked_pow(exponent.unsigned_abs()) {
                        Some(divisor) => Some(scaled / divisor + i128::from(scaled % divisor != 0)),
                        None => Some(i128::from(scaled > 0)),
                    }
                }
            });
    let magnitude = magnitude.map_or(i64::MAX, |m| i64::try_from(m).unwrap_or(i64::MAX));
    Some(if negative { -magnitude } else { magnitude })
}

#[cfg(test)]
mod tests;
