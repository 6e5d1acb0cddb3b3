//! Replica startup benchmark: a Deployment of `--replicas` (100) to all pods Running on one
//! Flotilla node, against Docker Swarm mode on the same daemon and against the Docker API
//! floor.
//!
//! In one run, one after another, each cleaned up before the next starts:
//!
//! 1. The floor: `--replicas` containers of the image created and started through the Docker
//!    API, `--parallelism` (8, what the Flotilla agent uses) at once, nothing else; and again
//!    on a bridge network of our own with a subnet (a node's pod network is such a network,
//!    and Docker sets up its embedded DNS in each container on one), and with the engine's
//!    network disabled (what a pod wired to a host bridge asks of the engine), printed beside
//!    it.
//! 2. Flotilla: a 1-node cluster with its agent; `Objects.Apply` of a Deployment (apps/v1) of
//!    `--replicas` pods running `sleep 3600`, timed until `List` (polled every 100 ms) shows
//!    them all Running; twice: as the node starts by default (on this host, where it runs as
//!    root, its pods are wired to a host bridge with no Docker network in them) and with
//!    `--docker-pod-network` (pods on a Docker network of the node).
//! 3. Docker Swarm: `docker swarm init` on 127.0.0.1 (refused if the daemon is already in a
//!    swarm), `docker service create --detach` of as many replicas (the image given by its ID,
//!    so that no task tries a registry pull), timed until the service's
//!    tasks (the API `docker service ps` reads, polled every 100 ms) are all running; then
//!    `docker service rm` and `docker swarm leave --force`, also on error or Ctrl-C.
//!
//! It prints the three times and the ratios, with the goals: Flotilla within 1.25x of the floor
//! and faster than Swarm, and how many containers the Flotilla run created (a pod of one
//! container needs no sandbox, so as many as the floor). Everything it
//! creates carries a label (`io.flotilla.bench=<pid>`, or the cluster's
//! `io.flotilla.cluster=<id>`) and is removed by it on exit, on error and on Ctrl-C.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use bollard::models::{
    ContainerCreateBody, HostConfig, Ipam, IpamConfig, LocalNodeState, NetworkCreateRequest,
    TaskState,
};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, ListNetworksOptionsBuilder, ListTasksOptionsBuilder,
};
use bollard::Docker;
use chaos_tests::cluster::{connect, FlotillaCluster};
use chaos_tests::docker::{self, LabelCleanup};
use chaos_tests::process::{cpu_seconds_between, cpu_ticks, cpu_ticks_of_named, TICKS_PER_SECOND};
use clap::Parser;
use flotilla_proto::objects_client::ObjectsClient;
use flotilla_proto::{GetRequest, ListRequest, ObjectRequest};
use serde_json::{json, Value};
use tonic::transport::Channel;

/// The processes of the container engine whose CPU time a phase reports: the daemon, containerd,
/// the per-container shims and runc.
const ENGINE_PROCESSES: [&str; 5] = [
    "dockerd",
    "containerd",
    "containerd-shim",
    "containerd-shim-runc-v2",
    "runc",
];

/// The interval at which every system is polled for its replicas.
const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// The label every Docker object the benchmark creates itself carries (value: our PID).
const BENCH_LABEL: &str = "io.flotilla.bench";
/// The name of the Deployment.
const DEPLOYMENT: &str = "bench-replicas";
/// The bridge network `docker swarm init` creates on the daemon.
const SWARM_BRIDGE: &str = "docker_gwbridge";

