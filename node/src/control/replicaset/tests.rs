use std::sync::Arc;

use serde_json::{json, Value};

use super::*;

/// 2026-01-01T00:00:00Z.
const NOW: i64 = 1_767_225_600_000;

fn iso(ms: i64) -> String {
    jiff::Timestamp::from_millisecond(ms)
        .expect("timestamp")
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

fn replica_set(replicas: i32, min_ready_seconds: i32) -> ReplicaSet {
    serde_json::from_value(json!({
        "apiVersion": "apps/v1", "kind": "ReplicaSet",
        "metadata": {
            "name": "web-abc", "namespace": "default", "uid": "rs-uid",
            "resourceVersion": "10", "generation": 2
        },
        "spec": {
            "replicas": replicas,
            "minReadySeconds": min_ready_seconds,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web", "tier": "front"}},
                "spec": {"containers": [{"name": "web", "image": "flotilla/echo:latest"}]}
            }
        }
    }))
    .expect("replica set parses")
}

/// A pod of `web-abc`: scheduled to `node` when given, in `phase`, Ready since `ready_since`
/// when given, created at `created`.
fn pod(
    name: &str,
    node: Option<&str>,
    phase: &str,
    ready_since: Option<i64>,
    created: i64,
) -> Value {
    let conditions = match ready_since {
        Some(since) => {
            json!([{"type": "Ready", "status": "True", "lastTransitionTime": iso(since)}])
        }
        None => json!([{"type": "Ready", "status": "False", "lastTransitionTime": iso(created)}]),
    };
    let mut spec = json!({"containers": [{"name": "web", "image": "flotilla/echo:latest"}]});
    if let Some(node) = node {
        spec["nodeName"] = json!(node);
    }
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": name, "namespace": "default", "uid": format!("uid-{name}"),
            "resourceVersion": format!("rv-{name}"), "creationTimestamp": iso(created),
            "labels": {"app": "web", "tier": "front"},
            "ownerReferences": [{
                "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-abc",
                "uid": "rs-uid", "controller": true, "blockOwnerDeletion": true
            }]
        },
        "spec": spec,
        "status": {"phase": phase, "conditions": conditions}
    })
}

fn parse_pod(value: Value) -> Pod {
    serde_json::from_value(value).expect("pod parses")
}

fn ready_pod(name: &str, ready_since: i64) -> Pod {
    parse_pod(pod(
        name,
        Some("node-1"),
        "Running",
        Some(ready_since),
        ready_since - 5_000,
    ))
}

fn snapshot(replica_sets: Vec<ReplicaSet>, pods: Vec<Pod>) -> Snapshot {
    Snapshot {
        replica_sets,
        pods: pods.into_iter().map(Arc::new).collect(),
        now_ms: NOW,
        ..Snapshot::default()
    }
}

fn with_status(replica_set: &ReplicaSet, status: Value) -> Value {
    let mut value = serde_json::to_value(replica_set).expect("serializes");
    value["status"] = status;
    value
}

fn event(reason: &str, message: String) -> Action {
    Action::Event {
        involved_kind: "ReplicaSet".into(),
        namespace: "default".into(),
        name: "web-abc".into(),
        uid: "rs-uid".into(),
        event_type: "Normal".into(),
        reason: reason.into(),
        message,
    }
}

fn delete(name: &str) -> Action {
    Action::Delete {
        kind: "Pod".into(),
        namespace: "default".into(),
        name: name.into(),
        resource_version: Some(format!("rv-{name}")),
    }
}

fn created_names(actions: &[Action]) -> Vec<String> {
    actions
        .iter()
        .filter_map(|action| match action {
            Action::Create(object) => object["metadata"]["name"].as_str().map(String::from),
            _ => None,
        })
        .collect()
}

#[test]
fn scaling_up_from_zero_creates_the_missing_pods_from_the_template_owned_by_the_replica_set() {
    let rs = replica_set(3, 0);
    let snapshot = snapshot(vec![rs.clone()], vec![]);

    let actions = reconcile_replica_sets(&snapshot);

    let names = created_names(&actions);
    assert_eq!(names.len(), 3);
    for name in &names {
        let suffix = name
            .strip_prefix("web-abc-")
            .expect("named after the replica set");
        assert_eq!(suffix.len(), 5, "{name}");
        assert!(suffix.bytes().all(|b| SAFE_ALPHABET.contains(&b)), "{name}");
    }
    let mut expected = Vec::new();
    for name in &names {
        expected.push(Action::Create(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {
                "name": name, "generateName": "web-abc-", "namespace": "default",
                "labels": {"app": "web", "tier": "front"},
                "ownerReferences": [{
                    "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-abc",
                    "uid": "rs-uid", "controller": true, "blockOwnerDeletion": true
                }]
            },
            "spec": {"containers": [{"name": "web", "image": "flotilla/echo:latest"}]}
        })));
        expected.push(event("SuccessfulCreate", format!("Created pod: {name}")));
    }
    expected.push(Action::UpdateStatus(with_status(
        &rs,
        json!({"replicas": 0, "observedGeneration": 2}),
    )));
    assert_eq!(actions, expected);
    assert_eq!(
        reconcile_replica_sets(&snapshot),
        actions,
        "same snapshot, same actions"
    );
}

