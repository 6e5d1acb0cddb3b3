use serde_json::json;

use super::*;

fn object(labels: Value) -> Value {
    json!({"kind": "Pod", "metadata": {"name": "web-1", "namespace": "prod", "labels": labels}, "spec": {"nodeName": "n1"}})
}

fn check(selector: &str, labels: Value, expect: bool) {
    let parsed = LabelSelector::parse(selector).unwrap_or_else(|e| panic!("{selector}: {e}"));
    assert_eq!(
        parsed.matches(&object(labels.clone())),
        expect,
        "{selector} on {labels}"
    );
}

#[test]
fn every_label_operator_selects_as_in_kubernetes() {
    check("app=web", json!({"app": "web"}), true);
    check("app=web", json!({"app": "db"}), false);
    check("app==web", json!({"app": "web"}), true);
    check("app!=web", json!({"app": "db"}), true);
    check("app!=web", json!({}), true);
    check("app!=web", json!({"app": "web"}), false);
    check("tier in (front, back)", json!({"tier": "back"}), true);
    check("tier in (front,back)", json!({"tier": "cache"}), false);
    check("tier in (front)", json!({}), false);
    check("tier notin (front,back)", json!({"tier": "cache"}), true);
    check("tier notin (front,back)", json!({}), true);
    check("tier notin (front,back)", json!({"tier": "front"}), false);
    check("app", json!({"app": ""}), true);
    check("app", json!({}), false);
    check("!app", json!({}), true);
    check("!app", json!({"app": "web"}), false);
    check(
        "app=web,tier in (front,back),!canary",
        json!({"app": "web", "tier": "front"}),
        true,
    );
    check(
        "app=web,tier in (front,back),!canary",
        json!({"app": "web", "tier": "front", "canary": "1"}),
        false,
    );
    check("", json!({}), true);
}

#[test]
fn malformed_label_selectors_are_refused() {
    for bad in [
        "app=we b",
        "tier in front",
        "tier in (a",
        ",",
        "app=web,",
        "a b c",
        "app=@",
    ] {
        assert!(
            LabelSelector::parse(bad).is_err(),
            "{bad} should be refused"
        );
    }
}

#[test]
fn field_selectors_match_name_namespace_and_pod_fields() {
    let pod = object(json!({}));
    let matches = |s: &str| FieldSelector::parse("Pod", s).unwrap().matches(&pod);
    assert!(matches("metadata.name=web-1"));
    assert!(matches("metadata.name==web-1,metadata.namespace=prod"));
    assert!(!matches("metadata.namespace!=prod"));
    assert!(matches("spec.nodeName=n1"));
    assert!(!matches("spec.nodeName=n2"));
}

#[test]
fn field_selectors_on_unsupported_fields_are_refused() {
    let error = FieldSelector::parse("ConfigMap", "spec.nodeName=n1").unwrap_err();
    assert!(
        matches!(error, SelectorError::UnsupportedField { .. }),
        "{error}"
    );
    assert!(FieldSelector::parse("Pod", "metadata.name").is_err());
}
