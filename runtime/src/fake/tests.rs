use super::*;
use futures::TryStreamExt;

const IMAGE: &str = "flotilla/busybox:latest";

fn strings(words: &[&str]) -> Vec<String> {
    words.iter().map(|word| (*word).to_owned()).collect()
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(key, value)| ((*key).to_owned(), (*value).to_owned()))
        .collect()
}

fn network() -> NetworkSpec {
    NetworkSpec {
        name: "pods".to_owned(),
        subnet: "10.244.1.0/24".to_owned(),
        gateway: Some("10.244.1.2".to_owned()),
        labels: BTreeMap::new(),
        inhibit_host_address: false,
        host_bridge: false,
    }
}

fn sandbox(name: &str, pod: &str) -> ContainerSpec {
    ContainerSpec {
        name: name.to_owned(),
        image: IMAGE.to_owned(),
        entrypoint: None,
        args: Some(strings(&["sleep", "3600"])),
        working_dir: None,
        env: Vec::new(),
        labels: labels(&[("pod", pod), ("role", "sandbox")]),
        mounts: Vec::new(),
        memory_limit_bytes: None,
        nano_cpus: None,
        network: NetworkMode::OwnNamespace {
            network: "pods".to_owned(),
            hostname: pod.to_owned(),
            dns_servers: Vec::new(),
            dns_search: Vec::new(),
            dns_options: Vec::new(),
            ipv4_address: None,
        },
    }
}

fn app(name: &str, pod: &str, sandbox_id: &str) -> ContainerSpec {
    ContainerSpec {
        labels: labels(&[("pod", pod), ("role", "app")]),
        network: NetworkMode::JoinSandbox {
            sandbox_id: sandbox_id.to_owned(),
        },
        ..sandbox(name, pod)
    }
}

/// A runtime with the image and the network, and a running sandbox `pod-a`.
async fn with_running_sandbox() -> (FakeRuntime, String) {
    let runtime = FakeRuntime::new();
    runtime.set_image_present(IMAGE);
    runtime.ensure_network(&network()).await.unwrap();
    let id = runtime
        .create_container(&sandbox("pod-a", "a"))
        .await
        .unwrap();
    runtime.start_container(&id).await.unwrap();
    (runtime, id)
}

#[tokio::test]
async fn ids_are_handed_out_in_creation_order() {
    let (runtime, first) = with_running_sandbox().await;
    let second = runtime
        .create_container(&app("pod-a-web", "a", &first))
        .await
        .unwrap();
    assert_eq!(first, "fa0000000001");
    assert_eq!(second, "fa0000000002");
}

#[tokio::test]
async fn a_container_moves_from_created_to_running_to_exited() {
    let runtime = FakeRuntime::new();
    runtime.set_image_present(IMAGE);
    runtime.ensure_network(&network()).await.unwrap();
    let id = runtime
        .create_container(&sandbox("pod-a", "a"))
        .await
        .unwrap();
    assert_eq!(
        runtime.inspect_container(&id).await.unwrap().state,
        ContainerState::Created
    );

    runtime.start_container(&id).await.unwrap();
    let running = runtime.inspect_container("pod-a").await.unwrap();
    let ContainerState::Running { started_at } = running.state else {
        panic!("not running: {running:?}");
    };
    assert!(
        started_at.parse::<jiff::Timestamp>().is_ok(),
        "{started_at} is RFC 3339"
    );
    assert_eq!(
        running.ip_address.as_deref(),
        Some("10.244.1.3"),
        "the gateway .2 is skipped"
    );

    runtime.set_exit(&id, 3).unwrap();
    let exited = runtime.inspect_container(&id).await.unwrap();
    assert!(
        matches!(&exited.state, ContainerState::Exited { exit_code: 3, started_at: s, oom_killed: false, .. } if *s == started_at),
        "{exited:?}"
    );
    assert_eq!(exited.ip_address, None);
    assert!(
        runtime.set_exit(&id, 1).is_err(),
        "an exited container cannot exit again"
    );

    runtime.start_container(&id).await.unwrap();
    runtime
        .stop_container(&id, Duration::from_secs(1))
        .await
        .unwrap();
    let stopped = runtime.inspect_container(&id).await.unwrap();
    assert!(
        matches!(
            stopped.state,
            ContainerState::Exited {
                exit_code: STOPPED_EXIT_CODE,
                ..
            }
        ),
        "{stopped:?}"
    );
}

#[tokio::test]
async fn an_oom_kill_is_reported_as_such() {
    let (runtime, id) = with_running_sandbox().await;
    runtime.set_oom_killed(&id).unwrap();
    let info = runtime.inspect_container(&id).await.unwrap();
    assert!(
        matches!(
            info.state,
            ContainerState::Exited {
                exit_code: OOM_EXIT_CODE,
                oom_killed: true,
                ..
            }
        ),
        "{info:?}"
    );
}

