//! The proxy's routing table, a pure function of Services, Endpoints and Nodes as this node
//! sees them: for every frontend (a cluster IP, a node port on any of this node's addresses,
//! or a LoadBalancer port on this node's address) with its port and protocol, the ready
//! endpoints, each with the node it runs on; and every Service port by namespace, name and
//! port, with or without a frontend, which is what Ingress backends lead to. The [`Picker`]
//! (round-robin, `ClientIP` session affinity, both per Service port whichever way a connection
//! came) is kept apart, so a new table never disturbs the picking state.
//!
//! Headless Services (`clusterIP: None`) get no frontend but are Service ports all the same;
//! ExternalName Services are neither. Only the `addresses` of an Endpoints subset (its ready
//! pods) become backends. A Service port finds
//! its Endpoints port by name (both empty for a single unnamed port) and protocol. When two
//! Services claim the same frontend (two LoadBalancers on one port), the first in (namespace,
//! name) order keeps it and the other is reported in [`RoutingTable::conflicts`].

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Endpoints, Service};
use serde_json::Value;

/// The `timeoutSeconds` of `ClientIP` affinity when the Service gives none (Kubernetes').
pub(crate) const DEFAULT_AFFINITY_TIMEOUT: Duration = Duration::from_secs(10_800);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    fn parse(text: Option<&str>) -> Option<Protocol> {
        match text.unwrap_or("TCP") {
            "TCP" => Some(Protocol::Tcp),
            "UDP" => Some(Protocol::Udp),
            "SCTP" => Some(Protocol::Sctp),
            _ => None,
        }
    }
}

/// Where clients connect: an address (`0.0.0.0` for a node port: every address of the
/// node), a port and a protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct Frontend {
    pub(crate) ip: IpAddr,
    pub(crate) port: u16,
    pub(crate) protocol: Protocol,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FrontendKind {
    ClusterIp,
    NodePort,
    LoadBalancer,
}

/// How a backend is reached from this node.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Via {
    /// A direct TCP connection: the pod runs on this node, or its node is unknown.
    Direct,
    /// A stream through the QUIC tunnel to the proxy of the pod's node.
    Tunnel { node: String, address: IpAddr },
}

/// One ready endpoint of a frontend.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct Backend {
    pub(crate) ip: IpAddr,
    pub(crate) port: u16,
    /// The node the pod runs on, when the Endpoints say.
    pub(crate) node: Option<String>,
    pub(crate) via: Via,
}

/// The ready endpoints of one Service port and how a connection picks among them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Upstream {
    /// `namespace/name:port` of the Service port (the port's name, else its number): for
    /// logs, and the picker's key.
    pub(crate) service: String,
    /// The ready endpoints, sorted.
    pub(crate) backends: Vec<Backend>,
    /// `ClientIP` affinity: how long a client sticks to its endpoint.
    pub(crate) affinity: Option<Duration>,
}

/// What a frontend leads to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Route {
    pub(crate) kind: FrontendKind,
    pub(crate) upstream: Upstream,
}

/// One port of a Service, found by its name or number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ServicePort {
    /// Empty for an unnamed port.
    pub(crate) name: String,
    pub(crate) port: u16,
    pub(crate) protocol: Protocol,
    pub(crate) upstream: Upstream,
}

/// How an Ingress backend names a Service port: `port.number` or `port.name`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum PortRef {
    Number(u16),
    Name(String),
}

impl std::fmt::Display for PortRef {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PortRef::Number(number) => write!(formatter, "{number}"),
            PortRef::Name(name) => formatter.write_str(name),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct RoutingTable {
    pub(crate) routes: BTreeMap<Frontend, Route>,
    /// Frontends claimed by more than one Service port: (frontend, the one left out).
    pub(crate) conflicts: Vec<(Frontend, String)>,
    /// The ports of every Service but ExternalName ones, by (namespace, name).
    pub(crate) service_ports: BTreeMap<(String, String), Vec<ServicePort>>,
}

impl RoutingTable {
    /// The cluster IPs of the table, which this node binds.
    pub(crate) fn cluster_ips(&self) -> std::collections::BTreeSet<IpAddr> {
        self.routes
            .iter()
            .filter(|(_, route)| route.kind == FrontendKind::ClusterIp)
            .map(|(frontend, _)| frontend.ip)
            .collect()
    }

