//! `flotilla serve`: one node. Opens (or creates) its identity and store, starts Raft and the
//! gRPC server, starts or joins the cluster, runs the membership manager, and drains on
//! SIGINT/SIGTERM.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use flotilla_proto::cluster_client::ClusterClient;
use flotilla_proto::cluster_server::ClusterServer;
use flotilla_proto::objects_server::ObjectsServer;
use flotilla_proto::pods_server::PodsServer;
use flotilla_proto::raft_server::RaftServer;
use flotilla_proto::JoinRequest;
use flotilla_raft::network::MAX_MESSAGE_BYTES;
use flotilla_raft::{ClusterNode, Command, Replica, ReplicaConfig};
use flotilla_runtime::ContainerRuntime;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::api::limits::{
    ClearDecodeErrors, PrefaceDeadline, WriteRateLimit, HTTP2_KEEPALIVE_INTERVAL,
    HTTP2_KEEPALIVE_TIMEOUT, PREFACE_TIMEOUT,
};
use crate::api::{ClusterService, ObjectsService, PodsService};
use crate::membership;

/// The largest client request a node accepts (objects are limited to 1.5 MiB on their own).
pub const MAX_REQUEST_BYTES: usize = 4 * 1024 * 1024;

/// How a node starts.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub name: String,
    /// With `init`: the new cluster's id (default: random).
    pub cluster_id: Option<String>,
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub advertise: String,
    pub init: bool,
    pub join: Option<String>,
    pub target_voters: usize,
    pub replica: ReplicaConfig,
    /// Time allowed for in-flight requests after a shutdown signal.
    pub shutdown_grace: Duration,
    /// With `init`: the `/16` node pod subnets are carved from.
    pub cluster_cidr: String,
    /// The node agent's settings; `None` runs no pods on this node.
    pub agent: Option<crate::agent::AgentConfig>,
    /// The service proxy's settings; it runs only with the agent (`None`: no proxy).
    pub proxy: Option<crate::proxy::ProxyConfig>,
    /// The cluster DNS server's settings; it runs only with the agent (`None`: no DNS server).
    pub dns: Option<crate::dns::DnsConfig>,
    /// Writes per client through the Objects API.
    pub write_rate_limit: WriteRateLimit,
}

/// Who this node is; written once, read on every restart.
#[derive(Debug, Serialize, Deserialize)]
struct Identity {
    node_id: u64,
    name: String,
}

fn identity_path(data_dir: &Path) -> PathBuf {
    data_dir.join("identity.json")
}

fn read_identity(data_dir: &Path) -> anyhow::Result<Option<Identity>> {
    let path = identity_path(data_dir);
    match std::fs::read(&path) {
        Ok(bytes) => Ok(Some(
            serde_json::from_slice(&bytes).with_context(|| format!("parse {}", path.display()))?,
        )),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(error) => Err(error).with_context(|| format!("read {}", path.display())),
    }
}

fn write_identity(data_dir: &Path, identity: &Identity) -> anyhow::Result<()> {
    let path = identity_path(data_dir);
    let temporary = path.with_extension("tmp");
    std::fs::write(&temporary, serde_json::to_vec_pretty(identity)?)
        .context("write node identity")?;
    std::fs::File::open(&temporary)?
        .sync_all()
        .context("sync node identity")?;
    std::fs::rename(&temporary, &path).context("install node identity")
}

