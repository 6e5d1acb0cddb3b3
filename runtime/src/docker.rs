//! `ContainerRuntime` for the Docker Engine, through bollard. The daemon on the machines this
//! runs on is Debian's docker.io 20.10 (API 1.41); the client negotiates the version down.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use bollard::container::LogOutput;
use bollard::errors::Error as DockerError;
use bollard::exec::{CreateExecOptions, StartExecResults};
use bollard::models::{
    ContainerCreateBody, ContainerInspectResponse, ContainerStateStatusEnum, EndpointIpamConfig,
    EndpointSettings, HostConfig, Ipam, IpamConfig, NetworkCreateRequest, NetworkingConfig,
};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, CreateImageOptionsBuilder, ListContainersOptionsBuilder,
    ListNetworksOptionsBuilder, LogsOptionsBuilder, RemoveContainerOptionsBuilder,
    StopContainerOptionsBuilder,
};
use bollard::Docker;
use futures::stream::{BoxStream, StreamExt, TryStreamExt};

use crate::host_bridge::{self, HostBridge};
use crate::{
    labels, ContainerInfo, ContainerRuntime, ContainerSpec, ContainerState, ContainerSummary,
    ExecInput, ExecOutput, NetworkMode, NetworkSpec, PullPolicy, RuntimeError,
};

/// A pull fails when the engine reports nothing for this long.
const DEFAULT_PULL_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// A pull fails when it takes longer than this in all.
const DEFAULT_PULL_TOTAL_TIMEOUT: Duration = Duration::from_secs(15 * 60);
/// Extra time given to a stop request beyond the grace period (the kill and its reaping).
const STOP_REQUEST_SLACK: Duration = Duration::from_secs(60);
/// How many containers `list_containers` inspects at once.
const INSPECT_CONCURRENCY: usize = 8;
/// Output of an exec beyond this many bytes per stream is dropped.
const EXEC_OUTPUT_LIMIT: usize = 16 * 1024 * 1024;
/// The network option that keeps the gateway address off the host's bridge.
const INHIBIT_IPV4_OPTION: &str = "com.docker.network.bridge.inhibit_ipv4";

/// The Docker Engine, reached over its local socket (`DOCKER_HOST` or `/var/run/docker.sock`).
#[derive(Debug, Clone)]
pub struct DockerRuntime {
    docker: Docker,
    pull_idle_timeout: Duration,
    pull_total_timeout: Duration,
    /// Serializes `ensure_network`: API 1.41 accepts two networks of one name, so a
    /// check-then-create must not race with itself.
    network_lock: std::sync::Arc<tokio::sync::Mutex<()>>,
    /// The host bridges `ensure_network` made sure of, by name: containers on them are wired
    /// when they start.
    host_bridges: std::sync::Arc<std::sync::Mutex<HashMap<String, HostBridge>>>,
}

impl DockerRuntime {
    /// The engine's summaries of every container (running or not) carrying all of `labels`.
    async fn list_labelled(
        &self,
        labels: &BTreeMap<String, String>,
    ) -> Result<Vec<bollard::models::ContainerSummary>, RuntimeError> {
        let selectors: Vec<String> = labels
            .iter()
            .map(|(key, value)| format!("{key}={value}"))
            .collect();
        let mut filters = HashMap::new();
        if !selectors.is_empty() {
            filters.insert("label", selectors);
        }
        let options = ListContainersOptionsBuilder::default()
            .all(true)
            .filters(&filters)
            .build();
        self.docker
            .list_containers(Some(options))
            .await
            .map_err(|e| engine("list containers", e))
    }

    /// Connects with the local defaults and negotiates the API version with the daemon.
    pub async fn connect() -> Result<DockerRuntime, RuntimeError> {
        let docker =
            Docker::connect_with_local_defaults().map_err(|e| engine("connect to docker", e))?;
        let docker = docker
            .negotiate_version()
            .await
            .map_err(|e| engine("negotiate the docker API version", e))?;
        Ok(DockerRuntime {
            docker,
            pull_idle_timeout: DEFAULT_PULL_IDLE_TIMEOUT,
            pull_total_timeout: DEFAULT_PULL_TOTAL_TIMEOUT,
            network_lock: Default::default(),
            host_bridges: Default::default(),
        })
    }

    /// Bounds image pulls: a pull fails when the engine reports no progress for `idle`, or when
    /// it takes longer than `total` (defaults: 30 s and 15 min).
    pub fn with_pull_timeouts(mut self, idle: Duration, total: Duration) -> DockerRuntime {
        self.pull_idle_timeout = idle;
        self.pull_total_timeout = total;
        self
    }

