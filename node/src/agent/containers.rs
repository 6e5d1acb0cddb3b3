//! From a pod's container spec to the runtime's `ContainerSpec`: labels, env (Service
//! variables, values, ConfigMap/Secret keys, pod fields), volumes as bind mounts, resource
//! limits. Secret volumes are written to a tmpfs (`PodContext::secrets_dir`), never to the
//! node's data dir, as the kubelet does.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use base64::Engine;
use flotilla_runtime::{labels, ContainerSpec, Mount, NetworkMode};
use k8s_openapi::api::core::v1::{Container, Pod};
use serde_json::Value;

use super::quantity;

/// Reads an object of the store (ConfigMap or Secret, opened) by kind, namespace and name:
/// `None` when there is none, an error when it cannot be read (a Secret that cannot be opened).
pub(super) type Lookup<'a> = &'a dyn Fn(&str, &str, &str) -> Result<Option<Value>, String>;

/// What a container needs to know about its pod and node.
pub(super) struct PodContext<'a> {
    pub(super) pod: &'a Pod,
    pub(super) cluster_id: &'a str,
    pub(super) node_name: &'a str,
    pub(super) pod_ip: Option<&'a str>,
    /// Where this pod's volumes live on the host.
    pub(super) volumes_dir: PathBuf,
    /// Where this pod's Secret volumes live on the host: on a tmpfs, so that no Secret value
    /// is written to a disk.
    pub(super) secrets_dir: PathBuf,
    /// The Service variables of its containers (`service_env.rs`); `env` and `envFrom` win.
    pub(super) service_env: Vec<(String, String)>,
}

impl PodContext<'_> {
    pub(super) fn uid(&self) -> &str {
        self.pod.metadata.uid.as_deref().unwrap_or("")
    }

    pub(super) fn name(&self) -> &str {
        self.pod.metadata.name.as_deref().unwrap_or("")
    }

    pub(super) fn namespace(&self) -> &str {
        self.pod.metadata.namespace.as_deref().unwrap_or("default")
    }

    pub(super) fn grace_seconds(&self) -> i64 {
        self.pod
            .spec
            .as_ref()
            .and_then(|s| s.termination_grace_period_seconds)
            .unwrap_or(30)
    }

    /// The labels of every container of this pod.
    pub(super) fn labels(&self, container: &str, attempt: u32) -> BTreeMap<String, String> {
        BTreeMap::from([
            (labels::CLUSTER.to_string(), self.cluster_id.to_string()),
            (labels::NODE.to_string(), self.node_name.to_string()),
            (labels::NAMESPACE.to_string(), self.namespace().to_string()),
            (labels::POD_NAME.to_string(), self.name().to_string()),
            (labels::POD_UID.to_string(), self.uid().to_string()),
            (labels::CONTAINER.to_string(), container.to_string()),
            (labels::ATTEMPT.to_string(), attempt.to_string()),
            (GRACE_LABEL.to_string(), self.grace_seconds().to_string()),
        ])
    }

    /// A host-unique container name.
    pub(super) fn container_name(&self, container: &str, attempt: u32) -> String {
        let uid: String = self.uid().chars().take(8).collect();
        format!(
            "flotilla_{}_{}_{}_{uid}_{attempt}",
            container,
            self.name(),
            self.namespace()
        )
    }
}

/// The pod's termination grace period, kept on its containers so that they can be stopped
/// properly even after the pod object is gone.
pub(super) const GRACE_LABEL: &str = "io.flotilla.pod.grace-seconds";

fn key_of(object: &Value, field: &str, key: &str) -> Option<String> {
    let value = object.get(field)?.get(key)?.as_str()?;
    if field == "data" && object.get("kind").and_then(Value::as_str) == Some("Secret") {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(value)
            .ok()?;
        return String::from_utf8(bytes).ok();
    }
    Some(value.to_string())
}

/// `data` of a ConfigMap or Secret as text pairs (Secret values decoded).
pub(super) fn data_pairs(object: &Value) -> Vec<(String, Vec<u8>)> {
    let mut pairs = Vec::new();
    let is_secret = object.get("kind").and_then(Value::as_str) == Some("Secret");
    for field in ["data", "stringData", "binaryData"] {
        let Some(map) = object.get(field).and_then(Value::as_object) else {
            continue;
        };
        for (key, value) in map {
            let Some(text) = value.as_str() else { continue };
            let decoded = if (is_secret && field == "data") || field == "binaryData" {
                base64::engine::general_purpose::STANDARD
                    .decode(text)
                    .unwrap_or_default()
            } else {
                text.as_bytes().to_vec()
            };
            pairs.push((key.clone(), decoded));
        }
    }
    pairs
}

