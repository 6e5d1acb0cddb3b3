//! The Deployment controller, as kube-controller-manager's: a Deployment owns ReplicaSets, one
//! per pod template; the "new" one carries the Deployment's current template and the "old" ones
//! are scaled down as the strategy allows (RollingUpdate: within `maxSurge` extra pods and
//! `maxUnavailable` missing available pods; Recreate: all old pods gone before new ones start).
//! Pure and level-driven like the ReplicaSet controller: from a [`Snapshot`] to [`Action`]s, a
//! step per call; the shell executes them and calls again.
//!
//! A ReplicaSet's name is `<deployment>-<pod-template-hash>`, the hash (FNV-1a of the
//! template's canonical JSON, 10 safe characters) also being a label of its template and a term
//! of its selector. Annotations record the revision (`deployment.kubernetes.io/revision`, the
//! highest of the others + 1 whenever a ReplicaSet becomes the new one, also when a rollback
//! makes an old template current again) and the sizes the Deployment had when it last scaled
//! the ReplicaSet (`desired-replicas`, `max-replicas`), which proportional scaling reads. The
//! Deployment's own revision annotation is written in a pass where its status did not change,
//! since both writes carry the same resourceVersion precondition.
//!
//! Counting differs from Kubernetes in one conservative way: the controller reads pods, not
//! ReplicaSet statuses, and a ReplicaSet counts as `max(spec.replicas, active pods)` towards
//! the surge limit and as `min(spec.replicas, available pods)` towards availability, so a
//! decision made before the ReplicaSet controller caught up can neither exceed
//! `replicas + maxSurge` pods nor, through its own deletes, leave fewer than
//! `replicas - maxUnavailable` available ones.
//!
//! Beyond Kubernetes: with the annotation `flotilla.io/auto-rollback: "true"`, a Deployment whose
//! Progressing condition says ProgressDeadlineExceeded gets the template of the previous
//! revision back and the annotation `flotilla.io/rolled-back-from: "<failed revision>"`; it
//! never rolls back to the revision it was rolled back from.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentCondition, DeploymentSpec, DeploymentStatus, ReplicaSet, ReplicaSetSpec,
};
use k8s_openapi::api::core::v1::PodTemplateSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::Value;

use super::replicaset::{
    api_time, controlled_pods, controller_uid, count_pods, fnv1a64, is_active, is_terminal,
    namespace_of, nonzero, normalized_status, object_key, safe_encode, time_ms, to_object,
    PodCounts,
};
use super::{Action, Snapshot};

const TEMPLATE_HASH_LABEL: &str = "pod-template-hash";
const TEMPLATE_HASH_LENGTH: usize = 10;
const REVISION_ANNOTATION: &str = "deployment.kubernetes.io/revision";
const REVISION_HISTORY_ANNOTATION: &str = "deployment.kubernetes.io/revision-history";
const DESIRED_REPLICAS_ANNOTATION: &str = "deployment.kubernetes.io/desired-replicas";
const MAX_REPLICAS_ANNOTATION: &str = "deployment.kubernetes.io/max-replicas";
const AUTO_ROLLBACK_ANNOTATION: &str = "flotilla.io/auto-rollback";
const ROLLED_BACK_FROM_ANNOTATION: &str = "flotilla.io/rolled-back-from";
/// Deployment annotations not copied to its new ReplicaSet.
const ANNOTATIONS_NOT_COPIED: [&str; 8] = [
    "kubectl.kubernetes.io/last-applied-configuration",
    REVISION_ANNOTATION,
    REVISION_HISTORY_ANNOTATION,
    DESIRED_REPLICAS_ANNOTATION,
    MAX_REPLICAS_ANNOTATION,
    "deprecated.deployment.rollback.to",
    AUTO_ROLLBACK_ANNOTATION,
    ROLLED_BACK_FROM_ANNOTATION,
];
/// `revision-history` is cut (oldest first) to stay within this many characters.
const MAX_REVISION_HISTORY_CHARS: usize = 2000;
const DEFAULT_REVISION_HISTORY_LIMIT: i32 = 10;
const DEFAULT_PROGRESS_DEADLINE_SECONDS: i32 = 600;
const DEFAULT_ROLLING_PERCENT: i64 = 25;
/// Name collisions tried before giving up (the create then fails and is retried).
const MAX_HASH_COLLISIONS: u32 = 100;

const AVAILABLE: &str = "Available";
const PROGRESSING: &str = "Progressing";
const MINIMUM_REPLICAS_AVAILABLE: &str = "MinimumReplicasAvailable";
const MINIMUM_REPLICAS_UNAVAILABLE: &str = "MinimumReplicasUnavailable";
const NEW_REPLICA_SET_CREATED: &str = "NewReplicaSetCreated";
const FOUND_NEW_REPLICA_SET: &str = "FoundNewReplicaSet";
const REPLICA_SET_UPDATED: &str = "ReplicaSetUpdated";
const NEW_REPLICA_SET_AVAILABLE: &str = "NewReplicaSetAvailable";
const PROGRESS_DEADLINE_EXCEEDED: &str = "ProgressDeadlineExceeded";
const DEPLOYMENT_PAUSED: &str = "DeploymentPaused";
const DEPLOYMENT_RESUMED: &str = "DeploymentResumed";

/// Creates, scales and deletes the ReplicaSets of every Deployment one step towards its spec
/// and strategy, records ScalingReplicaSet events, and updates statuses that changed.
/// Deployments are visited in (namespace, name) order.
pub fn reconcile_deployments(snapshot: &Snapshot) -> Vec<Action> {
    let mut deployments: Vec<&Deployment> = snapshot.deployments.iter().collect();
    deployments.sort_by(|a, b| object_key(&a.metadata).cmp(&object_key(&b.metadata)));
    deployments
        .into_iter()
        .flat_map(|deployment| reconcile_deployment(snapshot, deployment))
        .collect()
}

