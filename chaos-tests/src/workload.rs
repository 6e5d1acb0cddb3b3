//! The workload of a chaos scenario: concurrent clients, each bound to one node, doing
//! writes, compare-and-sets (updates carrying the resourceVersion they read) and linearizable
//! reads on a few ConfigMaps with unique values, plus creates of write-once ConfigMaps, all
//! recorded in a [`History`] for the checker.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use flotilla_proto::objects_client::ObjectsClient;
use flotilla_proto::{GetRequest, ListRequest, ObjectRequest};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tonic::transport::Channel;

use crate::cluster::connect;
use crate::history::{History, Operation, Outcome};

/// The namespace of every workload object.
pub const NAMESPACE: &str = "default";
/// The label on write-once objects, so that the final check lists them all.
const ONCE_LABEL: &str = "chaos.flotilla.io/once";
/// The client id of the final reads.
pub const FINAL_READER: u64 = 1_000_000;

/// How the workload runs.
#[derive(Debug, Clone)]
pub struct WorkloadConfig {
    /// The address each client talks to (client `i` uses `targets[i % len]`).
    pub targets: Vec<SocketAddr>,
    pub clients: usize,
    /// Registers: ConfigMaps `chaos-k0`..`chaos-k{keys-1}`.
    pub keys: usize,
    /// Pause after each operation of a client.
    pub pace: Duration,
    /// An operation not answered within this is recorded as unknown.
    pub operation_timeout: Duration,
    /// Every n-th operation of a client creates a write-once object.
    pub once_every: u64,
    pub seed: u64,
}

impl WorkloadConfig {
    pub fn new(targets: Vec<SocketAddr>, seed: u64) -> WorkloadConfig {
        WorkloadConfig {
            clients: targets.len().max(1) * 2,
            targets,
            keys: 8,
            pace: Duration::from_millis(15),
            operation_timeout: Duration::from_secs(3),
            once_every: 8,
            seed,
        }
    }

    /// Which of `targets` client `client` talks to.
    pub fn target_index(&self, client: u64) -> usize {
        client as usize % self.targets.len().max(1)
    }

    pub fn key(index: usize) -> String {
        format!("chaos-k{index}")
    }
}

/// The ConfigMap `name` holding `value` under `v`.
fn configmap(name: &str, value: &str, resource_version: Option<&str>, once: bool) -> Value {
    let mut object = json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "data": {"v": value},
    });
    if let Some(version) = resource_version {
        object["metadata"]["resourceVersion"] = json!(version);
    }
    if once {
        object["metadata"]["labels"] = json!({ONCE_LABEL: "true"});
    }
    object
}

fn value_of(object: &Value) -> Option<String> {
    object
        .pointer("/data/v")
        .and_then(Value::as_str)
        .map(str::to_owned)
}

fn version_of(object: &Value) -> Option<String> {
    object
        .pointer("/metadata/resourceVersion")
        .and_then(Value::as_str)
        .map(str::to_owned)
}

/// What a failed call means for the history. Errors the server states as definite (the store
/// refused, or no leader took the write) did not take effect; everything else may have.
fn outcome_of_error(status: &tonic::Status, is_write: bool) -> Outcome {
    use tonic::Code;
    match status.code() {
        Code::Aborted | Code::AlreadyExists if is_write => Outcome::CasConflict,
        Code::InvalidArgument | Code::PermissionDenied | Code::OutOfRange => Outcome::Fail,
        Code::Unavailable if status.message().starts_with("cluster unavailable") => Outcome::Fail,
        Code::Unavailable
            if status.message().contains("tcp connect error")
                || status.message().contains("Connection refused") =>
        {
            Outcome::Fail
        }
        _ => Outcome::Unknown,
    }
}

/// One client: its connection, its random choices and what it last read of each key.
struct Client {
    id: u64,
    target: SocketAddr,
    channel: Option<ObjectsClient<Channel>>,
    random: StdRng,
    last_read: HashMap<String, (Option<String>, String)>,
    sequence: u64,
    config: WorkloadConfig,
    history: History,
}