    /// Whether `ip` is a ready endpoint on `node` of some Service port (with a frontend or
    /// not: headless Services are reached through Ingresses).
    pub(crate) fn is_endpoint_on(&self, ip: IpAddr, node: &str) -> bool {
        self.service_ports.values().flatten().any(|port| {
            port.upstream
                .backends
                .iter()
                .any(|b| b.ip == ip && b.node.as_deref() == Some(node))
        })
    }

    /// The TCP port `port` of Service `namespace/name`, by number or name.
    pub(crate) fn service_port(
        &self,
        namespace: &str,
        name: &str,
        port: &PortRef,
    ) -> Option<&Upstream> {
        self.service_ports
            .get(&(namespace.to_owned(), name.to_owned()))?
            .iter()
            .filter(|candidate| candidate.protocol == Protocol::Tcp)
            .find(|candidate| match port {
                PortRef::Number(number) => candidate.port == *number,
                PortRef::Name(port_name) => candidate.name == *port_name,
            })
            .map(|candidate| &candidate.upstream)
    }
}

/// A Node's InternalIP.
pub(crate) fn internal_ip(node: &Value) -> Option<IpAddr> {
    node.pointer("/status/addresses")?
        .as_array()?
        .iter()
        .find(|a| a.get("type").and_then(Value::as_str) == Some("InternalIP"))?
        .get("address")?
        .as_str()?
        .parse()
        .ok()
}

fn key_of(
    metadata: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> (String, String) {
    (
        metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into()),
        metadata.name.clone().unwrap_or_default(),
    )
}

/// The routing table of node `own_node` from the cluster's Services, Endpoints and Nodes
/// (as stored JSON; objects that do not parse are left out).
pub(crate) fn build(
    services: &[Value],
    endpoints: &[Value],
    nodes: &[Value],
    own_node: &str,
) -> RoutingTable {
    let node_addresses: HashMap<String, IpAddr> = nodes
        .iter()
        .filter_map(|node| {
            let name = node.pointer("/metadata/name")?.as_str()?;
            Some((name.to_owned(), internal_ip(node)?))
        })
        .collect();
    let own_address = node_addresses.get(own_node).copied();
    let endpoints: HashMap<(String, String), Endpoints> = endpoints
        .iter()
        .filter_map(|object| serde_json::from_value::<Endpoints>(object.clone()).ok())
        .map(|endpoints| (key_of(&endpoints.metadata), endpoints))
        .collect();
    let mut services: Vec<Service> = services
        .iter()
        .filter_map(|object| serde_json::from_value::<Service>(object.clone()).ok())
        .collect();
    services.sort_by_key(|service| key_of(&service.metadata));

    let mut table = RoutingTable::default();
    for service in &services {
        let Some(spec) = service.spec.as_ref() else {
            continue;
        };
        let kind = spec.type_.as_deref().unwrap_or("ClusterIP");
        if kind == "ExternalName" {
            continue;
        }
        let cluster_ip = spec
            .cluster_ip
            .as_deref()
            .and_then(|ip| ip.parse::<IpAddr>().ok());
        let affinity = (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
            spec.session_affinity_config
                .as_ref()
                .and_then(|config| config.client_ip.as_ref())
                .and_then(|client_ip| client_ip.timeout_seconds)
                .and_then(|seconds| u64::try_from(seconds).ok())
                .filter(|seconds| *seconds > 0)
                .map(Duration::from_secs)
                .unwrap_or(DEFAULT_AFFINITY_TIMEOUT)
        });
        let key = key_of(&service.metadata);
        let service_endpoints = endpoints.get(&key);
        for port in spec.ports.as_deref().unwrap_or_default() {
            let Some(protocol) = Protocol::parse(port.protocol.as_deref()) else {
                continue;
            };
            let port_name = port.name.clone().unwrap_or_default();
            let backends = backends_of(
                service_endpoints,
                &port_name,
                protocol,
                own_node,
                &node_addresses,
            );
            let label = format!(
                "{}/{}:{}",
                key.0,
                key.1,
                if port_name.is_empty() {
                    port.port.to_string()
                } else {
                    port_name.clone()
                }
            );
            let upstream = Upstream {
                service: label.clone(),
                backends,
                affinity,
            };
            if let Ok(number) = u16::try_from(port.port) {
                table
                    .service_ports
                    .entry(key.clone())
                    .or_default()
                    .push(ServicePort {
                        name: port_name.clone(),
                        port: number,
                        protocol,
                        upstream: upstream.clone(),
                    });
            }
            let mut frontends = Vec::new();
            if let (Some(ip), Ok(number)) = (cluster_ip, u16::try_from(port.port)) {
                frontends.push((ip, number, FrontendKind::ClusterIp));
            }
            if kind == "NodePort" || kind == "LoadBalancer" {
                if let Some(node_port) = port.node_port.and_then(|p| u16::try_from(p).ok()) {
                    frontends.push((
                        IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                        node_port,
                        FrontendKind::NodePort,
                    ));
                }
            }
            if kind == "LoadBalancer" {
                if let (Some(ip), Ok(number)) = (own_address, u16::try_from(port.port)) {
                    frontends.push((ip, number, FrontendKind::LoadBalancer));
                }
            }
            for (ip, number, frontend_kind) in frontends {
                if number == 0 {
                    continue;
                }
                let frontend = Frontend {
                    ip,
                    port: number,
                    protocol,
                };
                if table.routes.contains_key(&frontend) {
                    table.conflicts.push((frontend, label.clone()));
                    continue;
                }
                table.routes.insert(
                    frontend,
                    Route {
                        kind: frontend_kind,
                        upstream: upstream.clone(),
                    },
                );
            }
        }
    }
    table
}

