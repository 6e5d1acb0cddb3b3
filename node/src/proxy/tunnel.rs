//! QUIC tunnels between the nodes' proxies. One endpoint per node (UDP `--proxy-port`, the
//! same on every node) both accepts tunnels and opens them; to each other node there is one
//! persistent connection, opened on first use and again after it was lost. A proxied
//! connection is one bidirectional stream: the opener writes a [`header`] naming the pod
//! address, the accepting proxy connects to it and answers one status byte, then both splice.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::stats::{bump, Stats};
use super::{splice, Shared};

const VERSION: u8 = 1;
/// How long a new QUIC connection to a peer may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long the accepting proxy tries to reach the pod (on its own node: a live pod answers
/// at once).
const POD_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the opener waits for the status byte; past it the peer counts as unreachable.
const STATUS_TIMEOUT: Duration = Duration::from_secs(3);
/// After a peer could not be reached, streams to it fail at once for this long, so that
/// connections go to other endpoints instead of waiting.
const PEER_BACKOFF: Duration = Duration::from_secs(3);
/// The receive and send buffers asked for the endpoint's UDP socket (the kernel caps them at
/// `net.core.rmem_max` / `wmem_max`, and doubles what it grants). The default (208 KiB) holds
/// well under a millisecond of a tunnel's bulk traffic: whenever the proxy is not scheduled for
/// that long (a busy node), datagrams are dropped, and every drop is a loss to QUIC's
/// congestion control, which then backs off. Measured on two node containers of a busy 2-core
/// machine (1 GB through a tunnel, back to back): with the default, 500-800 datagrams dropped
/// (`RcvbufErrors`) and 320-360 MB/s; with this, none dropped and 450-490 MB/s (under heavier
/// load a few dozen drops per `bench-services` run remain, against 1,000-1,800 before).
const UDP_BUFFER_BYTES: usize = 8 * 1024 * 1024;

/// The answer to a stream's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Status {
    Connected = 0,
    /// The pod refused or did not answer.
    Unreachable = 1,
    /// The address is not a pod of the accepting node.
    Forbidden = 2,
}

impl Status {
    fn from_byte(byte: u8) -> Option<Status> {
        match byte {
            0 => Some(Status::Connected),
            1 => Some(Status::Unreachable),
            2 => Some(Status::Forbidden),
            _ => None,
        }
    }
}

/// The first bytes of a stream: version, address family (4 or 6), address, port (big-endian).
pub(crate) fn header(target: SocketAddr) -> Vec<u8> {
    let mut bytes = vec![VERSION];
    match target.ip() {
        IpAddr::V4(ip) => {
            bytes.push(4);
            bytes.extend_from_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            bytes.push(6);
            bytes.extend_from_slice(&ip.octets());
        }
    }
    bytes.extend_from_slice(&target.port().to_be_bytes());
    bytes
}

/// Reads a [`header`] from `reader`.
pub(crate) async fn read_header<R: tokio::io::AsyncRead + Unpin>(
    reader: &mut R,
) -> io::Result<SocketAddr> {
    let mut start = [0u8; 2];
    reader.read_exact(&mut start).await?;
    let invalid = |what: String| io::Error::new(io::ErrorKind::InvalidData, what);
    if start[0] != VERSION {
        return Err(invalid(format!("tunnel header version {}", start[0])));
    }
    let ip = match start[1] {
        4 => {
            let mut octets = [0u8; 4];
            reader.read_exact(&mut octets).await?;
            IpAddr::V4(Ipv4Addr::from(octets))
        }
        6 => {
            let mut octets = [0u8; 16];
            reader.read_exact(&mut octets).await?;
            IpAddr::V6(Ipv6Addr::from(octets))
        }
        family => return Err(invalid(format!("tunnel header address family {family}"))),
    };
    let mut port = [0u8; 2];
    reader.read_exact(&mut port).await?;
    Ok(SocketAddr::new(ip, u16::from_be_bytes(port)))
}

/// A QUIC endpoint on a UDP socket bound to `listen` with large buffers ([`UDP_BUFFER_BYTES`]).
fn endpoint(server: quinn::ServerConfig, listen: SocketAddr) -> io::Result<quinn::Endpoint> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(
        Domain::for_address(listen),
        Type::DGRAM,
        Some(Protocol::UDP),
    )?;
    // Best effort: a smaller buffer only costs throughput under load.
    if let Err(error) = socket.set_recv_buffer_size(UDP_BUFFER_BYTES) {
        tracing::warn!(%error, "proxy: enlarge the tunnel socket's receive buffer");
    }
    if let Err(error) = socket.set_send_buffer_size(UDP_BUFFER_BYTES) {
        tracing::warn!(%error, "proxy: enlarge the tunnel socket's send buffer");
    }
    let granted = socket.recv_buffer_size().unwrap_or(0);
    if granted < UDP_BUFFER_BYTES {
        tracing::warn!(
            granted,
            wanted = UDP_BUFFER_BYTES,
            "proxy: the tunnel socket's receive buffer is capped by net.core.rmem_max; bulk \
             transfers through tunnels may lose datagrams (raise the sysctl)"
        );
    }
    socket.bind(&listen.into())?;
    let runtime =
        quinn::default_runtime().ok_or_else(|| io::Error::other("no async runtime found"))?;
    quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        Some(server),
        socket.into(),
        runtime,
    )
}

