//! The CLI's credentials file (as a kubeconfig): the cluster's CAs, the user's certificate and
//! key, and the addresses of its nodes. `serve --init` writes the first admin's; `auth
//! create-user` issues others. Read from `--config`, `FLOTILLA_CONFIG` or
//! `~/.flotilla/config.json`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::authority::{certificates_from_pem, PkiError};
use crate::tls::{Credentials, TlsState};
use crate::transport::GRPC_ALPN;

#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error("{action} credentials file {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("parse credentials file {path}: {source}")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("credentials file: {0}")]
    Pki(#[from] PkiError),
}

fn io_error(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> CredentialsError {
    let path = path.to_path_buf();
    move |source| CredentialsError::Io {
        action,
        path,
        source,
    }
}

#[derive(Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CredentialsFile {
    pub cluster_id: String,
    pub user: String,
    /// HOST:PORT of the nodes, tried in order.
    pub servers: Vec<String>,
    /// PEM bundle of the CAs the nodes' certificates chain to.
    pub certificate_authorities: String,
    /// PEM of the user's certificate.
    pub certificate: String,
    /// PEM of the user's private key.
    pub key: String,
}

impl std::fmt::Debug for CredentialsFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CredentialsFile")
            .field("cluster_id", &self.cluster_id)
            .field("user", &self.user)
            .field("servers", &self.servers)
            .finish_non_exhaustive()
    }
}

/// `~/.flotilla/config.json`.
pub fn default_path() -> Option<PathBuf> {
    std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".flotilla").join("config.json"))
}

impl CredentialsFile {
    /// The TLS configuration of a client holding these credentials.
    pub fn client_tls(&self) -> Result<Arc<rustls::ClientConfig>, CredentialsError> {
        let authorities = certificates_from_pem(&self.certificate_authorities)?;
        let own = Credentials::from_pem(&self.certificate, &self.key)?;
        let state = TlsState::new(authorities, Some(own))?;
        Ok(Arc::new(state.client_config(&[GRPC_ALPN])?))
    }

    pub fn read(path: &Path) -> Result<CredentialsFile, CredentialsError> {
        let bytes = std::fs::read(path).map_err(io_error("read", path))?;
        serde_json::from_slice(&bytes).map_err(|source| CredentialsError::Parse {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Writes the file readable by its owner only.
    pub fn write(&self, path: &Path) -> Result<(), CredentialsError> {
        let bytes = serde_json::to_vec_pretty(self).map_err(|source| CredentialsError::Parse {
            path: path.to_path_buf(),
            source,
        })?;
        crate::files::write_private_file(path, &bytes).map_err(io_error("write", path))
    }
}
