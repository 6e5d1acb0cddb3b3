//! Creating, finding, faulting and removing a local cluster.

use std::collections::{BTreeSet, HashMap};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use bollard::models::{
    ContainerCreateBody, EndpointIpamConfig, EndpointSettings, HostConfig, Ipam, IpamConfig,
    NetworkConnectRequest, NetworkCreateRequest, NetworkingConfig,
};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, DownloadFromContainerOptionsBuilder,
    KillContainerOptionsBuilder, ListContainersOptionsBuilder, ListNetworksOptionsBuilder,
    LogsOptionsBuilder, RemoveContainerOptionsBuilder, RestartContainerOptionsBuilder,
};
use bollard::Docker;
use flotilla_pki::CredentialsFile;
use flotilla_proto::cluster_client::ClusterClient;
use flotilla_proto::objects_client::ObjectsClient;
use flotilla_proto::{JoinTokenRequest, ListRequest, StatusRequest};
use futures::StreamExt;
use serde_json::Value;

use crate::addressing::{choose_addressing, Addressing, MAX_NODES};
use crate::{docker_error, docker_status, faults, image, labels, LocalError, NODE_PORT};

/// How a new local cluster is made.
#[derive(Debug, Clone)]
pub struct UpOptions {
    /// The cluster's name: lowercase letters, digits and `-`.
    pub name: String,
    pub nodes: usize,
    /// Voters the cluster keeps (3 or 5; 1 for a single node).
    pub voters: usize,
    /// The `flotilla` binary the node image is built from.
    pub binary: PathBuf,
    /// Flags every node's `serve` gets in addition to the ones `up` sets.
    pub node_args: Vec<String>,
    /// Nodes (1-based) whose data directory is a tmpfs of this many MiB (a small disk).
    pub small_disk_mib: Vec<(usize, u64)>,
    /// The `FLOTILLA_LOG` filter of the nodes.
    pub log_filter: String,
    /// How long `up` waits for every node to be a healthy member with a Ready Node.
    pub ready_timeout: Duration,
}

impl UpOptions {
    pub fn new(name: &str, nodes: usize, binary: PathBuf) -> UpOptions {
        UpOptions {
            name: name.to_owned(),
            nodes,
            voters: if nodes >= 5 {
                5
            } else if nodes >= 3 {
                3
            } else {
                1
            },
            binary,
            node_args: Vec::new(),
            small_disk_mib: Vec::new(),
            log_filter: "info,openraft=warn".into(),
            ready_timeout: Duration::from_secs(90),
        }
    }
}

/// One node container of a local cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalNode {
    /// The node's name in the cluster (`NAME-nI`).
    pub name: String,
    /// 1-based.
    pub index: usize,
    /// The container's name (`flt-NAME-nI`).
    pub container: String,
    /// Its address on the cluster network.
    pub ip: Ipv4Addr,
}

impl LocalNode {
    /// Its gRPC address, reachable from the host.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((self.ip, NODE_PORT))
    }
}

/// What `down` removed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct DownReport {
    pub node_containers: usize,
    pub pod_containers: usize,
    pub networks: usize,
}

/// A local cluster: its node containers and networks on the host's Docker daemon.
#[derive(Debug, Clone)]
pub struct LocalCluster {
    docker: Docker,
    pub name: String,
    pub cluster_id: String,
    pub addressing: Addressing,
    pub image: String,
    pub voters: usize,
    nodes: Vec<LocalNode>,
    /// The `serve` flags of every node, as the containers were created with (for new nodes).
    node_args: Vec<String>,
    log_filter: String,
    /// The admin's credentials, which node 1 wrote to its data dir when it initialized.
    credentials: Option<CredentialsFile>,
    /// The join token, asked of the cluster when a node joins.
    join_token: Option<String>,
}

/// Connects to the host's Docker daemon, negotiating the API version.
pub async fn connect_docker() -> Result<Docker, LocalError> {
    Docker::connect_with_local_defaults()
        .map_err(docker_error("connect to the Docker daemon"))?
        .negotiate_version()
        .await
        .map_err(docker_error("negotiate the Docker API version"))
}

fn validate_name(name: &str) -> Result<(), LocalError> {
    let valid = !name.is_empty()
        && name.len() <= 30
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if valid {
        Ok(())
    } else {
        Err(LocalError::Invalid(format!(
            "cluster name {name:?}: use 1 to 30 lowercase letters, digits and '-', not at either end"
        )))
    }
}

fn cluster_network(name: &str) -> String {
    format!("flt-{name}")
}

fn pod_network(name: &str, index: usize) -> String {
    format!("flt-{name}-pods-{index}")
}

fn label_filter(pairs: &[(&str, &str)]) -> HashMap<&'static str, Vec<String>> {
    HashMap::from([(
        "label",
        pairs
            .iter()
            .map(|(key, value)| format!("{key}={value}"))
            .collect(),
    )])
}

