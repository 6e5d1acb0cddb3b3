//! Pod routing when the node is its pods' gateway (`--pod-gateway-in-node`): the node holds
//! the gateway address of its pod network, and routes every other node's pod subnet through
//! that node's address, so pod IPs are reachable across nodes without encapsulation (what
//! flannel calls host-gw). The desired routes are a pure function of the Node objects; the
//! shell applies the difference with `ip`, level-driven, every few seconds.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::Duration;

use flotilla_raft::selector::{FieldSelector, LabelSelector};
use flotilla_raft::{store, Replica};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::ip::ip;

const ROUTES_INTERVAL: Duration = Duration::from_secs(2);

/// Every other node's pod subnet → that node's InternalIP.
pub(crate) fn desired_routes(nodes: &[Value], own_name: &str) -> BTreeMap<String, Ipv4Addr> {
    nodes
        .iter()
        .filter(|node| node.pointer("/metadata/name").and_then(Value::as_str) != Some(own_name))
        .filter_map(|node| {
            let cidr = store::pod_cidr(node)?;
            parse_cidr(cidr)?;
            let address = node
                .pointer("/status/addresses")?
                .as_array()?
                .iter()
                .find(|a| a.get("type").and_then(Value::as_str) == Some("InternalIP"))?
                .get("address")?
                .as_str()?
                .parse::<Ipv4Addr>()
                .ok()?;
            Some((cidr.to_owned(), address))
        })
        .collect()
}

/// An IPv4 subnet `a.b.c.d/len` as its address and prefix length.
pub(crate) fn parse_cidr(cidr: &str) -> Option<(Ipv4Addr, u8)> {
    let (address, length) = cidr.split_once('/')?;
    let length: u8 = length.parse().ok().filter(|l| *l <= 32)?;
    Some((address.parse().ok()?, length))
}

/// Whether `address` is inside the subnet `cidr`.
pub(crate) fn contains(cidr: (Ipv4Addr, u8), address: Ipv4Addr) -> bool {
    let mask = u32::MAX.checked_shl(32 - u32::from(cidr.1)).unwrap_or(0);
    u32::from(cidr.0) & mask == u32::from(address) & mask
}

/// The interface holding an address inside `cidr`, from `ip -o -4 addr show`, and whether it
/// holds `gateway` already.
pub(crate) fn pod_interface(
    ip_addr_output: &str,
    cidr: &str,
    gateway: Ipv4Addr,
) -> Option<(String, bool)> {
    let subnet = parse_cidr(cidr)?;
    let mut found: Option<String> = None;
    let mut has_gateway = false;
    for line in ip_addr_output.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let Some(position) = fields.iter().position(|f| *f == "inet") else {
            continue;
        };
        let (Some(interface), Some(address)) = (fields.get(1), fields.get(position + 1)) else {
            continue;
        };
        let Some(address) = address
            .split('/')
            .next()
            .and_then(|a| a.parse::<Ipv4Addr>().ok())
        else {
            continue;
        };
        if contains(subnet, address) {
            found.get_or_insert_with(|| interface.trim_end_matches(':').to_owned());
            has_gateway |= address == gateway;
        }
    }
    found.map(|interface| (interface, has_gateway))
}

/// Adds the pod network's gateway address to the interface on the pod network, if missing.
async fn ensure_gateway(pod_cidr: &str) -> Result<(), String> {
    let (network, length) =
        parse_cidr(pod_cidr).ok_or_else(|| format!("pod subnet {pod_cidr:?}"))?;
    let gateway = Ipv4Addr::from(u32::from(network) + 1);
    let addresses = ip(&["-o", "-4", "addr", "show"]).await?;
    match pod_interface(&addresses, pod_cidr, gateway) {
        Some((_, true)) => Ok(()),
        Some((interface, false)) => {
            ip(&[
                "addr",
                "add",
                &format!("{gateway}/{length}"),
                "dev",
                &interface,
            ])
            .await?;
            tracing::info!(%gateway, %interface, "holding the pod network's gateway address");
            Ok(())
        }
        None => Err(format!(
            "no interface of this node is on the pod network {pod_cidr}"
        )),
    }
}

