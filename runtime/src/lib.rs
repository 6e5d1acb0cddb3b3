//! The container runtime seam. A pod is one sandbox container that holds the network
//! namespace (hostname = pod name) plus one container per spec container joined to it.
//!
//! Owns: talking to the container engine (`ContainerRuntime`, implemented for Docker with
//! bollard in `docker`) and the in-memory `fake` used by unit tests and simulated nodes in scale
//! benchmarks (and named as such). Must not depend on the store, Raft or the API: it knows
//! containers, images, networks and labels, not pods or objects.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::stream::BoxStream;

pub mod docker;
pub mod fake;
pub mod host_bridge;
mod netlink;

pub use docker::DockerRuntime;
pub use fake::FakeRuntime;

/// Labels every container Flotilla creates carries, so ownership is never guessed.
pub mod labels {
    pub const CLUSTER: &str = "io.flotilla.cluster";
    pub const NODE: &str = "io.flotilla.node";
    pub const NAMESPACE: &str = "io.flotilla.pod.namespace";
    pub const POD_NAME: &str = "io.flotilla.pod.name";
    pub const POD_UID: &str = "io.flotilla.pod.uid";
    /// The spec container's name; `POD_SANDBOX` for the sandbox.
    pub const CONTAINER: &str = "io.flotilla.container";
    /// How many times this container of the pod was started before (0 for the first).
    pub const ATTEMPT: &str = "io.flotilla.container.attempt";
    pub const POD_SANDBOX: &str = "POD";
    /// On a container wired to a host bridge: the bridge's name.
    pub const HOST_BRIDGE: &str = "io.flotilla.pod.bridge";
    /// On a container wired to a host bridge: its address there.
    pub const POD_IP: &str = "io.flotilla.pod.ip";
}

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The image is not present and could not be pulled; the message is the engine's.
    #[error("pull image {image}: {message}")]
    ImagePull { image: String, message: String },
    #[error("image {image} is not present and the pull policy is Never")]
    ImageNeverPull { image: String },
    /// A container was to be created from an image the engine does not have.
    #[error("image {image} is not present")]
    ImageNotPresent { image: String },
    #[error("container {id} not found")]
    NotFound { id: String },
    #[error("{operation}: {message}")]
    Engine { operation: String, message: String },
}

/// When to pull, as `imagePullPolicy` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PullPolicy {
    Always,
    IfNotPresent,
    Never,
}

/// A bind mount from the host into a container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub host_path: String,
    pub container_path: String,
    pub read_only: bool,
}

/// Where a container's network namespace comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetworkMode {
    /// Its own namespace on `network` (a pod's sandbox, or the only container of a pod that
    /// needs none), with the pod's hostname and resolver (empty lists: the engine's defaults).
    /// `dns_options` are resolv.conf options such as `ndots:5`. `ipv4_address` asks for that
    /// address on `network` (the pod's address before a restart); none: the engine picks one.
    /// On a host bridge (`host_bridge`) the engine runs no network for the container and so
    /// writes neither resolv.conf nor hosts file: the resolver fields are unused, and the
    /// caller mounts the pod's own `/etc/resolv.conf` and `/etc/hosts`.
    OwnNamespace {
        network: String,
        hostname: String,
        dns_servers: Vec<String>,
        dns_search: Vec<String>,
        dns_options: Vec<String>,
        ipv4_address: Option<String>,
    },
    /// An app container: joins the sandbox's namespace (shares localhost and the pod IP).
    JoinSandbox { sandbox_id: String },
}

/// Everything needed to create one container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerSpec {
    /// The engine-level name, unique on the host.
    pub name: String,
    pub image: String,
    /// Replaces the image's entrypoint (Kubernetes `command`).
    pub entrypoint: Option<Vec<String>>,
    /// Replaces the image's cmd (Kubernetes `args`).
    pub args: Option<Vec<String>>,
    pub working_dir: Option<String>,
    pub env: Vec<(String, String)>,
    pub labels: BTreeMap<String, String>,
    pub mounts: Vec<Mount>,
    pub memory_limit_bytes: Option<i64>,
    /// CPU limit in billionths of a CPU.
    pub nano_cpus: Option<i64>,
    pub network: NetworkMode,
}

/// What the engine reports about a container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContainerState {
    Created,
    Running {
        /// RFC 3339.
        started_at: String,
    },
    Exited {
        exit_code: i64,
        started_at: String,
        finished_at: String,
        oom_killed: bool,
    },
    /// Paused, restarting, removing, dead: anything else, with the engine's word.
    Other(String),
}