/// kube's `syncDeployment`.
fn reconcile_deployment(snapshot: &Snapshot, deployment: &Deployment) -> Vec<Action> {
    let (Some(uid), Some(name)) = (
        deployment.metadata.uid.as_deref(),
        deployment.metadata.name.as_deref(),
    ) else {
        return Vec::new();
    };
    let spec = &deployment.spec;
    let settings = Settings::of(spec);
    let namespace = namespace_of(&deployment.metadata);
    let mut owned: Vec<&ReplicaSet> = snapshot
        .replica_sets
        .iter()
        .filter(|rs| namespace_of(&rs.metadata) == namespace)
        .filter(|rs| controller_uid(&rs.metadata) == Some(uid))
        .collect();
    owned.sort_by_key(|rs| creation_order(&rs.metadata));

    if let Some(actions) = auto_rollback(deployment, name, spec, &settings, &owned) {
        return actions;
    }

    let mut rollout = Rollout::new(snapshot, deployment, name, uid, spec, settings, &owned);
    if deployment.metadata.deletion_timestamp.is_some() {
        rollout.sync_existing_new_replica_set();
        return rollout.finish(false);
    }
    rollout.check_paused_conditions();
    rollout.sync_existing_new_replica_set();
    if settings.paused {
        rollout.scale();
        rollout.cleanup();
        return rollout.finish(false);
    }
    if rollout.is_scaling_event() {
        rollout.scale();
        return rollout.finish(false);
    }
    if settings.recreate {
        rollout.rollout_recreate();
    } else {
        rollout.rollout_rolling();
    }
    rollout.finish(true)
}

/// The Deployment's spec with Kubernetes' defaults applied and the strategy's fenceposts
/// resolved against `replicas`.
#[derive(Debug, Clone, Copy)]
struct Settings {
    replicas: i32,
    /// kube's `MaxSurge(d)`: 0 for Recreate.
    max_surge: i32,
    /// kube's `MaxUnavailable(d)`: 0 for Recreate or no replicas, at most `replicas`.
    max_unavailable: i32,
    recreate: bool,
    min_ready_seconds: i32,
    /// `None`: keep every old ReplicaSet.
    revision_history_limit: Option<i32>,
    /// `None`: progress is not tracked (the field is MaxInt32).
    progress_deadline_seconds: Option<i32>,
    paused: bool,
}

impl Settings {
    fn of(spec: &DeploymentSpec) -> Settings {
        let replicas = spec.replicas.unwrap_or(1).max(0);
        let recreate = spec
            .strategy
            .as_ref()
            .and_then(|strategy| strategy.type_.as_deref())
            == Some("Recreate");
        let (max_surge, max_unavailable) = if recreate {
            (0, 0)
        } else {
            let rolling = spec
                .strategy
                .as_ref()
                .and_then(|strategy| strategy.rolling_update.as_ref());
            let surge = scaled_value(
                rolling.and_then(|rolling| rolling.max_surge.as_ref()),
                replicas,
                true,
            );
            let mut unavailable = scaled_value(
                rolling.and_then(|rolling| rolling.max_unavailable.as_ref()),
                replicas,
                false,
            );
            if surge == 0 && unavailable == 0 {
                unavailable = 1;
            }
            let unavailable = if replicas == 0 {
                0
            } else {
                unavailable.min(replicas)
            };
            (surge, unavailable)
        };
        Settings {
            replicas,
            max_surge,
            max_unavailable,
            recreate,
            min_ready_seconds: spec.min_ready_seconds.unwrap_or(0).max(0),
            revision_history_limit: match spec.revision_history_limit {
                None => Some(DEFAULT_REVISION_HISTORY_LIMIT),
                Some(i32::MAX) => None,
                Some(limit) => Some(limit.max(0)),
            },
            progress_deadline_seconds: match spec.progress_deadline_seconds {
                None => Some(DEFAULT_PROGRESS_DEADLINE_SECONDS),
                Some(i32::MAX) => None,
                Some(seconds) => Some(seconds),
            },
            paused: spec.paused.unwrap_or(false),
        }
    }

    /// Pods the Deployment may have at most while rolling.
    fn max_total_pods(&self) -> i32 {
        self.replicas + self.max_surge
    }

    /// Available pods the Deployment keeps at least while rolling.
    fn min_available(&self) -> i32 {
        self.replicas - self.max_unavailable
    }
}

/// An int, or a percentage of `total` rounded up or down; absent means 25%.
fn scaled_value(value: Option<&IntOrString>, total: i32, round_up: bool) -> i32 {
    let percent_of_total = |percent: i64| {
        let scaled = percent * i64::from(total);
        let rounded = if round_up {
            (scaled + 99).div_euclid(100)
        } else {
            scaled.div_euclid(100)
        };
        i32::try_from(rounded).unwrap_or(0)
    };
    let value = match value {
        None => percent_of_total(DEFAULT_ROLLING_PERCENT),
        Some(IntOrString::Int(count)) => *count,
        Some(IntOrString::String(text)) => match text.trim().strip_suffix('%') {
            Some(percent) => percent
                .trim()
                .parse::<i64>()
                .map(percent_of_total)
                .unwrap_or(0),
            None => text.trim().parse().unwrap_or(0),
        },
    };
    value.max(0)
}

/// One ReplicaSet of the Deployment as this pass would leave it.
#[derive(Debug, Clone)]
struct PlannedReplicaSet<'a> {
    /// The stored object; `None` for the ReplicaSet this pass creates.
    original: Option<&'a ReplicaSet>,
    /// The object with this pass's changes.
    object: ReplicaSet,
    /// Its active pods: all, ready, and available (with its own `minReadySeconds`; the
    /// Deployment's for the new one).
    pods: PodCounts,
    /// Its pods not Succeeded or Failed, including those being deleted.
    running: i32,
}

impl PlannedReplicaSet<'_> {
    fn name(&self) -> &str {
        self.object.metadata.name.as_deref().unwrap_or_default()
    }

    fn replicas(&self) -> i32 {
        self.object.spec.replicas.unwrap_or(1)
    }

    fn set_replicas(&mut self, replicas: i32) {
        self.object.spec.replicas = Some(replicas);
    }

    fn annotation(&self, key: &str) -> Option<&str> {
        annotation(&self.object.metadata, key)
    }

    fn revision(&self) -> i64 {
        revision(&self.object.metadata)
    }

    /// Pods counted towards `replicas + maxSurge`.
    fn surge_count(&self) -> i32 {
        self.replicas().max(self.pods.active)
    }

    /// Available pods it will still have once the ReplicaSet controller caught up.
    fn settled_available(&self) -> i32 {
        self.pods.available.min(self.replicas())
    }
}