impl Client {
    fn new(
        id: u64,
        target: SocketAddr,
        seed: u64,
        config: &WorkloadConfig,
        history: &History,
    ) -> Client {
        Client {
            id,
            target,
            channel: None,
            random: StdRng::seed_from_u64(seed),
            last_read: HashMap::new(),
            sequence: 0,
            config: config.clone(),
            history: history.clone(),
        }
    }

    async fn objects(&mut self) -> Option<ObjectsClient<Channel>> {
        if self.channel.is_none() {
            if let Ok(channel) = connect(self.target, Duration::from_millis(500)).await {
                self.channel = Some(ObjectsClient::new(channel));
            }
        }
        self.channel.clone()
    }

    fn next_value(&mut self) -> String {
        self.sequence += 1;
        format!("c{}-{}", self.id, self.sequence)
    }

    /// Runs one call with the operation timeout; `None` when it timed out or could not connect.
    async fn call<T>(
        &mut self,
        call: impl AsyncFnOnce(ObjectsClient<Channel>) -> Result<T, tonic::Status>,
    ) -> Result<T, Option<tonic::Status>> {
        let Some(client) = self.objects().await else {
            return Err(Some(tonic::Status::unavailable(
                "tcp connect error: no connection to the node",
            )));
        };
        match tokio::time::timeout(self.config.operation_timeout, call(client)).await {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(status)) => {
                if !matches!(
                    status.code(),
                    tonic::Code::Aborted
                        | tonic::Code::AlreadyExists
                        | tonic::Code::NotFound
                        | tonic::Code::InvalidArgument
                ) {
                    // The connection may be broken: start a new one next time.
                    self.channel = None;
                }
                Err(Some(status))
            }
            Err(_) => {
                self.channel = None;
                Err(None)
            }
        }
    }

    async fn read(&mut self, key: &str) -> Outcome {
        let id = self.history.invoke(self.id, key, Operation::Read);
        let name = key.to_owned();
        let result = self
            .call(async move |mut client| {
                client
                    .get(GetRequest {
                        kind: "ConfigMap".into(),
                        namespace: NAMESPACE.into(),
                        name,
                        local: false,
                    })
                    .await
            })
            .await;
        let outcome = match result {
            Ok(reply) => match serde_json::from_slice::<Value>(&reply.into_inner().object_json) {
                Ok(object) => {
                    let value = value_of(&object);
                    if let Some(version) = version_of(&object) {
                        self.last_read
                            .insert(key.to_owned(), (value.clone(), version));
                    }
                    Outcome::ReadOk { value }
                }
                Err(_) => Outcome::Unknown,
            },
            Err(Some(status)) if status.code() == tonic::Code::NotFound => {
                Outcome::ReadOk { value: None }
            }
            Err(Some(status)) => outcome_of_error(&status, false),
            Err(None) => Outcome::Unknown,
        };
        self.history.complete(id, outcome.clone());
        outcome
    }

    async fn write(&mut self, key: &str) -> Outcome {
        let value = self.next_value();
        let id = self.history.invoke(
            self.id,
            key,
            Operation::Write {
                value: value.clone(),
            },
        );
        let object_json =
            serde_json::to_vec(&configmap(key, &value, None, false)).unwrap_or_default();
        let result = self
            .call(async move |mut client| client.apply(ObjectRequest { object_json }).await)
            .await;
        let outcome = match result {
            Ok(_) => Outcome::Ok,
            Err(Some(status)) => match outcome_of_error(&status, true) {
                // An unconditional apply cannot conflict; treat a refusal as definite.
                Outcome::CasConflict => Outcome::Fail,
                other => other,
            },
            Err(None) => Outcome::Unknown,
        };
        self.history.complete(id, outcome.clone());
        outcome
    }

    async fn compare_and_set(&mut self, key: &str) -> Outcome {
        let Some((expected, version)) = self.last_read.get(key).cloned() else {
            return self.read(key).await;
        };
        let new = self.next_value();
        let id = self.history.invoke(
            self.id,
            key,
            Operation::Cas {
                expected: expected.clone(),
                new: new.clone(),
            },
        );
        let object_json =
            serde_json::to_vec(&configmap(key, &new, Some(&version), false)).unwrap_or_default();
        let result = self
            .call(async move |mut client| client.update(ObjectRequest { object_json }).await)
            .await;
        // Whatever happened, what was read is no longer known to be current.
        self.last_read.remove(key);
        let outcome = match result {
            Ok(_) => Outcome::Ok,
            // Absent at the time of the update: it did not hold the expected value.
            Err(Some(status)) if status.code() == tonic::Code::NotFound => Outcome::CasConflict,
            Err(Some(status)) => outcome_of_error(&status, true),
            Err(None) => Outcome::Unknown,
        };
        self.history.complete(id, outcome.clone());
        outcome
    }

    async fn create_once(&mut self) -> Outcome {
        let value = self.next_value();
        let key = format!("once-{value}");
        let id = self.history.invoke(
            self.id,
            key.clone(),
            Operation::Cas {
                expected: None,
                new: value.clone(),
            },
        );
        let object_json =
            serde_json::to_vec(&configmap(&key, &value, None, true)).unwrap_or_default();
        let result = self
            .call(async move |mut client| client.create(ObjectRequest { object_json }).await)
            .await;
        let outcome = match result {
            Ok(_) => Outcome::Ok,
            Err(Some(status)) => outcome_of_error(&status, true),
            Err(None) => Outcome::Unknown,
        };
        self.history.complete(id, outcome.clone());
        outcome
    }

    async fn run(mut self, mut stop: watch::Receiver<bool>) {
        let mut operations: u64 = 0;
        while !*stop.borrow() {
            operations += 1;
            let key = WorkloadConfig::key(self.random.random_range(0..self.config.keys.max(1)));
            let choice = self.random.random_range(0..100);
            let outcome = if operations.is_multiple_of(self.config.once_every.max(1)) {
                self.create_once().await
            } else if choice < 40 {
                self.read(&key).await
            } else if choice < 70 {
                self.write(&key).await
            } else {
                self.compare_and_set(&key).await
            };
            let pause = match outcome {
                Outcome::Fail | Outcome::Unknown => {
                    self.config.pace.max(Duration::from_millis(100))
                }
                _ => self.config.pace,
            };
            tokio::select! {
                _ = stop.changed() => {}
                _ = tokio::time::sleep(pause) => {}
            }
        }
    }
}

