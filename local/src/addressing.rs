//! The addresses of a local cluster, all inside `10.P.0.0/16` (pure).

use std::net::Ipv4Addr;

/// The second octets a local cluster may take: `10.200.0.0/16` up to `10.254.0.0/16`.
const FIRST_PREFIX: u8 = 200;
const LAST_PREFIX: u8 = 254;
/// Node `i` is `10.P.0.(NODE_HOST_OFFSET + i)` on the cluster network.
const NODE_HOST_OFFSET: u8 = 10;
/// The most nodes one local cluster has (addresses and pod subnets stay in range).
pub const MAX_NODES: usize = 50;

/// Where the addresses of one local cluster come from: `10.P.0.0/16`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Addressing {
    pub prefix: u8,
}

impl Addressing {
    /// The cluster network, node to node: `10.P.0.0/24`.
    pub fn cluster_subnet(&self) -> String {
        format!("10.{}.0.0/24", self.prefix)
    }

    /// The whole range, given to the nodes as `--cluster-cidr`.
    pub fn cluster_cidr(&self) -> String {
        format!("10.{}.0.0/16", self.prefix)
    }

    /// Node `index` (1-based) on the cluster network.
    pub fn node_ip(&self, index: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, self.prefix, 0, NODE_HOST_OFFSET + host_octet(index))
    }

    /// The pod subnet of node `index`: `10.P.index.0/24`.
    pub fn pod_cidr(&self, index: usize) -> String {
        format!("10.{}.{}.0/24", self.prefix, host_octet(index))
    }

    /// The pod network's gateway, held by the node container.
    pub fn pod_gateway(&self, index: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, self.prefix, host_octet(index), 1)
    }

    /// The address Docker gives the node container on its pod network (the gateway `.1` is
    /// reserved by Docker's address manager, so the node joins with `.254` and adds `.1`).
    pub fn node_pod_address(&self, index: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, self.prefix, host_octet(index), 254)
    }

    /// Which node index a cluster-network address belongs to.
    pub fn index_of_node_ip(&self, ip: Ipv4Addr) -> Option<usize> {
        let [a, b, c, d] = ip.octets();
        (a == 10 && b == self.prefix && c == 0 && d > NODE_HOST_OFFSET)
            .then(|| usize::from(d - NODE_HOST_OFFSET))
            .filter(|index| *index <= MAX_NODES)
    }
}

fn host_octet(index: usize) -> u8 {
    u8::try_from(index.clamp(1, MAX_NODES)).unwrap_or(1)
}

/// Parses `a.b.c.d/len` into the network address and prefix length.
pub fn parse_cidr(cidr: &str) -> Option<(u32, u8)> {
    let (address, length) = cidr.split_once('/')?;
    let address: Ipv4Addr = address.parse().ok()?;
    let length: u8 = length.parse().ok()?;
    if length > 32 {
        return None;
    }
    let mask = if length == 0 {
        0
    } else {
        u32::MAX << (32 - length)
    };
    Some((u32::from(address) & mask, length))
}

/// Whether two IPv4 CIDRs share any address.
pub fn overlaps(a: (u32, u8), b: (u32, u8)) -> bool {
    let shorter = a.1.min(b.1);
    let mask = if shorter == 0 {
        0
    } else {
        u32::MAX << (32 - shorter)
    };
    a.0 & mask == b.0 & mask
}

/// Picks the `/16` for a new cluster: the first of `10.200`..`10.254`, starting from a place
/// derived from the name (so two clusters made at once rarely pick the same one), that overlaps
/// none of the subnets already in use on the daemon (IPv6 and unparsable ones are ignored).
pub fn choose_addressing(name: &str, used_subnets: &[String]) -> Option<Addressing> {
    let used: Vec<(u32, u8)> = used_subnets.iter().filter_map(|s| parse_cidr(s)).collect();
    let span = u32::from(LAST_PREFIX - FIRST_PREFIX) + 1;
    let start = name.bytes().fold(0u32, |hash, byte| {
        hash.wrapping_mul(31).wrapping_add(u32::from(byte))
    }) % span;
    (0..span)
        .map(|step| FIRST_PREFIX + u8::try_from((start + step) % span).unwrap_or(0))
        .map(|prefix| Addressing { prefix })
        .find(|addressing| {
            let candidate = parse_cidr(&addressing.cluster_cidr());
            candidate.is_some_and(|candidate| !used.iter().any(|u| overlaps(*u, candidate)))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cluster_keeps_its_nodes_and_pod_subnets_inside_its_slash_16() {
        let addressing = Addressing { prefix: 213 };
        assert_eq!(addressing.cluster_subnet(), "10.213.0.0/24");
        assert_eq!(addressing.cluster_cidr(), "10.213.0.0/16");
        assert_eq!(addressing.node_ip(1), Ipv4Addr::new(10, 213, 0, 11));
        assert_eq!(addressing.pod_cidr(3), "10.213.3.0/24");
        assert_eq!(addressing.pod_gateway(3), Ipv4Addr::new(10, 213, 3, 1));
        assert_eq!(
            addressing.node_pod_address(3),
            Ipv4Addr::new(10, 213, 3, 254)
        );
        assert_eq!(
            addressing.index_of_node_ip(Ipv4Addr::new(10, 213, 0, 12)),
            Some(2)
        );
        assert_eq!(
            addressing.index_of_node_ip(Ipv4Addr::new(10, 213, 1, 12)),
            None
        );
    }

    #[test]
    fn a_new_cluster_avoids_every_subnet_in_use() {
        let first = choose_addressing("demo", &[]).expect("a free range");
        let used = vec![first.cluster_subnet(), "172.17.0.0/16".to_string()];
        let second = choose_addressing("demo", &used).expect("another free range");
        assert_ne!(first, second);
        // A wide network in use covers many candidates at once.
        let wide = vec!["10.192.0.0/10".to_string()];
        assert_eq!(choose_addressing("demo", &wide), None);
    }

    #[test]
    fn overlapping_cidrs_are_detected_in_both_directions() {
        let wide = parse_cidr("10.200.0.0/16").expect("valid");
        let narrow = parse_cidr("10.200.7.0/24").expect("valid");
        let other = parse_cidr("10.201.0.0/24").expect("valid");
        assert!(overlaps(wide, narrow));
        assert!(overlaps(narrow, wide));
        assert!(!overlaps(wide, other));
        assert_eq!(parse_cidr("fd00::/64"), None);
        assert_eq!(parse_cidr("10.0.0.0/33"), None);
    }
}
