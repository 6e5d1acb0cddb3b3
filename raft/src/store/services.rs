//! Service cluster IPs and node ports, as pure functions. The state machine calls [`allocate`]
//! for every Service it writes, in log order, with what all the other Services hold: two
//! Services written at once therefore never get the same address or port, and every node
//! decides the same. Nothing is recorded besides the Services themselves, so what a deleted
//! Service held is free again as soon as it is gone.
//!
//! As in Kubernetes: `spec.clusterIP` absent or empty gets the lowest free address of the
//! service CIDR (never the network or broadcast address, nor the first host address, which is
//! kept for a `kubernetes` Service that asks for it explicitly); an explicit address is honoured
//! when it is free and in the range; `None` makes a headless Service. The cluster IP is
//! immutable. `NodePort` and `LoadBalancer` Services get the lowest free node port of
//! 30000-32767 for every port that names none; a port keeps its node port across updates.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::Ipv4Addr;

use serde_json::{Map, Value};

use super::StoreError;
use crate::object::meta_str;

/// The default range Service cluster IPs come from.
pub const DEFAULT_SERVICE_CIDR: &str = "10.96.0.0/12";
/// The lowest node port.
pub const NODE_PORT_MIN: u16 = 30000;
/// The highest node port.
pub const NODE_PORT_MAX: u16 = 32767;

/// `spec.clusterIP` of a headless Service.
pub const HEADLESS: &str = "None";

/// An IPv4 range Service cluster IPs are allocated from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServiceCidr {
    network: u32,
    prefix_len: u8,
}

impl Default for ServiceCidr {
    /// `10.96.0.0/12`, [`DEFAULT_SERVICE_CIDR`].
    fn default() -> ServiceCidr {
        ServiceCidr {
            network: u32::from(Ipv4Addr::new(10, 96, 0, 0)),
            prefix_len: 12,
        }
    }
}

impl ServiceCidr {
    /// `A.B.C.D/N` with `N` from 8 to 30 and no host bits set; `None` otherwise.
    pub fn parse(cidr: &str) -> Option<ServiceCidr> {
        let (address, bits) = cidr.split_once('/')?;
        let address: Ipv4Addr = address.parse().ok()?;
        let prefix_len: u8 = bits.parse().ok()?;
        if !(8..=30).contains(&prefix_len) {
            return None;
        }
        let network = u32::from(address);
        (network & !mask(prefix_len) == 0).then_some(ServiceCidr {
            network,
            prefix_len,
        })
    }

    fn broadcast(&self) -> u32 {
        self.network | !mask(self.prefix_len)
    }

    /// The first host address, kept for the `kubernetes` Service: never allocated on its own,
    /// only when asked for.
    pub fn reserved(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.network + 1)
    }

    /// Whether `ip` is a host address of the range (neither its network nor its broadcast
    /// address).
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        let ip = u32::from(ip);
        ip > self.network && ip < self.broadcast()
    }
}

impl fmt::Display for ServiceCidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", Ipv4Addr::from(self.network), self.prefix_len)
    }
}

fn mask(prefix_len: u8) -> u32 {
    u32::MAX << (32 - u32::from(prefix_len))
}

/// The cluster IPs and node ports Services hold, each with its holder as `namespace/name`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Allocations {
    pub cluster_ips: BTreeMap<Ipv4Addr, String>,
    pub node_ports: BTreeMap<u16, String>,
}

impl Allocations {
    /// What `services` hold. Headless Services hold no address; unparsable values hold nothing.
    pub fn of<'a>(services: impl IntoIterator<Item = &'a Value>) -> Allocations {
        let mut allocations = Allocations::default();
        for service in services {
            let holder = format!(
                "{}/{}",
                meta_str(service, "namespace").unwrap_or_default(),
                meta_str(service, "name").unwrap_or_default()
            );
            if let Some(ip) = cluster_ip(service).and_then(|ip| ip.parse::<Ipv4Addr>().ok()) {
                allocations.cluster_ips.insert(ip, holder.clone());
            }
            for port in ports(service) {
                if let Some(node_port) = node_port(port).and_then(|p| u16::try_from(p).ok()) {
                    allocations.node_ports.insert(node_port, holder.clone());
                }
            }
        }
        allocations
    }
}

/// The lowest host address of `cidr`, other than the reserved one, for which `taken` is false.
pub fn pick_cluster_ip(cidr: &ServiceCidr, taken: impl Fn(Ipv4Addr) -> bool) -> Option<Ipv4Addr> {
    let reserved = cidr.reserved();
    (cidr.network + 1..cidr.broadcast())
        .map(Ipv4Addr::from)
        .find(|ip| *ip != reserved && !taken(*ip))
}

/// The lowest node port for which `taken` is false.
pub fn pick_node_port(taken: impl Fn(u16) -> bool) -> Option<u16> {
    (NODE_PORT_MIN..=NODE_PORT_MAX).find(|port| !taken(*port))
}

/// `spec.clusterIP` when set and not empty.
pub fn cluster_ip(service: &Value) -> Option<&str> {
    service
        .pointer("/spec/clusterIP")
        .and_then(Value::as_str)
        .filter(|ip| !ip.is_empty())
}

