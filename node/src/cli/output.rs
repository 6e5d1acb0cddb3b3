//! Printing objects the way kubectl does: tables per kind, YAML, JSON, describe.

use serde_json::{json, Value};

fn text<'a>(object: &'a Value, path: &[&str]) -> &'a str {
    path.iter()
        .try_fold(object, |node, part| node.get(part))
        .and_then(Value::as_str)
        .unwrap_or("")
}

fn number(object: &Value, path: &[&str]) -> i64 {
    path.iter()
        .try_fold(object, |node, part| node.get(part))
        .and_then(Value::as_i64)
        .unwrap_or(0)
}

/// Age as kubectl prints it: `45s`, `12m`, `5h`, `3d`.
pub fn age(object: &Value) -> String {
    let created = text(object, &["metadata", "creationTimestamp"]);
    let Ok(created) = created.parse::<jiff::Timestamp>() else {
        return "<unknown>".into();
    };
    let seconds = jiff::Timestamp::now()
        .as_second()
        .saturating_sub(created.as_second())
        .max(0);
    match seconds {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

fn pod_columns(pod: &Value, wide: bool) -> Vec<String> {
    let statuses = pod
        .pointer("/status/containerStatuses")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let total = pod
        .pointer("/spec/containers")
        .and_then(Value::as_array)
        .map(Vec::len)
        .unwrap_or(0);
    let ready = statuses
        .iter()
        .filter(|s| s.get("ready").and_then(Value::as_bool) == Some(true))
        .count();
    let restarts: i64 = statuses.iter().map(|s| number(s, &["restartCount"])).sum();
    let waiting = statuses
        .iter()
        .find_map(|s| s.pointer("/state/waiting/reason").and_then(Value::as_str));
    let phase = text(pod, &["status", "phase"]);
    let status = if pod.pointer("/metadata/deletionTimestamp").is_some() {
        "Terminating"
    } else {
        waiting.unwrap_or(if phase.is_empty() { "Pending" } else { phase })
    };
    let mut columns = vec![
        format!("{ready}/{total}"),
        status.to_string(),
        restarts.to_string(),
        age(pod),
    ];
    if wide {
        let ip = text(pod, &["status", "podIP"]);
        let node = text(pod, &["spec", "nodeName"]);
        columns.push(if ip.is_empty() {
            "<none>".into()
        } else {
            ip.into()
        });
        columns.push(if node.is_empty() {
            "<none>".into()
        } else {
            node.into()
        });
    }
    columns
}

fn service_ports(service: &Value) -> String {
    let ports = service
        .pointer("/spec/ports")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if ports.is_empty() {
        return "<none>".into();
    }
    ports
        .iter()
        .map(|p| {
            let port = number(p, &["port"]);
            let protocol = p.get("protocol").and_then(Value::as_str).unwrap_or("TCP");
            match p.get("nodePort").and_then(Value::as_i64) {
                Some(node_port) => format!("{port}:{node_port}/{protocol}"),
                None => format!("{port}/{protocol}"),
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// EXTERNAL-IP as kubectl prints it: `spec.externalIPs` and load balancer ingress addresses,
/// `<pending>` for a LoadBalancer without any, the external name of an ExternalName Service.
fn service_external_ip(service: &Value) -> String {
    let strings = |pointer: &str, field: Option<&str>| -> Vec<String> {
        service
            .pointer(pointer)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|item| match field {
                Some(field) => item
                    .get(field)
                    .and_then(Value::as_str)
                    .filter(|s| !s.is_empty())
                    .or_else(|| item.get("hostname").and_then(Value::as_str)),
                None => item.as_str(),
            })
            .map(str::to_string)
            .collect()
    };
    let mut addresses = strings("/spec/externalIPs", None);
    let service_type = text(service, &["spec", "type"]);
    match service_type {
        "ExternalName" => return text(service, &["spec", "externalName"]).to_string(),
        "LoadBalancer" => {
            addresses.extend(strings("/status/loadBalancer/ingress", Some("ip")));
            if addresses.is_empty() {
                return "<pending>".into();
            }
        }
        _ => {}
    }
    if addresses.is_empty() {
        "<none>".into()
    } else {
        addresses.join(",")
    }
}

/// ENDPOINTS of `kubectl get endpoints`: the first three `ip:port` of the ready addresses,
/// then ` + N more...`; `<none>` when there are none.
fn format_endpoints(endpoints: &Value) -> String {
    const SHOWN: usize = 3;
    let list = |value: Option<&Value>| -> Vec<Value> {
        value.and_then(Value::as_array).cloned().unwrap_or_default()
    };
    let mut all = Vec::new();
    for subset in list(endpoints.get("subsets")) {
        let ips: Vec<String> = list(subset.get("addresses"))
            .iter()
            .map(|a| text(a, &["ip"]).to_string())
            .collect();
        let ports = list(subset.get("ports"));
        if ports.is_empty() {
            // Headless Services may have no ports: bare addresses.
            all.extend(ips);
            continue;
        }
        for port in &ports {
            let number = number(port, &["port"]);
            for ip in &ips {
                all.push(if ip.contains(':') {
                    format!("[{ip}]:{number}")
                } else {
                    format!("{ip}:{number}")
                });
            }
        }
    }
    if all.is_empty() {
        return "<none>".into();
    }
    let shown = all[..all.len().min(SHOWN)].join(",");
    if all.len() > SHOWN {
        format!("{shown} + {} more...", all.len() - SHOWN)
    } else {
        shown
    }
}

fn node_status(node: &Value) -> String {
    let ready = node
        .pointer("/status/conditions")
        .and_then(Value::as_array)
        .and_then(|c| {
            c.iter()
                .find(|c| c.get("type").and_then(Value::as_str) == Some("Ready"))
        })
        .and_then(|c| c.get("status").and_then(Value::as_str));
    let mut status = match ready {
        Some("True") => "Ready".to_string(),
        Some(_) => "NotReady".to_string(),
        None => "Unknown".to_string(),
    };
    if node.pointer("/spec/unschedulable").and_then(Value::as_bool) == Some(true) {
        status.push_str(",SchedulingDisabled");
    }
    status
}

fn map_len(object: &Value, field: &str) -> usize {
    object
        .get(field)
        .and_then(Value::as_object)
        .map(|m| m.len())
        .unwrap_or(0)
}

/// Column headers and cells for one kind.
pub fn columns(kind: &str, object: &Value, wide: bool) -> (Vec<&'static str>, Vec<String>) {
    match kind {
        "Pod" => {
            let mut headers = vec!["READY", "STATUS", "RESTARTS", "AGE"];
            if wide {
                headers.extend(["IP", "NODE"]);
            }
            (headers, pod_columns(object, wide))
        }
        "Deployment" => (
            vec!["READY", "UP-TO-DATE", "AVAILABLE", "AGE"],
            vec![
                format!(
                    "{}/{}",
                    number(object, &["status", "readyReplicas"]),
                    object
                        .pointer("/spec/replicas")
                        .and_then(Value::as_i64)
                        .unwrap_or(1)
                ),
                number(object, &["status", "updatedReplicas"]).to_string(),
                number(object, &["status", "availableReplicas"]).to_string(),
                age(object),
            ],
        ),
        "ReplicaSet" | "StatefulSet" => (
            vec!["DESIRED", "CURRENT", "READY", "AGE"],
            vec![
                object
                    .pointer("/spec/replicas")
                    .and_then(Value::as_i64)
                    .unwrap_or(1)
                    .to_string(),
                number(object, &["status", "replicas"]).to_string(),
                number(object, &["status", "readyReplicas"]).to_string(),
                age(object),
            ],
        ),
        "Service" => {
            let cluster_ip = text(object, &["spec", "clusterIP"]);
            let service_type = text(object, &["spec", "type"]);
            (
                vec!["TYPE", "CLUSTER-IP", "EXTERNAL-IP", "PORT(S)", "AGE"],
                vec![
                    if service_type.is_empty() {
                        "ClusterIP"
                    } else {
                        service_type
                    }
                    .to_string(),
                    if cluster_ip.is_empty() {
                        "<none>"
                    } else {
                        cluster_ip
                    }
                    .to_string(),
                    service_external_ip(object),
                    service_ports(object),
                    age(object),
                ],
            )
        }
        "Endpoints" => (
            vec!["ENDPOINTS", "AGE"],
            vec![format_endpoints(object), age(object)],
        ),
        "Node" => {
            let mut cells = vec![
                node_status(object),
                "<none>".into(),
                age(object),
                text(object, &["status", "nodeInfo", "kubeletVersion"]).to_string(),
            ];
            let mut headers = vec!["STATUS", "ROLES", "AGE", "VERSION"];
            if wide {
                let address = object
                    .pointer("/status/addresses")
                    .and_then(Value::as_array)
                    .and_then(|a| a.first())
                    .map(|a| text(a, &["address"]).to_string())
                    .unwrap_or_default();
                headers.push("INTERNAL-IP");
                cells.push(address);
            }
            (headers, cells)
        }
        "Namespace" => {
            let phase = text(object, &["status", "phase"]);
            (
                vec!["STATUS", "AGE"],
                vec![
                    if phase.is_empty() { "Active" } else { phase }.to_string(),
                    age(object),
                ],
            )
        }
        "ConfigMap" => (
            vec!["DATA", "AGE"],
            vec![
                (map_len(object, "data") + map_len(object, "binaryData")).to_string(),
                age(object),
            ],
        ),
        "Secret" => (
            vec!["TYPE", "DATA", "AGE"],
            vec![
                object
                    .get("type")
                    .and_then(Value::as_str)
                    .unwrap_or("Opaque")
                    .to_string(),
                (map_len(object, "data") + map_len(object, "stringData")).to_string(),
                age(object),
            ],
        ),
        _ => (vec!["AGE"], vec![age(object)]),
    }
}

/// `kubectl get events`: LAST SEEN, TYPE, REASON, OBJECT, MESSAGE (no NAME column).
fn events_table(objects: &[Value], all_namespaces: bool, headers: bool) -> String {
    let mut rows: Vec<Vec<String>> = Vec::new();
    if headers && !objects.is_empty() {
        let mut header = Vec::new();
        if all_namespaces {
            header.push("NAMESPACE".to_string());
        }
        header.extend(["LAST SEEN", "TYPE", "REASON", "OBJECT", "MESSAGE"].map(String::from));
        rows.push(header);
    }
    let mut sorted: Vec<&Value> = objects.iter().collect();
    sorted.sort_by_key(|e| text(e, &["lastTimestamp"]).to_string());
    for event in sorted {
        let mut row = Vec::new();
        if all_namespaces {
            row.push(text(event, &["metadata", "namespace"]).to_string());
        }
        let last_seen = event.get("lastTimestamp").cloned().unwrap_or_default();
        row.push(age(&json!({"metadata": {"creationTimestamp": last_seen}})));
        row.push(text(event, &["type"]).to_string());
        row.push(text(event, &["reason"]).to_string());
        row.push(format!(
            "{}/{}",
            text(event, &["involvedObject", "kind"]).to_ascii_lowercase(),
            text(event, &["involvedObject", "name"])
        ));
        row.push(text(event, &["message"]).to_string());
        rows.push(row);
    }
    align(&rows)
}

/// Formats rows as an aligned table; with `headers`, the first line names the columns.
pub fn table(
    kind: &str,
    objects: &[Value],
    all_namespaces: bool,
    wide: bool,
    headers: bool,
) -> String {
    if kind == "Event" {
        return events_table(objects, all_namespaces, headers);
    }
    let mut rows: Vec<Vec<String>> = Vec::new();
    let mut header_row = Vec::new();
    for object in objects {
        let (names, cells) = columns(kind, object, wide);
        if header_row.is_empty() {
            if all_namespaces {
                header_row.push("NAMESPACE".to_string());
            }
            header_row.push("NAME".to_string());
            header_row.extend(names.iter().map(|h| h.to_string()));
        }
        let mut row = Vec::new();
        if all_namespaces {
            row.push(text(object, &["metadata", "namespace"]).to_string());
        }
        row.push(text(object, &["metadata", "name"]).to_string());
        row.extend(cells);
        rows.push(row);
    }
    if headers && !header_row.is_empty() {
        rows.insert(0, header_row);
    }
    align(&rows)
}

/// Left-aligns columns separated by three spaces, as kubectl does.
pub fn align(rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (c, cell) in row.iter().enumerate() {
            if c + 1 == row.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<width$}   ", width = widths[c]));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// A collection as `kubectl get -o json|yaml` shows it.
pub fn list_document(items: Vec<Value>, resource_version: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": resource_version}, "items": items})
}

/// `describe`: identity first, then each top-level section as YAML.
pub fn describe(object: &Value) -> String {
    let mut out = String::new();
    let metadata = object.get("metadata").cloned().unwrap_or_default();
    let line = |out: &mut String, label: &str, value: &str| {
        out.push_str(&format!("{:<20}{}\n", format!("{label}:"), value))
    };
    line(&mut out, "Name", text(object, &["metadata", "name"]));
    if let Some(namespace) = metadata.get("namespace").and_then(Value::as_str) {
        line(&mut out, "Namespace", namespace);
    }
    line(&mut out, "Kind", text(object, &["kind"]));
    for (label, field) in [("Labels", "labels"), ("Annotations", "annotations")] {
        let pairs = metadata
            .get(field)
            .and_then(Value::as_object)
            .map(|m| {
                m.iter()
                    .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default();
        line(
            &mut out,
            label,
            &if pairs.is_empty() {
                "<none>".into()
            } else {
                pairs.join("\n                    ")
            },
        );
    }
    line(
        &mut out,
        "CreationTimestamp",
        text(object, &["metadata", "creationTimestamp"]),
    );
    line(&mut out, "UID", text(object, &["metadata", "uid"]));
    line(
        &mut out,
        "ResourceVersion",
        text(object, &["metadata", "resourceVersion"]),
    );
    if let Some(generation) = metadata.get("generation") {
        line(&mut out, "Generation", &generation.to_string());
    }
    if let Some(map) = object.as_object() {
        for (field, value) in map {
            if matches!(field.as_str(), "apiVersion" | "kind" | "metadata") {
                continue;
            }
            let mut title = field.clone();
            if let Some(first) = title.get_mut(..1) {
                first.make_ascii_uppercase();
            }
            out.push_str(&format!("{title}:\n"));
            let yaml = serde_yaml::to_string(value).unwrap_or_default();
            for yaml_line in yaml.lines() {
                out.push_str(&format!("  {yaml_line}\n"));
            }
        }
    }
    out
}

/// The `Events:` section of describe, oldest first.
pub fn events_section(mut events: Vec<Value>) -> String {
    if events.is_empty() {
        return "Events:             <none>\n".into();
    }
    let last_seen = |e: &Value| text(e, &["lastTimestamp"]).to_string();
    events.sort_by_key(last_seen);
    let mut rows = vec![["Type", "Reason", "Age", "From", "Message"]
        .map(String::from)
        .to_vec()];
    for event in &events {
        let count = number(event, &["count"]);
        let seen = event
            .get("lastTimestamp")
            .map(|t| age(&json!({"metadata": {"creationTimestamp": t}})))
            .unwrap_or_default();
        let age = if count > 1 {
            format!("{seen} (x{count})")
        } else {
            seen
        };
        rows.push(vec![
            text(event, &["type"]).to_string(),
            text(event, &["reason"]).to_string(),
            age,
            text(event, &["source", "component"]).to_string(),
            text(event, &["message"]).to_string(),
        ]);
    }
    let mut out = String::from("Events:\n");
    for line in align(&rows).lines() {
        out.push_str("  ");
        out.push_str(line);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_columns_and_name_the_namespace_with_all_namespaces() {
        let objects = vec![
            json!({"kind": "ConfigMap", "metadata": {"name": "a", "namespace": "default"}, "data": {"x": "1"}}),
            json!({"kind": "ConfigMap", "metadata": {"name": "longer-name", "namespace": "kube-system"}}),
        ];
        let printed = table("ConfigMap", &objects, true, false, true);
        let lines: Vec<_> = printed.lines().collect();
        assert!(
            lines[0].starts_with("NAMESPACE     NAME          DATA   AGE"),
            "{printed}"
        );
        assert!(
            lines[1].starts_with("default       a             1"),
            "{printed}"
        );
    }

    #[test]
    fn services_show_type_cluster_ip_external_ip_and_node_ports() {
        let service = json!({"kind": "Service", "metadata": {"name": "web"},
            "spec": {"type": "NodePort", "clusterIP": "10.96.0.2",
                     "ports": [{"port": 80, "nodePort": 30080}, {"port": 53, "protocol": "UDP"}]}});
        let (headers, cells) = columns("Service", &service, false);
        assert_eq!(
            headers,
            ["TYPE", "CLUSTER-IP", "EXTERNAL-IP", "PORT(S)", "AGE"]
        );
        assert_eq!(
            cells[..4],
            [
                "NodePort".to_string(),
                "10.96.0.2".into(),
                "<none>".into(),
                "80:30080/TCP,53/UDP".into()
            ]
        );
        let balancer = json!({"kind": "Service", "metadata": {"name": "lb"},
            "spec": {"type": "LoadBalancer", "clusterIP": "10.96.0.3", "ports": [{"port": 443, "nodePort": 30443}]}});
        assert_eq!(columns("Service", &balancer, false).1[2], "<pending>");
        let headless = json!({"kind": "Service", "metadata": {"name": "db"},
            "spec": {"clusterIP": "None", "ports": [{"port": 5432}]}});
        assert_eq!(
            columns("Service", &headless, false).1[..2],
            ["ClusterIP".to_string(), "None".into()]
        );
    }

    #[test]
    fn endpoints_show_the_first_three_addresses_and_how_many_more() {
        let endpoints = json!({"kind": "Endpoints", "metadata": {"name": "web"},
        "subsets": [
            {"addresses": [{"ip": "10.244.0.2"}, {"ip": "10.244.0.3"}],
             "notReadyAddresses": [{"ip": "10.244.0.9"}],
             "ports": [{"name": "http", "port": 8080}, {"name": "admin", "port": 9000}]},
            {"addresses": [{"ip": "10.244.1.2"}], "ports": [{"port": 8081}]}
        ]});
        let (headers, cells) = columns("Endpoints", &endpoints, false);
        assert_eq!(headers, ["ENDPOINTS", "AGE"]);
        assert_eq!(
            cells[0],
            "10.244.0.2:8080,10.244.0.3:8080,10.244.0.2:9000 + 2 more..."
        );
        let few = json!({"subsets": [{"addresses": [{"ip": "10.244.0.2"}]}]});
        assert_eq!(format_endpoints(&few), "10.244.0.2");
        let none = json!({"subsets": [{"notReadyAddresses": [{"ip": "10.244.0.2"}], "ports": [{"port": 80}]}]});
        assert_eq!(format_endpoints(&none), "<none>");
        assert_eq!(format_endpoints(&json!({})), "<none>");
    }

    #[test]
    fn pod_status_prefers_the_waiting_reason() {
        let pod = json!({"kind": "Pod", "metadata": {"name": "p"}, "spec": {"containers": [{}]},
            "status": {"phase": "Pending", "containerStatuses": [{"ready": false, "restartCount": 2, "state": {"waiting": {"reason": "CrashLoopBackOff"}}}]}});
        let (_, cells) = columns("Pod", &pod, false);
        assert_eq!(
            cells[..3],
            ["0/1".to_string(), "CrashLoopBackOff".into(), "2".into()]
        );
    }
}