    /// The bollard client, for what the trait does not cover (tests, diagnostics).
    pub fn client(&self) -> &Docker {
        &self.docker
    }

    async fn image_present(&self, image: &str) -> Result<bool, RuntimeError> {
        match self.docker.inspect_image(image).await {
            Ok(_) => Ok(true),
            Err(e) if status(&e) == Some(404) => Ok(false),
            Err(e) => Err(engine(format!("inspect image {image}"), e)),
        }
    }

    async fn pull(&self, image: &str) -> Result<(), RuntimeError> {
        let (repository, tag) = split_reference(image);
        let mut options = CreateImageOptionsBuilder::default().from_image(repository);
        if let Some(tag) = tag {
            options = options.tag(tag);
        }
        let mut progress = self.docker.create_image(Some(options.build()), None, None);
        let idle = self.pull_idle_timeout;
        let failed = |message: String| RuntimeError::ImagePull {
            image: image.to_owned(),
            message,
        };
        let pulling = async {
            loop {
                match tokio::time::timeout(idle, progress.next()).await {
                    Err(_) => return Err(failed(format!("no progress for {} s", idle.as_secs()))),
                    Ok(None) => return Ok(()),
                    Ok(Some(Ok(_))) => {}
                    Ok(Some(Err(e))) => return Err(failed(message(&e))),
                }
            }
        };
        match tokio::time::timeout(self.pull_total_timeout, pulling).await {
            Ok(result) => result,
            Err(_) => Err(failed(format!(
                "not done after {} s",
                self.pull_total_timeout.as_secs()
            ))),
        }
    }

    async fn network_exists(&self, name: &str) -> Result<bool, RuntimeError> {
        let filters = HashMap::from([("name", vec![name])]);
        let options = ListNetworksOptionsBuilder::default()
            .filters(&filters)
            .build();
        let networks = self
            .docker
            .list_networks(Some(options))
            .await
            .map_err(|e| engine(format!("list networks named {name}"), e))?;
        // The name filter matches substrings.
        Ok(networks
            .iter()
            .any(|network| network.name.as_deref() == Some(name)))
    }

