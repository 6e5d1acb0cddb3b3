//! `flotilla expose KIND/NAME`: a Service for the pods of a Deployment, ReplicaSet, StatefulSet,
//! Pod or Service, as `kubectl expose` makes it. The selector is the workload's
//! `spec.selector.matchLabels` (a pod's labels, a Service's selector); a selector with
//! `matchExpressions` cannot be copied into a Service and is refused. Without `--port` the
//! ports are the containers' declared ports. The Service carries the workload's labels.

use anyhow::{anyhow, bail, Context};
use flotilla_proto::objects_client::ObjectsClient;
use flotilla_proto::{GetRequest, ObjectRequest};
use serde_json::{json, Map, Value};
use tonic::transport::Channel;

use super::client::status_error;
use super::workloads::parse_target;

/// What the command line asks for.
#[derive(Debug, Clone, Default, PartialEq)]
pub(super) struct ExposeOptions {
    /// The Service's name (default: the workload's).
    pub(super) name: Option<String>,
    pub(super) port: Option<u16>,
    /// A number or a container port name (default: the port).
    pub(super) target_port: Option<String>,
    /// ClusterIP, NodePort or LoadBalancer (default ClusterIP).
    pub(super) service_type: Option<String>,
    /// TCP, UDP or SCTP (default TCP).
    pub(super) protocol: Option<String>,
    /// An explicit cluster IP, or `None` for a headless Service.
    pub(super) cluster_ip: Option<String>,
    /// `key=value,...` to use instead of the workload's selector.
    pub(super) selector: Option<String>,
}

/// Reads the workload, builds its Service and creates it.
pub(super) async fn expose(
    client: &mut ObjectsClient<Channel>,
    target: &str,
    namespace: &str,
    options: &ExposeOptions,
) -> anyhow::Result<()> {
    let (kind, name) = parse_target(target, "Deployment")?;
    let reply = client
        .get(GetRequest {
            kind: kind.into(),
            namespace: namespace.into(),
            name: name.clone(),
            local: false,
        })
        .await
        .map_err(status_error)?
        .into_inner();
    let workload: Value =
        serde_json::from_slice(&reply.object_json).context("decode the object to expose")?;
    let service = service_for(kind, &workload, namespace, options)?;
    let service_name = service["metadata"]["name"]
        .as_str()
        .unwrap_or(&name)
        .to_owned();
    client
        .create(ObjectRequest {
            object_json: serde_json::to_vec(&service).context("encode the Service")?,
        })
        .await
        .map_err(status_error)?;
    println!("service/{service_name} exposed");
    Ok(())
}

/// The Service that exposes `workload` (pure).
pub(super) fn service_for(
    kind: &str,
    workload: &Value,
    namespace: &str,
    options: &ExposeOptions,
) -> anyhow::Result<Value> {
    let name = workload
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .ok_or_else(|| anyhow!("the {kind} has no name"))?;
    let selector = match &options.selector {
        Some(text) => parse_selector(text)?,
        None => selector_of(kind, workload)?,
    };
    if selector.is_empty() {
        bail!("{kind} {name} has no labels to select its pods by; give --selector");
    }
    let protocol = options.protocol.clone().unwrap_or_else(|| "TCP".into());
    if !matches!(protocol.as_str(), "TCP" | "UDP" | "SCTP") {
        bail!("--protocol must be TCP, UDP or SCTP, not {protocol:?}");
    }
    let service_type = options
        .service_type
        .clone()
        .unwrap_or_else(|| "ClusterIP".into());
    if !matches!(
        service_type.as_str(),
        "ClusterIP" | "NodePort" | "LoadBalancer"
    ) {
        bail!("--type must be ClusterIP, NodePort or LoadBalancer, not {service_type:?}");
    }
    let target_port = options.target_port.as_deref().map(target_port_value);
    let ports: Vec<Value> = match options.port {
        Some(port) => vec![json!({
            "port": port,
            "protocol": protocol,
            "targetPort": target_port.clone().unwrap_or(json!(port)),
        })],
        None => {
            let declared = container_ports(kind, workload);
            if declared.is_empty() {
                bail!("{kind} {name} declares no container port to expose; give --port");
            }
            let several = declared.len() > 1;
            declared
                .iter()
                .enumerate()
                .map(|(index, (port, port_protocol))| {
                    let mut entry = json!({
                        "port": port,
                        "protocol": options.protocol.clone().unwrap_or_else(|| port_protocol.clone()),
                        "targetPort": target_port.clone().unwrap_or(json!(port)),
                    });
                    if several {
                        entry["name"] = json!(format!("port-{}", index + 1));
                    }
                    entry
                })
                .collect()
        }
    };
    let mut spec = json!({
        "type": service_type,
        "selector": selector,
        "ports": ports,
    });
    if let Some(cluster_ip) = &options.cluster_ip {
        spec["clusterIP"] = json!(cluster_ip);
    }
    let mut metadata = json!({
        "name": options.name.clone().unwrap_or_else(|| name.to_owned()),
        "namespace": namespace,
    });
    if let Some(labels) = workload
        .pointer("/metadata/labels")
        .filter(|l| l.is_object())
    {
        metadata["labels"] = labels.clone();
    }
    Ok(json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata,
        "spec": spec,
    }))
}