/// The state of one Deployment's pass: kube's rollout functions mutate `replica_sets` and
/// `status`, `finish` turns the differences into actions.
struct Rollout<'a> {
    deployment: &'a Deployment,
    name: &'a str,
    namespace: &'a str,
    uid: &'a str,
    spec: &'a DeploymentSpec,
    settings: Settings,
    now_ms: i64,
    snapshot: &'a Snapshot,
    /// Oldest first (creationTimestamp, then name); a ReplicaSet created by this pass last.
    replica_sets: Vec<PlannedReplicaSet<'a>>,
    /// The one whose template equals the Deployment's (the oldest such).
    new_index: Option<usize>,
    /// The stored status with the conditions this pass set so far.
    status: DeploymentStatus,
    events: Vec<Action>,
    deletes: Vec<Action>,
}

impl<'a> Rollout<'a> {
    fn new(
        snapshot: &'a Snapshot,
        deployment: &'a Deployment,
        name: &'a str,
        uid: &'a str,
        spec: &'a DeploymentSpec,
        settings: Settings,
        owned: &[&'a ReplicaSet],
    ) -> Self {
        let template = template_without_hash(&spec.template);
        let new_index = owned.iter().position(|rs| {
            rs.spec
                .template
                .as_ref()
                .is_some_and(|candidate| template_without_hash(candidate) == template)
        });
        let replica_sets = owned
            .iter()
            .enumerate()
            .map(|(index, rs)| {
                let namespace = namespace_of(&rs.metadata);
                let pods = match rs.metadata.uid.as_deref() {
                    Some(rs_uid) => controlled_pods(snapshot, namespace, rs_uid, &rs.spec.selector),
                    None => Vec::new(),
                };
                let min_ready_seconds = if Some(index) == new_index {
                    settings.min_ready_seconds
                } else {
                    rs.spec.min_ready_seconds.unwrap_or(0)
                };
                let active: Vec<_> = pods.iter().copied().filter(|pod| is_active(pod)).collect();
                PlannedReplicaSet {
                    original: Some(*rs),
                    object: (*rs).clone(),
                    pods: count_pods(&active, min_ready_seconds, snapshot.now_ms),
                    running: i32::try_from(pods.iter().filter(|pod| !is_terminal(pod)).count())
                        .unwrap_or(i32::MAX),
                }
            })
            .collect();
        Rollout {
            deployment,
            name,
            namespace: namespace_of(&deployment.metadata),
            uid,
            spec,
            settings,
            now_ms: snapshot.now_ms,
            snapshot,
            replica_sets,
            new_index,
            status: deployment.status.clone().unwrap_or_default(),
            events: Vec::new(),
            deletes: Vec::new(),
        }
    }

    /// Indices of the old ReplicaSets, oldest first.
    fn old_indices(&self) -> Vec<usize> {
        (0..self.replica_sets.len())
            .filter(|index| Some(*index) != self.new_index)
            .collect()
    }

    fn max_old_revision(&self) -> i64 {
        self.old_indices()
            .into_iter()
            .map(|index| self.replica_sets[index].revision())
            .max()
            .unwrap_or(0)
    }

    fn replicas_of(&self, index: usize) -> i32 {
        self.replica_sets[index].replicas()
    }

    fn progress_tracked(&self) -> bool {
        self.settings.progress_deadline_seconds.is_some()
    }

    fn condition(
        &self,
        type_: &str,
        status: &str,
        reason: &str,
        message: String,
    ) -> DeploymentCondition {
        DeploymentCondition {
            type_: Some(type_.into()),
            status: Some(status.into()),
            reason: Some(reason.into()),
            message: Some(message),
            last_transition_time: api_time(self.now_ms),
            last_update_time: api_time(self.now_ms),
        }
    }

    /// kube's `checkPausedConditions`: Progressing Unknown while paused (unless it already
    /// timed out), and once more when resumed, so that the pause does not count as lack of
    /// progress.
    fn check_paused_conditions(&mut self) {
        if !self.progress_tracked() {
            return;
        }
        let reason = find_condition(&self.status, PROGRESSING).and_then(|c| c.reason.clone());
        if reason.as_deref() == Some(PROGRESS_DEADLINE_EXCEEDED) {
            return;
        }
        let paused_recorded = reason.as_deref() == Some(DEPLOYMENT_PAUSED);
        if self.settings.paused && !paused_recorded {
            let condition = self.condition(
                PROGRESSING,
                "Unknown",
                DEPLOYMENT_PAUSED,
                "Deployment is paused".into(),
            );
            set_condition(&mut self.status, condition);
        } else if !self.settings.paused && paused_recorded {
            let condition = self.condition(
                PROGRESSING,
                "Unknown",
                DEPLOYMENT_RESUMED,
                "Deployment is resumed".into(),
            );
            set_condition(&mut self.status, condition);
        }
    }

    /// The existing new ReplicaSet gets the Deployment's annotations, the next revision (when
    /// it had an older one: a rollback) and `minReadySeconds`.
    fn sync_existing_new_replica_set(&mut self) {
        let Some(index) = self.new_index else {
            return;
        };
        let new_revision = self.max_old_revision() + 1;
        self.set_new_replica_set_annotations(index, new_revision, true);
        let min_ready_seconds = self.settings.min_ready_seconds;
        let spec = &mut self.replica_sets[index].object.spec;
        if spec.min_ready_seconds.unwrap_or(0) != min_ready_seconds {
            spec.min_ready_seconds = Some(min_ready_seconds);
        }
        if self.progress_tracked() && find_condition(&self.status, PROGRESSING).is_none() {
            let message = format!(
                "Found new replica set {:?}",
                self.replica_sets[index].name()
            );
            let condition = self.condition(PROGRESSING, "True", FOUND_NEW_REPLICA_SET, message);
            set_condition(&mut self.status, condition);
        }
    }

    /// kube's `SetNewReplicaSetAnnotations`.
    fn set_new_replica_set_annotations(&mut self, index: usize, new_revision: i64, exists: bool) {
        let deployment_annotations = self.deployment.metadata.annotations.clone();
        let (desired, max) = (self.settings.replicas, self.settings.max_total_pods());
        let planned = &mut self.replica_sets[index];
        let annotations = planned
            .object
            .metadata
            .annotations
            .get_or_insert_with(BTreeMap::new);
        for (key, value) in deployment_annotations.iter().flatten() {
            if !ANNOTATIONS_NOT_COPIED.contains(&key.as_str())
                && annotations.get(key) != Some(value)
            {
                annotations.insert(key.clone(), value.clone());
            }
        }
        let old_revision = annotations.get(REVISION_ANNOTATION).cloned();
        let old_revision_number = old_revision
            .as_deref()
            .and_then(|text| text.parse::<i64>().ok())
            .unwrap_or(0);
        if old_revision_number < new_revision {
            annotations.insert(REVISION_ANNOTATION.into(), new_revision.to_string());
            if let Some(old_revision) = old_revision.filter(|text| !text.is_empty()) {
                let history = annotations
                    .get(REVISION_HISTORY_ANNOTATION)
                    .cloned()
                    .unwrap_or_default();
                if let Some(history) = appended_revision_history(&history, &old_revision) {
                    annotations.insert(REVISION_HISTORY_ANNOTATION.into(), history);
                }
            }
        }
        if !exists {
            set_replicas_annotations(&mut planned.object, desired, max);
        }
    }

    /// kube's `isScalingEvent`: an active ReplicaSet was last sized for another replica count.
    fn is_scaling_event(&self) -> bool {
        if self.new_index.is_none() {
            return false;
        }
        self.replica_sets.iter().any(|planned| {
            planned.replicas() > 0
                && planned
                    .annotation(DESIRED_REPLICAS_ANNOTATION)
                    .and_then(|text| text.parse::<i32>().ok())
                    .is_some_and(|desired| desired != self.settings.replicas)
        })
    }

    /// kube's `scale`: a lone active ReplicaSet (or the newest) takes all replicas; a
    /// saturated new one leaves nothing to the old ones; otherwise a rolling Deployment's
    /// change in size is spread over its active ReplicaSets in proportion to their sizes.
    fn scale(&mut self) {
        let active: Vec<usize> = (0..self.replica_sets.len())
            .filter(|index| self.replicas_of(*index) > 0)
            .collect();
        let lone = match active.as_slice() {
            [] => self
                .new_index
                .or_else(|| self.old_indices().last().copied()),
            [only] => Some(*only),
            _ => None,
        };
        if active.len() <= 1 {
            if let Some(index) = lone {
                self.scale_replica_set(index, self.settings.replicas);
            }
            return;
        }
        if self.new_index.is_some_and(|index| self.is_saturated(index)) {
            for index in active {
                if Some(index) != self.new_index {
                    self.scale_replica_set(index, 0);
                }
            }
            return;
        }
        if self.settings.recreate {
            return;
        }
        let all_replicas: i32 = active.iter().map(|index| self.replicas_of(*index)).sum();
        let allowed = if self.settings.replicas > 0 {
            self.settings.max_total_pods()
        } else {
            0
        };
        let to_add = allowed - all_replicas;
        let mut order = active;
        if to_add != 0 {
            // Larger first; among equals newer first when growing, older first when shrinking.
            order.sort_by(|a, b| {
                let by_size = self.replicas_of(*b).cmp(&self.replicas_of(*a));
                let by_age = if to_add > 0 { b.cmp(a) } else { a.cmp(b) };
                by_size.then(by_age)
            });
        }
        let mut added = 0;
        let mut sizes = Vec::with_capacity(order.len());
        for index in &order {
            let proportion = self.proportion(*index, to_add, added);
            sizes.push(self.replicas_of(*index) + proportion);
            added += proportion;
        }
        for (position, index) in order.into_iter().enumerate() {
            let mut size = sizes[position];
            if position == 0 && to_add != 0 {
                size = (size + to_add - added).max(0);
            }
            self.set_size_and_annotations(index, size);
        }
    }

    /// kube's `GetReplicaSetProportion`.
    fn proportion(&self, index: usize, to_add: i32, added: i32) -> i32 {
        let replicas = self.replicas_of(index);
        if replicas == 0 || to_add == 0 || to_add == added {
            return 0;
        }
        let fraction = if self.settings.replicas == 0 {
            -replicas
        } else {
            let max_now = self.settings.max_total_pods();
            let stored_replicas = self
                .deployment
                .status
                .as_ref()
                .and_then(|status| status.replicas)
                .unwrap_or(0);
            let max_before = self.replica_sets[index]
                .annotation(MAX_REPLICAS_ANNOTATION)
                .and_then(|text| text.parse::<i32>().ok())
                .filter(|max| *max != 0)
                .unwrap_or(if stored_replicas != 0 {
                    stored_replicas
                } else {
                    self.settings.replicas
                });
            let scaled = f64::from(replicas) * f64::from(max_now) / f64::from(max_before);
            scaled.round() as i32 - replicas
        };
        let allowed = to_add - added;
        if to_add > 0 {
            fraction.min(allowed)
        } else {
            fraction.max(allowed)
        }
    }

    /// kube's `IsSaturated`: the new ReplicaSet has all replicas, sized for them, available.
    fn is_saturated(&self, index: usize) -> bool {
        let planned = &self.replica_sets[index];
        let desired = planned
            .annotation(DESIRED_REPLICAS_ANNOTATION)
            .and_then(|text| text.parse::<i32>().ok());
        planned.replicas() == self.settings.replicas
            && desired == Some(self.settings.replicas)
            && planned.pods.available == self.settings.replicas
    }

    /// kube's `scaleReplicaSetAndRecordEvent`: nothing when already of that size.
    fn scale_replica_set(&mut self, index: usize, size: i32) -> bool {
        if self.replicas_of(index) == size {
            return false;
        }
        self.set_size_and_annotations(index, size);
        true
    }

    /// kube's `scaleReplicaSet`: the size and the replica annotations, and an event when the
    /// size changed.
    fn set_size_and_annotations(&mut self, index: usize, size: i32) {
        let (desired, max) = (self.settings.replicas, self.settings.max_total_pods());
        let planned = &mut self.replica_sets[index];
        let old_size = planned.replicas();
        if old_size != size {
            planned.set_replicas(size);
        }
        set_replicas_annotations(&mut planned.object, desired, max);
        if old_size != size {
            let direction = if old_size < size { "up" } else { "down" };
            let message = format!(
                "Scaled {direction} replica set {} from {old_size} to {size}",
                planned.name()
            );
            self.events
                .push(self.event("Normal", "ScalingReplicaSet", message));
        }
    }

    fn event(&self, event_type: &str, reason: &str, message: String) -> Action {
        deployment_event(self.deployment, self.name, event_type, reason, message)
    }

    /// kube's `NewRSNewReplicas`: Recreate takes all replicas at once; RollingUpdate grows
    /// the new ReplicaSet up to `replicas + maxSurge` pods in all, never past `replicas`.
    fn new_replica_set_replicas(&self, index: usize) -> i32 {
        let current = self.replicas_of(index);
        if self.settings.recreate {
            return self.settings.replicas;
        }
        let pods: i32 = self
            .replica_sets
            .iter()
            .map(PlannedReplicaSet::surge_count)
            .sum();
        let max_total = self.settings.max_total_pods();
        if pods >= max_total {
            return current;
        }
        let scale_up = (max_total - pods).min(self.settings.replicas - current);
        current + scale_up.max(0)
    }

    /// Creates the ReplicaSet of the Deployment's template (kube's `getNewReplicaSet` with
    /// `createIfNotExisted`).
    fn create_new_replica_set(&mut self) {
        let new_revision = self.max_old_revision() + 1;
        let mut collision_count = 0;
        let (hash, name) = loop {
            let hash = template_hash(&self.spec.template, collision_count);
            let name = format!("{}-{hash}", self.name);
            let taken = self.snapshot.replica_sets.iter().any(|rs| {
                namespace_of(&rs.metadata) == self.namespace
                    && rs.metadata.name.as_deref() == Some(name.as_str())
            });
            if !taken || collision_count >= MAX_HASH_COLLISIONS {
                break (hash, name);
            }
            collision_count += 1;
        };
        let mut template = self.spec.template.clone();
        template
            .metadata
            .get_or_insert_with(ObjectMeta::default)
            .labels
            .get_or_insert_with(BTreeMap::new)
            .insert(TEMPLATE_HASH_LABEL.into(), hash.clone());
        let mut selector = self.spec.selector.clone();
        selector
            .match_labels
            .get_or_insert_with(BTreeMap::new)
            .insert(TEMPLATE_HASH_LABEL.into(), hash);
        let labels = template.metadata.as_ref().and_then(|m| m.labels.clone());
        let object = ReplicaSet {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(self.namespace.to_string()),
                labels,
                owner_references: Some(vec![OwnerReference {
                    api_version: "apps/v1".into(),
                    kind: "Deployment".into(),
                    name: self.name.to_string(),
                    uid: self.uid.to_string(),
                    controller: Some(true),
                    block_owner_deletion: Some(true),
                }]),
                ..ObjectMeta::default()
            },
            spec: ReplicaSetSpec {
                replicas: Some(0),
                min_ready_seconds: self.spec.min_ready_seconds,
                selector,
                template: Some(template),
            },
            status: None,
        };
        self.replica_sets.push(PlannedReplicaSet {
            original: None,
            object,
            pods: PodCounts::default(),
            running: 0,
        });
        let index = self.replica_sets.len() - 1;
        self.new_index = Some(index);
        let replicas = self.new_replica_set_replicas(index);
        self.replica_sets[index].set_replicas(replicas);
        self.set_new_replica_set_annotations(index, new_revision, false);
        if replicas > 0 {
            let message = format!("Scaled up replica set {name} from 0 to {replicas}");
            self.events
                .push(self.event("Normal", "ScalingReplicaSet", message));
        }
        if self.progress_tracked() {
            let message = format!("Created new replica set {name:?}");
            let condition = self.condition(PROGRESSING, "True", NEW_REPLICA_SET_CREATED, message);
            set_condition(&mut self.status, condition);
        }
    }

