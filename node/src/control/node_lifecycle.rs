//! Node lifecycle: a node whose heartbeats stop for longer than the grace period becomes
//! Ready=Unknown and is tainted unreachable, and its pods are deleted so that their owners
//! replace them elsewhere (Kubernetes waits ~5 minutes by default; we do not). When its
//! heartbeats resume the taints are lifted. The returning agent finds its pods gone and removes
//! their containers.

use k8s_openapi::api::core::v1::{Node, Pod};
use serde_json::{json, Value};

use super::{Action, Snapshot};

/// The taint key Kubernetes uses for a node whose status is unknown.
pub const UNREACHABLE_TAINT: &str = "node.kubernetes.io/unreachable";

fn rfc3339_ms(text: &str) -> Option<i64> {
    text.parse::<jiff::Timestamp>()
        .ok()
        .map(|t| t.as_millisecond())
}

fn ready_condition(node: &Node) -> Option<(String, Option<i64>)> {
    let condition = node
        .status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "Ready")?;
    let heartbeat = condition
        .last_heartbeat_time
        .as_ref()
        .and_then(|t| rfc3339_ms(&t.0.to_string()));
    Some((condition.status.clone(), heartbeat))
}

fn has_unreachable_taint(node: &Node) -> bool {
    node.spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .is_some_and(|taints| taints.iter().any(|t| t.key == UNREACHABLE_TAINT))
}

fn node_value(node: &Node) -> Value {
    let mut value = serde_json::to_value(node).unwrap_or_default();
    value["apiVersion"] = json!("v1");
    value["kind"] = json!("Node");
    value
}

fn pod_is_terminal(pod: &Pod) -> bool {
    matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    )
}

/// Decides the lifecycle actions for every node, with `grace_ms` of missed heartbeats allowed.
/// A node was last seen at the later of its heartbeat as this leader heard it
/// (`snapshot.heartbeats`) and the `lastHeartbeatTime` of its stored status. A node is judged
/// only by what this leader could have seen: anything older than `leading_since_ms` counts as
/// arriving then, because a new leader starts with no heartbeats in memory and during an
/// election heartbeats fail for a moment; it must not take that for silence.
pub fn reconcile_nodes(snapshot: &Snapshot, grace_ms: i64, leading_since_ms: i64) -> Vec<Action> {
    let mut actions = Vec::new();
    let now = jiff::Timestamp::from_millisecond(snapshot.now_ms)
        .map(|t| t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string())
        .unwrap_or_default();
    for node in &snapshot.nodes {
        let name = node.metadata.name.clone().unwrap_or_default();
        let Some((status, heartbeat_ms)) = ready_condition(node) else {
            continue;
        };
        let heard_ms = snapshot.heartbeats.get(&name).copied();
        let last_seen_ms = heartbeat_ms
            .max(heard_ms)
            .unwrap_or(i64::MIN)
            .max(leading_since_ms);
        let silent = snapshot.now_ms.saturating_sub(last_seen_ms) > grace_ms;
        let tainted = has_unreachable_taint(node);
        if silent {
            if status == "True" {
                let mut value = node_value(node);
                if let Some(conditions) = value
                    .pointer_mut("/status/conditions")
                    .and_then(Value::as_array_mut)
                {
                    for condition in conditions.iter_mut().filter(|c| c["type"] == "Ready") {
                        condition["status"] = json!("Unknown");
                        condition["reason"] = json!("NodeStatusUnknown");
                        condition["message"] = json!("Flotilla agent stopped posting node status.");
                        condition["lastTransitionTime"] = json!(now);
                    }
                }
                actions.push(Action::UpdateStatus(value));
                actions.push(Action::Event {
                    involved_kind: "Node".into(),
                    namespace: "default".into(),
                    name: name.clone(),
                    uid: node.metadata.uid.clone().unwrap_or_default(),
                    event_type: "Normal".into(),
                    reason: "NodeNotReady".into(),
                    message: format!("Node {name} status is now: NodeNotReady"),
                });
            }
            if !tainted {
                let mut value = node_value(node);
                let taints = value["spec"]["taints"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                let mut taints = taints;
                for effect in ["NoSchedule", "NoExecute"] {
                    taints.push(
                        json!({"key": UNREACHABLE_TAINT, "effect": effect, "timeAdded": now}),
                    );
                }
                value["spec"]["taints"] = Value::Array(taints);
                actions.push(Action::Update(value));
            }
            // Its pods are replaced elsewhere by their owners.
            for pod in snapshot.pods.iter().filter(|p| {
                p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(name.as_str())
                    && !pod_is_terminal(p)
            }) {
                actions.push(Action::Delete {
                    kind: "Pod".into(),
                    namespace: pod.metadata.namespace.clone().unwrap_or_default(),
                    name: pod.metadata.name.clone().unwrap_or_default(),
                    resource_version: pod.metadata.resource_version.clone(),
                });
            }
        } else if tainted && status == "True" {
            let mut value = node_value(node);
            let taints: Vec<Value> = value["spec"]["taints"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .filter(|t| t["key"] != UNREACHABLE_TAINT)
                .collect();
            value["spec"]["taints"] = Value::Array(taints);
            actions.push(Action::Update(value));
        }
    }
    actions
}

#[cfg(test)]
mod tests;
