use std::sync::Arc;

use serde_json::{json, Value};

use super::*;

fn service(name: &str, spec: Value) -> Service {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "default", "uid": format!("svc-{name}"),
                     "labels": {"team": "a"}},
        "spec": spec
    }))
    .expect("service parses")
}

fn web_service(ports: Value) -> Service {
    service(
        "web",
        json!({"selector": {"app": "web"}, "clusterIP": "10.96.0.2", "ports": ports}),
    )
}

/// A pod labelled `app: web` on `node-1` with `ip`, Ready or not, with container ports
/// `(name, port)`.
fn pod(name: &str, ip: &str, ready: bool, container_ports: &[(&str, i32)]) -> Pod {
    let ports: Vec<Value> = container_ports
        .iter()
        .map(|(name, port)| json!({"name": name, "containerPort": port}))
        .collect();
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "uid": format!("uid-{name}"),
                     "labels": {"app": "web"}},
        "spec": {"nodeName": "node-1",
                 "containers": [{"name": "web", "image": "flotilla/echo", "ports": ports}]},
        "status": {"phase": "Running", "podIP": ip,
                   "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]}
    }))
    .expect("pod parses")
}

fn snapshot(services: Vec<Service>, pods: Vec<Pod>) -> Snapshot {
    Snapshot {
        services,
        pods: pods.into_iter().map(Arc::new).collect(),
        ..Snapshot::default()
    }
}

/// The object of the only action, which must be a create.
fn created(actions: &[Action]) -> Value {
    match actions {
        [Action::Create(object)] => object.clone(),
        other => panic!("expected one create, got {other:?}"),
    }
}

/// The object as the store would hold it after the create: with a resourceVersion.
fn stored(object: &Value, resource_version: &str) -> Endpoints {
    let mut object = object.clone();
    object["metadata"]["resourceVersion"] = json!(resource_version);
    object["metadata"]["uid"] = json!("ep-uid");
    serde_json::from_value(object).expect("endpoints parse")
}

fn ips(addresses: &Value) -> Vec<&str> {
    addresses
        .as_array()
        .map(|a| a.iter().filter_map(|a| a["ip"].as_str()).collect())
        .unwrap_or_default()
}

#[test]
fn ready_pods_are_addresses_and_unready_pods_are_not_ready_addresses() {
    let snapshot = snapshot(
        vec![web_service(
            json!([{"name": "http", "port": 80, "targetPort": 8080}]),
        )],
        vec![
            pod("b", "10.244.0.11", true, &[]),
            pod("a", "10.244.0.9", true, &[]),
            pod("c", "10.244.1.5", false, &[]),
        ],
    );
    let endpoints = created(&reconcile_endpoints(&snapshot));
    assert_eq!(endpoints["kind"], "Endpoints");
    assert_eq!(endpoints["metadata"]["name"], "web");
    assert_eq!(endpoints["metadata"]["namespace"], "default");
    assert_eq!(
        endpoints["metadata"]["labels"],
        json!({"team": "a", MANAGED_BY_LABEL: MANAGED_BY_VALUE})
    );
    let subsets = endpoints["subsets"].as_array().expect("subsets");
    assert_eq!(subsets.len(), 1);
    assert_eq!(
        ips(&subsets[0]["addresses"]),
        ["10.244.0.9", "10.244.0.11"],
        "sorted by address"
    );
    assert_eq!(ips(&subsets[0]["notReadyAddresses"]), ["10.244.1.5"]);
    assert_eq!(
        subsets[0]["addresses"][0],
        json!({"ip": "10.244.0.9", "nodeName": "node-1",
               "targetRef": {"kind": "Pod", "namespace": "default", "name": "a", "uid": "uid-a"}})
    );
    assert_eq!(
        subsets[0]["ports"],
        json!([{"name": "http", "port": 8080, "protocol": "TCP"}])
    );
}

#[test]
fn a_numeric_target_port_is_used_as_is_and_an_absent_one_is_the_service_port() {
    let snapshot = snapshot(
        vec![web_service(json!([
            {"name": "http", "port": 80, "targetPort": 8080},
            {"name": "metrics", "port": 9090}
        ]))],
        vec![pod("a", "10.244.0.9", true, &[])],
    );
    let endpoints = created(&reconcile_endpoints(&snapshot));
    assert_eq!(
        endpoints["subsets"][0]["ports"],
        json!([{"name": "http", "port": 8080, "protocol": "TCP"},
               {"name": "metrics", "port": 9090, "protocol": "TCP"}])
    );
}

