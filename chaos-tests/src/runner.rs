//! Runs one scenario on a fresh local cluster and judges it: the faults come from
//! `scenarios.rs`; every run also gets the common checks below. Pass criteria, all of them:
//! - the history is linearizable per key (no key found non-linearizable or left unchecked);
//! - every acknowledged create of a write-once object is present at the end;
//! - every node (but those the scenario broke on purpose) holds the same ConfigMaps;
//! - the scenario's Deployment is back to its replicas, all Ready, with no pod's container
//!   running twice on the shared Docker daemon;
//! - no operation succeeded through a node inside one of its quiet windows (the minority of
//!   a partition or a quorum loss acknowledges nothing);
//! - the scenario's own checks (a new leader was elected, a snapshot was installed, ...).
//!
//! A failed run keeps its seed, history, report, node logs and data directories in the results
//! folder.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use flotilla_local::{LocalCluster, UpOptions};
use flotilla_proto::objects_client::ObjectsClient;
use flotilla_proto::ObjectRequest;
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde_json::json;

use crate::cluster::{connect, use_local_credentials};
use crate::history::{Entry, History, Outcome};
use crate::linearizability::{check_entries, lost_writes, CheckOptions};
use crate::scenarios::{current_leader, wait_replicas_ready, Context, Measures, Scenario};
use crate::workload::{final_reads, initial_values, store_digest, Workload, WorkloadConfig};

/// How scenarios are run.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The `flotilla` binary the node image is built from.
    pub binary: PathBuf,
    pub nodes: usize,
    pub seed: u64,
    /// Where failed runs leave their evidence.
    pub results: PathBuf,
    /// Prefix of the local clusters' names (unique per process).
    pub name_prefix: String,
    /// How long the workload runs before the fault.
    pub warmup: Duration,
    /// How long it runs after the fault, before it is stopped and checked.
    pub settle: Duration,
}

impl RunOptions {
    pub fn new(binary: PathBuf, nodes: usize, seed: u64) -> RunOptions {
        RunOptions {
            binary,
            nodes,
            seed,
            results: PathBuf::from("chaos-results"),
            name_prefix: format!("chaos{}", std::process::id() % 100_000),
            warmup: Duration::from_secs(2),
            settle: Duration::from_secs(2),
        }
    }
}

/// One row of the report.
#[derive(Debug, Default, Clone)]
pub struct Row {
    pub scenario: String,
    pub repetition: usize,
    pub nodes: usize,
    pub seed: u64,
    pub passed: bool,
    pub ok: usize,
    pub failed: usize,
    pub unknown: usize,
    pub violations: usize,
    pub lost_writes: usize,
    /// The longest time without an acknowledged write.
    pub unavailable: Duration,
    pub new_leader: Vec<Duration>,
    pub replicas_restored: Vec<Duration>,
    pub failures: Vec<String>,
    pub notes: Vec<String>,
    pub elapsed: Duration,
}

/// The Deployment every scenario runs.
const APP: &str = "chaos-app";

async fn start_app(cluster: &LocalCluster, replicas: usize) -> Result<()> {
    let deployment = json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": APP, "namespace": "default"},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": APP}},
            "template": {
                "metadata": {"labels": {"app": APP}},
                "spec": {
                    "terminationGracePeriodSeconds": 1,
                    "containers": [{
                        "name": "app", "image": "flotilla/busybox:latest",
                        "imagePullPolicy": "Never", "command": ["sleep", "100000"]
                    }]
                }
            }
        }
    });
    let first = cluster.nodes().first().context("no node")?;
    let channel = connect(first.addr(), Duration::from_secs(3)).await?;
    ObjectsClient::new(channel)
        .apply(ObjectRequest {
            object_json: serde_json::to_vec(&deployment)?,
        })
        .await
        .map_err(|status| anyhow::anyhow!("create the Deployment: {}", status.message()))?;
    wait_replicas_ready(cluster, APP, replicas, &[], Duration::from_secs(90)).await?;
    Ok(())
}

/// How many of the app's containers run on the shared daemon, and for how many pods.
/// Containers of the `excluded` nodes (broken on purpose, their agents dead) are not counted.
async fn running_app_containers(
    cluster: &LocalCluster,
    excluded: &[String],
) -> Result<(usize, usize)> {
    use bollard::query_parameters::ListContainersOptionsBuilder;
    let filters = HashMap::from([(
        "label",
        vec![
            format!("io.flotilla.cluster={}", cluster.cluster_id),
            "io.flotilla.container=app".to_string(),
        ],
    )]);
    let options = ListContainersOptionsBuilder::default()
        .filters(&filters)
        .build();
    let running = cluster
        .docker()
        .list_containers(Some(options))
        .await
        .context("list the app's containers")?;
    let running: Vec<_> = running
        .iter()
        .filter_map(|c| c.labels.as_ref())
        .filter(|labels| {
            labels
                .get("io.flotilla.node")
                .is_none_or(|node| !excluded.contains(node))
        })
        .collect();
    let pods: std::collections::HashSet<&String> = running
        .iter()
        .filter_map(|labels| labels.get("io.flotilla.pod.name"))
        .collect();
    Ok((running.len(), pods.len()))
}

