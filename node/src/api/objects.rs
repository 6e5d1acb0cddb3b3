//! `flotilla.v1.Objects`: create, apply, get, list, update, update-status, delete, watch.
//!
//! Secrets are sealed (`encryption.rs`) before they are proposed and opened in every reply,
//! list item and watch event, so no log entry or stored record holds their plaintext.

use flotilla_proto::objects_server::Objects;
use flotilla_proto::{
    DeleteRequest, GetRequest, ListReply, ListRequest, ObjectReply, ObjectRequest, WatchEvent,
    WatchRequest,
};
use flotilla_raft::kinds::{self, KindInfo};
use flotilla_raft::selector::{FieldSelector, LabelSelector};
use flotilla_raft::watch::WatchFilter;
use flotilla_raft::{
    store, Command, ObjectKey, Replica, ReplicaError, SharedObject, StoreError, UpdatePart,
};
use serde_json::Value;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status};

use super::limits::{self, SharedWriteRateLimiter, WriteRateLimit};
use super::{now_rfc3339, status_of, status_of_encryption, with_new_identity};
use crate::encryption::{self, EncryptionError, Keyring};
use crate::security::audit::{AuditLog, AuditRecord};
use crate::security::authn::caller_of;
use crate::security::rbac::{self, Action, Caller, Verb};

/// Serves the object API from this node's replica. Every call is authorized for the caller
/// the authentication interceptor found; every write (allowed or not) is audited.
#[derive(Clone)]
pub struct ObjectsService {
    replica: Replica,
    keyring: Keyring,
    audit: AuditLog,
    writes: SharedWriteRateLimiter,
}

impl ObjectsService {
    /// Writes are limited per client by `write_rate_limit`.
    pub fn new(
        replica: Replica,
        keyring: Keyring,
        audit: AuditLog,
        write_rate_limit: WriteRateLimit,
    ) -> ObjectsService {
        ObjectsService {
            replica,
            keyring,
            audit,
            writes: SharedWriteRateLimiter::new(write_rate_limit),
        }
    }
}

/// The kind, namespace and name a validated object names.
fn target_of(object: &Value) -> (&'static KindInfo, String, String) {
    let kind = object
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let info = kinds::by_kind(kind).unwrap_or(&kinds::KINDS[0]);
    let meta = |field: &str| {
        object
            .pointer(&format!("/metadata/{field}"))
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    (info, meta("namespace"), meta("name"))
}

/// Checks `verb` on `info` in `namespace` for the caller; PermissionDenied naming all four.
pub(crate) fn authorize(
    caller: &Caller,
    verb: Verb,
    info: &KindInfo,
    namespace: &str,
    name: &str,
) -> Result<(), Status> {
    rbac::authorize(
        caller,
        &Action {
            verb,
            resource: info.plural,
            namespaced: info.namespaced,
            namespace,
            name,
        },
    )
    .map_err(|denied| Status::permission_denied(denied.0))
}

fn invalid(error: impl std::fmt::Display) -> Status {
    Status::invalid_argument(error.to_string())
}

/// Parses and validates the object of a write request.
fn parse_object(request: ObjectRequest) -> Result<Value, Status> {
    let mut object: Value = serde_json::from_slice(&request.object_json).map_err(|e| {
        if limits::is_nesting_error(&e) {
            invalid(limits::too_deep("the object"))
        } else {
            invalid(format!("request body is not a JSON object: {e}"))
        }
    })?;
    let (_, key) = store::validate(&mut object).map_err(|e| status_of(ReplicaError::Store(e)))?;
    refuse_keys_config_map(&key)?;
    Ok(object)
}

/// The sealed data keys are written by the nodes only (first Secret, rotation): a client
/// that replaced or deleted them would make every Secret unreadable.
fn refuse_keys_config_map(key: &ObjectKey) -> Result<(), Status> {
    if encryption::is_keys_config_map(&key.kind, &key.namespace, &key.name) {
        return Err(Status::permission_denied(format!(
            "{key} holds the cluster's sealed data keys and is written by the nodes only \
             (flotilla cluster rotate-encryption-key)"
        )));
    }
    Ok(())
}

fn kind_info(kind: &str) -> Result<&'static KindInfo, Status> {
    kinds::lookup(kind).ok_or_else(|| {
        invalid(format!(
            "unknown kind {kind:?} (known: {})",
            kinds::KINDS
                .iter()
                .map(|k| k.plural)
                .collect::<Vec<_>>()
                .join(", ")
        ))
    })
}

/// The namespace a request addresses: namespaced kinds default to `default`, cluster-scoped
/// kinds have none.
fn namespace_for(info: &KindInfo, namespace: &str) -> String {
    match (info.namespaced, namespace.is_empty()) {
        (true, true) => "default".into(),
        (true, false) => namespace.into(),
        (false, _) => String::new(),
    }
}

