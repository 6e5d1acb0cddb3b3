use serde_json::json;

use super::*;

fn service(name: &str, spec: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Service",
           "metadata": {"name": name, "namespace": "default"}, "spec": spec})
}

fn node_port_service(name: &str, ports: Value) -> Value {
    service(name, json!({"type": "NodePort", "ports": ports}))
}

/// `service` after allocation against `others`, or the refusal as text.
fn allocated(
    mut service: Value,
    existing: Option<&Value>,
    others: &[Value],
) -> Result<Value, String> {
    allocate(
        &mut service,
        existing,
        &Allocations::of(others),
        &ServiceCidr::default(),
    )
    .map(|()| service)
    .map_err(|error| error.to_string())
}

fn node_ports(service: &Value) -> Vec<Option<i64>> {
    ports(service)
        .map(|p| p.get("nodePort").and_then(Value::as_i64))
        .collect()
}

#[test]
fn the_default_service_cidr_parses_and_excludes_network_and_broadcast() {
    let cidr = ServiceCidr::parse(DEFAULT_SERVICE_CIDR).unwrap();
    assert_eq!(cidr, ServiceCidr::default());
    assert_eq!(cidr.to_string(), "10.96.0.0/12");
    assert_eq!(cidr.reserved(), Ipv4Addr::new(10, 96, 0, 1));
    assert!(!cidr.contains(Ipv4Addr::new(10, 96, 0, 0)));
    assert!(cidr.contains(Ipv4Addr::new(10, 96, 0, 1)));
    assert!(cidr.contains(Ipv4Addr::new(10, 111, 255, 254)));
    assert!(!cidr.contains(Ipv4Addr::new(10, 111, 255, 255)));
    assert!(!cidr.contains(Ipv4Addr::new(10, 112, 0, 1)));
    assert_eq!(ServiceCidr::parse("10.96.0.1/12"), None, "host bits set");
    assert_eq!(ServiceCidr::parse("10.96.0.0/31"), None);
    assert_eq!(ServiceCidr::parse("banana"), None);
}

#[test]
fn a_new_service_gets_the_lowest_free_cluster_ip_after_the_reserved_one() {
    let web = allocated(service("web", json!({"ports": [{"port": 80}]})), None, &[]).unwrap();
    assert_eq!(web["spec"]["clusterIP"], "10.96.0.2");
    assert_eq!(web["spec"]["clusterIPs"], json!(["10.96.0.2"]));
    assert_eq!(
        node_ports(&web),
        vec![None],
        "a ClusterIP service gets no node port"
    );
}

#[test]
fn services_allocated_one_after_another_never_share_an_address() {
    let mut stored: Vec<Value> = Vec::new();
    for i in 0..20 {
        let next = allocated(service(&format!("s{i}"), json!({})), None, &stored).unwrap();
        stored.push(next);
    }
    let ips: BTreeSet<&str> = stored.iter().filter_map(cluster_ip).collect();
    assert_eq!(ips.len(), 20);
    assert!(ips.contains("10.96.0.21") && !ips.contains("10.96.0.1"));
}

#[test]
fn a_deleted_services_address_and_node_port_are_free_again() {
    let a = allocated(node_port_service("a", json!([{"port": 80}])), None, &[]).unwrap();
    let b = allocated(
        node_port_service("b", json!([{"port": 80}])),
        None,
        std::slice::from_ref(&a),
    )
    .unwrap();
    assert_eq!(b["spec"]["clusterIP"], "10.96.0.3");
    assert_eq!(node_ports(&b), vec![Some(30001)]);
    // `a` deleted: only `b` is stored.
    let c = allocated(
        node_port_service("c", json!([{"port": 80}])),
        None,
        std::slice::from_ref(&b),
    )
    .unwrap();
    assert_eq!(c["spec"]["clusterIP"], a["spec"]["clusterIP"]);
    assert_eq!(node_ports(&c), vec![Some(30000)]);
}

#[test]
fn an_explicit_free_cluster_ip_is_honoured_even_the_reserved_one() {
    let others = [allocated(service("a", json!({})), None, &[]).unwrap()];
    for ip in ["10.96.0.1", "10.100.7.9"] {
        let svc = allocated(service("b", json!({"clusterIP": ip})), None, &others).unwrap();
        assert_eq!(svc["spec"]["clusterIP"], ip);
        assert_eq!(svc["spec"]["clusterIPs"], json!([ip]));
    }
    let from_list = allocated(
        service("b", json!({"clusterIPs": ["10.96.1.1"]})),
        None,
        &others,
    )
    .unwrap();
    assert_eq!(from_list["spec"]["clusterIP"], "10.96.1.1");
}

