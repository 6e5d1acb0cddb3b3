//! The ReplicaSet controller, as kube-controller-manager's: for every ReplicaSet keep
//! `spec.replicas` active pods made from its template and controlled by it, and report the
//! counts in its status. Pure and level-driven: from a [`Snapshot`] to [`Action`]s, no IO and
//! no clock; the shell executes the actions and calls again, so every decision is recomputed
//! from the objects and the same snapshot always yields the same actions.
//!
//! A pod belongs to a ReplicaSet when an owner reference with `controller: true` names the
//! ReplicaSet's uid, it lives in the ReplicaSet's namespace and its labels match
//! `spec.selector`. Orphans are not adopted and pods of vanished ReplicaSets are left to garbage
//! collection.
//!
//! Pod names are `<replicaset>-<5 chars>` like the API server's `generateName`, but the suffix
//! is a hash of the ReplicaSet uid, `now` and a counter instead of randomness, skipping names
//! already taken. Executing the actions of one snapshot twice therefore creates no extra pods
//! (the second creates are refused as existing); the shell must still not decide on a snapshot
//! that misses the pods its previous pass created.
//!
//! The helpers shared with the Deployment controller (selectors, ownership, pod readiness and
//! availability, hashing) are `pub(super)`.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::apps::v1::{ReplicaSet, ReplicaSetStatus};
use k8s_openapi::api::core::v1::{Pod, PodTemplateSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
    LabelSelector, ObjectMeta, OwnerReference, Time,
};
use serde::Serialize;
use serde_json::Value;

use super::{Action, Snapshot};

/// At most this many pods are created, or deleted, for one ReplicaSet in one pass (kube's
/// `burstReplicas`).
const BURST_REPLICAS: usize = 500;

/// Characters of generated name suffixes and template hashes: lowercase letters and digits
/// without vowels and look-alikes, as Kubernetes' `rand.SafeEncodeString`.
const SAFE_ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";

/// Length of a generated pod name suffix.
const POD_NAME_SUFFIX_LENGTH: usize = 5;

/// A `generateName` prefix is cut to this length so that the name stays a DNS label.
const MAX_GENERATED_NAME_PREFIX_LENGTH: usize = 58;

/// Creates and deletes pods so that every ReplicaSet has `spec.replicas` active ones (at most
/// [`BURST_REPLICAS`] per ReplicaSet per call), and updates statuses that changed. ReplicaSets
/// are visited in (namespace, name) order.
pub fn reconcile_replica_sets(snapshot: &Snapshot) -> Vec<Action> {
    let mut replica_sets: Vec<&ReplicaSet> = snapshot.replica_sets.iter().collect();
    replica_sets.sort_by(|a, b| object_key(&a.metadata).cmp(&object_key(&b.metadata)));
    let mut actions = Vec::new();
    for replica_set in replica_sets {
        reconcile_replica_set(snapshot, replica_set, &mut actions);
    }
    actions
}

fn reconcile_replica_set(snapshot: &Snapshot, replica_set: &ReplicaSet, actions: &mut Vec<Action>) {
    let Some(uid) = replica_set.metadata.uid.as_deref() else {
        return;
    };
    let spec = &replica_set.spec;
    if replica_set.metadata.name.is_none() {
        return;
    }
    let namespace = namespace_of(&replica_set.metadata);
    let active: Vec<&Pod> = controlled_pods(snapshot, namespace, uid, &spec.selector)
        .into_iter()
        .filter(|pod| is_active(pod))
        .collect();
    let desired = usize::try_from(spec.replicas.unwrap_or(1)).unwrap_or(0);

    if replica_set.metadata.deletion_timestamp.is_none() {
        if active.len() < desired {
            if let Some(template) = spec.template.as_ref() {
                let count = (desired - active.len()).min(BURST_REPLICAS);
                create_pods(snapshot, replica_set, template, count, actions);
            }
        } else if active.len() > desired {
            let count = (active.len() - desired).min(BURST_REPLICAS);
            delete_pods(replica_set, &active, count, actions);
        }
    }

    let min_ready_seconds = spec.min_ready_seconds.unwrap_or(0);
    let template_labels = spec
        .template
        .as_ref()
        .and_then(|template| template.metadata.as_ref())
        .and_then(|metadata| metadata.labels.as_ref());
    let fully_labeled = active
        .iter()
        .filter(|pod| labels_contain(pod.metadata.labels.as_ref(), template_labels))
        .count();
    let counts = count_pods(&active, min_ready_seconds, snapshot.now_ms);
    let stored = replica_set.status.clone().unwrap_or_default();
    let status = ReplicaSetStatus {
        replicas: counts.active,
        fully_labeled_replicas: nonzero(count_as_i32(fully_labeled)),
        ready_replicas: nonzero(counts.ready),
        available_replicas: nonzero(counts.available),
        observed_generation: replica_set.metadata.generation,
        ..stored.clone()
    };
    if normalized_status(&status) != normalized_status(&stored) {
        let mut updated = replica_set.clone();
        updated.status = Some(status);
        if let Some(object) = to_object(&updated) {
            actions.push(Action::UpdateStatus(object));
        }
    }
}

