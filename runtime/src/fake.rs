//! An in-memory `ContainerRuntime`: a FAKE, for unit tests and for simulated nodes in scale
//! benchmarks only. Nothing runs; containers are records whose states move as Docker's would
//! (create → start → exit or stop → remove), and tests script the rest: a container's process
//! exiting (`set_exit`, `set_oom_killed`), which images exist or can be pulled, what an exec
//! returns, what a container logged.
//!
//! Ids are deterministic (`fa0000000001`, `fa0000000002`, ... in creation order). Every
//! operation that takes an id also takes the container's name, as Docker does.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use futures::stream::{BoxStream, StreamExt};
use tokio::sync::broadcast;

use crate::{
    ContainerInfo, ContainerRuntime, ContainerSpec, ContainerState, ContainerSummary, ExecOutput,
    NetworkMode, NetworkSpec, PullPolicy, RuntimeError,
};

#[cfg(test)]
mod tests;

/// The exit code a stopped fake container reports: its process ended on SIGTERM (128 + 15).
pub const STOPPED_EXIT_CODE: i64 = 143;
/// The exit code of a fake container killed for running out of memory (128 + SIGKILL).
pub const OOM_EXIT_CODE: i64 = 137;

/// The in-memory fake runtime. Cheap to create; share it behind an `Arc`.
#[derive(Debug, Default)]
pub struct FakeRuntime {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    created: u64,
    images: BTreeSet<String>,
    pullable: BTreeSet<String>,
    pulls: Vec<String>,
    networks: BTreeMap<String, FakeNetwork>,
    containers: BTreeMap<String, FakeContainer>,
    exec_results: BTreeMap<(String, Vec<String>), FakeExec>,
}

#[derive(Debug)]
struct FakeNetwork {
    spec: NetworkSpec,
    /// Host part handed out last.
    last_host: u32,
}

#[derive(Debug)]
struct FakeContainer {
    id: String,
    spec: ContainerSpec,
    state: ContainerState,
    ip_address: Option<String>,
    log: Vec<u8>,
    /// Followers of the log; present while the container runs, dropped when it stops, which
    /// ends their streams.
    log_followers: Option<broadcast::Sender<Vec<u8>>>,
}

#[derive(Debug, Clone)]
enum FakeExec {
    Output(ExecOutput),
    Hang,
}

impl FakeContainer {
    fn info(&self) -> ContainerInfo {
        ContainerInfo {
            id: self.id.clone(),
            name: self.spec.name.clone(),
            image: self.spec.image.clone(),
            labels: self.spec.labels.clone(),
            state: self.state.clone(),
            ip_address: self.ip_address.clone(),
        }
    }

    fn is_running(&self) -> bool {
        matches!(self.state, ContainerState::Running { .. })
    }

    /// The process ended: running → exited.
    fn exit(&mut self, exit_code: i64, oom_killed: bool) {
        let started_at = match &self.state {
            ContainerState::Running { started_at } => started_at.clone(),
            _ => return,
        };
        self.state = ContainerState::Exited {
            exit_code,
            started_at,
            finished_at: now(),
            oom_killed,
        };
        self.ip_address = None;
        self.log_followers = None;
    }
}

impl State {
    /// The id of the container with this id or name.
    fn resolve(&self, id_or_name: &str) -> Result<String, RuntimeError> {
        if self.containers.contains_key(id_or_name) {
            return Ok(id_or_name.to_owned());
        }
        self.containers
            .values()
            .find(|container| container.spec.name == id_or_name)
            .map(|container| container.id.clone())
            .ok_or_else(|| RuntimeError::NotFound {
                id: id_or_name.to_owned(),
            })
    }

    fn container(&mut self, id_or_name: &str) -> Result<&mut FakeContainer, RuntimeError> {
        let id = self.resolve(id_or_name)?;
        self.containers
            .get_mut(&id)
            .ok_or_else(|| RuntimeError::NotFound {
                id: id_or_name.to_owned(),
            })
    }