#[test]
fn an_explicit_cluster_ip_held_by_another_service_is_refused_naming_both() {
    let others = [allocated(service("a", json!({})), None, &[]).unwrap()];
    let error = allocated(
        service("b", json!({"clusterIP": "10.96.0.2"})),
        None,
        &others,
    )
    .unwrap_err();
    assert!(error.contains("\"10.96.0.2\""), "{error}");
    assert!(error.contains("already allocated"), "{error}");
    assert!(error.contains("default/a"), "{error}");
    assert!(
        error.starts_with("invalid object: Service \"b\""),
        "{error}"
    );
}

#[test]
fn a_cluster_ip_outside_the_range_or_malformed_is_refused() {
    for ip in ["192.168.1.1", "10.96.0.0", "10.111.255.255", "10.112.0.1"] {
        let error = allocated(service("b", json!({"clusterIP": ip})), None, &[]).unwrap_err();
        assert!(error.contains(&format!("{ip:?}")), "{error}");
        assert!(error.contains("not in the valid range"), "{error}");
        assert!(error.contains("10.96.0.0/12"), "{error}");
    }
    let error = allocated(service("b", json!({"clusterIP": "fd00::1"})), None, &[]).unwrap_err();
    assert!(error.contains("valid IPv4 address"), "{error}");
    let error = allocated(
        service(
            "b",
            json!({"clusterIP": "10.96.0.5", "clusterIPs": ["10.96.0.6"]}),
        ),
        None,
        &[],
    )
    .unwrap_err();
    assert!(error.contains("spec.clusterIPs[0]"), "{error}");
}

#[test]
fn a_headless_service_gets_and_holds_no_address() {
    let headless = allocated(service("db", json!({"clusterIP": "None"})), None, &[]).unwrap();
    assert_eq!(headless["spec"]["clusterIP"], "None");
    assert_eq!(headless["spec"]["clusterIPs"], json!(["None"]));
    let next = allocated(
        service("web", json!({})),
        None,
        std::slice::from_ref(&headless),
    )
    .unwrap();
    assert_eq!(next["spec"]["clusterIP"], "10.96.0.2");
    let updated = allocated(service("db", json!({})), Some(&headless), &[]).unwrap();
    assert_eq!(
        updated["spec"]["clusterIP"], "None",
        "an update keeps it headless"
    );
    let error = allocated(
        service("db", json!({"clusterIP": "None", "type": "NodePort"})),
        None,
        &[],
    )
    .unwrap_err();
    assert!(error.contains("may not be set to 'None'"), "{error}");
}

#[test]
fn an_update_keeps_the_cluster_ip_and_may_not_change_it() {
    let stored = allocated(service("web", json!({})), None, &[]).unwrap();
    let kept = allocated(
        service("web", json!({"selector": {"app": "web"}})),
        Some(&stored),
        &[],
    )
    .unwrap();
    assert_eq!(kept["spec"]["clusterIP"], "10.96.0.2");
    let same = allocated(
        service("web", json!({"clusterIP": "10.96.0.2"})),
        Some(&stored),
        &[],
    )
    .unwrap();
    assert_eq!(same["spec"]["clusterIP"], "10.96.0.2");
    let error = allocated(
        service("web", json!({"clusterIP": "10.96.0.9"})),
        Some(&stored),
        &[],
    )
    .unwrap_err();
    assert!(error.contains("\"10.96.0.9\""), "{error}");
    assert!(error.contains("immutable"), "{error}");
}

#[test]
fn an_external_name_service_gets_no_address() {
    let external = allocated(
        service(
            "ext",
            json!({"type": "ExternalName", "externalName": "example.com"}),
        ),
        None,
        &[],
    )
    .unwrap();
    assert_eq!(external["spec"].get("clusterIP"), None);
    assert_eq!(external["spec"].get("clusterIPs"), None);
    let error = allocated(service("web", json!({"type": "Bogus"})), None, &[]).unwrap_err();
    assert!(error.contains("spec.type"), "{error}");
}

#[test]
fn node_ports_are_the_lowest_free_and_explicit_ones_are_honoured() {
    let svc = allocated(
        node_port_service(
            "web",
            json!([{"name": "a", "port": 80}, {"name": "b", "port": 81, "nodePort": 30000},
                   {"name": "c", "port": 82}]),
        ),
        None,
        &[],
    )
    .unwrap();
    assert_eq!(
        node_ports(&svc),
        vec![Some(30001), Some(30000), Some(30002)]
    );
    let load_balancer = allocated(
        service(
            "lb",
            json!({"type": "LoadBalancer", "ports": [{"port": 443}]}),
        ),
        None,
        &[svc],
    )
    .unwrap();
    assert_eq!(node_ports(&load_balancer), vec![Some(30003)]);
    let without = allocated(
        service(
            "lb2",
            json!({"type": "LoadBalancer", "allocateLoadBalancerNodePorts": false,
                   "ports": [{"port": 443}]}),
        ),
        None,
        &[],
    )
    .unwrap();
    assert_eq!(node_ports(&without), vec![None]);
}

