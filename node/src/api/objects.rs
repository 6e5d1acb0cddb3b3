//! `flotilla.v1.Objects`: create, apply, get, list, update, update-status, delete, watch.

use flotilla_proto::objects_server::Objects;
use flotilla_proto::{
    DeleteRequest, GetRequest, ListReply, ListRequest, ObjectReply, ObjectRequest, WatchEvent,
    WatchRequest,
};
use flotilla_raft::kinds::{self, KindInfo};
use flotilla_raft::object::metadata_mut;
use flotilla_raft::selector::{FieldSelector, LabelSelector};
use flotilla_raft::watch::WatchFilter;
use flotilla_raft::{store, Command, ObjectKey, Replica, ReplicaError, StoreError, UpdatePart};
use serde_json::Value;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status};

use super::limits::{self, SharedWriteRateLimiter, WriteRateLimit};
use super::{now_rfc3339, status_of};

/// Serves the object API from this node's replica.
#[derive(Clone)]
pub struct ObjectsService {
    replica: Replica,
    writes: SharedWriteRateLimiter,
}

impl ObjectsService {
    /// Writes are limited per client by `write_rate_limit`.
    pub fn new(replica: Replica, write_rate_limit: WriteRateLimit) -> ObjectsService {
        ObjectsService {
            replica,
            writes: SharedWriteRateLimiter::new(write_rate_limit),
        }
    }
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
    store::validate(&mut object).map_err(|e| status_of(ReplicaError::Store(e)))?;
    Ok(object)
}

/// Sets the server-owned fields of a new object; on updates the store keeps the stored ones.
fn with_new_identity(mut object: Value) -> Value {
    let metadata = metadata_mut(&mut object);
    metadata.insert(
        "uid".into(),
        Value::String(uuid::Uuid::new_v4().to_string()),
    );
    metadata.insert("creationTimestamp".into(), Value::String(now_rfc3339()));
    metadata.remove("resourceVersion");
    metadata.remove("generation");
    object
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
        let object = parse_object(request.into_inner())?;
        self.write(Command::Update { object, part }).await
    }

    async fn write(&self, command: Command) -> Result<Response<ObjectReply>, Status> {
        let applied = self.replica.write(command).await.map_err(status_of)?;
        object_reply(applied.object, applied.outcome.as_str())
    }
}

#[tonic::async_trait]
impl Objects for ObjectsService {
    async fn create(
        &self,
        request: Request<ObjectRequest>,
    ) -> Result<Response<ObjectReply>, Status> {
        self.writes.admit(&request)?;
        let object = with_new_identity(parse_object(request.into_inner())?);
        self.write(Command::Create { object }).await
    }

    async fn apply(
        &self,
        request: Request<ObjectRequest>,
    ) -> Result<Response<ObjectReply>, Status> {
        self.writes.admit(&request)?;
        let object = with_new_identity(parse_object(request.into_inner())?);
        self.write(Command::Apply { object }).await
    }

    async fn get(&self, request: Request<GetRequest>) -> Result<Response<ObjectReply>, Status> {
        let request = request.into_inner();
        let info = kind_info(&request.kind)?;
        if request.name.is_empty() {
            return Err(invalid("get needs a name"));
        }
        let key = ObjectKey::new(
            info.kind,
            &namespace_for(info, &request.namespace),
            &request.name,
        );
        let object = self
            .replica
            .get(&key, !request.local)
            .await
            .map_err(status_of)?;
        object_reply(Some(object), "")
    }

    async fn list(&self, request: Request<ListRequest>) -> Result<Response<ListReply>, Status> {
        let request = request.into_inner();
        let info = kind_info(&request.kind)?;
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
            .iter()
            .map(|item| serde_json::to_vec(item).map_err(|e| Status::internal(e.to_string())))
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
        let request = request.into_inner();
        let info = kind_info(&request.kind)?;
        if request.name.is_empty() {
            return Err(invalid("delete needs a name"));
        }
        let key = ObjectKey::new(
            info.kind,
            &namespace_for(info, &request.namespace),
            &request.name,
        );
        let resource_version = parse_resource_version(&request.resource_version)?;
        self.write(Command::Delete {
            key,
            resource_version,
        })
        .await
    }

    type WatchStream = flotilla_raft::server::BoxedStream<WatchEvent>;

    async fn watch(
        &self,
        request: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let request = request.into_inner();
        let info = kind_info(&request.kind)?;
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
        let events =
            ReceiverStream::new(self.replica.watch(filter, from)).map(|event| match event {
                Ok(record) => Ok(WatchEvent {
                    r#type: record.event_type.as_str().to_string(),
                    object_json: serde_json::to_vec(&record.object)
                        .map_err(|e| Status::internal(e.to_string()))?,
                    resource_version: record.resource_version.to_string(),
                }),
                Err(error) => Err(status_of(ReplicaError::Store(error))),
            });
        Ok(Response::new(Box::pin(events)))
    }
}
