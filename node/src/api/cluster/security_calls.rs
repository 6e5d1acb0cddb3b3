//! The Cluster service's security calls: join secrets and node certificates, join tokens, CA
//! rotation, users. All but Join are for cluster admins and audited.

use std::time::{Duration, Instant, SystemTime};

use flotilla_pki::authority::{NODE_CERTIFICATE_LIFETIME, USER_CERTIFICATE_LIFETIME};
use flotilla_pki::token::{new_secret, secrets_match};
use flotilla_pki::{Authority, Subject};
use flotilla_proto::{
    CreateUserRequest, CredentialsReply, JoinReply, JoinTokenReply, RevokeUserReply,
};
use flotilla_raft::{Command, ObjectKey};
use tonic::{Request, Response, Status};

use super::{ClusterService, TlsStatus};
use crate::api::{now_rfc3339, status_of, with_new_identity};
use crate::security::audit::AuditRecord;
use crate::security::authn::authenticate;
use crate::security::authority::{
    apply_rotation_step, next_rotation_step, AuthorityRecord, RotationStep,
};
use crate::security::rbac::Caller;
use crate::security::users::{check_user_name, record_name, Role, UserRecord};
use crate::security::{read_authority_record, write_authority_record, RECORDS_NAMESPACE};
use flotilla_pki::credentials::CredentialsFile;

/// How long each step of a CA rotation waits for every member to catch up.
const ROTATION_STEP_TIMEOUT: Duration = Duration::from_secs(60);

fn internal(error: impl std::fmt::Display) -> Status {
    Status::internal(error.to_string())
}

impl ClusterService {
    /// The caller, if it is a cluster admin (or a node).
    pub(super) fn admin<T>(&self, request: &Request<T>) -> Result<Caller, Status> {
        let caller = authenticate(request.extensions(), &self.replica)?;
        if caller.is_cluster_admin() {
            Ok(caller)
        } else {
            Err(Status::permission_denied(format!(
                "forbidden: {} is not a cluster admin (role admin without a namespace)",
                caller.name()
            )))
        }
    }

    pub(super) async fn audit<T>(
        &self,
        caller: &Caller,
        verb: &str,
        resource: &str,
        name: &str,
        result: &Result<T, Status>,
    ) {
        self.security
            .audit
            .record(AuditRecord {
                time: now_rfc3339(),
                user: caller.name(),
                verb: verb.into(),
                resource: resource.into(),
                namespace: String::new(),
                name: name.into(),
                result: match result {
                    Ok(_) => "allowed".into(),
                    Err(status) => format!("failed: {}", status.message()),
                },
            })
            .await;
    }

    fn record(&self) -> Result<(AuthorityRecord, serde_json::Value), Status> {
        read_authority_record(&self.replica, self.security.keyring.root_key())
            .map_err(|e| internal(format!("{e:#}")))?
            .ok_or_else(|| Status::unavailable("this node has no CA record yet"))
    }

    pub(super) fn check_join_secret(&self, secret: &str) -> Result<(), Status> {
        if secret.is_empty() {
            return Err(Status::unauthenticated(
                "joining needs a join token (`flotilla cluster join-token` on a member prints it; pass it with --token)",
            ));
        }
        let (record, _) = self.record()?;
        if !secrets_match(secret, &record.join_secret) {
            return Err(Status::unauthenticated(
                "the join token is not valid: it was rotated out or mistyped",
            ));
        }
        Ok(())
    }

    /// Fills in the joining node's certificate, the trusted CAs and the root key.
    pub(super) fn issue_node_credentials(
        &self,
        name: &str,
        reply: &mut JoinReply,
    ) -> Result<(), Status> {
        let (record, _) = self.record()?;
        let issued = record
            .signing_authority()
            .map_err(internal)?
            .issue(
                &Subject::Node(name.to_string()),
                SystemTime::now(),
                NODE_CERTIFICATE_LIFETIME,
            )
            .map_err(internal)?;
        reply.certificate_chain_pem = issued.chain_pem;
        reply.key_pem = issued.key_pem;
        reply.authorities_pem = record.trusted_pem();
        reply.root_key = self.security.keyring.root_key().as_bytes().to_vec();
        Ok(())
    }

    pub(super) async fn join_token_of(
        &self,
        rotate: bool,
    ) -> Result<Response<JoinTokenReply>, Status> {
        let (mut record, object) = self.record()?;
        if rotate {
            record.join_secret = new_secret();
            write_authority_record(
                &self.replica,
                self.security.keyring.root_key(),
                &record,
                Some(&object),
            )
            .await
            .map_err(|e| Status::aborted(format!("{e:#}")))?;
        }
        Ok(Response::new(JoinTokenReply {
            token: record.join_token().map_err(internal)?.to_string(),
        }))
    }

    /// Every member's TLS state, asked of each member itself.
    async fn members_tls(&self) -> Vec<(String, Option<TlsStatus>)> {
        let members = crate::membership::member_views(&self.replica, self.election_timeout_max_ms);
        let queries = members.into_iter().map(|member| async move {
            let status = self
                .member_status(&member.address, Duration::from_secs(2))
                .await;
            (member.name, status.and_then(|status| status.tls))
        });
        futures::future::join_all(queries).await
    }

