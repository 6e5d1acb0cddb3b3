//! `flotilla serve`: one node. Opens (or creates) its identity, root key and store, starts Raft
//! and the gRPC server, starts or joins the cluster, runs the membership manager, and drains on
//! SIGINT/SIGTERM.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use flotilla_pki::authority::NODE_CERTIFICATE_LIFETIME;
use flotilla_pki::transport::GRPC_ALPN;
use flotilla_pki::{Authority, JoinToken, Subject, TlsState};
use flotilla_proto::cluster_client::ClusterClient;
use flotilla_proto::cluster_server::ClusterServer;
use flotilla_proto::objects_server::ObjectsServer;
use flotilla_proto::pods_server::PodsServer;
use flotilla_proto::raft_server::RaftServer;
use flotilla_proto::{JoinReply, JoinRequest};
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
use crate::encryption::{Keyring, RootKey};
use crate::membership;
use crate::security::audit::AuditLog;
use crate::security::authn::{api_interceptor, nodes_only};
use crate::security::authority::AuthorityRecord;
use crate::security::node_files::NodeFiles;
use crate::security::users::{Role, UserRecord};
use crate::security::NodeSecurity;
use flotilla_pki::credentials::CredentialsFile;
use tonic::service::interceptor::InterceptedService;

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
    /// With `join`: the join token (`flotilla cluster join-token`).
    pub token: Option<String>,
    /// With `init`: where the first admin's credentials file is written (default
    /// `<data_dir>/admin.json`).
    pub admin_config: Option<PathBuf>,
    /// Writes per client through the Objects API.
    pub write_rate_limit: WriteRateLimit,
    /// How long a node may stay silent before the leader replaces its pods.
    pub node_grace_ms: i64,
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

