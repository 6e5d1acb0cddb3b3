//! The chaos harness in CI: the smoke subset of scenarios on three node containers, and the
//! checker catching a deliberately broken store (one that acknowledges writes before they
//! commit). The full run is `cargo run -p chaos-tests --release -- run all` (README).

use std::path::PathBuf;
use std::time::Duration;

use chaos_tests::broken::BrokenProxy;
use chaos_tests::runner::{judge_history, run_scenario, RunOptions};
use chaos_tests::scenarios::{current_leader, Scenario};
use chaos_tests::workload::{final_reads, Workload, WorkloadConfig};
use flotilla_local::{LocalCluster, UpOptions};

mod local_cluster;

use local_cluster::{Down, BINARY};

/// One cluster at a time: two clusters and their workloads on a 2-core machine would measure
/// the machine, not the scenario.
static ONE_CLUSTER_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn options() -> RunOptions {
    let mut options = RunOptions::new(PathBuf::from(BINARY), 3, 42);
    options.name_prefix = format!("ci{}", std::process::id() % 100_000);
    options.results = std::env::temp_dir().join("flotilla-chaos-results");
    options
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_smoke_scenarios_keep_every_acknowledged_write_and_restore_the_workload() {
    let _one = ONE_CLUSTER_AT_A_TIME.lock().await;
    let options = options();
    let mut failures = Vec::new();
    for (repetition, scenario) in [
        Scenario::LeaderKill,
        Scenario::LeaderIsolation,
        Scenario::MachineLoss,
    ]
    .into_iter()
    .enumerate()
    {
        let row = run_scenario(scenario, repetition, &options).await;
        println!("{}", row.line());
        assert!(
            row.ok > 100,
            "{}: too few operations succeeded: {row:?}",
            row.scenario
        );
        if !row.passed {
            failures.push(format!(
                "{}: {:?} {:?}",
                row.scenario, row.failures, row.notes
            ));
        }
    }
    assert!(failures.is_empty(), "failed scenarios: {failures:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_checker_catches_a_store_that_acknowledges_writes_before_they_commit() {
    let _one = ONE_CLUSTER_AT_A_TIME.lock().await;
    let name = format!("broken{}", std::process::id() % 100_000);
    let _down = Down(name.clone());
    let mut up = UpOptions::new(&name, 3, PathBuf::from(BINARY));
    up.node_args = vec!["--no-agent".into()];
    let cluster = LocalCluster::up(&up).await.expect("start the cluster");
    chaos_tests::cluster::use_local_credentials(&cluster).expect("load the admin credentials");
    let mut proxies = Vec::new();
    for node in cluster.nodes() {
        proxies.push(
            BrokenProxy::start(node.addr())
                .await
                .expect("start a broken proxy"),
        );
    }
    let config = WorkloadConfig::new(proxies.iter().map(|p| p.addr).collect(), 7);
    let workload = Workload::start(&config, cluster.nodes()[0].addr())
        .await
        .expect("start the workload");
    tokio::time::sleep(Duration::from_secs(3)).await;
    // A leader kill loses the writes the proxies had acknowledged but not yet committed.
    let leader = current_leader(cluster.nodes()).await.expect("a leader");
    cluster
        .kill(&leader.name, false)
        .await
        .expect("kill the leader");
    tokio::time::sleep(Duration::from_secs(2)).await;
    cluster
        .restart(&leader.name)
        .await
        .expect("restart the leader");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let history = workload.stop().await;
    cluster
        .wait_healthy(Duration::from_secs(60))
        .await
        .expect("the cluster recovers");
    let reader = current_leader(cluster.nodes()).await.expect("a leader");
    let final_state = final_reads(&history, &config, reader.addr())
        .await
        .expect("read the final state");
    let verdict = judge_history(&history, &config, &final_state);
    println!("{verdict:?}");
    assert!(
        verdict.violations > 0,
        "the checker found the ack-before-commit store linearizable: {verdict:?}"
    );
    cluster.down().await.expect("remove the cluster");
}
