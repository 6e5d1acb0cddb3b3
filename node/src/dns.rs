//! The cluster DNS server of a node (CoreDNS's part in Kubernetes), serving UDP and TCP on the
//! node's pod gateway address (the first host address of its pod subnet), which its pods use
//! as their resolver: Service names under `cluster.local` are answered from the name table,
//! every other name is forwarded to the upstream resolvers of the node's own resolv.conf.
//!
//! Level-driven: every pass reads the Services, Endpoints and own Node of this node's store,
//! rebuilds the name table (`records.rs`, pure) and swaps it in at once, re-reads the
//! upstreams, and binds the gateway address when it is not bound yet (the address appears
//! once the pod network or the node's own gateway setup is there; a failed bind is logged
//! once and tried again every pass). The server only reads the store.
//!
//! Modules: `records.rs` (the name table and its answers), `message.rs` (one request: parse,
//! decide, write), `upstream.rs` (forwarding), `resolv_conf.rs` (nameservers and search
//! domains of resolv.conf).

mod message;
mod records;
pub(crate) mod resolv_conf;
mod upstream;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use flotilla_raft::{ObjectKey, Replica};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub(crate) use records::CLUSTER_DOMAIN;

use message::{Decision, Transport};
use records::NameTable;

/// The port pods send their questions to (resolv.conf has no port).
pub const DEFAULT_DNS_PORT: u16 = 53;
const PASS_INTERVAL: Duration = Duration::from_millis(500);
/// Requests being answered at once over UDP; more are dropped (the client asks again).
const MAX_UDP_REQUESTS_IN_FLIGHT: usize = 256;
/// TCP connections served at once; more are closed at once.
const MAX_TCP_CONNECTIONS: usize = 64;
/// A TCP connection without a request for this long is closed.
const TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Requests answered on one TCP connection before it is closed.
const MAX_REQUESTS_PER_CONNECTION: usize = 1000;
/// The largest UDP request read (anything longer is cut and then refused as malformed).
const MAX_UDP_REQUEST_BYTES: usize = 4096;

/// How the DNS server runs.
#[derive(Debug, Clone)]
pub struct DnsConfig {
    pub node_name: String,
    /// The port on the pod gateway address, UDP and TCP.
    pub port: u16,
    /// The resolv.conf whose nameservers are the upstreams.
    pub resolv_conf: PathBuf,
}

/// What the listeners and the main loop share.
struct Shared {
    table: RwLock<Arc<NameTable>>,
    upstreams: RwLock<Arc<Vec<SocketAddr>>>,
    udp_requests: Arc<Semaphore>,
    tcp_connections: Arc<Semaphore>,
    /// How long a forwarded request may take, over every upstream.
    forward_timeout: Duration,
}

impl Shared {
    fn new(forward_timeout: Duration) -> Shared {
        Shared {
            table: RwLock::new(Arc::new(NameTable::default())),
            upstreams: RwLock::new(Arc::new(Vec::new())),
            udp_requests: Arc::new(Semaphore::new(MAX_UDP_REQUESTS_IN_FLIGHT)),
            tcp_connections: Arc::new(Semaphore::new(MAX_TCP_CONNECTIONS)),
            forward_timeout,
        }
    }
}

fn read<T: Clone>(lock: &RwLock<T>) -> T {
    lock.read()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .clone()
}

fn write<T>(lock: &RwLock<T>, value: T) {
    *lock
        .write()
        .unwrap_or_else(|poisoned| poisoned.into_inner()) = value;
}

fn list(replica: &Replica, kind: &str) -> Option<Vec<Value>> {
    crate::local_store::list_all(replica, kind, "dns")
}

/// A Node's InternalIP.
fn internal_ip(node: &Value) -> Option<IpAddr> {
    node.pointer("/status/addresses")?
        .as_array()?
        .iter()
        .find(|a| a.get("type").and_then(Value::as_str) == Some("InternalIP"))?
        .get("address")?
        .as_str()?
        .parse()
        .ok()
}

