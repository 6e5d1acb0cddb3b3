//! Service data path benchmark: what the service proxy costs a pod, in throughput and latency,
//! on a 2-node `flotilla local` cluster (node containers, pods on their nodes' pod networks).
//!
//! Pods (all `flotilla/echo`): a client and a server on node 1, a server on node 2; one
//! ClusterIP Service selects each server. From inside the client pod (`docker exec` of
//! `/flotilla-echo bench ...` in its container), four paths are measured:
//! - pod → local pod IP: the same pod network, no proxy (the baseline of b);
//! - pod → remote pod IP: routed by the kernel through both node containers, no proxy (the
//!   baseline of c);
//! - (b) pod → VIP whose endpoint is on the same node: node 1's proxy splices to the pod;
//! - (c) pod → VIP whose only endpoint is on the other node: node 1's proxy opens a stream of
//!   its QUIC tunnel to node 2's proxy, which connects to the pod.
//!
//! On every path: throughput, one connection downloading `--bytes` (`GET /bytes/N`, from the
//! request to the last byte), and latency, `--count` small requests (`GET /`, the server's
//! hostname back) on one persistent connection at `--rate` per second, open-loop-ish (a request
//! held back by a late answer is charged from when it was due). The paths take turns, `--repeat`
//! rounds; the figures are the medians over the rounds (p50 and p99 each the median of the
//! rounds' own). Every latency run names the server that answered, and it must be the pod the
//! path is meant to reach; node 1's proxy counters (`/data/proxy-stats.json` in its container)
//! must show a tunnel stream to node 2 for every connection of (c) and a direct splice for every
//! connection of (b). The UDP datagrams node 1 dropped for a full receive buffer while the
//! rounds ran are reported too (a drop is a loss to the tunnel's congestion control).
//!
//! The table sets (b) and (c) beside their baselines: the throughput ratio and the added p50
//! and p99, against the goals: (c)'s throughput at least 80% of direct, added latency at most
//! 150 µs at p50 and 1 ms at p99 (judged for b and c).
//!
//! The cluster is removed (as `flotilla local down` does) when the run ends, fails, panics or
//! is interrupted.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use bollard::exec::{CreateExecOptions, StartExecResults};
use bollard::Docker;
use chaos_tests::cluster::connect;
use clap::Parser;
use flotilla_local::{LocalCluster, UpOptions};
use flotilla_proto::objects_client::ObjectsClient;
use flotilla_proto::{GetRequest, ObjectRequest};
use futures::StreamExt;
use serde_json::{json, Value};
use tonic::transport::Channel;

/// The port the echo servers listen on.
const SERVER_PORT: u16 = 8080;
/// The port of the Services (to the servers' 8080).
const SERVICE_PORT: u16 = 80;
const CLIENT_POD: &str = "bench-client";
const CLIENT_CONTAINER: &str = "client";
const LOCAL_SERVER_POD: &str = "bench-server-local";
const REMOTE_SERVER_POD: &str = "bench-server-remote";
const LOCAL_SERVICE: &str = "bench-local";
const REMOTE_SERVICE: &str = "bench-remote";
/// The labels the agents put on pod containers (`flotilla-runtime`'s `labels`).
const POD_NAME_LABEL: &str = "io.flotilla.pod.name";
const CONTAINER_LABEL: &str = "io.flotilla.container";
/// Where a node keeps its proxy counters.
const PROXY_STATS_PATH: &str = "/data/proxy-stats.json";
/// The proxy writes its counters every second: after this long, the file shows what happened.
const STATS_SETTLE: Duration = Duration::from_millis(1500);
const POLL_INTERVAL: Duration = Duration::from_millis(500);
/// How many times a path's first (unmeasured) exchange is tried while the proxy catches up.
const WARMUP_ATTEMPTS: usize = 60;
/// The goals: (c)'s throughput at least this fraction of direct's; the latency a VIP adds to
/// its baseline at most these, at p50 and at p99.
const GOAL_THROUGHPUT_RATIO: f64 = 0.80;
const GOAL_ADDED_P50_MICROS: f64 = 150.0;
const GOAL_ADDED_P99_MICROS: f64 = 1000.0;