fn field_value(ctx: &PodContext<'_>, path: &str) -> Result<String, String> {
    match path {
        "metadata.name" => Ok(ctx.name().to_string()),
        "metadata.namespace" => Ok(ctx.namespace().to_string()),
        "metadata.uid" => Ok(ctx.uid().to_string()),
        "status.podIP" => Ok(ctx.pod_ip.unwrap_or("").to_string()),
        "spec.nodeName" => Ok(ctx.node_name.to_string()),
        other => Err(format!("fieldRef {other:?} is not supported (metadata.name, metadata.namespace, metadata.uid, status.podIP, spec.nodeName)")),
    }
}

/// The container's environment, in order: the Service variables, envFrom, then env (a later
/// one of the same name wins).
pub(super) fn environment(
    ctx: &PodContext<'_>,
    container: &Container,
    lookup: Lookup<'_>,
) -> Result<Vec<(String, String)>, String> {
    let mut env: Vec<(String, String)> = ctx.service_env.clone();
    let mut set = |name: String, value: String| {
        env.retain(|(n, _)| *n != name);
        env.push((name, value));
    };
    for source in container.env_from.iter().flatten() {
        let prefix = source.prefix.clone().unwrap_or_default();
        let (kind, name, optional) = if let Some(cm) = &source.config_map_ref {
            ("ConfigMap", cm.name.clone(), cm.optional.unwrap_or(false))
        } else if let Some(secret) = &source.secret_ref {
            (
                "Secret",
                secret.name.clone(),
                secret.optional.unwrap_or(false),
            )
        } else {
            continue;
        };
        match lookup(kind, ctx.namespace(), &name)? {
            Some(object) => {
                for (key, value) in data_pairs(&object) {
                    set(
                        format!("{prefix}{key}"),
                        String::from_utf8_lossy(&value).into_owned(),
                    );
                }
            }
            None if optional => {}
            None => return Err(format!("{kind} {name:?} not found (envFrom)")),
        }
    }
    for var in container.env.iter().flatten() {
        let value = match (&var.value, &var.value_from) {
            (Some(value), _) => value.clone(),
            (None, None) => String::new(),
            (None, Some(from)) => {
                if let Some(selector) = &from.config_map_key_ref {
                    match lookup("ConfigMap", ctx.namespace(), &selector.name)?
                        .and_then(|o| key_of(&o, "data", &selector.key))
                    {
                        Some(value) => value,
                        None if selector.optional.unwrap_or(false) => continue,
                        None => {
                            return Err(format!(
                                "ConfigMap {:?} key {:?} not found (env {})",
                                selector.name, selector.key, var.name
                            ))
                        }
                    }
                } else if let Some(selector) = &from.secret_key_ref {
                    match lookup("Secret", ctx.namespace(), &selector.name)?.and_then(|o| {
                        key_of(&o, "data", &selector.key)
                            .or_else(|| key_of(&o, "stringData", &selector.key))
                    }) {
                        Some(value) => value,
                        None if selector.optional.unwrap_or(false) => continue,
                        None => {
                            return Err(format!(
                                "Secret {:?} key {:?} not found (env {})",
                                selector.name, selector.key, var.name
                            ))
                        }
                    }
                } else if let Some(field) = &from.field_ref {
                    field_value(ctx, &field.field_path)?
                } else {
                    return Err(format!("env {}: valueFrom kind is not supported", var.name));
                }
            }
        };
        set(var.name.clone(), value);
    }
    Ok(env)
}

