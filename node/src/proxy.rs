//! The service proxy of a node (kube-proxy's part, in userspace): Services are reached on
//! their cluster IPs, node ports and LoadBalancer ports, and every connection is spliced to
//! one ready endpoint — directly when the pod runs on this node, else through a stream of the
//! QUIC tunnel to the proxy of the pod's node.
//!
//! Level-driven: every pass reads the Services, Endpoints and Nodes of this node's store,
//! builds the routing table (`table.rs`, pure), binds the cluster IPs (`vip.rs`, only when the
//! node has its own network namespace: `--pod-gateway-in-node`) and makes the TCP listeners
//! match the table. Connections already open keep their endpoint when the table changes; new
//! ones see the new table. A frontend without ready endpoints is not listened on: clients are refused at once.
//! The same pass builds the Ingress router from the Ingresses, and the Ingress listener
//! (`--ingress-port`) sends each HTTP request to an endpoint of the Service port it routes to,
//! connected the same way.
//!
//! Modules: `table.rs` (routing table and picker), `vip.rs` (cluster IPs on `flotilla0`),
//! `tunnel.rs` (QUIC endpoint, one connection per peer, stream header), `tls.rs` (the cluster
//! CA and node certificates), `splice.rs` (copying with half-close and reset), `stats.rs`
//! (counters in `<data_dir>/proxy-stats.json`), `ingress.rs` (the Ingress router, request
//! heads, the HTTP listener).

mod ingress;
mod splice;
mod stats;
mod table;
mod tls;
mod tunnel;
mod vip;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use flotilla_raft::Replica;
use serde_json::Value;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use stats::Stats;
use table::{Frontend, FrontendKind, Picker, Protocol, RoutingTable, Upstream, Via};
use tunnel::Tunnels;

/// The UDP port of the tunnels, the same on every node.
pub const DEFAULT_PROXY_PORT: u16 = 7071;
/// The TCP port of the Ingress listener.
pub const DEFAULT_INGRESS_PORT: u16 = 80;
const PASS_INTERVAL: Duration = Duration::from_millis(500);
/// Cluster IPs are checked against the interface at least this often, changed or not.
const VIP_RECHECK: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Endpoints tried for one connection before it is refused.
const MAX_ATTEMPTS: usize = 3;

/// How the proxy runs.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    pub node_name: String,
    /// Where `proxy-stats.json` is written.
    pub data_dir: PathBuf,
    /// The node's address (its InternalIP): LoadBalancer ports listen on it, and without
    /// cluster IPs, node ports too.
    pub node_ip: String,
    /// The node has its own network namespace: bind cluster IPs on `flotilla0`, listen on
    /// node ports on every address.
    pub bind_cluster_ips: bool,
    /// UDP port of the QUIC tunnels (every node's must be the same).
    pub port: u16,
    /// TCP port of the Ingress listener; 0: none. On every address of the node when it has
    /// its own network namespace, else on `node_ip`.
    pub ingress_port: u16,
}

/// What the listeners, the tunnel server and the main loop share.
pub(crate) struct Shared {
    node_name: String,
    table: RwLock<Arc<RoutingTable>>,
    picker: Mutex<Picker>,
    /// This node's pod subnet, as (network, prefix length).
    pod_cidr: RwLock<Option<(Ipv4Addr, u8)>>,
    /// Node names by InternalIP.
    node_names: RwLock<HashMap<IpAddr, String>>,
    tunnels: OnceLock<Arc<Tunnels>>,
    ingress_router: RwLock<Arc<ingress::Router>>,
    stats: Arc<Stats>,
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

impl Shared {
    fn new(node_name: String) -> Shared {
        let seed = {
            use std::hash::{Hash, Hasher};
            let mut hasher = std::hash::DefaultHasher::new();
            node_name.hash(&mut hasher);
            hasher.finish() | 1
        };
        Shared {
            node_name,
            table: RwLock::new(Arc::new(RoutingTable::default())),
            picker: Mutex::new(Picker::seeded(seed)),
            pod_cidr: RwLock::new(None),
            node_names: RwLock::new(HashMap::new()),
            tunnels: OnceLock::new(),
            ingress_router: RwLock::new(Arc::new(ingress::Router::default())),
            stats: Arc::new(Stats::default()),
        }
    }

