use std::collections::BTreeSet;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Value};

use super::*;
use crate::control::replicaset::{is_available, reconcile_replica_sets};

/// 2026-01-01T00:00:00Z.
const NOW: i64 = 1_767_225_600_000;

/// Passes without a change after which a cluster counts as settled.
const QUIET_STEPS: u32 = 10;

fn iso(ms: i64) -> String {
    jiff::Timestamp::from_millisecond(ms)
        .expect("timestamp")
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

/// `web` in `default`, selecting and labelling `app: web`, image `flotilla/echo:v1`.
fn deployment(replicas: i32, strategy: Value) -> Deployment {
    serde_json::from_value(json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {
            "name": "web", "namespace": "default", "uid": "d-uid",
            "resourceVersion": "1", "generation": 1, "creationTimestamp": iso(NOW)
        },
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": "web"}},
            "strategy": strategy,
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {"containers": [{"name": "web", "image": "flotilla/echo:v1"}]}
            }
        }
    }))
    .expect("deployment parses")
}

fn to_json<T: Serialize>(value: &T) -> Value {
    serde_json::to_value(value).expect("serializes")
}

fn set_image(template: &mut PodTemplateSpec, image: &str) {
    if let Some(spec) = template.spec.as_mut() {
        spec.containers[0].image = Some(image.into());
    }
}

fn image_of(template: Option<&PodTemplateSpec>) -> String {
    template
        .and_then(|template| template.spec.as_ref())
        .and_then(|spec| spec.containers[0].image.clone())
        .unwrap_or_default()
}

fn scaling_event(message: &str) -> Action {
    Action::Event {
        involved_kind: "Deployment".into(),
        namespace: "default".into(),
        name: "web".into(),
        uid: "d-uid".into(),
        event_type: "Normal".into(),
        reason: "ScalingReplicaSet".into(),
        message: message.into(),
    }
}

/// The actions without the status update, and the status update's status.
fn split_status(actions: Vec<Action>) -> (Vec<Action>, Option<Value>) {
    let mut status = None;
    let rest = actions
        .into_iter()
        .filter(|action| match action {
            Action::UpdateStatus(object) => {
                status = Some(object["status"].clone());
                false
            }
            _ => true,
        })
        .collect();
    (rest, status)
}

fn condition<'s>(status: &'s Value, type_: &str) -> &'s Value {
    status["conditions"]
        .as_array()
        .and_then(|conditions| conditions.iter().find(|c| c["type"] == type_))
        .unwrap_or(&Value::Null)
}

// ---- A little cluster: the store's semantics, a kubelet, and the two controllers ----

fn same_object(metadata: &ObjectMeta, namespace: &str, name: &str) -> bool {
    namespace_of(metadata) == namespace && metadata.name.as_deref() == Some(name)
}

fn without_metadata_and_status(value: &Value) -> Value {
    let mut copy = value.clone();
    if let Some(fields) = copy.as_object_mut() {
        fields.remove("metadata");
        fields.remove("status");
    }
    copy
}

struct Cluster {
    snapshot: Snapshot,
    last_resource_version: u64,
    last_uid: u64,
    /// (kind/name, reason, message) of every event recorded.
    events: Vec<(String, String, String)>,
    /// Whether the kubelet ever reports a pod ready.
    becomes_ready: fn(&Pod) -> bool,
    /// When not 0, the state of a xorshift generator that loses 3 in 10 writes (a conflict, a
    /// lost leader, a slow controller), leaving them to a later pass, and delays 3 in 10 pod
    /// transitions of the kubelet.
    lost_writes: u64,
}

fn always_ready(_: &Pod) -> bool {
    true
}

fn unless_broken(pod: &Pod) -> bool {
    pod.spec
        .as_ref()
        .is_none_or(|spec| spec.containers[0].image.as_deref() != Some("broken"))
}

impl Cluster {
    fn new(deployment: Deployment) -> Cluster {
        Cluster {
            snapshot: Snapshot {
                deployments: vec![deployment],
                now_ms: NOW,
                ..Snapshot::default()
            },
            last_resource_version: 100,
            last_uid: 0,
            events: Vec::new(),
            becomes_ready: always_ready,
            lost_writes: 0,
        }
    }

    fn next_resource_version(&mut self) -> String {
        self.last_resource_version += 1;
        self.last_resource_version.to_string()
    }

    fn deployment(&self) -> &Deployment {
        &self.snapshot.deployments[0]
    }

    fn status(&self) -> Value {
        to_json(&self.deployment().status)
    }

    /// The Deployment's ReplicaSets, by revision.
    fn replica_sets(&self) -> Vec<&ReplicaSet> {
        let mut list: Vec<&ReplicaSet> = self.snapshot.replica_sets.iter().collect();
        list.sort_by_key(|rs| revision(&rs.metadata));
        list
    }

    fn replica_set_by_image(&self, image: &str) -> &ReplicaSet {
        self.snapshot
            .replica_sets
            .iter()
            .find(|rs| image_of(rs.spec.template.as_ref()) == image)
            .expect("a replica set with that image")
    }

    /// What the user does with `kubectl edit`: a spec change bumps generation.
    fn edit_deployment(&mut self, edit: impl FnOnce(&mut Deployment)) {
        let resource_version = self.next_resource_version();
        let deployment = &mut self.snapshot.deployments[0];
        edit(deployment);
        deployment.metadata.generation = Some(deployment.metadata.generation.unwrap_or(1) + 1);
        deployment.metadata.resource_version = Some(resource_version);
    }

