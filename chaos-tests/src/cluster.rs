//! Clusters on 127.0.0.1 made of real processes: Flotilla nodes (`flotilla serve`) and etcd
//! members, each with its own temporary data directory, plus the client calls the harness
//! makes against them.
//!
//! A cluster owns its processes and its temporary directory: dropping it kills every process it
//! started (SIGKILL by PID) and then removes the directory.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use flotilla_pki::CredentialsFile;
use flotilla_proto::cluster_client::ClusterClient;
use flotilla_proto::objects_client::ObjectsClient;
use flotilla_proto::{ObjectRequest, StatusRequest};
use serde_json::{json, Value};
use tempfile::TempDir;
use tonic::transport::{Channel, Endpoint};

use crate::etcdserverpb::kv_client::KvClient;
use crate::etcdserverpb::PutRequest;
use crate::process::{free_addr, log_tail, Proc};

/// How long one `Cluster.Status` call (connect included) may take while polling.
const STATUS_TIMEOUT: Duration = Duration::from_secs(1);
/// The pause between two polls of a cluster that is not ready yet.
const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// How much of a process's log an error message quotes.
const LOG_TAIL_BYTES: u64 = 4000;

/// The TLS configuration of the Flotilla admin's credentials, set once a cluster is up (the
/// harness talks to one Flotilla cluster per process at a time).
static FLOTILLA_TLS: std::sync::RwLock<Option<std::sync::Arc<rustls::ClientConfig>>> =
    std::sync::RwLock::new(None);

/// Makes [`connect`] use `credentials` (the admin's of the cluster under test).
pub fn use_credentials(credentials: &CredentialsFile) -> Result<()> {
    let tls = credentials
        .client_tls()
        .context("load the cluster's admin credentials")?;
    *FLOTILLA_TLS
        .write()
        .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(tls);
    Ok(())
}

/// Makes [`connect`] use the admin's credentials of a `flotilla local` cluster.
pub fn use_local_credentials(cluster: &flotilla_local::LocalCluster) -> Result<()> {
    use_credentials(
        cluster
            .credentials()
            .ok_or_else(|| anyhow!("local cluster {} has no admin credentials", cluster.name))?,
    )
}

/// Makes [`connect`] use the credentials file at `path`.
pub fn use_credentials_file(path: &Path) -> Result<()> {
    use_credentials(&CredentialsFile::read(path)?)
}

fn endpoint(addr: SocketAddr, connect_timeout: Duration) -> Result<Endpoint> {
    Ok(Endpoint::from_shared(format!("http://{addr}"))
        .with_context(|| format!("build the endpoint for {addr}"))?
        .connect_timeout(connect_timeout)
        .tcp_nodelay(true))
}

/// Addresses of this process's own test doubles (the broken store), which serve plain HTTP/2.
static PLAIN_ADDRESSES: std::sync::Mutex<Vec<SocketAddr>> = std::sync::Mutex::new(Vec::new());

/// Makes [`connect`] use plain HTTP/2 to `addr`, a test double of this process.
pub fn serves_plain(addr: SocketAddr) {
    PLAIN_ADDRESSES
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .push(addr);
}

/// Opens a gRPC channel to the Flotilla node at `addr` (mutual TLS with the credentials of
/// [`use_credentials`]; plain to a test double of [`serves_plain`]), connecting now.
pub async fn connect(addr: SocketAddr, connect_timeout: Duration) -> Result<Channel> {
    let plain = PLAIN_ADDRESSES
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .contains(&addr);
    if plain {
        return connect_plain(addr, connect_timeout).await;
    }
    let tls = FLOTILLA_TLS
        .read()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .clone()
        .ok_or_else(|| anyhow!("connect to {addr}: no Flotilla credentials loaded"))?;
    let endpoint = endpoint(addr, connect_timeout)?;
    tokio::time::timeout(
        connect_timeout,
        flotilla_pki::transport::connect(&endpoint, tls),
    )
    .await
    .map_err(|_| anyhow!("connect to {addr}: timed out after {connect_timeout:?}"))?
    .with_context(|| format!("connect to {addr}"))
}