/// The answer to the request in `bytes`, or `None` when there is none to send.
async fn respond(shared: &Shared, bytes: &[u8], transport: Transport) -> Option<Vec<u8>> {
    let table = read(&shared.table);
    match message::decide(&table, bytes, transport) {
        Decision::Ignore => None,
        Decision::Respond(response) => Some(response),
        Decision::Forward { request, failure } => {
            let upstreams = read(&shared.upstreams);
            match upstream::forward(
                &upstreams,
                &request,
                bytes,
                transport == Transport::Tcp,
                shared.forward_timeout,
            )
            .await
            {
                Ok(reply) => Some(reply),
                Err(error) => {
                    tracing::debug!(%error, "dns: forward a request");
                    Some(failure)
                }
            }
        }
        Decision::Chase {
            request,
            response,
            target,
            record_type,
        } => {
            let query = message::chase_query(&target, record_type);
            let reply = match query.to_vec() {
                Ok(query_bytes) => {
                    let upstreams = read(&shared.upstreams);
                    upstream::forward(
                        &upstreams,
                        &query,
                        &query_bytes,
                        false,
                        shared.forward_timeout,
                    )
                    .await
                    .inspect_err(
                        |error| tracing::debug!(%error, %target, "dns: resolve an alias target"),
                    )
                    .ok()
                }
                Err(_) => None,
            };
            let response = message::finish_chase(*response, reply.as_deref());
            message::encode(&response, &request, transport)
        }
    }
}

async fn serve_udp(socket: Arc<UdpSocket>, shared: Arc<Shared>, stop: CancellationToken) {
    let mut buffer = vec![0u8; MAX_UDP_REQUEST_BYTES];
    loop {
        let (length, client) = tokio::select! {
            _ = stop.cancelled() => return,
            received = socket.recv_from(&mut buffer) => match received {
                Ok(received) => received,
                Err(error) => {
                    // ICMP errors of earlier replies surface here; the socket stays usable.
                    tracing::debug!(%error, "dns: receive over UDP");
                    continue;
                }
            },
        };
        let Ok(permit) = shared.udp_requests.clone().try_acquire_owned() else {
            tracing::debug!(%client, "dns: too many requests in flight, dropping one");
            continue;
        };
        let request = buffer.get(..length).unwrap_or_default().to_vec();
        let (socket, shared, stop) = (socket.clone(), shared.clone(), stop.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let reply = tokio::select! {
                _ = stop.cancelled() => return,
                reply = respond(&shared, &request, Transport::Udp) => reply,
            };
            if let Some(reply) = reply {
                if let Err(error) = socket.send_to(&reply, client).await {
                    tracing::debug!(%error, %client, "dns: send a reply over UDP");
                }
            }
        });
    }
}

async fn serve_tcp(listener: TcpListener, shared: Arc<Shared>, stop: CancellationToken) {
    loop {
        let (stream, client) = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::debug!(%error, "dns: accept over TCP");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = shared.tcp_connections.clone().try_acquire_owned() else {
            tracing::debug!(%client, "dns: too many TCP connections, closing one");
            continue;
        };
        let (shared, stop) = (shared.clone(), stop.clone());
        tokio::spawn(async move {
            let _permit = permit;
            tokio::select! {
                _ = stop.cancelled() => {}
                result = serve_connection(stream, &shared) => {
                    if let Err(error) = result {
                        tracing::debug!(%error, %client, "dns: serve a TCP connection");
                    }
                }
            }
        });
    }
}

/// Answers the length-prefixed requests of one TCP connection until it ends or idles.
async fn serve_connection(mut stream: TcpStream, shared: &Shared) -> std::io::Result<()> {
    for _ in 0..MAX_REQUESTS_PER_CONNECTION {
        let length = match tokio::time::timeout(TCP_IDLE_TIMEOUT, stream.read_u16()).await {
            Err(_) => return Ok(()),
            Ok(Err(error)) if error.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Ok(result) => result?,
        };
        let mut request = vec![0u8; usize::from(length)];
        tokio::time::timeout(TCP_IDLE_TIMEOUT, stream.read_exact(&mut request))
            .await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
        let Some(reply) = respond(shared, &request, Transport::Tcp).await else {
            continue;
        };
        let Ok(reply_length) = u16::try_from(reply.len()) else {
            continue;
        };
        let mut framed = Vec::with_capacity(reply.len() + 2);
        framed.extend_from_slice(&reply_length.to_be_bytes());
        framed.extend_from_slice(&reply);
        stream.write_all(&framed).await?;
    }
    Ok(())
}

