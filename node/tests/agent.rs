//! The node agent against the real Docker daemon: pods run as containers, restart by policy,
//! are probed, and are cleaned up. Needs `scripts/build-images.sh` (run by `scripts/test.sh`).

mod common;

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use common::{must_apply, Cluster};
use flotilla_proto::{DeleteRequest, GetRequest};
use serde_json::{json, Value};

/// Docker is shared: agent tests run one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn pod(name: &str, node: &str, spec: Value) -> Value {
    let mut spec = spec;
    spec["nodeName"] = json!(node);
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "default"}, "spec": spec})
}

async fn get_pod(cluster: &Cluster, idx: usize, name: &str) -> anyhow::Result<Value> {
    let reply = cluster
        .objects(idx)
        .await?
        .get(GetRequest {
            kind: "pods".into(),
            namespace: "default".into(),
            name: name.into(),
            local: false,
        })
        .await?
        .into_inner();
    Ok(serde_json::from_slice(&reply.object_json)?)
}

/// Polls the pod until `condition` holds, up to `timeout`.
async fn must_wait_for_pod(
    cluster: &Cluster,
    name: &str,
    timeout: Duration,
    what: &str,
    condition: impl Fn(&Value) -> bool,
) -> anyhow::Result<Value> {
    let deadline = Instant::now() + timeout;
    let mut last = Value::Null;
    while Instant::now() < deadline {
        if let Ok(pod) = get_pod(cluster, 0, name).await {
            if condition(&pod) {
                return Ok(pod);
            }
            last = pod;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bail!(
        "pod {name}: timed out waiting for {what}; last: {}\n{}",
        last.get("status").unwrap_or(&Value::Null),
        cluster.logs()
    )
}

fn container_status<'a>(pod: &'a Value, container: &str) -> &'a Value {
    pod["status"]["containerStatuses"]
        .as_array()
        .and_then(|all| all.iter().find(|c| c["name"] == container))
        .unwrap_or(&Value::Null)
}

fn restart_count(pod: &Value, container: &str) -> u64 {
    container_status(pod, container)["restartCount"]
        .as_u64()
        .unwrap_or(0)
}

fn docker_ids(filter: &str) -> anyhow::Result<Vec<String>> {
    let output = std::process::Command::new("docker")
        .args(["ps", "-aq", "--filter", filter])
        .output()
        .context("run docker ps")?;
    Ok(String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .map(String::from)
        .collect())
}

/// Stops the cluster and checks that every container matching `filter` went with it.
fn must_remove_on_stop(cluster: Cluster, filter: &str) -> anyhow::Result<()> {
    drop(cluster);
    assert!(
        docker_ids(filter)?.is_empty(),
        "the test removed its containers"
    );
    Ok(())
}

