//! Workload commands: scale, set image, rollout, cordon, uncordon, drain. Each reads the
//! object, changes its spec and writes it back with its resourceVersion, retrying on conflict.

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use flotilla_proto::objects_client::ObjectsClient;
use flotilla_proto::{DeleteRequest, GetRequest, ListRequest, ObjectRequest};
use serde_json::{json, Value};
use tonic::transport::Channel;

use super::client::status_error;

/// `deploy/web`, `deployment web` → ("Deployment", "web").
pub(super) fn parse_target(
    target: &str,
    default_kind: &str,
) -> anyhow::Result<(&'static str, String)> {
    let (kind, name) = match target.split_once('/') {
        Some((kind, name)) => (kind, name),
        None => (default_kind, target),
    };
    let info =
        flotilla_raft::kinds::lookup(kind).ok_or_else(|| anyhow!("unknown kind {kind:?}"))?;
    if name.is_empty() {
        bail!("{target:?} names no object; use KIND/NAME");
    }
    Ok((info.kind, name.to_string()))
}

async fn get(
    client: &mut ObjectsClient<Channel>,
    kind: &str,
    namespace: &str,
    name: &str,
) -> anyhow::Result<Value> {
    let reply = client
        .get(GetRequest {
            kind: kind.into(),
            namespace: namespace.into(),
            name: name.into(),
            local: false,
        })
        .await
        .map_err(status_error)?
        .into_inner();
    serde_json::from_slice(&reply.object_json).context("decode the object")
}

async fn list(
    client: &mut ObjectsClient<Channel>,
    kind: &str,
    namespace: &str,
    field_selector: &str,
) -> anyhow::Result<Vec<Value>> {
    let reply = client
        .list(ListRequest {
            kind: kind.into(),
            namespace: namespace.into(),
            label_selector: String::new(),
            field_selector: field_selector.into(),
            local: false,
        })
        .await
        .map_err(status_error)?
        .into_inner();
    reply
        .items_json
        .iter()
        .map(|bytes| serde_json::from_slice(bytes).context("decode an object"))
        .collect()
}

/// Reads, changes and writes back an object, retrying when someone else wrote it meanwhile.
pub(super) async fn update_with(
    client: &mut ObjectsClient<Channel>,
    kind: &str,
    namespace: &str,
    name: &str,
    change: impl Fn(&mut Value) -> anyhow::Result<()>,
) -> anyhow::Result<Value> {
    for _attempt in 0..10 {
        let mut object = get(client, kind, namespace, name).await?;
        change(&mut object)?;
        match client
            .update(ObjectRequest {
                object_json: serde_json::to_vec(&object)?,
            })
            .await
        {
            Ok(reply) => {
                return serde_json::from_slice(&reply.into_inner().object_json)
                    .context("decode the object")
            }
            Err(status) if status.code() == tonic::Code::Aborted => continue,
            Err(status) => return Err(status_error(status)),
        }
    }
    bail!("{kind}/{name} kept changing; try again")
}

fn lower(kind: &str) -> String {
    kind.to_ascii_lowercase()
}

pub(super) async fn scale(
    client: &mut ObjectsClient<Channel>,
    target: &str,
    namespace: &str,
    replicas: i64,
) -> anyhow::Result<()> {
    if replicas < 0 {
        bail!("--replicas must be 0 or more");
    }
    let (kind, name) = parse_target(target, "Deployment")?;
    if !matches!(kind, "Deployment" | "ReplicaSet" | "StatefulSet") {
        bail!("{kind} cannot be scaled");
    }
    update_with(client, kind, namespace, &name, |object| {
        object["spec"]["replicas"] = json!(replicas);
        Ok(())
    })
    .await?;
    println!("{}/{name} scaled", lower(kind));
    Ok(())
}

pub(super) async fn set_image(
    client: &mut ObjectsClient<Channel>,
    target: &str,
    namespace: &str,
    assignments: &[String],
) -> anyhow::Result<()> {
    let (kind, name) = parse_target(target, "Deployment")?;
    let mut pairs = Vec::new();
    for assignment in assignments {
        let (container, image) = assignment
            .split_once('=')
            .ok_or_else(|| anyhow!("{assignment:?} is not CONTAINER=IMAGE"))?;
        pairs.push((container.to_string(), image.to_string()));
    }
    update_with(client, kind, namespace, &name, |object| {
        let containers = object
            .pointer_mut("/spec/template/spec/containers")
            .and_then(Value::as_array_mut)
            .ok_or_else(|| anyhow!("{kind}/{name} has no pod template"))?;
        for (container, image) in &pairs {
            let found = containers
                .iter_mut()
                .find(|c| c["name"] == container.as_str() || container == "*")
                .ok_or_else(|| anyhow!("{kind}/{name} has no container {container:?}"))?;
            found["image"] = json!(image);
        }
        Ok(())
    })
    .await?;
    println!("{}/{name} image updated", lower(kind));
    Ok(())
}