    fn apply(&mut self, actions: &[Action]) {
        for action in actions {
            match action {
                Action::Create(object) => self.create(object.clone()),
                Action::Update(object) => self.update(object, false),
                Action::UpdateStatus(object) => self.update(object, true),
                Action::Delete {
                    kind,
                    namespace,
                    name,
                    resource_version,
                } => match kind.as_str() {
                    "Pod" => delete(&mut self.snapshot.pods, namespace, name, resource_version),
                    "ReplicaSet" => delete(
                        &mut self.snapshot.replica_sets,
                        namespace,
                        name,
                        resource_version,
                    ),
                    other => panic!("unexpected delete of a {other}"),
                },
                Action::Event {
                    involved_kind,
                    name,
                    reason,
                    message,
                    ..
                } => self.events.push((
                    format!("{involved_kind}/{name}"),
                    reason.clone(),
                    message.clone(),
                )),
            }
        }
    }

    fn create(&mut self, mut object: Value) {
        self.last_uid += 1;
        let resource_version = self.next_resource_version();
        let metadata = &mut object["metadata"];
        metadata["uid"] = json!(format!("uid-{}", self.last_uid));
        metadata["creationTimestamp"] = json!(iso(self.snapshot.now_ms));
        metadata["resourceVersion"] = json!(resource_version);
        metadata["generation"] = json!(1);
        match object["kind"].as_str() {
            Some("Pod") => create(&mut self.snapshot.pods, object),
            Some("ReplicaSet") => create(&mut self.snapshot.replica_sets, object),
            other => panic!("unexpected create of {other:?}"),
        }
    }

    fn update(&mut self, object: &Value, status_only: bool) {
        let resource_version = self.next_resource_version();
        match object["kind"].as_str() {
            Some("ReplicaSet") => update(
                &mut self.snapshot.replica_sets,
                object,
                status_only,
                resource_version,
            ),
            Some("Deployment") => update(
                &mut self.snapshot.deployments,
                object,
                status_only,
                resource_version,
            ),
            other => panic!("unexpected update of {other:?}"),
        }
    }

    /// Schedules new pods, then starts them; started pods whose image works become ready.
    /// Whether anything changed.
    fn kubelet(&mut self) -> bool {
        let now = self.snapshot.now_ms;
        let mut changed = false;
        for index in 0..self.snapshot.pods.len() {
            if self.loses_write() {
                // A slow kubelet: this pod's turn comes later.
                continue;
            }
            let pod = &self.snapshot.pods[index];
            let scheduled = pod
                .spec
                .as_ref()
                .and_then(|s| s.node_name.clone())
                .is_some();
            let running = pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
            let next: Option<Value> = if !scheduled {
                let mut value = to_json(pod);
                value["spec"]["nodeName"] = json!("node-1");
                value["status"] = json!({"phase": "Pending"});
                Some(value)
            } else if !running {
                let mut value = to_json(pod);
                let ready = if (self.becomes_ready)(pod) {
                    "True"
                } else {
                    "False"
                };
                value["status"] = json!({
                    "phase": "Running",
                    "conditions": [{"type": "Ready", "status": ready, "lastTransitionTime": iso(now)}]
                });
                Some(value)
            } else {
                None
            };
            if let Some(mut value) = next {
                value["metadata"]["resourceVersion"] = json!(self.next_resource_version());
                self.snapshot.pods[index] = serde_json::from_value(value).expect("pod parses");
                changed = true;
            }
        }
        changed
    }

    /// One pass of both controllers on the same snapshot, executed, then the kubelet, then a
    /// second passes. Whether anything changed.
    fn step(&mut self) -> bool {
        let mut actions = reconcile_replica_sets(&self.snapshot);
        actions.extend(reconcile_deployments(&self.snapshot));
        let executed: Vec<Action> = actions
            .iter()
            .filter(|_| !self.loses_write())
            .cloned()
            .collect();
        self.apply(&executed);
        let kubelet_changed = self.kubelet();
        self.snapshot.now_ms += 1000;
        !actions.is_empty() || kubelet_changed
    }

    fn loses_write(&mut self) -> bool {
        if self.lost_writes == 0 {
            return false;
        }
        self.lost_writes ^= self.lost_writes << 13;
        self.lost_writes ^= self.lost_writes >> 7;
        self.lost_writes ^= self.lost_writes << 17;
        self.lost_writes % 10 < 3
    }

    /// Steps until [`QUIET_STEPS`] steps in a row changed nothing (longer than any
    /// minReadySeconds here, so that no pod is still on its way to being available).
    fn settle(&mut self) {
        let mut quiet = 0;
        for _ in 0..500 {
            if self.step() {
                quiet = 0;
            } else {
                quiet += 1;
                if quiet == QUIET_STEPS {
                    return;
                }
            }
        }
        panic!("the cluster did not settle: {:#?}", self.snapshot);
    }

    /// Active and available pods controlled by the Deployment's ReplicaSets.
    fn pod_counts(&self) -> (i32, i32) {
        let min_ready = self.deployment().spec.min_ready_seconds.unwrap_or(0);
        let pods = self.snapshot.pods.iter().filter(|pod| is_active(pod));
        let active = pods.clone().count();
        let available = pods
            .filter(|pod| is_available(pod, min_ready, self.snapshot.now_ms))
            .count();
        (active as i32, available as i32)
    }
}

/// An object of a snapshot's list (pods are boxed there): its metadata.
trait Listed {
    fn meta(&self) -> &ObjectMeta;
}

impl Listed for Arc<Pod> {
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
}

impl Listed for ReplicaSet {
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
}

impl Listed for Deployment {
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
}