/// Asks the cluster at `address` to take this node in, retrying while it is unreachable. The
/// cluster is trusted only if its CA is the one the token names; the reply carries the node's
/// id, certificate and key, the trusted CAs and the root key.
async fn join_cluster(
    address: &str,
    name: &str,
    advertise: &str,
    token: &JoinToken,
) -> anyhow::Result<JoinReply> {
    let config = Arc::new(
        flotilla_pki::tls::join_client_config(token.authority, &[GRPC_ALPN])
            .context("set up TLS for joining")?,
    );
    let mut last_error = String::new();
    for _attempt in 0..60 {
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
            .with_context(|| format!("parse join address {address:?}"))?
            .connect_timeout(Duration::from_secs(1));
        match flotilla_pki::transport::connect(&endpoint, config.clone()).await {
            Ok(channel) => {
                let reply = ClusterClient::new(channel)
                    .join(JoinRequest {
                        name: name.to_string(),
                        address: advertise.to_string(),
                        token_secret: token.secret.clone(),
                    })
                    .await;
                match reply {
                    Ok(reply) => return Ok(reply.into_inner()),
                    Err(status) if status.code() == tonic::Code::Unavailable => {
                        last_error = status.message().to_string()
                    }
                    Err(status) => {
                        bail!("join the cluster through {address}: {}", status.message())
                    }
                }
            }
            Err(error) => {
                last_error = describe_error(&error);
                if last_error.contains("join token names") {
                    bail!("join the cluster through {address}: {last_error}");
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    bail!("join the cluster through {address}: {last_error}")
}

/// An error and its sources, one after the other.
pub(crate) fn describe_error(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        message = format!("{message}: {cause}");
        source = cause.source();
    }
    message
}

/// The security material of a node starting for the first time as a cluster's first node: a
/// root key, a CA, this node's certificate.
fn initial_security(
    data_dir: &Path,
    name: &str,
) -> anyhow::Result<(RootKey, AuthorityRecord, NodeFiles)> {
    let root_key = match RootKey::load(data_dir)? {
        Some(key) => key,
        None => {
            let key = RootKey::generate();
            key.store(data_dir)?;
            key
        }
    };
    let now = std::time::SystemTime::now();
    let authority = Authority::generate("flotilla CA", now).context("create the cluster CA")?;
    let issued = authority
        .issue(
            &Subject::Node(name.to_string()),
            now,
            NODE_CERTIFICATE_LIFETIME,
        )
        .context("issue this node's certificate")?;
    let record = AuthorityRecord::new(authority);
    let files = NodeFiles {
        chain_pem: issued.chain_pem,
        key_pem: issued.key_pem,
        authorities_pem: record.trusted_pem(),
    };
    files.write(data_dir)?;
    Ok((root_key, record, files))
}

/// Writes the CA record (unless an earlier start did) and the first admin: its user record and
/// its credentials file.
async fn bootstrap_security(
    replica: &Replica,
    options: &ServeOptions,
    root_key: &RootKey,
    record: &AuthorityRecord,
) -> anyhow::Result<PathBuf> {
    let record = match crate::security::read_authority_record(replica, root_key)? {
        Some((stored, _)) => stored,
        None => {
            crate::security::write_authority_record(replica, root_key, record, None).await?;
            record.clone()
        }
    };
    let issued = record
        .signing_authority()?
        .issue(
            &Subject::User("admin".into()),
            std::time::SystemTime::now(),
            flotilla_pki::authority::USER_CERTIFICATE_LIFETIME,
        )
        .context("issue the admin's certificate")?;
    let certificate = flotilla_pki::authority::certificate_from_pem(&issued.cert_pem)?;
    let user = UserRecord {
        name: "admin".into(),
        role: Role::Admin,
        namespace: None,
        certificate: flotilla_pki::Fingerprint::of(&certificate).hex(),
    };
    replica
        .write(Command::Apply {
            object: crate::api::with_new_identity(user.to_object()).into(),
        })
        .await
        .context("write the admin user")?;
    let path = options
        .admin_config
        .clone()
        .unwrap_or_else(|| options.data_dir.join("admin.json"));
    CredentialsFile {
        cluster_id: replica.reader().registry()?.cluster_id,
        user: "admin".into(),
        servers: vec![options.advertise.clone()],
        certificate_authorities: record.trusted_pem(),
        certificate: issued.cert_pem,
        key: issued.key_pem,
    }
    .write(&path)?;
    Ok(path)
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

/// The root key of a node that has an identity: it must be in the data dir.
fn existing_root_key(data_dir: &Path) -> anyhow::Result<RootKey> {
    RootKey::load(data_dir)?.with_context(|| {
        format!(
            "data dir {} has a node identity but no root key (keys/root.key); copy it from \
             another node's data dir (every node has the same one)",
            data_dir.display()
        )
    })
}

/// Runs the node until a shutdown signal.
pub async fn serve(options: ServeOptions) -> anyhow::Result<()> {
    std::fs::create_dir_all(&options.data_dir)
        .with_context(|| format!("create data dir {}", options.data_dir.display()))?;
    let (node_id, initial_record) = match read_identity(&options.data_dir)? {
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
            (identity.node_id, None)
        }
        None if options.init => {
            let (_, record, _) = initial_security(&options.data_dir, &options.name)?;
            (1, Some(record))
        }
        None => match &options.join {
            Some(address) => {
                let token: JoinToken = options
                    .token
                    .as_deref()
                    .context("--join needs --token: `flotilla cluster join-token` on a member prints it")?
                    .parse()?;
                let reply = join_cluster(address, &options.name, &options.advertise, &token).await?;
                RootKey::from_bytes(&reply.root_key)
                    .context("read the root key the cluster sent")?
                    .store(&options.data_dir)?;
                NodeFiles {
                    chain_pem: reply.certificate_chain_pem,
                    key_pem: reply.key_pem,
                    authorities_pem: reply.authorities_pem,
                }
                .write(&options.data_dir)?;
                write_identity(&options.data_dir, &Identity { node_id: reply.node_id, name: options.name.clone() })?;
                (reply.node_id, None)
            }
            None => bail!(
                "data dir {} holds no node: pass --init to start a cluster or --join HOST:PORT --token TOKEN to join one",
                options.data_dir.display()
            ),
        },
    };
    let root_key = existing_root_key(&options.data_dir)?;
    let files = NodeFiles::read(&options.data_dir)?.with_context(|| {
        format!(
            "data dir {} has no node certificate (tls/)",
            options.data_dir.display()
        )
    })?;
    let tls = TlsState::new(files.authorities()?, Some(files.credentials()?))
        .context("load this node's TLS credentials")?;
    let peer_tls = Arc::new(tls.client_config(&[GRPC_ALPN])?);
    let server_tls = Arc::new(tls.server_config(false, &[GRPC_ALPN])?);

    let (replica, raft_service) =
        Replica::open(node_id, &options.data_dir, &options.replica, peer_tls)
            .await
            .context("open the replicated store")?;
    let keyring = Keyring::new(root_key, replica.clone());
    let shutdown = CancellationToken::new();
    let security = Arc::new(NodeSecurity {
        node_name: options.name.clone(),
        data_dir: options.data_dir.clone(),
        keyring: keyring.clone(),
        tls,
        audit: AuditLog::start(&options.data_dir, shutdown.clone()),
    });

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
    // Every connection is mutual TLS; TCP_NODELAY is set on accepted streams (small replies
    // would otherwise wait for delayed ACKs); a handshake that does not finish in 10 s is
    // dropped.
    // After the handshake, a client that does not send the HTTP/2 preface in time is hung up on.
    let incoming = flotilla_pki::transport::incoming(listener, server_tls)
        .map(|connection| connection.map(|c| PrefaceDeadline::new(c, PREFACE_TIMEOUT)));
    let objects = InterceptedService::new(
        ClearDecodeErrors::new(
            ObjectsServer::new(ObjectsService::new(
                replica.clone(),
                keyring.clone(),
                security.audit.clone(),
                options.write_rate_limit,
            ))
            .max_decoding_message_size(MAX_REQUEST_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES),
        ),
        api_interceptor(replica.clone()),
    );
    // Join is served to callers without a certificate; every other call authenticates.
    let cluster = ClearDecodeErrors::new(ClusterServer::new(ClusterService::new(
        replica.clone(),
        options.replica.election_timeout_max_ms,
        security.clone(),
        keyring.clone(),
    )));
    let pods = InterceptedService::new(
        ClearDecodeErrors::new(PodsServer::new(PodsService::new(
            replica.clone(),
            options.name.clone(),
            runtime.clone(),
        ))),
        api_interceptor(replica.clone()),
    );
    let raft = InterceptedService::new(
        RaftServer::new(raft_service)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES),
        nodes_only,
    );
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

    if let Some(record) = &initial_record {
        bootstrap(&replica, &options).await?;
        let admin_config =
            bootstrap_security(&replica, &options, keyring.root_key(), record).await?;
        tracing::info!(path = %admin_config.display(), "wrote the admin's credentials");
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
            keyring.clone(),
            shutdown.clone(),
        ))),
        _ => None,
    };

    let proxy = match (&agent, options.proxy.clone()) {
        (Some(_), Some(config)) => Some(tokio::spawn(crate::proxy::run(
            replica.clone(),
            config,
            security.tls.clone(),
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

    let certificates = tokio::spawn(crate::security::certificates::run(
        replica.clone(),
        security.clone(),
        shutdown.clone(),
    ));

    let control = tokio::spawn(crate::control::run(
        replica.clone(),
        crate::control::ControlConfig {
            node_name: options.name.clone(),
            node_grace_ms: options.node_grace_ms,
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
        let _ = certificates.await;
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