/// The ids and labels of every container (running or not) carrying all of `pairs`.
async fn containers_labelled(
    docker: &Docker,
    pairs: &[(&str, &str)],
) -> Result<Vec<(String, HashMap<String, String>)>, LocalError> {
    let filters = label_filter(pairs);
    let options = ListContainersOptionsBuilder::default()
        .all(true)
        .filters(&filters)
        .build();
    let summaries = docker
        .list_containers(Some(options))
        .await
        .map_err(docker_error("list containers"))?;
    Ok(summaries
        .into_iter()
        .filter_map(|summary| Some((summary.id?, summary.labels.unwrap_or_default())))
        .collect())
}

async fn remove_container_forcibly(docker: &Docker, id: &str) -> Result<bool, LocalError> {
    let options = RemoveContainerOptionsBuilder::default()
        .force(true)
        .v(true)
        .build();
    match docker.remove_container(id, Some(options)).await {
        Ok(()) => Ok(true),
        Err(error) if matches!(docker_status(&error), Some(404) | Some(409)) => Ok(false),
        Err(error) => Err(docker_error(format!("remove container {id}"))(error)),
    }
}

/// Removes every container, network and rule of the local cluster `name`: its node
/// containers first (so no agent starts new pods), then the pods' containers of the clusters
/// they ran, then its networks. Rules live in the node containers' namespaces and go with them.
pub async fn down(docker: &Docker, name: &str) -> Result<DownReport, LocalError> {
    let mut report = DownReport::default();
    let nodes = containers_labelled(docker, &[(labels::LOCAL, name)]).await?;
    let cluster_ids: BTreeSet<String> = nodes
        .iter()
        .filter_map(|(_, labels)| labels.get(labels::CLUSTER).cloned())
        .collect();
    for (id, _) in &nodes {
        if remove_container_forcibly(docker, id).await? {
            report.node_containers += 1;
        }
    }
    for cluster_id in &cluster_ids {
        for (id, _) in containers_labelled(docker, &[(labels::CLUSTER, cluster_id)]).await? {
            if remove_container_forcibly(docker, &id).await? {
                report.pod_containers += 1;
            }
        }
    }
    let filters = label_filter(&[(labels::LOCAL, name)]);
    let options = ListNetworksOptionsBuilder::default()
        .filters(&filters)
        .build();
    let networks = docker
        .list_networks(Some(options))
        .await
        .map_err(docker_error("list networks"))?;
    for network in networks.into_iter().filter_map(|network| network.name) {
        // An endpoint of a container removed a moment ago can linger briefly.
        let mut attempts = 0;
        loop {
            match docker.remove_network(&network).await {
                Ok(()) => {
                    report.networks += 1;
                    break;
                }
                Err(error) if docker_status(&error) == Some(404) => break,
                Err(_) if attempts < 20 => {
                    attempts += 1;
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                Err(error) => return Err(docker_error(format!("remove network {network}"))(error)),
            }
        }
    }
    Ok(report)
}

/// A gRPC channel to the node at `addr`, connected now over mutual TLS with `credentials`.
async fn channel_to(
    addr: SocketAddr,
    credentials: Option<&CredentialsFile>,
) -> Result<tonic::transport::Channel, String> {
    let credentials = credentials.ok_or("no admin credentials for this cluster")?;
    let tls = credentials.client_tls().map_err(|e| e.to_string())?;
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(1));
    flotilla_pki::transport::connect(&endpoint, tls)
        .await
        .map_err(|e| e.to_string())
}

/// The node's status JSON as `Cluster.Status` with `local` returns it.
async fn node_status(
    addr: SocketAddr,
    credentials: Option<&CredentialsFile>,
) -> Result<Value, String> {
    let call = async {
        let channel = channel_to(addr, credentials).await?;
        let reply = ClusterClient::new(channel)
            .status(StatusRequest { local: true })
            .await
            .map_err(|status| status.message().to_owned())?;
        serde_json::from_slice::<Value>(&reply.into_inner().status_json).map_err(|e| e.to_string())
    };
    tokio::time::timeout(Duration::from_secs(2), call)
        .await
        .unwrap_or_else(|_| Err(format!("Cluster.Status on {addr} timed out")))
}

/// How many Nodes the node at `addr` reports Ready.
async fn ready_nodes(
    addr: SocketAddr,
    credentials: Option<&CredentialsFile>,
) -> Result<usize, String> {
    let call = async {
        let channel = channel_to(addr, credentials).await?;
        let reply = ObjectsClient::new(channel)
            .list(ListRequest {
                kind: "Node".into(),
                ..Default::default()
            })
            .await
            .map_err(|status| status.message().to_owned())?;
        Ok(reply
            .into_inner()
            .items_json
            .iter()
            .filter_map(|item| serde_json::from_slice::<Value>(item).ok())
            .filter(|node| {
                node.pointer("/status/conditions")
                    .and_then(Value::as_array)
                    .is_some_and(|conditions| {
                        conditions.iter().any(|c| {
                            c.get("type").and_then(Value::as_str) == Some("Ready")
                                && c.get("status").and_then(Value::as_str) == Some("True")
                        })
                    })
            })
            .count())
    };
    tokio::time::timeout(Duration::from_secs(3), call)
        .await
        .unwrap_or_else(|_| Err(format!("list Nodes on {addr} timed out")))
}

