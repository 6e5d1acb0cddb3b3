//! The cluster CA: a self-signed ECDSA P-256 certificate and key, and the certificates it
//! issues. Nodes are `CN=system:node:<name>, O=system:nodes` with the subject alternative name
//! [`NODE_SERVER_NAME`] (what every client checks a node against, as Swarm's `swarm-manager`);
//! users are `CN=<name>, O=flotilla:users`, client authentication only.

use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};

use crate::identity::Fingerprint;

/// The DNS name in every node certificate; clients verify nodes against it.
pub const NODE_SERVER_NAME: &str = "flotilla-node";
/// The organization of node certificates.
pub const NODES_ORGANIZATION: &str = "system:nodes";
/// The organization of user certificates.
pub const USERS_ORGANIZATION: &str = "flotilla:users";
/// The common-name prefix of node certificates, as Kubernetes' kubelets.
pub const NODE_NAME_PREFIX: &str = "system:node:";

/// How long a CA is valid.
pub const AUTHORITY_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// How long a node certificate is valid; nodes renew theirs when a third of it is left.
pub const NODE_CERTIFICATE_LIFETIME: Duration = Duration::from_secs(90 * 24 * 3600);
/// How long a user's certificate is valid.
pub const USER_CERTIFICATE_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);
/// Certificates are valid from a little before they are issued (clock skew between nodes).
const BACKDATE: Duration = Duration::from_secs(3600);

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("generate a key: {0}")]
    GenerateKey(rcgen::Error),
    #[error("sign a certificate: {0}")]
    Sign(rcgen::Error),
    #[error("read the CA key: {0}")]
    ReadKey(rcgen::Error),
    #[error("read the CA certificate: {0}")]
    ReadAuthority(rcgen::Error),
    #[error("read PEM {what}: {reason}")]
    Pem { what: &'static str, reason: String },
    #[error("read certificate: {0}")]
    Parse(String),
    #[error("invalid name {0:?} for a certificate")]
    InvalidName(String),
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
    #[error("TLS verifier: {0}")]
    Verifier(String),
    #[error("join token: {0}")]
    Token(String),
}

/// Who a certificate names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subject {
    Node(String),
    User(String),
}

/// A certificate authority: its certificate and key as PEM.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Authority {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority")
            .field("fingerprint", &self.fingerprint().ok())
            .finish_non_exhaustive()
    }
}

/// A certificate issued with a new key, as PEM; `chain_pem` is the certificate followed by
/// its CA's (what a server presents).
#[derive(Clone, PartialEq, Eq)]
pub struct Issued {
    pub cert_pem: String,
    pub chain_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued").finish_non_exhaustive()
    }
}

fn to_offset(at: SystemTime) -> time::OffsetDateTime {
    time::OffsetDateTime::from(at)
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] &= 0x7f; // positive
    SerialNumber::from_slice(&bytes)
}

impl Authority {
    /// A new CA named `common_name`, valid from `now`.
    pub fn generate(common_name: &str, now: SystemTime) -> Result<Authority, PkiError> {
        let key = KeyPair::generate().map_err(PkiError::GenerateKey)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = to_offset(now - BACKDATE);
        params.not_after = to_offset(now + AUTHORITY_LIFETIME);
        params.serial_number = Some(random_serial());
        let cert = params.self_signed(&key).map_err(PkiError::Sign)?;
        Ok(Authority {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    pub fn certificate_der(&self) -> Result<CertificateDer<'static>, PkiError> {
        certificate_from_pem(&self.cert_pem)
    }

    /// The SHA-256 of the CA certificate (what a join token carries).
    pub fn fingerprint(&self) -> Result<Fingerprint, PkiError> {
        Ok(Fingerprint::of(&self.certificate_der()?))
    }

    /// A certificate for `subject` with a new key, valid from `not_before` to `not_after`.
    pub fn issue_between(
        &self,
        subject: &Subject,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<Issued, PkiError> {
        let ca_key = KeyPair::from_pem(&self.key_pem).map_err(PkiError::ReadKey)?;
        let issuer =
            Issuer::from_ca_cert_pem(&self.cert_pem, ca_key).map_err(PkiError::ReadAuthority)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        match subject {
            Subject::Node(name) => {
                params
                    .distinguished_name
                    .push(DnType::CommonName, format!("{NODE_NAME_PREFIX}{name}"));
                params
                    .distinguished_name
                    .push(DnType::OrganizationName, NODES_ORGANIZATION);
                params.subject_alt_names.push(SanType::DnsName(
                    NODE_SERVER_NAME
                        .try_into()
                        .map_err(|_| PkiError::InvalidName(NODE_SERVER_NAME.into()))?,
                ));
                params.extended_key_usages = vec![
                    ExtendedKeyUsagePurpose::ServerAuth,
                    ExtendedKeyUsagePurpose::ClientAuth,
                ];
            }
            Subject::User(name) => {
                params.distinguished_name.push(DnType::CommonName, name);
                params
                    .distinguished_name
                    .push(DnType::OrganizationName, USERS_ORGANIZATION);
                params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            }
        }
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.use_authority_key_identifier_extension = true;
        params.not_before = to_offset(not_before);
        params.not_after = to_offset(not_after);
        params.serial_number = Some(random_serial());
        let key = KeyPair::generate().map_err(PkiError::GenerateKey)?;
        let cert = params.signed_by(&key, &issuer).map_err(PkiError::Sign)?;
        let cert_pem = cert.pem();
        Ok(Issued {
            chain_pem: format!("{cert_pem}{}", self.cert_pem),
            cert_pem,
            key_pem: key.serialize_pem(),
        })
    }

    /// A certificate for `subject` valid for `lifetime` from `now`.
    pub fn issue(
        &self,
        subject: &Subject,
        now: SystemTime,
        lifetime: Duration,
    ) -> Result<Issued, PkiError> {
        self.issue_between(subject, now - BACKDATE, now + lifetime)
    }
}

pub fn certificate_from_pem(pem: &str) -> Result<CertificateDer<'static>, PkiError> {
    CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|error| PkiError::Pem {
        what: "certificate",
        reason: error.to_string(),
    })
}

/// Every certificate of a PEM bundle, in order.
pub fn certificates_from_pem(pem: &str) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let certificates = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| PkiError::Pem {
            what: "certificates",
            reason: error.to_string(),
        })?;
    if certificates.is_empty() {
        return Err(PkiError::Pem {
            what: "certificates",
            reason: "no certificate in it".into(),
        });
    }
    Ok(certificates)
}

pub fn private_key_from_pem(pem: &str) -> Result<PrivateKeyDer<'static>, PkiError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|error| PkiError::Pem {
        what: "private key",
        reason: error.to_string(),
    })
}

/// When the certificate stops being valid.
pub fn not_after(certificate: &CertificateDer<'_>) -> Result<SystemTime, PkiError> {
    let (_, parsed) = x509_parser::parse_x509_certificate(certificate)
        .map_err(|error| PkiError::Parse(error.to_string()))?;
    let seconds = parsed.validity().not_after.timestamp();
    Ok(SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(seconds).unwrap_or(0)))
}

#[cfg(test)]
mod tests;