fn create<T: DeserializeOwned + Listed>(list: &mut Vec<T>, object: Value) {
    let object: T = serde_json::from_value(object).expect("object parses");
    let metadata = object.meta();
    let exists = list.iter().any(|existing| {
        same_object(
            existing.meta(),
            namespace_of(metadata),
            metadata.name.as_deref().unwrap_or_default(),
        )
    });
    if !exists {
        list.push(object);
    }
}

/// Replaces metadata and spec (or status) when the resourceVersion still matches; a conflict
/// is dropped as the shell would drop it.
fn update<T>(list: &mut [T], object: &Value, status_only: bool, resource_version: String)
where
    T: Serialize + DeserializeOwned + Listed,
{
    let namespace = object["metadata"]["namespace"]
        .as_str()
        .unwrap_or("default");
    let name = object["metadata"]["name"].as_str().unwrap_or_default();
    let Some(existing) = list
        .iter_mut()
        .find(|existing| same_object(existing.meta(), namespace, name))
    else {
        return;
    };
    let expected = object["metadata"]["resourceVersion"].as_str();
    if expected.is_some() && expected != existing.meta().resource_version.as_deref() {
        return;
    }
    let stored = to_json(existing);
    let mut updated = if status_only {
        let mut updated = stored.clone();
        updated["status"] = object["status"].clone();
        updated
    } else {
        let mut updated = object.clone();
        updated["status"] = stored["status"].clone();
        updated["metadata"]["uid"] = stored["metadata"]["uid"].clone();
        updated["metadata"]["creationTimestamp"] = stored["metadata"]["creationTimestamp"].clone();
        let generation = stored["metadata"]["generation"].as_i64().unwrap_or(1);
        let changed = without_metadata_and_status(&updated) != without_metadata_and_status(&stored);
        updated["metadata"]["generation"] = json!(generation + i64::from(changed));
        updated
    };
    updated["metadata"]["resourceVersion"] = json!(resource_version);
    *existing = serde_json::from_value(updated).expect("object parses");
}

fn delete<T: Listed>(
    list: &mut Vec<T>,
    namespace: &str,
    name: &str,
    resource_version: &Option<String>,
) {
    list.retain(|existing| {
        let metadata = existing.meta();
        !(same_object(metadata, namespace, name)
            && (resource_version.is_none() || *resource_version == metadata.resource_version))
    });
}

/// A cluster where `web` (of `replicas` and `strategy`) rolled out revision 1 completely.
fn settled(replicas: i32, strategy: Value) -> Cluster {
    let mut cluster = Cluster::new(deployment(replicas, strategy));
    cluster.settle();
    cluster
}

// ---- Tests ----

#[test]
fn a_new_deployment_creates_its_replica_set_with_revision_1() {
    let deployment = deployment(3, json!({}));
    let hash = template_hash(&deployment.spec.template, 0);
    let name = format!("web-{hash}");
    let snapshot = Snapshot {
        deployments: vec![deployment.clone()],
        now_ms: NOW,
        ..Snapshot::default()
    };

    let actions = reconcile_deployments(&snapshot);

    let mut status = to_json(&deployment);
    status["status"] = json!({
        "observedGeneration": 1,
        "unavailableReplicas": 3,
        "conditions": [
            {
                "type": "Progressing", "status": "True", "reason": "NewReplicaSetCreated",
                "message": format!("Created new replica set \"{name}\""),
                "lastUpdateTime": iso(NOW), "lastTransitionTime": iso(NOW)
            },
            {
                "type": "Available", "status": "False", "reason": "MinimumReplicasUnavailable",
                "message": "Deployment does not have minimum availability.",
                "lastUpdateTime": iso(NOW), "lastTransitionTime": iso(NOW)
            }
        ]
    });
    assert_eq!(
        actions,
        vec![
            Action::Create(json!({
                "apiVersion": "apps/v1", "kind": "ReplicaSet",
                "metadata": {
                    "name": name, "namespace": "default",
                    "labels": {"app": "web", "pod-template-hash": hash},
                    "annotations": {
                        "deployment.kubernetes.io/desired-replicas": "3",
                        "deployment.kubernetes.io/max-replicas": "4",
                        "deployment.kubernetes.io/revision": "1"
                    },
                    "ownerReferences": [{
                        "apiVersion": "apps/v1", "kind": "Deployment", "name": "web",
                        "uid": "d-uid", "controller": true, "blockOwnerDeletion": true
                    }]
                },
                "spec": {
                    "replicas": 3,
                    "selector": {"matchLabels": {"app": "web", "pod-template-hash": hash}},
                    "template": {
                        "metadata": {"labels": {"app": "web", "pod-template-hash": hash}},
                        "spec": {"containers": [{"name": "web", "image": "flotilla/echo:v1"}]}
                    }
                }
            })),
            scaling_event(&format!("Scaled up replica set {name} from 0 to 3")),
            Action::UpdateStatus(status),
        ]
    );
    assert_eq!(
        reconcile_deployments(&snapshot),
        actions,
        "same snapshot, same actions"
    );
}

#[test]
fn a_settled_deployment_and_its_replica_set_need_nothing() {
    let cluster = settled(3, json!({}));

    assert_eq!(reconcile_deployments(&cluster.snapshot), vec![]);
    assert_eq!(reconcile_replica_sets(&cluster.snapshot), vec![]);
    let status = cluster.status();
    assert_eq!(status["replicas"], 3);
    assert_eq!(status["updatedReplicas"], 3);
    assert_eq!(status["availableReplicas"], 3);
    assert_eq!(condition(&status, "Available")["status"], "True");
    assert_eq!(
        condition(&status, "Progressing")["reason"],
        "NewReplicaSetAvailable"
    );
    assert_eq!(
        annotation(&cluster.deployment().metadata, REVISION_ANNOTATION),
        Some("1")
    );
}