fn busybox(name: &str, script: &str) -> Value {
    json!({"name": name, "image": "flotilla/busybox:latest", "command": ["sh", "-c", script]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a10_a_two_container_pod_shares_localhost_and_a_volume_and_sees_its_config(
) -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let cluster = Cluster::start_with_agents(1).await?;
    let mut client = cluster.objects(0).await?;
    must_apply(&mut client, &json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "settings"}, "data": {"greeting": "hello"}})).await?;
    must_apply(&mut client, &json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "creds"}, "data": {"password": "czNjcjN0"}})).await?;
    let spec = json!({
        "volumes": [{"name": "shared", "emptyDir": {}}],
        "containers": [
            {"name": "server", "image": "flotilla/echo:latest", "env": [{"name": "PORT", "value": "8080"}]},
            {
                "name": "client", "image": "flotilla/busybox:latest",
                "command": ["sh", "-c", "echo \"$GREETING $PASSWORD\" > /shared/env; while true; do wget -q -O /shared/answer.tmp http://127.0.0.1:8080/ && mv /shared/answer.tmp /shared/answer; sleep 1; done"],
                "env": [
                    {"name": "GREETING", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "greeting"}}},
                    {"name": "PASSWORD", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "password"}}}
                ],
                "volumeMounts": [{"name": "shared", "mountPath": "/shared"}]
            }
        ]
    });
    must_apply(&mut client, &pod("duo", "n1", spec)).await?;
    let running = must_wait_for_pod(
        &cluster,
        "duo",
        Duration::from_secs(60),
        "Running with both containers ready",
        |p| p["status"]["phase"] == "Running" && p["status"]["conditions"][3]["status"] == "True",
    )
    .await?;
    assert!(
        running["status"]["podIP"]
            .as_str()
            .is_some_and(|ip| ip.starts_with("10.")),
        "{running}"
    );
    let uid = running["metadata"]["uid"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let volume = cluster.nodes[0]
        .data_dir
        .join("pods")
        .join(&uid)
        .join("volumes")
        .join("shared");
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut answer = String::new();
    while Instant::now() < deadline {
        answer = std::fs::read_to_string(volume.join("answer")).unwrap_or_default();
        if !answer.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        answer.trim(),
        "duo",
        "the client reached the server on 127.0.0.1 and got its hostname"
    );
    let env = std::fs::read_to_string(volume.join("env"))
        .context("read the env file the client wrote")?;
    assert_eq!(env.trim(), "hello s3cr3t");
    let filter = format!("label=io.flotilla.pod.uid={uid}");
    assert_eq!(
        docker_ids(&filter)?.len(),
        3,
        "a sandbox and two containers"
    );
    drop(client);
    must_remove_on_stop(cluster, &filter)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a20_restart_policies_treat_exit_codes_as_kubernetes_does() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let cluster = Cluster::start_with_agents(1).await?;
    let mut client = cluster.objects(0).await?;
    let cases = [
        ("Never", 0),
        ("Never", 1),
        ("OnFailure", 0),
        ("OnFailure", 1),
        ("Always", 0),
        ("Always", 1),
    ];
    for (policy, code) in cases {
        let name = format!("{}-{code}", policy.to_lowercase());
        let spec = json!({"restartPolicy": policy, "terminationGracePeriodSeconds": 1, "containers": [busybox("c", &format!("sleep 1; exit {code}"))]});
        must_apply(&mut client, &pod(&name, "n1", spec)).await?;
    }
    for (policy, code) in cases {
        let name = format!("{}-{code}", policy.to_lowercase());
        match (policy, code) {
            ("Never", 0) | ("OnFailure", 0) => {
                let done =
                    must_wait_for_pod(&cluster, &name, Duration::from_secs(40), "Succeeded", |p| {
                        p["status"]["phase"] == "Succeeded"
                    })
                    .await?;
                assert_eq!(restart_count(&done, "c"), 0, "{name}");
                assert_eq!(
                    container_status(&done, "c")["state"]["terminated"]["reason"],
                    "Completed"
                );
            }
            ("Never", _) => {
                let failed =
                    must_wait_for_pod(&cluster, &name, Duration::from_secs(40), "Failed", |p| {
                        p["status"]["phase"] == "Failed"
                    })
                    .await?;
                assert_eq!(
                    container_status(&failed, "c")["state"]["terminated"]["exitCode"],
                    1
                );
                assert_eq!(restart_count(&failed, "c"), 0);
            }
            _ => {
                let restarted =
                    must_wait_for_pod(&cluster, &name, Duration::from_secs(40), "a restart", |p| {
                        restart_count(p, "c") >= 1
                    })
                    .await?;
                assert_eq!(
                    restarted["status"]["phase"], "Running",
                    "{name} keeps running"
                );
                assert_eq!(
                    container_status(&restarted, "c")["lastState"]["terminated"]["exitCode"],
                    code,
                    "{name}"
                );
            }
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a25_a_pod_of_one_container_is_that_one_container_and_keeps_its_address_across_restarts(
) -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let cluster = Cluster::start_with_agents(1).await?;
    let mut client = cluster.objects(0).await?;
    let spec = json!({"terminationGracePeriodSeconds": 1, "containers": [busybox("c", "sleep 2; exit 1")]});
    must_apply(&mut client, &pod("solo", "n1", spec)).await?;
    let first = must_wait_for_pod(&cluster, "solo", Duration::from_secs(40), "Running", |p| {
        p["status"]["phase"] == "Running" && p["status"]["podIP"].is_string()
    })
    .await?;
    let address = first["status"]["podIP"].clone();
    let uid = first["metadata"]["uid"].as_str().context("uid")?.to_owned();
    let filter = format!("label=io.flotilla.pod.uid={uid}");
    assert_eq!(
        docker_ids(&filter)?.len(),
        1,
        "one container, no sandbox\n{}",
        cluster.logs()
    );
    let ids = docker_ids(&filter)?;
    let inspect = std::process::Command::new("docker")
        .args(["inspect", "-f", "{{.Config.Hostname}}"])
        .args(&ids)
        .output()
        .context("run docker inspect")?;
    assert_eq!(
        String::from_utf8_lossy(&inspect.stdout).trim(),
        "solo",
        "the container has the pod's hostname"
    );

    let restarted = must_wait_for_pod(
        &cluster,
        "solo",
        Duration::from_secs(40),
        "Running again after a restart",
        |p| {
            restart_count(p, "c") >= 1
                && p["status"]["phase"] == "Running"
                && container_status(p, "c")["state"]["running"].is_object()
                && p["status"]["podIP"].is_string()
        },
    )
    .await?;
    assert_eq!(
        restarted["status"]["podIP"], address,
        "the restarted container took the pod's address back"
    );
    assert_eq!(
        docker_ids(&filter)?.len(),
        2,
        "the running attempt and the previous one (for its logs)"
    );
    drop(client);
    must_remove_on_stop(cluster, &filter)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a30_a_crashing_container_shows_crash_loop_back_off_with_a_growing_delay(
) -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let cluster = Cluster::start_with_agents(1).await?;
    let mut client = cluster.objects(0).await?;
    let spec = json!({"terminationGracePeriodSeconds": 1, "containers": [busybox("c", "exit 3")]});
    must_apply(&mut client, &pod("crasher", "n1", spec)).await?;
    // The back-off base is 1 s in tests: restarts after about 1, 2 and 4 s.
    let mut restart_seen_at = Vec::new();
    let mut saw_back_off = false;
    let deadline = Instant::now() + Duration::from_secs(40);
    let mut last_count = 0;
    while Instant::now() < deadline && restart_seen_at.len() < 3 {
        if let Ok(pod) = get_pod(&cluster, 0, "crasher").await {
            let count = restart_count(&pod, "c");
            saw_back_off |=
                container_status(&pod, "c")["state"]["waiting"]["reason"] == "CrashLoopBackOff";
            if count > last_count {
                restart_seen_at.push(Instant::now());
                last_count = count;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        saw_back_off,
        "CrashLoopBackOff was shown\n{}",
        cluster.logs()
    );
    assert_eq!(
        restart_seen_at.len(),
        3,
        "three restarts within 40 s\n{}",
        cluster.logs()
    );
    let first_gap = restart_seen_at[1] - restart_seen_at[0];
    let second_gap = restart_seen_at[2] - restart_seen_at[1];
    assert!(
        second_gap > first_gap + Duration::from_millis(700),
        "the delay grows: {first_gap:?} then {second_gap:?}"
    );
    let describe = cluster.cli(&["describe", "pod", "crasher"])?;
    let text = String::from_utf8_lossy(&describe.stdout);
    assert!(
        describe.status.success(),
        "{}",
        String::from_utf8_lossy(&describe.stderr)
    );
    assert!(
        text.contains("restartCount:"),
        "describe shows container states and restarts: {text}"
    );
    assert!(
        text.contains("Started container c"),
        "describe shows events: {text}"
    );
    assert!(
        text.contains("Back-off restarting failed container c in pod crasher"),
        "{text}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a40_a_failing_liveness_probe_restarts_and_a_failing_readiness_probe_unreadies(
) -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let cluster = Cluster::start_with_agents(1).await?;
    let mut client = cluster.objects(0).await?;
    let exec = |command: &str| json!({"exec": {"command": ["sh", "-c", command]}, "periodSeconds": 1, "failureThreshold": 2});
    let mut live = busybox("c", "touch /tmp/alive; sleep 4; rm /tmp/alive; sleep 1000");
    live["livenessProbe"] = exec("test -f /tmp/alive");
    must_apply(
        &mut client,
        &pod(
            "liveness",
            "n1",
            json!({"terminationGracePeriodSeconds": 1, "containers": [live]}),
        ),
    )
    .await?;
    let mut unready = busybox("c", "sleep 1000");
    unready["readinessProbe"] = exec("test -f /tmp/ready");
    must_apply(
        &mut client,
        &pod(
            "readiness",
            "n1",
            json!({"terminationGracePeriodSeconds": 1, "containers": [unready]}),
        ),
    )
    .await?;

    must_wait_for_pod(
        &cluster,
        "liveness",
        Duration::from_secs(40),
        "a restart by the liveness probe",
        |p| restart_count(p, "c") >= 1,
    )
    .await?;
    let pod = must_wait_for_pod(
        &cluster,
        "readiness",
        Duration::from_secs(20),
        "Running",
        |p| p["status"]["phase"] == "Running",
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let pod = get_pod(&cluster, 0, "readiness").await.unwrap_or(pod);
    assert_eq!(pod["status"]["conditions"][3]["type"], "Ready");
    assert_eq!(
        pod["status"]["conditions"][3]["status"], "False",
        "{}",
        pod["status"]
    );
    assert_eq!(container_status(&pod, "c")["ready"], false);
    assert_eq!(
        restart_count(&pod, "c"),
        0,
        "readiness failures do not restart"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a50_deleting_a_pod_removes_its_containers_also_when_its_agent_was_down(
) -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let mut cluster = Cluster::start_with_agents(3).await?;
    let mut client = cluster.objects(0).await?;
    for (name, node) in [("on-n1", "n1"), ("on-n3", "n3")] {
        let spec =
            json!({"terminationGracePeriodSeconds": 2, "containers": [busybox("c", "sleep 1000")]});
        must_apply(&mut client, &pod(name, node, spec)).await?;
    }
    let mut uids = Vec::new();
    for name in ["on-n1", "on-n3"] {
        let running = must_wait_for_pod(&cluster, name, Duration::from_secs(60), "Running", |p| {
            p["status"]["phase"] == "Running"
        })
        .await?;
        uids.push(
            running["metadata"]["uid"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        );
    }
    // A plain delete: gone within the grace period (2 s) plus one reconcile pass.
    let deleted_at = Instant::now();
    client
        .delete(DeleteRequest {
            kind: "pods".into(),
            namespace: "default".into(),
            name: "on-n1".into(),
            resource_version: String::new(),
        })
        .await?;
    let filter = format!("label=io.flotilla.pod.uid={}", uids[0]);
    while !docker_ids(&filter)?.is_empty() {
        assert!(
            deleted_at.elapsed() < Duration::from_secs(8),
            "containers of a deleted pod still exist after 8 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Agent down while the pod is deleted: its restart removes the containers.
    cluster.kill(2)?;
    client
        .delete(DeleteRequest {
            kind: "pods".into(),
            namespace: "default".into(),
            name: "on-n3".into(),
            resource_version: String::new(),
        })
        .await?;
    let filter = format!("label=io.flotilla.pod.uid={}", uids[1]);
    assert!(
        !docker_ids(&filter)?.is_empty(),
        "the pod's containers outlive its agent"
    );
    cluster.restart(2)?;
    let restarted_at = Instant::now();
    while !docker_ids(&filter)?.is_empty() {
        assert!(
            restarted_at.elapsed() < Duration::from_secs(20),
            "the restarted agent did not remove the deleted pod's containers\n{}",
            cluster.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a55_a_restarted_node_removes_the_volume_directories_of_pods_that_are_gone_and_keeps_its_own(
) -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let mut cluster = Cluster::start_with_agents(1).await?;
    let mut client = cluster.objects(0).await?;
    let spec = json!({
        "terminationGracePeriodSeconds": 1,
        "volumes": [{"name": "scratch", "emptyDir": {}}],
        "containers": [{
            "name": "c", "image": "flotilla/busybox:latest",
            "command": ["sh", "-c", "echo kept > /scratch/file; sleep 1000"],
            "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}]
        }]
    });
    must_apply(&mut client, &pod("keeper", "n1", spec)).await?;
    let running = must_wait_for_pod(
        &cluster,
        "keeper",
        Duration::from_secs(60),
        "Running",
        |p| p["status"]["phase"] == "Running",
    )
    .await?;
    let uid = running["metadata"]["uid"]
        .as_str()
        .context("the pod has a uid")?
        .to_string();
    let data_dir = cluster.nodes[0].data_dir.clone();
    let secrets_dir = flotilla_node::agent::default_secret_volumes_dir(&data_dir);
    let own_volumes = data_dir.join("pods").join(&uid);
    assert!(
        own_volumes.is_dir(),
        "the pod's emptyDir is under {own_volumes:?}"
    );
    // What a node killed with its containers leaves behind: the volumes of a pod deleted or
    // replaced meanwhile (a uid no pod has), an emptyDir and a Secret volume.
    cluster.kill(0)?;
    let gone_uid = "5f0e2a9c-1d7b-4c1e-9b8a-7e6d5c4b3a29";
    let left_behind = [
        data_dir.join("pods").join(gone_uid).join("volumes/scratch"),
        secrets_dir.join(gone_uid).join("creds"),
    ];
    for dir in &left_behind {
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("file"), "left behind")?;
    }
    let unrelated = data_dir.join("pods").join("not-a-pod");
    std::fs::create_dir_all(&unrelated)?;
    cluster.restart(0)?;
    let restarted_at = Instant::now();
    while left_behind.iter().any(|dir| dir.exists()) {
        assert!(
            restarted_at.elapsed() < Duration::from_secs(30),
            "the restarted node kept the volumes of a pod that is gone\n{}",
            cluster.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        own_volumes.is_dir(),
        "the volumes of the pod still bound to the node stay"
    );
    assert!(unrelated.is_dir(), "a directory not named by a uid stays");
    must_remove_on_stop(cluster, &format!("label=io.flotilla.pod.uid={uid}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a60_an_image_that_cannot_be_pulled_shows_err_image_pull() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let cluster = Cluster::start_with_agents(1).await?;
    let mut client = cluster.objects(0).await?;
    // A registry on a closed loopback port: the pull fails at once and stays on this machine.
    let spec = json!({"containers": [{"name": "c", "image": "127.0.0.1:1/flotilla/absent:never"}]});
    must_apply(&mut client, &pod("ghost", "n1", spec)).await?;
    let waiting = must_wait_for_pod(
        &cluster,
        "ghost",
        Duration::from_secs(30),
        "ErrImagePull",
        |p| {
            matches!(
                container_status(p, "c")["state"]["waiting"]["reason"].as_str(),
                Some("ErrImagePull" | "ImagePullBackOff")
            )
        },
    )
    .await?;
    let message = container_status(&waiting, "c")["state"]["waiting"]["message"]
        .as_str()
        .unwrap_or_default();
    assert!(
        message.contains("127.0.0.1:1/flotilla/absent:never"),
        "the message names the image: {message}"
    );
    assert_eq!(waiting["status"]["phase"], "Pending");
    must_wait_for_pod(
        &cluster,
        "ghost",
        Duration::from_secs(30),
        "ImagePullBackOff",
        |p| container_status(p, "c")["state"]["waiting"]["reason"] == "ImagePullBackOff",
    )
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a70_logs_previous_logs_and_exec_work_through_a_node_that_is_not_the_pods(
) -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let cluster = Cluster::start_with_agents(3).await?;
    let mut client = cluster.objects(0).await?;
    let script =
        "echo \"run $(cat /tmp/runs 2>/dev/null)\"; echo started > /tmp/runs; sleep 3; exit 1";
    let spec =
        json!({"terminationGracePeriodSeconds": 1, "containers": [busybox("talker", script)]});
    must_apply(&mut client, &pod("talker", "n3", spec)).await?;
    must_wait_for_pod(
        &cluster,
        "talker",
        Duration::from_secs(60),
        "a restart",
        |p| {
            restart_count(p, "talker") >= 1
                && container_status(p, "talker")["state"]["running"].is_object()
        },
    )
    .await?;
    let logs = cluster.cli_via(0, &["logs", "talker"])?;
    assert!(
        logs.status.success(),
        "{}",
        String::from_utf8_lossy(&logs.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&logs.stdout).trim(),
        "run",
        "a fresh container each restart"
    );
    let previous = cluster.cli_via(0, &["logs", "talker", "--previous", "-c", "talker"])?;
    assert!(
        previous.status.success(),
        "{}",
        String::from_utf8_lossy(&previous.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&previous.stdout).trim(), "run");

    let hostname = cluster.cli_via(0, &["exec", "talker", "--", "cat", "/etc/hostname"])?;
    assert!(
        hostname.status.success(),
        "{}",
        String::from_utf8_lossy(&hostname.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&hostname.stdout).trim(), "talker");
    let failing = cluster.cli_via(
        1,
        &["exec", "talker", "--", "sh", "-c", "echo oops >&2; exit 7"],
    )?;
    assert_eq!(
        failing.status.code(),
        Some(7),
        "the command's exit code is the CLI's"
    );
    assert_eq!(String::from_utf8_lossy(&failing.stderr).trim(), "oops");

    // -i passes stdin through; -t gives the command a terminal.
    let mut piped = std::process::Command::new(common::BINARY)
        .arg("--config")
        .arg(cluster.admin_config())
        .args([
            "--server",
            &cluster.nodes[0].address,
            "exec",
            "-i",
            "talker",
            "--",
            "tr",
            "a-z",
            "A-Z",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    if let Some(mut stdin) = piped.stdin.take() {
        std::io::Write::write_all(&mut stdin, b"through stdin\n")?;
    }
    let piped = piped.wait_with_output()?;
    assert_eq!(
        String::from_utf8_lossy(&piped.stdout).trim(),
        "THROUGH STDIN"
    );
    let terminal = cluster.cli_via(0, &["exec", "-t", "talker", "--", "tty"])?;
    assert!(
        String::from_utf8_lossy(&terminal.stdout).starts_with("/dev/pts/"),
        "{terminal:?}"
    );
    Ok(())
}

/// The host bridges carrying the cluster's label, and the FORWARD rules commented with it.
fn bridges_and_rules_of(cluster_id: &str) -> (Vec<String>, usize) {
    let label = format!("io.flotilla.cluster={cluster_id}");
    let rules = std::process::Command::new("iptables")
        .args(["-S", "FORWARD"])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter(|line| line.contains(&label))
                .count()
        })
        .unwrap_or(0);
    (
        flotilla_runtime::host_bridge::labelled_blocking(&label),
        rules,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a80_pods_wired_to_a_host_bridge_get_addresses_of_the_node_subnet_and_reach_each_other(
) -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let cluster = Cluster::start_with_agents_and(1, &["--pod-bridge"]).await?;
    let cluster_id = cluster.cluster_id.clone().context("cluster id")?;
    let mut client = cluster.objects(0).await?;
    let server = json!({
        "terminationGracePeriodSeconds": 0,
        "containers": [{
            "name": "web", "image": "flotilla/busybox:latest",
            "command": ["sh", "-c", "mkdir -p /www && echo hello-from-web > /www/index.html && exec httpd -f -p 8080 -h /www"],
            "readinessProbe": {"httpGet": {"path": "/", "port": 8080}, "periodSeconds": 1}
        }]
    });
    must_apply(&mut client, &pod("web", "n1", server)).await?;
    let caller = json!({"terminationGracePeriodSeconds": 0, "containers": [busybox("caller", "exec sleep 3600")]});
    must_apply(&mut client, &pod("caller", "n1", caller)).await?;
    // Ready through an HTTP probe: the node reaches the pod's address.
    let web = must_wait_for_pod(&cluster, "web", Duration::from_secs(60), "Ready", |p| {
        p["status"]["conditions"].as_array().is_some_and(|c| {
            c.iter()
                .any(|c| c["type"] == "Ready" && c["status"] == "True")
        })
    })
    .await?;
    let caller = must_wait_for_pod(
        &cluster,
        "caller",
        Duration::from_secs(60),
        "Running",
        |p| p["status"]["phase"] == "Running" && p["status"]["podIP"].is_string(),
    )
    .await?;
    let web_ip = web["status"]["podIP"].as_str().context("web's podIP")?;
    let caller_ip = caller["status"]["podIP"]
        .as_str()
        .context("caller's podIP")?;
    assert_ne!(web_ip, caller_ip);

    let node: Value = {
        let reply = client
            .get(GetRequest {
                kind: "nodes".into(),
                namespace: String::new(),
                name: "n1".into(),
                local: false,
            })
            .await?
            .into_inner();
        serde_json::from_slice(&reply.object_json)?
    };
    let pod_cidr = node["spec"]["podCIDR"]
        .as_str()
        .context("the node's podCIDR")?;
    let subnet_prefix = pod_cidr
        .rsplit_once('.')
        .map(|(first_three, _)| format!("{first_three}."))
        .context("a /24")?;
    for address in [web_ip, caller_ip] {
        assert!(
            address.starts_with(&subnet_prefix) && !address.ends_with(".1"),
            "{address} is a host address of {pod_cidr}"
        );
    }

    // No Docker network in the pod: Docker runs none for it (its network is disabled), eth0
    // is ours, and so are its resolv.conf and hosts file.
    assert_eq!(network_modes_of(&caller)?, vec!["none"]);
    assert_eq!(
        inspect_containers_of(&caller, "{{.Config.NetworkDisabled}}")?,
        vec!["true"]
    );
    let eth0 = cluster.cli(&["exec", "caller", "--", "ip", "-4", "addr", "show", "eth0"])?;
    assert!(
        String::from_utf8_lossy(&eth0.stdout).contains(&format!("inet {caller_ip}/24")),
        "{eth0:?}"
    );
    let hosts = cluster.cli(&["exec", "caller", "--", "cat", "/etc/hosts"])?;
    let hosts = String::from_utf8_lossy(&hosts.stdout);
    assert!(
        hosts.contains("127.0.0.1\tlocalhost") && hosts.contains(&format!("{caller_ip}\tcaller")),
        "the caller's /etc/hosts names localhost and the pod at its address: {hosts}"
    );
    let resolv_conf = cluster.cli(&["exec", "caller", "--", "cat", "/etc/resolv.conf"])?;
    let resolv_conf = String::from_utf8_lossy(&resolv_conf.stdout);
    assert!(
        resolv_conf.starts_with("# Written by Flotilla") && !resolv_conf.contains("127.0.0."),
        "the caller's resolv.conf is the node's, without a loopback server: {resolv_conf}"
    );

    // Pod to pod across the bridge.
    // (busybox's wget crashes with -T: no timeout flag; the fetch is local.)
    let fetch = format!("wget -q -O /tmp/page http://{web_ip}:8080/ && cat /tmp/page");
    let fetched = cluster.cli(&["exec", "caller", "--", "sh", "-c", &fetch])?;
    assert_eq!(
        String::from_utf8_lossy(&fetched.stdout).trim(),
        "hello-from-web",
        "{fetched:?}"
    );

    let (bridges, rules) = bridges_and_rules_of(&cluster_id);
    assert_eq!(bridges.len(), 1, "one bridge for the node: {bridges:?}");
    assert_eq!(rules, 2, "FORWARD accepted in and out of the bridge");
    drop(client);
    must_remove_on_stop(cluster, &format!("label=io.flotilla.cluster={cluster_id}"))?;
    assert_eq!(
        bridges_and_rules_of(&cluster_id),
        (Vec::new(), 0),
        "the test cluster removed its bridge and rules"
    );
    Ok(())
}

/// The Docker network mode of the containers of the pod `pod`.
fn network_modes_of(pod: &Value) -> anyhow::Result<Vec<String>> {
    inspect_containers_of(pod, "{{.HostConfig.NetworkMode}}")
}

/// `docker inspect -f format` of each container of the pod `pod`.
fn inspect_containers_of(pod: &Value, format: &str) -> anyhow::Result<Vec<String>> {
    let uid = pod["metadata"]["uid"].as_str().context("uid")?;
    let ids = docker_ids(&format!("label=io.flotilla.pod.uid={uid}"))?;
    let inspected = std::process::Command::new("docker")
        .args(["inspect", "-f", format])
        .args(&ids)
        .output()
        .context("run docker inspect")?;
    Ok(String::from_utf8_lossy(&inspected.stdout)
        .lines()
        .map(str::to_owned)
        .collect())
}

/// A 1-node cluster started with `node_flags`, its id, and its pod `plain` once Running with
/// an address.
async fn cluster_with_a_running_pod(
    node_flags: &[&str],
) -> anyhow::Result<(Cluster, String, Value)> {
    let cluster = Cluster::start_with_agents_and(1, node_flags).await?;
    let cluster_id = cluster.cluster_id.clone().context("cluster id")?;
    let mut client = cluster.objects(0).await?;
    let spec = json!({"terminationGracePeriodSeconds": 0, "containers": [busybox("c", "exec sleep 3600")]});
    must_apply(&mut client, &pod("plain", "n1", spec)).await?;
    let plain = must_wait_for_pod(&cluster, "plain", Duration::from_secs(60), "Running", |p| {
        p["status"]["phase"] == "Running" && p["status"]["podIP"].is_string()
    })
    .await?;
    Ok((cluster, cluster_id, plain))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a85_pods_go_on_a_host_bridge_by_default_where_the_node_can_wire_and_on_a_docker_network_when_asked(
) -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;

    // By default: a host bridge wherever this process (root here, as the node is) could wire.
    let can_wire = flotilla_runtime::host_bridge::WiringHost::of_this_process()
        .unusable_because()
        .is_none();
    let (cluster, cluster_id, plain) = cluster_with_a_running_pod(&[]).await?;
    let modes = network_modes_of(&plain)?;
    let (bridges, _) = bridges_and_rules_of(&cluster_id);
    if can_wire {
        assert_eq!(modes, vec!["none"], "wired by the node, not by Docker");
        assert_eq!(bridges.len(), 1, "the node's bridge: {bridges:?}");
    } else {
        assert_ne!(modes, vec!["none"]);
        assert!(bridges.is_empty(), "{bridges:?}");
    }
    must_remove_on_stop(cluster, &format!("label=io.flotilla.cluster={cluster_id}"))?;

    // Asked for a Docker network: the node's own, labelled with the cluster, and no bridge.
    let (cluster, cluster_id, plain) =
        cluster_with_a_running_pod(&["--docker-pod-network"]).await?;
    let short: String = cluster_id.chars().take(8).collect();
    assert_eq!(
        network_modes_of(&plain)?,
        vec![format!("flotilla-{short}-n1")]
    );
    let networks = std::process::Command::new("docker")
        .args(["network", "ls", "-q", "--filter"])
        .arg(format!("label=io.flotilla.cluster={cluster_id}"))
        .output()
        .context("run docker network ls")?;
    let networks: Vec<String> = String::from_utf8_lossy(&networks.stdout)
        .split_whitespace()
        .map(String::from)
        .collect();
    assert_eq!(networks.len(), 1, "the node's Docker network: {networks:?}");
    assert!(bridges_and_rules_of(&cluster_id).0.is_empty());
    must_remove_on_stop(cluster, &format!("label=io.flotilla.cluster={cluster_id}"))?;
    Ok(())
}