#[test]
fn generated_pod_names_avoid_names_already_taken_and_each_other() {
    let first = generated_names("web-abc-", "rs-uid", NOW, 3, &BTreeSet::new());
    let taken: BTreeSet<&str> = first.iter().map(String::as_str).collect();
    let second = generated_names("web-abc-", "rs-uid", NOW, 3, &taken);

    assert_eq!(BTreeSet::from_iter(first.iter()).len(), 3);
    assert!(second.iter().all(|name| !taken.contains(name.as_str())));
    assert_eq!(BTreeSet::from_iter(second.iter()).len(), 3);
    assert_ne!(
        generated_names("web-abc-", "rs-uid", NOW + 1, 1, &BTreeSet::new()),
        first[..1]
    );
}

#[test]
fn generated_name_prefixes_are_cut_like_generate_name() {
    let long = "a".repeat(70);
    assert_eq!(generate_name_prefix(&long), "a".repeat(58));
    assert_eq!(generate_name_prefix("web-abc"), "web-abc-");
}

#[test]
fn scaling_down_deletes_unscheduled_then_pending_then_not_ready_then_newest_ready_pods() {
    let old = NOW - 3_600_000;
    let pods = vec![
        // The one kept: ready the longest, oldest, no restarts.
        pod("keep", Some("n1"), "Running", Some(old), old - 1_000),
        pod(
            "ready-recently",
            Some("n1"),
            "Running",
            Some(NOW - 60_000),
            old - 1_000,
        ),
        pod("not-ready", Some("n1"), "Running", None, old),
        pod("pending", Some("n1"), "Pending", None, old),
        pod("unscheduled", None, "Pending", None, old),
        pod("newer", Some("n1"), "Running", Some(old), old),
        {
            let mut restarted = pod("restarted", Some("n1"), "Running", Some(old), old - 1_000);
            restarted["status"]["containerStatuses"] = json!([{
                "name": "web", "image": "flotilla/echo:latest", "imageID": "",
                "ready": true, "restartCount": 2
            }]);
            restarted
        },
    ];
    let rs = replica_set(1, 0);
    let snapshot = snapshot(vec![rs], pods.into_iter().map(parse_pod).collect());

    let actions = reconcile_replica_sets(&snapshot);

    let deletes: Vec<Action> = actions
        .iter()
        .filter(|action| !matches!(action, Action::UpdateStatus(_)))
        .cloned()
        .collect();
    let mut expected = Vec::new();
    for name in [
        "unscheduled",
        "pending",
        "not-ready",
        "ready-recently",
        "restarted",
        "newer",
    ] {
        expected.push(delete(name));
        expected.push(event("SuccessfulDelete", format!("Deleted pod: {name}")));
    }
    assert_eq!(deletes, expected);
}

#[test]
fn status_counts_ready_pods_and_available_ones_only_after_min_ready_seconds() {
    let rs = replica_set(4, 10);
    let mut unlabeled = pod(
        "unlabeled",
        Some("n1"),
        "Running",
        Some(NOW - 20_000),
        NOW - 30_000,
    );
    unlabeled["metadata"]["labels"] = json!({"app": "web"});
    let mut terminating = pod(
        "terminating",
        Some("n1"),
        "Running",
        Some(NOW - 20_000),
        NOW - 30_000,
    );
    terminating["metadata"]["deletionTimestamp"] = json!(iso(NOW));
    let pods = vec![
        ready_pod("available", NOW - 20_000),
        ready_pod("just-ready", NOW - 5_000),
        parse_pod(pod("starting", Some("n1"), "Running", None, NOW - 2_000)),
        parse_pod(unlabeled),
        parse_pod(pod("done", Some("n1"), "Succeeded", None, NOW - 60_000)),
        parse_pod(terminating),
    ];
    let snapshot = snapshot(vec![rs.clone()], pods);

    let actions = reconcile_replica_sets(&snapshot);

    assert_eq!(
        actions,
        vec![Action::UpdateStatus(with_status(
            &rs,
            json!({
                "replicas": 4, "fullyLabeledReplicas": 3, "readyReplicas": 3,
                "availableReplicas": 2, "observedGeneration": 2
            }),
        ))]
    );
}