#[derive(Debug, Parser)]
#[command(
    about = "Throughput and latency of pod -> pod IP, pod -> VIP (same node), pod -> VIP \
                   (other node, QUIC tunnel) on a 2-node local cluster"
)]
struct Args {
    /// The flotilla binary the node image is built from [default: `flotilla` next to this
    /// executable].
    #[arg(long)]
    flotilla: Option<PathBuf>,
    /// Bytes downloaded by one throughput run.
    #[arg(long, default_value_t = 512 * 1024 * 1024)]
    bytes: u64,
    /// Requests per second of a latency run.
    #[arg(long, default_value_t = 1000.0)]
    rate: f64,
    /// Measured requests of a latency run.
    #[arg(long, default_value_t = 5000)]
    count: u64,
    /// Unmeasured requests before a latency run's measured ones.
    #[arg(long, default_value_t = 200)]
    warmup: u64,
    /// Rounds: each path is measured this many times, the paths taking turns.
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// The image of the pods: it must carry `/flotilla-echo` with the `bench` client.
    #[arg(long, default_value = "flotilla/echo:latest")]
    image: String,
    /// The local cluster's name [default: `bsvc<pid>`].
    #[arg(long)]
    name: Option<String>,
    /// How long the cluster may take to start and the pods and Services to be ready, in
    /// seconds.
    #[arg(long, default_value_t = 180)]
    ready_timeout_seconds: u64,
}

/// Removes the local cluster when dropped: at the end, on an error, a panic or an interrupt.
struct ClusterGuard {
    name: String,
}

impl Drop for ClusterGuard {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Drop cannot await (and may run inside the runtime): a thread with its own runtime.
        let removed = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|error| error.to_string())?;
            runtime.block_on(async {
                let docker = flotilla_local::connect_docker()
                    .await
                    .map_err(|error| error.to_string())?;
                flotilla_local::down(&docker, &name)
                    .await
                    .map_err(|error| error.to_string())
            })
        })
        .join();
        match removed {
            Ok(Ok(report)) => eprintln!(
                "local cluster {} removed ({} node containers, {} pod containers, {} networks)",
                self.name, report.node_containers, report.pod_containers, report.networks
            ),
            Ok(Err(error)) => eprintln!(
                "warning: removing local cluster {} failed: {error}; run `flotilla local down --name {}`",
                self.name, self.name
            ),
            Err(_) => eprintln!(
                "warning: removing local cluster {} panicked; run `flotilla local down --name {}`",
                self.name, self.name
            ),
        }
    }
}

/// A measured path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Path {
    LocalPodIp,
    RemotePodIp,
    VipLocalEndpoint,
    VipRemoteEndpoint,
}

impl Path {
    const ALL: [Path; 4] = [
        Path::RemotePodIp,
        Path::VipRemoteEndpoint,
        Path::LocalPodIp,
        Path::VipLocalEndpoint,
    ];

    fn describe(self) -> &'static str {
        match self {
            Path::LocalPodIp => "pod -> local pod IP",
            Path::RemotePodIp => "pod -> remote pod IP",
            Path::VipLocalEndpoint => "pod -> VIP, endpoint same node",
            Path::VipRemoteEndpoint => "pod -> VIP, endpoint other node",
        }
    }

    /// The pod that must answer.
    fn server_pod(self) -> &'static str {
        match self {
            Path::LocalPodIp | Path::VipLocalEndpoint => LOCAL_SERVER_POD,
            Path::RemotePodIp | Path::VipRemoteEndpoint => REMOTE_SERVER_POD,
        }
    }
}