fn create_pods(
    snapshot: &Snapshot,
    replica_set: &ReplicaSet,
    template: &PodTemplateSpec,
    count: usize,
    actions: &mut Vec<Action>,
) {
    let (Some(uid), Some(name)) = (
        replica_set.metadata.uid.as_deref(),
        replica_set.metadata.name.as_deref(),
    ) else {
        return;
    };
    if template.spec.is_none() {
        return;
    }
    let namespace = namespace_of(&replica_set.metadata);
    let prefix = generate_name_prefix(name);
    let taken: BTreeSet<&str> = snapshot
        .pods
        .iter()
        .filter(|pod| namespace_of(&pod.metadata) == namespace)
        .filter_map(|pod| pod.metadata.name.as_deref())
        .collect();
    let template_metadata = template.metadata.clone().unwrap_or_default();
    for pod_name in generated_names(&prefix, uid, snapshot.now_ms, count, &taken) {
        let pod = Pod {
            metadata: ObjectMeta {
                name: Some(pod_name.clone()),
                generate_name: Some(prefix.clone()),
                namespace: Some(namespace.to_string()),
                labels: template_metadata.labels.clone(),
                annotations: template_metadata.annotations.clone(),
                owner_references: Some(vec![OwnerReference {
                    api_version: "apps/v1".into(),
                    kind: "ReplicaSet".into(),
                    name: name.to_string(),
                    uid: uid.to_string(),
                    controller: Some(true),
                    block_owner_deletion: Some(true),
                }]),
                ..ObjectMeta::default()
            },
            spec: template.spec.clone(),
            status: None,
        };
        let Some(object) = to_object(&pod) else {
            continue;
        };
        actions.push(Action::Create(object));
        actions.push(replica_set_event(
            replica_set,
            "SuccessfulCreate",
            format!("Created pod: {pod_name}"),
        ));
    }
}

fn delete_pods(replica_set: &ReplicaSet, active: &[&Pod], count: usize, actions: &mut Vec<Action>) {
    let mut ranked: Vec<&Pod> = active.to_vec();
    ranked.sort_by_cached_key(|pod| deletion_rank(pod));
    for pod in ranked.into_iter().take(count) {
        let pod_name = pod.metadata.name.clone().unwrap_or_default();
        actions.push(Action::Delete {
            kind: "Pod".into(),
            namespace: namespace_of(&pod.metadata).to_string(),
            name: pod_name.clone(),
            resource_version: pod.metadata.resource_version.clone(),
        });
        actions.push(replica_set_event(
            replica_set,
            "SuccessfulDelete",
            format!("Deleted pod: {pod_name}"),
        ));
    }
}

/// The order pods are deleted in when scaling down, smallest first, as kube's `ActivePods`:
/// unscheduled before scheduled; Pending before Unknown before Running; not ready before ready;
/// ready for a shorter time before a longer time; more container restarts first; newer
/// (creationTimestamp) before older; then by name so that the order is total.
type DeletionRank = (
    bool,
    u8,
    bool,
    (u8, Reverse<i64>),
    Reverse<i32>,
    (u8, Reverse<i64>),
    String,
);

fn deletion_rank(pod: &Pod) -> DeletionRank {
    let scheduled = pod
        .spec
        .as_ref()
        .and_then(|spec| spec.node_name.as_deref())
        .is_some_and(|node| !node.is_empty());
    let phase = match pod_phase(pod) {
        "Unknown" => 1,
        "Running" => 2,
        _ => 0,
    };
    let ready = is_ready(pod);
    let zero_first_then_newest = |time_ms: Option<i64>| match time_ms {
        None => (0, Reverse(0)),
        Some(ms) => (1, Reverse(ms)),
    };
    let ready_since = if ready {
        zero_first_then_newest(ready_transition_ms(pod))
    } else {
        (0, Reverse(0))
    };
    let restarts = pod
        .status
        .as_ref()
        .and_then(|status| status.container_statuses.as_ref())
        .and_then(|statuses| statuses.iter().map(|s| s.restart_count).max())
        .unwrap_or(0);
    let created = zero_first_then_newest(pod.metadata.creation_timestamp.as_ref().map(time_ms));
    (
        scheduled,
        phase,
        ready,
        ready_since,
        Reverse(restarts),
        created,
        pod.metadata.name.clone().unwrap_or_default(),
    )
}

