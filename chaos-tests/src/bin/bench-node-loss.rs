//! Node loss benchmark: a machine is lost (its `flotilla serve` process SIGKILLed and its
//! containers removed) and the time until the Deployment has all its replicas Ready again,
//! none of them on the lost node, is measured `--kills` times; p50 and p99.
//!
//! It starts a 3-node cluster with agents on the local Docker daemon and applies a Deployment
//! of `--replicas` (6) `flotilla/echo` pods with an HTTP readiness probe (every second). The
//! client talks to `n1` only, which is never killed. Each round picks another node: one holding
//! pods, preferably not the leader, and not the one killed last time when there is a choice.
//! The clock starts at the SIGKILL; the node's containers (labelled with the cluster and the
//! node) are removed at once through the Docker API; the pods are listed from `n1`'s local
//! state every 100 ms until exactly `--replicas` of them exist, all Ready and none bound to the
//! lost node. Then the node is started again on its data directory, and the next round waits
//! until it is Ready (untainted) and the Deployment is back to all Ready.
//!
//! Every process it starts is killed (by PID), and every container and network of the cluster
//! removed by label, on exit, on error and on Ctrl-C.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use chaos_tests::cluster::{connect, FlotillaCluster};
use chaos_tests::docker::{self, LabelCleanup};
use chaos_tests::stats::percentile;
use clap::Parser;
use flotilla_proto::objects_client::ObjectsClient;
use flotilla_proto::{GetRequest, ListRequest, ObjectRequest};
use serde_json::{json, Value};
use tonic::transport::Channel;

/// The interval at which the pods are listed.
const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// The name of the Deployment (and its `app` label).
const DEPLOYMENT: &str = "bench-node-loss";
/// The taint a silent node gets.
const UNREACHABLE_TAINT: &str = "node.kubernetes.io/unreachable";
/// The index of the node the client talks to; it is never killed.
const CLIENT_NODE: usize = 0;

#[derive(Debug, Parser)]
#[command(about = "Node loss to replacement pods Ready on a 3-node cluster, p50/p99")]
struct Args {
    /// The flotilla binary [default: `flotilla` next to this executable].
    #[arg(long)]
    flotilla: Option<PathBuf>,
    /// How many machine losses to measure.
    #[arg(long, default_value_t = 5)]
    kills: usize,
    /// How many replicas the Deployment has.
    #[arg(long, default_value_t = 6)]
    replicas: usize,
    /// The image of the replicas; it must answer HTTP on port 8080.
    #[arg(long, default_value = "flotilla/echo:latest")]
    image: String,
    /// How long one replacement may take before the run fails, in seconds.
    #[arg(long, default_value_t = 120)]
    replace_timeout_seconds: u64,
    /// How long the cluster may take to start, a node to come back, or the Deployment to be
    /// Ready, in seconds.
    #[arg(long, default_value_t = 120)]
    ready_timeout_seconds: u64,
}

/// The Deployment's pods, from the local state of the node `client` talks to.
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

fn is_ready(pod: &Value) -> bool {
    pod.pointer("/status/conditions")
        .and_then(Value::as_array)
        .is_some_and(|conditions| {
            conditions
                .iter()
                .any(|c| c["type"] == "Ready" && c["status"] == "True")
        })
}

fn node_of(pod: &Value) -> &str {
    pod.pointer("/spec/nodeName")
        .and_then(Value::as_str)
        .unwrap_or("")
}

/// `n Ready of m pods, by node {...}` for progress and error messages.
fn describe(pods: &[Value]) -> String {
    let mut by_node = std::collections::BTreeMap::<&str, (usize, usize)>::new();
    for pod in pods {
        let entry = by_node.entry(node_of(pod)).or_default();
        entry.0 += 1;
        entry.1 += usize::from(is_ready(pod));
    }
    let nodes: Vec<String> = by_node
        .iter()
        .map(|(node, (all, ready))| {
            let node = if node.is_empty() { "unbound" } else { node };
            format!("{node}: {ready}/{all} Ready")
        })
        .collect();
    format!("{} pods [{}]", pods.len(), nodes.join(", "))
}