/// The longest stretch without an acknowledged write, between the first and last one.
fn longest_write_gap(entries: &[Entry]) -> Duration {
    let mut acknowledged: Vec<u64> = entries
        .iter()
        .filter(|e| e.outcome == Outcome::Ok)
        .filter_map(|e| e.returned_ns)
        .collect();
    acknowledged.sort_unstable();
    let gap = acknowledged
        .windows(2)
        .map(|pair| pair[1] - pair[0])
        .max()
        .unwrap_or(0);
    Duration::from_nanos(gap)
}

/// Operations that succeeded through `node` inside a quiet window of it.
fn acknowledged_in_quiet_windows(
    entries: &[Entry],
    windows: &[(String, u64, u64)],
    client_nodes: &HashMap<u64, String>,
) -> Vec<String> {
    let mut found = Vec::new();
    for (node, from, to) in windows {
        for entry in entries {
            let through = client_nodes.get(&entry.client);
            let succeeded = matches!(entry.outcome, Outcome::Ok | Outcome::ReadOk { .. });
            let inside = entry.returned_ns.is_some_and(|r| r >= *from && r <= *to);
            if through == Some(node) && succeeded && inside && entry.invoked_ns >= *from {
                found.push(format!("{} acknowledged {entry} while cut off", node));
            }
        }
    }
    found
}

async fn wait_identical_stores(cluster: &LocalCluster, excluded: &[String]) -> Result<(), String> {
    let started = Instant::now();
    let mut last = String::new();
    while started.elapsed() < Duration::from_secs(20) {
        let mut digests = BTreeMap::new();
        for node in cluster
            .nodes()
            .iter()
            .filter(|n| !excluded.contains(&n.name))
        {
            match store_digest(node.addr()).await {
                Ok(digest) => {
                    digests.insert(node.name.clone(), digest);
                }
                Err(error) => {
                    digests.clear();
                    last = error.to_string();
                    break;
                }
            }
        }
        let distinct: std::collections::BTreeSet<_> = digests.values().collect();
        if !digests.is_empty() && distinct.len() == 1 {
            return Ok(());
        }
        if !digests.is_empty() {
            last = format!("{digests:?}");
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    Err(format!("the nodes' stores differ: {last}"))
}

/// Keeps the local cluster's evidence and then removes it, also on panic.
struct ClusterGuard {
    name: String,
}

impl Drop for ClusterGuard {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Drop cannot await; a thread with its own runtime removes the cluster.
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            if let Ok(runtime) = runtime {
                runtime.block_on(async {
                    if let Ok(docker) = flotilla_local::connect_docker().await {
                        let _ = flotilla_local::down(&docker, &name).await;
                    }
                });
            }
        })
        .join();
    }
}

async fn keep_evidence(
    directory: &Path,
    cluster: &LocalCluster,
    history: Option<&History>,
    row: &Row,
    report: &str,
) -> Result<()> {
    std::fs::create_dir_all(directory)
        .with_context(|| format!("create {}", directory.display()))?;
    std::fs::write(directory.join("seed"), row.seed.to_string())?;
    std::fs::write(directory.join("report.txt"), report)?;
    if let Some(history) = history {
        let file = std::fs::File::create(directory.join("history.jsonl"))?;
        history.write_jsonl(std::io::BufWriter::new(file))?;
    }
    for node in cluster.nodes() {
        if let Ok(logs) = cluster.logs(&node.name).await {
            std::fs::write(directory.join(format!("{}.log", node.name)), logs)?;
        }
        if let Ok(archive) = cluster.data_dir_archive(&node.name).await {
            std::fs::write(directory.join(format!("{}-data.tar", node.name)), archive)?;
        }
    }
    Ok(())
}

