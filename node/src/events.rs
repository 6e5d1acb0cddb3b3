//! Event objects (`v1/Event`), as the kubelet and the controllers record them.

use serde_json::{json, Value};

/// What an event is about and what it says.
#[derive(Debug, Clone)]
pub struct EventSpec<'a> {
    pub involved_kind: &'a str,
    pub involved_api_version: &'a str,
    pub namespace: &'a str,
    pub name: &'a str,
    pub uid: &'a str,
    /// `Normal` or `Warning`.
    pub event_type: &'a str,
    pub reason: &'a str,
    pub message: &'a str,
    /// `kubelet`, `default-scheduler`, `deployment-controller`, ...
    pub component: &'a str,
    pub host: &'a str,
}

/// The Event object `event_name` seen `count` times since `first_seen`, last at `now`.
pub fn event_object(
    spec: &EventSpec<'_>,
    event_name: &str,
    count: u64,
    first_seen: &str,
    now: &str,
) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Event",
        "metadata": {"name": event_name, "namespace": spec.namespace,
                     "uid": uuid::Uuid::new_v4().to_string(), "creationTimestamp": first_seen},
        "involvedObject": {"kind": spec.involved_kind, "name": spec.name, "namespace": spec.namespace,
                           "uid": spec.uid, "apiVersion": spec.involved_api_version},
        "reason": spec.reason, "message": spec.message, "type": spec.event_type, "count": count,
        "firstTimestamp": first_seen, "lastTimestamp": now,
        "source": {"component": spec.component, "host": spec.host},
        "reportingComponent": spec.component, "reportingInstance": spec.host,
    })
}

/// A fresh name for an event about `name`, as Kubernetes makes them.
pub fn event_name(name: &str) -> String {
    format!(
        "{name}.{}",
        &uuid::Uuid::new_v4().simple().to_string()[..16]
    )
}