/// Polls until exactly `count` pods exist, all Ready and none on `avoid`; returns them.
async fn wait_ready_pods(
    client: &mut ObjectsClient<Channel>,
    count: usize,
    avoid: Option<&str>,
    timeout: Duration,
) -> Result<Vec<Value>> {
    let deadline = Instant::now() + timeout;
    let mut last;
    loop {
        match list_pods(client).await {
            Ok(pods) => {
                if pods.len() == count
                    && pods.iter().all(is_ready)
                    && avoid.is_none_or(|node| pods.iter().all(|pod| node_of(pod) != node))
                {
                    return Ok(pods);
                }
                last = describe(&pods);
            }
            Err(err) => last = format!("{err:#}"),
        }
        if Instant::now() >= deadline {
            bail!("not {count} pods Ready within {timeout:?}; last: {last}");
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Whether the Node `name` is Ready=True and not tainted unreachable.
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
    let ready = node
        .pointer("/status/conditions")
        .and_then(Value::as_array)
        .is_some_and(|conditions| {
            conditions
                .iter()
                .any(|c| c["type"] == "Ready" && c["status"] == "True")
        });
    let tainted = node
        .pointer("/spec/taints")
        .and_then(Value::as_array)
        .is_some_and(|taints| taints.iter().any(|t| t["key"] == UNREACHABLE_TAINT));
    ready && !tainted
}

async fn wait_nodes_ready(
    client: &mut ObjectsClient<Channel>,
    names: &[String],
    timeout: Duration,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let mut not_ready = Vec::new();
        for name in names {
            if !node_ready(client, name).await {
                not_ready.push(name.as_str());
            }
        }
        if not_ready.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "nodes {} were not Ready within {timeout:?}",
                not_ready.join(", ")
            );
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// One measured machine loss.
struct Sample {
    node: String,
    was_leader: bool,
    pods_lost: usize,
    containers_removed: usize,
    /// From the SIGKILL until its containers were removed.
    removal: Duration,
    /// From the SIGKILL until no pod was bound to the node any more.
    evicted: Duration,
    /// From the SIGKILL until all replicas were Ready elsewhere.
    replaced: Duration,
}

/// Chooses the node to lose: never the client's; one holding pods; preferably not the leader;
/// preferably not the one lost last time.
fn choose_victim(
    names: &[String],
    pods: &[Value],
    leader: Option<usize>,
    last: Option<usize>,
) -> Result<usize> {
    (0..names.len())
        .filter(|&index| index != CLIENT_NODE)
        .map(|index| {
            let name = names.get(index).map(String::as_str).unwrap_or("");
            let held = pods.iter().filter(|pod| node_of(pod) == name).count();
            (index, held)
        })
        .filter(|&(_, held)| held > 0)
        .min_by_key(|&(index, held)| {
            (
                Some(index) == leader,
                Some(index) == last,
                std::cmp::Reverse(held),
            )
        })
        .map(|(index, _)| index)
        .ok_or_else(|| {
            anyhow!(
                "no node other than the client's holds a pod: {}",
                describe(pods)
            )
        })
}

fn secs(duration: Duration) -> String {
    format!("{:.2} s", duration.as_secs_f64())
}

async fn run(args: Args) -> Result<()> {
    let binary = chaos_tests::process::flotilla_binary(args.flotilla.as_deref())?;
    if args.kills == 0 || args.replicas == 0 {
        bail!("--kills and --replicas must be at least 1");
    }
    let ready_timeout = Duration::from_secs(args.ready_timeout_seconds);
    let replace_timeout = Duration::from_secs(args.replace_timeout_seconds);
    let docker = docker::connect().await?;
    docker::warn_about_other_clusters(&docker).await?;

    // Declared before the cluster: it removes the cluster's containers and networks after the
    // nodes are dead (a live agent would start its pods again).
    let mut cleanup = LabelCleanup::default();
    let mut cluster = FlotillaCluster::start_with(
        &binary,
        3,
        ready_timeout,
        &["--cluster-cidr".to_owned(), "10.212.0.0/16".to_owned()],
    )
    .await?;
    let names: Vec<String> = cluster
        .nodes()
        .iter()
        .map(|node| node.name().to_owned())
        .collect();
    let client_addr = cluster
        .nodes()
        .get(CLIENT_NODE)
        .map(|node| node.addr())
        .ok_or_else(|| anyhow!("the cluster has no node {CLIENT_NODE}"))?;
    let cluster_label = docker::cluster_label(client_addr, ready_timeout).await?;
    cleanup.set(&cluster_label);
    println!(
        "cluster {cluster_label} of {} started; the client talks to {}",
        names.join(", "),
        names.get(CLIENT_NODE).map(String::as_str).unwrap_or("?")
    );
    let mut client = ObjectsClient::new(connect(client_addr, Duration::from_secs(5)).await?);
    wait_nodes_ready(&mut client, &names, ready_timeout).await?;

    let deployment = json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": DEPLOYMENT, "namespace": "default"},
        "spec": {
            "replicas": args.replicas,
            "selector": {"matchLabels": {"app": DEPLOYMENT}},
            "template": {
                "metadata": {"labels": {"app": DEPLOYMENT}},
                "spec": {
                    "terminationGracePeriodSeconds": 1,
                    "containers": [{
                        "name": "echo", "image": args.image,
                        "readinessProbe": {"httpGet": {"path": "/", "port": 8080},
                                           "periodSeconds": 1}
                    }]
                }
            }
        }
    });
    client
        .apply(ObjectRequest {
            object_json: serde_json::to_vec(&deployment).context("encode the Deployment")?,
        })
        .await
        .context("apply the Deployment")?;
    let mut pods = wait_ready_pods(&mut client, args.replicas, None, ready_timeout)
        .await
        .with_context(|| format!("the first rollout\n{}", cluster.log_tails()))?;
    println!("deployment {DEPLOYMENT}: {}", describe(&pods));

    let mut samples: Vec<Sample> = Vec::with_capacity(args.kills);
    let mut last_victim = None;
    for round in 1..=args.kills {
        let leader = cluster.leader_view().await?.map(|(index, _)| index);
        let victim = choose_victim(&names, &pods, leader, last_victim)?;
        let victim_name = names.get(victim).cloned().unwrap_or_default();
        let pods_lost = pods
            .iter()
            .filter(|pod| node_of(pod) == victim_name)
            .count();
        let was_leader = leader == Some(victim);
        let node_labels = [
            cluster_label.clone(),
            format!("io.flotilla.node={victim_name}"),
        ];

        // A machine loss: the process dies and its containers with it.
        let killed_at = Instant::now();
        let pid = cluster.kill(victim)?;
        let containers_removed = docker::remove_containers(&docker, &node_labels, 8).await?;
        let removal = killed_at.elapsed();
        let mut evicted = None;
        let mut last;
        let replaced = loop {
            match list_pods(&mut client).await {
                Ok(found) => {
                    let on_victim = found.iter().any(|pod| node_of(pod) == victim_name);
                    if !on_victim && evicted.is_none() {
                        evicted = Some(killed_at.elapsed());
                    }
                    if !on_victim && found.len() == args.replicas && found.iter().all(is_ready) {
                        break killed_at.elapsed();
                    }
                    last = describe(&found);
                }
                Err(err) => last = format!("{err:#}"),
            }
            if killed_at.elapsed() >= replace_timeout {
                bail!(
                    "round {round}: the replicas of {victim_name} were not Ready elsewhere \
                     within {replace_timeout:?}; last: {last}\n{}",
                    cluster.log_tails()
                );
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        };
        let sample = Sample {
            node: victim_name.clone(),
            was_leader,
            pods_lost,
            containers_removed,
            removal,
            evicted: evicted.unwrap_or(replaced),
            replaced,
        };
        println!(
            "round {round}: lost {} (pid {pid}, {}) with {} pods ({} containers removed in {}); \
             its pods gone after {}, all {} Ready elsewhere after {}",
            sample.node,
            if sample.was_leader {
                "the leader"
            } else {
                "a follower"
            },
            sample.pods_lost,
            sample.containers_removed,
            secs(sample.removal),
            secs(sample.evicted),
            args.replicas,
            secs(sample.replaced),
        );
        samples.push(sample);
        last_victim = Some(victim);

        // The machine comes back; the next round starts from a whole, settled cluster.
        let mode = cluster
            .restart(victim, ready_timeout)
            .await
            .with_context(|| format!("restart {victim_name}"))?;
        wait_nodes_ready(&mut client, &names, ready_timeout)
            .await
            .with_context(|| format!("{victim_name} back\n{}", cluster.log_tails()))?;
        pods = wait_ready_pods(&mut client, args.replicas, None, ready_timeout)
            .await
            .with_context(|| format!("after {victim_name} came back\n{}", cluster.log_tails()))?;
        println!(
            "         {victim_name} restarted ({mode:?}) and Ready; {}",
            describe(&pods)
        );
    }

    let mut replaced: Vec<Duration> = samples.iter().map(|s| s.replaced).collect();
    replaced.sort();
    let mut evicted: Vec<Duration> = samples.iter().map(|s| s.evicted).collect();
    evicted.sort();
    let p = |sorted: &[Duration], q: f64| percentile(sorted, q).unwrap_or_default();
    println!(
        "\nNode loss -> {} replacement pods Ready, {} machine losses on 3 nodes \
         (process SIGKILLed and its containers removed):",
        args.replicas,
        samples.len()
    );
    println!(
        "  samples: {}",
        samples
            .iter()
            .map(|s| format!(
                "{} ({}{})",
                secs(s.replaced),
                s.node,
                if s.was_leader { ", leader" } else { "" }
            ))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "  pods gone from the lost node: p50 {}   p99 {}",
        secs(p(&evicted, 50.0)),
        secs(p(&evicted, 99.0))
    );
    let p99 = p(&replaced, 99.0);
    println!(
        "  replacements Ready:           p50 {}   p99 {}",
        secs(p(&replaced, 50.0)),
        secs(p99)
    );
    println!(
        "  goal <= 5 s: {} (Kubernetes defaults ~350 s, Docker Swarm ~15 s, Nomad ~20 s)",
        if p99 <= Duration::from_secs(5) {
            "met at p99"
        } else if p(&replaced, 50.0) <= Duration::from_secs(5) {
            "met at p50 only"
        } else {
            "NOT met"
        }
    );
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    chaos_tests::process::run_benchmark(run(args), "interrupted; stopped every process started")
}
