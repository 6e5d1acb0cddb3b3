//! The shell of encryption at rest: a node's root key, the data keys it unwrapped (read from
//! its own store, cached), sealing Secrets before they are proposed, opening them when they
//! are handed out, and rotation.

use std::sync::{Arc, Mutex};

use flotilla_raft::selector::{FieldSelector, LabelSelector};
use flotilla_raft::{
    store, Command, ObjectKey, Replica, ReplicaError, SharedObject, StoreError, UpdatePart,
};
use serde_json::Value;

use super::secrets::{needs_reencryption, reseal_secret, seal_secret_reusing, sealed_key_id};
use super::{
    open_secret, DataKey, DataKeys, EncryptionError, KeySet, RootKey, KEYS_CONFIG_MAP,
    KEYS_NAMESPACE,
};

/// Writes tried before a contended read-modify-write gives up.
const MAX_ATTEMPTS: u32 = 8;
/// Passes over every Secret during a rotation (Secrets written meanwhile with an old key).
const MAX_RESEAL_PASSES: u32 = 4;

/// What a rotation did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rotation {
    /// The data key every Secret is now sealed with.
    pub key_id: String,
    /// Secrets re-sealed with it.
    pub reencrypted: u64,
}

/// A node's handle on encryption at rest. Cheap to clone.
#[derive(Clone)]
pub struct Keyring {
    inner: Arc<Inner>,
}

struct Inner {
    root: RootKey,
    replica: Replica,
    /// Data keys unwrapped so far. Keys dropped by a rotation stay here until restart, which
    /// lets Secrets written concurrently with a rotation be re-sealed.
    keys: Mutex<DataKeys>,
    /// One rotation at a time on this node.
    rotation: tokio::sync::Mutex<()>,
}

fn keys_key() -> ObjectKey {
    ObjectKey::new("ConfigMap", KEYS_NAMESPACE, KEYS_CONFIG_MAP)
}

fn secret_key(object: &Value) -> ObjectKey {
    let meta = |field: &str| {
        object
            .get("metadata")
            .and_then(|m| m.get(field))
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string()
    };
    ObjectKey::new("Secret", &meta("namespace"), &meta("name"))
}

fn is_secret(object: &Value) -> bool {
    object.get("kind").and_then(Value::as_str) == Some("Secret")
}

impl Keyring {
    pub fn new(root: RootKey, replica: Replica) -> Keyring {
        Keyring {
            inner: Arc::new(Inner {
                root,
                replica,
                keys: Mutex::default(),
                rotation: tokio::sync::Mutex::new(()),
            }),
        }
    }

    pub fn root_key(&self) -> &RootKey {
        &self.inner.root
    }

    fn keys(&self) -> std::sync::MutexGuard<'_, DataKeys> {
        self.inner
            .keys
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn cached(&self, id: &str) -> Option<DataKey> {
        self.keys().get(id).cloned()
    }

    /// Unwraps (and caches) every key of `set` not cached yet.
    fn learn(&self, set: &KeySet) -> Result<(), EncryptionError> {
        let missing: Vec<(String, Vec<u8>)> = {
            let keys = self.keys();
            set.wrapped
                .iter()
                .filter(|(id, _)| !keys.contains(id))
                .map(|(id, wrapped)| (id.clone(), wrapped.clone()))
                .collect()
        };
        for (id, wrapped) in missing {
            let key = DataKey::unwrap_with(&self.inner.root, &id, &wrapped)?;
            self.keys().insert(key);
        }
        Ok(())
    }

    /// The current key of `set`, unwrapped.
    fn current_of(&self, set: &KeySet) -> Result<DataKey, EncryptionError> {
        self.learn(set)?;
        self.cached(&set.current)
            .ok_or_else(|| EncryptionError::UnknownKey {
                id: set.current.clone(),
            })
    }

    /// The keys ConfigMap as this node's store has it.
    fn local_key_set(&self) -> Result<Option<KeySet>, EncryptionError> {
        let stored = self
            .inner
            .replica
            .reader()
            .get(&keys_key())
            .map_err(ReplicaError::Store)?;
        stored.as_ref().map(KeySet::from_config_map).transpose()
    }

    /// The keys ConfigMap confirmed with the leader, or `None` when there is none.
    async fn confirmed_config_map(&self) -> Result<Option<Value>, EncryptionError> {
        match self.inner.replica.get(&keys_key(), true).await {
            Ok(config_map) => Ok(Some(config_map)),
            Err(ReplicaError::Store(StoreError::NotFound { .. })) => Ok(None),
            Err(error) => Err(error.into()),
        }
    }

    async fn create_key_set(&self, set: &KeySet) -> Result<(), ReplicaError> {
        let mut config_map = set.to_config_map();
        if let Some(metadata) = config_map
            .get_mut("metadata")
            .and_then(Value::as_object_mut)
        {
            metadata.insert(
                "uid".into(),
                Value::String(uuid::Uuid::new_v4().to_string()),
            );
            metadata.insert(
                "creationTimestamp".into(),
                Value::String(crate::api::now_rfc3339()),
            );
        }
        store::validate(&mut config_map)?;
        self.inner
            .replica
            .write(Command::Create {
                object: config_map.into(),
            })
            .await
            .map(drop)
    }

