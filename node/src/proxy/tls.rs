//! Mutual TLS between the nodes' proxies, with a CA of the cluster's own.
//!
//! The CA is a self-signed ECDSA P-256 certificate kept, with its key, in the Secret
//! `kube-system/flotilla-proxy-ca` (type `kubernetes.io/tls`). The first proxy that finds it
//! missing creates it; a create through Raft has one winner, and the others read the winner's.
//! Every node then issues itself a leaf certificate (its name and InternalIP as subject
//! alternative names, both server and client auth) at every start; the QUIC server requires a
//! client certificate and both sides accept only chains to the cluster CA.
//!
//! The Secret is sealed like every Secret (`encryption.rs`): written through the replica
//! directly, it is sealed here before the write and opened after every read.
//!
//! Temporary: the key lives in an ordinary Secret that any API client can read. The security
//! issue (issue 7) replaces this with the cluster's own CA and node credentials.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context};
use base64::Engine;
use flotilla_raft::object::ObjectKey;
use flotilla_raft::{store, Command, Replica, ReplicaError, StoreError};

use crate::encryption::Keyring;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

pub(crate) const CA_SECRET_NAMESPACE: &str = "kube-system";
pub(crate) const CA_SECRET_NAME: &str = "flotilla-proxy-ca";
/// The ALPN protocol of the tunnels.
pub(crate) const ALPN: &[u8] = b"flotilla-proxy/1";
const CA_COMMON_NAME: &str = "flotilla proxy CA";

/// The cluster CA as PEM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ClusterCa {
    pub(crate) cert_pem: String,
    pub(crate) key_pem: String,
}

/// This node's credentials for the tunnels.
#[derive(Debug)]
pub(crate) struct NodeIdentity {
    pub(crate) chain: Vec<CertificateDer<'static>>,
    pub(crate) key: PrivateKeyDer<'static>,
    pub(crate) ca: CertificateDer<'static>,
}

/// The CA's parameters. The issuer of leaf certificates is rebuilt from these (its
/// distinguished name, key usages and key identifier method), so they must not change.
fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, CA_COMMON_NAME);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

/// A new cluster CA.
pub(crate) fn new_ca() -> anyhow::Result<ClusterCa> {
    let key = KeyPair::generate().context("generate the CA key")?;
    let cert = ca_params()
        .self_signed(&key)
        .context("sign the CA certificate")?;
    Ok(ClusterCa {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// A leaf certificate for node `node_name` (at `node_ip`), signed by `ca`.
pub(crate) fn issue(
    ca: &ClusterCa,
    node_name: &str,
    node_ip: Option<IpAddr>,
) -> anyhow::Result<NodeIdentity> {
    let ca_key = KeyPair::from_pem(&ca.key_pem).context("read the CA key")?;
    let issuer = Issuer::new(ca_params(), ca_key);
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, node_name);
    if let Ok(name) = node_name.to_owned().try_into() {
        params.subject_alt_names.push(SanType::DnsName(name));
    }
    if let Some(ip) = node_ip {
        params.subject_alt_names.push(SanType::IpAddress(ip));
    }
    if params.subject_alt_names.is_empty() {
        return Err(anyhow!(
            "node {node_name:?} has neither a DNS-style name nor an address for its certificate"
        ));
    }
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    let key = KeyPair::generate().context("generate the node key")?;
    let cert = params
        .signed_by(&key, &issuer)
        .context("sign the node certificate")?;
    let ca_der = CertificateDer::from_pem_slice(ca.cert_pem.as_bytes())
        .context("read the CA certificate")?;
    Ok(NodeIdentity {
        chain: vec![cert.der().clone(), ca_der.clone()],
        key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        ca: ca_der,
    })
}

/// The name a client checks a peer's certificate against: its node name when that is a DNS
/// name, else its address.
pub(crate) fn server_name(node_name: &str, address: IpAddr) -> String {
    match rustls::pki_types::DnsName::try_from(node_name) {
        Ok(_) => node_name.to_owned(),
        Err(_) => address.to_string(),
    }
}

fn transport() -> Arc<quinn::TransportConfig> {
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_concurrent_bidi_streams(quinn::VarInt::from_u32(65_536))
        .max_concurrent_uni_streams(quinn::VarInt::from_u32(0))
        // A lost peer is noticed within the idle timeout; keep-alives keep a quiet one.
        .keep_alive_interval(Some(Duration::from_secs(2)))
        .max_idle_timeout(Some(
            quinn::IdleTimeout::try_from(Duration::from_secs(10)).expect("10 s is a valid timeout"),
        ))
        // Large windows: a tunnel carries many streams, each possibly a bulk transfer.
        .stream_receive_window(quinn::VarInt::from_u32(8 * 1024 * 1024))
        .receive_window(quinn::VarInt::from_u32(64 * 1024 * 1024))
        .send_window(64 * 1024 * 1024);
    Arc::new(transport)
}

/// The QUIC server and client configurations of a node: TLS 1.3, the node's certificate on
/// both sides, peers verified against the cluster CA.
pub(crate) fn quic_configs(
    identity: &NodeIdentity,
) -> anyhow::Result<(quinn::ServerConfig, quinn::ClientConfig)> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(identity.ca.clone())
        .context("trust the cluster CA")?;
    let roots = Arc::new(roots);

    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        roots.clone(),
        provider.clone(),
    )
    .build()
    .context("build the client certificate verifier")?;
    let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("TLS 1.3")?
        .with_client_cert_verifier(verifier)
        .with_single_cert(identity.chain.clone(), identity.key.clone_key())
        .context("use the node certificate (server)")?;
    server.alpn_protocols = vec![ALPN.to_vec()];
    let server = quinn::crypto::rustls::QuicServerConfig::try_from(server)
        .map_err(|error| anyhow!("QUIC server TLS: {error}"))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(server));
    server.transport_config(transport());

    let mut client = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("TLS 1.3")?
        .with_root_certificates(roots)
        .with_client_auth_cert(identity.chain.clone(), identity.key.clone_key())
        .context("use the node certificate (client)")?;
    client.alpn_protocols = vec![ALPN.to_vec()];
    let client = quinn::crypto::rustls::QuicClientConfig::try_from(client)
        .map_err(|error| anyhow!("QUIC client TLS: {error}"))?;
    let mut client = quinn::ClientConfig::new(Arc::new(client));
    client.transport_config(transport());
    Ok((server, client))
}

