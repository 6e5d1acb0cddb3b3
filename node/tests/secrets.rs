//! Secrets encrypted at rest: no Secret value in any file of any node's data dir (Raft log,
//! snapshots, state machine), yet pods and clients see it; rotation re-encrypts. The pod test
//! needs Docker and `scripts/build-images.sh`.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use base64::Engine;
use common::{must_apply, Cluster};
use flotilla_proto::{GetRequest, ListRequest, ObjectRequest, WatchRequest};
use serde_json::{json, Value};

/// Docker and the CPU are shared: these tests run one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn b64(text: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(text)
}

/// 32 random characters.
fn marker() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

fn secret(name: &str, data: Value, string_data: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": name, "namespace": "default"},
        "data": data, "stringData": string_data,
    })
}

/// Every file under `dir`, recursively.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            match entry.file_type() {
                Ok(kind) if kind.is_dir() => pending.push(path),
                Ok(kind) if kind.is_file() => files.push(path),
                _ => {}
            }
        }
    }
    files
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle)
}

/// The files under `dirs` holding any of `needles`, byte for byte.
fn files_holding(dirs: &[&Path], needles: &[&str]) -> Vec<String> {
    let mut found = Vec::new();
    for dir in dirs {
        for file in files_under(dir) {
            let Ok(bytes) = std::fs::read(&file) else {
                continue;
            };
            for needle in needles {
                if contains(&bytes, needle.as_bytes()) {
                    found.push(format!("{} holds {needle}", file.display()));
                }
            }
        }
    }
    found
}

/// Removes the nodes' Secret volume directories (on /dev/shm) when the test ends, also on
/// failure: the nodes are killed before their agents could remove them.
struct SecretVolumeDirs(Vec<PathBuf>);

