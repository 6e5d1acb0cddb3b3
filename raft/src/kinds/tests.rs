use serde_json::json;

use super::*;

#[test]
fn kinds_are_found_by_kind_plural_and_short_name() {
    for name in ["Pod", "pods", "pod", "po", "PODS"] {
        assert_eq!(lookup(name).map(|k| k.kind), Some("Pod"), "{name}");
    }
    assert_eq!(lookup("deploy").map(|k| k.kind), Some("Deployment"));
    assert_eq!(lookup("svc").map(|k| k.kind), Some("Service"));
    assert_eq!(lookup("ns").map(|k| k.kind), Some("Namespace"));
    assert!(lookup("widgets").is_none());
}

#[test]
fn a_wrongly_typed_field_is_refused_with_its_path() {
    let deployment = json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "web"},
        "spec": {"replicas": "three", "selector": {}, "template": {}}
    });
    let error = by_kind("Deployment")
        .unwrap()
        .check_types(&deployment)
        .unwrap_err();
    assert!(error.starts_with("spec.replicas"), "{error}");
}

#[test]
fn a_well_typed_object_parses() {
    let pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "p", "labels": {"app": "x"}},
        "spec": {"containers": [{"name": "c", "image": "flotilla/busybox:latest"}]}
    });
    by_kind("Pod").unwrap().check_types(&pod).unwrap();
}

#[test]
fn scopes_follow_kubernetes() {
    assert!(!by_kind("Node").unwrap().namespaced);
    assert!(!by_kind("Namespace").unwrap().namespaced);
    assert!(!by_kind("PersistentVolume").unwrap().namespaced);
    assert!(by_kind("ConfigMap").unwrap().namespaced);
    assert!(!by_kind("ConfigMap").unwrap().has_status);
}
