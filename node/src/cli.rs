//! The command line: `serve` runs a node; every other command is a client of any node.

mod client;
mod expose;
pub mod local;
mod manifest;
pub mod output;
mod workloads;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use clap::{Args, Parser, Subcommand, ValueEnum};
use flotilla_proto::{
    CreateUserRequest, DeleteRequest, ExecRequest, GetRequest, JoinTokenRequest, ListRequest,
    LogsRequest, ObjectRequest, RemoveRequest, RevokeUserRequest, RotateCaRequest,
    RotateEncryptionKeyRequest, StatusRequest, WatchRequest,
};
use flotilla_raft::{kinds, ReplicaConfig};
use serde_json::Value;
use tokio_stream::StreamExt;

use crate::api::limits::WriteRateLimit;
use crate::api::ClusterStatus;
use crate::serve::{serve, ServeOptions};
pub use client::Target;
use client::{status_error, Client};
use flotilla_pki::credentials::CredentialsFile;

/// Flotilla: a container orchestrator with no master. Every node runs this binary.
#[derive(Debug, Parser)]
#[command(name = "flotilla", version, about)]
pub struct Cli {
    #[command(flatten)]
    pub target: Target,
    /// Log output format of `serve`.
    #[arg(long, global = true, value_enum, default_value = "human")]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Human,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a node.
    Serve(Box<ServeArgs>),
    /// Create or update objects from manifests.
    Apply {
        /// File, directory or - for stdin; repeatable.
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<String>,
    },
    /// List objects of a kind, or get one.
    Get(GetArgs),
    /// Delete an object by kind and name, or the objects of manifests.
    Delete {
        kind: Option<String>,
        name: Option<String>,
        #[arg(short = 'n', long)]
        namespace: Option<String>,
        #[arg(short = 'f', long = "filename")]
        files: Vec<String>,
        /// background (dependents are deleted after the owner) or orphan (they are kept).
        #[arg(long, default_value = "background")]
        cascade: String,
    },
    /// Show one object in detail.
    Describe {
        kind: String,
        name: String,
        #[arg(short = 'n', long)]
        namespace: Option<String>,
    },
    /// Set the replicas of a Deployment, ReplicaSet or StatefulSet.
    Scale {
        /// KIND/NAME, e.g. deploy/web.
        target: String,
        #[arg(long)]
        replicas: i64,
        #[arg(short = 'n', long, default_value = "default")]
        namespace: String,
    },
    /// Create a Service for the pods of a Deployment, ReplicaSet, StatefulSet, Pod or Service.
    Expose {
        /// KIND/NAME, e.g. deploy/web.
        target: String,
        /// The Service port (default: the containers' declared ports).
        #[arg(long)]
        port: Option<u16>,
        /// The pods' port, a number or a container port name (default: the port).
        #[arg(long)]
        target_port: Option<String>,
        /// ClusterIP, NodePort or LoadBalancer.
        #[arg(long = "type")]
        service_type: Option<String>,
        /// TCP, UDP or SCTP.
        #[arg(long)]
        protocol: Option<String>,
        /// The Service's name (default: the exposed object's).
        #[arg(long)]
        name: Option<String>,
        /// An explicit cluster IP, or None for a headless Service.
        #[arg(long)]
        cluster_ip: Option<String>,
        /// key=value,... to select the pods by instead of the object's selector.
        #[arg(short = 'l', long)]
        selector: Option<String>,
        #[arg(short = 'n', long, default_value = "default")]
        namespace: String,
    },
    /// Change a field of a workload's pod template.
    Set {
        #[command(subcommand)]
        command: SetCommand,
    },
    /// Manage the rollout of a Deployment.
    Rollout {
        #[command(subcommand)]
        command: RolloutCommand,
    },
    /// Mark a node unschedulable.
    Cordon { node: String },
    /// Mark a node schedulable again.
    Uncordon { node: String },
    /// Cordon a node and evict its pods (their owners recreate them elsewhere).
    Drain { node: String },
    /// Print a container's logs, through any node.
    Logs {
        pod: String,
        #[arg(short = 'c', long)]
        container: Option<String>,
        #[arg(short = 'n', long)]
        namespace: Option<String>,
        /// The previous (terminated) instance of the container.
        #[arg(short = 'p', long)]
        previous: bool,
        /// Keep printing new output.
        #[arg(short = 'f', long)]
        follow: bool,
        /// Only the last N lines.
        #[arg(long)]
        tail: Option<i64>,
    },
    /// Run a command in a container, through any node; exits with the command's exit code.
    Exec {
        pod: String,
        #[arg(short = 'c', long)]
        container: Option<String>,
        #[arg(short = 'n', long)]
        namespace: Option<String>,
        /// Pass stdin to the command (read to its end first).
        #[arg(short = 'i', long)]
        stdin: bool,
        /// Run the command on a terminal.
        #[arg(short = 't', long)]
        tty: bool,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// A multi-node cluster of containers on this host, and faults on demand.
    Local {
        #[command(subcommand)]
        command: local::LocalCommand,
    },
    /// Cluster status and membership, join tokens, CA rotation.
    Cluster {
        #[command(subcommand)]
        command: ClusterCommand,
    },
    /// Users and their credentials.
    Auth {
        #[command(subcommand)]
        command: AuthCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum SetCommand {
    /// `flotilla set image deploy/NAME CONTAINER=IMAGE...`
    Image {
        target: String,
        #[arg(required = true)]
        assignments: Vec<String>,
        #[arg(short = 'n', long, default_value = "default")]
        namespace: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum RolloutCommand {
    /// Show the rollout's progress until it completes; non-zero exit if it failed.
    Status {
        target: String,
        #[arg(short = 'n', long, default_value = "default")]
        namespace: String,
        #[arg(long, default_value_t = 600)]
        timeout_seconds: u64,
    },
    /// List the revisions.
    History {
        target: String,
        #[arg(short = 'n', long, default_value = "default")]
        namespace: String,
    },
    /// Roll back to the previous revision, or to --to-revision.
    Undo {
        target: String,
        #[arg(short = 'n', long, default_value = "default")]
        namespace: String,
        #[arg(long)]
        to_revision: Option<u64>,
    },
    Pause {
        target: String,
        #[arg(short = 'n', long, default_value = "default")]
        namespace: String,
    },
    Resume {
        target: String,
        #[arg(short = 'n', long, default_value = "default")]
        namespace: String,
    },
    /// Restart every pod through a rollout.
    Restart {
        target: String,
        #[arg(short = 'n', long, default_value = "default")]
        namespace: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Leader, term, commit index and every member's role and health.
    Status {
        #[arg(short = 'o', long)]
        output: Option<String>,
    },
    /// Remove a node from the cluster; a healthy learner takes a removed voter's place.
    Remove { node: String },
    /// Make a new data key current, re-encrypt every Secret with it and drop the old keys.
    RotateEncryptionKey,
    /// Print the token a new node joins with (`serve --join HOST:PORT --token TOKEN`).
    JoinToken {
        /// Replace the token first; the old one is refused from then on.
        #[arg(long)]
        rotate: bool,
    },
    /// Move the cluster to a new CA without downtime (old and new trusted during the move);
    /// rewrites this CLI's credentials file with a certificate from the new CA. Other users
    /// need new credentials afterwards (`auth create-user`).
    RotateCa,
}

#[derive(Debug, Subcommand)]
pub enum AuthCommand {
    /// Issue a user's credentials file (a new one replaces the user's earlier certificate).
    CreateUser {
        name: String,
        #[arg(long, value_parser = ["admin", "edit", "view"])]
        role: String,
        /// Bind the role to this namespace only (default: cluster-wide).
        #[arg(short = 'n', long)]
        namespace: Option<String>,
        /// Write the credentials file here (default: print it).
        #[arg(short = 'o', long)]
        output: Option<PathBuf>,
    },
    /// Revoke a user: their certificate is refused from now on.
    Revoke { name: String },
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// This node's unique name.
    #[arg(long)]
    pub name: String,
    /// Where the node keeps its identity, Raft log and state (RocksDB).
    #[arg(long)]
    pub data_dir: PathBuf,
    /// Address of the gRPC server (clients and peers).
    #[arg(long, default_value = "127.0.0.1:7070")]
    pub listen: std::net::SocketAddr,
    /// Address peers and clients use to reach this node (default: --listen).
    #[arg(long)]
    pub advertise: Option<String>,
    /// Start a new cluster with this node.
    #[arg(long, conflicts_with = "join")]
    pub init: bool,
    /// Join the cluster through any member.
    #[arg(long, requires = "token")]
    pub join: Option<String>,
    /// With --join: the join token (`flotilla cluster join-token` on a member prints it).
    #[arg(long, env = "FLOTILLA_JOIN_TOKEN")]
    pub token: Option<String>,
    /// With --init: where to write the first admin's credentials file (default:
    /// <data-dir>/admin.json).
    #[arg(long)]
    pub admin_config: Option<PathBuf>,
    /// How many voters the cluster keeps (3 or 5); further nodes are learners.
    #[arg(long, default_value_t = 3, value_parser = parse_voters)]
    pub voters: usize,
    #[arg(long, default_value_t = ReplicaConfig::default().heartbeat_interval_ms)]
    pub heartbeat_interval_ms: u64,
    #[arg(long, default_value_t = ReplicaConfig::default().election_timeout_min_ms)]
    pub election_timeout_min_ms: u64,
    #[arg(long, default_value_t = ReplicaConfig::default().election_timeout_max_ms)]
    pub election_timeout_max_ms: u64,
    /// Build a snapshot (and allow purging the log) after this many entries.
    #[arg(long, default_value_t = ReplicaConfig::default().snapshot_every_entries)]
    pub snapshot_every_entries: u64,
    /// Log entries kept behind the last snapshot.
    #[arg(long, default_value_t = ReplicaConfig::default().log_entries_kept_after_snapshot)]
    pub log_entries_kept_after_snapshot: u64,
    /// With --init: the IPv4 /16 each node's /24 pod subnet comes from.
    #[arg(long, default_value = flotilla_raft::store::DEFAULT_CLUSTER_CIDR)]
    pub cluster_cidr: String,
    /// Run no pods on this node (no node agent, no Docker): API and Raft only.
    #[arg(long)]
    pub no_agent: bool,
    /// The node's address as pods and other nodes see it (default: the host of --advertise).
    #[arg(long)]
    pub node_ip: Option<String>,
    /// How often the agent sends the node's heartbeat to the leader (kept in the leader's
    /// memory; the node's status goes through Raft only when it changes, or every minute).
    #[arg(long, default_value_t = 500)]
    pub heartbeat_ms: u64,
    /// While leading: how long a node may stay silent (no heartbeat) before it is marked
    /// Ready=Unknown, tainted unreachable, and its pods are replaced elsewhere.
    #[arg(long, default_value_t = crate::control::ControlConfig::default().node_grace_ms)]
    pub node_grace_ms: i64,
    /// The first restart back-off of a crashing container; it doubles up to 5 minutes.
    #[arg(long, default_value_t = 10_000)]
    pub crash_backoff_base_ms: i64,
    /// The image pod sandboxes run (it must have `sleep`).
    #[arg(long, default_value = "flotilla/busybox:latest")]
    pub sandbox_image: String,
    /// Keep the pod network's gateway off the host bridge (the node runs in a container that
    /// holds the gateway address and routes other nodes' pod subnets).
    #[arg(long)]
    pub pod_gateway_in_node: bool,
    /// The pod subnet (a /24 inside --cluster-cidr) this node asks for when it first registers.
    #[arg(long)]
    pub pod_cidr: Option<String>,
    /// The Docker network this node's pods join (made by whoever passes it, e.g. `local up`);
    /// with --pod-bridge, the name of the host bridge.
    #[arg(long)]
    pub pod_network: Option<String>,
    /// Wire pods to a Linux bridge of this host (veth pairs, addresses handed out by this
    /// node, as the CNI `bridge` plugin does for the kubelet) rather than a Docker network: no
    /// Docker network setup (embedded DNS server and its rules) in each pod, so pods start
    /// faster. The default wherever it can work (root in the host's PID namespace, `ip`,
    /// `nsenter` and `iptables`, a local engine, neither --pod-network nor
    /// --pod-gateway-in-node); this flag makes it required. A pod of one container needing no
    /// sandbox may start its process a few milliseconds before its `eth0` is up.
    #[arg(long, conflicts_with = "pod_gateway_in_node")]
    pub pod_bridge: bool,
    /// Put pods on a Docker network of this node (made by the agent unless --pod-network
    /// names one) even where they could be wired to a host bridge.
    #[arg(long, conflicts_with = "pod_bridge")]
    pub docker_pod_network: bool,
    /// With --init: the cluster's id (default: a new random one). Labels carry it.
    #[arg(long, requires = "init")]
    pub cluster_id: Option<String>,
    /// Run no service proxy on this node (it runs with the agent otherwise).
    #[arg(long)]
    pub no_proxy: bool,
    /// UDP port of the service proxy's QUIC tunnels between nodes (the same on every node).
    #[arg(long, default_value_t = crate::proxy::DEFAULT_PROXY_PORT)]
    pub proxy_port: u16,
    /// TCP port of the Ingress listener, run by the service proxy on every address of the
    /// node (only the node's address when it shares its host's network namespace); 0: none.
    #[arg(long, default_value_t = crate::proxy::DEFAULT_INGRESS_PORT)]
    pub ingress_port: u16,
    /// Port of the cluster DNS server on the pod gateway address, UDP and TCP (runs with the
    /// agent); pods use it as their resolver only on 53. 0: no DNS server.
    #[arg(long, default_value_t = crate::dns::DEFAULT_DNS_PORT)]
    pub dns_port: u16,
    /// Writes per second each client (by address) may make through the API; beyond, writes
    /// are refused with ResourceExhausted. 0: no limit.
    #[arg(long, default_value_t = WriteRateLimit::default().per_second)]
    pub write_rate_limit_per_second: u32,
    /// Writes a client may make at once before the per-second rate applies.
    #[arg(long, default_value_t = WriteRateLimit::default().burst)]
    pub write_burst: u32,
}

#[derive(Debug, Args)]
pub struct GetArgs {
    kind: String,
    name: Option<String>,
    #[arg(short = 'n', long)]
    namespace: Option<String>,
    #[arg(short = 'A', long)]
    all_namespaces: bool,
    #[arg(short = 'l', long)]
    selector: Option<String>,
    #[arg(long)]
    field_selector: Option<String>,
    /// wide, yaml or json.
    #[arg(short = 'o', long)]
    output: Option<String>,
    /// After listing, print changes as they happen.
    #[arg(short = 'w', long)]
    watch: bool,
    /// Read this node's state without confirming with the leader.
    #[arg(long)]
    local: bool,
}

fn parse_voters(text: &str) -> Result<usize, String> {
    match text {
        "1" => Ok(1),
        "3" => Ok(3),
        "5" => Ok(5),
        _ => Err(format!("{text:?} voters: a cluster keeps 1, 3 or 5 voters")),
    }
}

fn kind_of(name: &str) -> anyhow::Result<&'static kinds::KindInfo> {
    kinds::lookup(name).ok_or_else(|| {
        anyhow!(
            "unknown kind {name:?} (known: {})",
            kinds::KINDS
                .iter()
                .map(|k| k.plural)
                .collect::<Vec<_>>()
                .join(", ")
        )
    })
}

fn decode(bytes: &[u8]) -> anyhow::Result<Value> {
    serde_json::from_slice(bytes).context("decode the server's reply")
}

fn object_name(info: &kinds::KindInfo, object: &Value) -> String {
    format!(
        "{}/{}",
        info.kind.to_ascii_lowercase(),
        object
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or("")
    )
}

/// Runs a parsed command line.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => run_serve(*args).await,
        Command::Apply { files } => apply(&cli.target, &files).await,
        Command::Get(args) => get(&cli.target, args).await,
        Command::Delete {
            kind,
            name,
            namespace,
            files,
            cascade,
        } => {
            if !matches!(cascade.as_str(), "background" | "orphan") {
                bail!("--cascade must be background or orphan");
            }
            delete(
                &cli.target,
                kind,
                name,
                namespace,
                &files,
                cascade == "orphan",
            )
            .await
        }
        Command::Expose {
            target,
            port,
            target_port,
            service_type,
            protocol,
            name,
            cluster_ip,
            selector,
            namespace,
        } => {
            expose::expose(
                &mut Client::connect(&cli.target).await?.objects(),
                &target,
                &namespace,
                &expose::ExposeOptions {
                    name,
                    port,
                    target_port,
                    service_type,
                    protocol,
                    cluster_ip,
                    selector,
                },
            )
            .await
        }
        Command::Scale {
            target,
            replicas,
            namespace,
        } => {
            workloads::scale(
                &mut Client::connect(&cli.target).await?.objects(),
                &target,
                &namespace,
                replicas,
            )
            .await
        }
        Command::Set {
            command:
                SetCommand::Image {
                    target,
                    assignments,
                    namespace,
                },
        } => {
            workloads::set_image(
                &mut Client::connect(&cli.target).await?.objects(),
                &target,
                &namespace,
                &assignments,
            )
            .await
        }
        Command::Rollout { command } => rollout(&cli.target, command).await,
        Command::Cordon { node } => {
            workloads::cordon(
                &mut Client::connect(&cli.target).await?.objects(),
                &node,
                true,
            )
            .await
        }
        Command::Uncordon { node } => {
            workloads::cordon(
                &mut Client::connect(&cli.target).await?.objects(),
                &node,
                false,
            )
            .await
        }
        Command::Drain { node } => {
            workloads::drain(&mut Client::connect(&cli.target).await?.objects(), &node).await
        }
        Command::Describe {
            kind,
            name,
            namespace,
        } => describe(&cli.target, &kind, &name, namespace).await,
        Command::Local { command } => local::run(command).await,
        Command::Cluster { command } => cluster(&cli.target, command).await,
        Command::Auth { command } => auth(&cli.target, command).await,
        Command::Logs {
            pod,
            container,
            namespace,
            previous,
            follow,
            tail,
        } => {
            let request = LogsRequest {
                namespace: namespace.unwrap_or_default(),
                pod,
                container: container.unwrap_or_default(),
                previous,
                follow,
                tail_lines: tail.unwrap_or(-1),
            };
            logs(&cli.target, request).await
        }
        Command::Exec {
            pod,
            container,
            namespace,
            stdin,
            tty,
            command,
        } => {
            // stdin is read to its end and sent with the command; output comes back when the
            // command ends (no live terminal session).
            let stdin_bytes = if stdin {
                let mut bytes = Vec::new();
                std::io::Read::read_to_end(&mut std::io::stdin(), &mut bytes)
                    .context("read stdin")?;
                bytes
            } else {
                Vec::new()
            };
            let request = ExecRequest {
                namespace: namespace.unwrap_or_default(),
                pod,
                container: container.unwrap_or_default(),
                command,
                timeout_seconds: 0,
                stdin_attached: stdin,
                stdin: stdin_bytes,
                tty,
            };
            let code = exec(&cli.target, request).await?;
            if code != 0 {
                std::process::exit(i32::try_from(code).unwrap_or(1));
            }
            Ok(())
        }
    }
}

/// Whether this node's pods are wired to a host bridge: when asked to, or by default where
/// that can work and no Docker network was asked for (see `--pod-bridge`).
fn pod_bridge(args: &ServeArgs) -> bool {
    if args.pod_bridge {
        return true;
    }
    if args.no_agent
        || args.docker_pod_network
        || args.pod_gateway_in_node
        || args.pod_network.is_some()
    {
        return false;
    }
    match flotilla_runtime::host_bridge::WiringHost::of_this_process().unusable_because() {
        None => {
            tracing::info!(
                "pods are wired to a host bridge (--docker-pod-network for a Docker network)"
            );
            true
        }
        Some(reason) => {
            tracing::info!(%reason, "pods go on a Docker network: a host bridge cannot be used");
            false
        }
    }
}

async fn run_serve(args: ServeArgs) -> anyhow::Result<()> {
    if args.election_timeout_min_ms <= args.heartbeat_interval_ms
        || args.election_timeout_max_ms <= args.election_timeout_min_ms
    {
        bail!("election timeouts must satisfy heartbeat < min < max");
    }
    let pod_bridge = pod_bridge(&args);
    let advertise = args.advertise.unwrap_or_else(|| args.listen.to_string());
    let host_ip = args.node_ip.clone().unwrap_or_else(|| {
        advertise
            .rsplit_once(':')
            .map(|(host, _)| host.trim_matches(['[', ']']).to_string())
            .unwrap_or_else(|| advertise.clone())
    });
    let proxy = (!args.no_agent && !args.no_proxy).then(|| crate::proxy::ProxyConfig {
        node_name: args.name.clone(),
        data_dir: args.data_dir.clone(),
        node_ip: host_ip.clone(),
        bind_cluster_ips: args.pod_gateway_in_node,
        port: args.proxy_port,
        ingress_port: args.ingress_port,
    });
    let dns = (!args.no_agent && args.dns_port != 0).then(|| crate::dns::DnsConfig {
        node_name: args.name.clone(),
        port: args.dns_port,
        resolv_conf: PathBuf::from("/etc/resolv.conf"),
    });
    let agent = (!args.no_agent).then(|| crate::agent::AgentConfig {
        node_name: args.name.clone(),
        data_dir: args.data_dir.clone(),
        secret_volumes_dir: crate::agent::default_secret_volumes_dir(&args.data_dir),
        host_ip,
        heartbeat_interval: Duration::from_millis(args.heartbeat_ms.max(100)),
        reconcile_interval: Duration::from_millis(500),
        backoff: crate::agent::plan::Backoff {
            base_ms: args.crash_backoff_base_ms.max(100),
            max_ms: 300_000,
        },
        sandbox_image: args.sandbox_image.clone(),
        inhibit_host_address: args.pod_gateway_in_node,
        pod_cidr: args.pod_cidr.clone(),
        pod_network: args.pod_network.clone(),
        pod_bridge,
        max_parallel_pods: 8,
        cluster_dns: args.dns_port == crate::dns::DEFAULT_DNS_PORT,
    });
    if let Some(id) = &args.cluster_id {
        let valid = !id.is_empty()
            && id.len() <= 63
            && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
        if !valid {
            bail!("--cluster-id {id:?}: use 1 to 63 letters, digits and '-'");
        }
    }
    if args.write_rate_limit_per_second > 0 && args.write_burst == 0 {
        bail!("--write-burst must be at least 1 (--write-rate-limit-per-second 0 for no limit)");
    }
    if flotilla_raft::store::cluster_cidr_prefix(&args.cluster_cidr).is_none() {
        bail!(
            "--cluster-cidr {:?} must be an IPv4 /16 like 10.244.0.0/16",
            args.cluster_cidr
        );
    }
    let options = ServeOptions {
        cluster_id: args.cluster_id.clone(),
        cluster_cidr: args.cluster_cidr.clone(),
        agent,
        proxy,
        dns,
        advertise,
        name: args.name,
        data_dir: args.data_dir,
        listen: args.listen,
        init: args.init,
        join: args.join,
        token: args.token,
        admin_config: args.admin_config,
        target_voters: args.voters,
        replica: ReplicaConfig {
            heartbeat_interval_ms: args.heartbeat_interval_ms,
            election_timeout_min_ms: args.election_timeout_min_ms,
            election_timeout_max_ms: args.election_timeout_max_ms,
            snapshot_every_entries: args.snapshot_every_entries,
            log_entries_kept_after_snapshot: args.log_entries_kept_after_snapshot,
            ..ReplicaConfig::default()
        },
        shutdown_grace: Duration::from_secs(10),
        node_grace_ms: args.node_grace_ms.max(1),
        write_rate_limit: WriteRateLimit {
            per_second: args.write_rate_limit_per_second,
            burst: args.write_burst,
        },
    };
    serve(options).await
}

async fn apply(target: &Target, files: &[String]) -> anyhow::Result<()> {
    let manifests = manifest::read_manifests(files)?;
    let client = Client::connect(target).await?;
    let mut objects = client.objects();
    for manifest in manifests {
        let info = kind_of(
            manifest
                .object
                .get("kind")
                .and_then(Value::as_str)
                .unwrap_or(""),
        )?;
        let reply = objects
            .apply(ObjectRequest {
                object_json: serde_json::to_vec(&manifest.object)?,
            })
            .await
            .map_err(status_error)?
            .into_inner();
        println!("{} {}", object_name(info, &manifest.object), reply.outcome);
    }
    Ok(())
}

async fn get(target: &Target, args: GetArgs) -> anyhow::Result<()> {
    let info = kind_of(&args.kind)?;
    let output = args.output.as_deref().unwrap_or("");
    if !matches!(output, "" | "wide" | "yaml" | "json") {
        bail!("unknown output format {output:?} (use wide, yaml or json)");
    }
    let client = Client::connect(target).await?;
    let mut objects = client.objects();
    let namespace = if args.all_namespaces {
        String::new()
    } else {
        args.namespace.clone().unwrap_or_else(|| "default".into())
    };
    if let Some(name) = &args.name {
        let reply = objects
            .get(GetRequest {
                kind: info.kind.into(),
                namespace: namespace.clone(),
                name: name.clone(),
                local: args.local,
            })
            .await
            .map_err(status_error)?
            .into_inner();
        let object = decode(&reply.object_json)?;
        match output {
            "json" => println!("{}", serde_json::to_string_pretty(&object)?),
            "yaml" => print!("{}", serde_yaml::to_string(&object)?),
            _ => print!(
                "{}",
                output::table(info.kind, &[object], false, output == "wide", true)
            ),
        }
        return Ok(());
    }
    let reply = objects
        .list(ListRequest {
            kind: info.kind.into(),
            namespace: namespace.clone(),
            label_selector: args.selector.clone().unwrap_or_default(),
            field_selector: args.field_selector.clone().unwrap_or_default(),
            local: args.local,
        })
        .await
        .map_err(status_error)?
        .into_inner();
    let items = reply
        .items_json
        .iter()
        .map(|b| decode(b))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let all_namespaces = args.all_namespaces && info.namespaced;
    match output {
        "json" => println!(
            "{}",
            serde_json::to_string_pretty(&output::list_document(items, &reply.resource_version))?
        ),
        "yaml" => print!(
            "{}",
            serde_yaml::to_string(&output::list_document(items, &reply.resource_version))?
        ),
        _ if items.is_empty() && !args.watch => {
            if info.namespaced && !args.all_namespaces {
                eprintln!("No resources found in {namespace} namespace.");
            } else {
                eprintln!("No resources found");
            }
        }
        _ => print!(
            "{}",
            output::table(info.kind, &items, all_namespaces, output == "wide", true)
        ),
    }
    if args.watch {
        let mut events = objects
            .watch(WatchRequest {
                kind: info.kind.into(),
                namespace,
                label_selector: args.selector.unwrap_or_default(),
                field_selector: args.field_selector.unwrap_or_default(),
                resource_version: reply.resource_version,
            })
            .await
            .map_err(status_error)?
            .into_inner();
        while let Some(event) = events.next().await {
            let event = event.map_err(status_error)?;
            let object = decode(&event.object_json)?;
            match output {
                "json" => println!(
                    "{}",
                    serde_json::to_string(
                        &serde_json::json!({"type": event.r#type, "object": object})
                    )?
                ),
                "yaml" => print!("---\n{}", serde_yaml::to_string(&object)?),
                _ => print!(
                    "{}",
                    output::table(
                        info.kind,
                        &[object],
                        all_namespaces,
                        output == "wide",
                        false
                    )
                ),
            }
        }
    }
    Ok(())
}

async fn delete(
    target: &Target,
    kind: Option<String>,
    name: Option<String>,
    namespace: Option<String>,
    files: &[String],
    orphan: bool,
) -> anyhow::Result<()> {
    let mut targets = Vec::new();
    if !files.is_empty() {
        if kind.is_some() {
            bail!("give either KIND NAME or -f FILE, not both");
        }
        for manifest in manifest::read_manifests(files)? {
            let object = manifest.object;
            let info = kind_of(object.get("kind").and_then(Value::as_str).unwrap_or(""))?;
            let name = object
                .pointer("/metadata/name")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            let namespace = object
                .pointer("/metadata/namespace")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            targets.push((info, namespace, name));
        }
    } else {
        let (Some(kind), Some(name)) = (kind, name) else {
            bail!("delete needs KIND NAME or -f FILE");
        };
        targets.push((kind_of(&kind)?, namespace.unwrap_or_default(), name));
    }
    let client = Client::connect(target).await?;
    let mut objects = client.objects();
    for (info, namespace, name) in targets {
        if orphan {
            let namespace = if namespace.is_empty() {
                "default".to_string()
            } else {
                namespace.clone()
            };
            let owner = objects
                .get(GetRequest {
                    kind: info.kind.into(),
                    namespace: namespace.clone(),
                    name: name.clone(),
                    local: false,
                })
                .await
                .map_err(status_error)?
                .into_inner();
            let owner: Value = decode(&owner.object_json)?;
            let uid = owner
                .pointer("/metadata/uid")
                .and_then(Value::as_str)
                .unwrap_or("");
            workloads::orphan_dependents(&mut objects, &namespace, uid).await?;
        }
        objects
            .delete(DeleteRequest {
                kind: info.kind.into(),
                namespace,
                name: name.clone(),
                resource_version: String::new(),
            })
            .await
            .map_err(status_error)?;
        println!("{}/{} deleted", info.kind.to_ascii_lowercase(), name);
    }
    Ok(())
}

async fn rollout(target: &Target, command: RolloutCommand) -> anyhow::Result<()> {
    let mut objects = Client::connect(target).await?.objects();
    let deployment = |target: &str| -> anyhow::Result<String> {
        let (kind, name) = workloads::parse_target(target, "Deployment")?;
        if kind != "Deployment" {
            bail!("rollout works on Deployments, not {kind}");
        }
        Ok(name)
    };
    match command {
        RolloutCommand::Status {
            target,
            namespace,
            timeout_seconds,
        } => {
            workloads::rollout_status(
                &mut objects,
                &deployment(&target)?,
                &namespace,
                Duration::from_secs(timeout_seconds),
            )
            .await
        }
        RolloutCommand::History { target, namespace } => {
            workloads::rollout_history(&mut objects, &deployment(&target)?, &namespace).await
        }
        RolloutCommand::Undo {
            target,
            namespace,
            to_revision,
        } => {
            workloads::rollout_undo(&mut objects, &deployment(&target)?, &namespace, to_revision)
                .await
        }
        RolloutCommand::Pause { target, namespace } => {
            workloads::rollout_set(&mut objects, &deployment(&target)?, &namespace, "pause").await
        }
        RolloutCommand::Resume { target, namespace } => {
            workloads::rollout_set(&mut objects, &deployment(&target)?, &namespace, "resume").await
        }
        RolloutCommand::Restart { target, namespace } => {
            workloads::rollout_set(&mut objects, &deployment(&target)?, &namespace, "restart").await
        }
    }
}

async fn describe(
    target: &Target,
    kind: &str,
    name: &str,
    namespace: Option<String>,
) -> anyhow::Result<()> {
    let info = kind_of(kind)?;
    let client = Client::connect(target).await?;
    let namespace = if info.namespaced {
        namespace.unwrap_or_else(|| "default".into())
    } else {
        String::new()
    };
    let reply = client
        .objects()
        .get(GetRequest {
            kind: info.kind.into(),
            namespace: namespace.clone(),
            name: name.into(),
            local: false,
        })
        .await
        .map_err(status_error)?
        .into_inner();
    print!("{}", output::describe(&decode(&reply.object_json)?));
    // Events about the object, as kubectl describe shows them.
    let events = client
        .objects()
        .list(ListRequest {
            kind: "Event".into(),
            namespace,
            label_selector: String::new(),
            field_selector: format!(
                "involvedObject.name={name},involvedObject.kind={}",
                info.kind
            ),
            local: false,
        })
        .await
        .map_err(status_error)?
        .into_inner();
    let events = events
        .items_json
        .iter()
        .map(|b| decode(b))
        .collect::<anyhow::Result<Vec<_>>>()?;
    print!("{}", output::events_section(events));
    Ok(())
}

async fn logs(target: &Target, request: LogsRequest) -> anyhow::Result<()> {
    use std::io::Write;
    let client = Client::connect(target).await?;
    let mut chunks = client
        .pods()
        .logs(request)
        .await
        .map_err(status_error)?
        .into_inner();
    let mut stdout = std::io::stdout().lock();
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk.map_err(status_error)?;
        stdout.write_all(&chunk.data).context("write logs")?;
        stdout.flush().context("write logs")?;
    }
    Ok(())
}

/// Runs the command and returns its exit code.
async fn exec(target: &Target, request: ExecRequest) -> anyhow::Result<i64> {
    use std::io::Write;
    let client = Client::connect(target).await?;
    let reply = client
        .pods()
        .exec(request)
        .await
        .map_err(status_error)?
        .into_inner();
    std::io::stdout()
        .write_all(&reply.stdout)
        .context("write output")?;
    std::io::stderr()
        .write_all(&reply.stderr)
        .context("write output")?;
    Ok(reply.exit_code)
}

async fn cluster(target: &Target, command: ClusterCommand) -> anyhow::Result<()> {
    let client = Client::connect(target).await?;
    match command {
        ClusterCommand::Status { output } => {
            let reply = client
                .cluster()
                .status(StatusRequest { local: false })
                .await
                .map_err(status_error)?
                .into_inner();
            let status: ClusterStatus =
                serde_json::from_slice(&reply.status_json).context("decode cluster status")?;
            match output.as_deref() {
                Some("json") => println!("{}", serde_json::to_string_pretty(&status)?),
                Some("yaml") => print!("{}", serde_yaml::to_string(&status)?),
                Some(other) => bail!("unknown output format {other:?} (use json or yaml)"),
                None => {
                    println!(
                        "Leader: {}   Term: {}   Commit index: {}",
                        status.leader.as_deref().unwrap_or("<none>"),
                        status.term,
                        status
                            .commit_index
                            .map(|i| i.to_string())
                            .unwrap_or_else(|| "-".into())
                    );
                    let mut rows = vec![[
                        "NAME",
                        "ADDRESS",
                        "ROLE",
                        "HEALTHY",
                        "LAST-CONTACT",
                        "APPLIED",
                    ]
                    .map(String::from)
                    .to_vec()];
                    for m in &status.members {
                        rows.push(vec![
                            m.name.clone(),
                            m.address.clone(),
                            m.role.clone(),
                            m.healthy.to_string(),
                            m.last_contact_ms
                                .map(|ms| format!("{ms}ms"))
                                .unwrap_or_else(|| "-".into()),
                            m.applied_index
                                .map(|i| i.to_string())
                                .unwrap_or_else(|| "-".into()),
                        ]);
                    }
                    print!("{}", output::align(&rows));
                }
            }
        }
        ClusterCommand::JoinToken { rotate } => {
            let reply = client
                .cluster()
                .join_token(JoinTokenRequest { rotate })
                .await
                .map_err(status_error)?
                .into_inner();
            println!("{}", reply.token);
        }
        ClusterCommand::RotateCa => {
            let reply = client
                .cluster()
                .rotate_ca(RotateCaRequest {})
                .await
                .map_err(status_error)?
                .into_inner();
            if !reply.credentials_json.is_empty() {
                let credentials: CredentialsFile = serde_json::from_slice(&reply.credentials_json)
                    .context("decode the new credentials")?;
                let path = target.credentials_path()?;
                credentials.write(&path)?;
                println!("CA rotated; credentials written to {}", path.display());
            } else {
                println!("CA rotated");
            }
        }
        ClusterCommand::Remove { node } => {
            client
                .cluster()
                .remove(RemoveRequest { name: node.clone() })
                .await
                .map_err(status_error)?;
            println!("node/{node} removed");
        }
        ClusterCommand::RotateEncryptionKey => {
            let reply = client
                .cluster()
                .rotate_encryption_key(RotateEncryptionKeyRequest {})
                .await
                .map_err(status_error)?
                .into_inner();
            println!(
                "data key {} is current; {} Secret(s) re-encrypted",
                reply.key_id, reply.reencrypted
            );
        }
    }
    Ok(())
}

async fn auth(target: &Target, command: AuthCommand) -> anyhow::Result<()> {
    let client = Client::connect(target).await?;
    match command {
        AuthCommand::CreateUser {
            name,
            role,
            namespace,
            output,
        } => {
            let reply = client
                .cluster()
                .create_user(CreateUserRequest {
                    name: name.clone(),
                    role,
                    namespace: namespace.unwrap_or_default(),
                })
                .await
                .map_err(status_error)?
                .into_inner();
            match output {
                Some(path) => {
                    let credentials: CredentialsFile =
                        serde_json::from_slice(&reply.credentials_json)
                            .context("decode the new credentials")?;
                    credentials.write(&path)?;
                    println!(
                        "user/{name} created; credentials written to {}",
                        path.display()
                    );
                }
                None => println!("{}", String::from_utf8_lossy(&reply.credentials_json)),
            }
        }
        AuthCommand::Revoke { name } => {
            client
                .cluster()
                .revoke_user(RevokeUserRequest { name: name.clone() })
                .await
                .map_err(status_error)?;
            println!("user/{name} revoked");
        }
    }
    Ok(())
}
