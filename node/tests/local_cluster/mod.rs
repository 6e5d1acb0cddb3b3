//! Helpers for tests that drive a `flotilla local` cluster through the CLI.

#![allow(dead_code, unreachable_pub)]

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const BINARY: &str = env!("CARGO_BIN_EXE_flotilla");

/// Runs the flotilla binary with `args`.
pub fn flotilla(args: &[&str]) -> Output {
    Command::new(BINARY)
        .args(args)
        .output()
        .expect("run the flotilla binary")
}

/// Everything a command printed, stdout then stderr.
pub fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Removes the local cluster when the test ends, also when it fails.
pub struct Down(pub String);

impl Drop for Down {
    fn drop(&mut self) {
        let _ = flotilla(&["local", "down", "--name", &self.0]);
    }
}

/// A running `flotilla local` cluster, removed when dropped.
pub struct Cluster {
    pub name: String,
    /// What `local up` printed for `FLOTILLA_SERVER`.
    pub servers: String,
    /// What `local up` printed for `FLOTILLA_CONFIG`: the admin's credentials file.
    pub config: String,
    /// (node name, container, address) as `local up` printed them.
    pub nodes: Vec<(String, String, SocketAddr)>,
    _down: Down,
}

impl Cluster {
    /// Starts a cluster of `nodes` node containers named after `name`.
    pub fn up(name: &str, nodes: usize) -> Cluster {
        let down = Down(name.to_owned());
        let count = nodes.to_string();
        let up = flotilla(&["local", "up", "--nodes", &count, "--name", name]);
        assert!(up.status.success(), "local up failed: {}", text(&up));
        let printed = text(&up);
        let servers = printed
            .lines()
            .find_map(|line| line.trim().strip_prefix("export FLOTILLA_SERVER="))
            .expect("local up prints how to point the CLI at the cluster")
            .to_owned();
        let config = printed
            .lines()
            .find_map(|line| line.trim().strip_prefix("export FLOTILLA_CONFIG="))
            .expect("local up prints where the admin's credentials are")
            .to_owned();
        let listed: Vec<(String, String, SocketAddr)> = printed
            .lines()
            .filter_map(|line| {
                let fields: Vec<&str> = line.split('\t').collect();
                match fields.as_slice() {
                    [node, container, address] => Some((
                        node.to_string(),
                        container.to_string(),
                        address.parse().ok()?,
                    )),
                    _ => None,
                }
            })
            .collect();
        assert_eq!(listed.len(), nodes, "{nodes} nodes printed: {printed}");
        Cluster {
            name: name.to_owned(),
            servers,
            config,
            nodes: listed,
            _down: down,
        }
    }

    /// Runs the CLI against the cluster.
    pub fn cli(&self, args: &[&str]) -> Output {
        let mut all = vec!["--server", &self.servers, "--config", &self.config];
        all.extend_from_slice(args);
        flotilla(&all)
    }

    /// `args` with `-o json`, parsed; `None` when the command failed.
    pub fn json(&self, args: &[&str]) -> Option<Value> {
        let mut all = args.to_vec();
        all.extend_from_slice(&["-o", "json"]);
        let output = self.cli(&all);
        if !output.status.success() {
            return None;
        }
        serde_json::from_slice(&output.stdout).ok()
    }

    /// Applies a manifest, with `NODE<i>` replaced by the name of node i.
    pub fn apply(&self, manifest: &str) {
        let mut manifest = manifest.to_owned();
        for index in (1..=self.nodes.len()).rev() {
            manifest = manifest.replace(&format!("NODE{index}"), &self.node(index));
        }
        let path = std::env::temp_dir().join(format!("{}-{}.yaml", self.name, uuid_like()));
        std::fs::write(&path, manifest).expect("write the manifest");
        let apply = self.cli(&["apply", "-f", &path.to_string_lossy()]);
        let _ = std::fs::remove_file(&path);
        assert!(apply.status.success(), "apply: {}", text(&apply));
    }

    /// The name of node `index` (1-based).
    pub fn node(&self, index: usize) -> String {
        format!("{}-n{index}", self.name)
    }

    /// The container of node `index` (1-based).
    pub fn container(&self, index: usize) -> &str {
        &self.nodes[index - 1].1
    }

    /// The address of node `index` (1-based).
    pub fn address(&self, index: usize) -> IpAddr {
        self.nodes[index - 1].2.ip()
    }

    /// The proxy counters of node `index`, `null` when unreadable.
    pub fn proxy_stats(&self, index: usize) -> Value {
        let output = Command::new("docker")
            .args([
                "exec",
                self.container(index),
                "cat",
                "/data/proxy-stats.json",
            ])
            .output()
            .expect("run docker exec");
        serde_json::from_slice(&output.stdout).unwrap_or(Value::Null)
    }

    /// The names of the pods whose names start with `prefix`, once `count` of them run.
    pub fn running_pods(&self, prefix: &str, count: usize, limit: Duration) -> Vec<String> {
        wait_for(limit, || {
            let pods = self.json(&["get", "pods"])?;
            let running: Vec<String> = pods["items"]
                .as_array()?
                .iter()
                .filter(|pod| {
                    pod.pointer("/status/phase").and_then(Value::as_str) == Some("Running")
                })
                .filter_map(|pod| pod.pointer("/metadata/name")?.as_str().map(str::to_owned))
                .filter(|name| name.starts_with(prefix))
                .collect();
            (running.len() == count).then_some(running)
        })
        .unwrap_or_else(|| panic!("{count} {prefix} pods do not run within {limit:?}"))
    }
}

fn uuid_like() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Polls `probe` every half second until it gives a value or `limit` passes.
pub fn wait_for<T>(limit: Duration, mut probe: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = probe() {
            return Some(value);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// An HTTP/1.0 request over a plain TCP connection (`Host` when given); the whole reply.
pub fn http_get(address: SocketAddr, host: Option<&str>, path: &str) -> std::io::Result<String> {
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(3))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let host_line = host.map(|h| format!("Host: {h}\r\n")).unwrap_or_default();
    stream.write_all(format!("GET {path} HTTP/1.0\r\n{host_line}\r\n").as_bytes())?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply)?;
    Ok(reply)
}

/// The body of an HTTP reply (after the blank line), trimmed.
pub fn body(reply: &str) -> &str {
    reply
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.trim())
        .unwrap_or("")
}

/// A one-replica Deployment `name` of `flotilla/echo` (HTTP on container port 8080, named
/// `http`) pinned to `node` by hostname, with the label `app: <name>`; a YAML document ending
/// in a line break.
pub fn echo_deployment(name: &str, node: &str) -> String {
    format!(
        "\
apiVersion: apps/v1
kind: Deployment
metadata: {{name: {name}}}
spec:
  replicas: 1
  selector: {{matchLabels: {{app: {name}}}}}
  template:
    metadata: {{labels: {{app: {name}}}}}
    spec:
      nodeSelector: {{kubernetes.io/hostname: {node}}}
      containers:
      - name: echo
        image: flotilla/echo:latest
        imagePullPolicy: Never
        ports: [{{containerPort: 8080, name: http}}]
"
    )
}