    /// The next address on a network: the subnet's base plus 2, 3, ..., skipping the gateway.
    fn allocate_address(&mut self, network: &str) -> Option<String> {
        let network = self.networks.get_mut(network)?;
        let (base, prefix) = network.spec.subnet.split_once('/')?;
        let base: Ipv4Addr = base.parse().ok()?;
        let prefix: u32 = prefix.parse().ok()?;
        let size = 1u64 << (32 - prefix.min(32));
        loop {
            network.last_host += 1;
            let host = network.last_host.max(2);
            network.last_host = host;
            if u64::from(host) + 1 >= size {
                return None;
            }
            let address = Ipv4Addr::from(u32::from(base) + host).to_string();
            if network.spec.gateway.as_deref() != Some(address.as_str()) {
                return Some(address);
            }
        }
    }
}

impl FakeRuntime {
    pub fn new() -> FakeRuntime {
        FakeRuntime::default()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Makes `image` present, as if built or pulled earlier.
    pub fn set_image_present(&self, image: &str) {
        self.state().images.insert(image.to_owned());
    }

    /// Lets a later pull of `image` succeed (by default every pull fails, as with no registry).
    pub fn set_image_pullable(&self, image: &str) {
        self.state().pullable.insert(image.to_owned());
    }

    /// Every pull attempted, in order, successful or not.
    pub fn pulls(&self) -> Vec<String> {
        self.state().pulls.clone()
    }

    /// The container's process exits with `exit_code` (the container must be running).
    pub fn set_exit(&self, id_or_name: &str, exit_code: i64) -> Result<(), RuntimeError> {
        self.end_process(id_or_name, exit_code, false)
    }

    /// The container is killed for running out of memory (the container must be running).
    pub fn set_oom_killed(&self, id_or_name: &str) -> Result<(), RuntimeError> {
        self.end_process(id_or_name, OOM_EXIT_CODE, true)
    }

    fn end_process(
        &self,
        id_or_name: &str,
        exit_code: i64,
        oom_killed: bool,
    ) -> Result<(), RuntimeError> {
        let mut state = self.state();
        let container = state.container(id_or_name)?;
        if !container.is_running() {
            return Err(not_running(id_or_name));
        }
        container.exit(exit_code, oom_killed);
        Ok(())
    }

    /// What `exec` of exactly `command` in this container returns from now on (by default:
    /// exit code 0 and no output).
    pub fn set_exec_result(&self, id_or_name: &str, command: &[String], output: ExecOutput) {
        self.state().exec_results.insert(
            (id_or_name.to_owned(), command.to_vec()),
            FakeExec::Output(output),
        );
    }

    /// `exec` of exactly `command` in this container never finishes: it fails at its timeout.
    pub fn set_exec_hang(&self, id_or_name: &str, command: &[String]) {
        self.state()
            .exec_results
            .insert((id_or_name.to_owned(), command.to_vec()), FakeExec::Hang);
    }

    /// The container writes `output`: it is kept for `logs` and sent to followers.
    pub fn append_log(&self, id_or_name: &str, output: &[u8]) -> Result<(), RuntimeError> {
        let mut state = self.state();
        let container = state.container(id_or_name)?;
        container.log.extend_from_slice(output);
        if let Some(followers) = &container.log_followers {
            // No follower is not an error.
            let _ = followers.send(output.to_vec());
        }
        Ok(())
    }

    /// The spec a container was created from.
    pub fn spec(&self, id_or_name: &str) -> Result<ContainerSpec, RuntimeError> {
        let mut state = self.state();
        Ok(state.container(id_or_name)?.spec.clone())
    }

    /// The networks that exist, by name.
    pub fn networks(&self) -> Vec<NetworkSpec> {
        self.state()
            .networks
            .values()
            .map(|network| network.spec.clone())
            .collect()
    }
}

#[async_trait::async_trait]
impl ContainerRuntime for FakeRuntime {
    async fn ensure_image(&self, image: &str, policy: PullPolicy) -> Result<(), RuntimeError> {
        let mut state = self.state();
        let present = state.images.contains(image);
        let pull = match policy {
            PullPolicy::Always => true,
            PullPolicy::IfNotPresent => !present,
            PullPolicy::Never if present => false,
            PullPolicy::Never => {
                return Err(RuntimeError::ImageNeverPull {
                    image: image.to_owned(),
                })
            }
        };
        if pull {
            state.pulls.push(image.to_owned());
            if !state.pullable.contains(image) {
                return Err(RuntimeError::ImagePull {
                    image: image.to_owned(),
                    message: "fake runtime: no registry has this image".to_owned(),
                });
            }
            state.images.insert(image.to_owned());
        }
        Ok(())
    }