/// Opens a plain HTTP/2 channel to `addr` (etcd), connecting now.
pub async fn connect_plain(addr: SocketAddr, connect_timeout: Duration) -> Result<Channel> {
    let endpoint = endpoint(addr, connect_timeout)?;
    tokio::time::timeout(connect_timeout, endpoint.connect())
        .await
        .map_err(|_| anyhow!("connect to {addr}: timed out after {connect_timeout:?}"))?
        .with_context(|| format!("connect to {addr}"))
}

/// The JSON of the ConfigMap `default/<name>` holding `value` under the key `v`.
pub fn configmap_json(name: &str, value: &str) -> Result<Vec<u8>> {
    let object = json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": "default"},
        "data": {"v": value},
    });
    serde_json::to_vec(&object).context("encode the ConfigMap as JSON")
}

/// One Flotilla write: `Objects.Apply` of the ConfigMap `default/<name>` holding `value`.
pub async fn apply_configmap(
    client: &mut ObjectsClient<Channel>,
    name: &str,
    value: &str,
) -> Result<()> {
    let object_json = configmap_json(name, value)?;
    client
        .apply(ObjectRequest { object_json })
        .await
        .with_context(|| format!("apply ConfigMap default/{name}"))?;
    Ok(())
}

/// One etcd write: `KV.Put` of `value` at `key`.
pub async fn etcd_put(client: &mut KvClient<Channel>, key: &str, value: &str) -> Result<()> {
    client
        .put(PutRequest {
            key: key.as_bytes().to_vec(),
            value: value.as_bytes().to_vec(),
            ..PutRequest::default()
        })
        .await
        .with_context(|| format!("put etcd key {key}"))?;
    Ok(())
}

/// One member as `Cluster.Status` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberStatus {
    pub name: String,
    pub address: String,
    /// `voter` or `learner`.
    pub role: String,
    pub healthy: bool,
}

/// The reply of `Cluster.Status`, as seen by the node that answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterStatus {
    /// The cluster's id; its containers and networks carry it as a label.
    pub cluster_id: String,
    /// The leader's name, if the answering node knows one.
    pub leader: Option<String>,
    pub term: u64,
    pub members: Vec<MemberStatus>,
}

impl ClusterStatus {
    /// Parses the `status_json` of a `StatusReply`.
    pub fn parse(bytes: &[u8]) -> Result<Self> {
        let value: Value = serde_json::from_slice(bytes).context("parse the status JSON")?;
        let text = |v: &Value, key: &str| v.get(key).and_then(Value::as_str).map(str::to_owned);
        let members = value
            .get("members")
            .and_then(Value::as_array)
            .ok_or_else(|| anyhow!("the status JSON has no members array: {value}"))?
            .iter()
            .map(|member| {
                Ok(MemberStatus {
                    name: text(member, "name")
                        .ok_or_else(|| anyhow!("a member has no name: {member}"))?,
                    address: text(member, "address").unwrap_or_default(),
                    role: text(member, "role").unwrap_or_default(),
                    healthy: member.get("healthy").and_then(Value::as_bool) == Some(true),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            cluster_id: text(&value, "cluster_id").unwrap_or_default(),
            leader: text(&value, "leader"),
            term: value
                .get("term")
                .and_then(Value::as_u64)
                .unwrap_or_default(),
            members,
        })
    }

    /// A one-line summary for progress and error messages.
    pub fn summary(&self) -> String {
        let members: Vec<String> = self
            .members
            .iter()
            .map(|m| {
                let health = if m.healthy { "healthy" } else { "unhealthy" };
                format!("{} {} {}", m.name, m.role, health)
            })
            .collect();
        format!(
            "leader {} term {} members [{}]",
            self.leader.as_deref().unwrap_or("none"),
            self.term,
            members.join(", ")
        )
    }
}

/// Asks the node at `addr` for `Cluster.Status` with its own view only (`local`), so that a
/// dead member does not slow the answer down.
pub async fn flotilla_status(addr: SocketAddr) -> Result<ClusterStatus> {
    let call = async {
        let channel = connect(addr, STATUS_TIMEOUT).await?;
        let reply = ClusterClient::new(channel)
            .status(StatusRequest { local: true })
            .await
            .with_context(|| format!("call Cluster.Status on {addr}"))?;
        ClusterStatus::parse(&reply.into_inner().status_json)
    };
    tokio::time::timeout(STATUS_TIMEOUT * 2, call)
        .await
        .map_err(|_| anyhow!("Cluster.Status on {addr} timed out"))?
}

/// How a killed Flotilla node was started again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartMode {
    /// `serve` with name, data dir and listen address only: the node keeps its identity.
    Bare,
    /// As [`RestartMode::Bare`] plus `--join` through a live member, for a binary that
    /// insists on one of `--init` or `--join`.
    Join,
}

/// One Flotilla node of a [`FlotillaCluster`].
#[derive(Debug)]
pub struct FlotillaNode {
    name: String,
    addr: SocketAddr,
    data_dir: PathBuf,
    log: PathBuf,
    proc: Option<Proc>,
    /// Flags every start of this node gets (e.g. `--no-agent`).
    node_args: Vec<String>,
}

impl FlotillaNode {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The gRPC address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The PID of its process, if it runs.
    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(Proc::pid)
    }

