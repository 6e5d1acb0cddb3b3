use serde_json::json;

use super::*;

fn deployment(replicas: i64, rv: Option<&str>) -> Value {
    let mut object = json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "web", "namespace": "default", "uid": "u-1", "labels": {"app": "web"}},
        "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": "web"}},
                 "template": {"metadata": {"labels": {"app": "web"}}, "spec": {"containers": []}}}
    });
    if let Some(rv) = rv {
        metadata_mut(&mut object).insert("resourceVersion".into(), json!(rv));
    }
    object
}

fn key() -> ObjectKey {
    ObjectKey::new("Deployment", "default", "web")
}

fn created(rv: u64) -> Value {
    decide_create(&key(), deployment(1, None), None, true, rv)
        .unwrap()
        .object
        .unwrap()
        .into_value()
}

#[test]
fn create_stamps_resource_version_and_generation_one() {
    let object = created(7);
    assert_eq!(object["metadata"]["resourceVersion"], "7");
    assert_eq!(object["metadata"]["generation"], 1);
}

#[test]
fn creating_an_existing_object_is_already_exists() {
    let existing = created(7);
    let error = decide_create(&key(), deployment(1, None), Some(&existing), true, 8).unwrap_err();
    assert_eq!(error, StoreError::AlreadyExists { key: key() });
}

#[test]
fn creating_in_a_missing_namespace_is_refused() {
    let error = decide_create(&key(), deployment(1, None), None, false, 8).unwrap_err();
    assert!(matches!(error, StoreError::NamespaceNotFound { .. }));
}

#[test]
fn update_with_a_stale_resource_version_is_a_conflict() {
    let existing = created(7);
    let error = decide_update(
        &key(),
        deployment(2, Some("6")),
        UpdatePart::Main,
        Some(&existing),
        true,
        9,
    )
    .unwrap_err();
    assert_eq!(
        error,
        StoreError::Conflict {
            key: key(),
            expected: 6,
            actual: 7
        }
    );
}

#[test]
fn update_with_the_current_or_no_resource_version_succeeds() {
    let existing = created(7);
    for rv in [Some("7"), None] {
        let decision = decide_update(
            &key(),
            deployment(2, rv),
            UpdatePart::Main,
            Some(&existing),
            true,
            9,
        )
        .unwrap();
        assert_eq!(decision.outcome, Outcome::Configured);
        assert_eq!(decision.object.unwrap()["metadata"]["resourceVersion"], "9");
    }
}

#[test]
fn generation_is_bumped_by_spec_changes_only() {
    let existing = created(7);
    let spec_change = decide_update(
        &key(),
        deployment(3, None),
        UpdatePart::Main,
        Some(&existing),
        true,
        8,
    )
    .unwrap();
    assert_eq!(spec_change.object.unwrap()["metadata"]["generation"], 2);

    let mut label_change = deployment(1, None);
    label_change["metadata"]["labels"]["tier"] = json!("front");
    let decision = decide_update(
        &key(),
        label_change,
        UpdatePart::Main,
        Some(&existing),
        true,
        8,
    )
    .unwrap();
    assert_eq!(decision.outcome, Outcome::Configured);
    assert_eq!(decision.object.unwrap()["metadata"]["generation"], 1);

    let mut status = deployment(1, None);
    status["status"] = json!({"replicas": 1});
    let decision =
        decide_update(&key(), status, UpdatePart::Status, Some(&existing), true, 8).unwrap();
    assert_eq!(decision.object.unwrap()["metadata"]["generation"], 1);
}

#[test]
fn a_status_update_leaves_spec_alone_and_a_spec_update_leaves_status_alone() {
    let existing = created(7);
    let mut status_request = deployment(5, None);
    status_request["status"] = json!({"readyReplicas": 1});
    let after_status = decide_update(
        &key(),
        status_request,
        UpdatePart::Status,
        Some(&existing),
        true,
        8,
    )
    .unwrap()
    .object
    .unwrap();
    assert_eq!(
        after_status["spec"]["replicas"], 1,
        "spec must not change through status"
    );
    assert_eq!(after_status["status"]["readyReplicas"], 1);

    let mut spec_request = deployment(4, None);
    spec_request["status"] = json!({"readyReplicas": 99});
    let after_spec = decide_update(
        &key(),
        spec_request,
        UpdatePart::Main,
        Some(&after_status),
        true,
        9,
    )
    .unwrap()
    .object
    .unwrap();
    assert_eq!(after_spec["spec"]["replicas"], 4);
    assert_eq!(
        after_spec["status"]["readyReplicas"], 1,
        "status must not change through update"
    );
}

#[test]
fn server_set_fields_survive_an_update_that_omits_them() {
    let existing = created(7);
    let mut request = deployment(2, None);
    metadata_mut(&mut request).remove("uid");
    let updated = decide_update(&key(), request, UpdatePart::Main, Some(&existing), true, 8)
        .unwrap()
        .object
        .unwrap();
    assert_eq!(updated["metadata"]["uid"], "u-1");
}