#[test]
fn a_template_change_creates_revision_2_and_surges_by_max_surge() {
    let mut cluster = settled(4, json!({}));
    cluster.edit_deployment(|d| set_image(&mut d.spec.template, "flotilla/echo:v2"));
    let old = cluster.replica_sets()[0].clone();
    let old_name = old.metadata.name.clone().expect("named");
    let hash = template_hash(&cluster.deployment().spec.template, 0);
    let new_name = format!("web-{hash}");

    let (actions, status) = split_status(reconcile_deployments(&cluster.snapshot));

    let mut old_scaled = to_json(&old);
    old_scaled["spec"]["replicas"] = json!(3);
    assert_eq!(
        actions,
        vec![
            Action::Create(json!({
                "apiVersion": "apps/v1", "kind": "ReplicaSet",
                "metadata": {
                    "name": new_name, "namespace": "default",
                    "labels": {"app": "web", "pod-template-hash": hash},
                    "annotations": {
                        "deployment.kubernetes.io/desired-replicas": "4",
                        "deployment.kubernetes.io/max-replicas": "5",
                        "deployment.kubernetes.io/revision": "2"
                    },
                    "ownerReferences": [{
                        "apiVersion": "apps/v1", "kind": "Deployment", "name": "web",
                        "uid": "d-uid", "controller": true, "blockOwnerDeletion": true
                    }]
                },
                "spec": {
                    "replicas": 1,
                    "selector": {"matchLabels": {"app": "web", "pod-template-hash": hash}},
                    "template": {
                        "metadata": {"labels": {"app": "web", "pod-template-hash": hash}},
                        "spec": {"containers": [{"name": "web", "image": "flotilla/echo:v2"}]}
                    }
                }
            })),
            Action::Update(old_scaled),
            scaling_event(&format!("Scaled up replica set {new_name} from 0 to 1")),
            scaling_event(&format!("Scaled down replica set {old_name} from 4 to 3")),
        ]
    );
    let status = status.expect("the status changes");
    assert_eq!(status["observedGeneration"], 2);
    assert_eq!(
        condition(&status, "Progressing")["reason"],
        "NewReplicaSetCreated"
    );
    assert_eq!(condition(&status, "Available")["status"], "True");
}

#[test]
fn the_old_replica_set_is_scaled_down_only_when_new_pods_are_available() {
    let strategy =
        json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}});
    let mut cluster = settled(3, strategy);
    cluster.becomes_ready = unless_broken;
    cluster.edit_deployment(|d| set_image(&mut d.spec.template, "broken"));
    for _ in 0..10 {
        cluster.step();
    }
    let old = cluster.replica_set_by_image("flotilla/echo:v1").clone();
    assert_eq!(
        old.spec.replicas,
        Some(3),
        "nothing available yet, nothing scaled down"
    );
    assert_eq!(
        cluster.replica_set_by_image("broken").spec.replicas,
        Some(1)
    );
    assert_eq!(cluster.pod_counts(), (4, 3));

    // The new pod becomes ready: now one old pod can go.
    for pod in cluster.snapshot.pods.iter_mut() {
        if image_of_pod(pod) == "broken" {
            let mut value = to_json(pod);
            value["status"]["conditions"][0]["status"] = json!("True");
            *pod = serde_json::from_value(value).expect("pod parses");
        }
    }
    let (actions, _) = split_status(reconcile_deployments(&cluster.snapshot));

    let mut old_scaled = to_json(&old);
    old_scaled["spec"]["replicas"] = json!(2);
    let old_name = old.metadata.name.clone().expect("named");
    assert_eq!(
        actions,
        vec![
            Action::Update(old_scaled),
            scaling_event(&format!("Scaled down replica set {old_name} from 3 to 2")),
        ]
    );
}

fn image_of_pod(pod: &Pod) -> String {
    pod.spec
        .as_ref()
        .and_then(|spec| spec.containers[0].image.clone())
        .unwrap_or_default()
}

