//! A cluster of real `flotilla serve` processes on 127.0.0.1 for integration tests. Every
//! process is killed and every data dir removed when the `Cluster` is dropped, also on failure.

#![allow(dead_code, unreachable_pub)]

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use flotilla_proto::cluster_client::ClusterClient;
use flotilla_proto::objects_client::ObjectsClient;
use flotilla_proto::{GetRequest, ObjectRequest, StatusRequest};
use serde_json::{json, Value};
use tempfile::TempDir;
use tonic::transport::Channel;

pub const BINARY: &str = env!("CARGO_BIN_EXE_flotilla");

pub struct Node {
    pub name: String,
    pub address: String,
    pub data_dir: PathBuf,
    pub process: Option<Child>,
    pub extra_args: Vec<String>,
}

pub struct Cluster {
    pub dir: TempDir,
    pub nodes: Vec<Node>,
    /// Whether nodes run the agent (and so create Docker containers and networks).
    pub agents: bool,
    /// Set once known; the containers and networks of this cluster carry it as a label.
    pub cluster_id: Option<String>,
    /// The join token, fetched when the second node joins.
    pub join_token: Option<String>,
}

/// 10.X.0.0/16 with X in 100..=199, chosen from the clock and the process id.
fn test_cluster_cidr() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let second = 100 + (nanos ^ std::process::id()) % 100;
    format!("10.{second}.0.0/16")
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Small snapshot thresholds so that tests exercise snapshots and purged logs.
const SNAPSHOT_ARGS: [&str; 4] = [
    "--snapshot-every-entries",
    "200",
    "--log-entries-kept-after-snapshot",
    "20",
];

/// Agent settings for tests: short back-off so restarts are observable in seconds.
const AGENT_ARGS: [&str; 4] = ["--crash-backoff-base-ms", "1000", "--heartbeat-ms", "500"];

impl Cluster {
    pub fn new() -> anyhow::Result<Cluster> {
        Ok(Cluster {
            dir: TempDir::new().context("create the cluster's temp dir")?,
            nodes: Vec::new(),
            agents: false,
            cluster_id: None,
            join_token: None,
        })
    }

