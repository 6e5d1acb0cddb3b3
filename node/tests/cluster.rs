//! A cluster of three `flotilla serve` processes on 127.0.0.1, as a user runs it.

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{config_map, must_apply, must_get, Cluster};
use flotilla_proto::{ListRequest, WatchRequest};
use serde_json::Value;
use tokio_stream::StreamExt;

/// The tests start several processes each; on a 2-core machine they run one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t10_an_object_applied_through_one_node_is_read_through_the_others() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let cluster = Cluster::start(3).await?;
    let mut first = cluster.objects(0).await?;
    let applied = must_apply(&mut first, &config_map("shared", "hello")).await?;
    for idx in 1..3 {
        let mut client = cluster.objects(idx).await?;
        let read = must_get(&mut client, "ConfigMap", "shared").await?;
        assert_eq!(
            read["data"]["v"], "hello",
            "read through {}",
            cluster.nodes[idx].name
        );
        assert_eq!(
            read["metadata"]["resourceVersion"],
            applied["metadata"]["resourceVersion"]
        );
    }
    let output = cluster.cli(&["get", "configmaps"])?;
    assert!(
        String::from_utf8_lossy(&output.stdout).contains("shared"),
        "{output:?}"
    );
    Ok(())
}

/// Writers through every node; returns the acknowledged value of each key.
async fn run_writers(
    cluster: &Cluster,
    writers: usize,
    duration: Duration,
) -> anyhow::Result<BTreeMap<String, String>> {
    let acknowledged = Arc::new(Mutex::new(BTreeMap::new()));
    let mut tasks = Vec::new();
    for writer in 0..writers {
        let addresses = cluster.addresses();
        let acknowledged = acknowledged.clone();
        let tls = cluster.admin_tls()?;
        tasks.push(tokio::spawn(async move {
            let deadline = Instant::now() + duration;
            let mut seq = 0u64;
            let mut failures = 0u64;
            while Instant::now() < deadline && seq < 10_000 {
                let address = &addresses[(writer + seq as usize) % addresses.len()];
                seq += 1;
                let key = format!("w{writer}-{seq}");
                let value = format!("value-{writer}-{seq}");
                let attempt = async {
                    let endpoint =
                        tonic::transport::Endpoint::from_shared(format!("http://{address}"))?
                            .connect_timeout(Duration::from_millis(300))
                            .timeout(Duration::from_secs(5));
                    let channel = flotilla_pki::transport::connect(&endpoint, tls.clone()).await?;
                    let mut client = flotilla_proto::objects_client::ObjectsClient::new(channel);
                    must_apply(&mut client, &config_map(&key, &value)).await
                };
                match attempt.await {
                    Ok(_) => {
                        acknowledged
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .insert(key, value);
                    }
                    Err(_) => failures += 1,
                }
            }
            failures
        }));
    }
    for task in tasks {
        task.await?;
    }
    let map = acknowledged
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    Ok(map)
}