    pub(crate) fn table(&self) -> Arc<RoutingTable> {
        read(&self.table)
    }

    pub(crate) fn ingress_router(&self) -> Arc<ingress::Router> {
        read(&self.ingress_router)
    }

    pub(crate) fn in_pod_cidr(&self, ip: IpAddr) -> bool {
        match (read(&self.pod_cidr), ip) {
            (Some(subnet), IpAddr::V4(ip)) => crate::agent::routes::contains(subnet, ip),
            _ => false,
        }
    }

    /// The node at `ip`, or the address itself when it is no known node.
    pub(crate) fn node_named(&self, ip: IpAddr) -> String {
        self.node_names
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(&ip)
            .cloned()
            .unwrap_or_else(|| ip.to_string())
    }
}

fn list(replica: &Replica, kind: &str) -> Option<Vec<Value>> {
    crate::local_store::list_all(replica, kind, "proxy")
}

/// Where a frontend's listener binds, or `None` when this node does not serve it.
fn bind_address(
    frontend: &Frontend,
    kind: FrontendKind,
    config: &ProxyConfig,
    held: &BTreeSet<IpAddr>,
    node_ip: Option<IpAddr>,
) -> Option<SocketAddr> {
    if frontend.protocol != Protocol::Tcp {
        return None;
    }
    match kind {
        FrontendKind::ClusterIp => held
            .contains(&frontend.ip)
            .then(|| SocketAddr::new(frontend.ip, frontend.port)),
        FrontendKind::NodePort if config.bind_cluster_ips => {
            Some(SocketAddr::new(frontend.ip, frontend.port))
        }
        FrontendKind::NodePort => node_ip.map(|ip| SocketAddr::new(ip, frontend.port)),
        FrontendKind::LoadBalancer => Some(SocketAddr::new(frontend.ip, frontend.port)),
    }
}

/// Where the Ingress listener binds: every address when the node has its own network
/// namespace (then it shares its port with the cluster IPs' listeners, see [`bind`]), else
/// the node's address.
fn ingress_address(config: &ProxyConfig, node_ip: Option<IpAddr>) -> Option<SocketAddr> {
    if config.ingress_port == 0 {
        return None;
    }
    let ip = match node_ip {
        Some(ip) if !config.bind_cluster_ips => ip,
        _ => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
    };
    Some(SocketAddr::new(ip, config.ingress_port))
}

/// Runs the proxy until `shutdown`. The tunnels use the node's certificate in `tls_state`.
pub async fn run(
    replica: Replica,
    config: ProxyConfig,
    tls_state: Arc<flotilla_pki::TlsState>,
    shutdown: CancellationToken,
) {
    let shared = Arc::new(Shared::new(config.node_name.clone()));
    let mut tasks = vec![tokio::spawn(stats::run_writer(
        shared.stats.clone(),
        config.node_name.clone(),
        config.data_dir.clone(),
        shutdown.clone(),
    ))];
    tasks.push(tokio::spawn(start_tunnels(
        tls_state,
        config.clone(),
        shared.clone(),
        shutdown.clone(),
    )));
    let node_ip: Option<IpAddr> = config.node_ip.parse().ok();
    if !config.bind_cluster_ips {
        tracing::info!(
            "proxy: this node shares its host's network namespace, so it binds no cluster \
             IPs (Services are reached by node ports here)"
        );
    }

    let mut listeners: HashMap<Frontend, (SocketAddr, CancellationToken)> = HashMap::new();
    let mut failed_binds: HashSet<SocketAddr> = HashSet::new();
    let ingress_address = ingress_address(&config, node_ip);
    let mut ingress_listening = false;
    let mut held: BTreeSet<IpAddr> = BTreeSet::new();
    let mut vips_checked: Option<Instant> = None;
    let mut tick = tokio::time::interval(PASS_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        let (Some(services), Some(endpoints), Some(nodes)) = (
            list(&replica, "Service"),
            list(&replica, "Endpoints"),
            list(&replica, "Node"),
        ) else {
            continue;
        };
        let table = table::build(&services, &endpoints, &nodes, &config.node_name);
        if *shared.table() != table {
            for (frontend, service) in &table.conflicts {
                tracing::warn!(?frontend, %service, "proxy: frontend taken by another Service port");
            }
            write(&shared.table, Arc::new(table));
        }
        if let Some(address) = ingress_address {
            if let Some(ingresses) = list(&replica, "Ingress") {
                let router = ingress::build(&ingresses);
                if *shared.ingress_router() != router {
                    for ignored in &router.ignored {
                        tracing::warn!(%ignored, "proxy: Ingress rule left out");
                    }
                    write(&shared.ingress_router, Arc::new(router));
                }
            }
            if !ingress_listening {
                match bind(address, config.bind_cluster_ips) {
                    Ok(listener) => {
                        tracing::info!(%address, "proxy: ingress listening");
                        tasks.push(tokio::spawn(ingress::serve(
                            listener,
                            shared.clone(),
                            shutdown.clone(),
                        )));
                        *shared
                            .stats
                            .ingress_address
                            .lock()
                            .unwrap_or_else(|p| p.into_inner()) = Some(address.to_string());
                        ingress_listening = true;
                    }
                    Err(error) => {
                        if failed_binds.insert(address) {
                            tracing::warn!(%address, %error, "proxy: ingress cannot listen (retrying)");
                        }
                    }
                }
            }
        }
        let table = shared.table();
        write(
            &shared.node_names,
            nodes
                .iter()
                .filter_map(|node| {
                    Some((
                        table::internal_ip(node)?,
                        node.pointer("/metadata/name")?.as_str()?.to_owned(),
                    ))
                })
                .collect(),
        );
        let own_cidr = nodes
            .iter()
            .find(|node| {
                node.pointer("/metadata/name").and_then(Value::as_str)
                    == Some(config.node_name.as_str())
            })
            .and_then(|node| flotilla_raft::store::pod_cidr(node))
            .and_then(crate::agent::routes::parse_cidr);
        write(&shared.pod_cidr, own_cidr);

        if config.bind_cluster_ips {
            let wanted: BTreeSet<IpAddr> = table.cluster_ips();
            let stale = vips_checked.is_none_or(|at| at.elapsed() >= VIP_RECHECK);
            if wanted != held || stale {
                // Listeners on departing addresses close before the addresses go.
                for (frontend, (address, token)) in &listeners {
                    if table.routes.get(frontend).map(|r| r.kind) == Some(FrontendKind::ClusterIp)
                        && !wanted.contains(&address.ip())
                    {
                        token.cancel();
                    }
                }
                match vip::sync(&wanted).await {
                    Ok(now_held) => held = now_held,
                    Err(error) => tracing::warn!(%error, "proxy: bind cluster IPs"),
                }
                vips_checked = Some(Instant::now());
                *shared
                    .stats
                    .cluster_ips
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()) =
                    held.iter().map(ToString::to_string).collect();
            }
        }

        // A frontend without ready endpoints is not listened on, so clients are refused by the
        // kernel at once (kube-proxy rejects them the same way); open connections go on.
        let wanted: HashMap<Frontend, SocketAddr> = table
            .routes
            .iter()
            .filter(|(_, route)| !route.upstream.backends.is_empty())
            .filter_map(|(frontend, route)| {
                Some((
                    *frontend,
                    bind_address(frontend, route.kind, &config, &held, node_ip)?,
                ))
            })
            .collect();
        listeners.retain(|frontend, (address, token)| {
            let keep = !token.is_cancelled() && wanted.get(frontend) == Some(address);
            if !keep {
                token.cancel();
                tracing::info!(%address, "proxy: stopped listening");
            }
            keep
        });
        for (frontend, address) in &wanted {
            if listeners.contains_key(frontend) {
                continue;
            }
            let reuse_port = config.bind_cluster_ips
                && table.routes.get(frontend).map(|route| route.kind)
                    == Some(FrontendKind::ClusterIp);
            match bind(*address, reuse_port) {
                Ok(listener) => {
                    failed_binds.remove(address);
                    let token = shutdown.child_token();
                    tracing::info!(%address, service = %table.routes[frontend].upstream.service, "proxy: listening");
                    tokio::spawn(accept_loop(
                        *frontend,
                        listener,
                        shared.clone(),
                        token.clone(),
                    ));
                    listeners.insert(*frontend, (*address, token));
                }
                Err(error) => {
                    if failed_binds.insert(*address) {
                        tracing::warn!(%address, %error, "proxy: cannot listen (retrying)");
                    }
                }
            }
        }
        let mut frontends: Vec<String> = listeners.values().map(|(a, _)| a.to_string()).collect();
        frontends.sort();
        *shared
            .stats
            .frontends
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = frontends;
    }