fn ports(service: &Value) -> impl Iterator<Item = &Value> {
    service
        .pointer("/spec/ports")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
}

/// A port's `nodePort` when set and not zero.
fn node_port(port: &Value) -> Option<i64> {
    port.get("nodePort")
        .and_then(Value::as_i64)
        .filter(|p| *p != 0)
}

fn port_name(port: &Value) -> &str {
    port.get("name").and_then(Value::as_str).unwrap_or_default()
}

fn port_number(port: &Value) -> i64 {
    port.get("port").and_then(Value::as_i64).unwrap_or(0)
}

fn protocol(port: &Value) -> &str {
    port.get("protocol")
        .and_then(Value::as_str)
        .filter(|p| !p.is_empty())
        .unwrap_or("TCP")
}

/// A port of the stored version of a Service that holds a node port.
struct HeldPort {
    name: String,
    port: i64,
    protocol: String,
    node_port: u16,
}

fn held_ports(service: Option<&Value>) -> Vec<HeldPort> {
    service
        .into_iter()
        .flat_map(ports)
        .filter_map(|port| {
            Some(HeldPort {
                name: port_name(port).to_string(),
                port: port_number(port),
                protocol: protocol(port).to_string(),
                node_port: node_port(port).and_then(|p| u16::try_from(p).ok())?,
            })
        })
        .collect()
}

/// The node port `port` had in the stored version: the one of the same name, number and
/// protocol, else of the same name (as Kubernetes matches them), else of the same number and
/// protocol; only among those `taken` is false for.
fn previous_node_port(held: &[HeldPort], port: &Value, taken: impl Fn(u16) -> bool) -> Option<u16> {
    let (name, number, protocol) = (port_name(port), port_number(port), protocol(port));
    let free = || held.iter().filter(|h| !taken(h.node_port));
    free()
        .find(|h| h.name == name && h.port == number && h.protocol == protocol)
        .or_else(|| free().find(|h| h.name == name))
        .or_else(|| free().find(|h| h.port == number && h.protocol == protocol))
        .map(|h| h.node_port)
}

/// Fills in and checks the cluster IP (`spec.clusterIP` and `spec.clusterIPs`) and node ports
/// of `service`: a create when `existing` is `None`, else a replacement of `existing`.
/// `others` is what every other Service holds. Refusals are `Invalid` and name the field and
/// the value.
pub fn allocate(
    service: &mut Value,
    existing: Option<&Value>,
    others: &Allocations,
    cidr: &ServiceCidr,
) -> Result<(), StoreError> {
    let name = meta_str(service, "name").unwrap_or_default().to_string();
    let invalid = |reason: String| StoreError::Invalid {
        reason: format!("Service {name:?}: {reason}"),
    };
    let service_type = service
        .pointer("/spec/type")
        .and_then(Value::as_str)
        .filter(|t| !t.is_empty())
        .unwrap_or("ClusterIP")
        .to_string();
    if !matches!(
        service_type.as_str(),
        "ClusterIP" | "NodePort" | "LoadBalancer" | "ExternalName"
    ) {
        return Err(invalid(format!(
            "spec.type: Unsupported value: {service_type:?}: supported values: \"ClusterIP\", \"ExternalName\", \"LoadBalancer\", \"NodePort\""
        )));
    }
    let chosen_ip =
        choose_cluster_ip(service, existing, &service_type, others, cidr).map_err(invalid)?;
    let node_ports =
        choose_node_ports(service, existing, &service_type, others).map_err(invalid)?;

    let Some(root) = service.as_object_mut() else {
        return Ok(());
    };
    let Some(spec) = root
        .entry("spec")
        .or_insert_with(|| Value::Object(Map::new()))
        .as_object_mut()
    else {
        return Ok(());
    };
    match chosen_ip {
        Some(ip) => {
            spec.insert("clusterIP".into(), Value::String(ip.clone()));
            spec.insert("clusterIPs".into(), Value::Array(vec![Value::String(ip)]));
        }
        None => {
            spec.remove("clusterIP");
            spec.remove("clusterIPs");
        }
    }
    if let Some(ports) = spec.get_mut("ports").and_then(Value::as_array_mut) {
        for (port, node_port) in ports.iter_mut().zip(node_ports) {
            let Some(port) = port.as_object_mut() else {
                continue;
            };
            match node_port {
                Some(node_port) => port.insert("nodePort".into(), Value::from(node_port)),
                None => port.remove("nodePort"),
            };
        }
    }
    Ok(())
}