    async fn ensure_network(&self, network: &NetworkSpec) -> Result<(), RuntimeError> {
        self.state()
            .networks
            .entry(network.name.clone())
            .or_insert_with(|| FakeNetwork {
                spec: network.clone(),
                last_host: 1,
            });
        Ok(())
    }

    async fn remove_network(&self, name: &str) -> Result<(), RuntimeError> {
        let mut state = self.state();
        let in_use = state.containers.values().any(|container| {
            container.is_running()
                && matches!(&container.spec.network, NetworkMode::OwnNamespace { network, .. } if network == name)
        });
        if in_use {
            return Err(RuntimeError::Engine {
                operation: format!("remove network {name}"),
                message: format!(
                    "error while removing network: network {name} has active endpoints"
                ),
            });
        }
        state.networks.remove(name);
        Ok(())
    }

    async fn create_container(&self, spec: &ContainerSpec) -> Result<String, RuntimeError> {
        let mut state = self.state();
        let operation = format!("create container {}", spec.name);
        let refuse = |message: String| RuntimeError::Engine {
            operation: operation.clone(),
            message,
        };
        if state
            .containers
            .values()
            .any(|container| container.spec.name == spec.name)
        {
            return Err(refuse(format!(
                "Conflict. The container name \"/{}\" is already in use",
                spec.name
            )));
        }
        if !state.images.contains(&spec.image) {
            return Err(RuntimeError::ImageNotPresent {
                image: spec.image.clone(),
            });
        }
        match &spec.network {
            NetworkMode::OwnNamespace { network, .. } if !state.networks.contains_key(network) => {
                return Err(refuse(format!("network {network} not found")));
            }
            NetworkMode::JoinSandbox { sandbox_id } if state.resolve(sandbox_id).is_err() => {
                return Err(refuse(format!("No such container: {sandbox_id}")));
            }
            _ => {}
        }
        state.created += 1;
        let id = format!("fa{:010x}", state.created);
        state.containers.insert(
            id.clone(),
            FakeContainer {
                id: id.clone(),
                spec: spec.clone(),
                state: ContainerState::Created,
                ip_address: None,
                log: Vec::new(),
                log_followers: None,
            },
        );
        Ok(id)
    }

    async fn start_container(&self, id: &str) -> Result<(), RuntimeError> {
        let mut state = self.state();
        let id = state.resolve(id)?;
        let (network, sandbox) = match state
            .containers
            .get(&id)
            .map(|container| &container.spec.network)
        {
            Some(NetworkMode::OwnNamespace { network, .. }) => (Some(network.clone()), None),
            Some(NetworkMode::JoinSandbox { sandbox_id }) => (None, Some(sandbox_id.clone())),
            None => return Err(RuntimeError::NotFound { id }),
        };
        if let Some(sandbox) = sandbox {
            let joinable = state
                .container(&sandbox)
                .map(|sandbox| sandbox.is_running())
                .unwrap_or(false);
            if !joinable {
                return Err(RuntimeError::Engine {
                    operation: format!("start container {id}"),
                    message: format!("cannot join network of a non running container: {sandbox}"),
                });
            }
        }
        match state.containers.get(&id).map(|container| &container.state) {
            Some(ContainerState::Running { .. }) => return Ok(()),
            Some(ContainerState::Created | ContainerState::Exited { .. }) => {}
            Some(ContainerState::Other(other)) => {
                return Err(RuntimeError::Engine {
                    operation: format!("start container {id}"),
                    message: format!("cannot start a container that is {other}"),
                })
            }
            None => return Err(RuntimeError::NotFound { id }),
        }
        let asked = match state.containers.get(&id).map(|c| &c.spec.network) {
            Some(NetworkMode::OwnNamespace { ipv4_address, .. }) => ipv4_address.clone(),
            _ => None,
        };
        let ip_address = match asked {
            Some(address) => {
                let taken = state.containers.values().any(|container| {
                    container.is_running() && container.ip_address.as_deref() == Some(&address)
                });
                if taken {
                    return Err(RuntimeError::Engine {
                        operation: format!("start container {id}"),
                        message: format!("Address already in use: {address}"),
                    });
                }
                Some(address)
            }
            None => network.and_then(|network| state.allocate_address(&network)),
        };
        let container = state.container(&id)?;
        container.state = ContainerState::Running { started_at: now() };
        container.ip_address = ip_address;
        container.log_followers = Some(broadcast::channel(1024).0);
        Ok(())
    }

