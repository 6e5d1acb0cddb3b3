//! Pod addresses on a host bridge, which the agent hands out itself (a Docker network's own
//! address manager does it otherwise): pure choices, the agent keeps the table.

use std::collections::HashSet;
use std::net::Ipv4Addr;

/// The address for a pod: `preferred` (the pod's address before a restart) when it is a free
/// host address of `subnet`, else the lowest free one; none when the subnet is full. The
/// subnet's network and broadcast addresses and the gateway are never handed out.
pub(crate) fn choose(
    subnet: (Ipv4Addr, u8),
    gateway: Ipv4Addr,
    taken: &HashSet<Ipv4Addr>,
    preferred: Option<Ipv4Addr>,
) -> Option<Ipv4Addr> {
    let (base, prefix_len) = subnet;
    if prefix_len > 30 {
        return None;
    }
    let size = 1u32 << (32 - u32::from(prefix_len));
    let network = u32::from(base) & !(size - 1);
    let broadcast = network + size - 1;
    let usable = |address: Ipv4Addr| {
        let value = u32::from(address);
        value > network && value < broadcast && address != gateway && !taken.contains(&address)
    };
    if let Some(address) = preferred.filter(|address| usable(*address)) {
        return Some(address);
    }
    (network + 1..broadcast)
        .map(Ipv4Addr::from)
        .find(|address| usable(*address))
}

/// The name of this node's host bridge: `flt` and 12 hex digits of a hash of the cluster id
/// and node name, so that nodes of several clusters on one host never share one, within the
/// 15 bytes of an interface name. FNV-1a: stable across builds, unlike std's hasher.
pub(crate) fn bridge_name(cluster_id: &str, node_name: &str) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in cluster_id.bytes().chain([0]).chain(node_name.bytes()) {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("flt{:012x}", hash & 0xffff_ffff_ffff)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subnet() -> (Ipv4Addr, u8) {
        (Ipv4Addr::new(10, 244, 3, 0), 24)
    }

    const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 244, 3, 1);

    #[test]
    fn the_lowest_free_address_after_the_gateway_is_handed_out() {
        let taken = HashSet::from([Ipv4Addr::new(10, 244, 3, 2)]);
        assert_eq!(
            choose(subnet(), GATEWAY, &taken, None),
            Some(Ipv4Addr::new(10, 244, 3, 3))
        );
    }

    #[test]
    fn a_pod_keeps_its_previous_address_when_it_is_free() {
        let preferred = Some(Ipv4Addr::new(10, 244, 3, 77));
        assert_eq!(
            choose(subnet(), GATEWAY, &HashSet::new(), preferred),
            preferred
        );
        let taken = HashSet::from([Ipv4Addr::new(10, 244, 3, 77)]);
        assert_eq!(
            choose(subnet(), GATEWAY, &taken, preferred),
            Some(Ipv4Addr::new(10, 244, 3, 2))
        );
    }

    #[test]
    fn the_gateway_network_broadcast_and_foreign_addresses_are_never_handed_out() {
        for preferred in [
            GATEWAY,
            Ipv4Addr::new(10, 244, 3, 0),
            Ipv4Addr::new(10, 244, 3, 255),
            Ipv4Addr::new(10, 244, 4, 9),
        ] {
            let chosen = choose(subnet(), GATEWAY, &HashSet::new(), Some(preferred));
            assert_eq!(chosen, Some(Ipv4Addr::new(10, 244, 3, 2)), "{preferred}");
        }
    }

    #[test]
    fn a_full_subnet_hands_out_nothing() {
        let subnet = (Ipv4Addr::new(10, 244, 3, 0), 29);
        let taken: HashSet<Ipv4Addr> = (2..7).map(|i| Ipv4Addr::new(10, 244, 3, i)).collect();
        assert_eq!(choose(subnet, GATEWAY, &taken, None), None);
    }

    #[test]
    fn bridge_names_fit_an_interface_name_and_differ_by_cluster_and_node() {
        let name = bridge_name("6759253a-5c67-40ee-81aa-d34dcbffda81", "n1");
        assert_eq!(name.len(), 15);
        assert!(name.starts_with("flt"));
        assert_eq!(
            name,
            bridge_name("6759253a-5c67-40ee-81aa-d34dcbffda81", "n1")
        );
        assert_ne!(
            name,
            bridge_name("6759253a-5c67-40ee-81aa-d34dcbffda81", "n2")
        );
        assert_ne!(name, bridge_name("another-cluster", "n1"));
    }
}
