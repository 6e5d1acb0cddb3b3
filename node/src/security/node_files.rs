//! A node's own certificate, key and trusted CAs under `<data_dir>/tls/`, written when it joins
//! (or initializes) and on every renewal, read at every start.

use std::path::{Path, PathBuf};

use anyhow::Context;
use flotilla_pki::authority::certificates_from_pem;
use flotilla_pki::Credentials;
use rustls::pki_types::CertificateDer;

pub struct NodeFiles {
    pub chain_pem: String,
    pub key_pem: String,
    pub authorities_pem: String,
}

impl std::fmt::Debug for NodeFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeFiles").finish_non_exhaustive()
    }
}

fn directory(data_dir: &Path) -> PathBuf {
    data_dir.join("tls")
}

fn write_private(path: &Path, contents: &str) -> anyhow::Result<()> {
    flotilla_pki::files::write_private_file(path, contents.as_bytes())
        .with_context(|| format!("write {}", path.display()))
}

impl NodeFiles {
    pub fn read(data_dir: &Path) -> anyhow::Result<Option<NodeFiles>> {
        let dir = directory(data_dir);
        let read = |name: &str| -> anyhow::Result<Option<String>> {
            let path = dir.join(name);
            match std::fs::read_to_string(&path) {
                Ok(text) => Ok(Some(text)),
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(error) => Err(error).with_context(|| format!("read {}", path.display())),
            }
        };
        match (read("node.pem")?, read("node-key.pem")?, read("ca.pem")?) {
            (Some(chain_pem), Some(key_pem), Some(authorities_pem)) => Ok(Some(NodeFiles {
                chain_pem,
                key_pem,
                authorities_pem,
            })),
            _ => Ok(None),
        }
    }

    pub fn write(&self, data_dir: &Path) -> anyhow::Result<()> {
        let dir = directory(data_dir);
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        write_private(&dir.join("node-key.pem"), &self.key_pem)?;
        write_private(&dir.join("node.pem"), &self.chain_pem)?;
        write_private(&dir.join("ca.pem"), &self.authorities_pem)
    }

    pub fn credentials(&self) -> anyhow::Result<Credentials> {
        Credentials::from_pem(&self.chain_pem, &self.key_pem).context("read the node certificate")
    }

    pub fn authorities(&self) -> anyhow::Result<Vec<CertificateDer<'static>>> {
        certificates_from_pem(&self.authorities_pem).context("read the trusted CAs")
    }
}
