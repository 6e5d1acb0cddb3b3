//! rustls configurations whose trust and own certificate can change while connections are
//! made: a node trusts both the old and the new CA during a CA rotation and swaps in renewed
//! certificates without restarting its servers.

use std::fmt;
use std::sync::{Arc, RwLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, WebPkiServerVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};

use crate::authority::{certificates_from_pem, private_key_from_pem, PkiError};
use crate::identity::Fingerprint;

/// A certificate chain (leaf first) and its key.
pub struct Credentials {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("chain_length", &self.chain.len())
            .finish_non_exhaustive()
    }
}

impl Credentials {
    pub fn from_pem(chain_pem: &str, key_pem: &str) -> Result<Credentials, PkiError> {
        Ok(Credentials {
            chain: certificates_from_pem(chain_pem)?,
            key: private_key_from_pem(key_pem)?,
        })
    }
}

pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

struct Current {
    authorities: Vec<CertificateDer<'static>>,
    server_verifier: Arc<WebPkiServerVerifier>,
    optional_client_verifier: Arc<dyn ClientCertVerifier>,
    mandatory_client_verifier: Arc<dyn ClientCertVerifier>,
    own: Option<Arc<CertifiedKey>>,
}

/// The trusted CAs and this side's certificate; shared by every configuration made from it.
pub struct TlsState {
    provider: Arc<CryptoProvider>,
    current: RwLock<Arc<Current>>,
}

impl fmt::Debug for TlsState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsState").finish_non_exhaustive()
    }
}

/// The verifiers of one set of trusted CAs: of servers, of optional and of required clients.
type Verifiers = (
    Arc<WebPkiServerVerifier>,
    Arc<dyn ClientCertVerifier>,
    Arc<dyn ClientCertVerifier>,
);

fn verifiers(
    provider: &Arc<CryptoProvider>,
    authorities: &[CertificateDer<'static>],
) -> Result<Verifiers, PkiError> {
    let mut roots = RootCertStore::empty();
    for authority in authorities {
        roots.add(authority.clone())?;
    }
    let roots = Arc::new(roots);
    let server = WebPkiServerVerifier::builder_with_provider(roots.clone(), provider.clone())
        .build()
        .map_err(|e| PkiError::Verifier(e.to_string()))?;
    let optional = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
        .allow_unauthenticated()
        .build()
        .map_err(|e| PkiError::Verifier(e.to_string()))?;
    let mandatory = WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
        .build()
        .map_err(|e| PkiError::Verifier(e.to_string()))?;
    Ok((server, optional, mandatory))
}

impl TlsState {
    pub fn new(
        authorities: Vec<CertificateDer<'static>>,
        own: Option<Credentials>,
    ) -> Result<Arc<TlsState>, PkiError> {
        let provider = provider();
        let current = Self::build(&provider, authorities, own)?;
        Ok(Arc::new(TlsState {
            provider,
            current: RwLock::new(Arc::new(current)),
        }))
    }

    fn build(
        provider: &Arc<CryptoProvider>,
        authorities: Vec<CertificateDer<'static>>,
        own: Option<Credentials>,
    ) -> Result<Current, PkiError> {
        let (server_verifier, optional_client_verifier, mandatory_client_verifier) =
            verifiers(provider, &authorities)?;
        let own = match own {
            Some(credentials) => Some(Arc::new(CertifiedKey::from_der(
                credentials.chain,
                credentials.key,
                provider,
            )?)),
            None => None,
        };
        Ok(Current {
            authorities,
            server_verifier,
            optional_client_verifier,
            mandatory_client_verifier,
            own,
        })
    }

    fn current(&self) -> Arc<Current> {
        self.current
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    fn replace(&self, next: Current) {
        *self
            .current
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Arc::new(next);
    }

    /// Trusts exactly `authorities` from the next handshake on.
    pub fn set_authorities(
        &self,
        authorities: Vec<CertificateDer<'static>>,
    ) -> Result<(), PkiError> {
        let current = self.current();
        let (server_verifier, optional_client_verifier, mandatory_client_verifier) =
            verifiers(&self.provider, &authorities)?;
        self.replace(Current {
            authorities,
            server_verifier,
            optional_client_verifier,
            mandatory_client_verifier,
            own: current.own.clone(),
        });
        Ok(())
    }

    /// Presents `credentials` from the next handshake on.
    pub fn set_credentials(&self, credentials: Credentials) -> Result<(), PkiError> {
        let current = self.current();
        let own = CertifiedKey::from_der(credentials.chain, credentials.key, &self.provider)?;
        self.replace(Current {
            authorities: current.authorities.clone(),
            server_verifier: current.server_verifier.clone(),
            optional_client_verifier: current.optional_client_verifier.clone(),
            mandatory_client_verifier: current.mandatory_client_verifier.clone(),
            own: Some(Arc::new(own)),
        });
        Ok(())
    }

    /// The fingerprints of the trusted CAs.
    pub fn authorities(&self) -> Vec<Fingerprint> {
        self.current()
            .authorities
            .iter()
            .map(|der| Fingerprint::of(der))
            .collect()
    }

    /// This side's certificate chain (leaf first), if it has one.
    pub fn own_chain(&self) -> Option<Vec<CertificateDer<'static>>> {
        self.current().own.as_ref().map(|own| own.cert.clone())
    }

    /// A server configuration: this side's certificate, clients verified against the trusted
    /// CAs; a client without a certificate is let through the handshake only when
    /// `client_certificate_required` is false (the service then decides, by method).
    pub fn server_config(
        self: &Arc<Self>,
        client_certificate_required: bool,
        alpn: &[&[u8]],
    ) -> Result<rustls::ServerConfig, PkiError> {
        let mut config = rustls::ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(Arc::new(DynamicClientVerifier {
                state: self.clone(),
                mandatory: client_certificate_required,
            }))
            .with_cert_resolver(Arc::new(DynamicCertificate(self.clone())));
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(config)
    }

    /// A client configuration: this side's certificate (if any), servers verified against the
    /// trusted CAs and [`crate::authority::NODE_SERVER_NAME`].
    pub fn client_config(
        self: &Arc<Self>,
        alpn: &[&[u8]],
    ) -> Result<rustls::ClientConfig, PkiError> {
        let mut config = rustls::ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(DynamicServerVerifier(self.clone())))
            .with_client_cert_resolver(Arc::new(DynamicCertificate(self.clone())));
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(config)
    }
}