    /// kube's `rolloutRolling`: grow the new ReplicaSet, else shrink the old ones, else (when
    /// complete) clean up history.
    fn rollout_rolling(&mut self) {
        if self.new_index.is_none() {
            self.create_new_replica_set();
        }
        if self.reconcile_new_replica_set() {
            return;
        }
        if self.reconcile_old_replica_sets() {
            return;
        }
        if self.complete() {
            self.cleanup();
        }
    }

    /// kube's `reconcileNewReplicaSet`.
    fn reconcile_new_replica_set(&mut self) -> bool {
        let Some(index) = self.new_index else {
            return false;
        };
        let current = self.replicas_of(index);
        if current == self.settings.replicas {
            return false;
        }
        if current > self.settings.replicas {
            return self.scale_replica_set(index, self.settings.replicas);
        }
        let replicas = self.new_replica_set_replicas(index);
        self.scale_replica_set(index, replicas)
    }

    /// kube's `reconcileOldReplicaSets`: scale down old ReplicaSets' unavailable pods first,
    /// then as many available ones as keep `replicas - maxUnavailable` available.
    fn reconcile_old_replica_sets(&mut self) -> bool {
        let old: Vec<usize> = self
            .old_indices()
            .into_iter()
            .filter(|index| self.replicas_of(*index) > 0)
            .collect();
        if old.is_empty() {
            return false;
        }
        let all_replicas: i32 = self
            .replica_sets
            .iter()
            .map(PlannedReplicaSet::replicas)
            .sum();
        let new_unavailable = self.new_index.map_or(0, |index| {
            let planned = &self.replica_sets[index];
            planned.replicas() - planned.settled_available()
        });
        let max_scaled_down = all_replicas - self.settings.min_available() - new_unavailable;
        if max_scaled_down <= 0 {
            return false;
        }
        let cleaned_up = self.cleanup_unhealthy_replicas(&old, max_scaled_down);
        let scaled_down = self.scale_down_old_replica_sets(&old);
        cleaned_up + scaled_down > 0
    }

