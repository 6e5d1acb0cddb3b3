//! The Service environment variables of a container, as the kubelet sets them when the
//! container is created (pure): for every Service of the pod's namespace with a cluster IP,
//! unless the pod says `enableServiceLinks: false`, and for the `kubernetes` Service of the
//! `default` namespace always:
//!
//! - `<SVC>_SERVICE_HOST` (the cluster IP), `<SVC>_SERVICE_PORT` (the first port) and
//!   `<SVC>_SERVICE_PORT_<PORT>` for every named port;
//! - Docker links: `<SVC>_PORT=tcp://ip:port` (the first port) and, for every port,
//!   `<SVC>_PORT_<port>_<PROTO>=tcp://ip:port` with its `_PROTO`, `_PORT` and `_ADDR`.
//!
//! Names are upper-cased with `-` as `_`. Headless (`clusterIP: None`) and ExternalName
//! Services have no variables. The container's own `env` and `envFrom` win over these.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Service;
use serde_json::Value;

/// The namespace whose `kubernetes` Service every pod sees.
const MASTER_NAMESPACE: &str = "default";
const MASTER_SERVICE: &str = "kubernetes";

/// `web-api` → `WEB_API`.
fn variable_name(text: &str) -> String {
    text.to_ascii_uppercase().replace('-', "_")
}

/// The variables of one Service, in the kubelet's order; none without a cluster IP or ports.
fn service_variables(service: &Service) -> Vec<(String, String)> {
    let (Some(name), Some(spec)) = (service.metadata.name.as_deref(), service.spec.as_ref()) else {
        return Vec::new();
    };
    let Some(ip) = spec
        .cluster_ip
        .as_deref()
        .filter(|ip| !ip.is_empty() && *ip != "None")
    else {
        return Vec::new();
    };
    let ports = spec.ports.as_deref().unwrap_or_default();
    let Some(first) = ports.first() else {
        return Vec::new();
    };
    let prefix = variable_name(name);
    let host_port = |port: i32| match ip.contains(':') {
        true => format!("[{ip}]:{port}"),
        false => format!("{ip}:{port}"),
    };
    let mut variables = vec![
        (format!("{prefix}_SERVICE_HOST"), ip.to_owned()),
        (format!("{prefix}_SERVICE_PORT"), first.port.to_string()),
    ];
    for port in ports {
        if let Some(port_name) = port.name.as_deref().filter(|n| !n.is_empty()) {
            variables.push((
                format!("{prefix}_SERVICE_PORT_{}", variable_name(port_name)),
                port.port.to_string(),
            ));
        }
    }
    for (index, port) in ports.iter().enumerate() {
        let protocol = port
            .protocol
            .as_deref()
            .filter(|p| !p.is_empty())
            .unwrap_or("TCP");
        let scheme = protocol.to_ascii_lowercase();
        let url = format!("{scheme}://{}", host_port(port.port));
        if index == 0 {
            variables.push((format!("{prefix}_PORT"), url.clone()));
        }
        let port_prefix = format!(
            "{prefix}_PORT_{}_{}",
            port.port,
            protocol.to_ascii_uppercase()
        );
        variables.push((port_prefix.clone(), url));
        variables.push((format!("{port_prefix}_PROTO"), scheme));
        variables.push((format!("{port_prefix}_PORT"), port.port.to_string()));
        variables.push((format!("{port_prefix}_ADDR"), ip.to_owned()));
    }
    variables
}

