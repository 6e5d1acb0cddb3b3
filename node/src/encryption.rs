//! Encryption at rest: envelope encryption of Secrets (and other sealed records).
//!
//! Each node keeps the cluster's root key (the key-encryption key) in `<data_dir>/keys/root.key`,
//! outside RocksDB; a joining node receives it in the Join reply. Data keys (AES-256) live in
//! the replicated store, each sealed with the root key, in the ConfigMap
//! `kube-system/flotilla-encryption-keys` (`current`: the key id new Secrets are sealed with;
//! per key id: the base64 of the sealed key). A Secret's `data` (with `stringData` folded in) is
//! sealed with the current data key into `sealedData` before it is proposed, so no Raft log
//! entry, snapshot or state machine record holds its plaintext; every path that hands a Secret
//! out opens it again. Rotation adds a data key, makes it current, re-seals every Secret and
//! drops the old keys.
//!
//! Pure: keys, sealing, the keys ConfigMap (`encryption.rs`) and the Secret transformations
//! (`secrets.rs`). Shell: the root key file and [`Keyring`] (`keyring.rs`), which reads and
//! caches the data keys from the local store and writes through the replica.

mod keyring;
mod secrets;

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use aes_gcm::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use aes_gcm::{Aes256Gcm, Key, Nonce};
use base64::Engine;
use serde_json::{json, Map, Value};

pub use keyring::{Keyring, Rotation};
pub use secrets::{
    fold_string_data, needs_reencryption, open_secret, reseal_secret, seal_secret,
    seal_secret_reusing, sealed_key_id, SEALED_DATA_FIELD,
};

/// Bytes of an AES-256 key.
pub const KEY_BYTES: usize = 32;
/// Bytes of the random AES-GCM nonce at the front of every sealed message.
const NONCE_BYTES: usize = 12;
/// Bytes of the AES-GCM tag at the end of every sealed message.
const TAG_BYTES: usize = 16;

/// The namespace and name of the ConfigMap holding the sealed data keys.
pub const KEYS_NAMESPACE: &str = "kube-system";
pub const KEYS_CONFIG_MAP: &str = "flotilla-encryption-keys";
/// The key of the keys ConfigMap's `data` naming the current data key.
const CURRENT_FIELD: &str = "current";

#[derive(Debug, thiserror::Error)]
pub enum EncryptionError {
    #[error("a key is {expected} bytes, not {actual}")]
    KeyLength { expected: usize, actual: usize },
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the root key file {path} is not base64 of a 32-byte key")]
    RootKeyFile { path: PathBuf },
    /// Authentication failed: the wrong key, the wrong context, or altered ciphertext.
    #[error("cannot open sealed data: wrong key or altered ciphertext")]
    Open,
    #[error("malformed sealed data: {0}")]
    Malformed(&'static str),
    #[error("data key {id:?} is not in {KEYS_NAMESPACE}/{KEYS_CONFIG_MAP} (rotated away?)")]
    UnknownKey { id: String },
    #[error("the encryption keys ConfigMap {KEYS_NAMESPACE}/{KEYS_CONFIG_MAP} is malformed: {0}")]
    KeysConfigMap(String),
    #[error("data key {id:?} cannot be opened with this node's root key (another cluster's key?)")]
    WrongRootKey { id: String },
    #[error(transparent)]
    Store(#[from] flotilla_raft::ReplicaError),
    #[error("{what}: gave up after {attempts} conflicting writes")]
    Contended { what: String, attempts: u32 },
}

/// An AES-256-GCM key: seals with a random 96-bit nonce in front, opens and authenticates.
#[derive(Clone)]
struct AeadKey([u8; KEY_BYTES]);

impl AeadKey {
    fn generate() -> AeadKey {
        let key = Aes256Gcm::generate_key(OsRng);
        let mut bytes = [0u8; KEY_BYTES];
        bytes.copy_from_slice(key.as_slice());
        AeadKey(bytes)
    }

    fn from_bytes(bytes: &[u8]) -> Result<AeadKey, EncryptionError> {
        let bytes: [u8; KEY_BYTES] = bytes.try_into().map_err(|_| EncryptionError::KeyLength {
            expected: KEY_BYTES,
            actual: bytes.len(),
        })?;
        Ok(AeadKey(bytes))
    }

    fn cipher(&self) -> Aes256Gcm {
        Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(&self.0))
    }

    fn seal(&self, plaintext: &[u8], context: &[u8]) -> Vec<u8> {
        let nonce = Aes256Gcm::generate_nonce(&mut OsRng);
        let ciphertext = self
            .cipher()
            .encrypt(
                &nonce,
                Payload {
                    msg: plaintext,
                    aad: context,
                },
            )
            // AES-GCM refuses only messages of more than 64 GiB.
            .expect("AES-GCM seals any message this process can hold");
        let mut sealed = Vec::with_capacity(NONCE_BYTES + ciphertext.len());
        sealed.extend_from_slice(nonce.as_slice());
        sealed.extend_from_slice(&ciphertext);
        sealed
    }

    fn open(&self, sealed: &[u8], context: &[u8]) -> Result<Vec<u8>, EncryptionError> {
        if sealed.len() < NONCE_BYTES + TAG_BYTES {
            return Err(EncryptionError::Malformed("shorter than a nonce and a tag"));
        }
        let (nonce, ciphertext) = sealed.split_at(NONCE_BYTES);
        self.cipher()
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: ciphertext,
                    aad: context,
                },
            )
            .map_err(|_| EncryptionError::Open)
    }
}