impl ContainerState {
    /// The engine's one word for the state: `created`, `running`, `exited`, or another.
    pub fn word(&self) -> &str {
        match self {
            ContainerState::Created => "created",
            ContainerState::Running { .. } => "running",
            ContainerState::Exited { .. } => "exited",
            ContainerState::Other(word) => word,
        }
    }
}

/// A container as the engine's list shows it, without inspecting it: enough to tell what
/// changed since the last look and what is whose.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerSummary {
    pub id: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// The engine's word for its state (`ContainerState::word`).
    pub state: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerInfo {
    pub id: String,
    pub name: String,
    pub image: String,
    pub labels: BTreeMap<String, String>,
    pub state: ContainerState,
    /// The address on the container's own network (sandboxes only).
    pub ip_address: Option<String>,
}

/// The result of running a command in a container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    pub exit_code: i64,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// What an exec gets besides its command.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecInput {
    /// Bytes for the command's stdin, then end of file; `None`: no stdin.
    pub stdin: Option<Vec<u8>>,
    /// Run the command on a terminal (its output is then one stream).
    pub tty: bool,
}

/// A pod network on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkSpec {
    pub name: String,
    /// CIDR, e.g. `10.244.1.0/24`.
    pub subnet: String,
    pub gateway: Option<String>,
    pub labels: BTreeMap<String, String>,
    /// Keep the gateway address off the host bridge (when a node container is the gateway).
    pub inhibit_host_address: bool,
    /// A Linux bridge of this host (`name` at most 15 bytes) rather than an engine network:
    /// containers on it run with no engine network and are wired to it with a veth pair each
    /// time they start (`host_bridge`); they must be given their address. Its label is the
    /// cluster label of `labels`.
    pub host_bridge: bool,
}

/// The container engine as the agent uses it. Implementations must be safe to call from many
/// tasks at once.
#[async_trait::async_trait]
pub trait ContainerRuntime: Send + Sync + 'static {
    /// Makes `image` present according to `policy`.
    async fn ensure_image(&self, image: &str, policy: PullPolicy) -> Result<(), RuntimeError>;
    /// Creates the network if no network of that name exists.
    async fn ensure_network(&self, network: &NetworkSpec) -> Result<(), RuntimeError>;
    async fn remove_network(&self, name: &str) -> Result<(), RuntimeError>;
    /// Creates (does not start) a container; returns its id. An image the engine lacks is
    /// `ImageNotPresent`.
    async fn create_container(&self, spec: &ContainerSpec) -> Result<String, RuntimeError>;
    /// Starts a container; one on a host bridge is wired to it before this returns, or killed
    /// and the start fails.
    async fn start_container(&self, id: &str) -> Result<(), RuntimeError>;
    /// SIGTERM, then SIGKILL after `grace`.
    async fn stop_container(&self, id: &str, grace: Duration) -> Result<(), RuntimeError>;
    /// Removes a container, stopping it if needed; a missing container is not an error.
    async fn remove_container(&self, id: &str) -> Result<(), RuntimeError>;
    /// Every container (running or not) carrying all of `labels`, from one list call: no
    /// inspection, so no times, exit codes or addresses.
    async fn list_container_summaries(
        &self,
        labels: &BTreeMap<String, String>,
    ) -> Result<Vec<ContainerSummary>, RuntimeError>;
    /// Every container (running or not) carrying all of `labels`.
    async fn list_containers(
        &self,
        labels: &BTreeMap<String, String>,
    ) -> Result<Vec<ContainerInfo>, RuntimeError>;
    async fn inspect_container(&self, id: &str) -> Result<ContainerInfo, RuntimeError>;
    /// Runs `command` in a running container and waits for it, up to `timeout`.
    async fn exec(
        &self,
        id: &str,
        command: &[String],
        timeout: Duration,
    ) -> Result<ExecOutput, RuntimeError>;
    /// Like `exec`, with stdin and a terminal. Runtimes that cannot do it say so.
    async fn exec_with_input(
        &self,
        id: &str,
        command: &[String],
        input: &ExecInput,
        timeout: Duration,
    ) -> Result<ExecOutput, RuntimeError> {
        if input.stdin.is_none() && !input.tty {
            return self.exec(id, command, timeout).await;
        }
        Err(RuntimeError::Engine {
            operation: format!("exec {command:?} in container {id}"),
            message: "this runtime cannot pass stdin or a terminal".into(),
        })
    }
    /// The container's output (stdout and stderr interleaved), the last `tail` lines if given,
    /// then new output as it comes when `follow`.
    async fn logs(
        &self,
        id: &str,
        tail: Option<usize>,
        follow: bool,
    ) -> Result<BoxStream<'static, Result<Vec<u8>, RuntimeError>>, RuntimeError>;
}
