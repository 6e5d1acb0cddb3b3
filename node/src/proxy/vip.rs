//! The cluster IPs this node holds: every VIP of the routing table as a `/32` on the
//! interface `flotilla0`, so connections to it (from this node's pods, which route through
//! the node) are delivered to the proxy's listeners. Level-driven: the wanted set is compared
//! with what `ip -o addr show dev flotilla0` lists and the difference applied.
//!
//! `flotilla0` is a dummy interface; where the kernel has no dummy driver (some container
//! hosts), a bridge without ports stands in for it (it holds addresses the same way). Only
//! done when the node runs in its own network namespace (`--pod-gateway-in-node`).

use std::collections::BTreeSet;
use std::net::IpAddr;

use crate::ip::ip;

pub(crate) const INTERFACE: &str = "flotilla0";

/// What to change on the interface.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct VipChanges {
    pub(crate) add: Vec<IpAddr>,
    pub(crate) remove: Vec<IpAddr>,
}

impl VipChanges {
    pub(crate) fn is_empty(&self) -> bool {
        self.add.is_empty() && self.remove.is_empty()
    }
}

/// The changes that make `bound` into `wanted`.
pub(crate) fn diff(wanted: &BTreeSet<IpAddr>, bound: &BTreeSet<IpAddr>) -> VipChanges {
    VipChanges {
        add: wanted.difference(bound).copied().collect(),
        remove: bound.difference(wanted).copied().collect(),
    }
}

/// The addresses in `ip -o addr show dev IF` output (both families).
pub(crate) fn parse_addresses(ip_output: &str) -> BTreeSet<IpAddr> {
    ip_output
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let position = fields.iter().position(|f| *f == "inet" || *f == "inet6")?;
            fields
                .get(position + 1)?
                .split('/')
                .next()?
                .parse::<IpAddr>()
                .ok()
        })
        // The kernel gives an interface its own IPv6 link-local address; not ours.
        .filter(|ip| match ip {
            IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) != 0xfe80,
            IpAddr::V4(_) => true,
        })
        .collect()
}

fn prefix_of(ip: IpAddr) -> u8 {
    match ip {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    }
}

/// Creates `flotilla0` if missing and brings it up.
async fn ensure_interface() -> Result<(), String> {
    if ip(&["link", "show", INTERFACE]).await.is_err() {
        if let Err(dummy) = ip(&["link", "add", INTERFACE, "type", "dummy"]).await {
            ip(&["link", "add", INTERFACE, "type", "bridge"])
                .await
                .map_err(|bridge| format!("{dummy}; {bridge}"))?;
            tracing::info!(
                interface = INTERFACE,
                "no dummy interfaces here; a port-less bridge holds the cluster IPs"
            );
        }
    }
    ip(&["link", "set", INTERFACE, "up"]).await.map(drop)
}

/// Makes `flotilla0` hold exactly `wanted`; returns the addresses held afterwards (those that
/// could be added, none of those that could be removed).
pub(crate) async fn sync(wanted: &BTreeSet<IpAddr>) -> Result<BTreeSet<IpAddr>, String> {
    ensure_interface().await?;
    let bound = parse_addresses(&ip(&["-o", "addr", "show", "dev", INTERFACE]).await?);
    let changes = diff(wanted, &bound);
    if changes.is_empty() {
        return Ok(bound);
    }
    let mut held = bound;
    for address in &changes.remove {
        let cidr = format!("{address}/{}", prefix_of(*address));
        match ip(&["addr", "del", &cidr, "dev", INTERFACE]).await {
            Ok(_) => {
                held.remove(address);
                tracing::info!(%address, "cluster IP released");
            }
            Err(error) => tracing::warn!(%error, "release a cluster IP"),
        }
    }
    for address in &changes.add {
        let cidr = format!("{address}/{}", prefix_of(*address));
        match ip(&["addr", "add", &cidr, "dev", INTERFACE]).await {
            Ok(_) => {
                held.insert(*address);
                tracing::info!(%address, "cluster IP bound");
            }
            Err(error) => tracing::warn!(%error, "bind a cluster IP"),
        }
    }
    Ok(held)
}

/// Removes `flotilla0` (and with it every cluster IP).
pub(crate) async fn remove_interface() {
    if ip(&["link", "show", INTERFACE]).await.is_ok() {
        if let Err(error) = ip(&["link", "del", INTERFACE]).await {
            tracing::warn!(%error, "remove the cluster IP interface");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(addresses: &[&str]) -> BTreeSet<IpAddr> {
        addresses
            .iter()
            .map(|a| a.parse().expect("an address"))
            .collect()
    }

    #[test]
    fn new_cluster_ips_are_added_and_departed_ones_removed() {
        let changes = diff(
            &set(&["10.96.0.1", "10.96.0.10", "10.96.0.20"]),
            &set(&["10.96.0.1", "10.96.0.99"]),
        );
        assert_eq!(
            changes,
            VipChanges {
                add: set(&["10.96.0.10", "10.96.0.20"]).into_iter().collect(),
                remove: set(&["10.96.0.99"]).into_iter().collect(),
            }
        );
    }

    #[test]
    fn a_settled_interface_needs_no_change() {
        let held = set(&["10.96.0.1", "10.96.0.10"]);
        assert!(diff(&held, &held).is_empty());
    }

    #[test]
    fn the_addresses_are_read_from_ip_output_without_the_link_local_one() {
        let output = "5: flotilla0    inet 10.96.0.10/32 scope global flotilla0\\       valid_lft forever preferred_lft forever\n\
            5: flotilla0    inet 10.96.12.7/32 scope global flotilla0\\       valid_lft forever preferred_lft forever\n\
            5: flotilla0    inet6 fe80::d4eb:d4ff:fead:291e/64 scope link \\       valid_lft forever preferred_lft forever\n";
        assert_eq!(parse_addresses(output), set(&["10.96.0.10", "10.96.12.7"]));
        assert!(parse_addresses("").is_empty());
    }
}