/// The client configuration of a node that is joining: no certificate of its own yet, and the
/// cluster trusted only if its chain holds the CA whose fingerprint the join token carries.
pub fn join_client_config(
    authority: Fingerprint,
    alpn: &[&[u8]],
) -> Result<rustls::ClientConfig, PkiError> {
    let provider = provider();
    let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedAuthorityVerifier {
            authority,
            provider,
        }))
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

#[derive(Debug)]
struct DynamicCertificate(Arc<TlsState>);

impl ResolvesServerCert for DynamicCertificate {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.current().own.clone()
    }
}

impl ResolvesClientCert for DynamicCertificate {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.0.current().own.clone()
    }

    fn has_certs(&self) -> bool {
        self.0.current().own.is_some()
    }
}

#[derive(Debug)]
struct DynamicClientVerifier {
    state: Arc<TlsState>,
    mandatory: bool,
}

impl DynamicClientVerifier {
    fn verifier(&self) -> Arc<dyn ClientCertVerifier> {
        let current = self.state.current();
        if self.mandatory {
            current.mandatory_client_verifier.clone()
        } else {
            current.optional_client_verifier.clone()
        }
    }
}

impl ClientCertVerifier for DynamicClientVerifier {
    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.verifier()
            .verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.verifier().verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.verifier().verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.state
            .provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Verifies a node's certificate against the trusted CAs and the name every node certificate
/// carries, whatever address was dialled.
#[derive(Debug)]
struct DynamicServerVerifier(Arc<TlsState>);

fn node_server_name() -> ServerName<'static> {
    ServerName::DnsName(
        rustls::pki_types::DnsName::try_from(crate::authority::NODE_SERVER_NAME)
            .expect("the node server name is a valid DNS name")
            .to_owned(),
    )
}

impl ServerCertVerifier for DynamicServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.0.current().server_verifier.verify_server_cert(
            end_entity,
            intermediates,
            &node_server_name(),
            ocsp_response,
            now,
        )
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0
            .current()
            .server_verifier
            .verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0
            .current()
            .server_verifier
            .verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0
            .provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Trusts a server whose chain carries the CA with the pinned fingerprint, and verifies the
/// chain against that CA.
#[derive(Debug)]
struct PinnedAuthorityVerifier {
    authority: Fingerprint,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedAuthorityVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let authority = intermediates
            .iter()
            .find(|der| Fingerprint::of(der) == self.authority)
            .ok_or_else(|| {
                rustls::Error::General(format!(
                    "the cluster's CA is not the one the join token names ({})",
                    self.authority
                ))
            })?;
        let (verifier, _, _) = verifiers(&self.provider, &[authority.clone().into_owned()])
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        verifier.verify_server_cert(
            end_entity,
            intermediates,
            &node_server_name(),
            ocsp_response,
            now,
        )
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