/// A peer's connection, and when it last could not be reached.
#[derive(Default)]
struct Peer {
    connection: Option<quinn::Connection>,
    failed_at: Option<std::time::Instant>,
}

type Slot = Arc<tokio::sync::Mutex<Peer>>;

/// This node's tunnel endpoint and its connections to the other nodes.
pub(crate) struct Tunnels {
    endpoint: quinn::Endpoint,
    client: quinn::ClientConfig,
    port: u16,
    peers: Mutex<HashMap<IpAddr, Slot>>,
    stats: Arc<Stats>,
}

impl Tunnels {
    /// Binds the endpoint on `listen` (peers are reached on `peer_port`); when another node
    /// on this host holds the port (test nodes as host processes), on a port of the system's
    /// choice: this node can then open tunnels but not be reached by them.
    pub(crate) fn bind(
        server: quinn::ServerConfig,
        client: quinn::ClientConfig,
        listen: SocketAddr,
        peer_port: u16,
        stats: Arc<Stats>,
    ) -> anyhow::Result<Tunnels> {
        let endpoint = match endpoint(server.clone(), listen) {
            Ok(endpoint) => endpoint,
            Err(error) if error.kind() == io::ErrorKind::AddrInUse => {
                tracing::warn!(
                    %listen,
                    "the proxy port is taken (another node on this host?): this node's pods \
                     cannot be reached through tunnels"
                );
                endpoint(server, SocketAddr::new(listen.ip(), 0))
                    .context("bind the proxy's QUIC endpoint")?
            }
            Err(error) => {
                return Err(error)
                    .with_context(|| format!("bind the proxy's QUIC endpoint {listen}"))
            }
        };
        Ok(Tunnels {
            endpoint,
            client,
            port: peer_port,
            peers: Mutex::new(HashMap::new()),
            stats,
        })
    }

    pub(crate) fn local_port(&self) -> Option<u16> {
        self.endpoint.local_addr().ok().map(|a| a.port())
    }

    fn slot(&self, address: IpAddr) -> Slot {
        self.peers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .entry(address)
            .or_default()
            .clone()
    }

    /// Drops the connection to the peer at `address` and fails streams to it for a while.
    async fn mark_unreachable(&self, address: IpAddr) {
        let slot = self.slot(address);
        let mut peer = slot.lock().await;
        if let Some(connection) = peer.connection.take() {
            connection.close(quinn::VarInt::from_u32(0), b"peer unresponsive");
        }
        peer.failed_at = Some(std::time::Instant::now());
    }

    /// The live connection to `node`'s proxy, made if there is none.
    async fn connection(&self, node: &str, address: IpAddr) -> anyhow::Result<quinn::Connection> {
        let slot = self.slot(address);
        let mut peer = slot.lock().await;
        if let Some(connection) = peer.connection.as_ref() {
            if connection.close_reason().is_none() {
                return Ok(connection.clone());
            }
        }
        if peer.failed_at.is_some_and(|at| at.elapsed() < PEER_BACKOFF) {
            bail!("the proxy of {node} was unreachable moments ago");
        }
        let remote = SocketAddr::new(address, self.port);
        let connecting = self
            .endpoint
            .connect_with(
                self.client.clone(),
                remote,
                flotilla_pki::authority::NODE_SERVER_NAME,
            )
            .with_context(|| format!("connect to the proxy of {node} at {remote}"))?;
        let connection = match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
            Ok(Ok(connection)) => connection,
            Ok(Err(error)) => {
                peer.failed_at = Some(std::time::Instant::now());
                return Err(error)
                    .with_context(|| format!("connect to the proxy of {node} at {remote}"));
            }
            Err(_) => {
                peer.failed_at = Some(std::time::Instant::now());
                bail!("connect to the proxy of {node} at {remote}: timed out");
            }
        };
        self.stats.tunnels_connected.fetch_add(1, Ordering::Relaxed);
        tracing::info!(%node, %remote, "tunnel connected");
        peer.connection = Some(connection.clone());
        peer.failed_at = None;
        Ok(connection)
    }

    /// A stream to `target` (a pod) through `node`'s proxy, once that proxy connected to it.
    pub(crate) async fn open(
        &self,
        node: &str,
        address: IpAddr,
        target: SocketAddr,
    ) -> anyhow::Result<(quinn::SendStream, quinn::RecvStream)> {
        let mut attempt = 0;
        let (mut send, mut recv) = loop {
            attempt += 1;
            let connection = self.connection(node, address).await?;
            match connection.open_bi().await {
                Ok(stream) => break stream,
                // The connection died since it was last used: one more try on a new one.
                Err(error) if attempt == 1 => {
                    tracing::info!(%node, %error, "tunnel lost; reconnecting");
                }
                Err(error) => return Err(error).context("open a tunnel stream"),
            }
        };
        bump(&self.stats.streams_opened, node);
        send.write_all(&header(target))
            .await
            .context("send the tunnel header")?;
        let mut status = [0u8; 1];
        match tokio::time::timeout(STATUS_TIMEOUT, recv.read_exact(&mut status)).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => return Err(error).context("read the tunnel status"),
            Err(_) => {
                // A live peer answers within its pod connect timeout: this one is gone.
                let code = quinn::VarInt::from_u32(splice::RESET_CODE);
                let _ = send.reset(code);
                let _ = recv.stop(code);
                self.mark_unreachable(address).await;
                bail!("{node} did not answer for {target}");
            }
        }
        match Status::from_byte(status[0]) {
            Some(Status::Connected) => Ok((send, recv)),
            Some(other) => bail!("{node} could not connect to {target}: {other:?}"),
            None => bail!("{node} answered an unknown status {}", status[0]),
        }
    }

    pub(crate) fn close(&self) {
        self.endpoint
            .close(quinn::VarInt::from_u32(0), b"node stopping");
    }
}

