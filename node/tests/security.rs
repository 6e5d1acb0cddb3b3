//! The security of a cluster of real processes: join tokens, mutual TLS on the gRPC port,
//! users and roles, revocation, audit records, CA rotation with running pods.

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context};
use common::{config_map, Cluster, BINARY};
use flotilla_node::encryption::RootKey;
use flotilla_node::security::authority::AuthorityRecord;
use flotilla_pki::{Authority, CredentialsFile, Subject, TlsState};
use flotilla_proto::cluster_client::ClusterClient;
use flotilla_proto::objects_client::ObjectsClient;
use flotilla_proto::raft_client::RaftClient;
use flotilla_proto::{GetRequest, ObjectRequest, RaftMessage, StatusRequest, WatchRequest};
use serde_json::Value;
use tonic::transport::Channel;

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// `flotilla serve --join` of a new node through node 0 with `token_args`; the process is
/// expected to give up by itself (bounded by `kill` after 40 s).
fn try_join(cluster: &Cluster, name: &str, token_args: &[&str]) -> anyhow::Result<Output> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let address = listener.local_addr()?.to_string();
    drop(listener);
    let data_dir = cluster.dir.path().join(name);
    let mut child = Command::new(BINARY)
        .args(["serve", "--name", name, "--listen", &address, "--no-agent"])
        .arg("--data-dir")
        .arg(&data_dir)
        .args(["--join", &cluster.nodes[0].address])
        .args(token_args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(40);
    while child.try_wait()?.is_none() {
        if Instant::now() > deadline {
            child.kill()?;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(child.wait_with_output()?)
}

async fn channel_with(address: &str, tls: Arc<rustls::ClientConfig>) -> anyhow::Result<Channel> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{address}"))?
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(10));
    Ok(flotilla_pki::transport::connect(&endpoint, tls).await?)
}

/// A `Cluster.Status` call with `tls`: the error message when it is refused.
async fn status_with(address: &str, tls: Arc<rustls::ClientConfig>) -> Result<(), String> {
    let channel = channel_with(address, tls)
        .await
        .map_err(|e| format!("{e:#}"))?;
    ClusterClient::new(channel)
        .status(StatusRequest { local: true })
        .await
        .map(|_| ())
        .map_err(|status| format!("{status}"))
}

/// The cluster's CA record, read as the admin and opened with node 0's root key.
async fn authority_record(cluster: &Cluster) -> anyhow::Result<AuthorityRecord> {
    let reply = cluster
        .objects(0)
        .await?
        .get(GetRequest {
            kind: "ConfigMap".into(),
            namespace: "kube-system".into(),
            name: "flotilla-ca".into(),
            local: false,
        })
        .await?
        .into_inner();
    let object: Value = serde_json::from_slice(&reply.object_json)?;
    let root_key = RootKey::load(&cluster.nodes[0].data_dir)?.context("node 0's root key")?;
    Ok(AuthorityRecord::from_object(&object, &root_key)?)
}

fn client_tls(
    authorities_pem: &str,
    certificate_pem: &str,
    key_pem: &str,
) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    Ok(CredentialsFile {
        cluster_id: String::new(),
        user: String::new(),
        servers: Vec::new(),
        certificate_authorities: authorities_pem.into(),
        certificate: certificate_pem.into(),
        key: key_pem.into(),
    }
    .client_tls()?)
}