/// The cluster's root key (key-encryption key): it seals the data keys and other records
/// (the cluster CA). Every node holds the same one in `<data_dir>/keys/root.key`.
#[derive(Clone)]
pub struct RootKey(AeadKey);

impl std::fmt::Debug for RootKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RootKey(<redacted>)")
    }
}

fn root_key_path(data_dir: &Path) -> PathBuf {
    data_dir.join("keys").join("root.key")
}

fn io_error(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> EncryptionError {
    let path = path.to_path_buf();
    move |source| EncryptionError::Io {
        action,
        path,
        source,
    }
}

impl RootKey {
    /// A new random key.
    pub fn generate() -> RootKey {
        RootKey(AeadKey::generate())
    }

    /// The key of exactly 32 bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<RootKey, EncryptionError> {
        AeadKey::from_bytes(bytes).map(RootKey)
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0 .0
    }

    /// The key in `<data_dir>/keys/root.key`, or `None` when there is no such file.
    pub fn load(data_dir: &Path) -> Result<Option<RootKey>, EncryptionError> {
        let path = root_key_path(data_dir);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(error) => return Err(io_error("read", &path)(error)),
        };
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(text.trim())
            .map_err(|_| EncryptionError::RootKeyFile { path: path.clone() })?;
        RootKey::from_bytes(&bytes)
            .map(Some)
            .map_err(|_| EncryptionError::RootKeyFile { path })
    }

    /// Writes the key to `<data_dir>/keys/root.key` (mode 0600, directory 0700): a temporary
    /// file, synced, renamed into place, the directory synced.
    pub fn store(&self, data_dir: &Path) -> Result<(), EncryptionError> {
        let path = root_key_path(data_dir);
        let dir = path.parent().unwrap_or(data_dir).to_path_buf();
        std::fs::create_dir_all(&dir).map_err(io_error("create", &dir))?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
            .map_err(io_error("restrict", &dir))?;
        let temporary = path.with_extension("key.tmp");
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&temporary)
            .map_err(io_error("create", &temporary))?;
        let encoded = base64::engine::general_purpose::STANDARD.encode(self.as_bytes());
        file.write_all(format!("{encoded}\n").as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(io_error("write", &temporary))?;
        drop(file);
        std::fs::rename(&temporary, &path).map_err(io_error("install", &path))?;
        std::fs::File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(io_error("sync", &dir))
    }

    /// AES-256-GCM with a random 96-bit nonce (prefixed); `context` is authenticated, not
    /// stored: opening needs the same context.
    pub fn seal(&self, plaintext: &[u8], context: &[u8]) -> Vec<u8> {
        self.0.seal(plaintext, context)
    }

    pub fn open(&self, sealed: &[u8], context: &[u8]) -> Result<Vec<u8>, EncryptionError> {
        self.0.open(sealed, context)
    }
}

/// A data key: what Secrets are sealed with. Its id names it in `sealedData.keyId`.
#[derive(Clone)]
pub struct DataKey {
    id: String,
    key: AeadKey,
}

impl std::fmt::Debug for DataKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DataKey({:?}, <redacted>)", self.id)
    }
}

/// The context a data key is sealed under: a sealed key cannot be passed off as another id.
fn wrap_context(id: &str) -> Vec<u8> {
    format!("flotilla data key {id}").into_bytes()
}