    async fn stop_container(&self, id: &str, _grace: Duration) -> Result<(), RuntimeError> {
        let mut state = self.state();
        state.container(id)?.exit(STOPPED_EXIT_CODE, false);
        Ok(())
    }

    async fn remove_container(&self, id: &str) -> Result<(), RuntimeError> {
        let mut state = self.state();
        if let Ok(id) = state.resolve(id) {
            state.containers.remove(&id);
        }
        Ok(())
    }

    async fn list_container_summaries(
        &self,
        labels: &BTreeMap<String, String>,
    ) -> Result<Vec<ContainerSummary>, RuntimeError> {
        let containers = self.list_containers(labels).await?;
        Ok(containers
            .into_iter()
            .map(|info| ContainerSummary {
                state: info.state.word().to_owned(),
                id: info.id,
                name: info.name,
                labels: info.labels,
            })
            .collect())
    }

    async fn list_containers(
        &self,
        labels: &BTreeMap<String, String>,
    ) -> Result<Vec<ContainerInfo>, RuntimeError> {
        let state = self.state();
        let mut containers: Vec<ContainerInfo> = state
            .containers
            .values()
            .filter(|container| {
                labels
                    .iter()
                    .all(|(key, value)| container.spec.labels.get(key) == Some(value))
            })
            .map(FakeContainer::info)
            .collect();
        containers.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(containers)
    }

    async fn inspect_container(&self, id: &str) -> Result<ContainerInfo, RuntimeError> {
        let mut state = self.state();
        Ok(state.container(id)?.info())
    }

    async fn exec(
        &self,
        id: &str,
        command: &[String],
        timeout: Duration,
    ) -> Result<ExecOutput, RuntimeError> {
        let result = {
            let mut state = self.state();
            let container = state.container(id)?;
            if !container.is_running() {
                return Err(not_running(id));
            }
            let (id, name) = (container.id.clone(), container.spec.name.clone());
            [id, name]
                .into_iter()
                .find_map(|key| state.exec_results.get(&(key, command.to_vec())).cloned())
                .unwrap_or(FakeExec::Output(ExecOutput {
                    exit_code: 0,
                    stdout: Vec::new(),
                    stderr: Vec::new(),
                }))
        };
        match result {
            FakeExec::Output(output) => Ok(output),
            FakeExec::Hang => {
                tokio::time::sleep(timeout).await;
                Err(RuntimeError::Engine {
                    operation: format!("exec {command:?} in container {id}"),
                    message: format!("timed out after {timeout:?}"),
                })
            }
        }
    }

    async fn logs(
        &self,
        id: &str,
        tail: Option<usize>,
        follow: bool,
    ) -> Result<BoxStream<'static, Result<Vec<u8>, RuntimeError>>, RuntimeError> {
        let mut state = self.state();
        let container = state.container(id)?;
        let past = tail_lines(&container.log, tail).to_vec();
        let past = futures::stream::iter((!past.is_empty()).then_some(Ok(past)));
        let followers = if follow {
            container
                .log_followers
                .as_ref()
                .map(broadcast::Sender::subscribe)
        } else {
            None
        };
        let Some(receiver) = followers else {
            return Ok(past.boxed());
        };
        let future = futures::stream::unfold(receiver, |mut receiver| async move {
            loop {
                match receiver.recv().await {
                    Ok(chunk) => return Some((Ok(chunk), receiver)),
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        });
        Ok(past.chain(future).boxed())
    }
}

/// The last `tail` lines of `log` (all of it when `None`); a last line without its newline
/// counts as a line.
fn tail_lines(log: &[u8], tail: Option<usize>) -> &[u8] {
    let Some(tail) = tail else {
        return log;
    };
    if tail == 0 {
        return &[];
    }
    // Line ends, ignoring a newline that ends the log.
    let body = log.strip_suffix(b"\n").unwrap_or(log);
    let mut seen = 0;
    for (index, byte) in body.iter().enumerate().rev() {
        if *byte == b'\n' {
            seen += 1;
            if seen == tail {
                return &log[index + 1..];
            }
        }
    }
    log
}

fn not_running(id: &str) -> RuntimeError {
    RuntimeError::Engine {
        operation: format!("container {id}"),
        message: format!("Container {id} is not running"),
    }
}

/// Now, RFC 3339 in UTC.
fn now() -> String {
    jiff::Timestamp::now().to_string()
}