    /// kube's `cleanupUnhealthyReplicas`: old ReplicaSets lose their unavailable pods (the
    /// ReplicaSet controller deletes those first), oldest ReplicaSet first.
    fn cleanup_unhealthy_replicas(&mut self, old: &[usize], max_cleanup: i32) -> i32 {
        let mut total = 0;
        for index in old.iter().copied() {
            if total >= max_cleanup {
                break;
            }
            let replicas = self.replicas_of(index);
            let available = self.replica_sets[index].settled_available();
            if replicas == 0 || replicas == available {
                continue;
            }
            let count = (max_cleanup - total).min(replicas - available);
            self.scale_replica_set(index, replicas - count);
            total += count;
        }
        total
    }

    /// kube's `scaleDownOldReplicaSetsForRollingUpdate`.
    fn scale_down_old_replica_sets(&mut self, old: &[usize]) -> i32 {
        let min_available = self.settings.min_available();
        let available: i32 = self
            .replica_sets
            .iter()
            .map(PlannedReplicaSet::settled_available)
            .sum();
        if available <= min_available {
            return 0;
        }
        let to_scale_down = available - min_available;
        let mut total = 0;
        for index in old.iter().copied() {
            if total >= to_scale_down {
                break;
            }
            let replicas = self.replicas_of(index);
            if replicas == 0 {
                continue;
            }
            let count = replicas.min(to_scale_down - total);
            self.scale_replica_set(index, replicas - count);
            total += count;
        }
        total
    }