#[tokio::test(flavor = "multi_thread")]
async fn joining_without_a_token_or_with_a_wrong_or_rotated_out_one_is_refused_and_the_current_one_joins(
) -> anyhow::Result<()> {
    let mut cluster = Cluster::start(1).await?;
    let token = cluster.token()?;

    let without = try_join(&cluster, "no-token", &[])?;
    assert!(!without.status.success());
    assert!(text(&without).contains("--token"), "{}", text(&without));

    let (prefix, secret) = token.rsplit_once('-').context("token shape")?;
    let wrong_secret = format!("{prefix}-{}", secret.chars().rev().collect::<String>());
    let wrong = try_join(&cluster, "wrong-secret", &["--token", &wrong_secret])?;
    assert!(!wrong.status.success());
    assert!(
        text(&wrong).contains("join token is not valid"),
        "{}",
        text(&wrong)
    );

    let other_ca = format!("FLOTILLA-1-{}-{secret}", "ab".repeat(32));
    let foreign = try_join(&cluster, "wrong-ca", &["--token", &other_ca])?;
    assert!(!foreign.status.success());
    assert!(
        text(&foreign).contains("not the one the join token names"),
        "{}",
        text(&foreign)
    );

    let rotated = cluster.cli(&["cluster", "join-token", "--rotate"])?;
    assert!(rotated.status.success(), "{}", text(&rotated));
    let new_token = String::from_utf8_lossy(&rotated.stdout).trim().to_string();
    assert_ne!(new_token, token);
    let old = try_join(&cluster, "old-token", &["--token", &token])?;
    assert!(!old.status.success());
    assert!(
        text(&old).contains("join token is not valid"),
        "{}",
        text(&old)
    );

    cluster.join_token = Some(new_token);
    cluster.add_node(&[])?;
    cluster
        .must_wait_for(
            |s| {
                let members = s["members"].as_array().cloned().unwrap_or_default();
                members.len() == 2 && members.iter().all(|m| m["healthy"] == true)
            },
            "the node with the current token to join",
        )
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_with_a_foreign_ca_an_expired_certificate_or_none_is_refused_and_the_node_keeps_serving(
) -> anyhow::Result<()> {
    let cluster = Cluster::start(1).await?;
    let address = cluster.nodes[0].address.clone();
    let record = authority_record(&cluster).await?;
    let cluster_ca = record.trusted_pem();
    let now = SystemTime::now();

    let foreign = Authority::generate("someone else's CA", now)?;
    for subject in [Subject::User("admin".into()), Subject::Node("n1".into())] {
        let issued = foreign.issue(&subject, now, Duration::from_secs(3600))?;
        let refused = status_with(
            &address,
            client_tls(&cluster_ca, &issued.chain_pem, &issued.key_pem)?,
        )
        .await;
        assert!(
            refused.is_err(),
            "a {subject:?} from a foreign CA was served"
        );
    }

    let signing = record.signing_authority()?;
    for subject in [Subject::User("admin".into()), Subject::Node("n1".into())] {
        let expired = signing.issue_between(
            &subject,
            now - Duration::from_secs(7200),
            now - Duration::from_secs(3600),
        )?;
        let refused = status_with(
            &address,
            client_tls(&cluster_ca, &expired.chain_pem, &expired.key_pem)?,
        )
        .await;
        assert!(
            refused.is_err(),
            "an expired {subject:?} certificate was served"
        );
    }

    let anonymous = Arc::new(
        TlsState::new(record.trusted_certificates()?, None)?
            .client_config(&[flotilla_pki::transport::GRPC_ALPN])?,
    );
    let refused = status_with(&address, anonymous.clone()).await;
    assert!(
        refused
            .as_ref()
            .is_err_and(|e| e.contains("client certificate")),
        "{refused:?}"
    );
    let channel = channel_with(&address, anonymous).await?;
    let raft = RaftClient::new(channel)
        .vote(RaftMessage {
            payload_json: Vec::new(),
        })
        .await
        .expect_err("Raft without a certificate");
    assert_eq!(raft.code(), tonic::Code::Unauthenticated, "{raft}");

    // A user is not a node: the Raft service refuses even the admin.
    let admin_raft = RaftClient::new(cluster.channel(0).await?)
        .vote(RaftMessage {
            payload_json: Vec::new(),
        })
        .await
        .expect_err("Raft as a user");
    assert_eq!(
        admin_raft.code(),
        tonic::Code::PermissionDenied,
        "{admin_raft}"
    );

    let plain = tonic::transport::Endpoint::from_shared(format!("http://{address}"))?
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(5))
        .connect()
        .await;
    if let Ok(channel) = plain {
        assert!(ClusterClient::new(channel)
            .status(StatusRequest { local: true })
            .await
            .is_err());
    }

    status_with(&address, cluster.admin_tls()?)
        .await
        .map_err(anyhow::Error::msg)
        .context("the admin after the refusals")?;
    Ok(())
}

fn cli_as(cluster: &Cluster, config: &Path, args: &[&str]) -> anyhow::Result<Output> {
    Ok(Command::new(BINARY)
        .args(["--server", &cluster.addresses().join(",")])
        .arg("--config")
        .arg(config)
        .args(args)
        .output()?)
}