/// Rolls `web` from v1 to a new template with both controllers and a kubelet, checking after
/// every pass that there are never more than `replicas + maxSurge` pods nor fewer than
/// `replicas - maxUnavailable` available ones, and that a pass is deterministic; with
/// `lost_writes` (a seed) 3 in 10 writes are lost.
fn simulate_rollout(
    replicas: i32,
    strategy: &Value,
    min_ready_seconds: i32,
    change: TemplateChange,
    lost_writes: u64,
) {
    let mut deployment = deployment(replicas, strategy.clone());
    deployment.spec.min_ready_seconds = Some(min_ready_seconds);
    let mut cluster = Cluster::new(deployment);
    cluster.lost_writes = lost_writes;
    cluster.settle();
    let settings = Settings::of(&cluster.deployment().spec);
    let case = format!(
        "{replicas} replicas, {strategy}, minReadySeconds {min_ready_seconds}, \
         lost writes seed {lost_writes}"
    );
    assert_eq!(cluster.pod_counts(), (replicas, replicas), "{case}");

    cluster.edit_deployment(|d| change(&mut d.spec.template));
    let mut steps = 0;
    let mut quiet = 0;
    while quiet < QUIET_STEPS {
        steps += 1;
        assert!(steps < 500, "{case}: the rollout did not finish");
        let first = (
            reconcile_replica_sets(&cluster.snapshot),
            reconcile_deployments(&cluster.snapshot),
        );
        let again = (
            reconcile_replica_sets(&cluster.snapshot),
            reconcile_deployments(&cluster.snapshot),
        );
        assert_eq!(first, again, "{case}: a pass is deterministic");
        let changed = cluster.step();
        let (pods, available) = cluster.pod_counts();
        assert!(
            pods <= settings.max_total_pods(),
            "{case}: {pods} pods after step {steps}"
        );
        assert!(
            available >= settings.min_available(),
            "{case}: {available} available after step {steps}"
        );
        quiet = if changed { 0 } else { quiet + 1 };
    }

    let replica_sets = cluster.replica_sets();
    assert_eq!(replica_sets.len(), 2, "{case}");
    assert_eq!(replica_sets[0].spec.replicas, Some(0), "{case}");
    assert_eq!(replica_sets[1].spec.replicas, Some(replicas), "{case}");
    assert_eq!(revision(&replica_sets[1].metadata), 2, "{case}");
    let new_uid = replica_sets[1].metadata.uid.clone();
    assert!(
        cluster
            .snapshot
            .pods
            .iter()
            .all(|pod| controller_uid(&pod.metadata) == new_uid.as_deref()),
        "{case}: only new pods are left"
    );
    let status = cluster.status();
    assert_eq!(status["updatedReplicas"], replicas, "{case}");
    assert_eq!(status["availableReplicas"], replicas, "{case}");
    assert_eq!(
        condition(&status, "Progressing")["reason"],
        "NewReplicaSetAvailable",
        "{case}"
    );
    assert_eq!(condition(&status, "Available")["status"], "True", "{case}");
    assert_eq!(
        annotation(&cluster.deployment().metadata, REVISION_ANNOTATION),
        Some("2"),
        "{case}"
    );
    assert_eq!(reconcile_deployments(&cluster.snapshot), vec![], "{case}");
    assert_eq!(reconcile_replica_sets(&cluster.snapshot), vec![], "{case}");
}

/// How a test changes the Deployment's template to start a rollout.
type TemplateChange = fn(&mut PodTemplateSpec);

fn change_image(template: &mut PodTemplateSpec) {
    set_image(template, "flotilla/echo:v2");
}

fn restart(template: &mut PodTemplateSpec) {
    template
        .metadata
        .get_or_insert_with(ObjectMeta::default)
        .annotations
        .get_or_insert_with(BTreeMap::new)
        .insert("kubectl.kubernetes.io/restartedAt".into(), iso(NOW));
}

#[test]
fn a_rolling_update_never_exceeds_max_surge_nor_drops_below_min_available() {
    let rolling = |surge: Value, unavailable: Value| json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": surge, "maxUnavailable": unavailable}});
    let cases: [(i32, Value, i32, TemplateChange); 7] = [
        (4, json!({}), 0, change_image),
        (3, rolling(json!(1), json!(0)), 0, change_image),
        (5, rolling(json!(0), json!(2)), 0, change_image),
        (10, rolling(json!("30%"), json!("10%")), 3, change_image),
        (1, json!({}), 0, change_image),
        (7, rolling(json!("0%"), json!("0%")), 2, change_image),
        (6, json!({"rollingUpdate": {"maxSurge": 3}}), 1, restart),
    ];
    for (replicas, strategy, min_ready_seconds, change) in cases {
        for lost_writes in 0..8 {
            simulate_rollout(replicas, &strategy, min_ready_seconds, change, lost_writes);
        }
    }
}

#[test]
fn recreate_scales_old_pods_away_before_creating_the_new_replica_set() {
    let mut cluster = settled(3, json!({"type": "Recreate"}));
    cluster.edit_deployment(|d| set_image(&mut d.spec.template, "flotilla/echo:v2"));
    let old = cluster.replica_sets()[0].clone();
    let old_name = old.metadata.name.clone().expect("named");

    // First the old ReplicaSet goes to 0, and nothing is created.
    let (actions, _) = split_status(reconcile_deployments(&cluster.snapshot));
    let mut old_scaled = to_json(&old);
    old_scaled["spec"]["replicas"] = json!(0);
    assert_eq!(
        actions,
        vec![
            Action::Update(old_scaled),
            scaling_event(&format!("Scaled down replica set {old_name} from 3 to 0")),
        ]
    );

    // While old pods remain, still nothing is created.
    cluster.step();
    assert_eq!(cluster.snapshot.replica_sets.len(), 1);
    assert_eq!(
        cluster.snapshot.pods.len(),
        3,
        "the ReplicaSet controller deletes next pass"
    );
    let (actions, _) = split_status(reconcile_deployments(&cluster.snapshot));
    assert_eq!(actions, vec![]);

    // Once they are gone, the new ReplicaSet is created at full size.
    cluster.step();
    assert_eq!(cluster.snapshot.pods.len(), 0);
    let hash = template_hash(&cluster.deployment().spec.template, 0);
    let (actions, _) = split_status(reconcile_deployments(&cluster.snapshot));
    assert_eq!(actions.len(), 2);
    assert!(
        matches!(&actions[0], Action::Create(rs) if rs["spec"]["replicas"] == 3
            && rs["metadata"]["annotations"]["deployment.kubernetes.io/revision"] == "2")
    );
    assert_eq!(
        actions[1],
        scaling_event(&format!("Scaled up replica set web-{hash} from 0 to 3"))
    );

    cluster.settle();
    assert_eq!(cluster.pod_counts(), (3, 3));
    assert_eq!(cluster.replica_sets()[1].spec.replicas, Some(3));
}