    /// Waits until every member's TLS state satisfies `done`.
    async fn wait_for_members(
        &self,
        what: &str,
        done: impl Fn(&TlsStatus) -> bool,
    ) -> Result<(), Status> {
        let deadline = Instant::now() + ROTATION_STEP_TIMEOUT;
        loop {
            let states = self.members_tls().await;
            let lagging: Vec<String> = states
                .iter()
                .filter(|(_, state)| !state.as_ref().is_some_and(&done))
                .map(|(name, _)| name.clone())
                .collect();
            if lagging.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(Status::deadline_exceeded(format!(
                    "CA rotation: members {lagging:?} did not {what} within {} s; run `flotilla cluster rotate-ca` again to resume",
                    ROTATION_STEP_TIMEOUT.as_secs()
                )));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    pub(super) async fn rotate_authority(
        &self,
        caller: &Caller,
    ) -> Result<Response<CredentialsReply>, Status> {
        let mut started = false;
        loop {
            let (record, object) = self.record()?;
            let step = next_rotation_step(&record, started);
            started = true;
            let new = match step {
                RotationStep::Done => break,
                RotationStep::TrustNew => Some(
                    Authority::generate(
                        &format!("flotilla CA {}", now_rfc3339()),
                        SystemTime::now(),
                    )
                    .map_err(internal)?,
                ),
                _ => None,
            };
            let next = apply_rotation_step(&record, &step, new);
            write_authority_record(
                &self.replica,
                self.security.keyring.root_key(),
                &next,
                Some(&object),
            )
            .await
            .map_err(|e| Status::aborted(format!("{e:#}")))?;
            let trusted: Vec<String> = next
                .trusted_fingerprints()
                .map_err(internal)?
                .iter()
                .map(ToString::to_string)
                .collect();
            let signing = next
                .signing_authority()
                .and_then(|a| Ok(a.fingerprint()?))
                .map_err(internal)?
                .to_string();
            tracing::info!(?step, "CA rotation step written");
            self.wait_for_members("take the new CA record", |state| {
                state.trusted == trusted && state.certificate_issuer.as_deref() == Some(&signing)
            })
            .await?;
        }
        let credentials = match caller {
            Caller::User(user) => Some(self.issue_credentials(user).await?),
            Caller::Node(_) => None,
        };
        credentials_reply(credentials.as_ref())
    }

    async fn issue_credentials(&self, user: &UserRecord) -> Result<CredentialsFile, Status> {
        let (record, _) = self.record()?;
        let issued = record
            .signing_authority()
            .map_err(internal)?
            .issue(
                &Subject::User(user.name.clone()),
                SystemTime::now(),
                USER_CERTIFICATE_LIFETIME,
            )
            .map_err(internal)?;
        let certificate =
            flotilla_pki::authority::certificate_from_pem(&issued.cert_pem).map_err(internal)?;
        let stored = UserRecord {
            certificate: flotilla_pki::Fingerprint::of(&certificate).hex(),
            ..user.clone()
        };
        self.replica
            .write(Command::Apply {
                object: with_new_identity(stored.to_object()).into(),
            })
            .await
            .map_err(status_of)?;
        let members = crate::membership::member_views(&self.replica, self.election_timeout_max_ms);
        Ok(CredentialsFile {
            cluster_id: self.cluster_id(),
            user: user.name.clone(),
            servers: members.into_iter().map(|m| m.address).collect(),
            certificate_authorities: record.trusted_pem(),
            certificate: issued.cert_pem,
            key: issued.key_pem,
        })
    }

    pub(super) async fn issue_user(
        &self,
        request: &CreateUserRequest,
    ) -> Result<Response<CredentialsReply>, Status> {
        check_user_name(&request.name).map_err(Status::invalid_argument)?;
        let role: Role = request.role.parse().map_err(Status::invalid_argument)?;
        if !request.namespace.is_empty() && !flotilla_raft::store::is_dns_label(&request.namespace)
        {
            return Err(Status::invalid_argument(format!(
                "namespace {:?} is not a valid namespace name",
                request.namespace
            )));
        }
        let user = UserRecord {
            name: request.name.clone(),
            role,
            namespace: (!request.namespace.is_empty()).then(|| request.namespace.clone()),
            certificate: String::new(),
        };
        let credentials = self.issue_credentials(&user).await?;
        credentials_reply(Some(&credentials))
    }

    pub(super) async fn revoke(&self, name: &str) -> Result<Response<RevokeUserReply>, Status> {
        let key = ObjectKey::new("ConfigMap", RECORDS_NAMESPACE, &record_name(name));
        match self
            .replica
            .write(Command::Delete {
                key,
                resource_version: None,
            })
            .await
        {
            Ok(_) => Ok(Response::new(RevokeUserReply {})),
            Err(flotilla_raft::ReplicaError::Store(flotilla_raft::StoreError::NotFound {
                ..
            })) => Err(Status::not_found(format!("user {name:?} not found"))),
            Err(error) => Err(status_of(error)),
        }
    }
}

fn credentials_reply(
    credentials: Option<&CredentialsFile>,
) -> Result<Response<CredentialsReply>, Status> {
    Ok(Response::new(CredentialsReply {
        credentials_json: match credentials {
            Some(credentials) => serde_json::to_vec_pretty(credentials).map_err(internal)?,
            None => Vec::new(),
        },
    }))
}
