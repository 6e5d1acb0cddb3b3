//! The control plane on three nodes with real containers: Deployments spread, roll, recover
//! from node loss and leader loss, scale, and are garbage collected.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use common::{must_apply, Cluster};
use flotilla_proto::ListRequest;
use serde_json::{json, Value};

/// Docker is shared: these tests run one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn deployment(name: &str, replicas: u32, image: &str) -> Value {
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 1}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {
                    "terminationGracePeriodSeconds": 1,
                    "containers": [{
                        "name": "web", "image": image,
                        "readinessProbe": {"httpGet": {"path": "/", "port": 8080}, "periodSeconds": 1}
                    }]
                }
            }
        }
    })
}

async fn pods(cluster: &Cluster, selector: &str) -> anyhow::Result<Vec<Value>> {
    for idx in cluster.running() {
        let Ok(mut client) = cluster.objects(idx).await else {
            continue;
        };
        let reply = client
            .list(ListRequest {
                kind: "pods".into(),
                namespace: "default".into(),
                label_selector: selector.into(),
                field_selector: String::new(),
                local: false,
            })
            .await;
        if let Ok(reply) = reply {
            return reply
                .into_inner()
                .items_json
                .iter()
                .map(|b| serde_json::from_slice(b).context("decode pod"))
                .collect();
        }
    }
    bail!("no node answered the list")
}

fn is_ready(pod: &Value) -> bool {
    pod.pointer("/status/conditions")
        .and_then(Value::as_array)
        .is_some_and(|c| {
            c.iter()
                .any(|c| c["type"] == "Ready" && c["status"] == "True")
        })
}

fn node_of(pod: &Value) -> String {
    pod.pointer("/spec/nodeName")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string()
}

fn image_of(pod: &Value) -> String {
    pod.pointer("/spec/containers/0/image")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string()
}