#[derive(Debug, Parser)]
#[command(
    about = "A Deployment of 100 replicas to Running on one node, against Docker Swarm \
                   and the Docker API floor"
)]
struct Args {
    /// The flotilla binary [default: `flotilla` next to this executable].
    #[arg(long)]
    flotilla: Option<PathBuf>,
    /// How many replicas (pods, Swarm tasks, floor containers).
    #[arg(long, default_value_t = 100)]
    replicas: usize,
    /// The image all three run, with `sleep 3600`.
    #[arg(long, default_value = "flotilla/busybox:latest")]
    image: String,
    /// How many floor containers are created and started at once (the Flotilla agent's
    /// `max_parallel_pods`).
    #[arg(long, default_value_t = 8)]
    parallelism: usize,
    /// How long each system may take to run all replicas, in seconds.
    #[arg(long, default_value_t = 300)]
    timeout_seconds: u64,
    /// Skip the Docker Swarm measurement (and leave the daemon's swarm state alone).
    #[arg(long)]
    skip_swarm: bool,
    /// Skip the Flotilla measurement.
    #[arg(long)]
    skip_flotilla: bool,
}

fn secs(duration: Duration) -> String {
    format!("{:.2} s", duration.as_secs_f64())
}

fn ratio(numerator: Duration, denominator: Duration) -> f64 {
    numerator.as_secs_f64() / denominator.as_secs_f64().max(1e-9)
}

/// The network of the floor's containers.
#[derive(Debug, Clone, Copy)]
enum FloorNetwork<'a> {
    /// The engine's default (its `bridge` network).
    Default,
    /// A network of ours, by name.
    Named(&'a str),
    /// None at all (`NetworkDisabled`), as a pod wired to a host bridge asks of the engine.
    Disabled,
}

/// The floor: `count` containers created and started through the Docker API, `parallelism` at
/// once; returns the time from the first create to the last start, and the engine's CPU
/// seconds over it. The containers are removed afterwards (not timed).
async fn measure_floor(
    docker: &Docker,
    image: &str,
    count: usize,
    parallelism: usize,
    label: &str,
    network: FloorNetwork<'_>,
) -> Result<(Duration, f64)> {
    let _cleanup = LabelCleanup::new(label);
    let (key, value) = label
        .split_once('=')
        .ok_or_else(|| anyhow!("label {label} has no '='"))?;
    let labels = HashMap::from([(key.to_owned(), value.to_owned())]);
    let pid = std::process::id();
    let engine_before = cpu_ticks_of_named(&ENGINE_PROCESSES);
    let started = Instant::now();
    docker::in_parallel(count, parallelism, |index| {
        let docker = docker.clone();
        let options = CreateContainerOptionsBuilder::default()
            .name(&format!("flotilla-bench-{pid}-floor-{index}"))
            .build();
        let body = ContainerCreateBody {
            image: Some(image.to_owned()),
            cmd: Some(vec!["sleep".to_owned(), "3600".to_owned()]),
            labels: Some(labels.clone()),
            network_disabled: matches!(network, FloorNetwork::Disabled).then_some(true),
            host_config: match network {
                FloorNetwork::Default => None,
                FloorNetwork::Named(name) => Some(name),
                FloorNetwork::Disabled => Some("none"),
            }
            .map(|mode| HostConfig {
                network_mode: Some(mode.to_owned()),
                ..Default::default()
            }),
            ..Default::default()
        };
        async move {
            let created = docker
                .create_container(Some(options), body)
                .await
                .with_context(|| format!("create floor container {index}"))?;
            docker
                .start_container(&created.id, None)
                .await
                .with_context(|| format!("start floor container {index}"))?;
            Ok(())
        }
    })
    .await?;
    let elapsed = started.elapsed();
    let engine_cpu_seconds =
        cpu_seconds_between(&engine_before, &cpu_ticks_of_named(&ENGINE_PROCESSES));
    let removed = docker::remove_containers(docker, &[label.to_owned()], parallelism).await?;
    if removed != count {
        bail!("found {removed} floor containers to remove, expected {count}");
    }
    Ok((elapsed, engine_cpu_seconds))
}

