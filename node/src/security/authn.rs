//! Who is calling: the identity the TLS layer verified (`flotilla_pki::PeerInfo` in the
//! request's extensions), checked against the store — a node, or a user whose record still
//! names this certificate (revoked or re-issued users are refused).

use flotilla_pki::{Identity, PeerInfo};
use flotilla_raft::{ObjectKey, Replica};
use tonic::{Request, Status};

use super::rbac::Caller;
use super::users::{record_name, UserRecord};
use super::RECORDS_NAMESPACE;

/// The caller behind `extensions`, or Unauthenticated saying why not.
pub fn authenticate(extensions: &tonic::Extensions, replica: &Replica) -> Result<Caller, Status> {
    let identity = extensions
        .get::<PeerInfo>()
        .and_then(|info| info.identity.clone())
        .ok_or_else(|| {
            Status::unauthenticated(
                "no client certificate: use the credentials file `serve --init` or `auth create-user` wrote (--config or FLOTILLA_CONFIG)",
            )
        })?;
    match identity {
        Identity::Node { name, .. } => Ok(Caller::Node(name)),
        Identity::User { name, certificate } => {
            let key = ObjectKey::new("ConfigMap", RECORDS_NAMESPACE, &record_name(&name));
            let record = replica
                .reader()
                .get(&key)
                .map_err(|error| Status::unavailable(format!("read user {name:?}: {error}")))?
                .as_ref()
                .and_then(UserRecord::from_object)
                .ok_or_else(|| {
                    Status::unauthenticated(format!(
                        "user {name:?} is not known to this cluster (revoked?)"
                    ))
                })?;
            if record.certificate != certificate.hex() {
                return Err(Status::unauthenticated(format!(
                    "this certificate of user {name:?} was revoked or replaced by a newer one"
                )));
            }
            Ok(Caller::User(record))
        }
    }
}

/// The interceptor of the API services: authenticates every call and leaves the [`Caller`] in
/// its extensions for the handler's authorization.
pub fn api_interceptor(
    replica: Replica,
) -> impl FnMut(Request<()>) -> Result<Request<()>, Status> + Clone {
    move |mut request: Request<()>| {
        let caller = authenticate(request.extensions(), &replica)?;
        request.extensions_mut().insert(caller);
        Ok(request)
    }
}

/// The interceptor of the Raft service: cluster nodes only.
pub fn nodes_only(request: Request<()>) -> Result<Request<()>, Status> {
    match request
        .extensions()
        .get::<PeerInfo>()
        .and_then(|info| info.identity.as_ref())
    {
        Some(Identity::Node { .. }) => Ok(request),
        Some(identity) => Err(Status::permission_denied(format!(
            "{identity} may not call the Raft service: cluster nodes only"
        ))),
        None => Err(Status::unauthenticated(
            "the Raft service needs a node certificate",
        )),
    }
}

/// The caller an interceptor left in `request`.
pub fn caller_of<T>(request: &Request<T>) -> Result<Caller, Status> {
    request
        .extensions()
        .get::<Caller>()
        .cloned()
        .ok_or_else(|| Status::unauthenticated("the call was not authenticated"))
}
