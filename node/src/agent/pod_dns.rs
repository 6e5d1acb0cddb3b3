//! A pod's resolver, as the kubelet makes it from `spec.dnsPolicy` and `spec.dnsConfig`
//! (pure):
//!
//! - `ClusterFirst` (the default; also `ClusterFirstWithHostNet`): the node's cluster DNS
//!   server, the searches `<ns>.svc.cluster.local`, `svc.cluster.local`, `cluster.local` and
//!   then the node's own, and `ndots:5`. Without a cluster DNS server (or for a `hostNetwork`
//!   pod with plain `ClusterFirst`) it is `Default`, as the kubelet falls back.
//! - `Default`: the node's resolver, i.e. what the container engine gives.
//! - `None`: only what `dnsConfig` says.
//!
//! `dnsConfig` is then merged in as Kubernetes does: its nameservers and searches are appended
//! (duplicates dropped), its options replace the options of the same name or are appended.
//! At most 3 nameservers and 32 search domains are kept (the kubelet's limits). With `Default`,
//! a list `dnsConfig` gives replaces the engine's list rather than extending it (the engine
//! fills only lists left empty).

use k8s_openapi::api::core::v1::Pod;

/// A resolv.conf keeps at most this many nameservers.
const MAX_NAMESERVERS: usize = 3;
/// The kubelet keeps at most this many search domains.
const MAX_SEARCHES: usize = 32;
/// The `ndots` of `ClusterFirst` pods: names with fewer dots try the search list first.
const CLUSTER_NDOTS: &str = "ndots:5";

/// The node's cluster DNS server, as pods use it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ClusterDns {
    /// The server's address (the node's pod gateway).
    pub(crate) server: String,
    /// The cluster domain, `cluster.local`.
    pub(crate) domain: String,
    /// The search domains of the node's own resolv.conf.
    pub(crate) node_searches: Vec<String>,
}

/// A pod's resolver; empty lists leave the engine's defaults.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct PodDns {
    pub(crate) servers: Vec<String>,
    pub(crate) searches: Vec<String>,
    pub(crate) options: Vec<String>,
}

fn push_new(list: &mut Vec<String>, items: impl IntoIterator<Item = String>) {
    for item in items {
        if !item.is_empty() && !list.contains(&item) {
            list.push(item);
        }
    }
}

/// The name of a resolv.conf option (`ndots` of `ndots:5`).
fn option_name(option: &str) -> &str {
    option.split_once(':').map_or(option, |(name, _)| name)
}