impl LocalCluster {
    /// Creates the cluster described by `options` and waits until it is healthy. On failure
    /// everything made so far is removed again.
    pub async fn up(options: &UpOptions) -> Result<LocalCluster, LocalError> {
        validate_name(&options.name)?;
        if options.nodes == 0 || options.nodes > MAX_NODES {
            return Err(LocalError::Invalid(format!(
                "--nodes {}: a local cluster has 1 to {MAX_NODES} nodes",
                options.nodes
            )));
        }
        if ![1, 3, 5].contains(&options.voters) {
            return Err(LocalError::Invalid(format!(
                "--voters {}: a cluster keeps 1, 3 or 5 voters",
                options.voters
            )));
        }
        let docker = connect_docker().await?;
        if !containers_labelled(&docker, &[(labels::LOCAL, &options.name)])
            .await?
            .is_empty()
        {
            return Err(LocalError::Invalid(format!(
                "a local cluster named {:?} exists already (flotilla local down --name {} removes it)",
                options.name, options.name
            )));
        }
        let image = image::ensure_node_image(&docker, &options.binary).await?;
        let networks = docker
            .list_networks(None::<bollard::query_parameters::ListNetworksOptions>)
            .await
            .map_err(docker_error("list networks"))?;
        let used_subnets: Vec<String> = networks
            .iter()
            .filter_map(|network| network.ipam.as_ref()?.config.as_ref())
            .flatten()
            .filter_map(|config| config.subnet.clone())
            .collect();
        let addressing = choose_addressing(&options.name, &used_subnets).ok_or_else(|| {
            LocalError::Invalid(
                "no free 10.200-254.0.0/16 range is left on this Docker daemon".into(),
            )
        })?;
        let cluster = LocalCluster {
            docker: docker.clone(),
            name: options.name.clone(),
            cluster_id: uuid::Uuid::new_v4().to_string(),
            addressing,
            image,
            voters: options.voters,
            nodes: Vec::new(),
            node_args: options.node_args.clone(),
            log_filter: options.log_filter.clone(),
            credentials: None,
            join_token: None,
        };
        let made = cluster.create(options).await;
        match made {
            Ok(cluster) => Ok(cluster),
            Err(error) => {
                let _ = down(&docker, &options.name).await;
                Err(error)
            }
        }
    }

    async fn create(mut self, options: &UpOptions) -> Result<LocalCluster, LocalError> {
        let mut network_labels = HashMap::from([
            (labels::LOCAL.to_owned(), self.name.clone()),
            (
                labels::LOCAL_PREFIX.to_owned(),
                self.addressing.prefix.to_string(),
            ),
        ]);
        self.create_network(
            &cluster_network(&self.name),
            &self.addressing.cluster_subnet(),
            None,
            false,
            &network_labels,
        )
        .await?;
        network_labels.remove(labels::LOCAL_PREFIX);
        for index in 1..=options.nodes {
            let disk = options
                .small_disk_mib
                .iter()
                .find(|(node, _)| *node == index)
                .map(|(_, mib)| *mib);
            self.start_node(index, disk).await?;
            if index == 1 {
                self.credentials = Some(
                    self.read_credentials(&self.node_name(1), options.ready_timeout)
                        .await?,
                );
            }
        }
        self.wait_healthy(options.ready_timeout).await?;
        Ok(self)
    }