    fn serve_args(&self, extra: &[String]) -> Vec<String> {
        let mut args = vec![
            "serve".to_owned(),
            "--name".to_owned(),
            self.name.clone(),
            "--data-dir".to_owned(),
            self.data_dir.display().to_string(),
            "--listen".to_owned(),
            self.addr.to_string(),
        ];
        args.extend_from_slice(&self.node_args);
        args.extend_from_slice(extra);
        args
    }
}

/// A Flotilla cluster of `flotilla serve` processes on 127.0.0.1, named `n1`, `n2`, …
#[derive(Debug)]
pub struct FlotillaCluster {
    binary: PathBuf,
    nodes: Vec<FlotillaNode>,
    restart_mode: Option<RestartMode>,
    // Declared last so that it is dropped after the processes are killed.
    dir: TempDir,
}

impl FlotillaCluster {
    /// Starts `size` nodes without agents (the store alone): `n1` with `--init`, then each
    /// other one with `--join` through `n1`, waiting after each until every node is a healthy
    /// voter under one leader.
    pub async fn start(binary: &Path, size: usize, timeout: Duration) -> Result<Self> {
        Self::start_with(binary, size, timeout, &["--no-agent".to_owned()]).await
    }

    /// Like [`FlotillaCluster::start`], with `node_args` on every node's command line.
    pub async fn start_with(
        binary: &Path,
        size: usize,
        timeout: Duration,
        node_args: &[String],
    ) -> Result<Self> {
        if size == 0 {
            bail!("a cluster needs at least one node");
        }
        if !binary.is_file() {
            bail!("the flotilla binary {} does not exist", binary.display());
        }
        let dir = tempfile::Builder::new()
            .prefix("flotilla-bench-")
            .tempdir()
            .context("create a temporary directory for the cluster")?;
        let mut cluster = Self {
            binary: binary.to_owned(),
            nodes: Vec::with_capacity(size),
            restart_mode: None,
            dir,
        };
        for index in 0..size {
            let name = format!("n{}", index + 1);
            let data_dir = cluster.dir.path().join(&name);
            std::fs::create_dir_all(&data_dir)
                .with_context(|| format!("create the data directory {}", data_dir.display()))?;
            let mut node = FlotillaNode {
                addr: free_addr()?,
                log: cluster.dir.path().join(format!("{name}.log")),
                name,
                data_dir,
                proc: None,
                node_args: node_args.to_vec(),
            };
            let role_args = match cluster.nodes.first() {
                None => vec![
                    "--init".to_owned(),
                    "--admin-config".to_owned(),
                    cluster.admin_config().display().to_string(),
                ],
                Some(first) => vec![
                    "--join".to_owned(),
                    first.addr.to_string(),
                    "--token".to_owned(),
                    cluster.join_token().await?,
                ],
            };
            let args = node.serve_args(&role_args);
            node.proc = Some(Proc::spawn(&node.name, &cluster.binary, &args, &node.log)?);
            let name = node.name.clone();
            cluster.nodes.push(node);
            if index == 0 {
                cluster.load_admin_credentials(timeout).await?;
            }
            cluster
                .wait_ready(timeout)
                .await
                .with_context(|| format!("start node {name}"))?;
        }
        Ok(cluster)
    }