/// The Service variables of a container of a pod in `namespace`, from `services` (stored
/// JSON of any namespaces; the ones that do not parse are left out), sorted by Service name.
pub(crate) fn service_environment(
    namespace: &str,
    enable_service_links: bool,
    services: &[Value],
) -> Vec<(String, String)> {
    let mut chosen: BTreeMap<String, Service> = BTreeMap::new();
    let parsed = services
        .iter()
        .filter_map(|object| serde_json::from_value::<Service>(object.clone()).ok());
    let mut master = None;
    for service in parsed {
        let service_namespace = service.metadata.namespace.as_deref().unwrap_or("default");
        let Some(name) = service.metadata.name.clone() else {
            continue;
        };
        if service_namespace == MASTER_NAMESPACE && name == MASTER_SERVICE {
            master = Some(service.clone());
        }
        if service_namespace == namespace && enable_service_links {
            chosen.insert(name, service);
        }
    }
    // The master Service is in every pod's environment; the pod's own namespace's
    // `kubernetes` Service, if any, takes its place.
    if let Some(master) = master {
        chosen.entry(MASTER_SERVICE.to_owned()).or_insert(master);
    }
    chosen.values().flat_map(service_variables).collect()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn service(namespace: &str, name: &str, spec: Value) -> Value {
        json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": namespace},
            "spec": spec
        })
    }

    fn services() -> Vec<Value> {
        vec![
            service(
                "prod",
                "web-api",
                json!({"clusterIP": "10.96.0.15", "ports": [
                    {"name": "http", "port": 80, "targetPort": 8080},
                    {"name": "metrics-port", "port": 9100, "protocol": "TCP"},
                    {"name": "dns", "port": 53, "protocol": "UDP"}
                ]}),
            ),
            service(
                "prod",
                "db",
                json!({"clusterIP": "None", "ports": [{"port": 5432}]}),
            ),
            service(
                "prod",
                "search",
                json!({"type": "ExternalName", "externalName": "search.example.com"}),
            ),
            service(
                "other",
                "cache",
                json!({"clusterIP": "10.96.0.16", "ports": [{"port": 6379}]}),
            ),
        ]
    }

    fn as_map(variables: &[(String, String)]) -> BTreeMap<&str, &str> {
        variables
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect()
    }

    #[test]
    fn a_service_with_a_cluster_ip_gives_the_kubelets_variables() {
        let variables = service_environment("prod", true, &services());
        let expected: Vec<(String, String)> = [
            ("WEB_API_SERVICE_HOST", "10.96.0.15"),
            ("WEB_API_SERVICE_PORT", "80"),
            ("WEB_API_SERVICE_PORT_HTTP", "80"),
            ("WEB_API_SERVICE_PORT_METRICS_PORT", "9100"),
            ("WEB_API_SERVICE_PORT_DNS", "53"),
            ("WEB_API_PORT", "tcp://10.96.0.15:80"),
            ("WEB_API_PORT_80_TCP", "tcp://10.96.0.15:80"),
            ("WEB_API_PORT_80_TCP_PROTO", "tcp"),
            ("WEB_API_PORT_80_TCP_PORT", "80"),
            ("WEB_API_PORT_80_TCP_ADDR", "10.96.0.15"),
            ("WEB_API_PORT_9100_TCP", "tcp://10.96.0.15:9100"),
            ("WEB_API_PORT_9100_TCP_PROTO", "tcp"),
            ("WEB_API_PORT_9100_TCP_PORT", "9100"),
            ("WEB_API_PORT_9100_TCP_ADDR", "10.96.0.15"),
            ("WEB_API_PORT_53_UDP", "udp://10.96.0.15:53"),
            ("WEB_API_PORT_53_UDP_PROTO", "udp"),
            ("WEB_API_PORT_53_UDP_PORT", "53"),
            ("WEB_API_PORT_53_UDP_ADDR", "10.96.0.15"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert_eq!(variables, expected);
    }

    #[test]
    fn headless_external_name_and_other_namespace_services_give_nothing() {
        let variables = service_environment("prod", true, &services());
        let names = as_map(&variables);
        assert!(
            names.keys().all(|name| name.starts_with("WEB_API_")),
            "{names:?}"
        );
        assert!(service_environment("empty", true, &services()).is_empty());
    }

    #[test]
    fn service_links_off_leaves_only_the_master_service() {
        let mut all = services();
        all.push(service(
            "default",
            "kubernetes",
            json!({"clusterIP": "10.96.0.1", "ports": [{"name": "https", "port": 443}]}),
        ));
        let variables = service_environment("prod", false, &all);
        let names = as_map(&variables);
        assert_eq!(names.get("KUBERNETES_SERVICE_HOST"), Some(&"10.96.0.1"));
        assert_eq!(names.get("KUBERNETES_PORT"), Some(&"tcp://10.96.0.1:443"));
        assert!(!names.contains_key("WEB_API_SERVICE_HOST"));
        let with_links = service_environment("prod", true, &all);
        let names = as_map(&with_links);
        assert!(names.contains_key("WEB_API_SERVICE_HOST"));
        assert!(names.contains_key("KUBERNETES_SERVICE_PORT_HTTPS"));
    }
}