/// `<name>-`, cut as the API server cuts a `generateName` base.
fn generate_name_prefix(name: &str) -> String {
    let mut prefix = format!("{name}-");
    if prefix.len() > MAX_GENERATED_NAME_PREFIX_LENGTH {
        let mut cut = MAX_GENERATED_NAME_PREFIX_LENGTH;
        while !prefix.is_char_boundary(cut) {
            cut -= 1;
        }
        prefix.truncate(cut);
    }
    prefix
}

/// `count` names `<prefix><5 chars>` not in `taken` and distinct, derived from a hash of the
/// owner uid, `now_ms` and a counter.
fn generated_names(
    prefix: &str,
    owner_uid: &str,
    now_ms: i64,
    count: usize,
    taken: &BTreeSet<&str>,
) -> Vec<String> {
    let mut names = Vec::with_capacity(count);
    let mut chosen = BTreeSet::new();
    let attempts = count.saturating_mul(1000).saturating_add(10_000);
    for counter in 0..attempts {
        if names.len() == count {
            break;
        }
        let seed = format!("{owner_uid}/{now_ms}/{counter}");
        let suffix = safe_encode(fnv1a64(seed.as_bytes()), POD_NAME_SUFFIX_LENGTH);
        let name = format!("{prefix}{suffix}");
        if !taken.contains(name.as_str()) && chosen.insert(name.clone()) {
            names.push(name);
        }
    }
    names
}

fn replica_set_event(replica_set: &ReplicaSet, reason: &str, message: String) -> Action {
    Action::Event {
        involved_kind: "ReplicaSet".into(),
        namespace: namespace_of(&replica_set.metadata).to_string(),
        name: replica_set.metadata.name.clone().unwrap_or_default(),
        uid: replica_set.metadata.uid.clone().unwrap_or_default(),
        event_type: "Normal".into(),
        reason: reason.into(),
        message,
    }
}

/// Every label of `required` is in `labels` with the same value.
fn labels_contain(
    labels: Option<&BTreeMap<String, String>>,
    required: Option<&BTreeMap<String, String>>,
) -> bool {
    required
        .into_iter()
        .flatten()
        .all(|(key, value)| labels.and_then(|labels| labels.get(key)) == Some(value))
}

// ---- Shared with the Deployment controller ----

/// A status as JSON without zero counts, nulls and empty lists, so that a status that omits
/// them (as Kubernetes writes it) equals one that spells them out.
pub(super) fn normalized_status<T: Serialize>(status: &T) -> Value {
    let mut value = to_object(status).unwrap_or(Value::Null);
    if let Some(fields) = value.as_object_mut() {
        fields.retain(|_, field| {
            !(field.is_null()
                || field.as_i64() == Some(0)
                || field.as_array().is_some_and(Vec::is_empty))
        });
    }
    value
}

/// Active, ready and available pods of a set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(super) struct PodCounts {
    pub(super) active: i32,
    pub(super) ready: i32,
    pub(super) available: i32,
}

/// Counts `pods` (already filtered to active ones).
pub(super) fn count_pods(pods: &[&Pod], min_ready_seconds: i32, now_ms: i64) -> PodCounts {
    PodCounts {
        active: count_as_i32(pods.len()),
        ready: count_as_i32(pods.iter().filter(|pod| is_ready(pod)).count()),
        available: count_as_i32(
            pods.iter()
                .filter(|pod| is_available(pod, min_ready_seconds, now_ms))
                .count(),
        ),
    }
}

pub(super) fn count_as_i32(count: usize) -> i32 {
    i32::try_from(count).unwrap_or(i32::MAX)
}

/// `Some(count)`, or `None` for zero (Kubernetes omits zero counts in statuses).
pub(super) fn nonzero(count: i32) -> Option<i32> {
    (count != 0).then_some(count)
}

/// The namespace of an object, `default` when unset.
pub(super) fn namespace_of(metadata: &ObjectMeta) -> &str {
    metadata.namespace.as_deref().unwrap_or("default")
}

/// (namespace, name), the order objects are visited in.
pub(super) fn object_key(metadata: &ObjectMeta) -> (&str, &str) {
    (
        namespace_of(metadata),
        metadata.name.as_deref().unwrap_or_default(),
    )
}

/// The uid of the object's controller (the owner reference with `controller: true`).
pub(super) fn controller_uid(metadata: &ObjectMeta) -> Option<&str> {
    metadata
        .owner_references
        .as_ref()?
        .iter()
        .find(|reference| reference.controller == Some(true))
        .map(|reference| reference.uid.as_str())
}

