//! The LoadBalancer status controller, the on-premises part of a cloud controller manager: a
//! `LoadBalancer` Service is served on its port by the proxy of every node, so its
//! `status.loadBalancer.ingress` lists the InternalIP of every Ready node, sorted. A Service of
//! another type that still carries ingress addresses (it was a LoadBalancer) has them removed.
//! Pure and level-driven: the status is written only when it differs from the desired one.

use std::borrow::Borrow;
use std::collections::BTreeSet;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{LoadBalancerIngress, LoadBalancerStatus, Node};

use super::replicaset::to_object;
use super::{Action, Snapshot};

/// Updates the `status.loadBalancer` of every Service whose addresses are not the desired ones.
pub fn reconcile_load_balancers(snapshot: &Snapshot) -> Vec<Action> {
    let addresses = ready_node_addresses(&snapshot.nodes);
    let mut actions = Vec::new();
    for service in &snapshot.services {
        let is_load_balancer =
            service.spec.as_ref().and_then(|spec| spec.type_.as_deref()) == Some("LoadBalancer");
        let desired: Vec<LoadBalancerIngress> = if is_load_balancer {
            addresses
                .iter()
                .map(|ip| LoadBalancerIngress {
                    ip: Some(ip.to_string()),
                    ..Default::default()
                })
                .collect()
        } else {
            Vec::new()
        };
        let current = service
            .status
            .as_ref()
            .and_then(|status| status.load_balancer.as_ref())
            .and_then(|balancer| balancer.ingress.clone())
            .unwrap_or_default();
        if current == desired {
            continue;
        }
        let mut updated = service.clone();
        updated
            .status
            .get_or_insert_with(Default::default)
            .load_balancer = Some(LoadBalancerStatus {
            ingress: (!desired.is_empty()).then_some(desired),
        });
        actions.extend(to_object(&updated).map(Action::UpdateStatus));
    }
    actions
}

/// The InternalIPs of the nodes whose Ready condition is True, in address order.
fn ready_node_addresses<N: Borrow<Node>>(nodes: &[N]) -> BTreeSet<IpAddr> {
    nodes
        .iter()
        .map(Borrow::borrow)
        .filter(|node| {
            node.status
                .as_ref()
                .and_then(|status| status.conditions.as_ref())
                .is_some_and(|conditions| {
                    conditions
                        .iter()
                        .any(|condition| condition.type_ == "Ready" && condition.status == "True")
                })
        })
        .filter_map(|node| {
            node.status
                .as_ref()?
                .addresses
                .as_ref()?
                .iter()
                .find(|address| address.type_ == "InternalIP")?
                .address
                .parse()
                .ok()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use k8s_openapi::api::core::v1::Service;
    use serde_json::{json, Value};

    use super::*;

    fn node(name: &str, ip: &str, ready: &str) -> Node {
        serde_json::from_value(json!({
            "metadata": {"name": name},
            "status": {
                "addresses": [{"type": "Hostname", "address": name}, {"type": "InternalIP", "address": ip}],
                "conditions": [{"type": "Ready", "status": ready}],
            },
        }))
        .expect("a node")
    }

    fn service(type_: &str, ingress: Option<Value>) -> Service {
        let mut object = json!({
            "metadata": {"name": "web", "namespace": "default", "resourceVersion": "7"},
            "spec": {"type": type_, "ports": [{"port": 80}]},
        });
        if let Some(ingress) = ingress {
            object["status"] = json!({"loadBalancer": {"ingress": ingress}});
        }
        serde_json::from_value(object).expect("a service")
    }

    fn snapshot(nodes: Vec<Node>, services: Vec<Service>) -> Snapshot {
        Snapshot {
            nodes: nodes.into_iter().map(Arc::new).collect(),
            services,
            ..Default::default()
        }
    }

    fn ingress_of(action: &Action) -> Value {
        match action {
            Action::UpdateStatus(object) => object["status"]["loadBalancer"].clone(),
            other => panic!("not a status update: {other:?}"),
        }
    }

    #[test]
    fn a_load_balancer_lists_every_ready_node_address_in_order() {
        let actions = reconcile_load_balancers(&snapshot(
            vec![
                node("n2", "10.0.0.12", "True"),
                node("n1", "10.0.0.11", "True"),
                node("n3", "10.0.0.13", "Unknown"),
            ],
            vec![service("LoadBalancer", None)],
        ));
        assert_eq!(actions.len(), 1);
        assert_eq!(
            ingress_of(&actions[0]),
            json!({"ingress": [{"ip": "10.0.0.11"}, {"ip": "10.0.0.12"}]})
        );
        match &actions[0] {
            Action::UpdateStatus(object) => {
                assert_eq!(object["metadata"]["resourceVersion"], "7");
            }
            other => panic!("not a status update: {other:?}"),
        }
    }

    #[test]
    fn a_settled_load_balancer_gives_no_action() {
        let actions = reconcile_load_balancers(&snapshot(
            vec![node("n1", "10.0.0.11", "True")],
            vec![service("LoadBalancer", Some(json!([{"ip": "10.0.0.11"}])))],
        ));
        assert_eq!(actions, Vec::new());
    }

    #[test]
    fn a_node_that_stops_being_ready_leaves_the_addresses() {
        let actions = reconcile_load_balancers(&snapshot(
            vec![
                node("n1", "10.0.0.11", "True"),
                node("n2", "10.0.0.12", "False"),
            ],
            vec![service(
                "LoadBalancer",
                Some(json!([{"ip": "10.0.0.11"}, {"ip": "10.0.0.12"}])),
            )],
        ));
        assert_eq!(
            ingress_of(&actions[0]),
            json!({"ingress": [{"ip": "10.0.0.11"}]})
        );
    }

    #[test]
    fn a_service_that_is_no_longer_a_load_balancer_loses_its_addresses() {
        let actions = reconcile_load_balancers(&snapshot(
            vec![node("n1", "10.0.0.11", "True")],
            vec![service("ClusterIP", Some(json!([{"ip": "10.0.0.11"}])))],
        ));
        assert_eq!(ingress_of(&actions[0]), json!({}));
        let settled = reconcile_load_balancers(&snapshot(
            vec![node("n1", "10.0.0.11", "True")],
            vec![service("NodePort", None)],
        ));
        assert_eq!(settled, Vec::new());
    }
}