/// Asks the cluster at `address` for a node id, retrying while it is unreachable.
async fn join_cluster(address: &str, name: &str, advertise: &str) -> anyhow::Result<u64> {
    let mut last_error = String::new();
    for _attempt in 0..60 {
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
            .with_context(|| format!("parse join address {address:?}"))?
            .connect_timeout(Duration::from_secs(1));
        match endpoint.connect().await {
            Ok(channel) => {
                let reply = ClusterClient::new(channel)
                    .join(JoinRequest {
                        name: name.to_string(),
                        address: advertise.to_string(),
                    })
                    .await;
                match reply {
                    Ok(reply) => return Ok(reply.into_inner().node_id),
                    Err(status) if status.code() == tonic::Code::Unavailable => {
                        last_error = status.message().to_string()
                    }
                    Err(status) => {
                        bail!("join the cluster through {address}: {}", status.message())
                    }
                }
            }
            Err(error) => last_error = error.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    bail!("join the cluster through {address}: {last_error}")
}

fn new_namespace(name: &str) -> serde_json::Value {
    json!({
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {
            "name": name,
            "uid": uuid::Uuid::new_v4().to_string(),
            "creationTimestamp": crate::api::now_rfc3339(),
        },
        "status": {"phase": "Active"}
    })
}

/// Starts a new cluster with this node as its only voter and writes the built-in objects.
async fn bootstrap(replica: &Replica, options: &ServeOptions) -> anyhow::Result<()> {
    let members = BTreeMap::from([(
        replica.node_id(),
        ClusterNode {
            name: options.name.clone(),
            address: options.advertise.clone(),
        },
    )]);
    if let Err(error) = replica.raft().initialize(members).await {
        // Already initialized by an earlier start that stopped before writing its identity.
        tracing::info!(%error, "cluster already initialized");
    }
    replica
        .write(Command::Bootstrap {
            cluster_id: options
                .cluster_id
                .clone()
                .unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
            node_name: options.name.clone(),
            node_address: options.advertise.clone(),
            namespaces: vec![new_namespace("default"), new_namespace("kube-system")],
            cluster_cidr: options.cluster_cidr.clone(),
        })
        .await
        .context("write the cluster's first objects")?;
    Ok(())
}

async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::warn!(%error, "listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate => {}
    }
}

/// Runs the node until a shutdown signal.
pub async fn serve(options: ServeOptions) -> anyhow::Result<()> {
    std::fs::create_dir_all(&options.data_dir)
        .with_context(|| format!("create data dir {}", options.data_dir.display()))?;
    let (node_id, fresh_init) = match read_identity(&options.data_dir)? {
        Some(identity) => {
            if identity.name != options.name {
                bail!(
                    "data dir {} belongs to node {:?}, not {:?}",
                    options.data_dir.display(),
                    identity.name,
                    options.name
                );
            }
            tracing::info!(node_id = identity.node_id, "restarting with the identity in the data dir");
            (identity.node_id, false)
        }
        None if options.init => (1, true),
        None => match &options.join {
            Some(address) => {
                let node_id = join_cluster(address, &options.name, &options.advertise).await?;
                write_identity(&options.data_dir, &Identity { node_id, name: options.name.clone() })?;
                (node_id, false)
            }
            None => bail!(
                "data dir {} holds no node: pass --init to start a cluster or --join HOST:PORT to join one",
                options.data_dir.display()
            ),
        },
    };

    let (replica, raft_service) = Replica::open(node_id, &options.data_dir, &options.replica)
        .await
        .context("open the replicated store")?;
    let shutdown = CancellationToken::new();

    // The runtime is connected before the server starts: the Pods service needs it.
    let runtime: Option<Arc<dyn ContainerRuntime>> = match &options.agent {
        Some(_) => Some(Arc::new(
            flotilla_runtime::docker::DockerRuntime::connect()
                .await
                .context("connect to the Docker daemon (use --no-agent to run without pods)")?,
        )),
        None => None,
    };
    let listener = tokio::net::TcpListener::bind(options.listen)
        .await
        .with_context(|| format!("listen on {}", options.listen))?;
    // tonic's tcp_nodelay applies only to listeners it binds itself: without it on accepted
    // streams, small replies wait for delayed ACKs (about 40 ms each).
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener).map(|stream| {
        stream.map(|stream| {
            if let Err(error) = stream.set_nodelay(true) {
                tracing::debug!(%error, "set TCP_NODELAY");
            }
            PrefaceDeadline::new(stream, PREFACE_TIMEOUT)
        })
    });
    let objects = ClearDecodeErrors::new(
        ObjectsServer::new(ObjectsService::new(
            replica.clone(),
            options.write_rate_limit,
        ))
        .max_decoding_message_size(MAX_REQUEST_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES),
    );
    let cluster = ClearDecodeErrors::new(ClusterServer::new(ClusterService::new(
        replica.clone(),
        options.replica.election_timeout_max_ms,
    )));
    let pods = ClearDecodeErrors::new(PodsServer::new(PodsService::new(
        replica.clone(),
        options.name.clone(),
        runtime.clone(),
    )));
    let raft = RaftServer::new(raft_service)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let server_shutdown = shutdown.clone();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .tcp_nodelay(true)
            .http2_keepalive_interval(Some(HTTP2_KEEPALIVE_INTERVAL))
            .http2_keepalive_timeout(Some(HTTP2_KEEPALIVE_TIMEOUT))
            .add_service(objects)
            .add_service(cluster)
            .add_service(pods)
            .add_service(raft)
            .serve_with_incoming_shutdown(
                incoming,
                async move { server_shutdown.cancelled().await },
            ),
    );
    tracing::info!(name = %options.name, node_id, listen = %options.listen, "node serving");

    if fresh_init {
        bootstrap(&replica, &options).await?;
        write_identity(
            &options.data_dir,
            &Identity {
                node_id,
                name: options.name.clone(),
            },
        )?;
        tracing::info!("cluster initialized");
    }

    let agent = match (options.agent.clone(), runtime) {
        (Some(config), Some(runtime)) => Some(tokio::spawn(crate::agent::run(
            replica.clone(),
            runtime,
            config,
            shutdown.clone(),
        ))),
        _ => None,
    };

    let proxy = match (&agent, options.proxy.clone()) {
        (Some(_), Some(config)) => Some(tokio::spawn(crate::proxy::run(
            replica.clone(),
            config,
            shutdown.clone(),
        ))),
        _ => None,
    };

    let dns = match (&agent, options.dns.clone()) {
        (Some(_), Some(config)) => Some(tokio::spawn(crate::dns::run(
            replica.clone(),
            config,
            shutdown.clone(),
        ))),
        _ => None,
    };

    let control = tokio::spawn(crate::control::run(
        replica.clone(),
        crate::control::ControlConfig {
            node_name: options.name.clone(),
            ..Default::default()
        },
        shutdown.clone(),
    ));

    let manager = tokio::spawn(membership::run_manager(
        replica.clone(),
        options.target_voters,
        options.replica.election_timeout_max_ms,
        shutdown.clone(),
    ));

    tokio::select! {
        _ = shutdown_signal() => tracing::info!("shutdown signal received"),
        result = server => {
            match result {
                Ok(Ok(())) => tracing::info!("server stopped"),
                Ok(Err(error)) => tracing::error!(%error, "server failed"),
                Err(error) => tracing::error!(%error, "server task failed"),
            }
        }
    }
    shutdown.cancel();
    let drain = async {
        let _ = manager.await;
        let _ = control.await;
        if let Some(agent) = agent {
            let _ = agent.await;
        }
        if let Some(proxy) = proxy {
            let _ = proxy.await;
        }
        if let Some(dns) = dns {
            let _ = dns.await;
        }
        if let Err(error) = replica.raft().shutdown().await {
            tracing::warn!(%error, "stop Raft");
        }
    };
    if tokio::time::timeout(options.shutdown_grace, drain)
        .await
        .is_err()
    {
        tracing::warn!("shutdown grace period ran out");
    }
    Ok(())
}