/// Holds the gateway address and keeps the routes to other nodes' pod subnets until shutdown.
pub(crate) async fn run(
    replica: Replica,
    own_name: String,
    pod_cidr: String,
    shutdown: CancellationToken,
) {
    let mut applied: BTreeMap<String, Ipv4Addr> = BTreeMap::new();
    let mut tick = tokio::time::interval(ROUTES_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Err(error) = ensure_gateway(&pod_cidr).await {
            tracing::warn!(%error, "hold the pod network's gateway address");
        }
        let nodes = match replica.reader().list(
            "Node",
            None,
            &LabelSelector::default(),
            &FieldSelector::default(),
        ) {
            Ok((nodes, _)) => nodes,
            Err(error) => {
                tracing::warn!(%error, "list nodes for pod routes");
                continue;
            }
        };
        let desired = desired_routes(&nodes, &own_name);
        for (cidr, via) in &desired {
            if applied.get(cidr) == Some(via) {
                continue;
            }
            match ip(&["route", "replace", cidr, "via", &via.to_string()]).await {
                Ok(_) => {
                    tracing::info!(%cidr, %via, "route to a node's pods");
                    applied.insert(cidr.clone(), *via);
                }
                Err(error) => tracing::warn!(%error, "route to a node's pods"),
            }
        }
        let gone: Vec<String> = applied
            .keys()
            .filter(|cidr| !desired.contains_key(*cidr))
            .cloned()
            .collect();
        for cidr in gone {
            if let Err(error) = ip(&["route", "del", &cidr]).await {
                tracing::warn!(%error, "remove the route to a departed node's pods");
            }
            applied.remove(&cidr);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn node(name: &str, cidr: &str, ip: &str) -> Value {
        json!({
            "metadata": {"name": name},
            "spec": {"podCIDR": cidr},
            "status": {"addresses": [{"type": "InternalIP", "address": ip}, {"type": "Hostname", "address": name}]}
        })
    }

    #[test]
    fn every_other_nodes_pod_subnet_is_routed_through_that_node() {
        let nodes = vec![
            node("n1", "10.200.1.0/24", "10.200.0.11"),
            node("n2", "10.200.2.0/24", "10.200.0.12"),
            node("n3", "10.200.3.0/24", "10.200.0.13"),
            json!({"metadata": {"name": "n4"}, "spec": {}}),
        ];
        let routes = desired_routes(&nodes, "n1");
        assert_eq!(
            routes,
            BTreeMap::from([
                ("10.200.2.0/24".to_string(), Ipv4Addr::new(10, 200, 0, 12)),
                ("10.200.3.0/24".to_string(), Ipv4Addr::new(10, 200, 0, 13)),
            ])
        );
    }

    #[test]
    fn the_interface_on_the_pod_network_is_found_and_the_gateway_checked() {
        let output = "1: lo    inet 127.0.0.1/8 scope host lo\n\
            2: eth0    inet 10.200.0.11/24 brd 10.200.0.255 scope global eth0\n\
            3: eth1    inet 10.200.1.254/24 brd 10.200.1.255 scope global eth1\n";
        let gateway = Ipv4Addr::new(10, 200, 1, 1);
        assert_eq!(
            pod_interface(output, "10.200.1.0/24", gateway),
            Some(("eth1".to_string(), false))
        );
        let with_gateway = format!("{output}3: eth1    inet 10.200.1.1/24 scope global eth1\n");
        assert_eq!(
            pod_interface(&with_gateway, "10.200.1.0/24", gateway),
            Some(("eth1".to_string(), true))
        );
        assert_eq!(pod_interface(output, "10.200.9.0/24", gateway), None);
    }
}