/// A watch event's Secret that cannot be opened: sealed with a data key rotated away since
/// (history from before a rotation), so the client must list again.
fn status_of_watched(error: EncryptionError) -> Status {
    match error {
        EncryptionError::UnknownKey { .. } => Status::out_of_range(format!(
            "{error}; this history is from before a key rotation: list again and watch from there"
        )),
        other => status_of_encryption(other),
    }
}

fn object_reply(object: Option<Value>, outcome: &str) -> Result<Response<ObjectReply>, Status> {
    let object_json = match object {
        Some(object) => serde_json::to_vec(&object).map_err(|e| Status::internal(e.to_string()))?,
        None => Vec::new(),
    };
    Ok(Response::new(ObjectReply {
        object_json,
        outcome: outcome.into(),
    }))
}

fn parse_resource_version(text: &str) -> Result<Option<u64>, Status> {
    if text.is_empty() {
        return Ok(None);
    }
    text.parse().map(Some).map_err(|_| {
        invalid(format!(
            "resourceVersion {text:?} is not a resource version this cluster issued"
        ))
    })
}

impl ObjectsService {
    async fn update_part(
        &self,
        request: Request<ObjectRequest>,
        part: UpdatePart,
    ) -> Result<Response<ObjectReply>, Status> {
        self.writes.admit(&request)?;
        let caller = caller_of(&request)?;
        let object = parse_object(request.into_inner())?;
        if part == UpdatePart::Status
            && object.get("kind").and_then(Value::as_str) == Some("Secret")
        {
            // Refused here, not by the store: the command would carry the plaintext into the log.
            return Err(invalid("Secret has no status subresource"));
        }
        let (info, namespace, name) = target_of(&object);
        let object = self.seal(object).await?;
        self.write(
            &caller,
            Verb::Update,
            (info, &namespace, &name),
            Command::Update {
                object: object.into(),
                part,
            },
            true,
        )
        .await
    }

    /// Seals a Secret before it is proposed (other objects pass).
    async fn seal(&self, object: Value) -> Result<Value, Status> {
        self.keyring
            .seal_for_write(object)
            .await
            .map_err(status_of_encryption)
    }

    /// An object read from the store as a client sees it (a Secret opened).
    fn reveal(&self, object: Value) -> Result<Value, Status> {
        self.keyring.open(object).map_err(status_of_encryption)
    }

    /// Authorizes, writes and audits one write; with `sealed`, a Secret it wrote is settled
    /// (re-sealed if a concurrent rotation dropped its key) before the reply.
    async fn write(
        &self,
        caller: &Caller,
        verb: Verb,
        (info, namespace, name): (&KindInfo, &str, &str),
        command: Command,
        sealed: bool,
    ) -> Result<Response<ObjectReply>, Status> {
        let record = |result: String| AuditRecord {
            time: now_rfc3339(),
            user: caller.name(),
            verb: verb.to_string(),
            resource: info.plural.to_string(),
            namespace: namespace.to_string(),
            name: name.to_string(),
            result,
        };
        if let Err(denied) = authorize(caller, verb, info, namespace, name) {
            self.audit
                .record(record(format!("denied: {}", denied.message())))
                .await;
            return Err(denied);
        }
        let result = self.replica.write(command).await.map_err(status_of);
        let outcome = match &result {
            Ok(_) => "allowed".to_string(),
            Err(status) => format!("failed: {}", status.message()),
        };
        self.audit.record(record(outcome)).await;
        let applied = result?;
        let object = match applied.object.map(SharedObject::into_value) {
            Some(object) if sealed => Some(
                self.keyring
                    .settle(object)
                    .await
                    .map_err(status_of_encryption)?,
            ),
            other => other,
        };
        let object = object.map(|o| self.reveal(o)).transpose()?;
        object_reply(object, applied.outcome.as_str())
    }
}

#[tonic::async_trait]
impl Objects for ObjectsService {
    async fn create(
        &self,
        request: Request<ObjectRequest>,
    ) -> Result<Response<ObjectReply>, Status> {
        self.writes.admit(&request)?;
        let caller = caller_of(&request)?;
        let object = with_new_identity(parse_object(request.into_inner())?);
        let (info, namespace, name) = target_of(&object);
        let object = self.seal(object).await?;
        self.write(
            &caller,
            Verb::Create,
            (info, &namespace, &name),
            Command::Create {
                object: object.into(),
            },
            true,
        )
        .await
    }

    async fn apply(
        &self,
        request: Request<ObjectRequest>,
    ) -> Result<Response<ObjectReply>, Status> {
        self.writes.admit(&request)?;
        let caller = caller_of(&request)?;
        let object = with_new_identity(parse_object(request.into_inner())?);
        let (info, namespace, name) = target_of(&object);
        let object = self.seal(object).await?;
        self.write(
            &caller,
            Verb::Update,
            (info, &namespace, &name),
            Command::Apply {
                object: object.into(),
            },
            true,
        )
        .await
    }