    pub fn nodes(&self) -> &[FlotillaNode] {
        &self.nodes
    }

    /// The admin's credentials file the first node writes.
    pub fn admin_config(&self) -> PathBuf {
        self.dir.path().join("admin.json")
    }

    /// Waits up to `timeout` for the first node's admin credentials and makes [`connect`] use
    /// them.
    async fn load_admin_credentials(&self, timeout: Duration) -> Result<()> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            match use_credentials_file(&self.admin_config()) {
                Ok(()) => return Ok(()),
                Err(error) if std::time::Instant::now() > deadline => {
                    return Err(error.context("the first node wrote no admin credentials"))
                }
                Err(_) => tokio::time::sleep(POLL_INTERVAL).await,
            }
        }
    }

    /// The join token, asked of the first node (whose credentials are loaded by then), retrying
    /// for up to 30 s.
    async fn join_token(&self) -> Result<String> {
        let first = self
            .nodes
            .first()
            .ok_or_else(|| anyhow!("no node to ask for a join token"))?
            .addr;
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let attempt = async {
                let channel = connect(first, STATUS_TIMEOUT).await?;
                let reply = ClusterClient::new(channel)
                    .join_token(flotilla_proto::JoinTokenRequest { rotate: false })
                    .await
                    .context("call Cluster.JoinToken")?;
                anyhow::Ok(reply.into_inner().token)
            };
            match attempt.await {
                Ok(token) => return Ok(token),
                Err(error) if std::time::Instant::now() > deadline => {
                    return Err(error.context("get the join token"))
                }
                Err(_) => tokio::time::sleep(POLL_INTERVAL).await,
            }
        }
    }

    /// The gRPC addresses of all nodes, in order.
    pub fn addresses(&self) -> Vec<SocketAddr> {
        self.nodes.iter().map(|node| node.addr).collect()
    }

    /// The index of the node called `name`.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|node| node.name == name)
    }

    /// Fails, quoting the log, if a node that should run has exited.
    fn check_alive(&mut self) -> Result<()> {
        for node in &mut self.nodes {
            if let Some(proc) = node.proc.as_mut() {
                if let Some(status) = proc.exited()? {
                    bail!(
                        "node {} (pid {}) exited with {status}; end of its log:\n{}",
                        node.name,
                        proc.pid(),
                        proc.log_tail(LOG_TAIL_BYTES)
                    );
                }
            }
        }
        Ok(())
    }

    /// The status as the current leader sees it: asks every running node and keeps the reply
    /// of the one that names itself leader. `None` when no node does.
    pub async fn leader_view(&self) -> Result<Option<(usize, ClusterStatus)>> {
        let mut errors = Vec::new();
        for (index, node) in self.nodes.iter().enumerate() {
            if node.proc.is_none() {
                continue;
            }
            match flotilla_status(node.addr).await {
                Ok(status) if status.leader.as_deref() == Some(node.name.as_str()) => {
                    return Ok(Some((index, status)));
                }
                Ok(_) => {}
                Err(err) => errors.push(format!("{}: {err:#}", node.name)),
            }
        }
        if errors.len() == self.nodes.iter().filter(|n| n.proc.is_some()).count() {
            bail!("no node answered Cluster.Status: {}", errors.join("; "));
        }
        Ok(None)
    }

    /// Whether `status` shows exactly this cluster's nodes, all healthy voters, under a leader.
    fn is_ready(&self, status: &ClusterStatus) -> bool {
        status.leader.is_some()
            && status.members.len() == self.nodes.len()
            && self.nodes.iter().all(|node| {
                status
                    .members
                    .iter()
                    .any(|m| m.name == node.name && m.role == "voter" && m.healthy)
            })
    }

    /// Waits until the leader reports every node as a healthy voter; returns the leader's
    /// index and its status. Fails fast if a node's process exits.
    pub async fn wait_ready(&mut self, timeout: Duration) -> Result<(usize, ClusterStatus)> {
        let deadline = Instant::now() + timeout;
        let mut last;
        loop {
            self.check_alive()?;
            match self.leader_view().await {
                Ok(Some((leader, status))) if self.is_ready(&status) => {
                    return Ok((leader, status));
                }
                Ok(Some((_, status))) => last = status.summary(),
                Ok(None) => last = "no node reports itself leader".to_owned(),
                Err(err) => last = format!("{err:#}"),
            }
            if Instant::now() >= deadline {
                bail!(
                    "the cluster was not ready after {timeout:?}; last seen: {last}\n{}",
                    self.log_tails()
                );
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Kills node `index` with SIGKILL (by the PID it was spawned with) and reaps it; returns
    /// that PID.
    pub fn kill(&mut self, index: usize) -> Result<u32> {
        let node = self
            .nodes
            .get_mut(index)
            .ok_or_else(|| anyhow!("there is no node {index}"))?;
        let mut proc = node
            .proc
            .take()
            .ok_or_else(|| anyhow!("node {} is not running", node.name))?;
        let pid = proc.pid();
        proc.kill()?;
        Ok(pid)
    }

    /// Starts the killed node `index` again on its data directory with the same name and
    /// address, and waits until the cluster is ready. Tries a bare `serve` first; if the
    /// binary exits at once, starts it with `--join` through a live member, and remembers the
    /// mode that worked.
    pub async fn restart(&mut self, index: usize, timeout: Duration) -> Result<RestartMode> {
        let modes: &[RestartMode] = match self.restart_mode {
            Some(RestartMode::Join) => &[RestartMode::Join],
            _ => &[RestartMode::Bare, RestartMode::Join],
        };
        let join_through = self
            .nodes
            .iter()
            .enumerate()
            .find(|(i, node)| *i != index && node.proc.is_some())
            .map(|(_, node)| node.addr);
        let token = match join_through {
            Some(_) if modes.contains(&RestartMode::Join) => {
                self.join_token().await.unwrap_or_default()
            }
            _ => String::new(),
        };
        let mut failures = Vec::new();
        for &mode in modes {
            let node = self
                .nodes
                .get_mut(index)
                .ok_or_else(|| anyhow!("there is no node {index}"))?;
            if node.proc.is_some() {
                bail!("node {} is still running", node.name);
            }
            let extra = match (mode, join_through) {
                (RestartMode::Bare, _) => Vec::new(),
                (RestartMode::Join, Some(addr)) => vec![
                    "--join".to_owned(),
                    addr.to_string(),
                    "--token".to_owned(),
                    token.clone(),
                ],
                (RestartMode::Join, None) => {
                    failures.push("no live member to join through".to_owned());
                    continue;
                }
            };
            let args = node.serve_args(&extra);
            node.proc = Some(Proc::spawn(&node.name, &self.binary, &args, &node.log)?);
            match self.wait_ready(timeout).await {
                Ok(_) => {
                    self.restart_mode = Some(mode);
                    return Ok(mode);
                }
                Err(err) => {
                    let node = self
                        .nodes
                        .get_mut(index)
                        .ok_or_else(|| anyhow!("there is no node {index}"))?;
                    let exited = match node.proc.as_mut() {
                        Some(proc) => proc.exited()?.is_some(),
                        None => true,
                    };
                    // Only a process that refused to start earns a second try.
                    if !exited {
                        return Err(err).context(format!("restart node {}", node.name));
                    }
                    node.proc = None;
                    failures.push(format!("{mode:?}: {err:#}"));
                }
            }
        }
        bail!("could not restart node {index}: {}", failures.join("\n"))
    }

    /// The end of every node's log.
    pub fn log_tails(&self) -> String {
        self.nodes
            .iter()
            .map(|node| {
                format!(
                    "--- end of {}'s log ---\n{}",
                    node.name,
                    log_tail(&node.log, LOG_TAIL_BYTES)
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for FlotillaCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(proc) = node.proc.as_mut() {
                if let Err(err) = proc.kill() {
                    eprintln!("warning: {err:#}");
                }
            }
        }
    }
}

/// One etcd member of an [`EtcdCluster`].
#[derive(Debug)]
pub struct EtcdMember {
    name: String,
    client_addr: SocketAddr,
    log: PathBuf,
    proc: Proc,
}

impl EtcdMember {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The address its gRPC client API listens on.
    pub fn client_addr(&self) -> SocketAddr {
        self.client_addr
    }
}

/// An etcd cluster on 127.0.0.1 with default durability, members named `e1`, `e2`, …
#[derive(Debug)]
pub struct EtcdCluster {
    members: Vec<EtcdMember>,
    // Declared last so that it is dropped after the processes are killed.
    dir: TempDir,
}

impl EtcdCluster {
    /// Starts `size` members with a static `--initial-cluster` and waits until a `Put`
    /// succeeds through every member.
    pub async fn start(binary: &Path, size: usize, timeout: Duration) -> Result<Self> {
        if size == 0 {
            bail!("a cluster needs at least one member");
        }
        if !binary.is_file() {
            bail!("the etcd binary {} does not exist", binary.display());
        }
        let dir = tempfile::Builder::new()
            .prefix("etcd-bench-")
            .tempdir()
            .context("create a temporary directory for the etcd cluster")?;
        let mut planned = Vec::with_capacity(size);
        for index in 0..size {
            planned.push((format!("e{}", index + 1), free_addr()?, free_addr()?));
        }
        let initial_cluster = planned
            .iter()
            .map(|(name, _, peer)| format!("{name}=http://{peer}"))
            .collect::<Vec<_>>()
            .join(",");
        let token = match dir.path().file_name() {
            Some(unique) => unique.to_string_lossy().into_owned(),
            None => format!("bench-{}", std::process::id()),
        };
        let mut cluster = Self {
            members: Vec::with_capacity(size),
            dir,
        };
        for (name, client_addr, peer_addr) in planned {
            let data_dir = cluster.dir.path().join(&name);
            let log = cluster.dir.path().join(format!("{name}.log"));
            let args = vec![
                "--name".to_owned(),
                name.clone(),
                "--data-dir".to_owned(),
                data_dir.display().to_string(),
                "--listen-client-urls".to_owned(),
                format!("http://{client_addr}"),
                "--advertise-client-urls".to_owned(),
                format!("http://{client_addr}"),
                "--listen-peer-urls".to_owned(),
                format!("http://{peer_addr}"),
                "--initial-advertise-peer-urls".to_owned(),
                format!("http://{peer_addr}"),
                "--initial-cluster".to_owned(),
                initial_cluster.clone(),
                "--initial-cluster-state".to_owned(),
                "new".to_owned(),
                "--initial-cluster-token".to_owned(),
                token.clone(),
            ];
            let proc = Proc::spawn(&name, binary, &args, &log)?;
            cluster.members.push(EtcdMember {
                name,
                client_addr,
                log,
                proc,
            });
        }
        cluster.wait_ready(timeout).await?;
        Ok(cluster)
    }

    pub fn members(&self) -> &[EtcdMember] {
        &self.members
    }

    /// The client addresses of all members, in order.
    pub fn addresses(&self) -> Vec<SocketAddr> {
        self.members.iter().map(|m| m.client_addr).collect()
    }

    async fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        for index in 0..self.members.len() {
            let mut last;
            loop {
                for member in &mut self.members {
                    if let Some(status) = member.proc.exited()? {
                        bail!(
                            "etcd member {} exited with {status}; end of its log:\n{}",
                            member.name,
                            member.proc.log_tail(LOG_TAIL_BYTES)
                        );
                    }
                }
                let member = self
                    .members
                    .get(index)
                    .ok_or_else(|| anyhow!("there is no member {index}"))?;
                let attempt = async {
                    let channel = connect_plain(member.client_addr, STATUS_TIMEOUT).await?;
                    etcd_put(&mut KvClient::new(channel), "bench-ready", "ready").await
                };
                match tokio::time::timeout(STATUS_TIMEOUT * 2, attempt).await {
                    Ok(Ok(())) => break,
                    Ok(Err(err)) => last = format!("{err:#}"),
                    Err(_) => last = "the put timed out".to_owned(),
                }
                if Instant::now() >= deadline {
                    bail!(
                        "etcd member {} did not accept a put within {timeout:?}: {last}\n{}",
                        member.name,
                        log_tail(&member.log, LOG_TAIL_BYTES)
                    );
                }
                tokio::time::sleep(POLL_INTERVAL).await;
            }
        }
        Ok(())
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for member in &mut self.members {
            if let Err(err) = member.proc.kill() {
                eprintln!("warning: {err:#}");
            }
        }
    }
}