fn b64(text: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(text)
}

/// The Secret holding `ca`.
pub(crate) fn secret_object(ca: &ClusterCa) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": CA_SECRET_NAME,
            "namespace": CA_SECRET_NAMESPACE,
            "uid": uuid::Uuid::new_v4().to_string(),
            "creationTimestamp": crate::api::now_rfc3339(),
            "labels": {"app.kubernetes.io/managed-by": "flotilla"},
        },
        "type": "kubernetes.io/tls",
        "data": {"tls.crt": b64(&ca.cert_pem), "tls.key": b64(&ca.key_pem)},
    })
}

/// The CA in a Secret made by [`secret_object`].
pub(crate) fn from_secret(secret: &Value) -> Option<ClusterCa> {
    let field = |name: &str| -> Option<String> {
        let encoded = secret.get("data")?.get(name)?.as_str()?;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .ok()?;
        String::from_utf8(bytes).ok()
    };
    Some(ClusterCa {
        cert_pem: field("tls.crt")?,
        key_pem: field("tls.key")?,
    })
}

/// The cluster CA: from this node's store if there, else confirmed with the leader, else
/// created. Retries until it has one or `shutdown`.
pub(crate) async fn load_or_create(
    replica: &Replica,
    keyring: &Keyring,
    shutdown: &CancellationToken,
) -> Option<ClusterCa> {
    let key = ObjectKey::new("Secret", CA_SECRET_NAMESPACE, CA_SECRET_NAME);
    let mut delay = Duration::from_millis(200);
    loop {
        // A restarted node has the Secret in its own store, even without a quorum.
        if let Ok(Some(secret)) = replica.reader().get(&key) {
            if let Some(ca) = keyring.open(secret).ok().and_then(|s| from_secret(&s)) {
                return Some(ca);
            }
        }
        let outcome = match replica.get(&key, true).await {
            Ok(secret) => keyring
                .open(secret)
                .map_err(anyhow::Error::from)
                .and_then(|secret| {
                    from_secret(&secret).ok_or_else(|| {
                        anyhow!("the Secret {CA_SECRET_NAMESPACE}/{CA_SECRET_NAME} holds no CA")
                    })
                }),
            Err(ReplicaError::Store(StoreError::NotFound { .. })) => create(replica, keyring).await,
            Err(error) => Err(anyhow!("read the proxy CA: {error}")),
        };
        match outcome {
            Ok(ca) => return Some(ca),
            Err(error) => {
                tracing::info!(error = %format!("{error:#}"), "proxy CA not available yet")
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

async fn create(replica: &Replica, keyring: &Keyring) -> anyhow::Result<ClusterCa> {
    let ca = new_ca()?;
    let mut secret = secret_object(&ca);
    store::validate(&mut secret).map_err(|e| anyhow!("build the CA Secret: {e}"))?;
    let secret = keyring
        .seal_for_write(secret)
        .await
        .context("seal the CA Secret")?;
    match replica.write(Command::Create { object: secret }).await {
        Ok(applied) => {
            tracing::info!("created the cluster's proxy CA");
            if let Some(stored) = applied.object {
                // Re-sealed if a key rotation dropped the key meanwhile.
                keyring
                    .settle(stored)
                    .await
                    .context("settle the CA Secret")?;
            }
            Ok(ca)
        }
        // Another node was first: the next round reads its CA.
        Err(ReplicaError::Store(StoreError::AlreadyExists { .. })) => {
            Err(anyhow!("another node created the proxy CA first"))
        }
        Err(error) => Err(anyhow!("store the proxy CA: {error}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ca_survives_a_round_trip_through_its_secret() {
        let ca = new_ca().expect("a CA");
        let secret = secret_object(&ca);
        assert_eq!(from_secret(&secret), Some(ca));
        assert_eq!(from_secret(&json!({"data": {}})), None);
    }

    #[test]
    fn node_certificates_from_the_same_ca_make_valid_quic_configs() {
        let ca = new_ca().expect("a CA");
        let identity = issue(&ca, "n1", Some("10.1.0.11".parse().expect("ip"))).expect("a leaf");
        assert_eq!(identity.chain.len(), 2);
        quic_configs(&identity).expect("QUIC configs");
        assert_eq!(server_name("n1", "10.1.0.11".parse().expect("ip")), "n1");
        assert_eq!(
            server_name("not a dns name", "10.1.0.11".parse().expect("ip")),
            "10.1.0.11"
        );
    }
}
