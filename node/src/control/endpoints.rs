//! The Endpoints controller, as kube-controller-manager's: for every Service with a selector,
//! an `Endpoints` object of the same name and namespace lists the pods the selector matches,
//! ready ones under `addresses` and the others under `notReadyAddresses`, with the ports the
//! Service's `targetPort`s resolve to on each pod. Pure and level-driven: from a [`Snapshot`] to
//! [`Action`]s; an Endpoints object is written only when it differs from the stored one.
//!
//! A pod is listed when it has an IP, is not finished (Succeeded or Failed) and is not being
//! deleted (unless the Service publishes not-ready addresses, which also lists every pod as
//! ready). A `targetPort` is a number (absent: the Service port) or the name of a container
//! port with the Service port's protocol; a pod without that name is left out for that port.
//! Addresses are grouped into subsets by the set of ports they resolve to, as Kubernetes'
//! `RepackSubsets`, and everything is sorted, so one snapshot always gives the same objects.
//!
//! The Endpoints written here carry [`MANAGED_BY_LABEL`]. Endpoints of a Service without a
//! selector (or of an ExternalName Service) are the user's and left alone; managed Endpoints
//! whose Service is gone are deleted.

use std::borrow::Borrow;
use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{
    EndpointAddress, EndpointPort, EndpointSubset, Endpoints, ObjectReference, Pod, Service,
    ServicePort,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::replicaset::{is_ready, is_terminal, namespace_of, object_key, to_object};
use super::{Action, Snapshot};

/// The label marking Endpoints written by this controller.
pub const MANAGED_BY_LABEL: &str = "endpoints.flotilla.io/managed-by";
/// The value of [`MANAGED_BY_LABEL`].
pub const MANAGED_BY_VALUE: &str = "flotilla";
/// The label Kubernetes puts on the Endpoints of a headless Service.
const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";

/// Creates, updates and deletes Endpoints so that every Service with a selector has the
/// Endpoints its pods make. Services are visited in (namespace, name) order, then deletions.
pub fn reconcile_endpoints(snapshot: &Snapshot) -> Vec<Action> {
    let stored: BTreeMap<(&str, &str), &Endpoints> = snapshot
        .endpoints
        .iter()
        .map(|endpoints| (object_key(&endpoints.metadata), endpoints))
        .collect();
    let mut services: Vec<&Service> = snapshot.services.iter().collect();
    services.sort_by(|a, b| object_key(&a.metadata).cmp(&object_key(&b.metadata)));
    let mut actions = Vec::new();
    for service in &services {
        if service.metadata.name.is_none() || !is_managed(service) {
            continue;
        }
        let desired = desired_endpoints(service, &snapshot.pods);
        match stored.get(&object_key(&service.metadata)) {
            None => actions.extend(to_object(&desired).map(Action::Create)),
            Some(current) if same(current, &desired) => {}
            Some(current) => {
                let mut updated = (*current).clone();
                updated.metadata.labels = desired.metadata.labels;
                updated.subsets = desired.subsets;
                actions.extend(to_object(&updated).map(Action::Update));
            }
        }
    }
    let service_keys: BTreeSet<(&str, &str)> = services
        .iter()
        .map(|service| object_key(&service.metadata))
        .collect();
    for (key, endpoints) in &stored {
        let managed = endpoints
            .metadata
            .labels
            .as_ref()
            .and_then(|labels| labels.get(MANAGED_BY_LABEL))
            .is_some_and(|value| value == MANAGED_BY_VALUE);
        if managed && !service_keys.contains(key) {
            actions.push(Action::Delete {
                kind: "Endpoints".into(),
                namespace: key.0.to_string(),
                name: key.1.to_string(),
                resource_version: endpoints.metadata.resource_version.clone(),
            });
        }
    }
    actions
}

/// Whether this controller keeps the Service's Endpoints: it has a non-empty selector and is
/// not an ExternalName Service.
fn is_managed(service: &Service) -> bool {
    service.spec.as_ref().is_some_and(|spec| {
        spec.selector.as_ref().is_some_and(|s| !s.is_empty())
            && spec.type_.as_deref() != Some("ExternalName")
    })
}

fn is_headless(service: &Service) -> bool {
    service
        .spec
        .as_ref()
        .and_then(|spec| spec.cluster_ip.as_deref())
        == Some("None")
}

/// Whether the stored Endpoints already are the desired ones (labels and subsets).
fn same(current: &Endpoints, desired: &Endpoints) -> bool {
    let subsets = |e: &Endpoints| to_object(&e.subsets.clone().unwrap_or_default());
    current.metadata.labels.clone().unwrap_or_default()
        == desired.metadata.labels.clone().unwrap_or_default()
        && subsets(current) == subsets(desired)
}

/// The Endpoints `service` should have, given every pod of the cluster.
pub fn desired_endpoints<P: Borrow<Pod>>(service: &Service, pods: &[P]) -> Endpoints {
    let mut labels = service.metadata.labels.clone().unwrap_or_default();
    labels.insert(MANAGED_BY_LABEL.into(), MANAGED_BY_VALUE.into());
    if is_headless(service) {
        labels.insert(HEADLESS_LABEL.into(), String::new());
    }
    let subsets = desired_subsets(service, pods);
    Endpoints {
        metadata: ObjectMeta {
            name: service.metadata.name.clone(),
            namespace: Some(namespace_of(&service.metadata).to_string()),
            labels: Some(labels),
            ..ObjectMeta::default()
        },
        subsets: (!subsets.is_empty()).then_some(subsets),
    }
}

/// A port of a subset, in the order subsets and their ports are sorted by.
type PortKey = (String, i32, String, Option<String>);

/// The subsets of `service`'s Endpoints: the matching pods grouped by the ports they resolve
/// to, sorted.
pub fn desired_subsets<P: Borrow<Pod>>(service: &Service, pods: &[P]) -> Vec<EndpointSubset> {
    let Some(spec) = service.spec.as_ref() else {
        return Vec::new();
    };
    let Some(selector) = spec.selector.as_ref().filter(|s| !s.is_empty()) else {
        return Vec::new();
    };
    let namespace = namespace_of(&service.metadata);
    let service_name = service.metadata.name.as_deref().unwrap_or_default();
    let publish_not_ready = spec.publish_not_ready_addresses == Some(true);
    let service_ports = spec.ports.as_deref().unwrap_or_default();
    let mut groups: BTreeMap<Vec<PortKey>, (Vec<EndpointAddress>, Vec<EndpointAddress>)> =
        BTreeMap::new();
    for pod in pods {
        let pod = pod.borrow();
        if namespace_of(&pod.metadata) != namespace
            || !selects(selector, pod.metadata.labels.as_ref())
            || is_terminal(pod)
            || (pod.metadata.deletion_timestamp.is_some() && !publish_not_ready)
        {
            continue;
        }
        let Some(address) = address_of(pod, service_name) else {
            continue;
        };
        let ports: Vec<PortKey> = if service_ports.is_empty() {
            // Only a headless Service lists pods without ports.
            if !is_headless(service) {
                continue;
            }
            Vec::new()
        } else {
            let mut ports: Vec<PortKey> = service_ports
                .iter()
                .filter_map(|service_port| resolve(pod, service_port))
                .collect();
            if ports.is_empty() {
                continue;
            }
            ports.sort();
            ports.dedup();
            ports
        };
        let (ready, not_ready) = groups.entry(ports).or_default();
        if publish_not_ready || is_ready(pod) {
            ready.push(address);
        } else {
            not_ready.push(address);
        }
    }
    groups
        .into_iter()
        .map(|(ports, (mut ready, mut not_ready))| {
            ready.sort_by(address_order);
            not_ready.sort_by(address_order);
            EndpointSubset {
                addresses: (!ready.is_empty()).then_some(ready),
                not_ready_addresses: (!not_ready.is_empty()).then_some(not_ready),
                ports: (!ports.is_empty()).then(|| {
                    ports
                        .into_iter()
                        .map(|(name, port, protocol, app_protocol)| EndpointPort {
                            name: (!name.is_empty()).then_some(name),
                            port,
                            protocol: Some(protocol),
                            app_protocol,
                        })
                        .collect()
                }),
            }
        })
        .collect()
}

fn address_order(a: &EndpointAddress, b: &EndpointAddress) -> std::cmp::Ordering {
    let key = |address: &EndpointAddress| {
        (
            address.ip.parse::<std::net::IpAddr>().ok(),
            address.ip.clone(),
            address.target_ref.as_ref().and_then(|r| r.name.clone()),
        )
    };
    key(a).cmp(&key(b))
}

/// Every entry of the Service's selector is among the pod's labels.
fn selects(selector: &BTreeMap<String, String>, labels: Option<&BTreeMap<String, String>>) -> bool {
    selector
        .iter()
        .all(|(key, value)| labels.and_then(|labels| labels.get(key)) == Some(value))
}

/// The pod as an endpoint address; `None` without an IP.
fn address_of(pod: &Pod, service_name: &str) -> Option<EndpointAddress> {
    let ip = pod
        .status
        .as_ref()
        .and_then(|status| status.pod_ip.as_deref())
        .filter(|ip| !ip.is_empty())?;
    let spec = pod.spec.as_ref();
    let hostname = spec
        .filter(|spec| spec.subdomain.as_deref() == Some(service_name))
        .and_then(|spec| spec.hostname.clone())
        .filter(|hostname| !hostname.is_empty());
    Some(EndpointAddress {
        ip: ip.to_string(),
        hostname,
        node_name: spec
            .and_then(|spec| spec.node_name.clone())
            .filter(|node| !node.is_empty()),
        target_ref: Some(ObjectReference {
            kind: Some("Pod".into()),
            namespace: Some(namespace_of(&pod.metadata).to_string()),
            name: pod.metadata.name.clone(),
            uid: pod.metadata.uid.clone(),
            ..ObjectReference::default()
        }),
    })
}

fn protocol_of(protocol: Option<&str>) -> &str {
    protocol.filter(|p| !p.is_empty()).unwrap_or("TCP")
}

/// The endpoint port `service_port` resolves to on `pod`: its `targetPort` number (the Service
/// port when absent), or the container port of that name and the Service port's protocol.
fn resolve(pod: &Pod, service_port: &ServicePort) -> Option<PortKey> {
    let protocol = protocol_of(service_port.protocol.as_deref());
    let port = match &service_port.target_port {
        None => service_port.port,
        Some(IntOrString::Int(0)) => service_port.port,
        Some(IntOrString::Int(number)) => *number,
        Some(IntOrString::String(name)) if name.is_empty() => service_port.port,
        Some(IntOrString::String(name)) => match name.parse::<i32>() {
            Ok(number) => number,
            Err(_) => named_container_port(pod, name, protocol)?,
        },
    };
    Some((
        service_port.name.clone().unwrap_or_default(),
        port,
        protocol.to_string(),
        service_port.app_protocol.clone(),
    ))
}

/// The port of a container of `pod` named `name` with `protocol`.
fn named_container_port(pod: &Pod, name: &str, protocol: &str) -> Option<i32> {
    pod.spec
        .as_ref()?
        .containers
        .iter()
        .flat_map(|container| container.ports.iter().flatten())
        .find(|port| {
            port.name.as_deref() == Some(name) && protocol_of(port.protocol.as_deref()) == protocol
        })
        .map(|port| port.container_port)
}

#[cfg(test)]
mod tests;