/// Accepts tunnels from other nodes until `shutdown`.
pub(crate) async fn serve(tunnels: Arc<Tunnels>, shared: Arc<Shared>, shutdown: CancellationToken) {
    loop {
        let incoming = tokio::select! {
            _ = shutdown.cancelled() => return,
            incoming = tunnels.endpoint.accept() => match incoming {
                Some(incoming) => incoming,
                None => return,
            },
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            let connection = match incoming.await {
                Ok(connection) => connection,
                Err(error) => {
                    tracing::warn!(%remote, %error, "refused a tunnel");
                    return;
                }
            };
            let peer = shared.node_named(remote.ip());
            tracing::info!(%peer, %remote, "tunnel accepted");
            loop {
                match connection.accept_bi().await {
                    Ok((send, recv)) => {
                        bump(&shared.stats.streams_accepted, &peer);
                        tokio::spawn(serve_stream(send, recv, shared.clone()));
                    }
                    Err(error) => {
                        tracing::info!(%peer, %error, "tunnel closed");
                        return;
                    }
                }
            }
        });
    }
}

/// Whether a peer may ask this node to connect to `target`: one of this node's pods.
fn allowed(shared: &Shared, target: SocketAddr) -> bool {
    shared.in_pod_cidr(target.ip())
        || shared
            .table()
            .is_endpoint_on(target.ip(), &shared.node_name)
}

async fn serve_stream(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    shared: Arc<Shared>,
) {
    let code = quinn::VarInt::from_u32(splice::RESET_CODE);
    let target = match tokio::time::timeout(CONNECT_TIMEOUT, read_header(&mut recv)).await {
        Ok(Ok(target)) => target,
        Ok(Err(error)) => {
            tracing::warn!(%error, "bad tunnel stream");
            let _ = send.reset(code);
            return;
        }
        Err(_) => {
            let _ = send.reset(code);
            return;
        }
    };
    if !allowed(&shared, target) {
        tracing::warn!(%target, "a tunnel asked for an address that is no pod of this node");
        let _ = send.write_all(&[Status::Forbidden as u8]).await;
        let _ = send.finish();
        return;
    }
    let stream = match tokio::time::timeout(POD_CONNECT_TIMEOUT, TcpStream::connect(target)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(error)) => {
            tracing::debug!(%target, %error, "connect for a tunnel stream");
            let _ = send.write_all(&[Status::Unreachable as u8]).await;
            let _ = send.finish();
            return;
        }
        Err(_) => {
            let _ = send.write_all(&[Status::Unreachable as u8]).await;
            let _ = send.finish();
            return;
        }
    };
    let _ = stream.set_nodelay(true);
    if send.write_all(&[Status::Connected as u8]).await.is_err() {
        splice::reset_on_close(&stream);
        return;
    }
    let stats = &shared.stats;
    splice::tcp_to_stream(
        stream,
        send,
        recv,
        &stats.bytes,
        &stats.tunnel_bytes_sent,
        &stats.tunnel_bytes_received,
    )
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_header_names_the_pod_address_of_either_family() {
        for target in ["10.244.2.5:8080", "[fd00::5]:443"] {
            let target: SocketAddr = target.parse().expect("an address");
            let bytes = header(target);
            let mut reader = &bytes[..];
            assert_eq!(read_header(&mut reader).await.expect("a header"), target);
            assert!(reader.is_empty(), "the header is read exactly");
        }
        let mut bad: &[u8] = &[9, 4, 1, 2, 3, 4, 0, 80];
        assert!(read_header(&mut bad).await.is_err());
    }
}