impl DataKey {
    /// A new random data key with a new id.
    pub fn generate() -> DataKey {
        let id = format!("dk-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        DataKey {
            id,
            key: AeadKey::generate(),
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub(crate) fn seal(&self, plaintext: &[u8], context: &[u8]) -> Vec<u8> {
        self.key.seal(plaintext, context)
    }

    pub(crate) fn open(&self, sealed: &[u8], context: &[u8]) -> Result<Vec<u8>, EncryptionError> {
        self.key.open(sealed, context)
    }

    /// The key sealed with the root key, as kept in the keys ConfigMap.
    pub fn wrap(&self, root: &RootKey) -> Vec<u8> {
        root.seal(&self.key.0, &wrap_context(&self.id))
    }

    pub fn unwrap_with(
        root: &RootKey,
        id: &str,
        wrapped: &[u8],
    ) -> Result<DataKey, EncryptionError> {
        let bytes = root
            .open(wrapped, &wrap_context(id))
            .map_err(|_| EncryptionError::WrongRootKey { id: id.to_string() })?;
        Ok(DataKey {
            id: id.to_string(),
            key: AeadKey::from_bytes(&bytes)?,
        })
    }
}

/// Unwrapped data keys by id.
#[derive(Debug, Clone, Default)]
pub struct DataKeys(BTreeMap<String, DataKey>);

impl DataKeys {
    pub fn get(&self, id: &str) -> Option<&DataKey> {
        self.0.get(id)
    }

    pub fn insert(&mut self, key: DataKey) {
        self.0.insert(key.id.clone(), key);
    }

    pub fn contains(&self, id: &str) -> bool {
        self.0.contains_key(id)
    }
}

impl FromIterator<DataKey> for DataKeys {
    fn from_iter<T: IntoIterator<Item = DataKey>>(iter: T) -> Self {
        DataKeys(iter.into_iter().map(|k| (k.id.clone(), k)).collect())
    }
}

/// The content of the keys ConfigMap: the current key id and every sealed key by id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySet {
    pub current: String,
    pub wrapped: BTreeMap<String, Vec<u8>>,
}

impl KeySet {
    /// A set of one key, current.
    pub fn new(key: &DataKey, root: &RootKey) -> KeySet {
        KeySet {
            current: key.id.clone(),
            wrapped: BTreeMap::from([(key.id.clone(), key.wrap(root))]),
        }
    }

    /// Adds `key` and makes it current (the old keys stay until [`KeySet::only_current`]).
    pub fn with_current(mut self, key: &DataKey, root: &RootKey) -> KeySet {
        self.wrapped.insert(key.id.clone(), key.wrap(root));
        self.current = key.id.clone();
        self
    }

    /// The set without every key but the current one.
    pub fn only_current(mut self) -> KeySet {
        let current = self.current.clone();
        self.wrapped.retain(|id, _| *id == current);
        self
    }

    /// Every key unwrapped with `root`.
    pub fn unwrap_all(&self, root: &RootKey) -> Result<Vec<DataKey>, EncryptionError> {
        self.wrapped
            .iter()
            .map(|(id, wrapped)| DataKey::unwrap_with(root, id, wrapped))
            .collect()
    }

    /// Reads the `data` of the keys ConfigMap.
    pub fn from_config_map(config_map: &Value) -> Result<KeySet, EncryptionError> {
        let malformed = |reason: &str| EncryptionError::KeysConfigMap(reason.to_string());
        let data = config_map
            .get("data")
            .and_then(Value::as_object)
            .ok_or_else(|| malformed("no data"))?;
        let current = data
            .get(CURRENT_FIELD)
            .and_then(Value::as_str)
            .ok_or_else(|| malformed("no current key"))?
            .to_string();
        let mut wrapped = BTreeMap::new();
        for (id, value) in data {
            if id == CURRENT_FIELD {
                continue;
            }
            let bytes = value
                .as_str()
                .and_then(|text| base64::engine::general_purpose::STANDARD.decode(text).ok())
                .ok_or_else(|| malformed(&format!("key {id:?} is not base64")))?;
            wrapped.insert(id.clone(), bytes);
        }
        if !wrapped.contains_key(&current) {
            return Err(malformed(&format!(
                "the current key {current:?} is missing"
            )));
        }
        Ok(KeySet { current, wrapped })
    }

    /// The `data` of the keys ConfigMap.
    pub fn to_data(&self) -> Value {
        let mut data = Map::new();
        data.insert(CURRENT_FIELD.into(), Value::String(self.current.clone()));
        for (id, wrapped) in &self.wrapped {
            data.insert(
                id.clone(),
                Value::String(base64::engine::general_purpose::STANDARD.encode(wrapped)),
            );
        }
        Value::Object(data)
    }

    /// A new keys ConfigMap (without uid and creation time).
    pub fn to_config_map(&self) -> Value {
        json!({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": KEYS_CONFIG_MAP,
                "namespace": KEYS_NAMESPACE,
                "labels": {"app.kubernetes.io/managed-by": "flotilla"},
            },
            "data": self.to_data(),
        })
    }
}

/// Whether `object` is the keys ConfigMap (which only the nodes themselves may write).
pub fn is_keys_config_map(kind: &str, namespace: &str, name: &str) -> bool {
    kind == "ConfigMap" && namespace == KEYS_NAMESPACE && name == KEYS_CONFIG_MAP
}

#[cfg(test)]
mod tests;
