use std::sync::Arc;

use serde_json::json;

use super::*;

const NOW: &str = "2026-01-01T00:01:00Z";
/// A leader that took over long before the snapshot.
const LED_LONG_AGO: i64 = 0;

fn ms(text: &str) -> i64 {
    rfc3339_ms(text).expect("timestamp")
}

fn node(name: &str, ready: &str, heartbeat: &str, taints: serde_json::Value) -> Node {
    serde_json::from_value(json!({
        "metadata": {"name": name, "uid": format!("uid-{name}"), "resourceVersion": "5"},
        "spec": {"taints": taints},
        "status": {"conditions": [{"type": "Ready", "status": ready, "lastHeartbeatTime": heartbeat}]}
    }))
    .expect("node")
}

fn pod(name: &str, node: &str, phase: &str) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": "default", "resourceVersion": "9"},
        "spec": {"nodeName": node, "containers": []},
        "status": {"phase": phase}
    }))
    .expect("pod")
}

fn snapshot(nodes: Vec<Node>, pods: Vec<Pod>) -> Snapshot {
    Snapshot {
        nodes: nodes.into_iter().map(Arc::new).collect(),
        pods: pods.into_iter().map(Arc::new).collect(),
        now_ms: ms(NOW),
        ..Default::default()
    }
}

#[test]
fn a_node_with_fresh_heartbeats_is_left_alone() {
    let snapshot = snapshot(
        vec![node("n1", "True", "2026-01-01T00:00:58Z", json!([]))],
        vec![pod("p", "n1", "Running")],
    );
    assert_eq!(reconcile_nodes(&snapshot, 4_000, LED_LONG_AGO), vec![]);
}

#[test]
fn a_silent_node_turns_unknown_is_tainted_and_loses_its_pods() {
    let snapshot = snapshot(
        vec![node("n1", "True", "2026-01-01T00:00:50Z", json!([]))],
        vec![
            pod("p", "n1", "Running"),
            pod("done", "n1", "Succeeded"),
            pod("q", "n2", "Running"),
        ],
    );
    let actions = reconcile_nodes(&snapshot, 4_000, LED_LONG_AGO);
    assert!(
        matches!(&actions[0], Action::UpdateStatus(v) if v["status"]["conditions"][0]["status"] == "Unknown")
    );
    assert!(matches!(&actions[1], Action::Event { reason, .. } if reason == "NodeNotReady"));
    assert!(
        matches!(&actions[2], Action::Update(v) if v["spec"]["taints"][1]["effect"] == "NoExecute")
    );
    assert_eq!(
        actions[3],
        Action::Delete {
            kind: "Pod".into(),
            namespace: "default".into(),
            name: "p".into(),
            resource_version: Some("9".into())
        }
    );
    assert_eq!(actions.len(), 4, "terminal pods and pods elsewhere stay");
}

#[test]
fn a_node_that_reports_again_loses_the_unreachable_taint() {
    let taints = json!([{"key": UNREACHABLE_TAINT, "effect": "NoExecute"}, {"key": "dedicated", "effect": "NoSchedule"}]);
    let snapshot = snapshot(
        vec![node("n1", "True", "2026-01-01T00:00:59Z", taints)],
        vec![],
    );
    let actions = reconcile_nodes(&snapshot, 4_000, LED_LONG_AGO);
    assert_eq!(actions.len(), 1);
    let Action::Update(value) = &actions[0] else {
        panic!("expected an update")
    };
    assert_eq!(
        value["spec"]["taints"],
        json!([{"key": "dedicated", "effect": "NoSchedule"}])
    );
}

#[test]
fn a_new_leader_gives_every_node_a_full_grace_period_before_judging_it() {
    let snapshot = snapshot(
        vec![node("n1", "True", "2026-01-01T00:00:50Z", json!([]))],
        vec![pod("p", "n1", "Running")],
    );
    // Leading for 2 s: the heartbeats that failed during the election are not silence yet.
    assert_eq!(reconcile_nodes(&snapshot, 4_000, ms(NOW) - 2_000), vec![]);
    // Leading for 5 s with no heartbeat since: now the node is silent.
    assert!(!reconcile_nodes(&snapshot, 4_000, ms(NOW) - 5_000).is_empty());
}

#[test]
fn a_node_the_leader_heard_recently_is_left_alone_though_its_stored_status_is_old() {
    let mut snapshot = snapshot(
        vec![node("n1", "True", "2026-01-01T00:00:10Z", json!([]))],
        vec![pod("p", "n1", "Running")],
    );
    snapshot
        .heartbeats
        .insert("n1".into(), ms("2026-01-01T00:00:59Z"));
    assert_eq!(reconcile_nodes(&snapshot, 4_000, LED_LONG_AGO), vec![]);
}

#[test]
fn a_node_whose_heartbeats_to_the_leader_stopped_loses_its_pods() {
    let mut snapshot = snapshot(
        vec![node("n1", "True", "2026-01-01T00:00:10Z", json!([]))],
        vec![pod("p", "n1", "Running")],
    );
    snapshot
        .heartbeats
        .insert("n1".into(), ms("2026-01-01T00:00:55Z"));
    let actions = reconcile_nodes(&snapshot, 4_000, LED_LONG_AGO);
    assert!(actions
        .iter()
        .any(|action| matches!(action, Action::Delete { name, .. } if name == "p")));
}
