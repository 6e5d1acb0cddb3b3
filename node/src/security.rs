//! The cluster's security: its CA and join tokens (`authority`), users and roles (`users`,
//! `rbac`), who is calling (`authn`), the audit log, the node's own certificate files and their
//! renewal (`node_files`, `certificates`). The CLI's credentials file is `flotilla_pki`'s.
//!
//! The CA record and the user records are objects in the replicated store (`kube-system`
//! ConfigMaps named `flotilla-*`, which no API client may write); the CA's key and the join
//! secret in it are sealed with the root key (`crate::encryption`), which is never in RocksDB.

pub mod audit;
pub mod authn;
pub mod authority;
pub mod certificates;
pub mod node_files;
pub mod rbac;
pub mod users;

/// The namespace of the records this module keeps in the store.
pub const RECORDS_NAMESPACE: &str = "kube-system";
/// The name prefix of objects reserved to Flotilla in [`RECORDS_NAMESPACE`].
pub const RESERVED_PREFIX: &str = "flotilla-";

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use flotilla_pki::{Fingerprint, TlsState};
use flotilla_raft::{Command, ObjectKey, Replica, UpdatePart};
use serde_json::Value;

use crate::encryption::RootKey;
use authority::{AuthorityRecord, RECORD_NAME};

/// What a node's security needs at run time; shared by the API services and the certificate
/// manager.
pub struct NodeSecurity {
    pub node_name: String,
    pub data_dir: PathBuf,
    /// The root key (which seals the CA record) and the Secrets' data keys.
    pub keyring: crate::encryption::Keyring,
    pub tls: Arc<TlsState>,
    pub audit: audit::AuditLog,
}

impl std::fmt::Debug for NodeSecurity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeSecurity")
            .field("node_name", &self.node_name)
            .finish_non_exhaustive()
    }
}

impl NodeSecurity {
    /// The fingerprint of the CA that issued this node's certificate (the second of its chain).
    pub fn certificate_issuer(&self) -> Option<Fingerprint> {
        self.tls
            .own_chain()
            .and_then(|chain| chain.get(1).map(|der| Fingerprint::of(der)))
    }
}

fn record_key() -> ObjectKey {
    ObjectKey::new("ConfigMap", RECORDS_NAMESPACE, RECORD_NAME)
}

/// The CA record in this node's store, with its resourceVersion; `None` before it replicated.
pub fn read_authority_record(
    replica: &Replica,
    root_key: &RootKey,
) -> anyhow::Result<Option<(AuthorityRecord, Value)>> {
    let Some(object) = replica
        .reader()
        .get(&record_key())
        .context("read the CA record")?
    else {
        return Ok(None);
    };
    let record = AuthorityRecord::from_object(&object, root_key)?;
    Ok(Some((record, object)))
}

/// Writes `record`: a create when `previous` is `None`, else an update conditional on
/// `previous`'s resourceVersion.
pub async fn write_authority_record(
    replica: &Replica,
    root_key: &RootKey,
    record: &AuthorityRecord,
    previous: Option<&Value>,
) -> anyhow::Result<()> {
    let mut object = record.to_object(root_key)?;
    let command = match previous {
        None => Command::Create {
            object: crate::api::with_new_identity(object).into(),
        },
        Some(previous) => {
            if let (Some(metadata), Some(version)) = (
                object.get_mut("metadata").and_then(Value::as_object_mut),
                previous.pointer("/metadata/resourceVersion").cloned(),
            ) {
                metadata.insert("resourceVersion".into(), version);
            }
            Command::Update {
                object: object.into(),
                part: UpdatePart::Main,
            }
        }
    };
    replica
        .write(command)
        .await
        .context("write the CA record")?;
    Ok(())
}