/// Runs `scenario` once on a fresh cluster and judges it.
pub async fn run_scenario(scenario: Scenario, repetition: usize, options: &RunOptions) -> Row {
    let started = Instant::now();
    let seed = options.seed.wrapping_add(repetition as u64 * 1_000_003);
    let mut row = Row {
        scenario: scenario.name().to_string(),
        repetition,
        nodes: options.nodes,
        seed,
        ..Row::default()
    };
    let name = format!("{}-{}", options.name_prefix, repetition);
    let _guard = ClusterGuard { name: name.clone() };
    let mut up = UpOptions::new(&name, options.nodes, options.binary.clone());
    up.node_args = scenario.node_args();
    up.small_disk_mib = scenario.small_disks(options.nodes);
    let mut cluster = match LocalCluster::up(&up).await {
        Ok(cluster) => cluster,
        Err(error) => {
            row.failures.push(format!("start the cluster: {error}"));
            row.elapsed = started.elapsed();
            return row;
        }
    };
    if let Err(error) = use_local_credentials(&cluster) {
        row.failures.push(format!("{error:#}"));
        row.elapsed = started.elapsed();
        return row;
    }
    let history = match judge(scenario, &mut cluster, options, seed, &mut row).await {
        Ok(history) => Some(history),
        Err(error) => {
            row.failures.push(format!("{error:#}"));
            None
        }
    };
    row.passed = row.failures.is_empty();
    row.elapsed = started.elapsed();
    if !row.passed {
        let directory = options.results.join(format!(
            "{}-{}-n{}-r{}",
            scenario.name(),
            seed,
            options.nodes,
            repetition
        ));
        let report = format!("{row:#?}\n");
        match keep_evidence(&directory, &cluster, history.as_ref(), &row, &report).await {
            Ok(()) => row
                .notes
                .push(format!("evidence kept in {}", directory.display())),
            Err(error) => row
                .notes
                .push(format!("keeping the evidence failed: {error:#}")),
        }
    }
    let _ = cluster.down().await;
    row
}