#[test]
fn a_named_target_port_resolves_per_pod_and_a_pod_without_it_is_left_out_for_that_port() {
    let snapshot = snapshot(
        vec![web_service(json!([
            {"name": "http", "port": 80, "targetPort": "http"},
            {"name": "admin", "port": 81, "targetPort": "admin"}
        ]))],
        vec![
            pod("a", "10.244.0.9", true, &[("http", 8080), ("admin", 9000)]),
            pod("b", "10.244.0.10", true, &[("http", 8081)]),
            pod("c", "10.244.0.11", true, &[("other", 1234)]),
        ],
    );
    let endpoints = created(&reconcile_endpoints(&snapshot));
    let subsets = endpoints["subsets"].as_array().expect("subsets");
    let summary: Vec<(Vec<&str>, Value)> = subsets
        .iter()
        .map(|s| (ips(&s["addresses"]), s["ports"].clone()))
        .collect();
    assert_eq!(
        summary,
        vec![
            (
                vec!["10.244.0.9"],
                json!([{"name": "admin", "port": 9000, "protocol": "TCP"},
                       {"name": "http", "port": 8080, "protocol": "TCP"}])
            ),
            (
                vec!["10.244.0.10"],
                json!([{"name": "http", "port": 8081, "protocol": "TCP"}])
            ),
        ],
        "pods grouped by the ports they resolve to; c has neither port"
    );
}

#[test]
fn a_pod_entering_the_selector_is_added_and_one_leaving_it_is_removed() {
    let service = web_service(json!([{"port": 80}]));
    let first = snapshot(
        vec![service.clone()],
        vec![pod("a", "10.244.0.9", true, &[])],
    );
    let current = stored(&created(&reconcile_endpoints(&first)), "7");

    let mut relabelled = pod("a", "10.244.0.9", true, &[]);
    relabelled.metadata.labels = Some([("app".to_string(), "other".to_string())].into());
    let mut next = snapshot(
        vec![service],
        vec![relabelled, pod("b", "10.244.0.10", true, &[])],
    );
    next.endpoints = vec![current];
    let actions = reconcile_endpoints(&next);
    let [Action::Update(updated)] = actions.as_slice() else {
        panic!("expected one update, got {actions:?}");
    };
    assert_eq!(
        updated["metadata"]["resourceVersion"], "7",
        "decided on the stored version"
    );
    assert_eq!(updated["metadata"]["uid"], "ep-uid");
    assert_eq!(ips(&updated["subsets"][0]["addresses"]), ["10.244.0.10"]);
}

#[test]
fn settled_endpoints_get_no_action() {
    let mut snapshot = snapshot(
        vec![web_service(
            json!([{"name": "http", "port": 80, "targetPort": "http"}]),
        )],
        vec![
            pod("a", "10.244.0.9", true, &[("http", 8080)]),
            pod("b", "10.244.0.10", false, &[("http", 8080)]),
        ],
    );
    let current = stored(&created(&reconcile_endpoints(&snapshot)), "7");
    snapshot.endpoints = vec![current];
    assert_eq!(reconcile_endpoints(&snapshot), vec![]);

    let mut empty = self::snapshot(vec![web_service(json!([{"port": 80}]))], vec![]);
    let current = stored(&created(&reconcile_endpoints(&empty)), "8");
    empty.endpoints = vec![current];
    assert_eq!(
        reconcile_endpoints(&empty),
        vec![],
        "no pods: empty Endpoints, once"
    );
}

#[test]
fn the_managed_endpoints_of_a_deleted_service_are_deleted_and_user_endpoints_are_kept() {
    let managed = stored(
        &created(&reconcile_endpoints(&snapshot(
            vec![web_service(json!([{"port": 80}]))],
            vec![pod("a", "10.244.0.9", true, &[])],
        ))),
        "7",
    );
    let users: Endpoints = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Endpoints",
        "metadata": {"name": "external", "namespace": "default", "resourceVersion": "3"},
        "subsets": [{"addresses": [{"ip": "192.168.1.10"}], "ports": [{"port": 5432}]}]
    }))
    .expect("endpoints parse");
    let mut snapshot = snapshot(vec![], vec![pod("a", "10.244.0.9", true, &[])]);
    snapshot.endpoints = vec![managed, users];
    assert_eq!(
        reconcile_endpoints(&snapshot),
        vec![Action::Delete {
            kind: "Endpoints".into(),
            namespace: "default".into(),
            name: "web".into(),
            resource_version: Some("7".into()),
        }]
    );
}