/// Creates a bridge network of our own with a subnet, as a node's pod network is, labelled
/// `label`; returns its name. Tries a few /24s of 10.253.0.0/16 until one is free.
async fn create_user_network(docker: &Docker, label: &str) -> Result<String> {
    let (key, value) = label
        .split_once('=')
        .ok_or_else(|| anyhow!("label {label} has no '='"))?;
    let name = format!("flotilla-bench-{}-net", std::process::id());
    let mut last_error = None;
    for third in (0..16u32).map(|i| (std::process::id() + i * 17) % 256) {
        let request = NetworkCreateRequest {
            name: name.clone(),
            driver: Some("bridge".to_owned()),
            ipam: Some(Ipam {
                config: Some(vec![IpamConfig {
                    subnet: Some(format!("10.253.{third}.0/24")),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            labels: Some(HashMap::from([(key.to_owned(), value.to_owned())])),
            ..Default::default()
        };
        match docker.create_network(request).await {
            Ok(_) => return Ok(name),
            Err(err) => last_error = Some(err),
        }
    }
    Err(anyhow!(
        "create a bridge network in 10.253.0.0/16: {}",
        last_error.map(|e| e.to_string()).unwrap_or_default()
    ))
}

/// The pods of the Deployment, from the node's local state.
async fn list_pods(client: &mut ObjectsClient<Channel>) -> Result<Vec<Value>> {
    let reply = client
        .list(ListRequest {
            kind: "pods".into(),
            namespace: "default".into(),
            label_selector: format!("app={DEPLOYMENT}"),
            field_selector: String::new(),
            local: true,
        })
        .await
        .context("list the pods")?;
    reply
        .into_inner()
        .items_json
        .iter()
        .map(|bytes| serde_json::from_slice(bytes).context("decode a pod"))
        .collect()
}

/// Whether the Node `name` reports Ready=True.
async fn node_ready(client: &mut ObjectsClient<Channel>, name: &str) -> bool {
    let reply = client
        .get(GetRequest {
            kind: "nodes".into(),
            namespace: String::new(),
            name: name.into(),
            local: true,
        })
        .await;
    let Ok(reply) = reply else { return false };
    let Ok(node) = serde_json::from_slice::<Value>(&reply.into_inner().object_json) else {
        return false;
    };
    node.pointer("/status/conditions")
        .and_then(Value::as_array)
        .is_some_and(|conditions| {
            conditions
                .iter()
                .any(|c| c["type"] == "Ready" && c["status"] == "True")
        })
}

/// Flotilla: a 1-node cluster with its agent, started with `node_flags`; returns the time from
/// the Deployment's apply to all its pods Running. The cluster is killed and its containers
/// and network removed after.
async fn measure_flotilla(
    binary: &std::path::Path,
    docker: &Docker,
    args: &Args,
    node_flags: &[&str],
) -> Result<FlotillaRun> {
    docker::warn_about_other_clusters(docker).await?;
    // Declared before the cluster: it removes the cluster's containers after the node is dead.
    let mut cleanup = LabelCleanup::default();
    let cluster_cidr = docker::free_cluster_cidr(docker, 211..=230).await?;
    let mut node_args = vec!["--cluster-cidr".to_owned(), cluster_cidr];
    node_args.extend(node_flags.iter().map(|flag| (*flag).to_owned()));
    let cluster =
        FlotillaCluster::start_with(binary, 1, Duration::from_secs(60), &node_args).await?;
    let node = cluster
        .nodes()
        .first()
        .ok_or_else(|| anyhow!("the cluster has no node"))?;
    let cluster_label = docker::cluster_label(node.addr(), Duration::from_secs(30)).await?;
    cleanup.set(&cluster_label);
    let mut client = ObjectsClient::new(connect(node.addr(), Duration::from_secs(5)).await?);

    // The agent has registered its node and created its pod network before the clock starts.
    let deadline = Instant::now() + Duration::from_secs(60);
    let on_host_bridge = loop {
        let ready = node_ready(&mut client, node.name()).await;
        // A host bridge or a Docker network, whichever the node chose.
        let on_host_bridge =
            !flotilla_runtime::host_bridge::labelled_blocking(&cluster_label).is_empty();
        let network = on_host_bridge
            || docker::network_exists(docker, std::slice::from_ref(&cluster_label)).await?;
        if ready && network {
            break on_host_bridge;
        }
        if Instant::now() >= deadline {
            bail!(
                "node {} was not Ready with its pod network after 60 s (Ready: {ready}, \
                 network labelled {cluster_label}: {network})\n{}",
                node.name(),
                cluster.log_tails()
            );
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    };

    let deployment = json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": DEPLOYMENT, "namespace": "default"},
        "spec": {
            "replicas": args.replicas,
            "selector": {"matchLabels": {"app": DEPLOYMENT}},
            "template": {
                "metadata": {"labels": {"app": DEPLOYMENT}},
                "spec": {
                    "terminationGracePeriodSeconds": 0,
                    "containers": [{"name": "sleep", "image": args.image,
                                    "command": ["sleep", "3600"]}]
                }
            }
        }
    });
    let timeout = Duration::from_secs(args.timeout_seconds);
    let node_pid = node.pid().map(|pid| pid.to_string()).unwrap_or_default();
    let node_before = cpu_ticks(&node_pid).unwrap_or(0);
    let engine_before = cpu_ticks_of_named(&ENGINE_PROCESSES);
    let started = Instant::now();
    client
        .apply(ObjectRequest {
            object_json: serde_json::to_vec(&deployment).context("encode the Deployment")?,
        })
        .await
        .context("apply the Deployment")?;
    // Besides the pods: every pod ever seen (a node that goes NotReady has its pods deleted and
    // replaced, which shows as more pods than replicas) and the node's Ready flips.
    let mut seen = HashSet::new();
    let mut was_ready = true;
    let mut not_ready_spells = 0;
    let mut last;
    loop {
        match list_pods(&mut client).await {
            Ok(pods) => {
                let running = pods
                    .iter()
                    .filter(|pod| pod["status"]["phase"] == "Running")
                    .count();
                seen.extend(
                    pods.iter()
                        .filter_map(|pod| pod.pointer("/metadata/uid").and_then(Value::as_str))
                        .map(str::to_owned),
                );
                if pods.len() == args.replicas && running == args.replicas {
                    let elapsed = started.elapsed();
                    let engine_cpu_seconds =
                        cpu_seconds_between(&engine_before, &cpu_ticks_of_named(&ENGINE_PROCESSES));
                    let node_cpu_seconds = cpu_ticks(&node_pid)
                        .unwrap_or(0)
                        .saturating_sub(node_before)
                        as f64
                        / TICKS_PER_SECOND;
                    return Ok(FlotillaRun {
                        elapsed,
                        engine_cpu_seconds,
                        node_cpu_seconds,
                        on_host_bridge,
                        pods_seen: seen.len(),
                        not_ready_spells,
                        containers: docker::count_containers(
                            docker,
                            std::slice::from_ref(&cluster_label),
                        )
                        .await?,
                    });
                }
                last = format!("{} pods, {running} Running", pods.len());
            }
            Err(err) => last = format!("{err:#}"),
        }
        let ready = node_ready(&mut client, node.name()).await;
        if was_ready && !ready {
            not_ready_spells += 1;
        }
        was_ready = ready;
        if started.elapsed() >= timeout {
            bail!(
                "the Deployment did not have {} pods Running within {timeout:?}; last: {last}; \
                 {} distinct pods were created, and node {} was seen NotReady {not_ready_spells} \
                 times (a NotReady node's pods are deleted and replaced)\n{}",
                args.replicas,
                seen.len(),
                node.name(),
                cluster.log_tails()
            );
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// What the Flotilla phase saw.
struct FlotillaRun {
    /// From the apply to all replicas Running.
    elapsed: Duration,
    /// Distinct pods created (more than the replicas when some were replaced).
    pods_seen: usize,
    /// How many times the node was seen going from Ready to not Ready.
    not_ready_spells: usize,
    /// The cluster's containers on the daemon once all were Running.
    containers: usize,
    /// CPU seconds of the engine's processes from the apply to all Running.
    engine_cpu_seconds: f64,
    /// CPU seconds of the Flotilla node over the same time.
    node_cpu_seconds: f64,
    /// Whether the node wired its pods to a host bridge (else they were on a Docker network).
    on_host_bridge: bool,
}

/// Runs `docker <args>` and fails with its stderr if it fails; returns its stdout.
fn docker_cli(args: &[&str]) -> Result<String> {
    let output = Command::new("docker")
        .args(args)
        .output()
        .with_context(|| format!("run docker {}", args.join(" ")))?;
    if !output.status.success() {
        bail!(
            "docker {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The swarm this benchmark made: dropping it removes the service, leaves the swarm (forced),
/// removes the service's containers by label, and the swarm's bridge network if the daemon had
/// none before.
struct SwarmGuard {
    service: String,
    container_label: String,
    remove_bridge: bool,
}

impl Drop for SwarmGuard {
    fn drop(&mut self) {
        let mut steps = Vec::new();
        let mut run = |args: &[&str]| match docker_cli(args) {
            Ok(_) => steps.push(format!("docker {}", args.join(" "))),
            Err(err) => eprintln!("warning: swarm cleanup: {err:#}"),
        };
        run(&["service", "rm", &self.service]);
        run(&["swarm", "leave", "--force"]);
        let (containers, _) = docker::remove_labelled(std::slice::from_ref(&self.container_label));
        if self.remove_bridge {
            run(&["network", "rm", SWARM_BRIDGE]);
        }
        println!(
            "cleanup: {}; removed {containers} leftover task containers",
            steps.join("; ")
        );
    }
}

/// Docker Swarm mode on this daemon: returns the time from `docker service create` to all
/// tasks running, and how long the `docker service create` command itself took.
async fn measure_swarm(docker: &Docker, args: &Args, label: &str) -> Result<(Duration, Duration)> {
    let info = docker.info().await.context("docker info")?;
    let state = info
        .swarm
        .and_then(|swarm| swarm.local_node_state)
        .unwrap_or(LocalNodeState::EMPTY);
    if state != LocalNodeState::INACTIVE {
        bail!(
            "the Docker daemon's swarm state is {state:?}, not inactive: it is (or is becoming) \
             part of a swarm this benchmark did not create, so it refuses to touch it; run with \
             --skip-swarm, or leave that swarm first"
        );
    }
    let bridges = docker
        .list_networks(Some(
            ListNetworksOptionsBuilder::default()
                .filters(&HashMap::from([("name", vec![SWARM_BRIDGE])]))
                .build(),
        ))
        .await
        .context("list networks")?;
    let service = format!("flotilla-bench-{}", std::process::id());
    // Armed before `swarm init`: from here on, any swarm on this daemon is ours.
    let _guard = SwarmGuard {
        service: service.clone(),
        container_label: label.to_owned(),
        remove_bridge: !bridges
            .iter()
            .any(|n| n.name.as_deref() == Some(SWARM_BRIDGE)),
    };
    docker_cli(&[
        "swarm",
        "init",
        "--advertise-addr",
        "127.0.0.1",
        "--listen-addr",
        "127.0.0.1:2377",
    ])?;

    // By its ID: Swarm's task runner tries a registry pull for every task of an image given by
    // name (then falls back to the local image); an image ID it takes as local. And
    // `--no-resolve-image`: the CLI does not ask a registry for the digest either.
    let image_id = docker
        .inspect_image(&args.image)
        .await
        .with_context(|| format!("inspect the image {}", args.image))?
        .id
        .ok_or_else(|| anyhow!("the image {} has no ID", args.image))?;
    let replicas = args.replicas.to_string();
    let started = Instant::now();
    docker_cli(&[
        "service",
        "create",
        "--detach",
        "--no-resolve-image",
        "--name",
        &service,
        "--label",
        label,
        "--container-label",
        label,
        "--replicas",
        &replicas,
        &image_id,
        "sleep",
        "3600",
    ])?;
    let create_took = started.elapsed();
    let timeout = Duration::from_secs(args.timeout_seconds);
    let filters = HashMap::from([
        ("service", vec![service.as_str()]),
        ("desired-state", vec!["running"]),
    ]);
    let mut last;
    let elapsed = loop {
        let options = ListTasksOptionsBuilder::default().filters(&filters).build();
        match docker.list_tasks(Some(options)).await {
            Ok(tasks) => {
                let running = tasks
                    .iter()
                    .filter(|task| {
                        task.status.as_ref().and_then(|s| s.state) == Some(TaskState::RUNNING)
                    })
                    .count();
                if running >= args.replicas {
                    break started.elapsed();
                }
                last = format!("{} tasks, {running} running", tasks.len());
            }
            Err(err) => last = format!("{err:#}"),
        }
        if started.elapsed() >= timeout {
            bail!(
                "the service did not have {} tasks running within {timeout:?}; last: {last}",
                args.replicas
            );
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    };
    // Cross-check with the command the figure is usually read from.
    let listed = docker_cli(&[
        "service",
        "ps",
        &service,
        "--filter",
        "desired-state=running",
        "--format",
        "{{.CurrentState}}",
    ])?;
    let running = listed
        .lines()
        .filter(|line| line.starts_with("Running"))
        .count();
    if running < args.replicas {
        bail!(
            "docker service ps shows {running} tasks Running, expected {}",
            args.replicas
        );
    }
    Ok((elapsed, create_took))
}

async fn run(args: Args) -> Result<()> {
    let binary = chaos_tests::process::flotilla_binary(args.flotilla.as_deref())?;
    if args.replicas == 0 {
        bail!("--replicas must be at least 1");
    }
    let label = format!("{BENCH_LABEL}={}", std::process::id());
    // Anything left with our label (an interrupted phase) is removed at the very end.
    let _cleanup = LabelCleanup::new(&label);
    let docker = docker::connect().await?;
    let n = args.replicas;

    println!(
        "1/3 floor: {n} containers created and started through the Docker API, {} at once",
        args.parallelism
    );
    let (floor, floor_cpu) = measure_floor(
        &docker,
        &args.image,
        n,
        args.parallelism,
        &label,
        FloorNetwork::Default,
    )
    .await?;
    println!("    {} (engine CPU {floor_cpu:.2} s)", secs(floor));
    println!(
        "1b  floor on a bridge network of our own (a pod network is one): {n} containers, {} at \
         once",
        args.parallelism
    );
    let network = create_user_network(&docker, &label).await?;
    let network_floor = measure_floor(
        &docker,
        &args.image,
        n,
        args.parallelism,
        &label,
        FloorNetwork::Named(&network),
    )
    .await;
    // The floor's own cleanup removes the network with its containers (it carries our label).
    match docker.remove_network(&network).await {
        Ok(())
        | Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        }) => {}
        Err(err) => {
            println!("    (could not remove network {network} yet: {err}; removed at exit)")
        }
    }
    let (network_floor, network_floor_cpu) = network_floor?;
    println!(
        "    {} (engine CPU {network_floor_cpu:.2} s)",
        secs(network_floor)
    );

    println!(
        "1c  floor with the engine's network disabled (what a pod wired to a host bridge asks \
         of the engine; its node wires it): {n} containers, {} at once",
        args.parallelism
    );
    let (disabled_floor, disabled_floor_cpu) = measure_floor(
        &docker,
        &args.image,
        n,
        args.parallelism,
        &label,
        FloorNetwork::Disabled,
    )
    .await?;
    println!(
        "    {} (engine CPU {disabled_floor_cpu:.2} s)",
        secs(disabled_floor)
    );

    // Flotilla twice: as a node starts by default (here: pods wired to a host bridge), and
    // with its pods on a Docker network.
    let mut flotilla_runs = Vec::new();
    for (step, node_flags, name) in [
        ("2/3", &[][..], "flotilla"),
        (
            "2b ",
            &["--docker-pod-network"][..],
            "flotilla --docker-pod-network",
        ),
    ] {
        if args.skip_flotilla {
            println!("{step} {name}: skipped (--skip-flotilla)");
            continue;
        }
        println!(
            "{step} {name}: a Deployment of {n} replicas on a 1-node cluster, apply -> all Running"
        );
        let result = measure_flotilla(&binary, &docker, &args, node_flags).await;
        match &result {
            Ok(run) => println!(
                "    {} (pods on {}; {} pods created, {} containers; node NotReady {} times; \
                 engine CPU {:.2} s, node CPU {:.2} s)",
                secs(run.elapsed),
                if run.on_host_bridge {
                    "a host bridge"
                } else {
                    "a Docker network"
                },
                run.pods_seen,
                run.containers,
                run.not_ready_spells,
                run.engine_cpu_seconds,
                run.node_cpu_seconds
            ),
            Err(err) => println!("    FAILED: {err:#}"),
        }
        flotilla_runs.push((name, result));
    }

    let swarm = if args.skip_swarm {
        println!("3/3 swarm: skipped (--skip-swarm)");
        None
    } else {
        println!("3/3 swarm: docker service create --replicas {n} -> all tasks running");
        let result = measure_swarm(&docker, &args, &label).await;
        match &result {
            Ok((swarm, create_took)) => println!(
                "    {} (of which the `docker service create` command: {})",
                secs(*swarm),
                secs(*create_took)
            ),
            Err(err) => println!("    FAILED: {err:#}"),
        }
        Some(result.map(|(swarm, _)| swarm))
    };

    let failed = |result: &Result<Duration>| match result {
        Ok(duration) => secs(*duration),
        Err(_) => "FAILED".to_owned(),
    };
    let flotilla_times: Vec<(&str, Result<Duration>)> = flotilla_runs
        .iter()
        .map(|(name, run)| {
            let time = match run {
                Ok(run) => Ok(run.elapsed),
                Err(err) => Err(anyhow!("{err:#}")),
            };
            (*name, time)
        })
        .collect();
    println!(
        "\n{n} replicas of {} running `sleep 3600` on one node:",
        args.image
    );
    println!(
        "  docker API floor, {n} containers ({} at once)   {:>9}",
        args.parallelism,
        secs(floor)
    );
    println!(
        "  docker API floor on a network of our own         {:>9}   (containers on a user-defined \
         network: Docker's embedded DNS set up in each)",
        secs(network_floor)
    );
    println!(
        "  docker API floor, network disabled               {:>9}   (no network set up by the \
         engine: no hook re-executing the daemon at each start)",
        secs(disabled_floor)
    );
    for (name, result) in &flotilla_times {
        println!(
            "  {name:<29}: apply -> {n} pods Running {:>9}",
            failed(result)
        );
    }
    if let Some(result) = &swarm {
        println!(
            "  docker swarm: service create -> {n} running    {:>9}",
            failed(result)
        );
    }
    let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
    for (name, result) in &flotilla_times {
        let Ok(flotilla) = result else {
            println!("  {name}: no figure");
            continue;
        };
        let to_floor = ratio(*flotilla, floor);
        println!(
            "  {name:<29} / floor         {to_floor:>6.2}x   goal <= 1.25x: {}",
            verdict(to_floor <= 1.25)
        );
        println!(
            "  {name:<29} / network floor {:>6.2}x",
            ratio(*flotilla, network_floor)
        );
        println!(
            "  {name:<29} / disabled floor {:>5.2}x",
            ratio(*flotilla, disabled_floor)
        );
        if let Some(Ok(swarm)) = &swarm {
            let to_swarm = ratio(*flotilla, *swarm);
            println!(
                "  {name:<29} / swarm         {to_swarm:>6.2}x   goal < 1 (faster than Swarm): {}",
                verdict(to_swarm < 1.0)
            );
        }
    }
    if let Some(Ok(swarm)) = &swarm {
        println!("  swarm / floor         {:>6.2}x", ratio(*swarm, floor));
    }
    for (name, run) in flotilla_runs {
        if let Err(err) = run {
            return Err(err.context(format!("the {name} phase failed")));
        }
    }
    if let Some(Err(err)) = swarm {
        return Err(err.context("the Swarm phase failed"));
    }
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    chaos_tests::process::run_benchmark(run(args), "interrupted; removed everything created")
}