    /// kube's `rolloutRecreate`: old ReplicaSets to 0; once none of their pods runs, the new
    /// ReplicaSet (created only then) to `replicas`.
    fn rollout_recreate(&mut self) {
        let mut scaled_down = false;
        for index in self.old_indices() {
            if self.replicas_of(index) > 0 {
                scaled_down |= self.scale_replica_set(index, 0);
            }
        }
        if scaled_down {
            return;
        }
        let old_pods_running = self
            .old_indices()
            .into_iter()
            .any(|index| self.replica_sets[index].running > 0);
        if old_pods_running {
            return;
        }
        if self.new_index.is_none() {
            self.create_new_replica_set();
        }
        if let Some(index) = self.new_index {
            self.scale_replica_set(index, self.settings.replicas);
        }
        if self.complete() {
            self.cleanup();
        }
    }

    /// All replicas are pods of the new ReplicaSet, all available, none left elsewhere.
    fn complete(&self) -> bool {
        let replicas = self.settings.replicas;
        let updated = self
            .new_index
            .map_or(0, |index| self.replica_sets[index].pods.active);
        let all: i32 = self.replica_sets.iter().map(|rs| rs.pods.active).sum();
        let available: i32 = self.replica_sets.iter().map(|rs| rs.pods.available).sum();
        updated == replicas && all == replicas && available == replicas
    }

    /// kube's `cleanupDeployment`: beyond `revisionHistoryLimit` old ReplicaSets, delete the
    /// lowest revisions that have no replicas and no pods.
    fn cleanup(&mut self) {
        let Some(limit) = self.settings.revision_history_limit else {
            return;
        };
        let mut cleanable: Vec<usize> = self
            .old_indices()
            .into_iter()
            .filter(|index| {
                self.replica_sets[*index]
                    .original
                    .is_some_and(|rs| rs.metadata.deletion_timestamp.is_none())
            })
            .collect();
        let excess =
            usize::try_from(limit).map_or(0, |limit| cleanable.len().saturating_sub(limit));
        if excess == 0 {
            return;
        }
        cleanable.sort_by_key(|index| {
            let planned = &self.replica_sets[*index];
            (planned.revision(), creation_order(&planned.object.metadata))
        });
        for index in cleanable.into_iter().take(excess) {
            let planned = &self.replica_sets[index];
            let Some(original) = planned.original else {
                continue;
            };
            let stored_replicas = original.spec.replicas.unwrap_or(1);
            if planned.replicas() != 0 || stored_replicas != 0 || planned.running != 0 {
                continue;
            }
            self.deletes.push(Action::Delete {
                kind: "ReplicaSet".into(),
                namespace: namespace_of(&original.metadata).to_string(),
                name: planned.name().to_string(),
                resource_version: original.metadata.resource_version.clone(),
            });
        }
    }

    /// kube's `calculateStatus`, from the pods and this pass's ReplicaSet sizes.
    fn calculate_status(&self) -> DeploymentStatus {
        let sum = |count: fn(&PlannedReplicaSet<'_>) -> i32| -> i32 {
            self.replica_sets.iter().map(count).sum()
        };
        let available = sum(|rs| rs.pods.available);
        let unavailable = (sum(|rs| rs.replicas()) - available).max(0);
        let mut status = DeploymentStatus {
            observed_generation: self.deployment.metadata.generation,
            replicas: nonzero(sum(|rs| rs.pods.active)),
            updated_replicas: nonzero(
                self.new_index
                    .map_or(0, |index| self.replica_sets[index].pods.active),
            ),
            ready_replicas: nonzero(sum(|rs| rs.pods.ready)),
            available_replicas: nonzero(available),
            unavailable_replicas: nonzero(unavailable),
            collision_count: self.status.collision_count,
            conditions: self.status.conditions.clone(),
            terminating_replicas: None,
        };
        let condition = if available >= self.settings.min_available() {
            self.condition(
                AVAILABLE,
                "True",
                MINIMUM_REPLICAS_AVAILABLE,
                "Deployment has minimum availability.".into(),
            )
        } else {
            self.condition(
                AVAILABLE,
                "False",
                MINIMUM_REPLICAS_UNAVAILABLE,
                "Deployment does not have minimum availability.".into(),
            )
        };
        set_condition(&mut status, condition);
        status
    }

    /// kube's `syncRolloutStatus` on top of `calculate_status`: the Progressing condition.
    fn progress_status(&self, mut status: DeploymentStatus) -> DeploymentStatus {
        let Some(deadline_seconds) = self.settings.progress_deadline_seconds else {
            remove_condition(&mut status, PROGRESSING);
            return status;
        };
        let current = find_condition(&self.status, PROGRESSING);
        let new_name = self
            .new_index
            .map(|index| self.replica_sets[index].name().to_string());
        let subject = match &new_name {
            Some(name) => format!("ReplicaSet {name:?}"),
            None => format!("Deployment {:?}", self.name),
        };
        let complete_before = status.replicas == status.updated_replicas
            && current.and_then(|c| c.reason.as_deref()) == Some(NEW_REPLICA_SET_AVAILABLE);
        if complete_before {
            return status;
        }
        if deployment_complete(self.settings.replicas, self.deployment, &status) {
            let condition = self.condition(
                PROGRESSING,
                "True",
                NEW_REPLICA_SET_AVAILABLE,
                format!("{subject} has successfully progressed."),
            );
            set_condition(&mut status, condition);
        } else if deployment_progressing(&self.status, &status) {
            let mut condition = self.condition(
                PROGRESSING,
                "True",
                REPLICA_SET_UPDATED,
                format!("{subject} is progressing."),
            );
            if let Some(current) = current {
                if current.status.as_deref() == Some("True") {
                    condition.last_transition_time = current.last_transition_time.clone();
                }
                remove_condition(&mut status, PROGRESSING);
            }
            set_condition(&mut status, condition);
        } else if self.timed_out(&status, deadline_seconds) {
            let condition = self.condition(
                PROGRESSING,
                "False",
                PROGRESS_DEADLINE_EXCEEDED,
                format!("{subject} has timed out progressing."),
            );
            set_condition(&mut status, condition);
        }
        status
    }