/// The ReplicaSets of a Deployment with their revisions, oldest first.
async fn revisions(
    client: &mut ObjectsClient<Channel>,
    namespace: &str,
    deployment: &Value,
) -> anyhow::Result<Vec<(u64, Value)>> {
    let uid = deployment
        .pointer("/metadata/uid")
        .and_then(Value::as_str)
        .unwrap_or("");
    let mut owned: Vec<(u64, Value)> = list(client, "ReplicaSet", namespace, "")
        .await?
        .into_iter()
        .filter(|rs| {
            rs.pointer("/metadata/ownerReferences")
                .and_then(Value::as_array)
                .is_some_and(|refs| refs.iter().any(|r| r["uid"] == uid))
        })
        .map(|rs| {
            let revision = rs
                .pointer("/metadata/annotations/deployment.kubernetes.io~1revision")
                .and_then(Value::as_str)
                .and_then(|r| r.parse().ok())
                .unwrap_or(0);
            (revision, rs)
        })
        .collect();
    owned.sort_by_key(|(revision, _)| *revision);
    Ok(owned)
}

fn condition<'a>(object: &'a Value, kind: &str) -> Option<&'a Value> {
    object
        .pointer("/status/conditions")
        .and_then(Value::as_array)
        .and_then(|c| c.iter().find(|c| c["type"] == kind))
}

fn number(object: &Value, pointer: &str) -> i64 {
    object.pointer(pointer).and_then(Value::as_i64).unwrap_or(0)
}