fn target_port_value(text: &str) -> Value {
    match text.parse::<u16>() {
        Ok(number) => json!(number),
        Err(_) => json!(text),
    }
}

fn parse_selector(text: &str) -> anyhow::Result<Map<String, Value>> {
    text.split(',')
        .filter(|pair| !pair.trim().is_empty())
        .map(|pair| {
            let (key, value) = pair
                .split_once('=')
                .ok_or_else(|| anyhow!("--selector {pair:?} is not key=value"))?;
            Ok((key.trim().to_owned(), json!(value.trim())))
        })
        .collect()
}

/// The labels that select the workload's pods.
fn selector_of(kind: &str, workload: &Value) -> anyhow::Result<Map<String, Value>> {
    let found = match kind {
        "Pod" => workload.pointer("/metadata/labels"),
        "Service" => workload.pointer("/spec/selector"),
        "Deployment" | "ReplicaSet" | "StatefulSet" | "DaemonSet" => {
            let expressions = workload
                .pointer("/spec/selector/matchExpressions")
                .and_then(Value::as_array)
                .is_some_and(|e| !e.is_empty());
            if expressions {
                bail!(
                    "the {kind}'s selector has matchExpressions, which a Service cannot hold; \
                     give --selector"
                );
            }
            workload.pointer("/spec/selector/matchLabels")
        }
        other => bail!(
            "cannot expose a {other}; expose a Deployment, ReplicaSet, StatefulSet, Pod or Service"
        ),
    };
    Ok(found
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default())
}