/// The pods of `namespace` controlled by `owner_uid` whose labels match `selector`, including
/// inactive ones.
pub(super) fn controlled_pods<'a>(
    snapshot: &'a Snapshot,
    namespace: &str,
    owner_uid: &str,
    selector: &LabelSelector,
) -> Vec<&'a Pod> {
    snapshot
        .pods
        .iter()
        .filter(|pod| namespace_of(&pod.metadata) == namespace)
        .filter(|pod| controller_uid(&pod.metadata) == Some(owner_uid))
        .filter(|pod| selector_matches(selector, pod.metadata.labels.as_ref()))
        .map(|pod| &**pod)
        .collect()
}

/// Whether `labels` match a label selector: every `matchLabels` entry and every
/// `matchExpressions` requirement (In, NotIn, Exists, DoesNotExist). The empty selector matches
/// everything; an unknown operator matches nothing.
pub(super) fn selector_matches(
    selector: &LabelSelector,
    labels: Option<&BTreeMap<String, String>>,
) -> bool {
    let value_of = |key: &str| labels.and_then(|labels| labels.get(key));
    let labels_match = selector
        .match_labels
        .iter()
        .flatten()
        .all(|(key, value)| value_of(key) == Some(value));
    let expressions_match = selector
        .match_expressions
        .iter()
        .flatten()
        .all(|requirement| {
            let values = requirement.values.as_deref().unwrap_or_default();
            let current = value_of(&requirement.key);
            match requirement.operator.as_str() {
                "In" => current.is_some_and(|current| values.contains(current)),
                "NotIn" => current.is_none_or(|current| !values.contains(current)),
                "Exists" => current.is_some(),
                "DoesNotExist" => current.is_none(),
                _ => false,
            }
        });
    labels_match && expressions_match
}

/// The pod's `status.phase`, empty when unset.
pub(super) fn pod_phase(pod: &Pod) -> &str {
    pod.status
        .as_ref()
        .and_then(|status| status.phase.as_deref())
        .unwrap_or_default()
}

/// Counted by a controller: not being deleted and not finished (Succeeded or Failed).
pub(super) fn is_active(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none() && !is_terminal(pod)
}

/// Succeeded or Failed.
pub(super) fn is_terminal(pod: &Pod) -> bool {
    matches!(pod_phase(pod), "Succeeded" | "Failed")
}

fn ready_condition(pod: &Pod) -> Option<&k8s_openapi::api::core::v1::PodCondition> {
    pod.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|condition| condition.type_ == "Ready")
}

/// The pod's Ready condition is True.
pub(super) fn is_ready(pod: &Pod) -> bool {
    ready_condition(pod).is_some_and(|condition| condition.status == "True")
}

/// When the Ready condition last changed, in milliseconds since the epoch.
fn ready_transition_ms(pod: &Pod) -> Option<i64> {
    ready_condition(pod)?
        .last_transition_time
        .as_ref()
        .map(time_ms)
}

/// Ready for more than `min_ready_seconds` at `now_ms` (kube's `IsPodAvailable`).
pub(super) fn is_available(pod: &Pod, min_ready_seconds: i32, now_ms: i64) -> bool {
    if !is_ready(pod) {
        return false;
    }
    if min_ready_seconds <= 0 {
        return true;
    }
    ready_transition_ms(pod)
        .is_some_and(|since| since + i64::from(min_ready_seconds) * 1000 < now_ms)
}

pub(super) fn time_ms(time: &Time) -> i64 {
    time.0.as_millisecond()
}

/// `now_ms` as an API time (whole seconds, as the API serializes them).
pub(super) fn api_time(now_ms: i64) -> Option<Time> {
    jiff::Timestamp::from_second(now_ms.div_euclid(1000))
        .ok()
        .map(Time)
}

/// 64-bit FNV-1a.
pub(super) fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in bytes {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// `length` characters of [`SAFE_ALPHABET`] from `value`.
pub(super) fn safe_encode(mut value: u64, length: usize) -> String {
    let base = SAFE_ALPHABET.len() as u64;
    let mut encoded = String::with_capacity(length);
    for _ in 0..length {
        let digit = usize::try_from(value % base).unwrap_or(0);
        encoded.push(char::from(SAFE_ALPHABET[digit]));
        value /= base;
    }
    encoded
}

/// JSON of a Kubernetes object or part of one; `None` only if it cannot be serialized.
pub(super) fn to_object<T: Serialize>(value: &T) -> Option<Value> {
    serde_json::to_value(value).ok()
}

#[cfg(test)]
mod tests;