/// The listeners on one address, and how to stop them.
struct Listening {
    address: SocketAddr,
    stop: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

async fn listen(
    address: SocketAddr,
    shared: &Arc<Shared>,
    shutdown: &CancellationToken,
) -> std::io::Result<Listening> {
    let udp = UdpSocket::bind(address).await?;
    let tcp = TcpListener::bind(address).await?;
    let stop = shutdown.child_token();
    let tasks = vec![
        tokio::spawn(serve_udp(Arc::new(udp), shared.clone(), stop.clone())),
        tokio::spawn(serve_tcp(tcp, shared.clone(), stop.clone())),
    ];
    Ok(Listening {
        address,
        stop,
        tasks,
    })
}

/// The upstreams of resolv.conf, without this node's own addresses.
fn read_upstreams(
    config: &DnsConfig,
    own_addresses: &[IpAddr],
) -> std::io::Result<Vec<SocketAddr>> {
    let text = std::fs::read_to_string(&config.resolv_conf)?;
    Ok(resolv_conf::upstreams(
        &resolv_conf::parse(&text),
        own_addresses,
    ))
}

/// Runs the DNS server until `shutdown`.
pub async fn run(replica: Replica, config: DnsConfig, shutdown: CancellationToken) {
    let shared = Arc::new(Shared::new(upstream::FORWARD_TIMEOUT));
    let mut listening: Option<Listening> = None;
    // The address whose bind failure was logged, so it is logged once.
    let mut failed_bind: Option<SocketAddr> = None;
    let mut resolv_conf_failed = false;
    let mut tick = tokio::time::interval(PASS_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        let (Some(services), Some(endpoints)) =
            (list(&replica, "Service"), list(&replica, "Endpoints"))
        else {
            continue;
        };
        let table = records::build(&services, &endpoints);
        if *read(&shared.table) != table {
            write(&shared.table, Arc::new(table));
        }
        let own_node = match replica
            .reader()
            .get(&ObjectKey::new("Node", "", &config.node_name))
        {
            Ok(node) => node,
            Err(error) => {
                tracing::warn!(%error, "dns: read this node's Node object");
                continue;
            }
        };
        let own_node = own_node.as_ref();
        let gateway: Option<Ipv4Addr> = own_node
            .and_then(|node| flotilla_raft::store::pod_cidr(node))
            .and_then(crate::agent::gateway_of)
            .and_then(|gateway| gateway.parse().ok());

        let own_addresses: Vec<IpAddr> = gateway
            .map(IpAddr::V4)
            .into_iter()
            .chain(own_node.and_then(internal_ip))
            .collect();
        match read_upstreams(&config, &own_addresses) {
            Ok(upstreams) => {
                resolv_conf_failed = false;
                if *read(&shared.upstreams) != upstreams {
                    tracing::info!(?upstreams, "dns: upstream resolvers");
                    write(&shared.upstreams, Arc::new(upstreams));
                }
            }
            Err(error) if !resolv_conf_failed => {
                resolv_conf_failed = true;
                tracing::warn!(
                    %error,
                    path = %config.resolv_conf.display(),
                    "dns: read resolv.conf; keeping the upstreams read before"
                );
            }
            Err(_) => {}
        }

        let wanted = gateway.map(|gateway| SocketAddr::new(IpAddr::V4(gateway), config.port));
        if listening.as_ref().map(|l| l.address) != wanted {
            if let Some(old) = listening.take() {
                old.stop.cancel();
                tracing::info!(address = %old.address, "dns: stopped listening");
            }
        }
        if let (None, Some(address)) = (&listening, wanted) {
            match listen(address, &shared, &shutdown).await {
                Ok(now) => {
                    tracing::info!(%address, "dns: serving cluster names over UDP and TCP");
                    failed_bind = None;
                    listening = Some(now);
                }
                Err(error) if failed_bind != Some(address) => {
                    tracing::warn!(
                        %error,
                        %address,
                        "dns: listen (trying again every pass until the address is there)"
                    );
                    failed_bind = Some(address);
                }
                Err(error) => tracing::debug!(%error, %address, "dns: listen"),
            }
        }
    }
    if let Some(listening) = listening {
        listening.stop.cancel();
        for task in listening.tasks {
            let _ = task.await;
        }
    }
}

#[cfg(test)]
mod tests;