#[tokio::test]
async fn list_returns_the_containers_carrying_every_label_asked_for() {
    let (runtime, sandbox_id) = with_running_sandbox().await;
    runtime
        .create_container(&app("pod-a-web", "a", &sandbox_id))
        .await
        .unwrap();
    let other = runtime
        .create_container(&sandbox("pod-b", "b"))
        .await
        .unwrap();

    let names =
        |containers: Vec<ContainerInfo>| containers.into_iter().map(|c| c.name).collect::<Vec<_>>();
    assert_eq!(
        names(runtime.list_containers(&BTreeMap::new()).await.unwrap()),
        ["pod-a", "pod-a-web", "pod-b"]
    );
    assert_eq!(
        names(
            runtime
                .list_containers(&labels(&[("pod", "a")]))
                .await
                .unwrap()
        ),
        ["pod-a", "pod-a-web"]
    );
    assert_eq!(
        names(
            runtime
                .list_containers(&labels(&[("pod", "a"), ("role", "app")]))
                .await
                .unwrap()
        ),
        ["pod-a-web"]
    );
    assert!(runtime
        .list_containers(&labels(&[("pod", "c")]))
        .await
        .unwrap()
        .is_empty());

    runtime.remove_container(&other).await.unwrap();
    runtime.remove_container(&other).await.unwrap();
    assert!(runtime
        .list_containers(&labels(&[("pod", "b")]))
        .await
        .unwrap()
        .is_empty());
    assert!(matches!(
        runtime.inspect_container(&other).await,
        Err(RuntimeError::NotFound { .. })
    ));
}

#[tokio::test]
async fn create_refuses_a_taken_name_an_absent_image_and_an_unknown_network() {
    let (runtime, _) = with_running_sandbox().await;
    assert!(matches!(
        runtime.create_container(&sandbox("pod-a", "a")).await,
        Err(RuntimeError::Engine { .. })
    ));

    let absent_image = ContainerSpec {
        image: "flotilla/absent:never".to_owned(),
        ..sandbox("pod-x", "x")
    };
    assert!(matches!(
        runtime.create_container(&absent_image).await,
        Err(RuntimeError::ImageNotPresent { .. })
    ));

    let mut unknown_network = sandbox("pod-y", "y");
    unknown_network.network = NetworkMode::OwnNamespace {
        network: "nowhere".to_owned(),
        hostname: "y".to_owned(),
        dns_servers: Vec::new(),
        dns_search: Vec::new(),
        dns_options: Vec::new(),
        ipv4_address: None,
    };
    assert!(matches!(
        runtime.create_container(&unknown_network).await,
        Err(RuntimeError::Engine { .. })
    ));
    assert!(matches!(
        runtime
            .create_container(&app("pod-z-web", "z", "no-such-sandbox"))
            .await,
        Err(RuntimeError::Engine { .. })
    ));
}

#[tokio::test]
async fn an_app_container_starts_only_while_its_sandbox_runs() {
    let (runtime, sandbox_id) = with_running_sandbox().await;
    let web = runtime
        .create_container(&app("pod-a-web", "a", &sandbox_id))
        .await
        .unwrap();
    runtime
        .stop_container(&sandbox_id, Duration::ZERO)
        .await
        .unwrap();
    assert!(runtime.start_container(&web).await.is_err());

    runtime.start_container(&sandbox_id).await.unwrap();
    runtime.start_container(&web).await.unwrap();
    let info = runtime.inspect_container(&web).await.unwrap();
    assert!(matches!(info.state, ContainerState::Running { .. }));
    assert_eq!(
        info.ip_address, None,
        "an app container has no address of its own"
    );
    assert_eq!(
        runtime.spec(&web).unwrap(),
        app("pod-a-web", "a", &sandbox_id)
    );
}

#[tokio::test]
async fn a_container_gets_the_address_it_asks_for_unless_a_running_one_holds_it() {
    let (runtime, sandbox_id) = with_running_sandbox().await;
    let held = runtime
        .inspect_container(&sandbox_id)
        .await
        .unwrap()
        .ip_address
        .expect("the sandbox has an address");
    let asking = |name: &str, address: &str| {
        let mut spec = sandbox(name, "b");
        if let NetworkMode::OwnNamespace { ipv4_address, .. } = &mut spec.network {
            *ipv4_address = Some(address.to_owned());
        }
        spec
    };
    let clash = runtime
        .create_container(&asking("pod-b-0", &held))
        .await
        .unwrap();
    let refused = runtime.start_container(&clash).await.unwrap_err();
    assert!(
        refused.to_string().contains("Address already in use"),
        "{refused}"
    );

    runtime
        .stop_container(&sandbox_id, Duration::ZERO)
        .await
        .unwrap();
    runtime.start_container(&clash).await.unwrap();
    let info = runtime.inspect_container(&clash).await.unwrap();
    assert_eq!(info.ip_address.as_deref(), Some(held.as_str()));
}