fn write_manifest(cluster: &Cluster, name: &str, yaml: &str) -> anyhow::Result<String> {
    let path = cluster.dir.path().join(name);
    std::fs::write(&path, yaml)?;
    Ok(path.display().to_string())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_viewer_reads_and_watches_but_cannot_write_and_an_editor_of_one_namespace_cannot_touch_another(
) -> anyhow::Result<()> {
    let cluster = Cluster::start(1).await?;
    let mut admin = cluster.objects(0).await?;
    for namespace in ["team-a", "team-b"] {
        let object = serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}});
        admin
            .create(ObjectRequest {
                object_json: serde_json::to_vec(&object)?,
            })
            .await?;
    }
    common::must_apply(&mut admin, &config_map("existing", "1")).await?;

    let viewer = cluster.dir.path().join("viewer.json");
    let created = Command::new(BINARY)
        .args(["--server", &cluster.addresses().join(",")])
        .arg("--config")
        .arg(cluster.admin_config())
        .args(["auth", "create-user", "viewer", "--role", "view", "-o"])
        .arg(&viewer)
        .output()?;
    assert!(created.status.success(), "{}", text(&created));

    let read = cli_as(&cluster, &viewer, &["get", "configmaps"])?;
    assert!(read.status.success(), "{}", text(&read));
    assert!(text(&read).contains("existing"));
    let credentials = CredentialsFile::read(&viewer)?;
    let mut watcher = ObjectsClient::new(
        channel_with(&cluster.nodes[0].address, credentials.client_tls()?).await?,
    );
    let watch = watcher
        .watch(WatchRequest {
            kind: "ConfigMap".into(),
            namespace: "default".into(),
            ..Default::default()
        })
        .await;
    assert!(watch.is_ok(), "a viewer may watch: {watch:?}");
    let create = watcher
        .create(ObjectRequest {
            object_json: serde_json::to_vec(&config_map("by-viewer", "1"))?,
        })
        .await
        .expect_err("a viewer cannot create");
    assert_eq!(create.code(), tonic::Code::PermissionDenied);
    assert!(
        create.message().contains(
            "user \"viewer\" (role view) cannot create configmaps in namespace \"default\""
        ),
        "{}",
        create.message()
    );

    let manifest = write_manifest(
        &cluster,
        "cm.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: written}\ndata: {v: '1'}\n",
    )?;
    for args in [
        vec!["apply", "-f", manifest.as_str()],
        vec!["delete", "configmap", "existing"],
    ] {
        let denied = cli_as(&cluster, &viewer, &args)?;
        assert!(!denied.status.success(), "{args:?} as a viewer succeeded");
        let message = text(&denied);
        assert!(
            message.contains("forbidden")
                && message.contains("\"viewer\"")
                && message.contains("configmaps")
                && message.contains("\"default\""),
            "{args:?}: {message}"
        );
    }
    let secrets = cli_as(&cluster, &viewer, &["get", "secrets"])?;
    assert!(!secrets.status.success(), "a viewer read Secrets");

    let editor = cluster.dir.path().join("editor.json");
    let created = Command::new(BINARY)
        .args(["--server", &cluster.addresses().join(",")])
        .arg("--config")
        .arg(cluster.admin_config())
        .args([
            "auth",
            "create-user",
            "editor",
            "--role",
            "edit",
            "-n",
            "team-a",
            "-o",
        ])
        .arg(&editor)
        .output()?;
    assert!(created.status.success(), "{}", text(&created));
    let in_namespace = |namespace: &str| {
        write_manifest(
            &cluster,
            &format!("cm-{namespace}.yaml"),
            &format!(
                "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: written, namespace: {namespace}}}\ndata: {{v: '1'}}\n"
            ),
        )
    };
    let manifest_a = in_namespace("team-a")?;
    let manifest_b = in_namespace("team-b")?;
    let in_a = cli_as(&cluster, &editor, &["apply", "-f", &manifest_a])?;
    assert!(in_a.status.success(), "{}", text(&in_a));
    for args in [
        vec!["apply", "-f", manifest_b.as_str()],
        vec!["get", "configmaps", "-n", "team-b"],
        vec!["delete", "configmap", "written", "-n", "team-b"],
    ] {
        let denied = cli_as(&cluster, &editor, &args)?;
        assert!(
            !denied.status.success(),
            "{args:?} as team-a's editor succeeded"
        );
        let message = text(&denied);
        assert!(
            message.contains("forbidden") && message.contains("\"team-b\""),
            "{args:?}: {message}"
        );
    }

    let revoked = cluster.cli(&["auth", "revoke", "viewer"])?;
    assert!(revoked.status.success(), "{}", text(&revoked));
    let after = cli_as(&cluster, &viewer, &["get", "configmaps"])?;
    assert!(!after.status.success());
    assert!(text(&after).contains("revoked"), "{}", text(&after));

    let audit = std::fs::read_to_string(cluster.nodes[0].data_dir.join("audit.log"))?;
    let records: Vec<Value> = audit
        .lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect();
    let has = |user: &str, verb: &str, result: &str| {
        records.iter().any(|r| {
            r["user"] == user
                && r["verb"] == verb
                && r["result"].as_str().is_some_and(|s| s.starts_with(result))
        })
    };
    assert!(has("viewer", "delete", "denied"), "{audit}");
    assert!(has("editor", "update", "allowed"), "{audit}");
    assert!(has("admin", "create", "allowed"), "{audit}");
    assert!(
        !audit.contains("\"v\""),
        "audit records carry no object content"
    );
    Ok(())
}