/// Host paths of the pod's volumes, by volume name, and whether they are read-only.
pub(super) fn volume_sources(
    ctx: &PodContext<'_>,
) -> Result<BTreeMap<String, (PathBuf, bool)>, String> {
    let mut sources = BTreeMap::new();
    for volume in ctx
        .pod
        .spec
        .as_ref()
        .and_then(|s| s.volumes.as_ref())
        .into_iter()
        .flatten()
    {
        let path = if let Some(host_path) = &volume.host_path {
            (PathBuf::from(&host_path.path), false)
        } else if volume.empty_dir.is_some() {
            (ctx.volumes_dir.join(&volume.name), false)
        } else if volume.config_map.is_some() {
            (ctx.volumes_dir.join(&volume.name), true)
        } else if volume.secret.is_some() {
            (ctx.secrets_dir.join(&volume.name), true)
        } else {
            return Err(format!(
                "volume {:?}: only emptyDir, hostPath, configMap and secret are supported",
                volume.name
            ));
        };
        sources.insert(volume.name.clone(), path);
    }
    Ok(sources)
}

/// Writes the files of configMap and secret volumes (secret ones on the tmpfs) and creates
/// emptyDir directories.
pub(super) fn materialize_volumes(ctx: &PodContext<'_>, lookup: Lookup<'_>) -> Result<(), String> {
    for volume in ctx
        .pod
        .spec
        .as_ref()
        .and_then(|s| s.volumes.as_ref())
        .into_iter()
        .flatten()
    {
        let dir = if volume.secret.is_some() {
            ctx.secrets_dir.join(&volume.name)
        } else {
            ctx.volumes_dir.join(&volume.name)
        };
        let source = if let Some(cm) = &volume.config_map {
            Some(("ConfigMap", cm.name.clone(), cm.optional.unwrap_or(false)))
        } else {
            volume.secret.as_ref().map(|s| {
                (
                    "Secret",
                    s.secret_name.clone().unwrap_or_default(),
                    s.optional.unwrap_or(false),
                )
            })
        };
        if volume.empty_dir.is_none() && source.is_none() {
            continue;
        }
        std::fs::create_dir_all(&dir)
            .map_err(|e| format!("create volume {:?}: {e}", volume.name))?;
        let Some((kind, name, optional)) = source else {
            continue;
        };
        match lookup(kind, ctx.namespace(), &name)? {
            Some(object) => {
                for (key, value) in data_pairs(&object) {
                    if key.contains('/') || key.starts_with('.') {
                        continue;
                    }
                    write_file(&dir.join(&key), &value)
                        .map_err(|e| format!("write {kind} {name:?} key {key:?}: {e}"))?;
                }
            }
            None if optional => {}
            None => {
                return Err(format!(
                    "{kind} {name:?} not found (volume {:?})",
                    volume.name
                ))
            }
        }
    }
    Ok(())
}

/// Writes `contents` to `path` through a temporary file renamed over it.
pub(super) fn write_file(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let temporary = path.with_extension("flotilla-tmp");
    std::fs::write(&temporary, contents)?;
    std::fs::rename(&temporary, path)
}

/// The runtime spec of one container of the pod.
pub(super) fn container_spec(
    ctx: &PodContext<'_>,
    container: &Container,
    attempt: u32,
    network: NetworkMode,
    lookup: Lookup<'_>,
) -> Result<ContainerSpec, String> {
    let sources = volume_sources(ctx)?;
    let mut mounts = Vec::new();
    for mount in container.volume_mounts.iter().flatten() {
        let (host, read_only) = sources.get(&mount.name).ok_or_else(|| {
            format!(
                "container {:?} mounts unknown volume {:?}",
                container.name, mount.name
            )
        })?;
        let host = match &mount.sub_path {
            Some(sub) if !sub.is_empty() => host.join(sub),
            _ => host.clone(),
        };
        mounts.push(Mount {
            host_path: host.display().to_string(),
            container_path: mount.mount_path.clone(),
            read_only: *read_only || mount.read_only.unwrap_or(false),
        });
    }
    let limits = container.resources.as_ref().and_then(|r| r.limits.as_ref());
    let limit = |name: &str| limits.and_then(|l| l.get(name)).map(|q| q.0.clone());
    Ok(ContainerSpec {
        name: ctx.container_name(&container.name, attempt),
        image: container.image.clone().unwrap_or_default(),
        entrypoint: container.command.clone(),
        args: container.args.clone(),
        working_dir: container.working_dir.clone(),
        env: environment(ctx, container, lookup)?,
        labels: ctx.labels(&container.name, attempt),
        mounts,
        memory_limit_bytes: limit("memory").and_then(|q| quantity::bytes(&q)),
        nano_cpus: limit("cpu").and_then(|q| quantity::cpu_nanos(&q)),
        network,
    })
}

#[cfg(test)]
mod tests;
