//! The `/etc/resolv.conf` and `/etc/hosts` of a pod wired to a host bridge (pure). The engine
//! writes them only for a container whose network it runs; for a pod on a host bridge it runs
//! none, so the node writes them into the pod's directory and mounts them into each of its
//! containers, as the kubelet does with its `etc-hosts` file. They say what the engine's would
//! have said: the pod's resolver, with the node's in each list the pod leaves empty (its
//! nameservers without the loopback or IPv6 ones a pod cannot reach, as Docker filters them),
//! and the localhost names plus the pod's own address and hostname.

use crate::dns::resolv_conf::ResolvConf;

use super::pod_dns::PodDns;

/// The name of the pod's resolv.conf in its directory.
pub(super) const RESOLV_CONF_FILE: &str = "resolv.conf";
/// The name of the pod's hosts file in its directory (the kubelet's name for it).
pub(super) const HOSTS_FILE: &str = "etc-hosts";

/// A resolv.conf keeps at most this many nameservers.
const MAX_NAMESERVERS: usize = 3;

/// The resolv.conf of a pod whose resolver is `pod`, on a node whose own is `node`.
pub(super) fn resolv_conf(pod: &PodDns, node: &ResolvConf) -> String {
    let servers: Vec<String> = if pod.servers.is_empty() {
        node.nameservers
            .iter()
            .filter(|address| address.is_ipv4() && !address.is_loopback())
            .take(MAX_NAMESERVERS)
            .map(ToString::to_string)
            .collect()
    } else {
        pod.servers.clone()
    };
    let searches = if pod.searches.is_empty() {
        &node.searches
    } else {
        &pod.searches
    };
    let options = if pod.options.is_empty() {
        &node.options
    } else {
        &pod.options
    };
    let mut text = String::from("# Written by Flotilla for a pod on a host bridge.\n");
    for server in servers {
        text.push_str(&format!("nameserver {server}\n"));
    }
    if !searches.is_empty() {
        text.push_str(&format!("search {}\n", searches.join(" ")));
    }
    if !options.is_empty() {
        text.push_str(&format!("options {}\n", options.join(" ")));
    }
    text
}

/// The hosts file of a pod at `pod_ip` named `hostname`.
pub(super) fn hosts(pod_ip: &str, hostname: &str) -> String {
    format!(
        "# Kubernetes-managed hosts file (written by Flotilla).\n\
         127.0.0.1\tlocalhost\n\
         ::1\tlocalhost ip6-localhost ip6-loopback\n\
         fe00::0\tip6-localnet\n\
         fe00::0\tip6-mcastprefix\n\
         fe00::1\tip6-allnodes\n\
         fe00::2\tip6-allrouters\n\
         {pod_ip}\t{hostname}\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dns::resolv_conf;

    fn node() -> ResolvConf {
        resolv_conf::parse(
            "nameserver 127.0.0.53\nnameserver 192.168.1.1\nnameserver fd00::1\n\
             nameserver 192.168.1.2\nsearch corp.example\noptions edns0 trust-ad\n",
        )
    }

    #[test]
    fn a_cluster_first_pod_gets_its_own_resolver_and_nothing_of_the_nodes() {
        let pod = PodDns {
            servers: vec!["10.244.1.1".to_owned()],
            searches: vec![
                "default.svc.cluster.local".to_owned(),
                "svc.cluster.local".to_owned(),
            ],
            options: vec!["ndots:5".to_owned()],
        };
        assert_eq!(
            resolv_conf(&pod, &node()),
            "# Written by Flotilla for a pod on a host bridge.\n\
             nameserver 10.244.1.1\n\
             search default.svc.cluster.local svc.cluster.local\n\
             options ndots:5\n"
        );
    }

    #[test]
    fn the_lists_a_pod_leaves_empty_are_the_nodes_without_loopback_or_ipv6_servers() {
        let text = resolv_conf(&PodDns::default(), &node());
        assert!(
            text.ends_with(
                "nameserver 192.168.1.1\nnameserver 192.168.1.2\n\
                 search corp.example\noptions edns0 trust-ad\n"
            ),
            "{text}"
        );
        let only_searches = PodDns {
            searches: vec!["mine.example".to_owned()],
            ..PodDns::default()
        };
        let text = resolv_conf(&only_searches, &node());
        assert!(text.contains("nameserver 192.168.1.1\n"), "{text}");
        assert!(text.contains("search mine.example\n"), "{text}");
        assert!(!text.contains("corp.example"), "{text}");
    }

    #[test]
    fn a_node_with_only_a_loopback_resolver_gives_a_pod_no_nameserver_line() {
        let local_only = resolv_conf::parse("nameserver 127.0.0.53\n");
        let text = resolv_conf(&PodDns::default(), &local_only);
        assert!(!text.contains("nameserver"), "{text}");
    }

    #[test]
    fn the_hosts_file_names_localhost_and_the_pod_at_its_address() {
        let text = hosts("10.244.1.7", "web-0");
        assert!(text.contains("127.0.0.1\tlocalhost\n"), "{text}");
        assert!(text.ends_with("10.244.1.7\tweb-0\n"), "{text}");
    }
}