    /// The data key new Secrets are sealed with: from this node's store, else confirmed with
    /// the leader, else created (the first Secret of the cluster). Creation is race-free: one
    /// create wins, the others read the winner's key.
    pub async fn current_key(&self) -> Result<DataKey, EncryptionError> {
        if let Some(set) = self.local_key_set()? {
            return self.current_of(&set);
        }
        for _ in 0..MAX_ATTEMPTS {
            if let Some(config_map) = self.confirmed_config_map().await? {
                return self.current_of(&KeySet::from_config_map(&config_map)?);
            }
            let key = DataKey::generate();
            match self
                .create_key_set(&KeySet::new(&key, &self.inner.root))
                .await
            {
                Ok(()) => {
                    tracing::info!(key_id = key.id(), "created the cluster's first data key");
                    self.keys().insert(key.clone());
                    return Ok(key);
                }
                Err(ReplicaError::Store(StoreError::AlreadyExists { .. })) => continue,
                Err(error) => return Err(error.into()),
            }
        }
        Err(EncryptionError::Contended {
            what: "create the first data key".into(),
            attempts: MAX_ATTEMPTS,
        })
    }

    /// Opens a Secret read from the store (see `secrets::open_secret`); other objects are
    /// returned as they are. A key not cached yet is read from this node's store, which holds
    /// every key a Secret it holds was sealed with (the key was written first).
    /// Whether `open` would change `object` (a sealed Secret): anything else can be sent as
    /// it is, without a copy.
    pub fn needs_opening(object: &Value) -> bool {
        is_secret(object) && sealed_key_id(object).is_some()
    }

    pub fn open(&self, object: Value) -> Result<Value, EncryptionError> {
        let Some(id) = sealed_key_id(&object).filter(|_| is_secret(&object)) else {
            return Ok(object);
        };
        if self.cached(id).is_none() {
            if let Some(set) = self.local_key_set()? {
                self.learn(&set)?;
            }
        }
        let keys = self.keys();
        open_secret(object, &keys)
    }

    /// Seals a Secret about to be proposed with the current data key; other objects are
    /// returned as they are. When this node's copy of the Secret holds the same data, its
    /// ciphertext is kept (an unchanged apply stays unchanged).
    pub async fn seal_for_write(&self, object: Value) -> Result<Value, EncryptionError> {
        if !is_secret(&object) {
            return Ok(object);
        }
        let key = self.current_key().await?;
        let existing = self
            .inner
            .replica
            .reader()
            .get(&secret_key(&object))
            .ok()
            .flatten();
        let keys = self.keys();
        seal_secret_reusing(object, &key, existing.as_ref(), &keys)
    }

    /// After a Secret was written: when a concurrent rotation dropped the key it was sealed
    /// with (the write committed after the drop), seals it again with the current key.
    /// Returns the Secret as stored.
    pub async fn settle(&self, written: Value) -> Result<Value, EncryptionError> {
        let mut written = written;
        for _ in 0..MAX_ATTEMPTS {
            let Some(id) = sealed_key_id(&written).filter(|_| is_secret(&written)) else {
                return Ok(written);
            };
            let Some(config_map) = self.confirmed_config_map().await? else {
                return Ok(written);
            };
            let set = KeySet::from_config_map(&config_map)?;
            if set.wrapped.contains_key(id) {
                return Ok(written);
            }
            let current = self.current_of(&set)?;
            match self.reseal_one(written.clone(), &current).await? {
                Some(stored) => written = stored,
                None => return Ok(written),
            }
        }
        Err(EncryptionError::Contended {
            what: format!("re-seal Secret {}", secret_key(&written)),
            attempts: MAX_ATTEMPTS,
        })
    }

    /// Makes sure the key of `secret` is cached, reading the confirmed keys if needed.
    async fn ensure_key_of(&self, secret: &Value) -> Result<(), EncryptionError> {
        let Some(id) = sealed_key_id(secret) else {
            return Ok(());
        };
        if self.cached(id).is_none() {
            if let Some(config_map) = self.confirmed_config_map().await? {
                self.learn(&KeySet::from_config_map(&config_map)?)?;
            }
        }
        Ok(())
    }

