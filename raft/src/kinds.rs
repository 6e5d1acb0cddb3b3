//! The kinds this cluster knows: their API version, names, scope, and a typed parse through
//! `k8s-openapi` so that a wrongly typed field is refused with its path.

use k8s_openapi::api::{apps, autoscaling, batch, core, networking};
use serde::de::DeserializeOwned;
use serde_json::Value;

/// Everything the store and the CLI need to know about one kind.
#[derive(Debug)]
pub struct KindInfo {
    pub kind: &'static str,
    pub api_version: &'static str,
    /// Lower-case plural, as in `kubectl get pods`.
    pub plural: &'static str,
    pub short_names: &'static [&'static str],
    /// Namespaced kinds live in a namespace; cluster-scoped ones (Node, Namespace,
    /// PersistentVolume) do not.
    pub namespaced: bool,
    /// Whether the kind has a status subresource: then `update` keeps the stored status and
    /// `update-status` changes nothing else.
    pub has_status: bool,
    parse: fn(&Value) -> Result<(), String>,
}

fn parse_as<T: DeserializeOwned>(object: &Value) -> Result<(), String> {
    serde_path_to_error::deserialize::<_, T>(object)
        .map(drop)
        .map_err(|error| {
            let path = error.path().to_string();
            if path == "." {
                error.inner().to_string()
            } else {
                format!("{path}: {}", error.inner())
            }
        })
}

macro_rules! kind {
    ($kind:literal, $api_version:literal, $plural:literal, [$($short:literal),*], $namespaced:literal, $has_status:literal, $ty:ty) => {
        KindInfo {
            kind: $kind,
            api_version: $api_version,
            plural: $plural,
            short_names: &[$($short),*],
            namespaced: $namespaced,
            has_status: $has_status,
            parse: parse_as::<$ty>,
        }
    };
}

/// Every kind the store accepts.
pub static KINDS: &[KindInfo] = &[
    kind!(
        "Namespace",
        "v1",
        "namespaces",
        ["ns"],
        false,
        true,
        core::v1::Namespace
    ),
    kind!("Node", "v1", "nodes", ["no"], false, true, core::v1::Node),
    kind!("Pod", "v1", "pods", ["po"], true, true, core::v1::Pod),
    kind!(
        "ConfigMap",
        "v1",
        "configmaps",
        ["cm"],
        true,
        false,
        core::v1::ConfigMap
    ),
    kind!("Secret", "v1", "secrets", [], true, false, core::v1::Secret),
    kind!(
        "Service",
        "v1",
        "services",
        ["svc"],
        true,
        true,
        core::v1::Service
    ),
    kind!(
        "Endpoints",
        "v1",
        "endpoints",
        ["ep"],
        true,
        false,
        core::v1::Endpoints
    ),
    kind!(
        "ServiceAccount",
        "v1",
        "serviceaccounts",
        ["sa"],
        true,
        false,
        core::v1::ServiceAccount
    ),
    kind!(
        "Event",
        "v1",
        "events",
        ["ev"],
        true,
        false,
        core::v1::Event
    ),
    kind!(
        "PersistentVolume",
        "v1",
        "persistentvolumes",
        ["pv"],
        false,
        true,
        core::v1::PersistentVolume
    ),
    kind!(
        "PersistentVolumeClaim",
        "v1",
        "persistentvolumeclaims",
        ["pvc"],
        true,
        true,
        core::v1::PersistentVolumeClaim
    ),
    kind!(
        "Deployment",
        "apps/v1",
        "deployments",
        ["deploy"],
        true,
        true,
        apps::v1::Deployment
    ),
    kind!(
        "ReplicaSet",
        "apps/v1",
        "replicasets",
        ["rs"],
        true,
        true,
        apps::v1::ReplicaSet
    ),
    kind!(
        "StatefulSet",
        "apps/v1",
        "statefulsets",
        ["sts"],
        true,
        true,
        apps::v1::StatefulSet
    ),
    kind!(
        "DaemonSet",
        "apps/v1",
        "daemonsets",
        ["ds"],
        true,
        true,
        apps::v1::DaemonSet
    ),
    kind!("Job", "batch/v1", "jobs", [], true, true, batch::v1::Job),
    kind!(
        "CronJob",
        "batch/v1",
        "cronjobs",
        ["cj"],
        true,
        true,
        batch::v1::CronJob
    ),
    kind!(
        "HorizontalPodAutoscaler",
        "autoscaling/v2",
        "horizontalpodautoscalers",
        ["hpa"],
        true,
        true,
        autoscaling::v2::HorizontalPodAutoscaler
    ),
    kind!(
        "Ingress",
        "networking.k8s.io/v1",
        "ingresses",
        ["ing"],
        true,
        true,
        networking::v1::Ingress
    ),
];

/// The kind named `name` as its Kind (`Pod`), plural (`pods`), singular (`pod`) or short name
/// (`po`), case-insensitively.
pub fn lookup(name: &str) -> Option<&'static KindInfo> {
    let lower = name.to_ascii_lowercase();
    KINDS.iter().find(|info| {
        info.kind.eq_ignore_ascii_case(&lower)
            || info.plural == lower
            || info.short_names.contains(&lower.as_str())
    })
}

/// The kind whose Kind is exactly `kind` (as written in a manifest).
pub fn by_kind(kind: &str) -> Option<&'static KindInfo> {
    KINDS.iter().find(|info| info.kind == kind)
}

impl KindInfo {
    /// Parses `object` as this kind's Kubernetes type: a wrongly typed field is an error naming
    /// its path.
    pub fn check_types(&self, object: &Value) -> Result<(), String> {
        (self.parse)(object)
    }
}

#[cfg(test)]
mod tests;