async fn judge(
    scenario: Scenario,
    cluster: &mut LocalCluster,
    options: &RunOptions,
    seed: u64,
    row: &mut Row,
) -> Result<History> {
    let replicas = options.nodes;
    start_app(cluster, replicas).await?;
    let targets: Vec<_> = cluster.nodes().iter().map(|n| n.addr()).collect();
    let config = WorkloadConfig::new(targets.clone(), seed);
    let client_nodes: HashMap<u64, String> = (0..config.clients as u64)
        .map(|client| {
            (
                client,
                cluster.nodes()[config.target_index(client)].name.clone(),
            )
        })
        .collect();
    let workload = Workload::start(&config, targets[0]).await?;
    let history = workload.history.clone();
    tokio::time::sleep(options.warmup).await;
    let measures = {
        let mut context = Context {
            cluster: &mut *cluster,
            history: &history,
            random: StdRng::seed_from_u64(seed),
            app: APP,
            replicas,
            measures: Measures::default(),
        };
        let injected = context.inject(scenario).await;
        let mut measures = context.measures;
        if let Err(error) = injected {
            measures
                .failures
                .push(format!("inject the fault: {error:#}"));
        }
        measures
    };
    tokio::time::sleep(options.settle).await;
    let history = workload.stop().await;
    row.new_leader = measures.new_leader.clone();
    row.replicas_restored = measures.replicas_restored.clone();
    row.notes.extend(measures.notes.iter().cloned());
    row.failures.extend(measures.failures.iter().cloned());

    // Recovery: every node but the excluded ones healthy again.
    let live: Vec<_> = cluster
        .nodes()
        .iter()
        .filter(|n| !measures.excluded.contains(&n.name))
        .cloned()
        .collect();
    if measures.excluded.is_empty() {
        if let Err(error) = cluster.wait_healthy(Duration::from_secs(60)).await {
            row.failures.push(format!("recover: {error}"));
        }
    }
    let reader = current_leader(&live)
        .await
        .map(|n| n.addr())
        .or_else(|| live.first().map(|n| n.addr()))
        .context("no live node")?;
    let final_state = final_reads(&history, &config, reader).await?;

    let entries = history.entries();
    let counts = history.counts();
    row.ok = counts.ok;
    row.failed = counts.failed + counts.conflicts;
    row.unknown = counts.unknown;
    row.unavailable = longest_write_gap(&entries);
    let verdict = judge_history(&history, &config, &final_state);
    row.violations = verdict.violations;
    row.lost_writes = verdict.lost_writes;
    row.failures.extend(verdict.failures);
    row.failures.extend(
        acknowledged_in_quiet_windows(&entries, &measures.quiet_windows, &client_nodes)
            .into_iter()
            .take(3),
    );
    if let Err(error) = wait_identical_stores(cluster, &measures.excluded).await {
        row.failures.push(error);
    }
    if let Err(error) = wait_replicas_ready(
        cluster,
        APP,
        replicas,
        &measures.excluded,
        Duration::from_secs(60),
    )
    .await
    {
        row.failures
            .push(format!("workload not restored: {error:#}"));
    }
    // A pod replaced while its node was away must not run on after the node returns.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (containers, pods) = running_app_containers(cluster, &measures.excluded).await?;
        if containers == replicas && pods == replicas {
            break;
        }
        if Instant::now() > deadline {
            row.failures.push(format!(
                "{containers} app containers of {pods} pods run, {replicas} wanted (a pod running twice?)"
            ));
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Ok(history)
}

/// What the checker found in a finished workload's history.
#[derive(Debug, Default)]
pub struct HistoryVerdict {
    /// Keys not found linearizable (violations, or left unchecked).
    pub violations: usize,
    /// Acknowledged creates of write-once objects missing at the end.
    pub lost_writes: usize,
    /// The first few problems, described.
    pub failures: Vec<String>,
}

/// Checks `history` (ending with the final reads) per key for linearizability, and the
/// write-once objects of `final_state` for acknowledged creates that are missing.
pub fn judge_history(
    history: &History,
    config: &WorkloadConfig,
    final_state: &HashMap<String, Option<String>>,
) -> HistoryVerdict {
    let entries = history.entries();
    let check = check_entries(
        &entries,
        &CheckOptions {
            initial_values: initial_values(config),
            ..CheckOptions::default()
        },
    );
    let mut verdict = HistoryVerdict {
        violations: check
            .keys
            .iter()
            .filter(|k| k.verdict != crate::linearizability::Verdict::Linearizable)
            .count(),
        ..HistoryVerdict::default()
    };
    for problem in check.problems().take(3) {
        verdict.failures.push(format!(
            "key {}: {:?}: {}",
            problem.key,
            problem.verdict,
            problem.explanation.clone().unwrap_or_default()
        ));
    }
    let once: Vec<(String, String)> = history
        .acknowledged_writes()
        .into_iter()
        .filter(|(key, _)| key.starts_with("once-"))
        .collect();
    let lost = lost_writes(&once, final_state);
    verdict.lost_writes = lost.len();
    for write in lost.iter().take(3) {
        verdict.failures.push(format!(
            "lost acknowledged write {} = {} (found {:?})",
            write.key, write.acknowledged, write.found
        ));
    }
    verdict
}

fn millis_list(durations: &[Duration]) -> String {
    if durations.is_empty() {
        return "-".into();
    }
    durations
        .iter()
        .map(|d| d.as_millis().to_string())
        .collect::<Vec<_>>()
        .join("/")
}

/// The report's header line.
pub fn header() -> String {
    format!(
        "{:<30} {:>3} {:>5} {:<4} {:>6} {:>6} {:>7} {:>5} {:>4} {:>9} {:>11} {:>11} {:>7}",
        "SCENARIO",
        "REP",
        "NODES",
        "OK?",
        "OPS-OK",
        "FAILED",
        "UNKNOWN",
        "VIOL",
        "LOST",
        "UNAVAIL-MS",
        "LEADER-MS",
        "RESTORED-MS",
        "SECS"
    )
}

impl Row {
    /// One report line.
    pub fn line(&self) -> String {
        format!(
            "{:<30} {:>3} {:>5} {:<4} {:>6} {:>6} {:>7} {:>5} {:>4} {:>9} {:>11} {:>11} {:>7.1}",
            self.scenario,
            self.repetition,
            self.nodes,
            if self.passed { "pass" } else { "FAIL" },
            self.ok,
            self.failed,
            self.unknown,
            self.violations,
            self.lost_writes,
            self.unavailable.as_millis(),
            millis_list(&self.new_leader),
            millis_list(&self.replicas_restored),
            self.elapsed.as_secs_f64()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::{OpId, Operation};

    fn entry(client: u64, invoked_ns: u64, returned_ns: u64, outcome: Outcome) -> Entry {
        Entry {
            id: OpId(invoked_ns),
            client,
            key: "k".into(),
            operation: Operation::Write {
                value: format!("v{invoked_ns}"),
            },
            invoked_ns,
            returned_ns: Some(returned_ns),
            outcome,
        }
    }

    #[test]
    fn an_acknowledgement_through_a_cut_off_node_is_reported() {
        let client_nodes = HashMap::from([(0, "n1".to_string()), (1, "n2".to_string())]);
        let windows = vec![("n1".to_string(), 100, 200)];
        let entries = vec![
            entry(0, 50, 120, Outcome::Ok), // invoked before the cut: may complete
            entry(0, 130, 150, Outcome::Ok), // acknowledged by the minority: a failure
            entry(0, 140, 160, Outcome::Fail),
            entry(1, 130, 150, Outcome::Ok), // through the majority: fine
        ];
        let found = acknowledged_in_quiet_windows(&entries, &windows, &client_nodes);
        assert_eq!(found.len(), 1, "{found:?}");
    }

    #[test]
    fn the_longest_gap_between_acknowledged_writes_is_the_unavailability() {
        let entries = vec![
            entry(0, 0, 1_000_000, Outcome::Ok),
            entry(0, 0, 5_000_000, Outcome::Unknown),
            entry(0, 0, 9_000_000, Outcome::Ok),
            entry(0, 0, 10_000_000, Outcome::Ok),
        ];
        assert_eq!(longest_write_gap(&entries), Duration::from_millis(8));
    }
}