    /// The admin's credentials node `node` wrote when it initialized the cluster, waiting up to
    /// `timeout` for them; the servers are every node's address.
    async fn read_credentials(
        &self,
        node: &str,
        timeout: Duration,
    ) -> Result<CredentialsFile, LocalError> {
        let deadline = Instant::now() + timeout;
        loop {
            let last = match self.file_in_data_dir(node, "admin.json").await {
                Ok(bytes) => match serde_json::from_slice::<CredentialsFile>(&bytes) {
                    Ok(mut credentials) => {
                        credentials.servers =
                            self.nodes.iter().map(|n| n.addr().to_string()).collect();
                        return Ok(credentials);
                    }
                    Err(error) => error.to_string(),
                },
                Err(error) => error.to_string(),
            };
            if Instant::now() > deadline {
                return Err(LocalError::Timeout {
                    what: format!("{node} to write the admin credentials"),
                    waited: timeout,
                    last,
                });
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Loads the admin's credentials from node 1 (an attached cluster); without them the
    /// cluster can still be inspected and taken down.
    async fn with_credentials(mut self) -> LocalCluster {
        match self
            .read_credentials(&self.node_name(1), Duration::ZERO)
            .await
        {
            Ok(credentials) => self.credentials = Some(credentials),
            Err(error) => tracing::debug!(%error, "read the local cluster's admin credentials"),
        }
        self
    }

    /// The admin's credentials (with every node as a server), if known.
    pub fn credentials(&self) -> Option<&CredentialsFile> {
        self.credentials.as_ref()
    }

    /// Writes the admin's credentials to `~/.flotilla/local-<name>.json` (or under the temp
    /// dir without a home) and returns the path.
    pub fn write_credentials(&self) -> Result<PathBuf, LocalError> {
        let credentials = self.credentials.as_ref().ok_or_else(|| {
            LocalError::Invalid(format!(
                "local cluster {:?} has no admin credentials",
                self.name
            ))
        })?;
        let path = credentials_path(&self.name);
        credentials.write(&path).map_err(|e| LocalError::Command {
            action: "write the admin credentials".into(),
            message: e.to_string(),
        })?;
        Ok(path)
    }

    /// The cluster's join token, asked of the first node once.
    async fn join_token(&mut self) -> Result<String, LocalError> {
        if let Some(token) = &self.join_token {
            return Ok(token.clone());
        }
        let first = self
            .nodes
            .first()
            .map(LocalNode::addr)
            .ok_or_else(|| LocalError::Invalid("no node to join through".into()))?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let attempt = async {
                let channel = channel_to(first, self.credentials.as_ref()).await?;
                ClusterClient::new(channel)
                    .join_token(JoinTokenRequest { rotate: false })
                    .await
                    .map(|reply| reply.into_inner().token)
                    .map_err(|status| status.message().to_owned())
            };
            match attempt.await {
                Ok(token) => {
                    self.join_token = Some(token.clone());
                    return Ok(token);
                }
                Err(last) if Instant::now() > deadline => {
                    return Err(LocalError::Timeout {
                        what: "the join token".into(),
                        waited: Duration::from_secs(60),
                        last,
                    })
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
            }
        }
    }

    /// One file of a node's data directory.
    async fn file_in_data_dir(&self, node: &str, file: &str) -> Result<Vec<u8>, LocalError> {
        let node = self.node(node)?;
        let path = format!("/data/{file}");
        let options = DownloadFromContainerOptionsBuilder::default()
            .path(&path)
            .build();
        let mut stream = self
            .docker
            .download_from_container(&node.container, Some(options));
        let mut archive = Vec::new();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(docker_error(format!(
                "copy {path} out of {}",
                node.container
            )))?;
            archive.extend_from_slice(&chunk);
        }
        first_file_of_tar(&archive).ok_or_else(|| {
            LocalError::Invalid(format!("{path} in {} is not a file", node.container))
        })
    }

    async fn create_network(
        &self,
        name: &str,
        subnet: &str,
        gateway: Option<Ipv4Addr>,
        gateway_in_node: bool,
        network_labels: &HashMap<String, String>,
    ) -> Result<(), LocalError> {
        let mut driver_options = HashMap::new();
        if gateway_in_node {
            driver_options.insert(
                "com.docker.network.bridge.inhibit_ipv4".to_owned(),
                "true".to_owned(),
            );
        }
        let request = NetworkCreateRequest {
            name: name.to_owned(),
            driver: Some("bridge".into()),
            ipam: Some(Ipam {
                driver: Some("default".into()),
                config: Some(vec![IpamConfig {
                    subnet: Some(subnet.to_owned()),
                    gateway: gateway.map(|g| g.to_string()),
                    ..Default::default()
                }]),
                options: None,
            }),
            options: Some(driver_options),
            labels: Some(network_labels.clone()),
            ..Default::default()
        };
        self.docker
            .create_network(request)
            .await
            .map_err(docker_error(format!("create network {name} ({subnet})")))?;
        Ok(())
    }

    fn node_name(&self, index: usize) -> String {
        format!("{}-n{index}", self.name)
    }

    /// Creates node `index`'s pod network and container and starts it: node 1 initializes the
    /// cluster, every other node joins through node 1.
    async fn start_node(
        &mut self,
        index: usize,
        small_disk_mib: Option<u64>,
    ) -> Result<(), LocalError> {
        let node_name = self.node_name(index);
        let container = format!("flt-{node_name}");
        let ip = self.addressing.node_ip(index);
        let pods = pod_network(&self.name, index);
        self.create_network(
            &pods,
            &self.addressing.pod_cidr(index),
            Some(self.addressing.pod_gateway(index)),
            true,
            &HashMap::from([(labels::LOCAL.to_owned(), self.name.clone())]),
        )
        .await?;
        let mut command = vec![
            "serve".to_string(),
            "--name".into(),
            node_name.clone(),
            "--data-dir".into(),
            "/data".into(),
            "--listen".into(),
            format!("0.0.0.0:{NODE_PORT}"),
            "--advertise".into(),
            format!("{ip}:{NODE_PORT}"),
            "--node-ip".into(),
            ip.to_string(),
            "--cluster-cidr".into(),
            self.addressing.cluster_cidr(),
            "--pod-cidr".into(),
            self.addressing.pod_cidr(index),
            "--pod-network".into(),
            pods.clone(),
            "--pod-gateway-in-node".into(),
            "--voters".into(),
            self.voters.to_string(),
        ];
        if index == 1 {
            command.extend([
                "--init".into(),
                "--cluster-id".into(),
                self.cluster_id.clone(),
            ]);
        } else {
            let through = self
                .nodes
                .first()
                .map(LocalNode::addr)
                .unwrap_or_else(|| SocketAddr::from((self.addressing.node_ip(1), NODE_PORT)));
            let token = self.join_token().await?;
            command.extend([
                "--join".into(),
                through.to_string(),
                "--token".into(),
                token,
            ]);
        }
        command.extend(self.node_args.iter().cloned());
        let container_labels = HashMap::from([
            (labels::LOCAL.to_owned(), self.name.clone()),
            (labels::LOCAL_NODE.to_owned(), node_name.clone()),
            (labels::LOCAL_INDEX.to_owned(), index.to_string()),
            (labels::CLUSTER.to_owned(), self.cluster_id.clone()),
        ]);
        let host_config = HostConfig {
            network_mode: Some(cluster_network(&self.name)),
            cap_add: Some(vec!["NET_ADMIN".into()]),
            sysctls: Some(HashMap::from([(
                "net.ipv4.ip_forward".to_owned(),
                "1".to_owned(),
            )])),
            binds: Some(vec!["/var/run/docker.sock:/var/run/docker.sock".into()]),
            tmpfs: small_disk_mib
                .map(|mib| HashMap::from([("/data".to_owned(), format!("size={mib}m"))])),
            privileged: Some(false),
            ..Default::default()
        };
        let body = ContainerCreateBody {
            image: Some(self.image.clone()),
            hostname: Some(node_name.clone()),
            cmd: Some(command),
            env: Some(vec![format!("FLOTILLA_LOG={}", self.log_filter)]),
            labels: Some(container_labels),
            host_config: Some(host_config),
            networking_config: Some(NetworkingConfig {
                endpoints_config: Some(HashMap::from([(
                    cluster_network(&self.name),
                    endpoint_with_address(ip),
                )])),
            }),
            ..Default::default()
        };
        let options = CreateContainerOptionsBuilder::default()
            .name(&container)
            .build();
        self.docker
            .create_container(Some(options), body)
            .await
            .map_err(docker_error(format!("create node container {container}")))?;
        self.docker
            .connect_network(
                &pods,
                NetworkConnectRequest {
                    container: container.clone(),
                    endpoint_config: Some(endpoint_with_address(
                        self.addressing.node_pod_address(index),
                    )),
                },
            )
            .await
            .map_err(docker_error(format!("attach {container} to {pods}")))?;
        self.docker
            .start_container(&container, None)
            .await
            .map_err(docker_error(format!("start node container {container}")))?;
        self.nodes.push(LocalNode {
            name: node_name,
            index,
            container,
            ip,
        });
        Ok(())
    }

    /// Adds one node to the running cluster (it joins through `through`, or the first node)
    /// and returns it; it is a learner until the cluster needs a voter.
    pub async fn add_node(&mut self, through: Option<&str>) -> Result<LocalNode, LocalError> {
        let index = self.nodes.iter().map(|n| n.index).max().unwrap_or(0) + 1;
        if index > MAX_NODES {
            return Err(LocalError::Invalid(format!(
                "a local cluster has at most {MAX_NODES} nodes"
            )));
        }
        if let Some(through) = through {
            let through = self.node(through)?.clone();
            // Node 1 is the default; put the chosen one first for start_node.
            self.nodes.retain(|n| n.name != through.name);
            self.nodes.insert(0, through);
        }
        self.start_node(index, None).await?;
        self.nodes.sort_by_key(|n| n.index);
        self.node(&self.node_name(index)).cloned()
    }

    /// Finds the running or stopped local cluster `name` by its labels.
    pub async fn attach(name: &str) -> Result<LocalCluster, LocalError> {
        let docker = connect_docker().await?;
        let containers = containers_labelled(&docker, &[(labels::LOCAL, name)]).await?;
        if containers.is_empty() {
            return Err(LocalError::NoSuchCluster { name: name.into() });
        }
        let filters = label_filter(&[(labels::LOCAL, name)]);
        let options = ListNetworksOptionsBuilder::default()
            .filters(&filters)
            .build();
        let prefix = docker
            .list_networks(Some(options))
            .await
            .map_err(docker_error("list networks"))?
            .into_iter()
            .find_map(|network| {
                network
                    .labels?
                    .get(labels::LOCAL_PREFIX)?
                    .parse::<u8>()
                    .ok()
            })
            .ok_or_else(|| LocalError::NoSuchCluster { name: name.into() })?;
        let addressing = Addressing { prefix };
        let mut cluster_id = String::new();
        let mut image = String::new();
        let mut voters = 3;
        let mut node_args = Vec::new();
        let mut log_filter = String::new();
        let mut nodes = Vec::new();
        for (id, container_labels) in &containers {
            let (Some(node_name), Some(index)) = (
                container_labels.get(labels::LOCAL_NODE),
                container_labels
                    .get(labels::LOCAL_INDEX)
                    .and_then(|i| i.parse::<usize>().ok()),
            ) else {
                continue;
            };
            cluster_id = container_labels
                .get(labels::CLUSTER)
                .cloned()
                .unwrap_or_default();
            let inspected = docker
                .inspect_container(id, None)
                .await
                .map_err(docker_error(format!("inspect container {id}")))?;
            let config = inspected.config.unwrap_or_default();
            image = config.image.unwrap_or_default();
            let command = config.cmd.unwrap_or_default();
            if let Some(v) = flag_value(&command, "--voters").and_then(|v| v.parse().ok()) {
                voters = v;
            }
            node_args = extra_args(&command);
            log_filter = config
                .env
                .unwrap_or_default()
                .iter()
                .find_map(|e| e.strip_prefix("FLOTILLA_LOG=").map(str::to_owned))
                .unwrap_or_default();
            nodes.push(LocalNode {
                name: node_name.clone(),
                index,
                container: inspected
                    .name
                    .unwrap_or_default()
                    .trim_start_matches('/')
                    .to_owned(),
                ip: addressing.node_ip(index),
            });
        }
        nodes.sort_by_key(|n| n.index);
        Ok(LocalCluster {
            docker,
            name: name.to_owned(),
            cluster_id,
            addressing,
            image,
            voters,
            nodes,
            node_args,
            log_filter,
            credentials: None,
            join_token: None,
        }
        .with_credentials()
        .await)
    }

    /// Removes everything of this cluster; see [`down`].
    pub async fn down(&self) -> Result<DownReport, LocalError> {
        down(&self.docker, &self.name).await
    }

    pub fn nodes(&self) -> &[LocalNode] {
        &self.nodes
    }

    /// The node named `name` (its cluster name, `NAME-nI`, or just `nI`).
    pub fn node(&self, name: &str) -> Result<&LocalNode, LocalError> {
        self.nodes
            .iter()
            .find(|n| {
                n.name == name || n.name == format!("{}-{name}", self.name) || n.container == name
            })
            .ok_or_else(|| LocalError::NoSuchNode {
                cluster: self.name.clone(),
                node: name.to_owned(),
                known: self
                    .nodes
                    .iter()
                    .map(|n| n.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }

    /// Every node's gRPC address, comma-separated, for `--server` or `FLOTILLA_SERVER`.
    pub fn servers(&self) -> String {
        self.nodes
            .iter()
            .map(|n| n.addr().to_string())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The Docker client the cluster uses.
    pub fn docker(&self) -> &Docker {
        &self.docker
    }

    /// Waits until every node answers, all agree on one leader, the leader counts every node
    /// a healthy member with the voters the cluster keeps, and every Node is Ready (unless the
    /// nodes run without agents).
    pub async fn wait_healthy(&self, timeout: Duration) -> Result<(), LocalError> {
        let started = Instant::now();
        let expected_voters = self.voters.min(self.nodes.len());
        let agents = !self.node_args.iter().any(|a| a == "--no-agent");
        let mut last = String::from("no answer yet");
        while started.elapsed() < timeout {
            match self.health_problem(expected_voters, agents).await {
                None => return Ok(()),
                Some(problem) => last = problem,
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        Err(LocalError::Timeout {
            what: format!("local cluster {} to become healthy", self.name),
            waited: timeout,
            last,
        })
    }

    /// What keeps the cluster from being healthy, if anything.
    async fn health_problem(&self, expected_voters: usize, agents: bool) -> Option<String> {
        let mut leader = None;
        for node in &self.nodes {
            let status = match node_status(node.addr(), self.credentials.as_ref()).await {
                Ok(status) => status,
                Err(error) => return Some(format!("{}: {error}", node.name)),
            };
            let Some(seen) = status
                .get("leader")
                .and_then(Value::as_str)
                .map(str::to_owned)
            else {
                return Some(format!("{} knows no leader", node.name));
            };
            match &leader {
                None => leader = Some(seen),
                Some(known) if *known != seen => {
                    return Some(format!("{} follows {seen}, others {known}", node.name))
                }
                Some(_) => {}
            }
        }
        let leader = self
            .nodes
            .iter()
            .find(|n| Some(&n.name) == leader.as_ref())?;
        let status = match node_status(leader.addr(), self.credentials.as_ref()).await {
            Ok(status) => status,
            Err(error) => return Some(format!("leader {}: {error}", leader.name)),
        };
        let members = status
            .get("members")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let healthy = members
            .iter()
            .filter(|m| m.get("healthy").and_then(Value::as_bool) == Some(true))
            .count();
        let voters = members
            .iter()
            .filter(|m| m.get("role").and_then(Value::as_str) == Some("voter"))
            .count();
        if members.len() != self.nodes.len()
            || healthy != members.len()
            || voters != expected_voters
        {
            return Some(format!(
                "{} members ({healthy} healthy, {voters} voters) of {} nodes, {expected_voters} voters wanted",
                members.len(),
                self.nodes.len()
            ));
        }
        if agents {
            match ready_nodes(leader.addr(), self.credentials.as_ref()).await {
                Ok(ready) if ready >= self.nodes.len() => {}
                Ok(ready) => return Some(format!("{ready} of {} Nodes Ready", self.nodes.len())),
                Err(error) => return Some(error),
            }
        }
        None
    }

    /// Kills the node's process at once (SIGKILL). With `with_pods`, also kills its pods'
    /// containers, as the loss of the whole machine would.
    pub async fn kill(&self, node: &str, with_pods: bool) -> Result<(), LocalError> {
        let node = self.node(node)?;
        self.kill_container(&node.container).await?;
        if with_pods {
            for (id, _) in self.pod_containers(&node.name).await? {
                self.kill_container(&id).await?;
            }
        }
        Ok(())
    }

    /// The containers the node's agent made for its pods.
    pub async fn pod_containers(
        &self,
        node: &str,
    ) -> Result<Vec<(String, HashMap<String, String>)>, LocalError> {
        containers_labelled(
            &self.docker,
            &[(labels::CLUSTER, &self.cluster_id), (labels::NODE, node)],
        )
        .await
    }

    async fn kill_container(&self, id: &str) -> Result<(), LocalError> {
        let options = KillContainerOptionsBuilder::default()
            .signal("KILL")
            .build();
        match self.docker.kill_container(id, Some(options)).await {
            Ok(()) => Ok(()),
            // Not running (409) or gone (404): already as dead as a kill makes it.
            Err(error) if matches!(docker_status(&error), Some(404) | Some(409)) => Ok(()),
            Err(error) => Err(docker_error(format!("kill container {id}"))(error)),
        }
    }

    /// Freezes the node (cgroup freezer): its process stops without noticing.
    pub async fn pause(&self, node: &str) -> Result<(), LocalError> {
        let node = self.node(node)?;
        self.docker
            .pause_container(&node.container)
            .await
            .map_err(docker_error(format!("pause {}", node.container)))
    }

    pub async fn unpause(&self, node: &str) -> Result<(), LocalError> {
        let node = self.node(node)?;
        self.docker
            .unpause_container(&node.container)
            .await
            .map_err(docker_error(format!("unpause {}", node.container)))
    }

    /// Starts a killed node again, or stops (SIGTERM, grace period) and starts a running one.
    /// It keeps its data directory and identity.
    pub async fn restart(&self, node: &str) -> Result<(), LocalError> {
        let node = self.node(node)?;
        let options = RestartContainerOptionsBuilder::default().t(10).build();
        self.docker
            .restart_container(&node.container, Some(options))
            .await
            .map_err(docker_error(format!("restart {}", node.container)))
    }

    async fn node_pid(&self, node: &LocalNode) -> Result<i64, LocalError> {
        let inspected = self
            .docker
            .inspect_container(&node.container, None)
            .await
            .map_err(docker_error(format!("inspect {}", node.container)))?;
        inspected
            .state
            .and_then(|state| state.pid)
            .filter(|pid| *pid > 0)
            .ok_or_else(|| LocalError::Invalid(format!("node {} is not running", node.name)))
    }

    /// Silently drops the node's traffic with its peers: what it receives from them, and
    /// unless `one_way` also what it sends them. Clients still reach it.
    pub async fn isolate(&self, node: &str, one_way: bool) -> Result<(), LocalError> {
        let node = self.node(node)?;
        let peers: Vec<Ipv4Addr> = self
            .nodes
            .iter()
            .filter(|other| other.name != node.name)
            .map(|other| other.ip)
            .collect();
        let pid = self.node_pid(node).await?;
        let rules = faults::isolate_rules(&peers, one_way);
        tokio::task::spawn_blocking(move || faults::apply(pid, &rules))
            .await
            .map_err(|error| LocalError::Command {
                action: "isolate".into(),
                message: error.to_string(),
            })?
    }

    /// Undoes every isolation of the node.
    pub async fn heal(&self, node: &str) -> Result<(), LocalError> {
        let node = self.node(node)?;
        let pid = self.node_pid(node).await?;
        let rules = faults::heal_rules();
        tokio::task::spawn_blocking(move || faults::apply(pid, &rules))
            .await
            .map_err(|error| LocalError::Command {
                action: "heal".into(),
                message: error.to_string(),
            })?
    }

    /// The node container's output (the node's log), all of it.
    pub async fn logs(&self, node: &str) -> Result<Vec<u8>, LocalError> {
        let node = self.node(node)?;
        let options = LogsOptionsBuilder::default()
            .stdout(true)
            .stderr(true)
            .tail("all")
            .build();
        let mut stream = self.docker.logs(&node.container, Some(options));
        let mut bytes = Vec::new();
        while let Some(chunk) = stream.next().await {
            let chunk =
                chunk.map_err(docker_error(format!("read the logs of {}", node.container)))?;
            bytes.extend_from_slice(&chunk.into_bytes());
        }
        Ok(bytes)
    }

    /// Runs `command` in the node container and returns what it printed (stdout and stderr).
    pub async fn exec(&self, node: &str, command: &[&str]) -> Result<String, LocalError> {
        use bollard::exec::{CreateExecOptions, StartExecResults};
        let node = self.node(node)?;
        let options = CreateExecOptions {
            cmd: Some(command.iter().map(|part| (*part).to_owned()).collect()),
            attach_stdout: Some(true),
            attach_stderr: Some(true),
            ..Default::default()
        };
        let action = format!("run {command:?} in {}", node.container);
        let created = self
            .docker
            .create_exec(&node.container, options)
            .await
            .map_err(docker_error(action.clone()))?;
        let mut printed = Vec::new();
        if let StartExecResults::Attached { mut output, .. } = self
            .docker
            .start_exec(&created.id, None)
            .await
            .map_err(docker_error(action.clone()))?
        {
            while let Some(chunk) = output.next().await {
                printed
                    .extend_from_slice(&chunk.map_err(docker_error(action.clone()))?.into_bytes());
            }
        }
        Ok(String::from_utf8_lossy(&printed).into_owned())
    }

    /// The node's data directory as a tar archive.
    pub async fn data_dir_archive(&self, node: &str) -> Result<Vec<u8>, LocalError> {
        let node = self.node(node)?;
        let options = DownloadFromContainerOptionsBuilder::default()
            .path("/data")
            .build();
        let mut stream = self
            .docker
            .download_from_container(&node.container, Some(options));
        let mut bytes = Vec::new();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(docker_error(format!(
                "copy /data out of {}",
                node.container
            )))?;
            bytes.extend_from_slice(&chunk);
        }
        Ok(bytes)
    }
}

/// Where `flotilla local up` keeps the admin's credentials of cluster `name`:
/// `~/.flotilla/local-<name>.json` (under the temp dir without a home).
pub fn credentials_path(name: &str) -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir)
        .join(".flotilla")
        .join(format!("local-{name}.json"))
}

/// The content of the first entry of a tar archive (ustar: a 512-byte header with the size in
/// octal at bytes 124..136, then the content).
fn first_file_of_tar(archive: &[u8]) -> Option<Vec<u8>> {
    let header = archive.get(..512)?;
    let size_field = std::str::from_utf8(&header[124..136]).ok()?;
    let size =
        usize::from_str_radix(size_field.trim_matches(|c: char| c == '\0' || c == ' '), 8).ok()?;
    archive.get(512..512 + size).map(<[u8]>::to_vec)
}

fn endpoint_with_address(ip: Ipv4Addr) -> EndpointSettings {
    EndpointSettings {
        ipam_config: Some(EndpointIpamConfig {
            ipv4_address: Some(ip.to_string()),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn flag_value<'a>(command: &'a [String], flag: &str) -> Option<&'a str> {
    command
        .iter()
        .position(|a| a == flag)
        .and_then(|i| command.get(i + 1))
        .map(String::as_str)
}

/// The flags of a node's command after the ones `start_node` sets (`--voters N` and then
/// `--init --cluster-id ID` or `--join ADDR`).
fn extra_args(command: &[String]) -> Vec<String> {
    let Some(voters) = command.iter().position(|a| a == "--voters") else {
        return Vec::new();
    };
    let rest = command.get(voters + 2..).unwrap_or_default();
    let skip = match rest.first().map(String::as_str) {
        Some("--init") => 3,
        Some("--join") => 2,
        _ => 0,
    };
    rest.get(skip..).unwrap_or_default().to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_names_are_dns_labels() {
        assert!(validate_name("demo-1").is_ok());
        assert!(validate_name("Demo").is_err());
        assert!(validate_name("-demo").is_err());
        assert!(validate_name("").is_err());
        assert!(validate_name(&"a".repeat(31)).is_err());
    }

    #[test]
    fn the_extra_flags_of_a_node_are_recovered_from_its_command() {
        let command: Vec<String> = [
            "serve",
            "--voters",
            "3",
            "--join",
            "10.1.0.11:7070",
            "--heartbeat-ms",
            "200",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(extra_args(&command), vec!["--heartbeat-ms", "200"]);
        let first: Vec<String> = [
            "serve",
            "--voters",
            "5",
            "--init",
            "--cluster-id",
            "x",
            "--no-agent",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(extra_args(&first), vec!["--no-agent"]);
        assert_eq!(flag_value(&first, "--voters"), Some("5"));
    }
}