/// The ready endpoints of one Service port, sorted.
fn backends_of(
    endpoints: Option<&Endpoints>,
    port_name: &str,
    protocol: Protocol,
    own_node: &str,
    node_addresses: &HashMap<String, IpAddr>,
) -> Vec<Backend> {
    let mut backends = Vec::new();
    for subset in endpoints
        .and_then(|e| e.subsets.as_deref())
        .unwrap_or_default()
    {
        let Some(port) = subset
            .ports
            .as_deref()
            .unwrap_or_default()
            .iter()
            .find(|p| {
                p.name.as_deref().unwrap_or_default() == port_name
                    && Protocol::parse(p.protocol.as_deref()) == Some(protocol)
            })
            .and_then(|p| u16::try_from(p.port).ok())
        else {
            continue;
        };
        for address in subset.addresses.as_deref().unwrap_or_default() {
            let Ok(ip) = address.ip.parse::<IpAddr>() else {
                continue;
            };
            let node = address.node_name.clone();
            let via = match node.as_deref() {
                Some(name) if name != own_node => match node_addresses.get(name) {
                    Some(address) => Via::Tunnel {
                        node: name.to_owned(),
                        address: *address,
                    },
                    None => Via::Direct,
                },
                _ => Via::Direct,
            };
            backends.push(Backend {
                ip,
                port,
                node,
                via,
            });
        }
    }
    backends.sort();
    backends.dedup();
    backends
}

