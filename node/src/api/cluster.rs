//! `flotilla.v1.Cluster`: status, join, remove and data key rotation, served by any node
//! (writes go to the leader).

use std::sync::Arc;
use std::time::Duration;

use flotilla_proto::cluster_client::ClusterClient;
use flotilla_proto::cluster_server::Cluster;
use flotilla_proto::{
    CreateUserRequest, CredentialsReply, JoinReply, JoinRequest, JoinTokenReply, JoinTokenRequest,
    NodeHeartbeatReply, NodeHeartbeatRequest, RemoveReply, RemoveRequest, RevokeUserReply,
    RevokeUserRequest, RotateCaRequest, RotateEncryptionKeyReply, RotateEncryptionKeyRequest,
    StatusReply, StatusRequest,
};
use flotilla_raft::{kinds, ClusterNode, Command, ObjectKey, Replica, ReplicaError, StoreError};
use openraft::async_runtime::WatchReceiver;
use serde::{Deserialize, Serialize};
use tonic::{Request, Response, Status};

use super::objects::authorize;
use super::{status_of, status_of_encryption};
use crate::encryption::Keyring;
use crate::membership::{member_views, nodes_by_name, remove_member};
use crate::security::authn::authenticate;
use crate::security::rbac::{Caller, Verb};
use crate::security::NodeSecurity;

mod security_calls;

/// Serves cluster status and membership changes, join tokens, CA rotation and users.
#[derive(Clone)]
pub struct ClusterService {
    replica: Replica,
    election_timeout_max_ms: u64,
    security: Arc<NodeSecurity>,
    keyring: Keyring,
}