async fn must_have_every_write(
    cluster: &Cluster,
    idx: usize,
    acknowledged: &BTreeMap<String, String>,
) -> anyhow::Result<()> {
    let mut client = cluster.objects(idx).await?;
    let reply = client
        .list(ListRequest {
            kind: "ConfigMap".into(),
            namespace: "default".into(),
            label_selector: String::new(),
            field_selector: String::new(),
            local: false,
        })
        .await?
        .into_inner();
    let mut stored = BTreeMap::new();
    for item in reply.items_json {
        let object: Value = serde_json::from_slice(&item)?;
        stored.insert(
            object["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            object["data"]["v"].as_str().unwrap_or_default().to_string(),
        );
    }
    for (key, value) in acknowledged {
        assert_eq!(
            stored.get(key),
            Some(value),
            "acknowledged write {key} missing on {}",
            cluster.nodes[idx].name
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t20_killing_the_leader_under_load_loses_no_acknowledged_write() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let mut cluster = Cluster::start(3).await?;
    let leader = cluster.leader_idx().await?;
    let writers = run_writers(&cluster, 6, Duration::from_secs(6));
    let killer = async {
        tokio::time::sleep(Duration::from_secs(2)).await;
        anyhow::Ok(())
    };
    let (acknowledged, killed) = tokio::join!(writers, async {
        killer.await?;
        cluster_kill(&cluster, leader)
    });
    let acknowledged = acknowledged?;
    killed?;
    // The kill above only signalled; reap the process through the cluster handle.
    cluster.kill(leader)?;

    assert!(
        acknowledged.len() > 100,
        "too few writes acknowledged: {}\n{}",
        acknowledged.len(),
        cluster.logs()
    );
    let new_leader = cluster.leader_idx().await?;
    assert_ne!(new_leader, leader, "a survivor must lead");

    // Writes resumed through the survivors.
    let mut survivor = cluster.objects(new_leader).await?;
    must_apply(&mut survivor, &config_map("after-kill", "yes")).await?;
    for idx in cluster.running() {
        must_have_every_write(&cluster, idx, &acknowledged).await?;
    }

    // Enough writes while it is down that its gap is compacted into a snapshot.
    for seq in 0..400 {
        must_apply(&mut survivor, &config_map(&format!("gap-{seq}"), "x")).await?;
    }
    cluster.restart(leader)?;
    let killed_name = cluster.nodes[leader].name.clone();
    let status = cluster
        .must_wait_for(
            |s| {
                let members = s["members"].as_array().cloned().unwrap_or_default();
                let commit = s["commit_index"].as_u64().unwrap_or(0);
                members.iter().any(|m| {
                    m["name"] == killed_name.as_str()
                        && m["healthy"] == true
                        && m["applied_index"].as_u64().unwrap_or(0) + 5 >= commit
                })
            },
            "the killed node to catch up",
        )
        .await?;
    assert!(status["members"].as_array().is_some_and(|m| m.len() == 3));
    must_have_every_write(&cluster, leader, &acknowledged).await?;
    let mut restarted = cluster.objects(leader).await?;
    let gap = must_get(&mut restarted, "ConfigMap", "gap-399").await?;
    assert_eq!(gap["data"]["v"], "x");
    let log = std::fs::read_to_string(
        cluster
            .dir
            .path()
            .join(format!("{}.log", cluster.nodes[leader].name)),
    )?;
    assert!(
        log.contains("installed snapshot"),
        "the restarted node should have caught up through a snapshot"
    );
    Ok(())
}

fn cluster_kill(cluster: &Cluster, idx: usize) -> anyhow::Result<()> {
    let pid = cluster.nodes[idx]
        .process
        .as_ref()
        .map(|c| c.id())
        .ok_or_else(|| anyhow::anyhow!("node not running"))?;
    let status = std::process::Command::new("kill")
        .arg("-KILL")
        .arg(pid.to_string())
        .status()?;
    anyhow::ensure!(status.success(), "kill -9 {pid}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t30_stopping_and_restarting_every_node_keeps_every_object_and_resource_version(
) -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let mut cluster = Cluster::start(3).await?;
    let mut client = cluster.objects(0).await?;
    let mut before = BTreeMap::new();
    for seq in 0..30 {
        let object = must_apply(
            &mut client,
            &config_map(&format!("keep-{seq}"), &seq.to_string()),
        )
        .await?;
        before.insert(
            format!("keep-{seq}"),
            object["metadata"]["resourceVersion"].clone(),
        );
    }
    for idx in 0..3 {
        cluster.stop(idx)?;
    }
    for idx in 0..3 {
        cluster.restart(idx)?;
    }
    // Every node serves again (a leader alone means only two of them might).
    cluster.must_wait_for_healthy_members(3).await?;
    for idx in 0..3 {
        let mut client = cluster.objects(idx).await?;
        for (name, resource_version) in &before {
            let object = must_get(&mut client, "ConfigMap", name).await?;
            assert_eq!(
                &object["metadata"]["resourceVersion"],
                resource_version,
                "{name} on n{}",
                idx + 1
            );
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t40_a_fourth_node_joins_as_a_learner_and_is_promoted_when_a_voter_is_removed(
) -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let mut cluster = Cluster::start(3).await?;
    cluster.add_node(&[])?;
    let status = cluster
        .must_wait_for(
            |s| {
                s["members"].as_array().is_some_and(|m| {
                    m.len() == 4
                        && m.iter().all(|m| m["healthy"] == true)
                        && m.iter().filter(|m| m["role"] == "voter").count() == 3
                })
            },
            "the fourth node to replicate",
        )
        .await?;
    let role_of = |status: &Value, name: &str| {
        status["members"]
            .as_array()
            .and_then(|m| m.iter().find(|m| m["name"] == name))
            .map(|m| m["role"].as_str().unwrap_or_default().to_string())
    };
    assert_eq!(
        role_of(&status, "n4").as_deref(),
        Some("learner"),
        "{status}"
    );
    let voters = status["members"]
        .as_array()
        .map(|m| m.iter().filter(|m| m["role"] == "voter").count());
    assert_eq!(voters, Some(3));

    // The learner serves reads of everything.
    let mut writer = cluster.objects(0).await?;
    must_apply(&mut writer, &config_map("seen-by-learner", "1")).await?;
    let mut learner = cluster.objects(3).await?;
    must_get(&mut learner, "ConfigMap", "seen-by-learner").await?;

    let removed = cluster.cli(&["cluster", "remove", "n2"])?;
    assert!(
        removed.status.success(),
        "{}",
        String::from_utf8_lossy(&removed.stderr)
    );
    cluster.kill(1)?;
    let status = cluster
        .must_wait_for(
            |s| {
                s["members"].as_array().is_some_and(|m| {
                    m.len() == 3 && m.iter().any(|m| m["name"] == "n4" && m["role"] == "voter")
                })
            },
            "n4 to be promoted",
        )
        .await?;
    assert!(
        role_of(&status, "n2").is_none(),
        "n2 must be gone: {status}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t50_bad_input_gets_a_clear_error_and_writes_nothing() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let cluster = Cluster::start(1).await?;
    let dir = cluster.dir.path();
    let write = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).map(|_| path.display().to_string())
    };
    let valid_first = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: first}\n---\n";
    let cases = [
        (write("yaml.yaml", &format!("{valid_first}kind: ConfigMap\nmetadata:\n  name: [x\n"))?, "invalid YAML at line"),
        (write("kind.yaml", &format!("{valid_first}apiVersion: v1\nkind: Widget\nmetadata: {{name: w}}\n"))?, "unknown kind \"Widget\""),
        (write("name.yaml", &format!("{valid_first}apiVersion: v1\nkind: ConfigMap\nmetadata: {{}}\n"))?, "missing metadata.name"),
        (write("type.yaml", &format!("{valid_first}apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: d}}\nspec: {{replicas: three, selector: {{}}, template: {{}}}}\n"))?, "spec.replicas"),
    ];
    let before = cluster.cli(&["get", "configmaps", "-o", "json"])?;
    for (file, expect) in &cases {
        let output = cluster.cli(&["apply", "-f", file])?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{file} must fail");
        assert!(
            stderr.contains(expect),
            "{file}: {stderr:?} should contain {expect:?}"
        );
        assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr:?}");
    }
    let selector = cluster.cli(&["get", "pods", "-l", "app in (a"])?;
    assert!(!selector.status.success());
    assert!(String::from_utf8_lossy(&selector.stderr).contains("invalid selector"));

    // A stale resourceVersion is a conflict.
    let mut client = cluster.objects(0).await?;
    let stored = must_apply(&mut client, &config_map("versioned", "1")).await?;
    must_apply(&mut client, &config_map("versioned", "2")).await?;
    let stale = client
        .update(flotilla_proto::ObjectRequest {
            object_json: serde_json::to_vec(&stored)?,
        })
        .await
        .expect_err("stale update must fail");
    assert_eq!(stale.code(), tonic::Code::Aborted);
    assert!(stale.message().contains("conflict"), "{}", stale.message());
    assert_eq!(
        must_get(&mut client, "ConfigMap", "versioned").await?["data"]["v"],
        "2"
    );

    // Nothing from the refused manifests was written (not even their valid first document).
    let after = cluster.cli(&["get", "configmaps", "-o", "json"])?;
    let names = |output: &std::process::Output| -> Vec<String> {
        serde_json::from_slice::<Value>(&output.stdout)
            .ok()
            .and_then(|v| v["items"].as_array().cloned())
            .unwrap_or_default()
            .iter()
            .filter_map(|i| i["metadata"]["name"].as_str().map(String::from))
            .collect()
    };
    assert_eq!(names(&after), vec!["versioned".to_string()]);
    assert!(names(&before).is_empty());

    let unreachable = std::process::Command::new(common::BINARY)
        .args(["--server", "127.0.0.1:1", "get", "pods", "--config"])
        .arg(cluster.admin_config())
        .output()?;
    assert!(!unreachable.status.success());
    assert!(String::from_utf8_lossy(&unreachable.stderr).contains("cannot reach any server"));
    Ok(())
}

type Seen = Vec<(String, String, u64)>;

/// Reads watch events until `seen` holds `count`: (type, data.v, resourceVersion).
async fn must_receive(
    events: &mut tonic::Streaming<flotilla_proto::WatchEvent>,
    count: usize,
    seen: &mut Seen,
) -> anyhow::Result<()> {
    while seen.len() < count {
        let event = tokio::time::timeout(Duration::from_secs(10), events.next())
            .await?
            .ok_or_else(|| anyhow::anyhow!("watch ended"))??;
        let object: Value = serde_json::from_slice(&event.object_json)?;
        seen.push((
            event.r#type,
            object["data"]["v"].as_str().unwrap_or_default().to_string(),
            event.resource_version.parse::<u64>()?,
        ));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t60_a_watch_resumes_on_another_node_without_gaps_or_repeats() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let cluster = Cluster::start(3).await?;
    let mut writer = cluster.objects(0).await?;
    let first = must_apply(&mut writer, &config_map("watched", "0")).await?;
    let start: u64 = first["metadata"]["resourceVersion"]
        .as_str()
        .unwrap_or("0")
        .parse()?;
    for value in 1..=5 {
        must_apply(&mut writer, &config_map("watched", &value.to_string())).await?;
    }
    let watch = |rv: u64| WatchRequest {
        kind: "configmaps".into(),
        namespace: "default".into(),
        label_selector: String::new(),
        field_selector: "metadata.name=watched".into(),
        resource_version: rv.to_string(),
    };
    // Three events on node 2, then resume on node 3 from the last one seen.
    let mut on_second = cluster
        .objects(1)
        .await?
        .watch(watch(start))
        .await?
        .into_inner();
    let mut seen = Seen::new();
    must_receive(&mut on_second, 3, &mut seen).await?;
    drop(on_second);
    let resume_from = seen.last().map(|s| s.2).unwrap_or(start);
    let mut on_third = cluster
        .objects(2)
        .await?
        .watch(watch(resume_from))
        .await?
        .into_inner();
    must_apply(&mut writer, &config_map("watched", "6")).await?;
    must_receive(&mut on_third, 6, &mut seen).await?;
    let values: Vec<_> = seen.iter().map(|s| s.1.as_str()).collect();
    assert_eq!(values, ["1", "2", "3", "4", "5", "6"]);
    assert!(seen.iter().all(|s| s.0 == "MODIFIED"));
    assert!(
        seen.windows(2).all(|w| w[0].2 < w[1].2),
        "in commit order: {seen:?}"
    );
    Ok(())
}

/// A Node object as a node registers it: Ready, heartbeat now.
fn ready_node(name: &str, pod_cidr: &str) -> Value {
    let now = jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string();
    serde_json::json!({
        "apiVersion": "v1", "kind": "Node", "metadata": {"name": name},
        "spec": {"podCIDR": pod_cidr},
        "status": {"conditions": [{
            "type": "Ready", "status": "True", "reason": "Test",
            "lastHeartbeatTime": now, "lastTransitionTime": now
        }]}
    })
}

fn ready_status(node: &Value) -> String {
    node.pointer("/status/conditions")
        .and_then(Value::as_array)
        .and_then(|conditions| conditions.iter().find(|c| c["type"] == "Ready"))
        .and_then(|condition| condition["status"].as_str())
        .unwrap_or("none")
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t70_a_node_heard_through_any_member_stays_ready_and_a_silent_one_turns_unknown(
) -> anyhow::Result<()> {
    use flotilla_proto::cluster_client::ClusterClient;
    use flotilla_proto::NodeHeartbeatRequest;

    let _serial = SERIAL.lock().await;
    let cluster = Cluster::start(3).await?;
    let leader = cluster.leader_idx().await?;
    let follower = (leader + 1) % 3;
    let mut objects = cluster.objects(follower).await?;
    for (name, pod_cidr) in [("heard", "10.250.0.0/24"), ("silent", "10.250.1.0/24")] {
        must_apply(&mut objects, &ready_node(name, pod_cidr)).await?;
    }
    let mut heartbeats = ClusterClient::new(cluster.channel(follower).await?);
    let heartbeat = |name: &str| NodeHeartbeatRequest {
        node_name: name.to_string(),
    };
    let unknown = heartbeats
        .node_heartbeat(heartbeat("never-registered"))
        .await
        .expect_err("a heartbeat of an unregistered node is refused");
    assert_eq!(unknown.code(), tonic::Code::NotFound, "{unknown:?}");
    assert!(
        unknown.message().contains("never-registered"),
        "{unknown:?}"
    );

    // Only "heard" sends heartbeats (through a follower, which forwards them to the leader),
    // for three times the default grace period.
    let deadline = Instant::now() + Duration::from_secs(9);
    let mut silent_status = String::new();
    while Instant::now() < deadline {
        heartbeats.node_heartbeat(heartbeat("heard")).await?;
        let heard = must_get(&mut objects, "Node", "heard").await?;
        assert_eq!(ready_status(&heard), "True", "{heard}");
        silent_status = ready_status(&must_get(&mut objects, "Node", "silent").await?);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(silent_status, "Unknown", "the silent node is judged");
    let silent = must_get(&mut objects, "Node", "silent").await?;
    let taints = silent["spec"]["taints"].to_string();
    assert!(
        taints.contains("node.kubernetes.io/unreachable"),
        "{silent}"
    );
    Ok(())
}