#[test]
fn a_node_port_used_twice_or_elsewhere_or_out_of_range_is_refused_naming_it() {
    let error = allocated(
        node_port_service(
            "web",
            json!([{"name": "a", "port": 80, "nodePort": 30080},
                   {"name": "b", "port": 81, "nodePort": 30080}]),
        ),
        None,
        &[],
    )
    .unwrap_err();
    assert!(
        error.contains("spec.ports[1].nodePort: Duplicate value: 30080"),
        "{error}"
    );
    let others = [allocated(
        node_port_service("a", json!([{"port": 80, "nodePort": 30080}])),
        None,
        &[],
    )
    .unwrap()];
    let error = allocated(
        node_port_service("b", json!([{"port": 80, "nodePort": 30080}])),
        None,
        &others,
    )
    .unwrap_err();
    assert!(error.contains("30080"), "{error}");
    assert!(error.contains("already allocated"), "{error}");
    assert!(error.contains("default/a"), "{error}");
    let error = allocated(
        node_port_service("b", json!([{"port": 80, "nodePort": 8080}])),
        None,
        &[],
    )
    .unwrap_err();
    assert!(error.contains("8080"), "{error}");
    assert!(error.contains("30000-32767"), "{error}");
    let error = allocated(
        service("b", json!({"ports": [{"port": 80, "nodePort": 30500}]})),
        None,
        &[],
    )
    .unwrap_err();
    assert!(
        error.contains("may not be used when `type` is 'ClusterIP'"),
        "{error}"
    );
}

#[test]
fn the_same_node_port_may_serve_tcp_and_udp_of_one_service() {
    let dns = allocated(
        node_port_service(
            "dns",
            json!([{"name": "tcp", "port": 53, "protocol": "TCP", "nodePort": 30053},
                   {"name": "udp", "port": 53, "protocol": "UDP", "nodePort": 30053}]),
        ),
        None,
        &[],
    )
    .unwrap();
    assert_eq!(node_ports(&dns), vec![Some(30053), Some(30053)]);
}

#[test]
fn when_every_node_port_is_taken_a_new_one_is_refused() {
    let full: Vec<Value> = (NODE_PORT_MIN..=NODE_PORT_MAX)
        .map(|p| node_port_service(&format!("s{p}"), json!([{"port": 80, "nodePort": p}])))
        .collect();
    let error =
        allocated(node_port_service("web", json!([{"port": 80}])), None, &full).unwrap_err();
    assert!(
        error.contains("no free node port is left in 30000-32767"),
        "{error}"
    );
    assert_eq!(pick_node_port(|p| p != NODE_PORT_MAX), Some(NODE_PORT_MAX));
    assert_eq!(pick_node_port(|_| true), None);
}

#[test]
fn an_update_keeps_the_node_ports_of_the_ports_that_remain() {
    let stored = allocated(
        node_port_service(
            "web",
            json!([{"name": "http", "port": 80}, {"name": "https", "port": 443}]),
        ),
        None,
        &[],
    )
    .unwrap();
    assert_eq!(node_ports(&stored), vec![Some(30000), Some(30001)]);
    // `http` is gone, `https` stays (reordered), `admin` is new.
    let updated = allocated(
        node_port_service(
            "web",
            json!([{"name": "admin", "port": 9000}, {"name": "https", "port": 443}]),
        ),
        Some(&stored),
        &[],
    )
    .unwrap();
    assert_eq!(node_ports(&updated), vec![Some(30000), Some(30001)]);
    let renumbered = allocated(
        node_port_service("web", json!([{"name": "https", "port": 8443}])),
        Some(&stored),
        &[],
    )
    .unwrap();
    assert_eq!(
        node_ports(&renumbered),
        vec![Some(30001)],
        "matched by name as Kubernetes does"
    );
}

#[test]
fn changing_the_type_to_cluster_ip_drops_the_node_ports() {
    let stored = allocated(node_port_service("web", json!([{"port": 80}])), None, &[]).unwrap();
    let mut back = stored.clone();
    back["spec"]["type"] = json!("ClusterIP");
    let updated = allocated(back, Some(&stored), &[]).unwrap();
    assert_eq!(node_ports(&updated), vec![None]);
    assert_eq!(updated["spec"]["clusterIP"], stored["spec"]["clusterIP"]);
}