#[test]
fn a_replica_set_at_its_size_with_an_up_to_date_status_needs_nothing() {
    let mut rs = replica_set(2, 0);
    rs.status = serde_json::from_value(json!({
        "replicas": 2, "fullyLabeledReplicas": 2, "readyReplicas": 2,
        "availableReplicas": 2, "observedGeneration": 2
    }))
    .expect("status parses");
    let pods = vec![ready_pod("a", NOW - 60_000), ready_pod("b", NOW - 60_000)];

    assert_eq!(reconcile_replica_sets(&snapshot(vec![rs], pods)), vec![]);
}

#[test]
fn pods_of_other_owners_namespaces_or_labels_do_not_count() {
    let mut other_owner = pod(
        "other-owner",
        Some("n1"),
        "Running",
        Some(NOW - 60_000),
        NOW,
    );
    other_owner["metadata"]["ownerReferences"][0]["uid"] = json!("other-uid");
    let mut not_controller = pod(
        "not-controller",
        Some("n1"),
        "Running",
        Some(NOW - 60_000),
        NOW,
    );
    not_controller["metadata"]["ownerReferences"][0]["controller"] = json!(false);
    let mut other_namespace = pod(
        "other-namespace",
        Some("n1"),
        "Running",
        Some(NOW - 60_000),
        NOW,
    );
    other_namespace["metadata"]["namespace"] = json!("prod");
    let mut relabeled = pod("relabeled", Some("n1"), "Running", Some(NOW - 60_000), NOW);
    relabeled["metadata"]["labels"] = json!({"app": "api", "tier": "front"});
    let pods = vec![
        ready_pod("mine", NOW - 60_000),
        parse_pod(other_owner),
        parse_pod(not_controller),
        parse_pod(other_namespace),
        parse_pod(relabeled),
    ];
    let snapshot = snapshot(vec![replica_set(2, 0)], pods);

    let actions = reconcile_replica_sets(&snapshot);

    assert_eq!(created_names(&actions).len(), 1);
    let status = actions.iter().find_map(|action| match action {
        Action::UpdateStatus(object) => Some(object["status"]["replicas"].clone()),
        _ => None,
    });
    assert_eq!(status, Some(json!(1)));
}

#[test]
fn no_more_than_a_burst_of_pods_is_created_in_one_pass() {
    let snapshot = snapshot(vec![replica_set(600, 0)], vec![]);

    assert_eq!(
        created_names(&reconcile_replica_sets(&snapshot)).len(),
        BURST_REPLICAS
    );
}

#[test]
fn a_replica_set_being_deleted_creates_no_pods() {
    let mut rs = replica_set(2, 0);
    rs.metadata.deletion_timestamp = api_time(NOW);

    let actions = reconcile_replica_sets(&snapshot(vec![rs], vec![]));

    assert!(actions
        .iter()
        .all(|action| matches!(action, Action::UpdateStatus(_))));
}

#[test]
fn selectors_match_labels_and_in_notin_exists_doesnotexist_expressions() {
    let selector: LabelSelector = serde_json::from_value(json!({
        "matchLabels": {"app": "web"},
        "matchExpressions": [
            {"key": "tier", "operator": "In", "values": ["front", "edge"]},
            {"key": "track", "operator": "NotIn", "values": ["canary"]},
            {"key": "team", "operator": "Exists"},
            {"key": "legacy", "operator": "DoesNotExist"}
        ]
    }))
    .expect("selector parses");
    let labels = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    let base = [("app", "web"), ("tier", "edge"), ("team", "a")];

    assert!(selector_matches(&selector, Some(&labels(&base))));
    assert!(selector_matches(
        &selector,
        Some(&labels(&[
            ("app", "web"),
            ("tier", "front"),
            ("team", "a"),
            ("track", "stable")
        ]))
    ));
    assert!(!selector_matches(
        &selector,
        Some(&labels(&[("app", "web"), ("tier", "back"), ("team", "a")]))
    ));
    assert!(!selector_matches(
        &selector,
        Some(&labels(&[
            ("app", "web"),
            ("tier", "edge"),
            ("team", "a"),
            ("track", "canary")
        ]))
    ));
    assert!(!selector_matches(
        &selector,
        Some(&labels(&[("app", "web"), ("tier", "edge")]))
    ));
    assert!(!selector_matches(
        &selector,
        Some(&labels(&[
            ("app", "web"),
            ("tier", "edge"),
            ("team", "a"),
            ("legacy", "1")
        ]))
    ));
    assert!(!selector_matches(&selector, None));
    assert!(selector_matches(&LabelSelector::default(), None));
    let unknown: LabelSelector = serde_json::from_value(json!({
        "matchExpressions": [{"key": "app", "operator": "Near", "values": ["web"]}]
    }))
    .expect("selector parses");
    assert!(!selector_matches(&unknown, Some(&labels(&base))));
}