    /// Seals `secret` (as stored, with its resourceVersion) again with `key`, retrying on a
    /// conflicting write. Returns the Secret as stored, `None` when it is gone.
    async fn reseal_one(
        &self,
        secret: Value,
        key: &DataKey,
    ) -> Result<Option<Value>, EncryptionError> {
        let object_key = secret_key(&secret);
        let mut secret = secret;
        for _ in 0..MAX_ATTEMPTS {
            if !needs_reencryption(&secret, key.id()) {
                return Ok(Some(secret));
            }
            self.ensure_key_of(&secret).await?;
            let resealed = {
                let keys = self.keys();
                reseal_secret(secret.clone(), &keys, key)
            }
            .map_err(|error| match error {
                EncryptionError::UnknownKey { id } => EncryptionError::KeysConfigMap(format!(
                    "Secret {object_key} is sealed with data key {id:?}, which no node has any more"
                )),
                other => other,
            })?;
            let write = self
                .inner
                .replica
                .write(Command::Update {
                    object: resealed.into(),
                    part: UpdatePart::Main,
                })
                .await;
            match write {
                Ok(applied) => return Ok(applied.object.map(SharedObject::into_value)),
                Err(ReplicaError::Store(StoreError::Conflict { .. })) => {
                    match self.inner.replica.get(&object_key, true).await {
                        Ok(current) => secret = current,
                        Err(ReplicaError::Store(StoreError::NotFound { .. })) => return Ok(None),
                        Err(error) => return Err(error.into()),
                    }
                }
                Err(ReplicaError::Store(StoreError::NotFound { .. })) => return Ok(None),
                Err(error) => return Err(error.into()),
            }
        }
        Err(EncryptionError::Contended {
            what: format!("re-seal Secret {object_key}"),
            attempts: MAX_ATTEMPTS,
        })
    }

    /// Re-seals every Secret of the cluster not sealed with `key`; returns how many.
    async fn reseal_all(&self, key: &DataKey) -> Result<u64, EncryptionError> {
        let mut count = 0;
        for _ in 0..MAX_RESEAL_PASSES {
            let (secrets, _) = self
                .inner
                .replica
                .list(
                    "Secret",
                    None,
                    &LabelSelector::default(),
                    &FieldSelector::default(),
                    true,
                )
                .await?;
            let stale: Vec<Value> = secrets
                .into_iter()
                .filter(|secret| needs_reencryption(secret, key.id()))
                .collect();
            if stale.is_empty() {
                break;
            }
            for secret in stale {
                if self.reseal_one(secret, key).await?.is_some() {
                    count += 1;
                }
            }
        }
        Ok(count)
    }

    /// Reads the keys ConfigMap (confirmed), caches its keys, and writes `change` of it with
    /// the read resourceVersion as precondition, retrying on conflicts. Returns the new set.
    async fn change_key_set(
        &self,
        change: impl Fn(Option<KeySet>) -> KeySet,
    ) -> Result<KeySet, EncryptionError> {
        for _ in 0..MAX_ATTEMPTS {
            let Some(mut config_map) = self.confirmed_config_map().await? else {
                let next = change(None);
                match self.create_key_set(&next).await {
                    Ok(()) => return Ok(next),
                    Err(ReplicaError::Store(StoreError::AlreadyExists { .. })) => continue,
                    Err(error) => return Err(error.into()),
                }
            };
            let set = KeySet::from_config_map(&config_map)?;
            self.learn(&set)?;
            let next = change(Some(set.clone()));
            if next == set {
                return Ok(next);
            }
            config_map["data"] = next.to_data();
            let write = self
                .inner
                .replica
                .write(Command::Update {
                    object: config_map.into(),
                    part: UpdatePart::Main,
                })
                .await;
            match write {
                Ok(_) => return Ok(next),
                Err(ReplicaError::Store(StoreError::Conflict { .. })) => continue,
                Err(error) => return Err(error.into()),
            }
        }
        Err(EncryptionError::Contended {
            what: format!("update {KEYS_NAMESPACE}/{KEYS_CONFIG_MAP}"),
            attempts: MAX_ATTEMPTS,
        })
    }

    /// Rotates the data key: a new key becomes current, every Secret is re-sealed with it,
    /// then the old keys are dropped from the store (this node keeps them in memory and
    /// re-seals any Secret written with one meanwhile).
    pub async fn rotate(&self) -> Result<Rotation, EncryptionError> {
        let _one_at_a_time = self.inner.rotation.lock().await;
        let key = DataKey::generate();
        self.keys().insert(key.clone());
        let root = self.inner.root.clone();
        self.change_key_set(|set| match set {
            Some(set) => set.with_current(&key, &root),
            None => KeySet::new(&key, &root),
        })
        .await?;
        tracing::info!(
            key_id = key.id(),
            "new data key is current; re-sealing Secrets"
        );
        let mut reencrypted = self.reseal_all(&key).await?;
        let kept = self
            .change_key_set(|set| match set {
                Some(set) => set.only_current(),
                None => KeySet::new(&key, &root),
            })
            .await?;
        let current = self.current_of(&kept)?;
        reencrypted += self.reseal_all(&current).await?;
        tracing::info!(
            key_id = current.id(),
            reencrypted,
            "data key rotated; old keys dropped"
        );
        Ok(Rotation {
            key_id: current.id().to_string(),
            reencrypted,
        })
    }
}