/// A running workload.
pub struct Workload {
    pub history: History,
    stop: watch::Sender<bool>,
    clients: JoinSet<()>,
}

impl Workload {
    /// Creates the registers (each holding `init`) through `setup`, then starts the clients.
    pub async fn start(config: &WorkloadConfig, setup: SocketAddr) -> anyhow::Result<Workload> {
        let channel = connect(setup, Duration::from_secs(3)).await?;
        let mut objects = ObjectsClient::new(channel);
        for index in 0..config.keys {
            let key = WorkloadConfig::key(index);
            let object_json = serde_json::to_vec(&configmap(&key, "init", None, false))?;
            objects
                .apply(ObjectRequest { object_json })
                .await
                .map_err(|status| anyhow::anyhow!("create register {key}: {}", status.message()))?;
        }
        let history = History::new();
        let (stop, stopped) = watch::channel(false);
        let mut clients = JoinSet::new();
        for index in 0..config.clients {
            let id = index as u64;
            let client = Client::new(
                id,
                config.targets[config.target_index(id)],
                config.seed.wrapping_add(id * 7919),
                config,
                &history,
            );
            clients.spawn(client.run(stopped.clone()));
        }
        Ok(Workload {
            history,
            stop,
            clients,
        })
    }

    /// Stops the clients, letting their current operations finish (or time out).
    pub async fn stop(mut self) -> History {
        let _ = self.stop.send(true);
        while self.clients.join_next().await.is_some() {}
        self.history
    }
}