    /// kube's `DeploymentTimedOut`: no progress for `progressDeadlineSeconds` since the
    /// Progressing condition's lastUpdateTime.
    fn timed_out(&self, status: &DeploymentStatus, deadline_seconds: i32) -> bool {
        let Some(condition) = find_condition(status, PROGRESSING) else {
            return false;
        };
        match condition.reason.as_deref() {
            Some(NEW_REPLICA_SET_AVAILABLE) => false,
            Some(PROGRESS_DEADLINE_EXCEEDED) => true,
            _ => {
                let since = condition.last_update_time.as_ref().map_or(0, time_ms);
                since + i64::from(deadline_seconds) * 1000 < self.now_ms
            }
        }
    }

    /// The actions for this pass's changes: created and changed ReplicaSets, events, deleted
    /// ReplicaSets, then the status when it changed, or else the Deployment's revision
    /// annotation when that changed (both carry the same resourceVersion precondition, so
    /// only one of them can succeed in a pass).
    fn finish(self, track_progress: bool) -> Vec<Action> {
        let mut status = self.calculate_status();
        if track_progress {
            status = self.progress_status(status);
        }
        let mut actions = Vec::new();
        for planned in self.replica_sets.iter().filter(|rs| rs.original.is_none()) {
            actions.extend(to_object(&planned.object).map(Action::Create));
        }
        for planned in &self.replica_sets {
            let Some(original) = planned.original else {
                continue;
            };
            let object = to_object(&planned.object);
            if object != to_object(original) {
                actions.extend(object.map(Action::Update));
            }
        }
        actions.extend(self.events);
        actions.extend(self.deletes);

        let stored = self.deployment.status.clone().unwrap_or_default();
        if normalized_status(&status) != normalized_status(&stored) {
            let mut updated = self.deployment.clone();
            updated.status = Some(status);
            actions.extend(to_object(&updated).map(Action::UpdateStatus));
        } else if let Some(revision) = self
            .new_index
            .and_then(|index| self.replica_sets[index].annotation(REVISION_ANNOTATION))
        {
            if annotation(&self.deployment.metadata, REVISION_ANNOTATION) != Some(revision) {
                let mut updated = self.deployment.clone();
                updated
                    .metadata
                    .annotations
                    .get_or_insert_with(BTreeMap::new)
                    .insert(REVISION_ANNOTATION.into(), revision.to_string());
                actions.extend(to_object(&updated).map(Action::Update));
            }
        }
        actions
    }
}

/// The Flotilla extension: see the module docs. `None` when there is nothing to roll back.
fn auto_rollback(
    deployment: &Deployment,
    name: &str,
    spec: &DeploymentSpec,
    settings: &Settings,
    owned: &[&ReplicaSet],
) -> Option<Vec<Action>> {
    if annotation(&deployment.metadata, AUTO_ROLLBACK_ANNOTATION) != Some("true") || settings.paused
    {
        return None;
    }
    let progressing = find_condition(deployment.status.as_ref()?, PROGRESSING)?;
    if progressing.reason.as_deref() != Some(PROGRESS_DEADLINE_EXCEEDED) {
        return None;
    }
    let template = template_without_hash(&spec.template);
    let template_of = |rs: &ReplicaSet| rs.spec.template.clone();
    let current = owned.iter().find(|rs| {
        template_of(rs).is_some_and(|candidate| template_without_hash(&candidate) == template)
    })?;
    let current_revision = revision(&current.metadata);
    let target = owned
        .iter()
        .filter(|rs| rs.metadata.uid != current.metadata.uid)
        .filter(|rs| revision(&rs.metadata) < current_revision)
        .max_by_key(|rs| (revision(&rs.metadata), creation_order(&rs.metadata)))?;
    let target_revision = revision(&target.metadata);
    let rolled_back_from = annotation(&deployment.metadata, ROLLED_BACK_FROM_ANNOTATION);
    if rolled_back_from == Some(target_revision.to_string().as_str()) {
        return None;
    }
    let mut template = template_of(target)?;
    if let Some(metadata) = template.metadata.as_mut() {
        if let Some(labels) = metadata.labels.as_mut() {
            labels.remove(TEMPLATE_HASH_LABEL);
            if labels.is_empty() {
                metadata.labels = None;
            }
        }
    }
    let mut updated = deployment.clone();
    updated.spec.template = template;
    updated
        .metadata
        .annotations
        .get_or_insert_with(BTreeMap::new)
        .insert(
            ROLLED_BACK_FROM_ANNOTATION.into(),
            current_revision.to_string(),
        );
    let message = format!(
        "Rolled back deployment {name:?} to revision {target_revision}: revision \
         {current_revision} exceeded its progress deadline"
    );
    Some(vec![
        Action::Update(to_object(&updated)?),
        deployment_event(deployment, name, "Warning", "DeploymentRollback", message),
    ])
}

fn deployment_event(
    deployment: &Deployment,
    name: &str,
    event_type: &str,
    reason: &str,
    message: String,
) -> Action {
    Action::Event {
        involved_kind: "Deployment".into(),
        namespace: namespace_of(&deployment.metadata).to_string(),
        name: name.to_string(),
        uid: deployment.metadata.uid.clone().unwrap_or_default(),
        event_type: event_type.into(),
        reason: reason.into(),
        message,
    }
}

fn annotation<'m>(metadata: &'m ObjectMeta, key: &str) -> Option<&'m str> {
    metadata.annotations.as_ref()?.get(key).map(String::as_str)
}

/// The `deployment.kubernetes.io/revision` annotation; 0 when absent or not a number.
fn revision(metadata: &ObjectMeta) -> i64 {
    annotation(metadata, REVISION_ANNOTATION)
        .and_then(|text| text.parse().ok())
        .unwrap_or(0)
}