#[test]
fn recreate_never_runs_old_and_new_pods_together_even_when_writes_are_lost() {
    for lost_writes in 0..8 {
        let mut cluster = Cluster::new(deployment(4, json!({"type": "Recreate"})));
        cluster.lost_writes = lost_writes;
        cluster.settle();
        cluster.edit_deployment(|d| set_image(&mut d.spec.template, "flotilla/echo:v2"));
        let mut quiet = 0;
        let mut steps = 0;
        while quiet < QUIET_STEPS {
            steps += 1;
            assert!(
                steps < 500,
                "seed {lost_writes}: the rollout did not finish"
            );
            quiet = if cluster.step() { 0 } else { quiet + 1 };
            let images: BTreeSet<String> = cluster
                .snapshot
                .pods
                .iter()
                .map(|pod| image_of_pod(pod))
                .collect();
            assert!(
                images.len() <= 1,
                "seed {lost_writes}: {images:?} at step {steps}"
            );
            assert!(cluster.pod_counts().0 <= 4, "seed {lost_writes}");
        }
        assert_eq!(cluster.pod_counts(), (4, 4), "seed {lost_writes}");
        assert_eq!(image_of_pod(&cluster.snapshot.pods[0]), "flotilla/echo:v2");
    }
}

/// A ReplicaSet of `web` at `revision` with image `old<revision>`, created at `created`.
fn old_replica_set(revision: i64, replicas: i32, created: i64) -> ReplicaSet {
    serde_json::from_value(json!({
        "apiVersion": "apps/v1", "kind": "ReplicaSet",
        "metadata": {
            "name": format!("web-r{revision}"), "namespace": "default",
            "uid": format!("rs-{revision}"), "resourceVersion": format!("{revision}0"),
            "creationTimestamp": iso(created),
            "annotations": {"deployment.kubernetes.io/revision": revision.to_string()},
            "ownerReferences": [{
                "apiVersion": "apps/v1", "kind": "Deployment", "name": "web",
                "uid": "d-uid", "controller": true, "blockOwnerDeletion": true
            }]
        },
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": "web", "pod-template-hash": format!("r{revision}")}},
            "template": {
                "metadata": {"labels": {"app": "web", "pod-template-hash": format!("r{revision}")}},
                "spec": {"containers": [{"name": "web", "image": format!("flotilla/echo:old{revision}")}]}
            }
        }
    }))
    .expect("replica set parses")
}

#[test]
fn revision_history_limit_deletes_the_lowest_revisions_once_the_rollout_completed() {
    let mut cluster = Cluster::new(deployment(2, json!({})));
    cluster.edit_deployment(|d| {
        d.spec.revision_history_limit = Some(2);
        set_image(&mut d.spec.template, "flotilla/echo:v9");
    });
    // Revisions 1 to 4, all at 0 (2 created before 1).
    cluster.snapshot.replica_sets = vec![
        old_replica_set(2, 0, NOW - 50_000),
        old_replica_set(1, 0, NOW - 40_000),
        old_replica_set(3, 0, NOW - 30_000),
        old_replica_set(4, 0, NOW - 20_000),
    ];

    cluster.settle();

    assert_eq!(cluster.pod_counts(), (2, 2));
    let names: Vec<String> = cluster
        .replica_sets()
        .iter()
        .filter_map(|rs| rs.metadata.name.clone())
        .collect();
    let newest = format!(
        "web-{}",
        template_hash(&cluster.deployment().spec.template, 0)
    );
    assert_eq!(
        names,
        vec!["web-r3".to_string(), "web-r4".to_string(), newest]
    );
    assert_eq!(
        annotation(&cluster.deployment().metadata, REVISION_ANNOTATION),
        Some("5")
    );
}

#[test]
fn revision_history_cleanup_spares_old_replica_sets_that_still_have_pods() {
    let mut cluster = settled(2, json!({}));
    cluster.edit_deployment(|d| {
        d.spec.revision_history_limit = Some(1);
        d.spec.paused = Some(true);
    });
    for rs in cluster.snapshot.replica_sets.iter_mut() {
        rs.metadata
            .annotations
            .get_or_insert_with(BTreeMap::new)
            .insert(REVISION_ANNOTATION.into(), "4".into());
    }
    cluster.snapshot.replica_sets.extend([
        old_replica_set(2, 0, NOW - 50_000),
        old_replica_set(1, 0, NOW - 40_000),
        old_replica_set(3, 0, NOW - 30_000),
    ]);
    // Revision 1 still has a pod (its ReplicaSet controller has not deleted it yet).
    let mut pod = to_json(&cluster.snapshot.pods[0]);
    pod["metadata"]["name"] = json!("web-r1-bcdfg");
    pod["metadata"]["ownerReferences"][0]["uid"] = json!("rs-1");
    pod["metadata"]["labels"]["pod-template-hash"] = json!("r1");
    cluster
        .snapshot
        .pods
        .push(serde_json::from_value(pod).expect("pod parses"));

    let actions = reconcile_deployments(&cluster.snapshot);

    // Three old ReplicaSets and a limit of 1: revisions 1 and 2 are beyond it, and revision 1
    // is spared because it still has a pod.
    let deletes: Vec<Action> = actions
        .into_iter()
        .filter(|action| matches!(action, Action::Delete { .. }))
        .collect();
    assert_eq!(
        deletes,
        vec![Action::Delete {
            kind: "ReplicaSet".into(),
            namespace: "default".into(),
            name: "web-r2".into(),
            resource_version: Some("20".into()),
        }]
    );
}