#[test]
fn applying_the_same_object_twice_is_unchanged() {
    let existing = created(7);
    let decision = decide_apply(&key(), deployment(1, None), Some(&existing), true, 8).unwrap();
    assert_eq!(decision.outcome, Outcome::Unchanged);
    assert!(decision.mutation.is_none());
    assert_eq!(decision.object.unwrap()["metadata"]["resourceVersion"], "7");
}

#[test]
fn apply_ignores_a_stale_resource_version_in_the_manifest() {
    let existing = created(7);
    let decision =
        decide_apply(&key(), deployment(2, Some("1")), Some(&existing), true, 8).unwrap();
    assert_eq!(decision.outcome, Outcome::Configured);
}

#[test]
fn delete_checks_its_precondition_and_emits_the_last_state() {
    let existing = created(7);
    assert!(matches!(
        decide_delete(&key(), Some(3), Some(&existing), 8),
        Err(StoreError::Conflict { .. })
    ));
    let decision = decide_delete(&key(), Some(7), Some(&existing), 8).unwrap();
    let mutation = decision.mutation.unwrap();
    assert_eq!(mutation.event, EventType::Deleted);
    assert!(mutation.object.is_none());
    assert_eq!(mutation.event_object["metadata"]["resourceVersion"], "8");
    assert!(matches!(
        decide_delete(&key(), None, None, 9),
        Err(StoreError::NotFound { .. })
    ));
}

#[test]
fn the_default_namespace_cannot_be_deleted() {
    let namespace =
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "default"}});
    let error = decide_delete(
        &ObjectKey::new("Namespace", "", "default"),
        None,
        Some(&namespace),
        3,
    )
    .unwrap_err();
    assert!(matches!(error, StoreError::Forbidden { .. }));
}

#[test]
fn validation_names_what_is_wrong() {
    let cases = [
        (
            json!({"apiVersion": "v1", "kind": "Widget", "metadata": {"name": "a"}}),
            "unknown kind \"Widget\"",
        ),
        (
            json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {}}),
            "missing metadata.name",
        ),
        (
            json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "Bad_Name"}}),
            "metadata.name must be",
        ),
        (
            json!({"apiVersion": "v2", "kind": "ConfigMap", "metadata": {"name": "a"}}),
            "apiVersion \"v2\" is not served",
        ),
        (
            json!({"kind": "ConfigMap", "metadata": {"name": "a"}}),
            "missing field \"apiVersion\"",
        ),
        (
            json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "a"}, "data": {"k": 1}}),
            "data.k",
        ),
        (json!("just a string"), "expected a JSON/YAML mapping"),
    ];
    for (mut object, expect) in cases {
        let error = validate(&mut object).unwrap_err().to_string();
        assert!(
            error.contains(expect),
            "{error:?} should contain {expect:?}"
        );
    }
}

#[test]
fn validation_defaults_the_namespace_and_clears_it_for_cluster_scoped_kinds() {
    let mut config_map =
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "a"}});
    let (_, key) = validate(&mut config_map).unwrap();
    assert_eq!(key, ObjectKey::new("ConfigMap", "default", "a"));
    assert_eq!(config_map["metadata"]["namespace"], "default");

    let mut node =
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1", "namespace": "x"}});
    let (_, key) = validate(&mut node).unwrap();
    assert_eq!(key, ObjectKey::new("Node", "", "n1"));
    assert!(node["metadata"].get("namespace").is_none());
}

#[test]
fn an_oversized_object_is_refused() {
    let mut big = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "big"},
                         "data": {"blob": "x".repeat(MAX_OBJECT_BYTES + 1)}});
    let error = validate(&mut big).unwrap_err().to_string();
    assert!(error.contains("more than the limit"), "{error}");
}

#[test]
fn an_object_of_exactly_the_size_limit_is_accepted_and_one_byte_more_is_refused() {
    let mut at_limit = json!({"apiVersion": "v1", "kind": "ConfigMap",
                              "metadata": {"name": "c", "namespace": "default"},
                              "data": {"blob": ""}});
    let overhead = serde_json::to_vec(&at_limit)
        .map(|json| json.len())
        .unwrap_or(0);
    at_limit["data"]["blob"] = json!("x".repeat(MAX_OBJECT_BYTES - overhead));
    assert!(validate(&mut at_limit.clone()).is_ok());
    at_limit["data"]["blob"] = json!(format!("é{}", "x".repeat(MAX_OBJECT_BYTES - overhead - 1)));
    let error = validate(&mut at_limit).unwrap_err().to_string();
    assert!(
        error.contains(&format!("is {} bytes", MAX_OBJECT_BYTES + 1)),
        "{error}"
    );
}

/// `levels` lists, one inside the other, around a string.
fn nested_lists(levels: usize) -> Value {
    let mut value = json!("bottom");
    for _ in 0..levels {
        value = Value::Array(vec![value]);
    }
    value
}