/// Oldest first by creationTimestamp (unset last), then by name.
fn creation_order(metadata: &ObjectMeta) -> (i64, String) {
    (
        metadata
            .creation_timestamp
            .as_ref()
            .map_or(i64::MAX, time_ms),
        metadata.name.clone().unwrap_or_default(),
    )
}

/// `desired-replicas` and `max-replicas`, as the Deployment is sized now.
fn set_replicas_annotations(replica_set: &mut ReplicaSet, desired: i32, max: i32) {
    let annotations = replica_set
        .metadata
        .annotations
        .get_or_insert_with(BTreeMap::new);
    for (key, value) in [
        (DESIRED_REPLICAS_ANNOTATION, desired),
        (MAX_REPLICAS_ANNOTATION, max),
    ] {
        let value = value.to_string();
        if annotations.get(key) != Some(&value) {
            annotations.insert(key.into(), value);
        }
    }
}

/// `history` (comma-separated revisions) with `revision` appended, oldest entries dropped to
/// stay within [`MAX_REVISION_HISTORY_CHARS`]; `None` when even that does not fit.
fn appended_revision_history(history: &str, revision: &str) -> Option<String> {
    if history.is_empty() {
        return Some(revision.to_string());
    }
    let revisions: Vec<&str> = history.split(',').collect();
    let mut total = history.len() + revision.len() + 1;
    let mut start = 0;
    while total > MAX_REVISION_HISTORY_CHARS && start < revisions.len() {
        total = total.saturating_sub(revisions[start].len() + 1);
        start += 1;
    }
    if total > MAX_REVISION_HISTORY_CHARS {
        return None;
    }
    let mut kept = revisions[start..].to_vec();
    kept.push(revision);
    Some(kept.join(","))
}

/// The pod-template-hash of a template: FNV-1a of its canonical JSON (and of the collision
/// count, when not 0) in [`TEMPLATE_HASH_LENGTH`] safe characters.
fn template_hash(template: &PodTemplateSpec, collision_count: u32) -> String {
    let mut text = to_object(template)
        .map(|value| canonical_json(&value))
        .unwrap_or_default();
    if collision_count > 0 {
        text.push('/');
        text.push_str(&collision_count.to_string());
    }
    safe_encode(fnv1a64(text.as_bytes()), TEMPLATE_HASH_LENGTH)
}

/// JSON with object keys sorted, whatever order the map keeps them in.
fn canonical_json(value: &Value) -> String {
    let mut out = String::new();
    write_canonical_json(value, &mut out);
    out
}

fn write_canonical_json(value: &Value, out: &mut String) {
    match value {
        Value::Object(fields) => {
            let mut entries: Vec<(&String, &Value)> = fields.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            out.push('{');
            for (position, (key, field)) in entries.into_iter().enumerate() {
                if position > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(key.clone()).to_string());
                out.push(':');
                write_canonical_json(field, out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (position, item) in items.iter().enumerate() {
                if position > 0 {
                    out.push(',');
                }
                write_canonical_json(item, out);
            }
            out.push(']');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

/// A template as JSON without the pod-template-hash label (and without labels or metadata
/// left empty by removing it), for comparing a ReplicaSet's template with a Deployment's.
fn template_without_hash(template: &PodTemplateSpec) -> Value {
    let mut value = to_object(template).unwrap_or(Value::Null);
    if let Some(fields) = value.as_object_mut() {
        let mut metadata_empty = false;
        if let Some(metadata) = fields.get_mut("metadata").and_then(Value::as_object_mut) {
            let mut labels_empty = false;
            if let Some(labels) = metadata.get_mut("labels").and_then(Value::as_object_mut) {
                labels.remove(TEMPLATE_HASH_LABEL);
                labels_empty = labels.is_empty();
            }
            if labels_empty {
                metadata.remove("labels");
            }
            metadata_empty = metadata.is_empty();
        }
        if metadata_empty {
            fields.remove("metadata");
        }
    }
    value
}

fn find_condition<'s>(
    status: &'s DeploymentStatus,
    type_: &str,
) -> Option<&'s DeploymentCondition> {
    status
        .conditions
        .as_ref()?
        .iter()
        .find(|condition| condition.type_.as_deref() == Some(type_))
}

/// kube's `SetDeploymentCondition`: nothing when status and reason are unchanged; the
/// transition time is kept when only the reason changed; the condition goes last.
fn set_condition(status: &mut DeploymentStatus, mut condition: DeploymentCondition) {
    let type_ = condition.type_.clone().unwrap_or_default();
    if let Some(current) = find_condition(status, &type_) {
        if current.status == condition.status && current.reason == condition.reason {
            return;
        }
        if current.status == condition.status {
            condition.last_transition_time = current.last_transition_time.clone();
        }
    }
    remove_condition(status, &type_);
    status
        .conditions
        .get_or_insert_with(Vec::new)
        .push(condition);
}

fn remove_condition(status: &mut DeploymentStatus, type_: &str) {
    if let Some(conditions) = status.conditions.as_mut() {
        conditions.retain(|condition| condition.type_.as_deref() != Some(type_));
        if conditions.is_empty() {
            status.conditions = None;
        }
    }
}

/// kube's `DeploymentComplete`.
fn deployment_complete(replicas: i32, deployment: &Deployment, status: &DeploymentStatus) -> bool {
    status.updated_replicas.unwrap_or(0) == replicas
        && status.replicas.unwrap_or(0) == replicas
        && status.available_replicas.unwrap_or(0) == replicas
        && status.observed_generation.unwrap_or(0) >= deployment.metadata.generation.unwrap_or(0)
}

/// kube's `DeploymentProgressing`: more updated, ready or available pods, or fewer old ones.
fn deployment_progressing(before: &DeploymentStatus, after: &DeploymentStatus) -> bool {
    let count = |value: Option<i32>| value.unwrap_or(0);
    let old_before = count(before.replicas) - count(before.updated_replicas);
    let old_after = count(after.replicas) - count(after.updated_replicas);
    count(after.updated_replicas) > count(before.updated_replicas)
        || old_after < old_before
        || count(after.ready_replicas) > count(before.ready_replicas)
        || count(after.available_replicas) > count(before.available_replicas)
}

#[cfg(test)]
mod tests;