    async fn get(&self, request: Request<GetRequest>) -> Result<Response<ObjectReply>, Status> {
        let caller = caller_of(&request)?;
        let request = request.into_inner();
        let info = kind_info(&request.kind)?;
        if request.name.is_empty() {
            return Err(invalid("get needs a name"));
        }
        let namespace = namespace_for(info, &request.namespace);
        authorize(&caller, Verb::Get, info, &namespace, &request.name)?;
        let key = ObjectKey::new(info.kind, &namespace, &request.name);
        let object = self
            .replica
            .get(&key, !request.local)
            .await
            .map_err(status_of)?;
        object_reply(Some(self.reveal(object)?), "")
    }

    async fn list(&self, request: Request<ListRequest>) -> Result<Response<ListReply>, Status> {
        let caller = caller_of(&request)?;
        let request = request.into_inner();
        let info = kind_info(&request.kind)?;
        let scope = if info.namespaced {
            request.namespace.as_str()
        } else {
            ""
        };
        authorize(&caller, Verb::List, info, scope, "")?;
        let labels = LabelSelector::parse(&request.label_selector).map_err(invalid)?;
        let fields = FieldSelector::parse(info.kind, &request.field_selector).map_err(invalid)?;
        let namespace = (info.namespaced && !request.namespace.is_empty())
            .then_some(request.namespace.as_str());
        let (items, resource_version) = self
            .replica
            .list(info.kind, namespace, &labels, &fields, !request.local)
            .await
            .map_err(status_of)?;
        let items_json = items
            .into_iter()
            .map(|item| {
                serde_json::to_vec(&self.reveal(item)?).map_err(|e| Status::internal(e.to_string()))
            })
            .collect::<Result<_, _>>()?;
        Ok(Response::new(ListReply {
            items_json,
            resource_version: resource_version.to_string(),
        }))
    }

    async fn update(
        &self,
        request: Request<ObjectRequest>,
    ) -> Result<Response<ObjectReply>, Status> {
        self.update_part(request, UpdatePart::Main).await
    }

    async fn update_status(
        &self,
        request: Request<ObjectRequest>,
    ) -> Result<Response<ObjectReply>, Status> {
        self.update_part(request, UpdatePart::Status).await
    }

    async fn delete(
        &self,
        request: Request<DeleteRequest>,
    ) -> Result<Response<ObjectReply>, Status> {
        self.writes.admit(&request)?;
        let caller = caller_of(&request)?;
        let request = request.into_inner();
        let info = kind_info(&request.kind)?;
        if request.name.is_empty() {
            return Err(invalid("delete needs a name"));
        }
        let namespace = namespace_for(info, &request.namespace);
        let key = ObjectKey::new(info.kind, &namespace, &request.name);
        refuse_keys_config_map(&key)?;
        let resource_version = parse_resource_version(&request.resource_version)?;
        self.write(
            &caller,
            Verb::Delete,
            (info, &namespace, &request.name),
            Command::Delete {
                key,
                resource_version,
            },
            false,
        )
        .await
    }

    type WatchStream = flotilla_raft::server::BoxedStream<WatchEvent>;

    async fn watch(
        &self,
        request: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let caller = caller_of(&request)?;
        let request = request.into_inner();
        let info = kind_info(&request.kind)?;
        let scope = if info.namespaced {
            request.namespace.as_str()
        } else {
            ""
        };
        authorize(&caller, Verb::Watch, info, scope, "")?;
        let filter = WatchFilter {
            kind: info.kind.to_string(),
            namespace: (info.namespaced && !request.namespace.is_empty())
                .then(|| request.namespace.clone()),
            labels: LabelSelector::parse(&request.label_selector).map_err(invalid)?,
            fields: FieldSelector::parse(info.kind, &request.field_selector).map_err(invalid)?,
        };
        let from = parse_resource_version(&request.resource_version)?;
        // Refuse an expired start right away rather than after the stream opened.
        if let Some(from) = from {
            let oldest = self
                .replica
                .reader()
                .compacted_resource_version()
                .map_err(|e| status_of(e.into()))?;
            if from < oldest {
                return Err(status_of(ReplicaError::Store(StoreError::Expired {
                    requested: from,
                    oldest,
                })));
            }
        }
        let keyring = self.keyring.clone();
        let events =
            ReceiverStream::new(self.replica.watch(filter, from)).map(move |event| match event {
                Ok(record) => {
                    // Encoded from the shared object itself unless it is a sealed Secret: a
                    // copy of each watched object was a large part of a busy watch's cost.
                    let encoded = if Keyring::needs_opening(&record.object) {
                        let opened = keyring
                            .open(record.object.into_value())
                            .map_err(status_of_watched)?;
                        serde_json::to_vec(&opened)
                    } else {
                        serde_json::to_vec(&*record.object)
                    };
                    Ok(WatchEvent {
                        r#type: record.event_type.as_str().to_string(),
                        object_json: encoded.map_err(|e| Status::internal(e.to_string()))?,
                        resource_version: record.resource_version.to_string(),
                    })
                }
                Err(error) => Err(status_of(ReplicaError::Store(error))),
            });
        Ok(Response::new(Box::pin(events)))
    }
}