/// The cluster IP the Service gets (`None`: none, as for `ExternalName`).
fn choose_cluster_ip(
    service: &Value,
    existing: Option<&Value>,
    service_type: &str,
    others: &Allocations,
    cidr: &ServiceCidr,
) -> Result<Option<String>, String> {
    let asked = cluster_ip(service);
    let asked_list = service
        .pointer("/spec/clusterIPs/0")
        .and_then(Value::as_str)
        .filter(|ip| !ip.is_empty());
    let asked = match (asked, asked_list) {
        (Some(ip), Some(first)) if ip != first => {
            return Err(format!(
                "spec.clusterIPs[0]: Invalid value: {first:?}: must be the same as spec.clusterIP {ip:?}"
            ))
        }
        (ip, first) => ip.or(first),
    };
    let held = existing.and_then(cluster_ip);
    if service_type == "ExternalName" {
        // Switching to ExternalName gives up the address; asking for a new one is an error.
        return match asked {
            Some(ip) if Some(ip) != held => Err(format!(
                "spec.clusterIP: Invalid value: {ip:?}: may not be set for ExternalName services"
            )),
            _ => Ok(None),
        };
    }
    let ip = match (held, asked) {
        (Some(held), None) => held.to_string(),
        (Some(held), Some(ip)) if held == ip => held.to_string(),
        (Some(held), Some(ip)) => {
            return Err(format!(
            "spec.clusterIP: Invalid value: {ip:?}: field is immutable (the Service has {held:?})"
        ))
        }
        (None, Some(HEADLESS)) => HEADLESS.to_string(),
        (None, Some(ip)) => {
            let address: Ipv4Addr = ip.parse().map_err(|_| {
                format!("spec.clusterIP: Invalid value: {ip:?}: must be a valid IPv4 address or \"None\"")
            })?;
            if !cidr.contains(address) {
                return Err(format!(
                    "spec.clusterIP: Invalid value: {ip:?}: provided IP is not in the valid range. The range of valid IPs is {cidr}"
                ));
            }
            if let Some(holder) = others.cluster_ips.get(&address) {
                return Err(format!(
                    "spec.clusterIP: Invalid value: {ip:?}: provided IP is already allocated (to Service {holder})"
                ));
            }
            ip.to_string()
        }
        (None, None) => pick_cluster_ip(cidr, |ip| others.cluster_ips.contains_key(&ip))
            .ok_or_else(|| format!("spec.clusterIP: no free cluster IP is left in {cidr}"))?
            .to_string(),
    };
    if ip == HEADLESS && service_type != "ClusterIP" {
        return Err(format!(
            "spec.clusterIP: Invalid value: \"None\": may not be set to 'None' for {service_type} services"
        ));
    }
    Ok(Some(ip))
}

/// The node port of every entry of `spec.ports`, in order (`None`: no node port).
fn choose_node_ports(
    service: &Value,
    existing: Option<&Value>,
    service_type: &str,
    others: &Allocations,
) -> Result<Vec<Option<u16>>, String> {
    let needs_node_ports = matches!(service_type, "NodePort" | "LoadBalancer");
    let allocates = service_type == "NodePort"
        || (service_type == "LoadBalancer"
            && service
                .pointer("/spec/allocateLoadBalancerNodePorts")
                .and_then(Value::as_bool)
                != Some(false));
    let held = held_ports(existing);
    let ports: Vec<&Value> = ports(service).collect();
    let mut chosen: Vec<Option<u16>> = vec![None; ports.len()];
    // Explicit node ports first, so that none of them is handed to another port.
    let mut taken: BTreeSet<u16> = BTreeSet::new();
    let mut taken_with_protocol: BTreeSet<(u16, &str)> = BTreeSet::new();
    for (index, port) in ports.iter().enumerate() {
        let Some(asked) = node_port(port) else {
            continue;
        };
        let field = format!("spec.ports[{index}].nodePort");
        if !needs_node_ports {
            // Left over from the type the Service had: dropped with the type change.
            if held.iter().any(|h| i64::from(h.node_port) == asked) {
                continue;
            }
            return Err(format!(
                "{field}: Forbidden: may not be used when `type` is '{service_type}'"
            ));
        }
        let number = u16::try_from(asked)
            .ok()
            .filter(|p| (NODE_PORT_MIN..=NODE_PORT_MAX).contains(p))
            .ok_or_else(|| {
                format!(
                    "{field}: Invalid value: {asked}: provided port is not in the valid range. The range of valid ports is {NODE_PORT_MIN}-{NODE_PORT_MAX}"
                )
            })?;
        if !taken_with_protocol.insert((number, protocol(port))) {
            return Err(format!("{field}: Duplicate value: {number}"));
        }
        if let Some(holder) = others.node_ports.get(&number) {
            return Err(format!(
                "{field}: Invalid value: {number}: provided port is already allocated (to Service {holder})"
            ));
        }
        taken.insert(number);
        chosen[index] = Some(number);
    }
    if !allocates {
        return Ok(chosen);
    }
    for (index, port) in ports.iter().enumerate() {
        if chosen[index].is_some() {
            continue;
        }
        let in_use = |p: u16| taken.contains(&p) || others.node_ports.contains_key(&p);
        let number = previous_node_port(&held, port, in_use)
            .or_else(|| pick_node_port(in_use))
            .ok_or_else(|| {
                format!(
                    "spec.ports[{index}].nodePort: no free node port is left in {NODE_PORT_MIN}-{NODE_PORT_MAX}"
                )
            })?;
        taken.insert(number);
        chosen[index] = Some(number);
    }
    Ok(chosen)
}

#[cfg(test)]
mod tests;
