//! `flotilla.v1.Pods`: logs and exec. Any node takes the call; when the pod runs elsewhere the
//! call is forwarded to the pod's node, which talks to its container runtime.

use crate::security::authn::caller_of;
use crate::security::rbac::{self, Action, Caller, Verb};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use flotilla_proto::pods_client::PodsClient;
use flotilla_proto::pods_server::Pods;
use flotilla_proto::{ExecReply, ExecRequest, LogChunk, LogsRequest};
use flotilla_raft::{ObjectKey, Replica};
use flotilla_runtime::{labels, ContainerInfo, ContainerRuntime};
use futures::StreamExt;
use serde_json::Value;
use tonic::{Request, Response, Status};

use super::status_of;
use crate::membership::nodes_by_name;

/// Serves pod logs and exec for pods on any node.
#[derive(Clone)]
pub struct PodsService {
    replica: Replica,
    node_name: String,
    /// `None` when this node runs no agent.
    runtime: Option<Arc<dyn ContainerRuntime>>,
}

impl PodsService {
    pub fn new(
        replica: Replica,
        node_name: String,
        runtime: Option<Arc<dyn ContainerRuntime>>,
    ) -> PodsService {
        PodsService {
            replica,
            node_name,
            runtime,
        }
    }

    async fn pod(&self, namespace: &str, name: &str) -> Result<Value, Status> {
        let namespace = if namespace.is_empty() {
            "default"
        } else {
            namespace
        };
        self.replica
            .get(&ObjectKey::new("Pod", namespace, name), true)
            .await
            .map_err(status_of)
    }

    /// The client of the pod's node when it is another node.
    fn remote(&self, pod: &Value) -> Result<Option<PodsClient<tonic::transport::Channel>>, Status> {
        let node = pod
            .pointer("/spec/nodeName")
            .and_then(Value::as_str)
            .unwrap_or("");
        if node.is_empty() {
            return Err(Status::failed_precondition(
                "the pod is not bound to a node yet",
            ));
        }
        if node == self.node_name {
            return Ok(None);
        }
        let (_, member) = nodes_by_name(&self.replica)
            .get(node)
            .cloned()
            .ok_or_else(|| {
                Status::unavailable(format!("node {node:?} of the pod is not a cluster member"))
            })?;
        let channel = self
            .replica
            .channels()
            .channel(&member.address)
            .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Some(PodsClient::new(channel)))
    }

    /// The pod's container (its newest attempt, or the one before with `previous`).
    async fn container(
        &self,
        pod: &Value,
        container: &str,
        previous: bool,
    ) -> Result<(Arc<dyn ContainerRuntime>, ContainerInfo), Status> {
        let runtime = self.runtime.clone().ok_or_else(|| {
            Status::failed_precondition(format!(
                "node {} runs no pods (--no-agent)",
                self.node_name
            ))
        })?;
        let container = if container.is_empty() {
            pod.pointer("/spec/containers/0/name")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string()
        } else {
            container.to_string()
        };
        let uid = pod
            .pointer("/metadata/uid")
            .and_then(Value::as_str)
            .unwrap_or("");
        let selector = BTreeMap::from([
            (labels::POD_UID.to_string(), uid.to_string()),
            (labels::CONTAINER.to_string(), container.clone()),
        ]);
        let mut attempts = runtime
            .list_containers(&selector)
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        attempts.sort_by_key(|c| {
            c.labels
                .get(labels::ATTEMPT)
                .and_then(|a| a.parse::<u32>().ok())
                .unwrap_or(0)
        });
        let pick = if previous {
            attempts.len().checked_sub(2)
        } else {
            attempts.len().checked_sub(1)
        };
        let found = pick
            .and_then(|idx| attempts.get(idx).cloned())
            .ok_or_else(|| {
                Status::not_found(if previous {
                    format!("container {container:?} has no previous instance")
                } else {
                    format!("container {container:?} of the pod has not been created yet")
                })
            })?;
        Ok((runtime, found))
    }
}

/// Checks a pod subresource call (`pods/log` get, `pods/exec` create).
fn authorize_pod(
    caller: &Caller,
    verb: Verb,
    resource: &str,
    namespace: &str,
    pod: &str,
) -> Result<(), Status> {
    let namespace = if namespace.is_empty() {
        "default"
    } else {
        namespace
    };
    rbac::authorize(
        caller,
        &Action {
            verb,
            resource,
            namespaced: true,
            namespace,
            name: pod,
        },
    )
    .map_err(|denied| Status::permission_denied(denied.0))
}

#[tonic::async_trait]
impl Pods for PodsService {
    type LogsStream = flotilla_raft::server::BoxedStream<LogChunk>;

    async fn logs(
        &self,
        request: Request<LogsRequest>,
    ) -> Result<Response<Self::LogsStream>, Status> {
        let caller = caller_of(&request)?;
        let request = request.into_inner();
        authorize_pod(
            &caller,
            Verb::Get,
            "pods/log",
            &request.namespace,
            &request.pod,
        )?;
        let pod = self.pod(&request.namespace, &request.pod).await?;
        if let Some(mut remote) = self.remote(&pod)? {
            let stream = remote.logs(request).await?.into_inner();
            return Ok(Response::new(Box::pin(stream)));
        }
        let (runtime, container) = self
            .container(&pod, &request.container, request.previous)
            .await?;
        let tail = usize::try_from(request.tail_lines).ok();
        let stream = runtime
            .logs(&container.id, tail, request.follow)
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        let chunks = stream.map(|chunk| {
            chunk
                .map(|data| LogChunk { data })
                .map_err(|e| Status::internal(e.to_string()))
        });
        Ok(Response::new(Box::pin(chunks)))
    }

    async fn exec(&self, request: Request<ExecRequest>) -> Result<Response<ExecReply>, Status> {
        let caller = caller_of(&request)?;
        let request = request.into_inner();
        authorize_pod(
            &caller,
            Verb::Create,
            "pods/exec",
            &request.namespace,
            &request.pod,
        )?;
        if request.command.is_empty() {
            return Err(Status::invalid_argument("exec needs a command"));
        }
        let pod = self.pod(&request.namespace, &request.pod).await?;
        if let Some(mut remote) = self.remote(&pod)? {
            return remote.exec(request).await;
        }
        let (runtime, container) = self.container(&pod, &request.container, false).await?;
        let timeout = Duration::from_secs(if request.timeout_seconds == 0 {
            60
        } else {
            u64::from(request.timeout_seconds)
        });
        let input = flotilla_runtime::ExecInput {
            stdin: request.stdin_attached.then_some(request.stdin),
            tty: request.tty,
        };
        let output = runtime
            .exec_with_input(&container.id, &request.command, &input, timeout)
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(ExecReply {
            exit_code: output.exit_code,
            stdout: output.stdout,
            stderr: output.stderr,
        }))
    }
}
