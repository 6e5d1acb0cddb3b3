//! Who is on the other end of a connection: read from the certificate the peer presented.

use std::fmt;
use std::net::SocketAddr;

use rustls::pki_types::CertificateDer;

use crate::authority::{PkiError, NODES_ORGANIZATION, NODE_NAME_PREFIX, USERS_ORGANIZATION};

/// The SHA-256 of a DER certificate.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    pub fn of(der: &[u8]) -> Fingerprint {
        let digest = ring::digest::digest(&ring::digest::SHA256, der);
        let mut bytes = [0u8; 32];
        bytes.copy_from_slice(digest.as_ref());
        Fingerprint(bytes)
    }

    pub fn hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    pub fn from_hex(text: &str) -> Option<Fingerprint> {
        if text.len() != 64 || !text.is_ascii() {
            return None;
        }
        let mut bytes = [0u8; 32];
        for (i, byte) in bytes.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(Fingerprint(bytes))
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex())
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex())
    }
}

/// A verified peer: a node of the cluster or a user, and its certificate's fingerprint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    Node {
        name: String,
        certificate: Fingerprint,
    },
    User {
        name: String,
        certificate: Fingerprint,
    },
}

impl Identity {
    /// Reads the identity from a certificate the TLS layer already verified.
    pub fn from_certificate(der: &CertificateDer<'_>) -> Result<Identity, PkiError> {
        let (_, certificate) = x509_parser::parse_x509_certificate(der)
            .map_err(|error| PkiError::Parse(error.to_string()))?;
        let subject = certificate.subject();
        let common_name = subject
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .ok_or_else(|| PkiError::Parse("certificate has no common name".into()))?;
        let organization = subject
            .iter_organization()
            .next()
            .and_then(|o| o.as_str().ok())
            .unwrap_or_default();
        let fingerprint = Fingerprint::of(der);
        match (organization, common_name.strip_prefix(NODE_NAME_PREFIX)) {
            (NODES_ORGANIZATION, Some(name)) if !name.is_empty() => Ok(Identity::Node {
                name: name.to_string(),
                certificate: fingerprint,
            }),
            (USERS_ORGANIZATION, None) => Ok(Identity::User {
                name: common_name.to_string(),
                certificate: fingerprint,
            }),
            _ => Err(PkiError::Parse(format!(
                "certificate {common_name:?} (organization {organization:?}) names neither a node nor a user"
            ))),
        }
    }

    pub fn name(&self) -> &str {
        match self {
            Identity::Node { name, .. } | Identity::User { name, .. } => name,
        }
    }

    pub fn is_node(&self) -> bool {
        matches!(self, Identity::Node { .. })
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Identity::Node { name, .. } => write!(f, "node {name}"),
            Identity::User { name, .. } => write!(f, "user {name}"),
        }
    }
}

/// What the gRPC server knows of a connection: put in every request's extensions.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    pub remote_address: SocketAddr,
    /// `None` when the peer presented no certificate (only `Cluster.Join` accepts that).
    pub identity: Option<Identity>,
}
