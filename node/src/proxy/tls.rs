//! Mutual TLS for the tunnels between the nodes' proxies: the node's own certificate from the
//! cluster CA (`flotilla_pki::TlsState`, the same as its gRPC port's, renewed and rotated in
//! place), TLS 1.3, a client certificate required, peers verified against the trusted CAs.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context};
use flotilla_pki::TlsState;

/// The ALPN protocol of the tunnels.
pub(crate) const ALPN: &[u8] = b"flotilla-proxy/1";

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

/// The QUIC server and client configurations of a node.
pub(crate) fn quic_configs(
    state: &Arc<TlsState>,
) -> anyhow::Result<(quinn::ServerConfig, quinn::ClientConfig)> {
    let server = state
        .server_config(true, &[ALPN])
        .context("QUIC server TLS")?;
    let server = quinn::crypto::rustls::QuicServerConfig::try_from(server)
        .map_err(|error| anyhow!("QUIC server TLS: {error}"))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(server));
    server.transport_config(transport());

    let client = state.client_config(&[ALPN]).context("QUIC client TLS")?;
    let client = quinn::crypto::rustls::QuicClientConfig::try_from(client)
        .map_err(|error| anyhow!("QUIC client TLS: {error}"))?;
    let mut client = quinn::ClientConfig::new(Arc::new(client));
    client.transport_config(transport());
    Ok((server, client))
}