/// The initial value of every register, for the checker.
pub fn initial_values(config: &WorkloadConfig) -> HashMap<String, String> {
    (0..config.keys)
        .map(|index| (WorkloadConfig::key(index), "init".to_string()))
        .collect()
}

/// Reads every register once more through `target` (recorded in the history, retried until
/// it answers), and lists the write-once objects: their final state.
pub async fn final_reads(
    history: &History,
    config: &WorkloadConfig,
    target: SocketAddr,
) -> anyhow::Result<HashMap<String, Option<String>>> {
    let mut reader = Client::new(FINAL_READER, target, config.seed, config, history);
    for index in 0..config.keys {
        let key = WorkloadConfig::key(index);
        let mut attempts = 0;
        while !matches!(reader.read(&key).await, Outcome::ReadOk { .. }) {
            attempts += 1;
            if attempts >= 20 {
                anyhow::bail!("final read of {key} through {target} kept failing");
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    let channel = connect(target, Duration::from_secs(3)).await?;
    let reply = ObjectsClient::new(channel)
        .list(ListRequest {
            kind: "ConfigMap".into(),
            namespace: NAMESPACE.into(),
            label_selector: format!("{ONCE_LABEL}=true"),
            field_selector: String::new(),
            local: false,
        })
        .await
        .map_err(|status| anyhow::anyhow!("list the write-once objects: {}", status.message()))?;
    let mut state = HashMap::new();
    for item in reply.into_inner().items_json {
        let object: Value = serde_json::from_slice(&item)?;
        if let Some(name) = object.pointer("/metadata/name").and_then(Value::as_str) {
            state.insert(name.to_owned(), value_of(&object));
        }
    }
    Ok(state)
}

/// A digest of every ConfigMap as the node at `target` holds it (its own state, not the
/// leader's), for comparing the nodes' stores.
pub async fn store_digest(target: SocketAddr) -> anyhow::Result<(usize, u64)> {
    use std::hash::{Hash, Hasher};
    let channel = connect(target, Duration::from_secs(2)).await?;
    let reply = ObjectsClient::new(channel)
        .max_decoding_message_size(256 * 1024 * 1024)
        .list(ListRequest {
            kind: "ConfigMap".into(),
            namespace: String::new(),
            label_selector: String::new(),
            field_selector: String::new(),
            local: true,
        })
        .await
        .map_err(|status| anyhow::anyhow!("list ConfigMaps on {target}: {}", status.message()))?;
    let mut items: Vec<(String, String, Option<String>)> = Vec::new();
    for item in reply.into_inner().items_json {
        let object: Value = serde_json::from_slice(&item)?;
        let name = object
            .pointer("/metadata/namespace")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned()
            + "/"
            + object
                .pointer("/metadata/name")
                .and_then(Value::as_str)
                .unwrap_or_default();
        items.push((
            name,
            version_of(&object).unwrap_or_default(),
            value_of(&object),
        ));
    }
    items.sort();
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    items.hash(&mut hasher);
    Ok((items.len(), hasher.finish()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_errors_the_server_states_as_definite_are_failures() {
        let unavailable = tonic::Status::unavailable("cluster unavailable: no leader is elected");
        assert_eq!(outcome_of_error(&unavailable, true), Outcome::Fail);
        let unknown = tonic::Status::unknown("outcome unknown: leader changed");
        assert_eq!(outcome_of_error(&unknown, true), Outcome::Unknown);
        let reset = tonic::Status::unavailable("transport error: connection reset");
        assert_eq!(outcome_of_error(&reset, true), Outcome::Unknown);
        let conflict = tonic::Status::aborted("conflict: resourceVersion 5 is stale");
        assert_eq!(outcome_of_error(&conflict, true), Outcome::CasConflict);
        let cancelled = tonic::Status::cancelled("timeout");
        assert_eq!(outcome_of_error(&cancelled, false), Outcome::Unknown);
    }
}