#[tokio::test]
async fn images_follow_the_pull_policy() {
    let runtime = FakeRuntime::new();
    runtime.set_image_present("present:1");
    runtime.set_image_pullable("remote:1");

    runtime
        .ensure_image("present:1", PullPolicy::IfNotPresent)
        .await
        .unwrap();
    runtime
        .ensure_image("present:1", PullPolicy::Never)
        .await
        .unwrap();
    assert!(matches!(
        runtime.ensure_image("absent:1", PullPolicy::Never).await,
        Err(RuntimeError::ImageNeverPull { .. })
    ));
    assert!(matches!(
        runtime
            .ensure_image("absent:1", PullPolicy::IfNotPresent)
            .await,
        Err(RuntimeError::ImagePull { .. })
    ));
    assert!(matches!(
        runtime.ensure_image("present:1", PullPolicy::Always).await,
        Err(RuntimeError::ImagePull { .. })
    ));
    runtime
        .ensure_image("remote:1", PullPolicy::IfNotPresent)
        .await
        .unwrap();
    runtime
        .ensure_image("remote:1", PullPolicy::Never)
        .await
        .unwrap();
    assert_eq!(runtime.pulls(), ["absent:1", "present:1", "remote:1"]);
}

#[tokio::test]
async fn exec_returns_the_scripted_result_and_needs_a_running_container() {
    let (runtime, id) = with_running_sandbox().await;
    let probe = strings(&["cat", "/tmp/healthy"]);
    let default = runtime
        .exec(&id, &probe, Duration::from_secs(1))
        .await
        .unwrap();
    assert_eq!(default.exit_code, 0);

    let failed = ExecOutput {
        exit_code: 1,
        stdout: Vec::new(),
        stderr: b"no such file\n".to_vec(),
    };
    runtime.set_exec_result("pod-a", &probe, failed.clone());
    assert_eq!(
        runtime
            .exec(&id, &probe, Duration::from_secs(1))
            .await
            .unwrap(),
        failed
    );

    runtime.set_exit(&id, 0).unwrap();
    assert!(runtime
        .exec(&id, &probe, Duration::from_secs(1))
        .await
        .is_err());
}

#[tokio::test(start_paused = true)]
async fn a_hanging_exec_fails_at_its_timeout() {
    let (runtime, id) = with_running_sandbox().await;
    let probe = strings(&["sleep", "1000"]);
    runtime.set_exec_hang(&id, &probe);
    let started = tokio::time::Instant::now();
    assert!(runtime
        .exec(&id, &probe, Duration::from_secs(5))
        .await
        .is_err());
    assert_eq!(started.elapsed(), Duration::from_secs(5));
}

#[tokio::test]
async fn logs_give_the_tail_and_follow_until_the_container_stops() {
    let (runtime, id) = with_running_sandbox().await;
    runtime.append_log(&id, b"one\ntwo\nthree\n").unwrap();
    let all: Vec<Vec<u8>> = runtime
        .logs(&id, None, false)
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert_eq!(all.concat(), b"one\ntwo\nthree\n");
    let last_two: Vec<Vec<u8>> = runtime
        .logs(&id, Some(2), false)
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert_eq!(last_two.concat(), b"two\nthree\n");

    let followed = runtime.logs(&id, Some(1), true).await.unwrap();
    runtime.append_log(&id, b"four\n").unwrap();
    runtime.stop_container(&id, Duration::ZERO).await.unwrap();
    let followed: Vec<Vec<u8>> =
        tokio::time::timeout(Duration::from_secs(5), followed.try_collect())
            .await
            .unwrap()
            .unwrap();
    assert_eq!(followed.concat(), b"three\nfour\n");
}

#[test]
fn a_tail_counts_lines_from_the_end() {
    assert_eq!(tail_lines(b"a\nb\nc\n", Some(1)), b"c\n");
    assert_eq!(tail_lines(b"a\nb\nc", Some(2)), b"b\nc");
    assert_eq!(tail_lines(b"a\nb\n", Some(5)), b"a\nb\n");
    assert_eq!(tail_lines(b"a\nb\n", Some(0)), b"");
    assert_eq!(tail_lines(b"", Some(3)), b"");
}

#[tokio::test]
async fn a_network_in_use_by_a_running_sandbox_is_not_removed() {
    let (runtime, id) = with_running_sandbox().await;
    runtime.ensure_network(&network()).await.unwrap();
    assert_eq!(runtime.networks().len(), 1, "ensure_network is idempotent");
    assert!(runtime.remove_network("pods").await.is_err());
    runtime.remove_container(&id).await.unwrap();
    runtime.remove_network("pods").await.unwrap();
    runtime.remove_network("pods").await.unwrap();
    assert!(runtime.networks().is_empty());
}