/// Waits until exactly `count` pods match and all are Ready (and pass `extra`).
async fn must_have_ready(
    cluster: &Cluster,
    selector: &str,
    count: usize,
    timeout: Duration,
    extra: impl Fn(&[Value]) -> bool,
) -> anyhow::Result<Vec<Value>> {
    let deadline = Instant::now() + timeout;
    let mut last = Vec::new();
    while Instant::now() < deadline {
        if let Ok(found) = pods(cluster, selector).await {
            if found.len() == count && found.iter().all(is_ready) && extra(&found) {
                return Ok(found);
            }
            last = found;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let summary: Vec<_> = last
        .iter()
        .map(|p| {
            (
                p["metadata"]["name"].clone(),
                node_of(p),
                is_ready(p),
                p["status"]["phase"].clone(),
            )
        })
        .collect();
    bail!(
        "timed out waiting for {count} ready pods of {selector}; last: {summary:?}\n{}",
        cluster.logs()
    )
}

fn spread(pods: &[Value]) -> BTreeMap<String, usize> {
    let mut by_node = BTreeMap::new();
    for pod in pods {
        *by_node.entry(node_of(pod)).or_insert(0) += 1;
    }
    by_node
}

struct ImageTag(&'static str);

impl ImageTag {
    fn new(tag: &'static str) -> anyhow::Result<ImageTag> {
        let status = std::process::Command::new("docker")
            .args(["tag", "flotilla/echo:latest", tag])
            .status()?;
        anyhow::ensure!(status.success(), "docker tag {tag}");
        Ok(ImageTag(tag))
    }
}

impl Drop for ImageTag {
    fn drop(&mut self) {
        let _ = std::process::Command::new("docker")
            .args(["rmi", self.0])
            .output();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c10_a_deployment_spreads_rolls_back_and_forth_and_is_collected() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let _v2 = ImageTag::new("flotilla/echo:v2")?;
    let cluster = Cluster::start_with_agents(3).await?;
    let mut client = cluster.objects(0).await?;
    must_apply(&mut client, &deployment("web", 6, "flotilla/echo:latest")).await?;
    let ready = must_have_ready(&cluster, "app=web", 6, Duration::from_secs(90), |_| true).await?;
    assert_eq!(
        spread(&ready).values().copied().collect::<Vec<_>>(),
        vec![2, 2, 2],
        "spread over the three nodes: {:?}",
        spread(&ready)
    );

    // Roll to v2, sampling that never fewer than replicas - maxUnavailable pods are ready.
    let set = cluster.cli(&["set", "image", "deploy/web", "web=flotilla/echo:v2"])?;
    assert!(
        set.status.success(),
        "{}",
        String::from_utf8_lossy(&set.stderr)
    );
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut fewest_ready = usize::MAX;
    let mut most_pods = 0;
    loop {
        let found = pods(&cluster, "app=web").await?;
        let active: Vec<_> = found
            .iter()
            .filter(|p| p["status"]["phase"] != "Succeeded" && p["status"]["phase"] != "Failed")
            .collect();
        fewest_ready = fewest_ready.min(found.iter().filter(|p| is_ready(p)).count());
        most_pods = most_pods.max(active.len());
        if found.len() == 6
            && found
                .iter()
                .all(|p| is_ready(p) && image_of(p) == "flotilla/echo:v2")
        {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the rollout to v2 did not finish\n{}",
            cluster.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        fewest_ready >= 5,
        "never fewer than replicas - maxUnavailable ready pods, saw {fewest_ready}"
    );
    assert!(
        most_pods <= 7,
        "never more than replicas + maxSurge pods, saw {most_pods}"
    );
    let status = cluster.cli(&["rollout", "status", "deploy/web", "--timeout-seconds", "60"])?;
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stdout)
    );

    let events = cluster.cli(&["get", "events"])?;
    let events = String::from_utf8_lossy(&events.stdout).to_string();
    assert!(
        events.contains("ScalingReplicaSet") && events.contains("Scheduled"),
        "{events}"
    );
    assert!(events.starts_with("LAST SEEN"), "{events}");

    let undo = cluster.cli(&["rollout", "undo", "deploy/web"])?;
    assert!(
        undo.status.success(),
        "{}",
        String::from_utf8_lossy(&undo.stderr)
    );
    must_have_ready(&cluster, "app=web", 6, Duration::from_secs(120), |found| {
        found.iter().all(|p| image_of(p) == "flotilla/echo:latest")
    })
    .await?;
    let history = cluster.cli(&["rollout", "history", "deploy/web"])?;
    assert!(
        String::from_utf8_lossy(&history.stdout).contains('3'),
        "undo makes revision 3: {}",
        String::from_utf8_lossy(&history.stdout)
    );

    // Scale to zero and back.
    assert!(cluster
        .cli(&["scale", "deploy/web", "--replicas", "0"])?
        .status
        .success());
    must_have_ready(&cluster, "app=web", 0, Duration::from_secs(60), |_| true).await?;
    assert!(cluster
        .cli(&["scale", "deploy/web", "--replicas", "3"])?
        .status
        .success());
    must_have_ready(&cluster, "app=web", 3, Duration::from_secs(90), |_| true).await?;

    // Deleting the Deployment takes its ReplicaSets and pods with it.
    assert!(cluster
        .cli(&["delete", "deployment", "web"])?
        .status
        .success());
    must_have_ready(&cluster, "app=web", 0, Duration::from_secs(60), |_| true).await?;
    let replica_sets = cluster.cli(&["get", "rs", "-o", "json"])?;
    let listed: Value = serde_json::from_slice(&replica_sets.stdout)?;
    assert_eq!(
        listed["items"].as_array().map(Vec::len),
        Some(0),
        "{listed}"
    );
    Ok(())
}

fn remove_node_containers(cluster: &Cluster, node: &str) -> anyhow::Result<()> {
    let cluster_id = cluster.cluster_id.clone().context("cluster id known")?;
    let output = std::process::Command::new("docker")
        .args([
            "ps",
            "-aq",
            "--filter",
            &format!("label=io.flotilla.cluster={cluster_id}"),
            "--filter",
            &format!("label=io.flotilla.node={node}"),
        ])
        .output()?;
    let ids: Vec<String> = String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .map(String::from)
        .collect();
    if !ids.is_empty() {
        std::process::Command::new("docker")
            .args(["rm", "-f"])
            .args(&ids)
            .output()?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c20_pods_of_a_lost_node_come_back_elsewhere_and_a_returning_node_runs_no_duplicates(
) -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let mut cluster = Cluster::start_with_agents(3).await?;
    let mut client = cluster.objects(0).await?;
    must_apply(&mut client, &deployment("svc", 4, "flotilla/echo:latest")).await?;
    must_have_ready(&cluster, "app=svc", 4, Duration::from_secs(90), |_| true).await?;

    // A machine loss: the node and its containers. Never the first node (the test's client).
    let leader = cluster.leader_idx().await?;
    let victim = if leader == 2 { 1 } else { 2 };
    let victim_name = cluster.nodes[victim].name.clone();
    let killed_at = Instant::now();
    cluster.kill(victim)?;
    remove_node_containers(&cluster, &victim_name)?;
    let replaced = must_have_ready(&cluster, "app=svc", 4, Duration::from_secs(60), |found| {
        found.iter().all(|p| node_of(p) != victim_name)
    })
    .await?;
    println!(
        "machine loss -> replicas Ready again: {:?}",
        killed_at.elapsed()
    );
    assert!(replaced.iter().all(|p| node_of(p) != victim_name));

    // A partition: the other node stops, its containers keep running, then it comes back.
    cluster.restart(victim)?;
    let leader = cluster.leader_idx().await?;
    let partitioned = (0..3).find(|i| *i != leader && *i != 0).unwrap_or(1);
    let partitioned_name = cluster.nodes[partitioned].name.clone();
    must_have_ready(&cluster, "app=svc", 4, Duration::from_secs(60), |_| true).await?;
    cluster.kill(partitioned)?;
    must_have_ready(&cluster, "app=svc", 4, Duration::from_secs(60), |found| {
        found.iter().all(|p| node_of(p) != partitioned_name)
    })
    .await?;
    cluster.restart(partitioned)?;
    // Its old containers are removed; exactly the desired count runs.
    let cluster_id = cluster.cluster_id.clone().context("cluster id")?;
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let running = std::process::Command::new("docker")
            .args([
                "ps",
                "-q",
                "--filter",
                &format!("label=io.flotilla.cluster={cluster_id}"),
                "--filter",
                "label=io.flotilla.container=web",
            ])
            .output()?;
        let count = String::from_utf8_lossy(&running.stdout)
            .split_whitespace()
            .count();
        if count == 4 {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{count} app containers run, expected exactly 4\n{}",
            cluster.logs()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c30_a_new_leader_finishes_a_rollout_its_predecessor_started() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let _v3 = ImageTag::new("flotilla/echo:v3")?;
    let mut cluster = Cluster::start_with_agents(3).await?;
    let leader = cluster.leader_idx().await?;
    // Talk to a node that stays.
    let steady = (0..3).find(|i| *i != leader).unwrap_or(0);
    let mut client = cluster.objects(steady).await?;
    must_apply(&mut client, &deployment("roll", 4, "flotilla/echo:latest")).await?;
    must_have_ready(&cluster, "app=roll", 4, Duration::from_secs(90), |_| true).await?;
    let set = cluster.cli_via(
        steady,
        &["set", "image", "deploy/roll", "web=flotilla/echo:v3"],
    )?;
    assert!(
        set.status.success(),
        "{}",
        String::from_utf8_lossy(&set.stderr)
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    cluster.kill(leader)?;
    let leader_name = cluster.nodes[leader].name.clone();
    remove_node_containers(&cluster, &leader_name)?;
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut most_pods = 0;
    loop {
        let found = pods(&cluster, "app=roll").await.unwrap_or_default();
        let active = found
            .iter()
            .filter(|p| p["status"]["phase"] != "Succeeded" && p["status"]["phase"] != "Failed")
            .count();
        most_pods = most_pods.max(active);
        if found.len() == 4
            && found
                .iter()
                .all(|p| is_ready(p) && image_of(p) == "flotilla/echo:v3")
        {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the new leader did not finish the rollout\n{}",
            cluster.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        most_pods <= 5,
        "never more than replicas + maxSurge pods, saw {most_pods}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c40_drain_leaves_pods_unschedulable_until_uncordon_and_a_deleted_namespace_empties(
) -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let cluster = Cluster::start_with_agents(1).await?;
    let mut client = cluster.objects(0).await?;
    must_apply(&mut client, &deployment("solo", 1, "flotilla/echo:latest")).await?;
    must_have_ready(&cluster, "app=solo", 1, Duration::from_secs(60), |_| true).await?;

    let drained = cluster.cli(&["drain", "n1"])?;
    assert!(
        drained.status.success(),
        "{}",
        String::from_utf8_lossy(&drained.stderr)
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let message = loop {
        let found = pods(&cluster, "app=solo").await?;
        let condition = found.first().and_then(|p| {
            p.pointer("/status/conditions")
                .and_then(Value::as_array)
                .and_then(|c| {
                    c.iter()
                        .find(|c| c["type"] == "PodScheduled" && c["status"] == "False")
                })
                .cloned()
        });
        if let Some(condition) = condition {
            break condition["message"]
                .as_str()
                .unwrap_or_default()
                .to_string();
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the replacement pod was never marked unschedulable\n{}",
            cluster.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(message.contains("0/1 nodes are available"), "{message}");
    assert!(message.contains("unschedulable"), "{message}");
    assert!(cluster.cli(&["uncordon", "n1"])?.status.success());
    must_have_ready(&cluster, "app=solo", 1, Duration::from_secs(60), |_| true).await?;

    let namespace = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "team"}});
    must_apply(&mut client, &namespace).await?;
    let config = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "settings", "namespace": "team"}, "data": {"a": "1"}});
    must_apply(&mut client, &config).await?;
    assert!(cluster
        .cli(&["delete", "namespace", "team"])?
        .status
        .success());
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let listed = cluster.cli(&["get", "cm", "-n", "team", "-o", "json"])?;
        let items: Value = serde_json::from_slice(&listed.stdout).unwrap_or_default();
        if items["items"].as_array().is_some_and(Vec::is_empty) {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the namespace's ConfigMap outlived it"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}