    for (_, token) in listeners.values() {
        token.cancel();
    }
    if let Some(tunnels) = shared.tunnels.get() {
        tunnels.close();
    }
    if config.bind_cluster_ips {
        vip::remove_interface().await;
    }
    for task in tasks {
        let _ = task.await;
    }
}

/// A listener on `address`. With `reuse_port` (`SO_REUSEPORT`), given only in a node's own
/// network namespace to the cluster IPs' listeners and the Ingress listener on every address,
/// both can hold the same port: a connection goes to the listener of its exact address when
/// there is one, else to the one on every address.
fn bind(address: SocketAddr, reuse_port: bool) -> std::io::Result<TcpListener> {
    let socket = match address {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    if reuse_port {
        socket.set_reuseport(true)?;
    }
    socket.bind(address)?;
    socket.listen(1024)
}

/// Binds the QUIC endpoint and serves tunnels until `shutdown`.
async fn start_tunnels(
    tls_state: Arc<flotilla_pki::TlsState>,
    config: ProxyConfig,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) {
    let setup = tls::quic_configs(&tls_state).and_then(|(server, client)| {
        Tunnels::bind(
            server,
            client,
            SocketAddr::from((Ipv4Addr::UNSPECIFIED, config.port)),
            config.port,
            shared.stats.clone(),
        )
    });
    let tunnels = match setup {
        Ok(tunnels) => Arc::new(tunnels),
        Err(error) => {
            tracing::error!(error = %format!("{error:#}"), "proxy: no tunnels; remote endpoints are unreachable from this node");
            return;
        }
    };
    tracing::info!(port = ?tunnels.local_port(), "proxy: tunnel endpoint ready");
    let _ = shared.tunnels.set(tunnels.clone());
    tunnel::serve(tunnels, shared, shutdown).await;
}

async fn accept_loop(
    frontend: Frontend,
    listener: TcpListener,
    shared: Arc<Shared>,
    token: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            _ = token.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, client)) => {
                tokio::spawn(handle(frontend, stream, client, shared.clone()));
            }
            Err(error) => {
                tracing::warn!(%error, "proxy: accept");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Resets a client connection (no endpoint could take it).
fn refuse(stream: TcpStream, shared: &Shared) {
    shared.stats.refused.fetch_add(1, Ordering::Relaxed);
    splice::reset_on_close(&stream);
}

async fn handle(frontend: Frontend, stream: TcpStream, client: SocketAddr, shared: Arc<Shared>) {
    shared.stats.connections.fetch_add(1, Ordering::Relaxed);
    let _ = stream.set_nodelay(true);
    let table = shared.table();
    let Some(route) = table.routes.get(&frontend) else {
        return refuse(stream, &shared);
    };
    match connect(&route.upstream, client.ip(), &shared).await {
        Some(endpoint) => endpoint.splice(stream, &shared.stats).await,
        None => refuse(stream, &shared),
    }
}

/// A connection to one endpoint of a Service port.
pub(crate) enum EndpointConnection {
    /// A TCP connection to a pod of this node (or of a node this one does not know).
    Direct(TcpStream),
    /// A stream through the QUIC tunnel to the proxy of the pod's node.
    Tunnel {
        send: quinn::SendStream,
        recv: quinn::RecvStream,
    },
}

impl EndpointConnection {
    /// Sends `bytes` to the endpoint ahead of the client's own (the Ingress's request head).
    async fn send(&mut self, bytes: &[u8], stats: &Stats) -> std::io::Result<()> {
        use tokio::io::AsyncWriteExt;
        match self {
            EndpointConnection::Direct(stream) => stream.write_all(bytes).await?,
            EndpointConnection::Tunnel { send, .. } => {
                AsyncWriteExt::write_all(send, bytes).await?;
                stats
                    .tunnel_bytes_sent
                    .fetch_add(bytes.len() as u64, Ordering::Relaxed);
            }
        }
        stats.bytes.fetch_add(bytes.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Splices `client` and the endpoint until both are done.
    async fn splice(self, client: TcpStream, stats: &Stats) {
        match self {
            EndpointConnection::Direct(upstream) => {
                splice::tcp_to_tcp(client, upstream, &stats.bytes).await;
            }
            EndpointConnection::Tunnel { send, recv } => {
                splice::tcp_to_stream(
                    client,
                    send,
                    recv,
                    &stats.bytes,
                    &stats.tunnel_bytes_sent,
                    &stats.tunnel_bytes_received,
                )
                .await;
            }
        }
    }
}

/// Connects to a ready endpoint of `upstream` for a client at `client`, as the picker
/// chooses: directly when the pod runs here, else through the tunnel to its node; an
/// endpoint that cannot be reached is skipped for another, [`MAX_ATTEMPTS`] at most.
/// `None`: no endpoint could be reached (or there is none).
async fn connect(
    upstream: &Upstream,
    client: IpAddr,
    shared: &Shared,
) -> Option<EndpointConnection> {
    let mut tried = Vec::new();
    for _ in 0..MAX_ATTEMPTS.min(upstream.backends.len()) {
        let picked = shared
            .picker
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pick(upstream, client, Instant::now());
        let Some(backend) = picked else { break };
        if tried.contains(&backend) {
            continue;
        }
        let target = SocketAddr::new(backend.ip, backend.port);
        match &backend.via {
            Via::Direct => {
                match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(target)).await {
                    Ok(Ok(stream)) => {
                        let _ = stream.set_nodelay(true);
                        shared.stats.direct.fetch_add(1, Ordering::Relaxed);
                        return Some(EndpointConnection::Direct(stream));
                    }
                    Ok(Err(error)) => {
                        tracing::debug!(%target, %error, service = %upstream.service, "proxy: endpoint unreachable");
                    }
                    Err(_) => {
                        tracing::debug!(%target, service = %upstream.service, "proxy: endpoint timed out")
                    }
                }
            }
            Via::Tunnel { node, address } => {
                let Some(tunnels) = shared.tunnels.get() else {
                    tracing::warn!(service = %upstream.service, "proxy: tunnels not ready; endpoint on {node} skipped");
                    tried.push(backend);
                    continue;
                };
                match tunnels.open(node, *address, target).await {
                    Ok((send, recv)) => return Some(EndpointConnection::Tunnel { send, recv }),
                    Err(error) => {
                        tracing::info!(error = %format!("{error:#}"), service = %upstream.service, "proxy: endpoint through the tunnel");
                    }
                }
            }
        }
        tried.push(backend);
    }
    None
}

#[cfg(test)]
mod tests;