#[test]
fn a_paused_deployment_scales_but_does_not_roll_out() {
    let mut cluster = settled(3, json!({}));
    let old = cluster.replica_sets()[0].clone();
    let old_name = old.metadata.name.clone().expect("named");
    cluster.edit_deployment(|d| {
        d.spec.paused = Some(true);
        d.spec.replicas = Some(5);
        set_image(&mut d.spec.template, "flotilla/echo:v2");
    });

    let (actions, status) = split_status(reconcile_deployments(&cluster.snapshot));

    let mut scaled = to_json(&old);
    scaled["spec"]["replicas"] = json!(5);
    scaled["metadata"]["annotations"]["deployment.kubernetes.io/desired-replicas"] = json!("5");
    scaled["metadata"]["annotations"]["deployment.kubernetes.io/max-replicas"] = json!("7");
    assert_eq!(
        actions,
        vec![
            Action::Update(scaled),
            scaling_event(&format!("Scaled up replica set {old_name} from 3 to 5")),
        ]
    );
    let status = status.expect("the status changes");
    let progressing = condition(&status, "Progressing");
    assert_eq!(progressing["status"], "Unknown");
    assert_eq!(progressing["reason"], "DeploymentPaused");

    // Paused, it never creates the new ReplicaSet.
    for _ in 0..10 {
        cluster.step();
    }
    assert_eq!(cluster.snapshot.replica_sets.len(), 1);
    assert_eq!(cluster.pod_counts(), (5, 5));

    // Resumed, it rolls out.
    cluster.edit_deployment(|d| d.spec.paused = Some(false));
    cluster.settle();
    assert_eq!(
        cluster
            .replica_set_by_image("flotilla/echo:v2")
            .spec
            .replicas,
        Some(5)
    );
    assert_eq!(
        cluster
            .replica_set_by_image("flotilla/echo:v1")
            .spec
            .replicas,
        Some(0)
    );
}

#[test]
fn scaling_a_completed_deployment_resizes_its_replica_set() {
    let mut cluster = settled(3, json!({}));
    let rs = cluster.replica_sets()[0].clone();
    let name = rs.metadata.name.clone().expect("named");
    cluster.edit_deployment(|d| d.spec.replicas = Some(5));

    let (actions, _) = split_status(reconcile_deployments(&cluster.snapshot));

    let mut scaled = to_json(&rs);
    scaled["spec"]["replicas"] = json!(5);
    scaled["metadata"]["annotations"]["deployment.kubernetes.io/desired-replicas"] = json!("5");
    scaled["metadata"]["annotations"]["deployment.kubernetes.io/max-replicas"] = json!("7");
    assert_eq!(
        actions,
        vec![
            Action::Update(scaled),
            scaling_event(&format!("Scaled up replica set {name} from 3 to 5")),
        ]
    );
    cluster.settle();
    assert_eq!(cluster.pod_counts(), (5, 5));
}

#[test]
fn rolling_back_to_an_old_template_reuses_its_replica_set_with_the_next_revision() {
    let mut cluster = settled(4, json!({}));
    cluster.edit_deployment(|d| set_image(&mut d.spec.template, "flotilla/echo:v2"));
    cluster.settle();
    let first = cluster.replica_set_by_image("flotilla/echo:v1").clone();
    assert_eq!(first.spec.replicas, Some(0));
    let first_name = first.metadata.name.clone().expect("named");

    cluster.edit_deployment(|d| set_image(&mut d.spec.template, "flotilla/echo:v1"));
    let (actions, _) = split_status(reconcile_deployments(&cluster.snapshot));

    let mut reused = to_json(&first);
    reused["spec"]["replicas"] = json!(1);
    reused["metadata"]["annotations"]["deployment.kubernetes.io/revision"] = json!("3");
    reused["metadata"]["annotations"]["deployment.kubernetes.io/revision-history"] = json!("1");
    assert_eq!(
        actions,
        vec![
            Action::Update(reused),
            scaling_event(&format!("Scaled up replica set {first_name} from 0 to 1")),
        ]
    );

    cluster.settle();
    assert_eq!(cluster.snapshot.replica_sets.len(), 2, "no new ReplicaSet");
    let first = cluster.replica_set_by_image("flotilla/echo:v1");
    assert_eq!(first.spec.replicas, Some(4));
    assert_eq!(revision(&first.metadata), 3);
    assert_eq!(
        cluster
            .replica_set_by_image("flotilla/echo:v2")
            .spec
            .replicas,
        Some(0)
    );
    assert_eq!(
        annotation(&cluster.deployment().metadata, REVISION_ANNOTATION),
        Some("3")
    );
}

