//! Pod startup benchmark: create → Running for single-container pods on one Flotilla node,
//! side by side with `docker run -d` of the same image as the floor, plus the node's memory
//! (RSS) idle and with the pods running.
//!
//! It starts one `flotilla serve` (with its agent, on the local Docker daemon), creates the
//! pods one after another and times each until its status says Running, then runs the same
//! image with `docker run -d` the same number of times. Everything it creates is removed by
//! label at the end, also on error.

use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use chaos_tests::cluster::{connect, FlotillaCluster};
use chaos_tests::docker::LabelCleanup;
use chaos_tests::stats::{millis, percentile};
use clap::Parser;
use flotilla_proto::objects_client::ObjectsClient;
use flotilla_proto::{GetRequest, ObjectRequest};
use serde_json::{json, Value};

#[derive(Debug, Parser)]
#[command(about = "Pod startup latency and node memory, with docker run as the floor")]
struct Args {
    /// The flotilla binary [default: `flotilla` next to this executable].
    #[arg(long)]
    flotilla: Option<PathBuf>,
    /// How many pods (and docker runs).
    #[arg(long, default_value_t = 50)]
    pods: usize,
    /// The image both run.
    #[arg(long, default_value = "flotilla/busybox:latest")]
    image: String,
    /// How long one pod may take to run.
    #[arg(long, default_value_t = 60)]
    pod_timeout_seconds: u64,
}

fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .context("read the node's /proc status")?;
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .context("find VmRSS")
}

fn summary(label: &str, mut samples: Vec<Duration>) -> (Duration, Duration) {
    samples.sort();
    let p50 = percentile(&samples, 50.0).unwrap_or_default();
    let p99 = percentile(&samples, 99.0).unwrap_or_default();
    println!(
        "{label:<28} p50 {:>9} ms   p99 {:>9} ms   (n={})",
        millis(p50),
        millis(p99),
        samples.len()
    );
    (p50, p99)
}

async fn wait_running(
    client: &mut ObjectsClient<tonic::transport::Channel>,
    name: &str,
    timeout: Duration,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        let reply = client
            .get(GetRequest {
                kind: "pods".into(),
                namespace: "default".into(),
                name: name.into(),
                local: true,
            })
            .await;
        if let Ok(reply) = reply {
            let pod: Value =
                serde_json::from_slice(&reply.into_inner().object_json).context("decode pod")?;
            if pod["status"]["phase"] == "Running" {
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bail!("pod {name} did not run within {timeout:?}")
}

async fn run(args: Args) -> Result<()> {
    let binary = chaos_tests::process::flotilla_binary(args.flotilla.as_deref())?;
    println!(
        "command: {}",
        std::env::args().collect::<Vec<_>>().join(" ")
    );
    let bench_id = format!("{}", std::process::id());
    let _cleanup_floor = LabelCleanup::new(format!("io.flotilla.bench={bench_id}"));
    // Declared before the cluster: it runs after the node is gone (a live agent would restart
    // its pods).
    let mut cleanup_pods = LabelCleanup::default();
    let cluster = FlotillaCluster::start_with(
        &binary,
        1,
        Duration::from_secs(60),
        &["--cluster-cidr".to_owned(), "10.210.0.0/16".to_owned()],
    )
    .await?;
    let node = &cluster.nodes()[0];
    cleanup_pods
        .set(chaos_tests::docker::cluster_label(node.addr(), Duration::from_secs(30)).await?);
    let pid = node.pid().context("the node runs")?;
    // Let the agent register and create its network before measuring.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let idle_rss = rss_kib(pid)?;

    let mut client = ObjectsClient::new(connect(node.addr(), Duration::from_secs(5)).await?);
    let mut pod_times = Vec::with_capacity(args.pods);
    for pod_idx in 0..args.pods {
        let name = format!("bench-{pod_idx}");
        let pod = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"nodeName": node.name(), "terminationGracePeriodSeconds": 0,
                     "containers": [{"name": "c", "image": args.image, "command": ["sleep", "3600"]}]}
        });
        let started = Instant::now();
        client
            .create(ObjectRequest {
                object_json: serde_json::to_vec(&pod)?,
            })
            .await
            .with_context(|| format!("create pod {name}"))?;
        wait_running(
            &mut client,
            &name,
            Duration::from_secs(args.pod_timeout_seconds),
        )
        .await?;
        pod_times.push(started.elapsed());
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let busy_rss = rss_kib(pid)?;

    let mut docker_times = Vec::with_capacity(args.pods);
    for _ in 0..args.pods {
        let started = Instant::now();
        let output = Command::new("docker")
            .args([
                "run",
                "-d",
                "--label",
                &format!("io.flotilla.bench={bench_id}"),
                &args.image,
                "sleep",
                "3600",
            ])
            .output()
            .context("run docker run -d")?;
        if !output.status.success() {
            bail!(
                "docker run failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        docker_times.push(started.elapsed());
    }

    println!(
        "\nPod startup, {} single-container pods created one after another on one node:",
        args.pods
    );
    let (_, flotilla_p99) = summary("flotilla create -> Running", pod_times);
    let (_, docker_p99) = summary("docker run -d (floor)", docker_times);
    let difference = flotilla_p99.as_secs_f64() - docker_p99.as_secs_f64();
    println!(
        "p99 difference: {:+.0} ms (goal: at most +500 ms); ratio {:.2}",
        difference * 1000.0,
        flotilla_p99.as_secs_f64() / docker_p99.as_secs_f64().max(1e-9)
    );
    println!(
        "\nNode RSS: idle {:.1} MiB, with {} pods {:.1} MiB (goal idle <= 40 MiB)",
        idle_rss as f64 / 1024.0,
        args.pods,
        busy_rss as f64 / 1024.0
    );
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