/// The resolver of `pod`; `cluster` is `None` when the node runs no cluster DNS server.
pub(crate) fn pod_dns(pod: &Pod, cluster: Option<&ClusterDns>) -> PodDns {
    let spec = pod.spec.as_ref();
    let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
    let host_network = spec.and_then(|s| s.host_network) == Some(true);
    let policy = spec
        .and_then(|s| s.dns_policy.as_deref())
        .filter(|p| !p.is_empty())
        .unwrap_or("ClusterFirst");
    let cluster_first = match policy {
        "ClusterFirstWithHostNet" => true,
        "ClusterFirst" => !host_network,
        _ => false,
    };
    let mut dns = PodDns::default();
    match (policy, cluster_first.then_some(cluster).flatten()) {
        ("None", _) => {}
        (_, Some(cluster)) => {
            dns.servers.push(cluster.server.clone());
            let domain = &cluster.domain;
            push_new(
                &mut dns.searches,
                [
                    format!("{namespace}.svc.{domain}"),
                    format!("svc.{domain}"),
                    domain.clone(),
                ],
            );
            push_new(&mut dns.searches, cluster.node_searches.iter().cloned());
            dns.options.push(CLUSTER_NDOTS.to_owned());
        }
        // `Default`, or `ClusterFirst` without a cluster DNS server: the engine's resolver.
        (_, None) => {}
    }
    if let Some(config) = spec.and_then(|s| s.dns_config.as_ref()) {
        push_new(
            &mut dns.servers,
            config.nameservers.iter().flatten().cloned(),
        );
        push_new(&mut dns.searches, config.searches.iter().flatten().cloned());
        for option in config.options.iter().flatten() {
            let Some(name) = option.name.as_deref().filter(|n| !n.is_empty()) else {
                continue;
            };
            let text = match option.value.as_deref() {
                Some(value) if !value.is_empty() => format!("{name}:{value}"),
                _ => name.to_owned(),
            };
            match dns.options.iter_mut().find(|o| option_name(o) == name) {
                Some(existing) => *existing = text,
                None => dns.options.push(text),
            }
        }
    }
    dns.servers.truncate(MAX_NAMESERVERS);
    dns.searches.truncate(MAX_SEARCHES);
    dns
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn pod(spec: serde_json::Value) -> Pod {
        let mut spec = spec;
        spec["containers"] = json!([{"name": "app", "image": "flotilla/busybox:latest"}]);
        serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "web", "namespace": "prod"},
            "spec": spec
        }))
        .expect("the pod parses")
    }

    fn cluster() -> ClusterDns {
        ClusterDns {
            server: "10.244.1.1".into(),
            domain: "cluster.local".into(),
            node_searches: vec!["corp.example".into()],
        }
    }

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_cluster_first_pod_resolves_through_the_node_with_the_cluster_searches_and_ndots() {
        let dns = pod_dns(&pod(json!({})), Some(&cluster()));
        assert_eq!(dns.servers, strings(&["10.244.1.1"]));
        assert_eq!(
            dns.searches,
            strings(&[
                "prod.svc.cluster.local",
                "svc.cluster.local",
                "cluster.local",
                "corp.example"
            ])
        );
        assert_eq!(dns.options, strings(&["ndots:5"]));
        assert_eq!(
            pod_dns(&pod(json!({"dnsPolicy": "ClusterFirst"})), Some(&cluster())),
            dns
        );
    }

    #[test]
    fn without_a_cluster_dns_server_cluster_first_falls_back_to_the_engines_resolver() {
        assert_eq!(pod_dns(&pod(json!({})), None), PodDns::default());
    }

    #[test]
    fn a_host_network_pod_needs_cluster_first_with_host_net_for_the_cluster_resolver() {
        let host = pod(json!({"hostNetwork": true}));
        assert_eq!(pod_dns(&host, Some(&cluster())), PodDns::default());
        let with_host_net =
            pod(json!({"hostNetwork": true, "dnsPolicy": "ClusterFirstWithHostNet"}));
        assert_eq!(
            pod_dns(&with_host_net, Some(&cluster())).servers,
            strings(&["10.244.1.1"])
        );
    }

    #[test]
    fn the_default_policy_leaves_the_engines_resolver() {
        let dns = pod_dns(&pod(json!({"dnsPolicy": "Default"})), Some(&cluster()));
        assert_eq!(dns, PodDns::default());
    }

    #[test]
    fn dns_config_is_appended_without_duplicates_and_its_options_replace_by_name() {
        let dns = pod_dns(
            &pod(json!({
                "dnsConfig": {
                    "nameservers": ["10.244.1.1", "192.0.2.53"],
                    "searches": ["svc.cluster.local", "extra.example"],
                    "options": [
                        {"name": "ndots", "value": "2"},
                        {"name": "edns0"},
                        {"value": "nameless"}
                    ]
                }
            })),
            Some(&cluster()),
        );
        assert_eq!(dns.servers, strings(&["10.244.1.1", "192.0.2.53"]));
        assert_eq!(
            dns.searches,
            strings(&[
                "prod.svc.cluster.local",
                "svc.cluster.local",
                "cluster.local",
                "corp.example",
                "extra.example"
            ])
        );
        assert_eq!(dns.options, strings(&["ndots:2", "edns0"]));
    }

    #[test]
    fn the_none_policy_takes_only_dns_config_within_the_limits() {
        let dns = pod_dns(
            &pod(json!({
                "dnsPolicy": "None",
                "dnsConfig": {
                    "nameservers": ["192.0.2.1", "192.0.2.2", "192.0.2.3", "192.0.2.4"],
                    "searches": ["a.example"],
                    "options": [{"name": "timeout", "value": "1"}]
                }
            })),
            Some(&cluster()),
        );
        assert_eq!(
            dns.servers,
            strings(&["192.0.2.1", "192.0.2.2", "192.0.2.3"])
        );
        assert_eq!(dns.searches, strings(&["a.example"]));
        assert_eq!(dns.options, strings(&["timeout:1"]));
        assert_eq!(
            pod_dns(&pod(json!({"dnsPolicy": "None"})), Some(&cluster())),
            PodDns::default()
        );
    }

    #[test]
    fn the_default_policy_with_dns_config_gives_only_the_configured_lists() {
        let dns = pod_dns(
            &pod(json!({"dnsPolicy": "Default", "dnsConfig": {"searches": ["a.example"]}})),
            Some(&cluster()),
        );
        assert!(dns.servers.is_empty(), "the engine's nameservers stay");
        assert_eq!(dns.searches, strings(&["a.example"]));
    }
}