impl Drop for SecretVolumeDirs {
    fn drop(&mut self) {
        for dir in &self.0 {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

async fn get(
    cluster: &Cluster,
    idx: usize,
    kind: &str,
    name: &str,
    local: bool,
) -> anyhow::Result<Value> {
    let reply = cluster
        .objects(idx)
        .await?
        .get(GetRequest {
            kind: kind.into(),
            namespace: "default".into(),
            name: name.into(),
            local,
        })
        .await?
        .into_inner();
    Ok(serde_json::from_slice(&reply.object_json)?)
}

/// Polls until the pod's log holds every one of `needles`.
async fn must_wait_for_log(
    cluster: &Cluster,
    pod: &str,
    needles: &[String],
) -> anyhow::Result<String> {
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut last = String::new();
    while Instant::now() < deadline {
        let output = cluster.cli(&["logs", pod])?;
        last = String::from_utf8_lossy(&output.stdout).into_owned();
        if needles.iter().all(|n| last.contains(n.as_str())) {
            return Ok(last);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let status = get(cluster, 0, "pods", pod, false)
        .await
        .map(|p| p["status"].clone())
        .unwrap_or_default();
    bail!(
        "pod {pod}: its log never showed the Secret; last log: {last:?}; status: {status}\n{}",
        cluster.logs()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_value_is_in_no_file_of_any_data_dir_yet_a_pod_sees_it() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let cluster = Cluster::start_with_agents(3).await?;
    let _volumes = SecretVolumeDirs(
        cluster
            .nodes
            .iter()
            .map(|n| flotilla_node::agent::default_secret_volumes_dir(&n.data_dir))
            .collect(),
    );
    let mut client = cluster.objects(0).await?;
    let (in_data, in_string_data, in_config_map) = (marker(), marker(), marker());
    must_apply(
        &mut client,
        &secret(
            "creds",
            json!({"password": b64(&in_data)}),
            json!({"token": in_string_data}),
        ),
    )
    .await?;
    // Applied after the Secret: a snapshot that holds it holds the Secret too. It also shows
    // that the search below finds a value stored in the clear.
    must_apply(&mut client, &common::config_map("control", &in_config_map)).await?;

    // A pod on n2 reads the Secret by env, envFrom and a secret volume.
    let pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "reader", "namespace": "default"},
        "spec": {
            "nodeName": "n2",
            "terminationGracePeriodSeconds": 1,
            "volumes": [{"name": "creds", "secret": {"secretName": "creds"}}],
            "containers": [{
                "name": "c", "image": "flotilla/busybox:latest",
                "command": ["sh", "-c", "echo \"env=$PASSWORD from=$S_token\"; echo \"file=$(cat /etc/creds/token) $(cat /etc/creds/password)\"; sleep 3600"],
                "env": [{"name": "PASSWORD", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "password"}}}],
                "envFrom": [{"secretRef": {"name": "creds"}, "prefix": "S_"}],
                "volumeMounts": [{"name": "creds", "mountPath": "/etc/creds"}]
            }]
        }
    });
    must_apply(&mut client, &pod).await?;
    let log = must_wait_for_log(
        &cluster,
        "reader",
        &[
            format!("env={in_data} from={in_string_data}"),
            format!("file={in_string_data} {in_data}"),
        ],
    )
    .await?;
    assert!(log.contains(&in_data), "{log}");

    // The secret volume is on the tmpfs of the pod's node, and only there.
    let uid = get(&cluster, 0, "pods", "reader", false).await?["metadata"]["uid"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    for (idx, node) in cluster.nodes.iter().enumerate() {
        let file = flotilla_node::agent::default_secret_volumes_dir(&node.data_dir)
            .join(&uid)
            .join("creds/token");
        assert_eq!(
            file.exists(),
            idx == 1,
            "{} on {}",
            file.display(),
            node.name
        );
    }

    // Clients see the plaintext: the CLI, get, list.
    let output = cluster.cli(&["get", "secret", "creds", "-o", "json"])?;
    assert!(output.status.success(), "{output:?}");
    let shown: Value = serde_json::from_slice(&output.stdout).context("get -o json")?;
    assert_eq!(
        shown["data"],
        json!({"password": b64(&in_data), "token": b64(&in_string_data)})
    );
    assert!(
        shown.get("sealedData").is_none() && shown.get("stringData").is_none(),
        "{shown}"
    );
    let listed = cluster
        .objects(2)
        .await?
        .list(ListRequest {
            kind: "secrets".into(),
            namespace: "default".into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    let item: Value = serde_json::from_slice(listed.items_json.first().context("one Secret")?)?;
    assert_eq!(item["data"], shown["data"]);

    // Enough writes for every node to snapshot (every 200 entries) past the Secret.
    for i in 0..250 {
        must_apply(
            &mut client,
            &common::config_map(&format!("filler-{i}"), "x"),
        )
        .await?;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let snapshotted = cluster.nodes.iter().all(|node| {
            std::fs::read(node.data_dir.join("snapshots/current.snapshot"))
                .is_ok_and(|bytes| contains(&bytes, in_config_map.as_bytes()))
        });
        if snapshotted {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "not every node built a snapshot holding the Secret\n{}",
                cluster.logs()
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    let data_dirs: Vec<&Path> = cluster.nodes.iter().map(|n| n.data_dir.as_path()).collect();
    for dir in &data_dirs {
        assert!(
            !files_holding(&[dir], &[&in_config_map]).is_empty(),
            "the search finds a ConfigMap value stored in the clear under {}",
            dir.display()
        );
        let snapshot = std::fs::read(dir.join("snapshots/current.snapshot"))?;
        assert!(
            contains(&snapshot, b"sealedData"),
            "the snapshot holds the sealed Secret"
        );
    }
    let secrets = [
        in_data.clone(),
        b64(&in_data),
        in_string_data.clone(),
        b64(&in_string_data),
    ];
    let needles: Vec<&str> = secrets.iter().map(String::as_str).collect();
    let leaks = files_holding(&data_dirs, &needles);
    assert!(leaks.is_empty(), "Secret values on disk: {leaks:#?}");
    // Nor in the nodes' logs.
    let leaks = files_holding(&[cluster.dir.path()], &needles);
    assert!(
        leaks.is_empty(),
        "Secret values in the logs or data dirs: {leaks:#?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotating_the_encryption_key_keeps_secrets_readable_and_re_encrypts_them(
) -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let mut cluster = Cluster::start(3).await?;
    let mut client = cluster.objects(0).await?;
    let values: Vec<String> = (0..3).map(|_| marker()).collect();
    for (i, value) in values.iter().enumerate() {
        must_apply(
            &mut client,
            &secret(&format!("s{i}"), json!({}), json!({"v": value})),
        )
        .await?;
    }
    // An apply that changes nothing stays unchanged, though sealing takes a fresh nonce.
    let again = client
        .apply(ObjectRequest {
            object_json: serde_json::to_vec(&secret(
                "s0",
                json!({"v": b64(&values[0])}),
                json!({}),
            ))?,
        })
        .await?
        .into_inner();
    assert_eq!(again.outcome, "unchanged");

    // Watches see the plaintext too.
    let mut watch = cluster
        .objects(1)
        .await?
        .watch(WatchRequest {
            kind: "secrets".into(),
            namespace: "default".into(),
            resource_version: "1".into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(10), watch.message())
        .await
        .context("a watch event")??
        .context("the watch is open")?;
    let watched: Value = serde_json::from_slice(&first.object_json)?;
    assert_eq!(watched["data"]["v"], json!(b64(&values[0])), "{watched}");
    drop(watch);

    let keys_before = get_keys(&cluster).await?;
    let versions_before: Vec<String> = versions(&cluster).await?;
    let output = cluster.cli(&["cluster", "rotate-encryption-key"])?;
    let printed = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(output.status.success(), "{output:?}\n{}", cluster.logs());
    assert!(printed.contains("3 Secret(s) re-encrypted"), "{printed}");
    let keys_after = get_keys(&cluster).await?;
    let (before, after) = (&keys_before["current"], &keys_after["current"]);
    assert_ne!(before, after, "a new data key is current");
    assert!(printed.contains(after.as_str().unwrap_or("?")), "{printed}");
    assert_eq!(
        keys_after.as_object().map(|d| d.len()),
        Some(2),
        "only the current key is left: {keys_after}"
    );
    let versions_after = versions(&cluster).await?;
    for (old, new) in versions_before.iter().zip(&versions_after) {
        assert!(
            new.parse::<u64>()? > old.parse::<u64>()?,
            "every Secret was rewritten"
        );
    }

    // A restarted node has no key cached: it unwraps the new key from its own store.
    cluster.stop(2)?;
    cluster.restart(2)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    for (i, value) in values.iter().enumerate() {
        let read = loop {
            match get(&cluster, 2, "secrets", &format!("s{i}"), true).await {
                Ok(secret) if secret["metadata"]["resourceVersion"] == versions_after[i] => {
                    break secret
                }
                _ if Instant::now() > deadline => {
                    bail!("node 3 never served s{i}\n{}", cluster.logs())
                }
                _ => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        };
        assert_eq!(read["data"]["v"], json!(b64(value)), "{read}");
    }

    // Clients cannot touch the sealed keys.
    let status = client
        .apply(ObjectRequest {
            object_json: serde_json::to_vec(&json!({
                "apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": "flotilla-encryption-keys", "namespace": "kube-system"},
                "data": {"current": "mine"}
            }))?,
        })
        .await
        .expect_err("the keys ConfigMap is the nodes' own");
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status}");
    Ok(())
}

/// The `data` of the keys ConfigMap.
async fn get_keys(cluster: &Cluster) -> anyhow::Result<Value> {
    let reply = cluster
        .objects(0)
        .await?
        .get(GetRequest {
            kind: "configmaps".into(),
            namespace: "kube-system".into(),
            name: "flotilla-encryption-keys".into(),
            local: false,
        })
        .await?
        .into_inner();
    let config_map: Value = serde_json::from_slice(&reply.object_json)?;
    Ok(config_map["data"].clone())
}

/// The resourceVersions of Secrets s0, s1 and s2.
async fn versions(cluster: &Cluster) -> anyhow::Result<Vec<String>> {
    let mut versions = Vec::new();
    for i in 0..3 {
        let secret = get(cluster, 0, "secrets", &format!("s{i}"), false).await?;
        versions.push(
            secret["metadata"]["resourceVersion"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        );
    }
    Ok(versions)
}