/// The (port, protocol) of every container port of the workload's pods, in order, without
/// repeats.
fn container_ports(kind: &str, workload: &Value) -> Vec<(u64, String)> {
    if kind == "Service" {
        return workload
            .pointer("/spec/ports")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|port| {
                Some((
                    port.get("port")?.as_u64()?,
                    port.get("protocol")
                        .and_then(Value::as_str)
                        .unwrap_or("TCP")
                        .to_owned(),
                ))
            })
            .collect();
    }
    let spec = if kind == "Pod" {
        workload.get("spec")
    } else {
        workload.pointer("/spec/template/spec")
    };
    let mut ports: Vec<(u64, String)> = Vec::new();
    let containers = spec
        .and_then(|spec| spec.get("containers"))
        .and_then(Value::as_array)
        .into_iter()
        .flatten();
    for port in containers
        .filter_map(|container| container.get("ports").and_then(Value::as_array))
        .flatten()
    {
        let Some(number) = port.get("containerPort").and_then(Value::as_u64) else {
            continue;
        };
        let protocol = port
            .get("protocol")
            .and_then(Value::as_str)
            .unwrap_or("TCP")
            .to_owned();
        if !ports.contains(&(number, protocol.clone())) {
            ports.push((number, protocol));
        }
    }
    ports
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deployment() -> Value {
        json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "web", "namespace": "shop", "labels": {"team": "a"}},
            "spec": {
                "selector": {"matchLabels": {"app": "web"}},
                "template": {
                    "metadata": {"labels": {"app": "web"}},
                    "spec": {"containers": [
                        {"name": "web", "image": "flotilla/echo", "ports": [{"containerPort": 8080, "name": "http"}]},
                        {"name": "metrics", "image": "flotilla/echo", "ports": [{"containerPort": 9090}]},
                    ]},
                },
            },
        })
    }

    #[test]
    fn a_deployment_is_exposed_on_the_given_port_with_its_selector_and_labels() {
        let options = ExposeOptions {
            port: Some(80),
            target_port: Some("http".into()),
            service_type: Some("NodePort".into()),
            ..Default::default()
        };
        let service =
            service_for("Deployment", &deployment(), "shop", &options).expect("a service");
        assert_eq!(
            service,
            json!({
                "apiVersion": "v1", "kind": "Service",
                "metadata": {"name": "web", "namespace": "shop", "labels": {"team": "a"}},
                "spec": {
                    "type": "NodePort",
                    "selector": {"app": "web"},
                    "ports": [{"port": 80, "protocol": "TCP", "targetPort": "http"}],
                },
            })
        );
    }

    #[test]
    fn without_a_port_every_declared_container_port_becomes_a_named_service_port() {
        let service = service_for(
            "Deployment",
            &deployment(),
            "shop",
            &ExposeOptions::default(),
        )
        .expect("a service");
        assert_eq!(
            service["spec"]["ports"],
            json!([
                {"name": "port-1", "port": 8080, "protocol": "TCP", "targetPort": 8080},
                {"name": "port-2", "port": 9090, "protocol": "TCP", "targetPort": 9090},
            ])
        );
        assert_eq!(service["spec"]["type"], "ClusterIP");
    }

    #[test]
    fn a_pod_is_selected_by_its_labels_and_the_name_can_be_chosen() {
        let pod = json!({"kind": "Pod", "metadata": {"name": "p", "labels": {"app": "p"}},
            "spec": {"containers": [{"name": "c", "image": "i", "ports": [{"containerPort": 53, "protocol": "UDP"}]}]}});
        let options = ExposeOptions {
            name: Some("dns".into()),
            cluster_ip: Some("None".into()),
            ..Default::default()
        };
        let service = service_for("Pod", &pod, "default", &options).expect("a service");
        assert_eq!(service["metadata"]["name"], "dns");
        assert_eq!(service["spec"]["selector"], json!({"app": "p"}));
        assert_eq!(service["spec"]["clusterIP"], "None");
        assert_eq!(
            service["spec"]["ports"],
            json!([{"port": 53, "protocol": "UDP", "targetPort": 53}])
        );
    }

    #[test]
    fn a_selector_with_expressions_or_no_ports_or_a_bad_type_is_refused_with_the_reason() {
        let mut with_expressions = deployment();
        with_expressions["spec"]["selector"]["matchExpressions"] =
            json!([{"key": "tier", "operator": "In", "values": ["a"]}]);
        let error = service_for(
            "Deployment",
            &with_expressions,
            "shop",
            &ExposeOptions::default(),
        )
        .expect_err("refused");
        assert!(error.to_string().contains("matchExpressions"), "{error}");

        let mut portless = deployment();
        portless["spec"]["template"]["spec"]["containers"] = json!([{"name": "c", "image": "i"}]);
        let error = service_for("Deployment", &portless, "shop", &ExposeOptions::default())
            .expect_err("refused");
        assert!(error.to_string().contains("--port"), "{error}");

        let options = ExposeOptions {
            port: Some(80),
            service_type: Some("ExternalName".into()),
            ..Default::default()
        };
        let error =
            service_for("Deployment", &deployment(), "shop", &options).expect_err("refused");
        assert!(error.to_string().contains("--type"), "{error}");

        let error = service_for(
            "ConfigMap",
            &deployment(),
            "shop",
            &ExposeOptions::default(),
        )
        .expect_err("refused");
        assert!(error.to_string().contains("cannot expose"), "{error}");
    }

    #[test]
    fn an_explicit_selector_replaces_the_workloads() {
        let options = ExposeOptions {
            port: Some(80),
            selector: Some("app=web, tier=front".into()),
            ..Default::default()
        };
        let service =
            service_for("Deployment", &deployment(), "shop", &options).expect("a service");
        assert_eq!(
            service["spec"]["selector"],
            json!({"app": "web", "tier": "front"})
        );
        let bad = ExposeOptions {
            selector: Some("app".into()),
            ..options
        };
        assert!(service_for("Deployment", &deployment(), "shop", &bad).is_err());
    }
}
