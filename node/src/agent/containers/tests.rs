use serde_json::json;

use super::*;

fn pod() -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "web", "namespace": "prod", "uid": "0123456789abcdef"},
        "spec": {
            "volumes": [{"name": "scratch", "emptyDir": {}}, {"name": "conf", "configMap": {"name": "settings"}}],
            "containers": [{
                "name": "app", "image": "flotilla/busybox:latest",
                "command": ["sh", "-c"], "args": ["env"],
                "envFrom": [{"configMapRef": {"name": "settings"}, "prefix": "CFG_"}],
                "env": [
                    {"name": "PLAIN", "value": "1"},
                    {"name": "GREETING", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "greeting"}}},
                    {"name": "PASSWORD", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "password"}}},
                    {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                    {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                    {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}
                ],
                "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}, {"name": "conf", "mountPath": "/etc/conf"}],
                "resources": {"limits": {"cpu": "500m", "memory": "64Mi"}}
            }]
        }
    }))
    .expect("pod parses")
}

fn lookup(kind: &str, namespace: &str, name: &str) -> Result<Option<Value>, String> {
    Ok(match (kind, namespace, name) {
        ("ConfigMap", "prod", "settings") => {
            Some(json!({"kind": "ConfigMap", "data": {"greeting": "hello"}}))
        }
        ("Secret", "prod", "creds") => {
            Some(json!({"kind": "Secret", "data": {"password": "czNjcjN0"}}))
        }
        _ => None,
    })
}

#[test]
fn a_container_spec_carries_env_mounts_limits_and_ownership_labels() {
    let pod = pod();
    let ctx = PodContext {
        pod: &pod,
        cluster_id: "c1",
        node_name: "n1",
        pod_ip: Some("10.244.0.7"),
        volumes_dir: PathBuf::from("/data/pods/u/volumes"),
        secrets_dir: PathBuf::from("/dev/shm/flotilla-x/u"),
        service_env: vec![
            ("DB_SERVICE_HOST".into(), "10.96.0.9".into()),
            ("PLAIN".into(), "from a Service".into()),
        ],
    };
    let container = &pod.spec.as_ref().expect("spec").containers[0];
    let spec = container_spec(
        &ctx,
        container,
        2,
        NetworkMode::JoinSandbox {
            sandbox_id: "sandbox".into(),
        },
        &lookup,
    )
    .expect("spec");
    let env: BTreeMap<_, _> = spec.env.iter().cloned().collect();
    assert_eq!(
        env["PLAIN"], "1",
        "the container's own env wins over Service variables"
    );
    assert_eq!(env["DB_SERVICE_HOST"], "10.96.0.9");
    assert_eq!(
        spec.env.iter().filter(|(name, _)| name == "PLAIN").count(),
        1,
        "a variable is set once"
    );
    assert_eq!(env["CFG_greeting"], "hello");
    assert_eq!(env["GREETING"], "hello");
    assert_eq!(env["PASSWORD"], "s3cr3t");
    assert_eq!(env["POD"], "web");
    assert_eq!(env["IP"], "10.244.0.7");
    assert_eq!(env["NODE"], "n1");
    assert_eq!(spec.nano_cpus, Some(500_000_000));
    assert_eq!(spec.memory_limit_bytes, Some(64 * 1024 * 1024));
    assert_eq!(spec.mounts[0].host_path, "/data/pods/u/volumes/scratch");
    assert!(spec.mounts[1].read_only, "configMap volumes are read-only");
    assert_eq!(spec.labels[labels::POD_UID], "0123456789abcdef");
    assert_eq!(spec.labels[labels::ATTEMPT], "2");
    assert_eq!(spec.labels[labels::CONTAINER], "app");
    assert_eq!(spec.name, "flotilla_app_web_prod_01234567_2");
    assert_eq!(
        spec.network,
        NetworkMode::JoinSandbox {
            sandbox_id: "sandbox".into()
        }
    );
}

#[test]
fn a_missing_config_map_key_is_an_error_naming_it() {
    let mut pod = pod();
    pod.spec.as_mut().expect("spec").containers[0].env_from = None;
    let ctx = PodContext {
        pod: &pod,
        cluster_id: "c1",
        node_name: "n1",
        pod_ip: None,
        volumes_dir: PathBuf::from("/tmp"),
        secrets_dir: PathBuf::from("/tmp"),
        service_env: Vec::new(),
    };
    let nothing = |_: &str, _: &str, _: &str| Ok(None);
    let container = &pod.spec.as_ref().expect("spec").containers[0];
    let error = environment(&ctx, container, &nothing).expect_err("missing ConfigMap");
    assert!(
        error.contains("ConfigMap \"settings\" key \"greeting\" not found"),
        "{error}"
    );
}

#[test]
fn a_secret_volume_lives_on_the_tmpfs_dir_and_never_in_the_volumes_dir() {
    let mut pod = pod();
    let spec = pod.spec.as_mut().expect("spec");
    spec.volumes = Some(
        serde_json::from_value(json!([
            {"name": "conf", "configMap": {"name": "settings"}},
            {"name": "creds", "secret": {"secretName": "creds"}}
        ]))
        .expect("volumes"),
    );
    let volumes = tempfile::tempdir().expect("temp dir");
    let secrets = tempfile::tempdir().expect("temp dir");
    let ctx = PodContext {
        pod: &pod,
        cluster_id: "c1",
        node_name: "n1",
        pod_ip: None,
        volumes_dir: volumes.path().to_path_buf(),
        secrets_dir: secrets.path().join("uid"),
        service_env: Vec::new(),
    };
    let sources = volume_sources(&ctx).expect("sources");
    assert_eq!(sources["creds"], (secrets.path().join("uid/creds"), true));
    assert_eq!(sources["conf"], (volumes.path().join("conf"), true));
    materialize_volumes(&ctx, &lookup).expect("materialized");
    assert_eq!(
        std::fs::read(secrets.path().join("uid/creds/password")).expect("the secret file"),
        b"s3cr3t"
    );
    assert!(!volumes.path().join("creds").exists());
    assert_eq!(
        std::fs::read(volumes.path().join("conf/greeting")).expect("the config file"),
        b"hello"
    );
}

#[test]
fn a_secret_that_cannot_be_opened_is_an_error_not_a_missing_secret() {
    let pod = pod();
    let ctx = PodContext {
        pod: &pod,
        cluster_id: "c1",
        node_name: "n1",
        pod_ip: None,
        volumes_dir: PathBuf::from("/tmp"),
        secrets_dir: PathBuf::from("/tmp"),
        service_env: Vec::new(),
    };
    let sealed = |kind: &str, namespace: &str, name: &str| match kind {
        "Secret" => Err("open Secret: wrong key".to_string()),
        _ => lookup(kind, namespace, name),
    };
    let container = &pod.spec.as_ref().expect("spec").containers[0];
    let error = environment(&ctx, container, &sealed).expect_err("unreadable Secret");
    assert!(error.contains("wrong key"), "{error}");
}