/// What one path measured over the rounds.
#[derive(Debug, Default, Clone)]
struct Figures {
    megabytes_per_second: Vec<f64>,
    p50_micros: Vec<f64>,
    p99_micros: Vec<f64>,
    max_micros: Vec<f64>,
    late: u64,
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

impl Figures {
    fn throughput(&self) -> f64 {
        median(&self.megabytes_per_second)
    }
    fn p50(&self) -> f64 {
        median(&self.p50_micros)
    }
    fn p99(&self) -> f64 {
        median(&self.p99_micros)
    }
    fn max(&self) -> f64 {
        self.max_micros.iter().copied().fold(f64::NAN, f64::max)
    }
}

/// The cluster as the benchmark uses it.
struct Bench {
    cluster: LocalCluster,
    /// Node 1 (client, local server) and node 2 (remote server).
    node_one: String,
    node_two: String,
    client_container: String,
    targets: HashMap<Path, SocketAddr>,
}

/// What `docker exec` of a command gave.
struct ExecOutput {
    exit_code: Option<i64>,
    stdout: String,
    stderr: String,
}

/// Runs `command` in `container` (a pod's container), up to `timeout`.
async fn exec_in(
    docker: &Docker,
    container: &str,
    command: &[String],
    timeout: Duration,
) -> Result<ExecOutput> {
    let run = async {
        let options = CreateExecOptions {
            cmd: Some(command.to_vec()),
            attach_stdout: Some(true),
            attach_stderr: Some(true),
            ..Default::default()
        };
        let created = docker
            .create_exec(container, options)
            .await
            .with_context(|| format!("create an exec of {command:?} in {container}"))?;
        let mut stdout = Vec::new();
        let mut stderr = Vec::new();
        if let StartExecResults::Attached { mut output, .. } = docker
            .start_exec(&created.id, None)
            .await
            .with_context(|| format!("start {command:?} in {container}"))?
        {
            while let Some(chunk) = output.next().await {
                match chunk.with_context(|| format!("read the output of {command:?}"))? {
                    bollard::container::LogOutput::StdErr { message } => {
                        stderr.extend_from_slice(&message)
                    }
                    other => stdout.extend_from_slice(&other.into_bytes()),
                }
            }
        }
        let inspected = docker
            .inspect_exec(&created.id)
            .await
            .context("inspect the exec")?;
        Ok(ExecOutput {
            exit_code: inspected.exit_code,
            stdout: String::from_utf8_lossy(&stdout).into_owned(),
            stderr: String::from_utf8_lossy(&stderr).into_owned(),
        })
    };
    tokio::time::timeout(timeout, run)
        .await
        .map_err(|_| anyhow!("{command:?} in {container} took longer than {timeout:?}"))?
}

fn pod(name: &str, node: &str, image: &str, role: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "default",
                     "labels": {"app": "bench-services", "role": role}},
        "spec": {
            "nodeSelector": {"kubernetes.io/hostname": node},
            "terminationGracePeriodSeconds": 1,
            "containers": [{
                "name": if role == "client" { CLIENT_CONTAINER } else { "echo" },
                "image": image, "imagePullPolicy": "Never",
                "ports": [{"containerPort": SERVER_PORT, "name": "http"}]
            }]
        }
    })
}

fn service(name: &str, role: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "selector": {"app": "bench-services", "role": role},
            "ports": [{"port": SERVICE_PORT, "targetPort": SERVER_PORT}]
        }
    })
}

