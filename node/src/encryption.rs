//! The node's root key: 32 bytes in `<data_dir>/keys/root.key`, outside RocksDB, the same on
//! every node (handed to a joining node over mutual TLS). Records the cluster keeps secret are
//! sealed with it (AES-256-GCM, random nonce, the record's name as associated data).

use std::path::{Path, PathBuf};

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};

const KEY_BYTES: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum EncryptionError {
    #[error("a root key is {KEY_BYTES} bytes, not {0}")]
    KeyLength(usize),
    #[error("read the root key {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("write the root key {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("sealed data is damaged or was sealed with another key")]
    Open,
}

pub struct RootKey([u8; KEY_BYTES]);

impl std::fmt::Debug for RootKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RootKey(..)")
    }
}

fn key_path(data_dir: &Path) -> PathBuf {
    data_dir.join("keys").join("root.key")
}

impl RootKey {
    pub fn generate() -> RootKey {
        RootKey(rand::random())
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<RootKey, EncryptionError> {
        let key: [u8; KEY_BYTES] = bytes
            .try_into()
            .map_err(|_| EncryptionError::KeyLength(bytes.len()))?;
        Ok(RootKey(key))
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    pub fn load(data_dir: &Path) -> Result<Option<RootKey>, EncryptionError> {
        let path = key_path(data_dir);
        match std::fs::read(&path) {
            Ok(bytes) => RootKey::from_bytes(&bytes).map(Some),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(EncryptionError::Read { path, source }),
        }
    }

    pub fn store(&self, data_dir: &Path) -> Result<(), EncryptionError> {
        let path = key_path(data_dir);
        let write = || -> std::io::Result<()> {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)?;
            }
            let temporary = path.with_extension("tmp");
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&temporary)?;
            file.write_all(&self.0)?;
            file.sync_all()?;
            std::fs::rename(&temporary, &path)
        };
        write().map_err(|source| EncryptionError::Write {
            path: path.clone(),
            source,
        })
    }

    fn key(&self) -> LessSafeKey {
        LessSafeKey::new(
            UnboundKey::new(&AES_256_GCM, &self.0).expect("a 32-byte key is an AES-256 key"),
        )
    }

    pub fn seal(&self, plaintext: &[u8], context: &[u8]) -> Vec<u8> {
        let nonce: [u8; NONCE_LEN] = rand::random();
        let mut sealed = plaintext.to_vec();
        self.key()
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(context),
                &mut sealed,
            )
            .expect("AES-GCM seals any input below 64 GiB");
        let mut out = nonce.to_vec();
        out.extend_from_slice(&sealed);
        out
    }

    pub fn open(&self, sealed: &[u8], context: &[u8]) -> Result<Vec<u8>, EncryptionError> {
        if sealed.len() < NONCE_LEN {
            return Err(EncryptionError::Open);
        }
        let (nonce, ciphertext) = sealed.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| EncryptionError::Open)?;
        let mut buffer = ciphertext.to_vec();
        let plaintext = self
            .key()
            .open_in_place(nonce, Aad::from(context), &mut buffer)
            .map_err(|_| EncryptionError::Open)?;
        Ok(plaintext.to_vec())
    }
}