#[test]
fn the_endpoints_of_a_service_without_selector_are_left_alone() {
    let users: Endpoints = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Endpoints",
        "metadata": {"name": "db", "namespace": "default", "resourceVersion": "3",
                     "labels": {MANAGED_BY_LABEL: MANAGED_BY_VALUE}},
        "subsets": [{"addresses": [{"ip": "192.168.1.10"}], "ports": [{"port": 5432}]}]
    }))
    .expect("endpoints parse");
    let mut snapshot = snapshot(
        vec![service("db", json!({"ports": [{"port": 5432}]}))],
        vec![pod("a", "10.244.0.9", true, &[])],
    );
    snapshot.endpoints = vec![users];
    assert_eq!(reconcile_endpoints(&snapshot), vec![]);
}

#[test]
fn a_headless_service_still_gets_endpoints_with_or_without_ports() {
    let with_ports = service(
        "db",
        json!({"selector": {"app": "web"}, "clusterIP": "None", "ports": [{"port": 5432}]}),
    );
    let without_ports = service(
        "peers",
        json!({"selector": {"app": "web"}, "clusterIP": "None"}),
    );
    let snapshot = snapshot(
        vec![with_ports, without_ports],
        vec![pod("a", "10.244.0.9", true, &[])],
    );
    let actions = reconcile_endpoints(&snapshot);
    let objects: Vec<&Value> = actions
        .iter()
        .map(|action| match action {
            Action::Create(object) => object,
            other => panic!("expected creates, got {other:?}"),
        })
        .collect();
    assert_eq!(objects.len(), 2);
    assert_eq!(objects[0]["metadata"]["name"], "db");
    assert_eq!(objects[0]["metadata"]["labels"][HEADLESS_LABEL], "");
    assert_eq!(ips(&objects[0]["subsets"][0]["addresses"]), ["10.244.0.9"]);
    assert_eq!(
        objects[0]["subsets"][0]["ports"],
        json!([{"port": 5432, "protocol": "TCP"}])
    );
    assert_eq!(objects[1]["metadata"]["name"], "peers");
    assert_eq!(ips(&objects[1]["subsets"][0]["addresses"]), ["10.244.0.9"]);
    assert_eq!(objects[1]["subsets"][0].get("ports"), None);
}

#[test]
fn pods_without_an_ip_finished_being_deleted_or_elsewhere_are_not_endpoints() {
    let no_ip = pod("no-ip", "", true, &[]);
    let mut finished = pod("finished", "10.244.0.2", false, &[]);
    if let Some(status) = finished.status.as_mut() {
        status.phase = Some("Succeeded".into());
    }
    let mut deleting = pod("deleting", "10.244.0.3", true, &[]);
    deleting.metadata.deletion_timestamp = Some(
        k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(jiff::Timestamp::UNIX_EPOCH),
    );
    let mut elsewhere = pod("elsewhere", "10.244.0.4", true, &[]);
    elsewhere.metadata.namespace = Some("other".into());
    let snapshot = snapshot(
        vec![web_service(json!([{"port": 80}]))],
        vec![
            no_ip,
            finished,
            deleting,
            elsewhere,
            pod("a", "10.244.0.9", true, &[]),
        ],
    );
    let endpoints = created(&reconcile_endpoints(&snapshot));
    assert_eq!(ips(&endpoints["subsets"][0]["addresses"]), ["10.244.0.9"]);
    assert_eq!(endpoints["subsets"][0].get("notReadyAddresses"), None);
}

#[test]
fn a_service_publishing_not_ready_addresses_lists_unready_pods_as_ready() {
    let service = service(
        "web",
        json!({"selector": {"app": "web"}, "publishNotReadyAddresses": true,
               "ports": [{"port": 80}]}),
    );
    let snapshot = snapshot(vec![service], vec![pod("a", "10.244.0.9", false, &[])]);
    let endpoints = created(&reconcile_endpoints(&snapshot));
    assert_eq!(ips(&endpoints["subsets"][0]["addresses"]), ["10.244.0.9"]);
}