/// What `flotilla cluster status -o json` prints.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterStatus {
    pub cluster_id: String,
    /// The name of the leader, if one is known.
    pub leader: Option<String>,
    pub term: u64,
    pub commit_index: Option<u64>,
    /// The node that answered.
    pub answered_by: String,
    pub members: Vec<MemberStatus>,
    /// The answering node's TLS state (what a CA rotation waits on).
    #[serde(default)]
    pub tls: Option<TlsStatus>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct TlsStatus {
    /// Fingerprints of the CAs the node trusts.
    pub trusted: Vec<String>,
    /// Fingerprint of the CA that issued the node's certificate.
    pub certificate_issuer: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MemberStatus {
    pub id: u64,
    pub name: String,
    pub address: String,
    /// "voter" or "learner".
    pub role: String,
    pub healthy: bool,
    pub last_contact_ms: Option<u64>,
    pub matched_index: Option<u64>,
    pub applied_index: Option<u64>,
}

/// How long the leader waits for each member's own applied index.
const MEMBER_STATUS_TIMEOUT: Duration = Duration::from_millis(500);

impl ClusterService {
    pub fn new(
        replica: Replica,
        election_timeout_max_ms: u64,
        security: Arc<NodeSecurity>,
        keyring: Keyring,
    ) -> ClusterService {
        ClusterService {
            replica,
            election_timeout_max_ms,
            security,
            keyring,
        }
    }

    fn tls_status(&self) -> TlsStatus {
        TlsStatus {
            trusted: self
                .security
                .tls
                .authorities()
                .iter()
                .map(ToString::to_string)
                .collect(),
            certificate_issuer: self.security.certificate_issuer().map(|f| f.to_string()),
        }
    }

    /// The cluster's id as this node's store knows it (empty before bootstrap).
    fn cluster_id(&self) -> String {
        self.replica
            .reader()
            .registry()
            .map(|r| r.cluster_id)
            .unwrap_or_default()
    }

    fn local_status(&self) -> ClusterStatus {
        let metrics = self.replica.raft().metrics().borrow_watched().clone();
        let members = member_views(&self.replica, self.election_timeout_max_ms);
        let leader = metrics
            .current_leader
            .and_then(|id| members.iter().find(|m| m.id == id).map(|m| m.name.clone()));
        let answered_by = members
            .iter()
            .find(|m| m.id == metrics.id)
            .map(|m| m.name.clone())
            .unwrap_or_default();
        let cluster_id = self.cluster_id();
        let applied = metrics.last_applied.as_ref().map(|id| id.index);
        ClusterStatus {
            tls: Some(self.tls_status()),
            cluster_id,
            leader,
            term: metrics.current_term,
            commit_index: metrics.local_committed.as_ref().map(|id| id.index),
            answered_by,
            members: members
                .into_iter()
                .map(|m| MemberStatus {
                    applied_index: (m.id == metrics.id).then_some(applied).flatten(),
                    id: m.id,
                    name: m.name,
                    address: m.address,
                    role: if m.voter { "voter" } else { "learner" }.into(),
                    healthy: m.healthy,
                    last_contact_ms: m.last_contact_ms,
                    matched_index: m.matched_index,
                })
                .collect(),
        }
    }

    fn cluster_client(
        &self,
        address: &str,
    ) -> Result<ClusterClient<tonic::transport::Channel>, Status> {
        let channel = self
            .replica
            .channels()
            .channel(address)
            .map_err(|e| Status::internal(e.to_string()))?;
        Ok(ClusterClient::new(channel))
    }

    /// The leader's address when another node leads; `None` when this node leads.
    fn leader_elsewhere(&self) -> Result<Option<ClusterNode>, Status> {
        match self.replica.leader() {
            Some((id, _)) if id == self.replica.node_id() => Ok(None),
            Some((_, node)) => Ok(Some(node)),
            None => Err(Status::unavailable(
                "cluster unavailable: no leader is elected",
            )),
        }
    }

    /// Fills in each member's applied index by asking it (the leader's status).
    async fn with_applied_indexes(&self, mut status: ClusterStatus) -> ClusterStatus {
        let queries = status.members.iter().map(|member| async move {
            self.member_status(&member.address, MEMBER_STATUS_TIMEOUT)
                .await?
                .members
                .into_iter()
                .find(|m| m.id == member.id)?
                .applied_index
        });
        let applied = futures::future::join_all(queries).await;
        for (member, applied_index) in status.members.iter_mut().zip(applied) {
            if applied_index.is_some() {
                member.applied_index = applied_index;
            }
        }
        status
    }

    /// The member at `address`'s own view (`Cluster.Status` with `local`), if it answers
    /// within `timeout`.
    async fn member_status(&self, address: &str, timeout: Duration) -> Option<ClusterStatus> {
        let mut client = self.cluster_client(address).ok()?;
        let reply = tokio::time::timeout(timeout, client.status(StatusRequest { local: true }))
            .await
            .ok()?
            .ok()?;
        serde_json::from_slice(&reply.into_inner().status_json).ok()
    }
}

fn status_reply(status: &ClusterStatus) -> Result<Response<StatusReply>, Status> {
    Ok(Response::new(StatusReply {
        status_json: serde_json::to_vec(status).map_err(|e| Status::internal(e.to_string()))?,
    }))
}

#[tonic::async_trait]
impl Cluster for ClusterService {
    async fn status(
        &self,
        request: Request<StatusRequest>,
    ) -> Result<Response<StatusReply>, Status> {
        authenticate(request.extensions(), &self.replica)?;
        let local = self.local_status();
        if request.into_inner().local {
            return status_reply(&local);
        }
        match self.leader_elsewhere() {
            Ok(None) => status_reply(&self.with_applied_indexes(local).await),
            Ok(Some(leader)) => {
                let mut client = self.cluster_client(&leader.address)?;
                match tokio::time::timeout(
                    MEMBER_STATUS_TIMEOUT * 4,
                    client.status(StatusRequest { local: false }),
                )
                .await
                {
                    Ok(Ok(reply)) => Ok(reply),
                    // The leader is unreachable from here: answer with what this node knows.
                    _ => status_reply(&local),
                }
            }
            Err(_) => status_reply(&local),
        }
    }

    async fn join(&self, request: Request<JoinRequest>) -> Result<Response<JoinReply>, Status> {
        let forwarded = matches!(
            authenticate(request.extensions(), &self.replica),
            Ok(Caller::Node(_))
        );
        let request = request.into_inner();
        if request.name.is_empty() || request.address.is_empty() {
            return Err(Status::invalid_argument(
                "join needs the node's name and address",
            ));
        }
        self.check_join_secret(&request.token_secret)?;
        let mut reply = match self.leader_elsewhere()? {
            Some(leader) => self
                .cluster_client(&leader.address)?
                .join(request.clone())
                .await?
                .into_inner(),
            None => self.register(&request).await?,
        };
        if !forwarded {
            self.issue_node_credentials(&request.name, &mut reply)?;
        }
        Ok(Response::new(reply))
    }

    async fn remove(
        &self,
        request: Request<RemoveRequest>,
    ) -> Result<Response<RemoveReply>, Status> {
        let caller = self.admin(&request)?;
        let name = request.get_ref().name.clone();
        let result = self.remove_node(request.into_inner()).await;
        self.audit(&caller, "delete", "nodes", &name, &result).await;
        result
    }

    async fn join_token(
        &self,
        request: Request<JoinTokenRequest>,
    ) -> Result<Response<JoinTokenReply>, Status> {
        let caller = self.admin(&request)?;
        let rotate = request.into_inner().rotate;
        let result = self.join_token_of(rotate).await;
        if rotate {
            self.audit(&caller, "rotate", "join-token", "", &result)
                .await;
        }
        result
    }

    async fn rotate_ca(
        &self,
        request: Request<RotateCaRequest>,
    ) -> Result<Response<CredentialsReply>, Status> {
        let caller = self.admin(&request)?;
        let result = self.rotate_authority(&caller).await;
        self.audit(&caller, "rotate", "certificate-authority", "", &result)
            .await;
        result
    }

    async fn create_user(
        &self,
        request: Request<CreateUserRequest>,
    ) -> Result<Response<CredentialsReply>, Status> {
        let caller = self.admin(&request)?;
        let request = request.into_inner();
        let result = self.issue_user(&request).await;
        self.audit(&caller, "create", "users", &request.name, &result)
            .await;
        result
    }

    async fn revoke_user(
        &self,
        request: Request<RevokeUserRequest>,
    ) -> Result<Response<RevokeUserReply>, Status> {
        let caller = self.admin(&request)?;
        let name = request.into_inner().name;
        let result = self.revoke(&name).await;
        self.audit(&caller, "delete", "users", &name, &result).await;
        result
    }

    async fn rotate_encryption_key(
        &self,
        request: Request<RotateEncryptionKeyRequest>,
    ) -> Result<Response<RotateEncryptionKeyReply>, Status> {
        let caller = self.admin(&request)?;
        let request = request.into_inner();
        // One node rotates at a time: the leader.
        if let Some(leader) = self.leader_elsewhere()? {
            return self
                .cluster_client(&leader.address)?
                .rotate_encryption_key(request)
                .await;
        }
        let result = self
            .keyring
            .rotate()
            .await
            .map_err(status_of_encryption)
            .map(|rotation| {
                Response::new(RotateEncryptionKeyReply {
                    key_id: rotation.key_id,
                    reencrypted: rotation.reencrypted,
                })
            });
        self.audit(&caller, "rotate", "encryption-key", "", &result)
            .await;
        result
    }

    async fn node_heartbeat(
        &self,
        request: Request<NodeHeartbeatRequest>,
    ) -> Result<Response<NodeHeartbeatReply>, Status> {
        let caller = authenticate(request.extensions(), &self.replica)?;
        let node_name = request.into_inner().node_name;
        let info = kinds::lookup("Node").ok_or_else(|| Status::internal("Node is not a kind"))?;
        authorize(&caller, Verb::Update, info, "", &node_name)?;
        let key = ObjectKey::new("Node", "", &node_name);
        let stored = self
            .replica
            .reader()
            .get(&key)
            .map_err(|error| status_of(error.into()))?;
        if stored.is_none() {
            return Err(Status::not_found(format!(
                "node {node_name:?} is not registered (no Node object of that name)"
            )));
        }
        self.replica
            .heartbeat(&node_name)
            .await
            .map_err(status_of)?;
        Ok(Response::new(NodeHeartbeatReply {}))
    }
}

impl ClusterService {
    /// Registers the joining node and adds it as a learner (on the leader).
    async fn register(&self, request: &JoinRequest) -> Result<JoinReply, Status> {
        // A name registered by an earlier attempt whose node never entered the membership
        // (the attempt failed after registering) is given back to the same name; a name of a
        // current member is refused.
        let registered = self
            .replica
            .reader()
            .registry()
            .map_err(|e| status_of(e.into()))?;
        let members = nodes_by_name(&self.replica);
        let node_id = match registered.nodes.get(&request.name) {
            Some(_) if members.contains_key(&request.name) => {
                return Err(status_of(ReplicaError::Store(StoreError::NodeNameTaken {
                    name: request.name.clone(),
                })));
            }
            Some(id) => *id,
            None => self
                .replica
                .write(Command::RegisterNode {
                    name: request.name.clone(),
                    address: request.address.clone(),
                })
                .await
                .map_err(status_of)?
                .node_id
                .ok_or_else(|| Status::internal("the store did not assign a node id"))?,
        };
        let node = ClusterNode {
            name: request.name.clone(),
            address: request.address.clone(),
        };
        // Non-blocking: the new node starts its server after this reply; replication retries.
        // Membership changes are serialized, so a concurrent join may have to wait its turn.
        let mut attempts = 0;
        loop {
            match self
                .replica
                .raft()
                .add_learner(node_id, node.clone(), false)
                .await
            {
                Ok(_) => break,
                Err(error) if attempts < 50 && error.forward_to_leader().is_none() => {
                    attempts += 1;
                    tracing::debug!(%error, "add learner, retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(error) => {
                    return Err(Status::unavailable(format!(
                        "add {} as a learner: {error}",
                        request.name
                    )))
                }
            }
        }
        tracing::info!(name = %request.name, node_id, "node joined as a learner");
        let cluster_id = self.cluster_id();
        Ok(JoinReply {
            node_id,
            cluster_id,
            ..Default::default()
        })
    }

    async fn remove_node(&self, request: RemoveRequest) -> Result<Response<RemoveReply>, Status> {
        if let Some(leader) = self.leader_elsewhere()? {
            return self.cluster_client(&leader.address)?.remove(request).await;
        }
        let Some((id, _)) = nodes_by_name(&self.replica).get(&request.name).cloned() else {
            return Err(status_of(ReplicaError::Store(StoreError::NodeNotFound {
                name: request.name,
            })));
        };
        remove_member(&self.replica, id)
            .await
            .map_err(|e| Status::unavailable(format!("remove {}: {e}", request.name)))?;
        self.replica
            .write(Command::ForgetNode {
                name: request.name.clone(),
            })
            .await
            .map_err(status_of)?;
        tracing::info!(name = %request.name, node_id = id, "node removed from the cluster");
        Ok(Response::new(RemoveReply {}))
    }
}