/// The ids of the running containers of this cluster's pods.
fn pod_containers(cluster: &Cluster) -> anyhow::Result<Vec<String>> {
    let cluster_id = cluster.cluster_id.clone().context("cluster id")?;
    let output = Command::new("docker")
        .args([
            "ps",
            "-q",
            "--no-trunc",
            "--filter",
            &format!("label=io.flotilla.cluster={cluster_id}"),
        ])
        .output()?;
    let mut ids: Vec<String> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    ids.sort();
    Ok(ids)
}

#[tokio::test(flavor = "multi_thread")]
async fn rotating_the_ca_restarts_nothing_moves_every_node_to_the_new_ca_and_then_refuses_the_old(
) -> anyhow::Result<()> {
    let cluster = Cluster::start_with_agents(3).await?;
    let manifest = write_manifest(
        &cluster,
        "sleepers.yaml",
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: sleepers}\nspec:\n  replicas: 3\n  \
         selector: {matchLabels: {app: sleepers}}\n  template:\n    metadata: {labels: {app: sleepers}}\n    \
         spec:\n      containers:\n      - {name: sleep, image: 'flotilla/busybox:latest', \
         imagePullPolicy: Never, command: [sleep, '3600']}\n",
    )?;
    let applied = cluster.cli(&["apply", "-f", &manifest])?;
    assert!(applied.status.success(), "{}", text(&applied));
    let deadline = Instant::now() + Duration::from_secs(90);
    let before = loop {
        let containers = pod_containers(&cluster)?;
        // Three pods of one container each (such a pod needs no sandbox).
        if containers.len() >= 3 {
            break containers;
        }
        if Instant::now() > deadline {
            bail!("the pods did not start: {containers:?}\n{}", cluster.logs());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let old_record = authority_record(&cluster).await?;
    let old_admin = cluster.dir.path().join("old-admin.json");
    std::fs::copy(cluster.admin_config(), &old_admin)?;
    let old_token = cluster.cli(&["cluster", "join-token"])?;

    let rotated = cluster.cli(&["cluster", "rotate-ca"])?;
    assert!(
        rotated.status.success(),
        "{}\n{}",
        text(&rotated),
        cluster.logs()
    );

    let new_record = authority_record(&cluster).await?;
    assert_eq!(new_record.authorities.len(), 1);
    assert_ne!(new_record.authorities, old_record.authorities);
    let new_fingerprint = new_record.signing_authority()?.fingerprint()?.to_string();
    let status = cluster.status().await?;
    for idx in 0..3 {
        let channel = cluster.channel(idx).await?;
        let reply = ClusterClient::new(channel)
            .status(StatusRequest { local: true })
            .await?
            .into_inner();
        let local: Value = serde_json::from_slice(&reply.status_json)?;
        assert_eq!(
            local["tls"]["trusted"],
            serde_json::json!([new_fingerprint]),
            "{local}"
        );
        assert_eq!(
            local["tls"]["certificate_issuer"],
            new_fingerprint.as_str(),
            "{local}"
        );
    }
    assert_eq!(status["members"].as_array().map(Vec::len), Some(3));

    assert_eq!(
        pod_containers(&cluster)?,
        before,
        "a container was restarted"
    );
    let old = Command::new(BINARY)
        .args(["--server", &cluster.addresses().join(",")])
        .arg("--config")
        .arg(&old_admin)
        .args(["get", "pods"])
        .output()?;
    assert!(!old.status.success(), "the old CA's credentials still work");
    let old_tls = CredentialsFile::read(&old_admin)?.client_tls()?;
    assert!(status_with(&cluster.nodes[1].address, old_tls)
        .await
        .is_err());
    let token = cluster.cli(&["cluster", "join-token"])?;
    assert_ne!(
        token.stdout, old_token.stdout,
        "the join token names the new CA"
    );
    let pods = cluster.cli(&["get", "pods"])?;
    assert!(pods.status.success(), "{}", text(&pods));
    Ok(())
}