    fn spawn(&mut self, idx: usize, role_args: &[String]) -> anyhow::Result<()> {
        let node = &mut self.nodes[idx];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("{}.log", node.name)))?;
        let child = Command::new(BINARY)
            .args(["serve", "--name", &node.name, "--listen", &node.address])
            .arg("--data-dir")
            .arg(&node.data_dir)
            .args(SNAPSHOT_ARGS)
            .args(if self.agents {
                &AGENT_ARGS[..]
            } else {
                &["--no-agent"][..]
            })
            .args(role_args)
            .args(&node.extra_args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("start flotilla serve")?;
        node.process = Some(child);
        Ok(())
    }

    /// Adds a node; the first one initializes the cluster, the others join through the first.
    pub fn add_node(&mut self, extra_args: &[&str]) -> anyhow::Result<usize> {
        let idx = self.nodes.len();
        let name = format!("n{}", idx + 1);
        let data_dir = self.dir.path().join(&name);
        self.nodes.push(Node {
            name,
            address: format!("127.0.0.1:{}", free_port()?),
            data_dir,
            process: None,
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
        });
        let role_args = if idx == 0 {
            // A /16 of its own per test cluster, so that its pod networks cannot overlap with
            // the networks of other clusters (or leftovers) on the same Docker daemon.
            vec![
                "--init".to_string(),
                "--cluster-cidr".to_string(),
                test_cluster_cidr(),
                "--admin-config".to_string(),
                self.admin_config().display().to_string(),
            ]
        } else {
            vec![
                "--join".to_string(),
                self.nodes[0].address.clone(),
                "--token".to_string(),
                self.token()?,
            ]
        };
        self.spawn(idx, &role_args)?;
        Ok(idx)
    }

    /// The admin's credentials file the first node writes.
    pub fn admin_config(&self) -> PathBuf {
        self.dir.path().join("admin.json")
    }

    /// The cluster's join token (asked of the first node once, waiting up to 30 s for it).
    pub fn token(&mut self) -> anyhow::Result<String> {
        if let Some(token) = &self.join_token {
            return Ok(token.clone());
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if self.admin_config().exists() {
                let output = self.cli_via(0, &["cluster", "join-token"])?;
                if output.status.success() {
                    let token = String::from_utf8_lossy(&output.stdout).trim().to_string();
                    self.join_token = Some(token.clone());
                    return Ok(token);
                }
                if Instant::now() > deadline {
                    bail!(
                        "no join token within 30 s: {}",
                        String::from_utf8_lossy(&output.stderr)
                    );
                }
            } else if Instant::now() > deadline {
                bail!("the first node wrote no admin credentials within 30 s");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// TLS with the admin's credentials.
    pub fn admin_tls(&self) -> anyhow::Result<std::sync::Arc<rustls::ClientConfig>> {
        Ok(flotilla_pki::credentials::CredentialsFile::read(&self.admin_config())?.client_tls()?)
    }

    /// Starts `n` nodes without agents and waits until all are healthy voters (up to 3).
    pub async fn start(n: usize) -> anyhow::Result<Cluster> {
        Cluster::start_with(n, false, &[]).await
    }

    /// Starts `n` nodes whose agents run pods on the local Docker daemon.
    pub async fn start_with_agents(n: usize) -> anyhow::Result<Cluster> {
        Cluster::start_with(n, true, &[]).await
    }

    /// Like [`Cluster::start_with_agents`], with `node_args` on every node's command line.
    pub async fn start_with_agents_and(n: usize, node_args: &[&str]) -> anyhow::Result<Cluster> {
        Cluster::start_with(n, true, node_args).await
    }

    async fn start_with(n: usize, agents: bool, node_args: &[&str]) -> anyhow::Result<Cluster> {
        let mut cluster = Cluster::new()?;
        cluster.agents = agents;
        cluster.add_node(node_args)?;
        let first = cluster
            .must_wait_for(
                |s| {
                    s["leader"].is_string()
                        && s["cluster_id"].as_str().is_some_and(|id| !id.is_empty())
                },
                "the first node to lead",
            )
            .await?;
        cluster.cluster_id = first["cluster_id"].as_str().map(String::from);
        for _ in 1..n {
            cluster.add_node(node_args)?;
        }
        cluster.must_wait_for_healthy_members(n).await?;
        Ok(cluster)
    }

    /// Waits until the cluster has `expected` members, min(3, expected) of them voters, all
    /// healthy as the leader sees them (so each one serves on its address).
    pub async fn must_wait_for_healthy_members(&self, expected: usize) -> anyhow::Result<()> {
        self.must_wait_for(
            move |s| {
                let members = s["members"].as_array().cloned().unwrap_or_default();
                let voters = members.iter().filter(|m| m["role"] == "voter").count();
                members.len() == expected
                    && voters == expected.min(3)
                    && members.iter().all(|m| m["healthy"] == true)
            },
            "every node to be a healthy member",
        )
        .await?;
        Ok(())
    }

    /// SIGKILL, like a crash.
    pub fn kill(&mut self, idx: usize) -> anyhow::Result<()> {
        if let Some(mut child) = self.nodes[idx].process.take() {
            child.kill().context("kill node")?;
            child.wait().context("reap node")?;
        }
        Ok(())
    }

    /// SIGTERM and wait: a clean stop.
    pub fn stop(&mut self, idx: usize) -> anyhow::Result<()> {
        if let Some(mut child) = self.nodes[idx].process.take() {
            let status = Command::new("kill")
                .arg("-TERM")
                .arg(child.id().to_string())
                .status()?;
            if !status.success() {
                bail!("send SIGTERM to {}", self.nodes[idx].name);
            }
            let deadline = Instant::now() + Duration::from_secs(15);
            while child.try_wait()?.is_none() {
                if Instant::now() > deadline {
                    child.kill()?;
                    child.wait()?;
                    bail!(
                        "{} did not stop within 15 s of SIGTERM",
                        self.nodes[idx].name
                    );
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    }

    /// Restarts a stopped node on its data dir (no --init/--join: it keeps its identity).
    pub fn restart(&mut self, idx: usize) -> anyhow::Result<()> {
        self.spawn(idx, &[])
    }

    pub fn addresses(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.address.clone()).collect()
    }

    pub fn running(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|i| self.nodes[*i].process.is_some())
            .collect()
    }

    pub async fn channel(&self, idx: usize) -> anyhow::Result<Channel> {
        let endpoint =
            tonic::transport::Endpoint::from_shared(format!("http://{}", self.nodes[idx].address))?
                .connect_timeout(Duration::from_secs(1))
                .timeout(Duration::from_secs(15));
        Ok(flotilla_pki::transport::connect(&endpoint, self.admin_tls()?).await?)
    }

    pub async fn objects(&self, idx: usize) -> anyhow::Result<ObjectsClient<Channel>> {
        Ok(ObjectsClient::new(self.channel(idx).await?))
    }

    /// The cluster status as one running node reports it.
    pub async fn status(&self) -> anyhow::Result<Value> {
        let mut last_error = anyhow::anyhow!("no node is running");
        for idx in self.running() {
            let attempt = async {
                let mut client = ClusterClient::new(self.channel(idx).await?);
                let reply = client.status(StatusRequest { local: false }).await?;
                anyhow::Ok(serde_json::from_slice::<Value>(
                    &reply.into_inner().status_json,
                )?)
            };
            match attempt.await {
                Ok(status) => return Ok(status),
                Err(error) => last_error = error,
            }
        }
        Err(last_error)
    }

    pub async fn must_wait_for(
        &self,
        condition: impl Fn(&Value) -> bool,
        what: &str,
    ) -> anyhow::Result<Value> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut last = Value::Null;
        while Instant::now() < deadline {
            if let Ok(status) = self.status().await {
                if condition(&status) {
                    return Ok(status);
                }
                last = status;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("timed out waiting for {what}; last status: {last}")
    }

    pub async fn leader_idx(&self) -> anyhow::Result<usize> {
        let status = self
            .must_wait_for(|s| s["leader"].is_string(), "a leader")
            .await?;
        let leader = status["leader"].as_str().unwrap_or_default();
        self.nodes
            .iter()
            .position(|n| n.name == leader)
            .context("the leader is one of our nodes")
    }

    /// Runs the CLI against this cluster's addresses.
    pub fn cli(&self, args: &[&str]) -> anyhow::Result<Output> {
        Ok(Command::new(BINARY)
            .args(["--server", &self.addresses().join(",")])
            .arg("--config")
            .arg(self.admin_config())
            .args(args)
            .output()?)
    }

    /// Runs the CLI against one node only.
    pub fn cli_via(&self, idx: usize, args: &[&str]) -> anyhow::Result<Output> {
        Ok(Command::new(BINARY)
            .args(["--server", &self.nodes[idx].address])
            .arg("--config")
            .arg(self.admin_config())
            .args(args)
            .output()?)
    }

    /// The node logs, for failure messages.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for node in &self.nodes {
            let path = self.dir.path().join(format!("{}.log", node.name));
            let text = std::fs::read_to_string(path).unwrap_or_default();
            let tail: Vec<_> = text.lines().rev().take(30).collect();
            out.push_str(&format!("--- {} ---\n", node.name));
            for line in tail.into_iter().rev() {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }
}

impl Cluster {
    /// Removes every container, network and host bridge of this cluster, found by its label.
    pub fn remove_docker_objects(&self) {
        let Some(cluster_id) = &self.cluster_id else {
            return;
        };
        let filter = format!("label=io.flotilla.cluster={cluster_id}");
        let list = |args: &[&str]| -> Vec<String> {
            Command::new("docker")
                .args(args)
                .output()
                .map(|o| {
                    String::from_utf8_lossy(&o.stdout)
                        .split_whitespace()
                        .map(String::from)
                        .collect()
                })
                .unwrap_or_default()
        };
        let containers = list(&["ps", "-aq", "--filter", &filter]);
        if !containers.is_empty() {
            let _ = Command::new("docker")
                .args(["rm", "-f"])
                .args(&containers)
                .output();
        }
        let networks = list(&["network", "ls", "-q", "--filter", &filter]);
        if !networks.is_empty() {
            let _ = Command::new("docker")
                .args(["network", "rm"])
                .args(&networks)
                .output();
        }
        // The bridges of nodes started with --pod-bridge.
        flotilla_runtime::host_bridge::remove_labelled_blocking(&format!(
            "io.flotilla.cluster={cluster_id}"
        ));
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.process.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        if self.agents {
            self.remove_docker_objects();
            // Secret volumes live on the tmpfs, outside the temporary directory.
            for node in &self.nodes {
                let _ = std::fs::remove_dir_all(flotilla_node::agent::default_secret_volumes_dir(
                    &node.data_dir,
                ));
            }
        }
    }
}

pub fn config_map(name: &str, value: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "namespace": "default"}, "data": {"v": value}})
}

pub async fn must_apply(
    client: &mut ObjectsClient<Channel>,
    object: &Value,
) -> anyhow::Result<Value> {
    let reply = client
        .apply(ObjectRequest {
            object_json: serde_json::to_vec(object)?,
        })
        .await?
        .into_inner();
    Ok(serde_json::from_slice(&reply.object_json)?)
}

pub async fn must_get(
    client: &mut ObjectsClient<Channel>,
    kind: &str,
    name: &str,
) -> anyhow::Result<Value> {
    let reply = client
        .get(GetRequest {
            kind: kind.into(),
            namespace: "default".into(),
            name: name.into(),
            local: false,
        })
        .await?
        .into_inner();
    Ok(serde_json::from_slice(&reply.object_json)?)
}