/// `rollout status`: waits until the rollout completes; fails when its deadline passed.
pub(super) async fn rollout_status(
    client: &mut ObjectsClient<Channel>,
    name: &str,
    namespace: &str,
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    let mut last_line = String::new();
    loop {
        let deployment = get(client, "Deployment", namespace, name).await?;
        let desired = deployment
            .pointer("/spec/replicas")
            .and_then(Value::as_i64)
            .unwrap_or(1);
        let updated = number(&deployment, "/status/updatedReplicas");
        let available = number(&deployment, "/status/availableReplicas");
        let total = number(&deployment, "/status/replicas");
        let observed = number(&deployment, "/status/observedGeneration");
        let generation = number(&deployment, "/metadata/generation");
        if let Some(progressing) = condition(&deployment, "Progressing") {
            if progressing["reason"] == "ProgressDeadlineExceeded" {
                bail!("deployment {name:?} exceeded its progress deadline");
            }
        }
        let line = if observed < generation {
            "Waiting for deployment spec update to be observed...".to_string()
        } else if updated < desired {
            format!("Waiting for deployment {name:?} rollout to finish: {updated} out of {desired} new replicas have been updated...")
        } else if total > updated {
            format!("Waiting for deployment {name:?} rollout to finish: {} old replicas are pending termination...", total - updated)
        } else if available < updated {
            format!("Waiting for deployment {name:?} rollout to finish: {available} of {updated} updated replicas are available...")
        } else {
            println!("deployment {name:?} successfully rolled out");
            return Ok(());
        };
        if line != last_line {
            println!("{line}");
            last_line = line;
        }
        if Instant::now() > deadline {
            bail!("timed out waiting for the rollout of {name:?}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

pub(super) async fn rollout_history(
    client: &mut ObjectsClient<Channel>,
    name: &str,
    namespace: &str,
) -> anyhow::Result<()> {
    let deployment = get(client, "Deployment", namespace, name).await?;
    println!("deployment.apps/{name}");
    println!("REVISION  CHANGE-CAUSE");
    for (revision, rs) in revisions(client, namespace, &deployment).await? {
        let cause = rs
            .pointer("/metadata/annotations/kubernetes.io~1change-cause")
            .and_then(Value::as_str)
            .unwrap_or("<none>");
        println!("{revision:<9} {cause}");
    }
    Ok(())
}

pub(super) async fn rollout_undo(
    client: &mut ObjectsClient<Channel>,
    name: &str,
    namespace: &str,
    to_revision: Option<u64>,
) -> anyhow::Result<()> {
    let deployment = get(client, "Deployment", namespace, name).await?;
    let history = revisions(client, namespace, &deployment).await?;
    let current = history.last().map(|(r, _)| *r).unwrap_or(0);
    let target = match to_revision {
        Some(revision) => history.iter().find(|(r, _)| *r == revision),
        None => history.iter().rev().find(|(r, _)| *r < current),
    }
    .ok_or_else(|| anyhow!("no revision to roll back to (current revision {current})"))?;
    let mut template = target
        .1
        .pointer("/spec/template")
        .cloned()
        .unwrap_or_default();
    if let Some(labels) = template
        .pointer_mut("/metadata/labels")
        .and_then(Value::as_object_mut)
    {
        labels.remove("pod-template-hash");
    }
    update_with(client, "Deployment", namespace, name, |object| {
        object["spec"]["template"] = template.clone();
        Ok(())
    })
    .await?;
    println!(
        "deployment.apps/{name} rolled back to revision {}",
        target.0
    );
    Ok(())
}

pub(super) async fn rollout_set(
    client: &mut ObjectsClient<Channel>,
    name: &str,
    namespace: &str,
    action: &str,
) -> anyhow::Result<()> {
    let now = crate::api::now_rfc3339();
    update_with(client, "Deployment", namespace, name, |object| {
        match action {
            "pause" => object["spec"]["paused"] = json!(true),
            "resume" => object["spec"]["paused"] = json!(false),
            "restart" => {
                object["spec"]["template"]["metadata"]["annotations"]
                    ["kubectl.kubernetes.io/restartedAt"] = json!(now.clone());
            }
            other => bail!("unknown rollout action {other:?}"),
        }
        Ok(())
    })
    .await?;
    let done = match action {
        "pause" => "paused",
        "resume" => "resumed",
        _ => "restarted",
    };
    println!("deployment.apps/{name} {done}");
    Ok(())
}

pub(super) async fn cordon(
    client: &mut ObjectsClient<Channel>,
    node: &str,
    unschedulable: bool,
) -> anyhow::Result<()> {
    update_with(client, "Node", "", node, |object| {
        object["spec"]["unschedulable"] = json!(unschedulable);
        Ok(())
    })
    .await?;
    println!(
        "node/{node} {}",
        if unschedulable {
            "cordoned"
        } else {
            "uncordoned"
        }
    );
    Ok(())
}

/// Cordons the node and deletes its pods (their owners recreate them elsewhere).
pub(super) async fn drain(client: &mut ObjectsClient<Channel>, node: &str) -> anyhow::Result<()> {
    cordon(client, node, true).await?;
    let pods = list(client, "Pod", "", &format!("spec.nodeName={node}")).await?;
    for pod in pods {
        let owned_by_daemon_set = pod
            .pointer("/metadata/ownerReferences")
            .and_then(Value::as_array)
            .is_some_and(|refs| refs.iter().any(|r| r["kind"] == "DaemonSet"));
        if owned_by_daemon_set {
            continue;
        }
        let namespace = pod
            .pointer("/metadata/namespace")
            .and_then(Value::as_str)
            .unwrap_or("default")
            .to_string();
        let name = pod
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        client
            .delete(DeleteRequest {
                kind: "Pod".into(),
                namespace: namespace.clone(),
                name: name.clone(),
                resource_version: String::new(),
            })
            .await
            .map_err(status_error)?;
        println!("evicting pod {namespace}/{name}");
    }
    println!("node/{node} drained");
    Ok(())
}

/// `--cascade=orphan`: the dependents of `owner_uid` lose their ownerReferences to it.
pub(super) async fn orphan_dependents(
    client: &mut ObjectsClient<Channel>,
    namespace: &str,
    owner_uid: &str,
) -> anyhow::Result<()> {
    for kind in ["ReplicaSet", "Pod"] {
        for object in list(client, kind, namespace, "").await? {
            let owned = object
                .pointer("/metadata/ownerReferences")
                .and_then(Value::as_array)
                .is_some_and(|refs| refs.iter().any(|r| r["uid"] == owner_uid));
            if !owned {
                continue;
            }
            let name = object
                .pointer("/metadata/name")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            update_with(client, kind, namespace, &name, |object| {
                if let Some(refs) = object
                    .pointer_mut("/metadata/ownerReferences")
                    .and_then(Value::as_array_mut)
                {
                    refs.retain(|r| r["uid"] != owner_uid);
                }
                Ok(())
            })
            .await?;
        }
    }
    Ok(())
}