/// Picks a backend per connection: round-robin per Service port, or the client's previous
/// backend under `ClientIP` affinity while it is still ready and the client came back within
/// the timeout. Both are kept per Service port, as kube-proxy does: a client that came by the
/// cluster IP sticks to the same endpoint by the node port or an Ingress. A seeded picker
/// starts each Service port's round at a place of the seed's and the port's choosing, so nodes
/// do not all send their first connection to the same endpoint; the default one starts at the
/// first endpoint.
#[derive(Debug, Default)]
pub(crate) struct Picker {
    seed: u64,
    next: HashMap<String, usize>,
    sticky: HashMap<(String, IpAddr), (Backend, Instant)>,
    picks: u64,
}

impl Picker {
    pub(crate) fn seeded(seed: u64) -> Picker {
        Picker {
            seed,
            ..Picker::default()
        }
    }

    fn start(&self, service: &str) -> usize {
        if self.seed == 0 {
            return 0;
        }
        use std::hash::{Hash, Hasher};
        let mut hasher = std::hash::DefaultHasher::new();
        (self.seed, service).hash(&mut hasher);
        hasher.finish() as usize
    }

    pub(crate) fn pick(
        &mut self,
        upstream: &Upstream,
        client: IpAddr,
        now: Instant,
    ) -> Option<Backend> {
        if upstream.backends.is_empty() {
            return None;
        }
        self.picks += 1;
        if self.picks.is_multiple_of(4096) {
            self.sticky.retain(|_, (_, last)| {
                now.saturating_duration_since(*last) < DEFAULT_AFFINITY_TIMEOUT * 2
            });
        }
        let sticky_key = (upstream.service.clone(), client);
        if let Some(timeout) = upstream.affinity {
            if let Some((backend, last)) = self.sticky.get_mut(&sticky_key) {
                if now.saturating_duration_since(*last) < timeout
                    && upstream.backends.contains(backend)
                {
                    *last = now;
                    return Some(backend.clone());
                }
            }
        }
        let count = upstream.backends.len();
        let next = match self.next.get_mut(&upstream.service) {
            Some(next) => next,
            None => {
                let start = self.start(&upstream.service);
                self.next.entry(upstream.service.clone()).or_insert(start)
            }
        };
        let backend = upstream.backends[*next % count].clone();
        *next = (*next + 1) % count;
        if upstream.affinity.is_some() {
            self.sticky.insert(sticky_key, (backend.clone(), now));
        }
        Some(backend)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn node(name: &str, ip: &str) -> Value {
        json!({
            "metadata": {"name": name},
            "status": {"addresses": [{"type": "InternalIP", "address": ip}]}
        })
    }

    fn nodes() -> Vec<Value> {
        vec![node("n1", "10.1.0.11"), node("n2", "10.1.0.12")]
    }

    fn service(name: &str, spec: Value) -> Value {
        json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": "default"},
            "spec": spec,
        })
    }

    fn endpoints(name: &str, addresses: &[(&str, &str)], ports: Value) -> Value {
        json!({
            "apiVersion": "v1", "kind": "Endpoints",
            "metadata": {"name": name, "namespace": "default"},
            "subsets": [{
                "addresses": addresses.iter().map(|(ip, node)| json!({"ip": ip, "nodeName": node})).collect::<Vec<_>>(),
                "notReadyAddresses": [{"ip": "10.244.9.9", "nodeName": "n1"}],
                "ports": ports,
            }]
        })
    }

    fn tcp(ip: &str, port: u16) -> Frontend {
        Frontend {
            ip: ip.parse().expect("an address"),
            port,
            protocol: Protocol::Tcp,
        }
    }

    #[test]
    fn a_cluster_ip_port_leads_to_the_ready_endpoints_with_their_nodes() {
        let services = vec![service(
            "web",
            json!({"clusterIP": "10.96.0.10", "ports": [{"port": 80, "targetPort": 8080}]}),
        )];
        let endpoints = vec![endpoints(
            "web",
            &[("10.244.2.5", "n2"), ("10.244.1.7", "n1")],
            json!([{"port": 8080, "protocol": "TCP"}]),
        )];
        let table = build(&services, &endpoints, &nodes(), "n1");
        let route = &table.routes[&tcp("10.96.0.10", 80)];
        assert_eq!(route.kind, FrontendKind::ClusterIp);
        assert_eq!(
            route.upstream.backends,
            vec![
                Backend {
                    ip: "10.244.1.7".parse().expect("ip"),
                    port: 8080,
                    node: Some("n1".into()),
                    via: Via::Direct,
                },
                Backend {
                    ip: "10.244.2.5".parse().expect("ip"),
                    port: 8080,
                    node: Some("n2".into()),
                    via: Via::Tunnel {
                        node: "n2".into(),
                        address: "10.1.0.12".parse().expect("ip"),
                    },
                },
            ]
        );
        assert_eq!(table.routes.len(), 1);
        assert!(table.is_endpoint_on("10.244.2.5".parse().expect("ip"), "n2"));
        assert!(!table.is_endpoint_on("10.244.9.9".parse().expect("ip"), "n1"));
    }

    #[test]
    fn named_ports_are_matched_by_name_and_protocol() {
        let services = vec![service(
            "dns",
            json!({"clusterIP": "10.96.0.53", "ports": [
                {"name": "dns", "port": 53, "protocol": "UDP"},
                {"name": "dns-tcp", "port": 53, "protocol": "TCP"},
                {"name": "metrics", "port": 9153},
            ]}),
        )];
        let endpoints = vec![endpoints(
            "dns",
            &[("10.244.1.2", "n1")],
            json!([
                {"name": "dns", "port": 5353, "protocol": "UDP"},
                {"name": "dns-tcp", "port": 5354, "protocol": "TCP"},
            ]),
        )];
        let table = build(&services, &endpoints, &nodes(), "n1");
        let udp = Frontend {
            protocol: Protocol::Udp,
            ..tcp("10.96.0.53", 53)
        };
        assert_eq!(table.routes[&udp].upstream.backends[0].port, 5353);
        assert_eq!(
            table.routes[&tcp("10.96.0.53", 53)].upstream.backends[0].port,
            5354
        );
        assert!(table.routes[&tcp("10.96.0.53", 9153)]
            .upstream
            .backends
            .is_empty());
    }

    #[test]
    fn node_ports_listen_on_every_address_and_load_balancers_on_the_nodes_address() {
        let services = vec![
            service(
                "np",
                json!({"type": "NodePort", "clusterIP": "10.96.0.20",
                       "ports": [{"port": 80, "nodePort": 30080}]}),
            ),
            service(
                "lb",
                json!({"type": "LoadBalancer", "clusterIP": "10.96.0.21",
                       "ports": [{"port": 443, "nodePort": 30443}]}),
            ),
        ];
        let table = build(&services, &[], &nodes(), "n2");
        let kinds: Vec<(Frontend, FrontendKind)> = table
            .routes
            .iter()
            .map(|(frontend, route)| (*frontend, route.kind))
            .collect();
        assert_eq!(
            kinds,
            vec![
                (tcp("0.0.0.0", 30080), FrontendKind::NodePort),
                (tcp("0.0.0.0", 30443), FrontendKind::NodePort),
                (tcp("10.1.0.12", 443), FrontendKind::LoadBalancer),
                (tcp("10.96.0.20", 80), FrontendKind::ClusterIp),
                (tcp("10.96.0.21", 443), FrontendKind::ClusterIp),
            ]
        );
    }

    #[test]
    fn headless_and_external_name_services_get_no_frontend() {
        let services = vec![
            service(
                "headless",
                json!({"clusterIP": "None", "ports": [{"port": 80}]}),
            ),
            service(
                "external",
                json!({"type": "ExternalName", "externalName": "example.com"}),
            ),
        ];
        let endpoints = vec![endpoints(
            "headless",
            &[("10.244.2.9", "n2")],
            json!([{"port": 80}]),
        )];
        let table = build(&services, &endpoints, &nodes(), "n1");
        assert!(table.routes.is_empty());
        assert!(table.cluster_ips().is_empty());
        // The headless Service is still a Service port (an Ingress may lead to it) and its
        // pods are endpoints for the tunnels; the ExternalName one is nothing.
        let headless = table
            .service_port("default", "headless", &PortRef::Number(80))
            .expect("the headless Service's port");
        assert_eq!(headless.backends.len(), 1);
        assert!(table.is_endpoint_on("10.244.2.9".parse().expect("ip"), "n2"));
        assert_eq!(
            table.service_port("default", "external", &PortRef::Number(80)),
            None
        );
    }

    #[test]
    fn service_ports_are_found_by_number_or_name_and_only_over_tcp() {
        let services = vec![service(
            "dns",
            json!({"clusterIP": "10.96.0.53", "ports": [
                {"name": "dns", "port": 53, "protocol": "UDP"},
                {"name": "dns-tcp", "port": 53, "protocol": "TCP"},
                {"name": "metrics", "port": 9153},
            ]}),
        )];
        let table = build(&services, &[], &nodes(), "n1");
        let by_number = table
            .service_port("default", "dns", &PortRef::Number(53))
            .expect("port 53 over TCP");
        assert_eq!(by_number.service, "default/dns:dns-tcp");
        let by_name = table
            .service_port("default", "dns", &PortRef::Name("metrics".into()))
            .expect("the metrics port");
        assert_eq!(by_name.service, "default/dns:metrics");
        for (namespace, name, port) in [
            ("default", "dns", PortRef::Name("dns".into())),
            ("default", "dns", PortRef::Number(80)),
            ("default", "dns", PortRef::Name("http".into())),
            ("other", "dns", PortRef::Number(53)),
            ("default", "web", PortRef::Number(53)),
        ] {
            assert_eq!(
                table.service_port(namespace, name, &port),
                None,
                "{namespace}/{name}:{port}"
            );
        }
    }

    #[test]
    fn a_second_service_on_a_taken_frontend_is_reported_not_routed() {
        let services = vec![
            service(
                "a",
                json!({"type": "LoadBalancer", "clusterIP": "10.96.0.1", "ports": [{"port": 80}]}),
            ),
            service(
                "b",
                json!({"type": "LoadBalancer", "clusterIP": "10.96.0.2", "ports": [{"port": 80}]}),
            ),
        ];
        let table = build(&services, &[], &nodes(), "n1");
        assert_eq!(
            table.routes[&tcp("10.1.0.11", 80)].upstream.service,
            "default/a:80"
        );
        assert_eq!(
            table.conflicts,
            vec![(tcp("10.1.0.11", 80), "default/b:80".to_string())]
        );
    }

    #[test]
    fn an_endpoint_on_an_unknown_node_is_reached_directly() {
        let services = vec![service(
            "web",
            json!({"clusterIP": "10.96.0.10", "ports": [{"port": 80}]}),
        )];
        let endpoints = vec![endpoints(
            "web",
            &[("10.244.7.1", "gone")],
            json!([{"port": 80}]),
        )];
        let table = build(&services, &endpoints, &nodes(), "n1");
        assert_eq!(
            table.routes[&tcp("10.96.0.10", 80)].upstream.backends[0].via,
            Via::Direct
        );
    }

    fn upstream(backends: &[&str], affinity: Option<Duration>) -> Upstream {
        Upstream {
            service: "default/web:80".into(),
            backends: backends
                .iter()
                .map(|ip| Backend {
                    ip: ip.parse().expect("ip"),
                    port: 80,
                    node: None,
                    via: Via::Direct,
                })
                .collect(),
            affinity,
        }
    }

    #[test]
    fn connections_go_round_robin_over_the_endpoints() {
        let mut picker = Picker::default();
        let route = upstream(&["10.0.0.1", "10.0.0.2", "10.0.0.3"], None);
        let now = Instant::now();
        let client: IpAddr = "10.244.1.5".parse().expect("ip");
        let picked: Vec<String> = (0..4)
            .map(|_| {
                picker
                    .pick(&route, client, now)
                    .expect("a backend")
                    .ip
                    .to_string()
            })
            .collect();
        assert_eq!(picked, ["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.1"]);
    }

    #[test]
    fn seeded_pickers_start_their_rounds_at_different_endpoints() {
        let route = upstream(&["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"], None);
        let client: IpAddr = "10.244.1.5".parse().expect("ip");
        let now = Instant::now();
        let firsts: std::collections::BTreeSet<IpAddr> = (1..=16u64)
            .map(|seed| {
                Picker::seeded(seed)
                    .pick(&route, client, now)
                    .expect("a backend")
                    .ip
            })
            .collect();
        assert!(firsts.len() > 1, "every seed started at {firsts:?}");
        let mut picker = Picker::seeded(7);
        let round: std::collections::BTreeSet<IpAddr> = (0..4)
            .map(|_| picker.pick(&route, client, now).expect("a backend").ip)
            .collect();
        assert_eq!(round.len(), 4, "a round visits every endpoint once");
    }

    #[test]
    fn a_service_port_without_endpoints_picks_nothing() {
        let mut picker = Picker::default();
        let client: IpAddr = "10.244.1.5".parse().expect("ip");
        assert_eq!(
            picker.pick(&upstream(&[], None), client, Instant::now()),
            None
        );
    }

    #[test]
    fn client_ip_affinity_keeps_a_client_on_its_endpoint_until_the_timeout() {
        let mut picker = Picker::default();
        let route = upstream(
            &["10.0.0.1", "10.0.0.2", "10.0.0.3"],
            Some(Duration::from_secs(60)),
        );
        let start = Instant::now();
        let a: IpAddr = "10.244.1.5".parse().expect("ip");
        let b: IpAddr = "10.244.1.6".parse().expect("ip");
        let first = picker.pick(&route, a, start).expect("a backend");
        let other = picker.pick(&route, b, start).expect("a backend");
        assert_ne!(first, other, "a new client still goes round-robin");
        for seconds in [10, 50, 100] {
            let again = picker
                .pick(&route, a, start + Duration::from_secs(seconds))
                .expect("a backend");
            assert_eq!(again, first, "sticky after {seconds}s (each visit renews)");
        }
        // Silent past the timeout: picked afresh, round-robin going on where it was.
        let later = picker
            .pick(&route, a, start + Duration::from_secs(200))
            .expect("a backend");
        assert_eq!(later.ip.to_string(), "10.0.0.3");
    }

    #[test]
    fn a_sticky_client_whose_endpoint_went_away_moves_to_a_ready_one() {
        let mut picker = Picker::default();
        let affinity = Some(DEFAULT_AFFINITY_TIMEOUT);
        let client: IpAddr = "10.244.1.5".parse().expect("ip");
        let now = Instant::now();
        let first = picker
            .pick(&upstream(&["10.0.0.1", "10.0.0.2"], affinity), client, now)
            .expect("a backend");
        assert_eq!(first.ip.to_string(), "10.0.0.1");
        let remaining = upstream(&["10.0.0.2"], affinity);
        let moved = picker.pick(&remaining, client, now).expect("a backend");
        assert_eq!(moved.ip.to_string(), "10.0.0.2");
        assert_eq!(picker.pick(&remaining, client, now), Some(moved));
    }

    #[test]
    fn the_default_affinity_timeout_is_three_hours() {
        let services = vec![service(
            "web",
            json!({"clusterIP": "10.96.0.10", "sessionAffinity": "ClientIP", "ports": [{"port": 80}]}),
        )];
        let table = build(&services, &[], &nodes(), "n1");
        assert_eq!(
            table.routes[&tcp("10.96.0.10", 80)].upstream.affinity,
            Some(Duration::from_secs(10_800))
        );
    }
}