/// Polls `probe` until it gives a value or `timeout` passes; `what` and the last problem name
/// the failure.
async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut probe: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        let last = match probe().await {
            Ok(value) => return Ok(value),
            Err(problem) => problem,
        };
        if Instant::now() >= deadline {
            bail!("{what}: not within {timeout:?}; last: {last}");
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

async fn get(
    objects: &mut ObjectsClient<Channel>,
    kind: &str,
    name: &str,
) -> Result<Value, String> {
    let reply = objects
        .get(GetRequest {
            kind: kind.into(),
            namespace: "default".into(),
            name: name.into(),
            local: false,
        })
        .await
        .map_err(|status| format!("get {kind} {name}: {}", status.message()))?;
    serde_json::from_slice(&reply.into_inner().object_json)
        .map_err(|error| format!("decode {kind} {name}: {error}"))
}

/// The pod's IP once it runs on `node`.
async fn running_pod_ip(
    objects: &mut ObjectsClient<Channel>,
    name: &str,
    node: &str,
) -> Result<IpAddr, String> {
    let pod = get(objects, "pods", name).await?;
    let phase = pod.pointer("/status/phase").and_then(Value::as_str);
    let bound = pod.pointer("/spec/nodeName").and_then(Value::as_str);
    if phase != Some("Running") || bound != Some(node) {
        return Err(format!("pod {name}: phase {phase:?} on {bound:?}"));
    }
    pod.pointer("/status/podIP")
        .and_then(Value::as_str)
        .and_then(|ip| ip.parse().ok())
        .ok_or_else(|| format!("pod {name} has no podIP yet"))
}

/// The Service's cluster IP once its Endpoints list exactly `pod_ip` as ready.
async fn service_ready(
    objects: &mut ObjectsClient<Channel>,
    name: &str,
    pod_ip: IpAddr,
) -> Result<IpAddr, String> {
    let endpoints = get(objects, "endpoints", name).await?;
    let ready: Vec<&str> = endpoints
        .pointer("/subsets")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .flat_map(|subset| subset["addresses"].as_array().into_iter().flatten())
        .filter_map(|address| address["ip"].as_str())
        .collect();
    if ready != [pod_ip.to_string()] {
        return Err(format!(
            "endpoints {name}: ready {ready:?}, want [{pod_ip}]"
        ));
    }
    let service = get(objects, "services", name).await?;
    service
        .pointer("/spec/clusterIP")
        .and_then(Value::as_str)
        .and_then(|ip| ip.parse().ok())
        .ok_or_else(|| format!("service {name} has no cluster IP"))
}

impl Bench {
    /// The proxy counters of the node named `node`.
    async fn proxy_stats(&self, node: &str) -> Result<Value> {
        let printed = self
            .cluster
            .exec(node, &["cat", PROXY_STATS_PATH])
            .await
            .with_context(|| format!("read {PROXY_STATS_PATH} of {node}"))?;
        serde_json::from_str(&printed)
            .with_context(|| format!("{PROXY_STATS_PATH} of {node}: {printed:?}"))
    }

    /// The node's count of UDP datagrams dropped for a full receive buffer (`RcvbufErrors` of
    /// `/proc/net/snmp` in its network namespace): a tunnel's losses on the receiving side.
    async fn udp_receive_drops(&self, node: &str) -> Result<u64> {
        let snmp = self
            .cluster
            .exec(node, &["cat", "/proc/net/snmp"])
            .await
            .with_context(|| format!("read /proc/net/snmp of {node}"))?;
        let mut udp = snmp.lines().filter(|line| line.starts_with("Udp: "));
        let (Some(names), Some(values)) = (udp.next(), udp.next()) else {
            bail!("no Udp lines in /proc/net/snmp of {node}");
        };
        names
            .split_whitespace()
            .zip(values.split_whitespace())
            .find(|(name, _)| *name == "RcvbufErrors")
            .and_then(|(_, value)| value.parse().ok())
            .ok_or_else(|| anyhow!("no RcvbufErrors in /proc/net/snmp of {node}"))
    }

    /// Runs `flotilla-echo bench MODE ARGS` in the client pod; its JSON.
    async fn client(&self, mode: &str, target: SocketAddr, arguments: &[String]) -> Result<Value> {
        let mut command = vec![
            "/flotilla-echo".to_owned(),
            "bench".to_owned(),
            mode.to_owned(),
            "--target".to_owned(),
            target.to_string(),
        ];
        command.extend_from_slice(arguments);
        // The client's own I/O timeout is 30 s; a latency run lasts count / rate.
        let timeout = Duration::from_secs(120) + self.run_length(arguments);
        let output = exec_in(
            self.cluster.docker(),
            &self.client_container,
            &command,
            timeout,
        )
        .await?;
        if output.exit_code != Some(0) {
            bail!(
                "{} exited with {:?}: {}{}",
                command.join(" "),
                output.exit_code,
                output.stderr.trim(),
                output.stdout.trim()
            );
        }
        serde_json::from_str(output.stdout.trim())
            .with_context(|| format!("{}: printed {:?}", command.join(" "), output.stdout))
    }

    /// How long a latency run of these arguments is scheduled to last.
    fn run_length(&self, arguments: &[String]) -> Duration {
        let value = |flag: &str| {
            arguments
                .iter()
                .position(|a| a == flag)
                .and_then(|i| arguments.get(i + 1))
                .and_then(|v| v.parse::<f64>().ok())
        };
        match (value("--count"), value("--rate")) {
            (Some(count), Some(rate)) if rate > 0.0 => {
                Duration::from_secs_f64((count / rate).min(3600.0))
            }
            _ => Duration::ZERO,
        }
    }

    /// A short exchange on `path`, retried until the right pod answers (the proxy's table
    /// follows the store within a pass or two).
    async fn warm_up(&self, path: Path) -> Result<()> {
        let target = self.targets[&path];
        let arguments: Vec<String> = ["--rate", "1000", "--count", "20", "--warmup", "5"]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
        let mut last = String::new();
        for _ in 0..WARMUP_ATTEMPTS {
            match self.client("latency", target, &arguments).await {
                Ok(answer) if answer["server"] == path.server_pod() => return Ok(()),
                Ok(answer) => last = format!("answered by {}", answer["server"]),
                Err(error) => last = format!("{error:#}"),
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
        bail!(
            "{} ({target}): {} did not answer within {WARMUP_ATTEMPTS} attempts; last: {last}",
            path.describe(),
            path.server_pod()
        )
    }
}

fn counter(stats: &Value, pointer: &str) -> u64 {
    stats.pointer(pointer).and_then(Value::as_u64).unwrap_or(0)
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|text| text.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".into())
}

fn verdict(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "NOT met"
    }
}

async fn run(args: Args) -> Result<()> {
    let binary = chaos_tests::process::flotilla_binary(args.flotilla.as_deref())?;
    if !binary.exists() {
        bail!(
            "no flotilla binary at {} (cargo build --release -p flotilla-node, or --flotilla)",
            binary.display()
        );
    }
    if args.repeat == 0
        || args.count == 0
        || args.bytes == 0
        || !args.rate.is_finite()
        || args.rate <= 0.0
    {
        bail!("--repeat, --count, --bytes and --rate must be positive");
    }
    let ready_timeout = Duration::from_secs(args.ready_timeout_seconds);
    let name = args
        .name
        .clone()
        .unwrap_or_else(|| format!("bsvc{}", std::process::id() % 100_000));
    let docker = chaos_tests::docker::connect().await?;
    chaos_tests::docker::warn_about_other_clusters(&docker).await?;

    // Before `up`: it removes whatever of the cluster exists by the time the run ends.
    let _guard = ClusterGuard { name: name.clone() };
    let mut options = UpOptions::new(&name, 2, binary.clone());
    options.ready_timeout = ready_timeout;
    let started = Instant::now();
    let cluster = LocalCluster::up(&options)
        .await
        .with_context(|| format!("start local cluster {name} from {}", binary.display()))?;
    chaos_tests::cluster::use_local_credentials(&cluster)?;
    let nodes: Vec<String> = cluster.nodes().iter().map(|n| n.name.clone()).collect();
    let [node_one, node_two] = nodes.as_slice() else {
        bail!("the cluster has nodes {nodes:?}, not two");
    };
    let (node_one, node_two) = (node_one.clone(), node_two.clone());
    println!(
        "local cluster {name} up in {:.1} s: {node_one}, {node_two} (load average {})",
        started.elapsed().as_secs_f64(),
        load_average()
    );
    let first = cluster.nodes()[0].addr();
    let mut objects = ObjectsClient::new(connect(first, Duration::from_secs(5)).await?);
    for object in [
        pod(CLIENT_POD, &node_one, &args.image, "client"),
        pod(LOCAL_SERVER_POD, &node_one, &args.image, "server-local"),
        pod(REMOTE_SERVER_POD, &node_two, &args.image, "server-remote"),
        service(LOCAL_SERVICE, "server-local"),
        service(REMOTE_SERVICE, "server-remote"),
    ] {
        objects
            .apply(ObjectRequest {
                object_json: serde_json::to_vec(&object)?,
            })
            .await
            .map_err(|status| {
                anyhow!("apply {}: {}", object["metadata"]["name"], status.message())
            })?;
    }

    let mut ips = HashMap::new();
    for (pod_name, node) in [
        (CLIENT_POD, &node_one),
        (LOCAL_SERVER_POD, &node_one),
        (REMOTE_SERVER_POD, &node_two),
    ] {
        let ip = wait_for(
            &format!("pod {pod_name} running on {node}"),
            ready_timeout,
            || {
                let mut objects = objects.clone();
                async move { running_pod_ip(&mut objects, pod_name, node).await }
            },
        )
        .await?;
        ips.insert(pod_name, ip);
    }
    let mut vips = HashMap::new();
    for (service_name, pod_name) in [
        (LOCAL_SERVICE, LOCAL_SERVER_POD),
        (REMOTE_SERVICE, REMOTE_SERVER_POD),
    ] {
        let pod_ip = ips[pod_name];
        let vip = wait_for(
            &format!("service {service_name} ready with {pod_name}"),
            ready_timeout,
            || {
                let mut objects = objects.clone();
                async move { service_ready(&mut objects, service_name, pod_ip).await }
            },
        )
        .await?;
        vips.insert(service_name, vip);
    }
    let client_container = wait_for("the client pod's container", ready_timeout, || {
        let cluster = cluster.clone();
        let node_one = node_one.clone();
        async move {
            let containers = cluster
                .pod_containers(&node_one)
                .await
                .map_err(|error| error.to_string())?;
            containers
                .into_iter()
                .find(|(_, labels)| {
                    labels.get(POD_NAME_LABEL).map(String::as_str) == Some(CLIENT_POD)
                        && labels.get(CONTAINER_LABEL).map(String::as_str) == Some(CLIENT_CONTAINER)
                })
                .map(|(id, _)| id)
                .ok_or_else(|| format!("no container {CLIENT_CONTAINER} of pod {CLIENT_POD}"))
        }
    })
    .await?;

    let targets = HashMap::from([
        (
            Path::LocalPodIp,
            SocketAddr::new(ips[LOCAL_SERVER_POD], SERVER_PORT),
        ),
        (
            Path::RemotePodIp,
            SocketAddr::new(ips[REMOTE_SERVER_POD], SERVER_PORT),
        ),
        (
            Path::VipLocalEndpoint,
            SocketAddr::new(vips[LOCAL_SERVICE], SERVICE_PORT),
        ),
        (
            Path::VipRemoteEndpoint,
            SocketAddr::new(vips[REMOTE_SERVICE], SERVICE_PORT),
        ),
    ]);
    let bench = Bench {
        cluster: cluster.clone(),
        node_one,
        node_two,
        client_container,
        targets,
    };
    let help = exec_in(
        bench.cluster.docker(),
        &bench.client_container,
        &[
            "/flotilla-echo".to_owned(),
            "bench".to_owned(),
            "--help".to_owned(),
        ],
        Duration::from_secs(30),
    )
    .await?;
    if !help.stdout.contains("bench latency") {
        bail!(
            "{} has no load client (`flotilla-echo bench`); rebuild it: scripts/build-images.sh",
            args.image
        );
    }
    for path in Path::ALL {
        println!("{:<34} {}", path.describe(), bench.targets[&path]);
    }
    for path in Path::ALL {
        bench.warm_up(path).await?;
    }
    // The counters of the warm-up reach the file within a second; the baseline must see them.
    tokio::time::sleep(STATS_SETTLE).await;
    let stats_one_before = bench.proxy_stats(&bench.node_one).await?;
    let stats_two_before = bench.proxy_stats(&bench.node_two).await?;
    let drops_before = bench.udp_receive_drops(&bench.node_one).await?;
    let throughput_arguments = vec!["--bytes".to_owned(), args.bytes.to_string()];
    let latency_arguments = vec![
        "--rate".to_owned(),
        args.rate.to_string(),
        "--count".to_owned(),
        args.count.to_string(),
        "--warmup".to_owned(),
        args.warmup.to_string(),
    ];
    let mut figures: HashMap<Path, Figures> = HashMap::new();
    for round in 1..=args.repeat {
        for path in Path::ALL {
            let target = bench.targets[&path];
            let bulk = bench
                .client("throughput", target, &throughput_arguments)
                .await
                .with_context(|| format!("round {round}: throughput of {}", path.describe()))?;
            let small = bench
                .client("latency", target, &latency_arguments)
                .await
                .with_context(|| format!("round {round}: latency of {}", path.describe()))?;
            if small["server"] != path.server_pod() {
                bail!(
                    "round {round}: {} was answered by {}, not {}",
                    path.describe(),
                    small["server"],
                    path.server_pod()
                );
            }
            let number = |value: &Value, key: &str| {
                value[key]
                    .as_f64()
                    .ok_or_else(|| anyhow!("the client printed no {key}: {value}"))
            };
            let entry = figures.entry(path).or_default();
            entry
                .megabytes_per_second
                .push(number(&bulk, "megabytes_per_second")?);
            entry.p50_micros.push(number(&small, "p50_us")?);
            entry.p99_micros.push(number(&small, "p99_us")?);
            entry.max_micros.push(number(&small, "max_us")?);
            entry.late += small["late"].as_u64().unwrap_or(0);
            println!(
                "round {round}  {:<34} {:>8.1} MB/s   p50 {:>7.1} µs   p99 {:>7.1} µs   max {:>8.1} µs   late {}",
                path.describe(),
                number(&bulk, "megabytes_per_second")?,
                number(&small, "p50_us")?,
                number(&small, "p99_us")?,
                number(&small, "max_us")?,
                small["late"],
            );
        }
    }

    // The proxy counters (written every second) must show the paths taken: a tunnel stream
    // for every connection of (c), a direct splice for every connection of (b).
    let connections_per_path = 2 * args.repeat as u64;
    let opened_pointer = format!("/streamsOpened/{}", bench.node_two);
    let accepted_pointer = format!("/streamsAccepted/{}", bench.node_one);
    let (opened, accepted, direct) = wait_for(
        "the proxy counters to count every measured connection",
        Duration::from_secs(10),
        || async {
            let one = bench
                .proxy_stats(&bench.node_one)
                .await
                .map_err(|e| format!("{e:#}"))?;
            let two = bench
                .proxy_stats(&bench.node_two)
                .await
                .map_err(|e| format!("{e:#}"))?;
            let opened =
                counter(&one, &opened_pointer) - counter(&stats_one_before, &opened_pointer);
            let accepted =
                counter(&two, &accepted_pointer) - counter(&stats_two_before, &accepted_pointer);
            let direct = counter(&one, "/direct") - counter(&stats_one_before, "/direct");
            if opened >= connections_per_path
                && accepted >= connections_per_path
                && direct >= connections_per_path
            {
                Ok((opened, accepted, direct))
            } else {
                Err(format!(
                    "{} opened {opened} streams to {}, {} accepted {accepted}, {} spliced \
                     {direct} directly; {connections_per_path} each expected",
                    bench.node_one, bench.node_two, bench.node_two, bench.node_one
                ))
            }
        },
    )
    .await?;

    let udp_drops = bench
        .udp_receive_drops(&bench.node_one)
        .await?
        .saturating_sub(drops_before);

    let get = |path: Path| figures.get(&path).cloned().unwrap_or_default();
    println!(
        "\nService data path on 2 node containers, client pod on {} (load average now {}):",
        bench.node_one,
        load_average()
    );
    println!(
        "  throughput: one connection, GET /bytes/{} ({:.0} MiB); latency: {} requests at {}/s \
         on one connection after {} unmeasured; median of {} rounds",
        args.bytes,
        args.bytes as f64 / 1048576.0,
        args.count,
        args.rate,
        args.warmup,
        args.repeat
    );
    println!(
        "\n  {:<36} {:>9} {:>9} {:>9} {:>9} | {:<21} {:>9} {:>9} {:>9} | {:>7} {:>9} {:>9}",
        "case",
        "MB/s",
        "p50 µs",
        "p99 µs",
        "max µs",
        "baseline",
        "MB/s",
        "p50 µs",
        "p99 µs",
        "ratio",
        "+p50 µs",
        "+p99 µs"
    );
    let cases = [
        ("(a) pod -> remote pod IP", Path::RemotePodIp, None),
        ("    pod -> local pod IP", Path::LocalPodIp, None),
        (
            "(b) pod -> VIP, same-node endpoint",
            Path::VipLocalEndpoint,
            Some(Path::LocalPodIp),
        ),
        (
            "(c) pod -> VIP, other node (QUIC)",
            Path::VipRemoteEndpoint,
            Some(Path::RemotePodIp),
        ),
    ];
    let mut goals = Vec::new();
    for (label, path, baseline) in cases {
        let measured = get(path);
        let mut line = format!(
            "  {label:<36} {:>9.1} {:>9.1} {:>9.1} {:>9.1} |",
            measured.throughput(),
            measured.p50(),
            measured.p99(),
            measured.max()
        );
        if let Some(baseline) = baseline {
            let base = get(baseline);
            let ratio = measured.throughput() / base.throughput();
            let added_p50 = measured.p50() - base.p50();
            let added_p99 = measured.p99() - base.p99();
            line.push_str(&format!(
                " {:<21} {:>9.1} {:>9.1} {:>9.1} | {:>7.2} {:>+9.1} {:>+9.1}",
                baseline.describe(),
                base.throughput(),
                base.p50(),
                base.p99(),
                ratio,
                added_p50,
                added_p99
            ));
            let case = &label[..3];
            if path == Path::VipRemoteEndpoint {
                goals.push(format!(
                    "{case} throughput >= {:.0}% of direct: {:.0}% — {}",
                    GOAL_THROUGHPUT_RATIO * 100.0,
                    ratio * 100.0,
                    verdict(ratio >= GOAL_THROUGHPUT_RATIO)
                ));
            } else {
                goals.push(format!(
                    "{case} throughput ratio {:.0}% (no goal; for reference)",
                    ratio * 100.0
                ));
            }
            goals.push(format!(
                "{case} added p50 <= {GOAL_ADDED_P50_MICROS:.0} µs: {added_p50:+.1} µs — {}",
                verdict(added_p50 <= GOAL_ADDED_P50_MICROS)
            ));
            goals.push(format!(
                "{case} added p99 <= {GOAL_ADDED_P99_MICROS:.0} µs: {added_p99:+.1} µs — {}",
                verdict(added_p99 <= GOAL_ADDED_P99_MICROS)
            ));
        }
        println!("{line}");
    }
    println!("\n  goals:");
    for goal in &goals {
        println!("    {goal}");
    }
    let late: u64 = Path::ALL.iter().map(|path| get(*path).late).sum();
    println!(
        "\n  tunnel check: {} opened {opened} streams to {}, {} accepted {accepted} from {} \
         ({connections_per_path} measured connections of (c)); {} spliced {direct} connections \
         directly ({connections_per_path} of (b)); {} dropped {udp_drops} tunnel datagrams for a \
         full receive buffer; {late} latency requests were held back by a late answer",
        bench.node_one,
        bench.node_two,
        bench.node_two,
        bench.node_one,
        bench.node_one,
        bench.node_one
    );
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    chaos_tests::process::run_benchmark(run(args), "interrupted")
}