    async fn exec_to_end(
        &self,
        id: &str,
        command: &[String],
        input: &ExecInput,
    ) -> Result<ExecOutput, RuntimeError> {
        let options = CreateExecOptions {
            attach_stdout: Some(true),
            attach_stderr: Some(true),
            attach_stdin: Some(input.stdin.is_some()),
            tty: Some(input.tty),
            cmd: Some(command.to_vec()),
            ..Default::default()
        };
        let created = self
            .docker
            .create_exec(id, options)
            .await
            .map_err(|e| container_error(&format!("exec in container {id}"), id, e))?;
        let mut output = match self.docker.start_exec(&created.id, None).await {
            Ok(StartExecResults::Attached {
                output,
                input: mut stdin_writer,
            }) => {
                // The command's stdin is all of `input.stdin`, then end of file.
                if let Some(stdin) = &input.stdin {
                    use tokio::io::AsyncWriteExt;
                    let io_error = |what: &str, e: std::io::Error| RuntimeError::Engine {
                        operation: format!("{what} exec stdin in container {id}"),
                        message: e.to_string(),
                    };
                    stdin_writer
                        .write_all(stdin)
                        .await
                        .map_err(|e| io_error("write", e))?;
                    stdin_writer
                        .shutdown()
                        .await
                        .map_err(|e| io_error("close", e))?;
                }
                output
            }
            Ok(StartExecResults::Detached) => {
                return Err(RuntimeError::Engine {
                    operation: format!("exec in container {id}"),
                    message: "the exec started detached".to_owned(),
                })
            }
            Err(e) => return Err(container_error(&format!("exec in container {id}"), id, e)),
        };
        let mut stdout = Vec::new();
        let mut stderr = Vec::new();
        while let Some(chunk) = output.next().await {
            let chunk =
                chunk.map_err(|e| engine(format!("read exec output in container {id}"), e))?;
            let (buffer, bytes) = match chunk {
                LogOutput::StdOut { message } | LogOutput::Console { message } => {
                    (&mut stdout, message)
                }
                LogOutput::StdErr { message } => (&mut stderr, message),
                LogOutput::StdIn { .. } => continue,
            };
            let room = EXEC_OUTPUT_LIMIT.saturating_sub(buffer.len());
            buffer.extend_from_slice(&bytes[..bytes.len().min(room)]);
        }
        // The output ends when the process closes it; the engine may record the exit a moment
        // later. The caller's timeout bounds this loop.
        loop {
            let inspected = self
                .docker
                .inspect_exec(&created.id)
                .await
                .map_err(|e| engine(format!("inspect exec in container {id}"), e))?;
            if inspected.running != Some(true) {
                let exit_code = inspected.exit_code.ok_or_else(|| RuntimeError::Engine {
                    operation: format!("exec in container {id}"),
                    message: "the engine reported no exit code".to_owned(),
                })?;
                return Ok(ExecOutput {
                    exit_code,
                    stdout,
                    stderr,
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

#[async_trait::async_trait]
impl ContainerRuntime for DockerRuntime {
    async fn ensure_image(&self, image: &str, policy: PullPolicy) -> Result<(), RuntimeError> {
        match policy {
            PullPolicy::Always => self.pull(image).await,
            PullPolicy::IfNotPresent => {
                if self.image_present(image).await? {
                    Ok(())
                } else {
                    self.pull(image).await
                }
            }
            PullPolicy::Never => {
                if self.image_present(image).await? {
                    Ok(())
                } else {
                    Err(RuntimeError::ImageNeverPull {
                        image: image.to_owned(),
                    })
                }
            }
        }
    }

    async fn ensure_network(&self, network: &NetworkSpec) -> Result<(), RuntimeError> {
        let _serialized = self.network_lock.lock().await;
        if network.host_bridge {
            let bridge = host_bridge_of(network)?;
            host_bridge::ensure(&bridge).await?;
            self.bridges().insert(bridge.name.clone(), bridge);
            return Ok(());
        }
        if self.network_exists(&network.name).await? {
            return Ok(());
        }
        let mut options = HashMap::new();
        if network.inhibit_host_address {
            options.insert(INHIBIT_IPV4_OPTION.to_owned(), "true".to_owned());
        }
        let request = NetworkCreateRequest {
            name: network.name.clone(),
            driver: Some("bridge".to_owned()),
            ipam: Some(Ipam {
                driver: Some("default".to_owned()),
                config: Some(vec![IpamConfig {
                    subnet: Some(network.subnet.clone()),
                    gateway: network.gateway.clone(),
                    ..Default::default()
                }]),
                options: None,
            }),
            options: Some(options),
            labels: Some(to_hash_map(&network.labels)),
            ..Default::default()
        };
        match self.docker.create_network(request).await {
            Ok(_) => Ok(()),
            // Created by someone else (another process on this daemon) in the meantime.
            Err(e) if status(&e) == Some(409) => Ok(()),
            Err(e) => Err(engine(format!("create network {}", network.name), e)),
        }
    }

    async fn remove_network(&self, name: &str) -> Result<(), RuntimeError> {
        let bridge = self.bridges().remove(name);
        if let Some(bridge) = bridge {
            return host_bridge::remove(&bridge).await;
        }
        match self.docker.remove_network(name).await {
            Ok(()) => Ok(()),
            Err(e) if status(&e) == Some(404) => Ok(()),
            Err(e) => Err(engine(format!("remove network {name}"), e)),
        }
    }

    async fn create_container(&self, spec: &ContainerSpec) -> Result<String, RuntimeError> {
        let options = CreateContainerOptionsBuilder::default()
            .name(&spec.name)
            .build();
        let bridge = match &spec.network {
            NetworkMode::OwnNamespace { network, .. } => self.bridges().get(network).cloned(),
            NetworkMode::JoinSandbox { .. } => None,
        };
        let body = create_body(spec, bridge.as_ref())?;
        let created = self
            .docker
            .create_container(Some(options), body)
            .await
            .map_err(|e| {
                if status(&e) == Some(404) && message(&e).contains("No such image") {
                    RuntimeError::ImageNotPresent {
                        image: spec.image.clone(),
                    }
                } else {
                    engine(format!("create container {}", spec.name), e)
                }
            })?;
        for warning in &created.warnings {
            tracing::warn!(container = %spec.name, %warning, "docker warned on create");
        }
        Ok(created.id)
    }

    async fn start_container(&self, id: &str) -> Result<(), RuntimeError> {
        self.docker
            .start_container(id, None)
            .await
            .map_err(|e| container_error(&format!("start container {id}"), id, e))?;
        let wired = self.wire_to_host_bridge(id).await;
        if wired.is_err() {
            // Running without its network is worse than not running: the pod would look
            // started. Killed, it is replaced like any container that exited.
            let _ = self
                .docker
                .kill_container(id, None::<bollard::query_parameters::KillContainerOptions>)
                .await;
        }
        wired
    }

    async fn stop_container(&self, id: &str, grace: Duration) -> Result<(), RuntimeError> {
        let seconds = grace.as_secs() + u64::from(grace.subsec_nanos() > 0);
        let t = i32::try_from(seconds).unwrap_or(i32::MAX);
        let options = StopContainerOptionsBuilder::default().t(t).build();
        // The engine answers only once the container is down: give the request the grace period.
        let mut docker = self.docker.clone();
        docker.set_timeout(
            docker
                .timeout()
                .max(Duration::from_secs(seconds) + STOP_REQUEST_SLACK),
        );
        docker
            .stop_container(id, Some(options))
            .await
            .map_err(|e| container_error(&format!("stop container {id}"), id, e))
    }

    async fn remove_container(&self, id: &str) -> Result<(), RuntimeError> {
        let options = RemoveContainerOptionsBuilder::default()
            .force(true)
            .v(true)
            .build();
        match self.docker.remove_container(id, Some(options)).await {
            Ok(()) => Ok(()),
            Err(e) if status(&e) == Some(404) => Ok(()),
            Err(e) if status(&e) == Some(409) && message(&e).contains("already in progress") => {
                Ok(())
            }
            Err(e) => Err(engine(format!("remove container {id}"), e)),
        }
    }

    async fn list_container_summaries(
        &self,
        labels: &BTreeMap<String, String>,
    ) -> Result<Vec<ContainerSummary>, RuntimeError> {
        let mut summaries: Vec<ContainerSummary> = self
            .list_labelled(labels)
            .await?
            .into_iter()
            .filter_map(|summary| {
                Some(ContainerSummary {
                    id: summary.id?,
                    name: summary
                        .names
                        .and_then(|names| names.into_iter().next())
                        .map(|name| name.trim_start_matches('/').to_owned())
                        .unwrap_or_default(),
                    labels: summary.labels.unwrap_or_default().into_iter().collect(),
                    state: summary.state.map(|s| s.to_string()).unwrap_or_default(),
                })
            })
            .collect();
        summaries.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(summaries)
    }

    async fn list_containers(
        &self,
        labels: &BTreeMap<String, String>,
    ) -> Result<Vec<ContainerInfo>, RuntimeError> {
        let ids: Vec<String> = self
            .list_labelled(labels)
            .await?
            .into_iter()
            .filter_map(|summary| summary.id)
            .collect();
        // The summaries lack start and finish times and exit codes: inspect each one.
        let inspected: Vec<Result<ContainerInfo, RuntimeError>> = futures::stream::iter(ids)
            .map(|id| async move { self.inspect_container(&id).await })
            .buffered(INSPECT_CONCURRENCY)
            .collect()
            .await;
        let mut containers = Vec::new();
        for info in inspected {
            match info {
                Ok(info) => containers.push(info),
                // Removed between the list and the inspect.
                Err(RuntimeError::NotFound { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        containers.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(containers)
    }

    async fn inspect_container(&self, id: &str) -> Result<ContainerInfo, RuntimeError> {
        let response = self
            .docker
            .inspect_container(id, None)
            .await
            .map_err(|e| container_error(&format!("inspect container {id}"), id, e))?;
        Ok(container_info(response))
    }

    async fn exec(
        &self,
        id: &str,
        command: &[String],
        timeout: Duration,
    ) -> Result<ExecOutput, RuntimeError> {
        self.exec_with_input(id, command, &ExecInput::default(), timeout)
            .await
    }

    async fn exec_with_input(
        &self,
        id: &str,
        command: &[String],
        input: &ExecInput,
        timeout: Duration,
    ) -> Result<ExecOutput, RuntimeError> {
        match tokio::time::timeout(timeout, self.exec_to_end(id, command, input)).await {
            Ok(result) => result,
            Err(_) => Err(RuntimeError::Engine {
                operation: format!("exec {command:?} in container {id}"),
                message: format!("timed out after {:?}", timeout),
            }),
        }
    }

    async fn logs(
        &self,
        id: &str,
        tail: Option<usize>,
        follow: bool,
    ) -> Result<BoxStream<'static, Result<Vec<u8>, RuntimeError>>, RuntimeError> {
        // The stream reports a missing container only when polled: ask first.
        self.docker
            .inspect_container(id, None)
            .await
            .map_err(|e| container_error(&format!("logs of container {id}"), id, e))?;
        let tail = tail.map_or_else(|| "all".to_owned(), |lines| lines.to_string());
        let options = LogsOptionsBuilder::default()
            .stdout(true)
            .stderr(true)
            .follow(follow)
            .tail(&tail)
            .build();
        let operation = format!("logs of container {id}");
        let stream = self
            .docker
            .logs(id, Some(options))
            .map_ok(|output| output.into_bytes().to_vec())
            .map_err(move |e| engine(operation.clone(), e));
        Ok(stream.boxed())
    }
}

/// The host bridge a `host_bridge` network spec asks for.
fn host_bridge_of(network: &NetworkSpec) -> Result<HostBridge, RuntimeError> {
    let refuse = |message: String| RuntimeError::Engine {
        operation: format!("create bridge {}", network.name),
        message,
    };
    let (address, prefix) = network
        .subnet
        .split_once('/')
        .ok_or_else(|| refuse(format!("subnet {} is not a CIDR", network.subnet)))?;
    let prefix_len: u8 = prefix
        .parse()
        .ok()
        .filter(|prefix| *prefix <= 30)
        .ok_or_else(|| {
            refuse(format!(
                "subnet {} has no prefix of at most 30",
                network.subnet
            ))
        })?;
    address
        .parse::<std::net::Ipv4Addr>()
        .map_err(|_| refuse(format!("subnet {} is not IPv4", network.subnet)))?;
    let gateway = network
        .gateway
        .as_deref()
        .ok_or_else(|| refuse("a host bridge needs its gateway address".to_owned()))?
        .parse()
        .map_err(|_| refuse(format!("gateway {:?} is not IPv4", network.gateway)))?;
    let label = network
        .labels
        .get(labels::CLUSTER)
        .map(|cluster| format!("{}={cluster}", labels::CLUSTER))
        .ok_or_else(|| refuse(format!("a host bridge needs the label {}", labels::CLUSTER)))?;
    Ok(HostBridge {
        name: network.name.clone(),
        gateway,
        prefix_len,
        label,
    })
}

impl DockerRuntime {
    fn bridges(&self) -> std::sync::MutexGuard<'_, HashMap<String, HostBridge>> {
        self.host_bridges
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Wires the just started container `id` to its host bridge, if it is on one.
    async fn wire_to_host_bridge(&self, id: &str) -> Result<(), RuntimeError> {
        let response = self
            .docker
            .inspect_container(id, None)
            .await
            .map_err(|e| container_error(&format!("inspect container {id}"), id, e))?;
        let container_labels = response
            .config
            .as_ref()
            .and_then(|config| config.labels.as_ref());
        let Some(bridge_name) = container_labels.and_then(|l| l.get(labels::HOST_BRIDGE)) else {
            return Ok(());
        };
        let wiring = |message: String| RuntimeError::Engine {
            operation: format!("wire container {id} to bridge {bridge_name}"),
            message,
        };
        let bridge = self
            .bridges()
            .get(bridge_name)
            .cloned()
            .ok_or_else(|| wiring("no such bridge on this host".to_owned()))?;
        let address = container_labels
            .and_then(|l| l.get(labels::POD_IP))
            .and_then(|address| address.parse().ok())
            .ok_or_else(|| wiring(format!("the container has no {} label", labels::POD_IP)))?;
        let pid = response
            .state
            .as_ref()
            .and_then(|state| state.pid)
            .filter(|pid| *pid > 0);
        let Some(pid) = pid else {
            // Its process already ended (a command that exits at once): it started, and a
            // namespace that is gone needs no network.
            if response.state.as_ref().is_some_and(ran_and_ended) {
                return Ok(());
            }
            return Err(wiring("the container has no process".to_owned()));
        };
        let wired =
            host_bridge::wire(&bridge, &response.id.unwrap_or_default(), pid, address).await;
        // Its process may end while it is being wired: that is the container's exit, not a
        // failure to wire it.
        if wired.is_err() && self.has_exited(id).await {
            return Ok(());
        }
        wired
    }

    /// Whether the container `id` ran and its process has ended.
    async fn has_exited(&self, id: &str) -> bool {
        self.docker
            .inspect_container(id, None)
            .await
            .ok()
            .and_then(|response| response.state)
            .is_some_and(|state| ran_and_ended(&state))
    }
}

/// Whether a container in `state` ran and its process has ended (the engine's zero time
/// `0001-01-01…` is "never finished").
fn ran_and_ended(state: &bollard::models::ContainerState) -> bool {
    state.running == Some(false)
        && state
            .finished_at
            .as_deref()
            .is_some_and(|at| !at.starts_with("0001-"))
}

/// The engine's create request for `spec`; `bridge` is the host bridge its network names, if
/// it names one.
fn create_body(
    spec: &ContainerSpec,
    bridge: Option<&HostBridge>,
) -> Result<ContainerCreateBody, RuntimeError> {
    let binds: Vec<String> = spec
        .mounts
        .iter()
        .map(|mount| {
            let mode = if mount.read_only { ":ro" } else { "" };
            format!("{}:{}{mode}", mount.host_path, mount.container_path)
        })
        .collect();
    let mut host_config = HostConfig {
        binds: (!binds.is_empty()).then_some(binds),
        memory: spec.memory_limit_bytes,
        nano_cpus: spec.nano_cpus,
        privileged: Some(false),
        ..Default::default()
    };
    let mut hostname = None;
    let mut network_disabled = false;
    let mut networking_config = None;
    let mut container_labels = to_hash_map(&spec.labels);
    match &spec.network {
        NetworkMode::OwnNamespace {
            network,
            hostname: name,
            dns_servers,
            dns_search,
            dns_options,
            ipv4_address,
        } => {
            host_config.network_mode = Some(match bridge {
                Some(_) => "none".to_owned(),
                None => network.clone(),
            });
            if bridge.is_none() {
                host_config.dns = (!dns_servers.is_empty()).then(|| dns_servers.clone());
                host_config.dns_search = (!dns_search.is_empty()).then(|| dns_search.clone());
                host_config.dns_options = (!dns_options.is_empty()).then(|| dns_options.clone());
            }
            // On a host bridge the engine runs no network at all for the container: no
            // sandbox of its own, and no hook re-executing the daemon twice at every start to
            // configure one (two thirds of the engine's CPU for a start). The namespace is
            // runc's, with its loopback up; we wire it.
            network_disabled = bridge.is_some();
            hostname = Some(name.clone());
            if let Some(bridge) = bridge {
                let address = ipv4_address.as_ref().ok_or_else(|| RuntimeError::Engine {
                    operation: format!("create container {}", spec.name),
                    message: format!("a container on host bridge {network} needs an address"),
                })?;
                container_labels.insert(labels::HOST_BRIDGE.to_owned(), bridge.name.clone());
                container_labels.insert(labels::POD_IP.to_owned(), address.clone());
            }
            networking_config = ipv4_address
                .as_ref()
                .filter(|_| bridge.is_none())
                .map(|address| NetworkingConfig {
                    endpoints_config: Some(HashMap::from([(
                        network.clone(),
                        EndpointSettings {
                            ipam_config: Some(EndpointIpamConfig {
                                ipv4_address: Some(address.clone()),
                                ..Default::default()
                            }),
                            ..Default::default()
                        },
                    )])),
                });
        }
        NetworkMode::JoinSandbox { sandbox_id } => {
            host_config.network_mode = Some(format!("container:{sandbox_id}"));
        }
    }
    Ok(ContainerCreateBody {
        image: Some(spec.image.clone()),
        hostname,
        network_disabled: network_disabled.then_some(true),
        // An empty command means "the image's", as in Kubernetes; Docker would take `[]` as none.
        entrypoint: spec
            .entrypoint
            .clone()
            .filter(|entrypoint| !entrypoint.is_empty()),
        cmd: spec.args.clone(),
        env: (!spec.env.is_empty()).then(|| {
            spec.env
                .iter()
                .map(|(key, value)| format!("{key}={value}"))
                .collect()
        }),
        working_dir: spec.working_dir.clone(),
        labels: Some(container_labels),
        host_config: Some(host_config),
        networking_config,
        ..Default::default()
    })
}

fn container_info(response: ContainerInspectResponse) -> ContainerInfo {
    let state = response.state.unwrap_or_default();
    let started_at = state.started_at.unwrap_or_default();
    let container_state = match state.status {
        Some(ContainerStateStatusEnum::CREATED) => ContainerState::Created,
        Some(ContainerStateStatusEnum::RUNNING) => ContainerState::Running { started_at },
        Some(ContainerStateStatusEnum::EXITED) => ContainerState::Exited {
            exit_code: state.exit_code.unwrap_or_default(),
            started_at,
            finished_at: state.finished_at.unwrap_or_default(),
            oom_killed: state.oom_killed.unwrap_or_default(),
        },
        Some(other) => ContainerState::Other(other.to_string()),
        None => ContainerState::Other(String::new()),
    };
    let config = response.config.unwrap_or_default();
    let wired_address = config
        .labels
        .as_ref()
        .and_then(|labels| labels.get(labels::POD_IP))
        .filter(|_| matches!(container_state, ContainerState::Running { .. }))
        .cloned();
    let mut networks: Vec<(String, String)> = response
        .network_settings
        .and_then(|settings| settings.networks)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|(name, endpoint)| {
            endpoint
                .ip_address
                .filter(|ip| !ip.is_empty())
                .map(|ip| (name, ip))
        })
        .collect();
    networks.sort();
    ContainerInfo {
        id: response.id.unwrap_or_default(),
        name: response
            .name
            .unwrap_or_default()
            .trim_start_matches('/')
            .to_owned(),
        image: config.image.unwrap_or_default(),
        labels: config.labels.unwrap_or_default().into_iter().collect(),
        state: container_state,
        // A container wired to a host bridge has its address from us, not the engine.
        ip_address: wired_address.or_else(|| networks.into_iter().next().map(|(_, ip)| ip)),
    }
}

/// Splits an image reference into what the pull API takes: the repository and, when the
/// reference names no tag or digest, the tag `latest` (an empty tag would pull every tag).
fn split_reference(image: &str) -> (&str, Option<&str>) {
    let last_component = image.rsplit('/').next().unwrap_or(image);
    if image.contains('@') || last_component.contains(':') {
        (image, None)
    } else {
        (image, Some("latest"))
    }
}

fn to_hash_map(map: &BTreeMap<String, String>) -> HashMap<String, String> {
    map.iter()
        .map(|(key, value)| (key.clone(), value.clone()))
        .collect()
}

fn status(error: &DockerError) -> Option<u16> {
    match error {
        DockerError::DockerResponseServerError { status_code, .. } => Some(*status_code),
        _ => None,
    }
}

/// The engine's own words when it gave any, else bollard's description.
fn message(error: &DockerError) -> String {
    match error {
        DockerError::DockerResponseServerError { message, .. } => message.clone(),
        DockerError::DockerStreamError { error } => error.clone(),
        other => other.to_string(),
    }
}

fn engine(operation: impl Into<String>, error: DockerError) -> RuntimeError {
    RuntimeError::Engine {
        operation: operation.into(),
        message: message(&error),
    }
}

/// Like `engine`, but a 404 says the container is not there.
fn container_error(operation: &str, id: &str, error: DockerError) -> RuntimeError {
    if status(&error) == Some(404) {
        RuntimeError::NotFound { id: id.to_owned() }
    } else {
        engine(operation, error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Mount;

    fn spec(network: NetworkMode) -> ContainerSpec {
        ContainerSpec {
            name: "c".to_owned(),
            image: "flotilla/busybox:latest".to_owned(),
            entrypoint: Some(vec![]),
            args: Some(vec!["sleep".to_owned(), "1".to_owned()]),
            working_dir: Some("/tmp".to_owned()),
            env: vec![("A".to_owned(), "1".to_owned())],
            labels: BTreeMap::from([("k".to_owned(), "v".to_owned())]),
            mounts: vec![
                Mount {
                    host_path: "/h".to_owned(),
                    container_path: "/c".to_owned(),
                    read_only: true,
                },
                Mount {
                    host_path: "/h2".to_owned(),
                    container_path: "/c2".to_owned(),
                    read_only: false,
                },
            ],
            memory_limit_bytes: Some(1 << 20),
            nano_cpus: Some(500_000_000),
            network,
        }
    }

    #[test]
    fn a_sandbox_gets_the_network_hostname_and_resolver() {
        let body = create_body(
            &spec(NetworkMode::OwnNamespace {
                network: "pods".to_owned(),
                hostname: "web-0".to_owned(),
                dns_servers: vec!["10.244.1.1".to_owned()],
                dns_search: vec![
                    "prod.svc.cluster.local".to_owned(),
                    "svc.cluster.local".to_owned(),
                ],
                dns_options: vec!["ndots:5".to_owned()],
                ipv4_address: None,
            }),
            None,
        )
        .expect("a body");
        assert_eq!(
            body.networking_config, None,
            "without an address asked for, the engine picks one"
        );
        let host = body.host_config.unwrap();
        assert_eq!(body.hostname.as_deref(), Some("web-0"));
        assert_eq!(host.network_mode.as_deref(), Some("pods"));
        assert_eq!(body.network_disabled, None, "the engine runs its network");
        assert_eq!(host.dns, Some(vec!["10.244.1.1".to_owned()]));
        assert_eq!(
            host.dns_search,
            Some(vec![
                "prod.svc.cluster.local".to_owned(),
                "svc.cluster.local".to_owned()
            ])
        );
        assert_eq!(host.dns_options, Some(vec!["ndots:5".to_owned()]));
        assert_eq!(host.privileged, Some(false));
        assert_eq!(
            host.binds,
            Some(vec!["/h:/c:ro".to_owned(), "/h2:/c2".to_owned()])
        );
        assert_eq!(body.env, Some(vec!["A=1".to_owned()]));
        assert_eq!(
            body.entrypoint, None,
            "an empty command keeps the image's entrypoint"
        );
    }

    #[test]
    fn a_container_of_its_own_namespace_asks_for_the_pods_previous_address() {
        let body = create_body(
            &spec(NetworkMode::OwnNamespace {
                network: "pods".to_owned(),
                hostname: "web-0".to_owned(),
                dns_servers: Vec::new(),
                dns_search: Vec::new(),
                dns_options: Vec::new(),
                ipv4_address: Some("10.244.1.7".to_owned()),
            }),
            None,
        )
        .expect("a body");
        let endpoints = body
            .networking_config
            .and_then(|c| c.endpoints_config)
            .expect("an endpoint config");
        let address = endpoints
            .get("pods")
            .and_then(|e| e.ipam_config.as_ref())
            .and_then(|c| c.ipv4_address.as_deref());
        assert_eq!(address, Some("10.244.1.7"));
    }

    fn on_host_bridge(ipv4_address: Option<&str>) -> ContainerSpec {
        spec(NetworkMode::OwnNamespace {
            network: "fltpods".to_owned(),
            hostname: "web-0".to_owned(),
            dns_servers: vec!["10.244.1.1".to_owned()],
            dns_search: Vec::new(),
            dns_options: Vec::new(),
            ipv4_address: ipv4_address.map(str::to_owned),
        })
    }

    fn pods_bridge() -> HostBridge {
        HostBridge {
            name: "fltpods".to_owned(),
            gateway: "10.244.1.1".parse().expect("an address"),
            prefix_len: 24,
            label: "io.flotilla.cluster=abc".to_owned(),
        }
    }

    #[test]
    fn a_container_on_a_host_bridge_has_no_engine_network_and_is_labelled_with_its_wiring() {
        let body =
            create_body(&on_host_bridge(Some("10.244.1.7")), Some(&pods_bridge())).expect("a body");
        let host = body.host_config.expect("a host config");
        assert_eq!(host.network_mode.as_deref(), Some("none"));
        assert_eq!(body.network_disabled, Some(true));
        assert_eq!(body.networking_config, None);
        assert_eq!(body.hostname.as_deref(), Some("web-0"));
        // The engine writes no resolv.conf for it: the node mounts the pod's own.
        assert_eq!(host.dns, None);
        let labels = body.labels.expect("labels");
        assert_eq!(
            labels.get(labels::HOST_BRIDGE).map(String::as_str),
            Some("fltpods")
        );
        assert_eq!(
            labels.get(labels::POD_IP).map(String::as_str),
            Some("10.244.1.7")
        );
    }

    #[test]
    fn a_container_on_a_host_bridge_without_an_address_is_refused() {
        let error = create_body(&on_host_bridge(None), Some(&pods_bridge())).unwrap_err();
        assert!(error.to_string().contains("needs an address"), "{error}");
    }

    #[test]
    fn a_host_bridge_network_needs_a_gateway_and_the_cluster_label() {
        let mut network = NetworkSpec {
            name: "fltpods".to_owned(),
            subnet: "10.244.1.0/24".to_owned(),
            gateway: Some("10.244.1.1".to_owned()),
            labels: BTreeMap::from([(labels::CLUSTER.to_owned(), "abc".to_owned())]),
            inhibit_host_address: false,
            host_bridge: true,
        };
        assert_eq!(host_bridge_of(&network).expect("a bridge"), pods_bridge());
        network.gateway = None;
        assert!(host_bridge_of(&network).is_err());
        network.gateway = Some("10.244.1.1".to_owned());
        network.labels.clear();
        assert!(host_bridge_of(&network).is_err());
    }

    #[test]
    fn an_app_container_joins_the_sandbox_namespace_without_a_hostname() {
        let body = create_body(
            &spec(NetworkMode::JoinSandbox {
                sandbox_id: "abc".to_owned(),
            }),
            None,
        )
        .expect("a body");
        let host = body.host_config.unwrap();
        assert_eq!(body.hostname, None);
        assert_eq!(host.network_mode.as_deref(), Some("container:abc"));
        assert_eq!(host.dns, None);
        assert_eq!(host.dns_search, None);
        assert_eq!(host.dns_options, None);
    }

    #[test]
    fn a_reference_without_a_tag_is_pulled_as_latest() {
        assert_eq!(split_reference("busybox"), ("busybox", Some("latest")));
        assert_eq!(
            split_reference("localhost:5000/a/b"),
            ("localhost:5000/a/b", Some("latest"))
        );
        assert_eq!(
            split_reference("localhost:5000/a/b:1"),
            ("localhost:5000/a/b:1", None)
        );
        assert_eq!(split_reference("a@sha256:00"), ("a@sha256:00", None));
    }
}