#[test]
fn nesting_depth_counts_lists_and_mappings_but_not_scalars() {
    assert!(!nested_deeper_than(&json!("scalar"), 0));
    assert!(nested_deeper_than(&json!({}), 0));
    assert!(!nested_deeper_than(&json!({"a": [1, {"b": 2}]}), 3));
    assert!(nested_deeper_than(&json!({"a": [1, {"b": {}}]}), 3));
    assert!(!nested_deeper_than(&nested_lists(10), 10));
    assert!(nested_deeper_than(&nested_lists(11), 10));
}

#[test]
fn an_object_nested_too_deep_is_refused_and_one_at_the_limit_is_not() {
    let object = |levels: usize| {
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "deep"},
               "extra": nested_lists(levels)})
    };
    validate(&mut object(MAX_OBJECT_DEPTH - 1)).unwrap();
    let error = validate(&mut object(MAX_OBJECT_DEPTH))
        .unwrap_err()
        .to_string();
    assert!(
        error.contains(&format!(
            "ConfigMap \"deep\" is nested more than {MAX_OBJECT_DEPTH} levels deep"
        )),
        "{error}"
    );
}

#[test]
fn pod_cidrs_are_the_first_free_slash_24() {
    assert_eq!(
        pick_pod_cidr("10.244", []),
        Some("10.244.0.0/24".to_string())
    );
    assert_eq!(
        pick_pod_cidr("10.244", ["10.244.0.0/24", "10.244.2.0/24"]),
        Some("10.244.1.0/24".to_string())
    );
    let all: Vec<String> = (0..=255).map(|i| format!("10.244.{i}.0/24")).collect();
    assert_eq!(
        pick_pod_cidr("10.244", all.iter().map(String::as_str)),
        None
    );
    assert_eq!(
        cluster_cidr_prefix("10.130.0.0/16").as_deref(),
        Some("10.130")
    );
    assert_eq!(cluster_cidr_prefix("10.130.1.0/16"), None);
    assert_eq!(cluster_cidr_prefix("10.130.0.0/24"), None);
    assert_eq!(cluster_cidr_prefix("banana"), None);
}

fn stored_pod(rv: u64, node: Option<&str>) -> Value {
    let mut pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "web-1", "namespace": "default", "uid": "u-2", "generation": 1,
                     "resourceVersion": rv.to_string()},
        "spec": {"containers": [{"name": "c", "image": "flotilla/echo:latest"}]},
        "status": {"phase": "Pending"},
    });
    if let Some(node) = node {
        pod["spec"]["nodeName"] = json!(node);
    }
    pod
}

fn pod_key() -> ObjectKey {
    ObjectKey::new("Pod", "default", "web-1")
}

#[test]
fn a_binding_sets_the_node_of_the_stored_pod_and_nothing_else() {
    let existing = stored_pod(5, None);
    let decision = decide_bind(&pod_key(), 5, "n2", Some(&existing), 9).unwrap();
    assert_eq!(decision.outcome, Outcome::Configured);
    let bound = decision.object.unwrap().into_value();
    let mut expected = existing.clone();
    expected["spec"]["nodeName"] = json!("n2");
    expected["metadata"]["resourceVersion"] = json!("9");
    expected["metadata"]["generation"] = json!(2);
    assert_eq!(bound, expected);
    let mutation = decision.mutation.unwrap();
    assert_eq!(mutation.event, EventType::Modified);
    assert_eq!(mutation.object.unwrap().into_value(), expected);
}

#[test]
fn a_binding_of_a_changed_missing_or_already_bound_pod_is_refused() {
    let stale = decide_bind(&pod_key(), 4, "n2", Some(&stored_pod(5, None)), 9);
    assert!(
        matches!(
            stale,
            Err(StoreError::Conflict {
                expected: 4,
                actual: 5,
                ..
            })
        ),
        "{stale:?}"
    );
    let missing = decide_bind(&pod_key(), 5, "n2", None, 9);
    assert!(
        matches!(missing, Err(StoreError::NotFound { .. })),
        "{missing:?}"
    );
    let bound = decide_bind(&pod_key(), 5, "n2", Some(&stored_pod(5, Some("n1"))), 9);
    match bound {
        Err(StoreError::Invalid { reason }) => {
            assert!(
                reason.contains("already assigned to node \"n1\""),
                "{reason}"
            )
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    let bad_node = decide_bind(&pod_key(), 5, "Not A Node!", Some(&stored_pod(5, None)), 9);
    assert!(
        matches!(bad_node, Err(StoreError::Invalid { .. })),
        "{bad_node:?}"
    );
    let not_a_pod = decide_bind(&key(), 5, "n2", Some(&created(5)), 9);
    assert!(
        matches!(not_a_pod, Err(StoreError::Invalid { .. })),
        "{not_a_pod:?}"
    );
}