#[test]
fn a_rollout_without_progress_exceeds_its_deadline_and_auto_rollback_restores_the_previous_template(
) {
    let mut deployment = deployment(3, json!({}));
    deployment.spec.progress_deadline_seconds = Some(30);
    deployment
        .metadata
        .annotations
        .get_or_insert_with(BTreeMap::new)
        .insert(AUTO_ROLLBACK_ANNOTATION.into(), "true".into());
    let mut cluster = Cluster::new(deployment);
    cluster.becomes_ready = unless_broken;
    cluster.settle();
    let good = cluster.replica_set_by_image("flotilla/echo:v1").clone();
    cluster.edit_deployment(|d| set_image(&mut d.spec.template, "broken"));

    // The broken pods never become ready: after 30 s without progress, the deadline passes.
    let mut steps = 0;
    while condition(&cluster.status(), "Progressing")["reason"] != "ProgressDeadlineExceeded" {
        steps += 1;
        assert!(steps < 100, "the deadline never passed");
        cluster.step();
    }
    let status = cluster.status();
    let progressing = condition(&status, "Progressing");
    assert_eq!(progressing["status"], "False");
    let broken_name = cluster
        .replica_set_by_image("broken")
        .metadata
        .name
        .clone()
        .expect("named");
    assert_eq!(
        progressing["message"],
        format!("ReplicaSet \"{broken_name}\" has timed out progressing.")
    );
    assert!(cluster.snapshot.now_ms - NOW >= 30_000);

    // The next pass rolls back to revision 1's template.
    let actions = reconcile_deployments(&cluster.snapshot);
    let mut rolled_back = to_json(cluster.deployment());
    rolled_back["spec"]["template"] = json!({
        "metadata": {"labels": {"app": "web"}},
        "spec": {"containers": [{"name": "web", "image": "flotilla/echo:v1"}]}
    });
    rolled_back["metadata"]["annotations"][ROLLED_BACK_FROM_ANNOTATION] = json!("2");
    assert_eq!(
        actions,
        vec![
            Action::Update(rolled_back),
            Action::Event {
                involved_kind: "Deployment".into(),
                namespace: "default".into(),
                name: "web".into(),
                uid: "d-uid".into(),
                event_type: "Warning".into(),
                reason: "DeploymentRollback".into(),
                message: "Rolled back deployment \"web\" to revision 1: revision 2 exceeded its \
                          progress deadline"
                    .into(),
            },
        ]
    );

    // Revision 1's ReplicaSet becomes revision 3 and takes all pods back; no loop back to 2.
    cluster.settle();
    let good_now = cluster.replica_set_by_image("flotilla/echo:v1");
    assert_eq!(good_now.metadata.uid, good.metadata.uid);
    assert_eq!(good_now.spec.replicas, Some(3));
    assert_eq!(revision(&good_now.metadata), 3);
    assert_eq!(
        cluster.replica_set_by_image("broken").spec.replicas,
        Some(0)
    );
    assert_eq!(
        image_of(Some(&cluster.deployment().spec.template)),
        "flotilla/echo:v1"
    );
    assert_eq!(cluster.pod_counts(), (3, 3));
    let status = cluster.status();
    assert_eq!(
        condition(&status, "Progressing")["reason"],
        "NewReplicaSetAvailable"
    );
}

#[test]
fn auto_rollback_does_not_go_back_to_the_revision_it_rolled_back_from() {
    let mut deployment = deployment(1, json!({}));
    deployment.metadata.annotations = Some(BTreeMap::from([
        (AUTO_ROLLBACK_ANNOTATION.to_string(), "true".to_string()),
        (ROLLED_BACK_FROM_ANNOTATION.to_string(), "2".to_string()),
    ]));
    set_image(&mut deployment.spec.template, "flotilla/echo:old3");
    deployment.status = serde_json::from_value(json!({
        "conditions": [{
            "type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded",
            "lastUpdateTime": iso(NOW), "lastTransitionTime": iso(NOW)
        }]
    }))
    .expect("status parses");
    let snapshot = Snapshot {
        deployments: vec![deployment.clone()],
        replica_sets: vec![
            old_replica_set(2, 0, NOW - 20_000),
            old_replica_set(3, 1, NOW - 10_000),
        ],
        now_ms: NOW,
        ..Snapshot::default()
    };

    let actions = reconcile_deployments(&snapshot);

    let template = to_json(&deployment.spec.template);
    let rolled_back = actions.iter().any(|action| match action {
        Action::Update(object) => {
            object["kind"] == "Deployment" && object["spec"]["template"] != template
        }
        Action::Event { reason, .. } => reason == "DeploymentRollback",
        _ => false,
    });
    assert!(!rolled_back, "{actions:#?}");
}

#[test]
fn fenceposts_round_surge_up_and_unavailability_down() {
    let settings =
        |replicas: i32, strategy: Value| Settings::of(&deployment(replicas, strategy).spec);
    let defaults = settings(10, json!({}));
    assert_eq!((defaults.max_surge, defaults.max_unavailable), (3, 2));
    let ints = settings(
        10,
        json!({"rollingUpdate": {"maxSurge": 2, "maxUnavailable": 0}}),
    );
    assert_eq!((ints.max_surge, ints.max_unavailable), (2, 0));
    let both_zero = settings(
        3,
        json!({"rollingUpdate": {"maxSurge": "10%", "maxUnavailable": "10%"}}),
    );
    assert_eq!((both_zero.max_surge, both_zero.max_unavailable), (1, 0));
    let rounded_to_zero = settings(
        3,
        json!({"rollingUpdate": {"maxSurge": 0, "maxUnavailable": "10%"}}),
    );
    assert_eq!(
        (rounded_to_zero.max_surge, rounded_to_zero.max_unavailable),
        (0, 1)
    );
    let recreate = settings(3, json!({"type": "Recreate"}));
    assert_eq!((recreate.max_surge, recreate.max_unavailable), (0, 0));
}

#[test]
fn the_template_hash_is_stable_short_and_changes_with_the_template() {
    let mut template = deployment(1, json!({})).spec.template;
    let hash = template_hash(&template, 0);
    assert_eq!(hash.len(), TEMPLATE_HASH_LENGTH);
    assert!(hash
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()));
    assert_eq!(template_hash(&template, 0), hash);
    assert_ne!(template_hash(&template, 1), hash);
    set_image(&mut template, "flotilla/echo:v2");
    assert_ne!(template_hash(&template, 0), hash);
    assert_eq!(
        canonical_json(&json!({"b": 1, "a": [{"d": 2, "c": 3}]})),
        r#"{"a":[{"c":3,"d":2}],"b":1}"#
    );
}
