//! `DockerRuntime` against the real Docker daemon of this machine. Assumes `docker info` works
//! and the local images exist (`scripts/build-images.sh` builds them).
//!
//! Every test labels what it creates `io.flotilla.test=<random id>` and removes it by that
//! label when it ends, also when it fails (the `Scope` guard). Networks use random subnets in
//! 10.250.0.0/16; no test sends traffic outside the networks it created.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use flotilla_runtime::{
    ContainerInfo, ContainerRuntime, ContainerSpec, ContainerState, DockerRuntime, Mount,
    NetworkMode, NetworkSpec, PullPolicy, RuntimeError,
};
use futures::TryStreamExt;

const BUSYBOX: &str = "flotilla/busybox:latest";
const TEST_LABEL: &str = "io.flotilla.test";

/// One test's resources on the daemon; removes them all when dropped.
struct Scope {
    id: String,
    runtime: DockerRuntime,
}

impl Scope {
    async fn new() -> Scope {
        let runtime = DockerRuntime::connect()
            .await
            .expect("the Docker daemon answers (is dockerd running?)");
        runtime
            .ensure_image(BUSYBOX, PullPolicy::Never)
            .await
            .unwrap_or_else(|e| panic!("{e}: run scripts/build-images.sh first"));
        let id = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
        Scope { id, runtime }
    }

    fn labels(&self) -> BTreeMap<String, String> {
        BTreeMap::from([(TEST_LABEL.to_owned(), self.id.clone())])
    }

    /// The cluster label value of this test's host bridges.
    fn cluster(&self) -> String {
        format!("test-{}", self.id)
    }

    fn name(&self, suffix: &str) -> String {
        format!("flt-test-{}-{suffix}", self.id)
    }

    /// Creates this test's network on a free random subnet 10.250.x.0/24; returns its name and
    /// the subnet's first three octets.
    async fn network(&self, inhibit_host_address: bool) -> (NetworkSpec, String) {
        let seed = uuid::Uuid::new_v4().as_bytes()[0];
        for attempt in 0..16u8 {
            let prefix = format!("10.250.{}", seed.wrapping_add(attempt.wrapping_mul(17)));
            let spec = NetworkSpec {
                name: self.name("net"),
                subnet: format!("{prefix}.0/24"),
                gateway: Some(format!("{prefix}.1")),
                labels: self.labels(),
                inhibit_host_address,
                host_bridge: false,
            };
            match self.runtime.ensure_network(&spec).await {
                Ok(()) => return (spec, prefix),
                Err(RuntimeError::Engine { message, .. }) if message.contains("overlap") => {
                    continue
                }
                Err(e) => panic!("create network: {e}"),
            }
        }
        panic!("no free subnet in 10.250.0.0/16 after 16 tries");
    }

    fn spec(&self, suffix: &str, script: &str, network: NetworkMode) -> ContainerSpec {
        let mut labels = self.labels();
        labels.insert("io.flotilla.test.container".to_owned(), suffix.to_owned());
        ContainerSpec {
            name: self.name(suffix),
            image: BUSYBOX.to_owned(),
            entrypoint: Some(vec!["sh".to_owned(), "-c".to_owned()]),
            args: Some(vec![script.to_owned()]),
            working_dir: None,
            env: Vec::new(),
            labels,
            mounts: Vec::new(),
            memory_limit_bytes: None,
            nano_cpus: None,
            network,
        }
    }

    /// A container on the default bridge (no pod network needed).
    fn plain(&self, suffix: &str, script: &str) -> ContainerSpec {
        self.spec(
            suffix,
            script,
            NetworkMode::OwnNamespace {
                network: "bridge".to_owned(),
                hostname: suffix.to_owned(),
                dns_servers: Vec::new(),
                dns_search: Vec::new(),
                dns_options: Vec::new(),
                ipv4_address: None,
            },
        )
    }

    async fn run(&self, spec: &ContainerSpec) -> String {
        let id = self.runtime.create_container(spec).await.expect("create");
        self.runtime.start_container(&id).await.expect("start");
        id
    }

    async fn wait_exited(&self, id: &str, within: Duration) -> ContainerState {
        let deadline = Instant::now() + within;
        loop {
            let info = self.runtime.inspect_container(id).await.expect("inspect");
            if let ContainerState::Exited { .. } = info.state {
                return info.state;
            }
            assert!(
                Instant::now() < deadline,
                "{id} did not exit within {within:?}: {info:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until `path` exists in the container (its script got that far).
    async fn wait_file(&self, id: &str, path: &str) {
        let command = ["test".to_owned(), "-e".to_owned(), path.to_owned()];
        for _ in 0..100 {
            let output = self
                .runtime
                .exec(id, &command, Duration::from_secs(5))
                .await
                .expect("exec test");
            if output.exit_code == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("{path} did not appear in {id}");
    }

    async fn logs(&self, id: &str, tail: Option<usize>) -> String {
        let chunks: Vec<Vec<u8>> = self
            .runtime
            .logs(id, tail, false)
            .await
            .expect("logs")
            .try_collect()
            .await
            .expect("read logs");
        String::from_utf8(chunks.concat()).expect("utf-8 logs")
    }
}

impl Drop for Scope {
    fn drop(&mut self) {
        let filter = format!("label={TEST_LABEL}={}", self.id);
        let listed = |args: &[&str]| -> Vec<String> {
            Command::new("docker")
                .args(args)
                .args(["--filter", &filter])
                .output()
                .map(|output| {
                    String::from_utf8_lossy(&output.stdout)
                        .split_whitespace()
                        .map(str::to_owned)
                        .collect()
                })
                .unwrap_or_default()
        };
        flotilla_runtime::host_bridge::remove_labelled_blocking(&format!(
            "{}={}",
            flotilla_runtime::labels::CLUSTER,
            self.cluster()
        ));
        let containers = listed(&["ps", "-aq"]);
        if !containers.is_empty() {
            let _ = Command::new("docker")
                .args(["rm", "-f"])
                .args(&containers)
                .output();
        }
        let networks = listed(&["network", "ls", "-q"]);
        if !networks.is_empty() {
            let _ = Command::new("docker")
                .args(["network", "rm"])
                .args(&networks)
                .output();
        }
    }
}

fn strings(words: &[&str]) -> Vec<String> {
    words.iter().map(|word| (*word).to_owned()).collect()
}

#[tokio::test]
async fn containers_joined_to_a_sandbox_share_its_localhost_and_hostname() {
    let scope = Scope::new().await;
    let (network, prefix) = scope.network(false).await;
    let hostname = format!("pod-{}", scope.id);
    let sandbox = scope
        .run(&scope.spec(
            "sandbox",
            "exec sleep 3600",
            NetworkMode::OwnNamespace {
                network: network.name.clone(),
                hostname: hostname.clone(),
                dns_servers: Vec::new(),
                dns_search: Vec::new(),
                dns_options: Vec::new(),
                ipv4_address: None,
            },
        ))
        .await;
    let info = scope.runtime.inspect_container(&sandbox).await.unwrap();
    assert!(
        matches!(info.state, ContainerState::Running { .. }),
        "{info:?}"
    );
    let address = info.ip_address.expect("the sandbox has an address");
    assert!(
        address.starts_with(&format!("{prefix}.")),
        "{address} is in {prefix}.0/24"
    );
    assert_eq!(info.name, scope.name("sandbox"));
    assert_eq!(info.image, BUSYBOX);

    let join = NetworkMode::JoinSandbox {
        sandbox_id: sandbox.clone(),
    };
    let page = format!("hello from {}", scope.id);
    let server = scope
        .run(&scope.spec(
            "server",
            &format!("mkdir -p /tmp/www && echo '{page}' > /tmp/www/index.html && exec httpd -f -p 127.0.0.1:8080 -h /tmp/www"),
            join.clone(),
        ))
        .await;
    let client = scope
        .run(&scope.spec(
            "client",
            "for i in $(seq 100); do wget -q -O - http://127.0.0.1:8080/ && exit 0; sleep 0.1; done; exit 1",
            join,
        ))
        .await;
    let state = scope.wait_exited(&client, Duration::from_secs(30)).await;
    assert!(
        matches!(state, ContainerState::Exited { exit_code: 0, .. }),
        "{state:?}"
    );
    assert_eq!(scope.logs(&client, None).await, format!("{page}\n"));

    let server_info = scope.runtime.inspect_container(&server).await.unwrap();
    assert_eq!(
        server_info.ip_address, None,
        "a joined container has no address of its own"
    );
    let named = scope
        .runtime
        .exec(&server, &strings(&["hostname"]), Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&named.stdout),
        format!("{hostname}\n")
    );
}

#[tokio::test]
async fn a_new_container_takes_over_the_address_its_exited_predecessor_had() {
    let scope = Scope::new().await;
    let (network, prefix) = scope.network(false).await;
    let address = format!("{prefix}.77");
    let own = |hostname: &str| NetworkMode::OwnNamespace {
        network: network.name.clone(),
        hostname: hostname.to_owned(),
        dns_servers: Vec::new(),
        dns_search: Vec::new(),
        dns_options: Vec::new(),
        ipv4_address: Some(address.clone()),
    };
    let first = scope
        .run(&scope.spec("first", "exec sleep 3600", own("first")))
        .await;
    let info = scope.runtime.inspect_container(&first).await.unwrap();
    assert_eq!(info.ip_address.as_deref(), Some(address.as_str()));

    let rival = scope
        .runtime
        .create_container(&scope.spec("rival", "exec sleep 3600", own("rival")))
        .await
        .expect("create");
    assert!(
        scope.runtime.start_container(&rival).await.is_err(),
        "two running containers cannot hold one address"
    );

    scope
        .runtime
        .stop_container(&first, Duration::from_secs(1))
        .await
        .expect("stop");
    let second = scope
        .run(&scope.spec("second", "exec sleep 3600", own("second")))
        .await;
    let info = scope.runtime.inspect_container(&second).await.unwrap();
    assert_eq!(info.ip_address.as_deref(), Some(address.as_str()));

    // One list call tells each container's state, without inspecting it.
    let summaries = scope
        .runtime
        .list_container_summaries(&scope.labels())
        .await
        .expect("list");
    let states: Vec<(String, String)> = summaries
        .into_iter()
        .map(|summary| (summary.name, summary.state))
        .collect();
    assert_eq!(
        states,
        vec![
            (scope.name("first"), "exited".to_owned()),
            (scope.name("rival"), "created".to_owned()),
            (scope.name("second"), "running".to_owned()),
        ]
    );
}

#[tokio::test]
async fn exec_reports_the_exit_code_and_both_output_streams() {
    let scope = Scope::new().await;
    let id = scope.run(&scope.plain("exec", "exec sleep 3600")).await;

    let output = scope
        .runtime
        .exec(
            &id,
            &strings(&["sh", "-c", "echo out; echo err >&2; exit 3"]),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    assert_eq!(output.exit_code, 3);
    assert_eq!(output.stdout, b"out\n");
    assert_eq!(output.stderr, b"err\n");
    assert_eq!(
        scope
            .runtime
            .exec(&id, &strings(&["true"]), Duration::from_secs(10))
            .await
            .unwrap()
            .exit_code,
        0
    );

    let started = Instant::now();
    let slow = scope
        .runtime
        .exec(&id, &strings(&["sleep", "30"]), Duration::from_secs(1))
        .await;
    assert!(slow.is_err(), "{slow:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the timeout bounds the exec"
    );

    let missing = scope
        .runtime
        .exec(
            &scope.name("absent"),
            &strings(&["true"]),
            Duration::from_secs(10),
        )
        .await;
    assert!(
        matches!(missing, Err(RuntimeError::NotFound { .. })),
        "{missing:?}"
    );
}

#[tokio::test]
async fn stop_kills_a_process_that_ignores_sigterm_once_the_grace_period_is_over() {
    let scope = Scope::new().await;
    let id = scope
        .run(&scope.plain(
            "stubborn",
            "trap '' TERM; touch /tmp/ready; while true; do sleep 1; done",
        ))
        .await;
    scope.wait_file(&id, "/tmp/ready").await;

    let started = Instant::now();
    // 1.5 s rounds up to 2 s.
    scope
        .runtime
        .stop_container(&id, Duration::from_millis(1500))
        .await
        .unwrap();
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(1900),
        "stopped after {took:?}, before the grace period"
    );
    assert!(took < Duration::from_secs(2 + 8), "stopped after {took:?}");
    let info = scope.runtime.inspect_container(&id).await.unwrap();
    assert!(
        matches!(info.state, ContainerState::Exited { exit_code: 137, .. }),
        "{info:?}"
    );
}

#[tokio::test]
async fn stop_returns_as_soon_as_a_process_honours_sigterm() {
    let scope = Scope::new().await;
    let id = scope
        .run(&scope.plain(
            "polite",
            "trap 'exit 0' TERM; touch /tmp/ready; while true; do sleep 0.2; done",
        ))
        .await;
    scope.wait_file(&id, "/tmp/ready").await;

    let started = Instant::now();
    scope
        .runtime
        .stop_container(&id, Duration::from_secs(20))
        .await
        .unwrap();
    let took = started.elapsed();
    assert!(took < Duration::from_secs(8), "stopped after {took:?}");
    let info = scope.runtime.inspect_container(&id).await.unwrap();
    assert!(
        matches!(info.state, ContainerState::Exited { exit_code: 0, .. }),
        "{info:?}"
    );
    // Stopping a stopped container is fine.
    scope
        .runtime
        .stop_container(&id, Duration::from_secs(1))
        .await
        .unwrap();
}

#[tokio::test]
async fn an_exited_container_reports_its_exit_code_times_and_logs() {
    let scope = Scope::new().await;
    let id = scope
        .run(&scope.plain(
            "batch",
            "for i in 1 2 3 4 5; do echo line$i; done; sleep 0.2; echo oops >&2; exit 7",
        ))
        .await;
    let state = scope.wait_exited(&id, Duration::from_secs(30)).await;
    let ContainerState::Exited {
        exit_code,
        started_at,
        finished_at,
        oom_killed,
    } = state
    else {
        unreachable!()
    };
    assert_eq!(exit_code, 7);
    assert!(!oom_killed);
    let started: jiff::Timestamp = started_at.parse().expect("RFC 3339 start");
    let finished: jiff::Timestamp = finished_at.parse().expect("RFC 3339 finish");
    assert!(started < finished, "{started_at} < {finished_at}");

    assert_eq!(
        scope.logs(&id, None).await,
        "line1\nline2\nline3\nline4\nline5\noops\n"
    );
    assert_eq!(scope.logs(&id, Some(2)).await, "line5\noops\n");
}

#[tokio::test]
async fn followed_logs_stream_new_output_until_the_container_exits() {
    let scope = Scope::new().await;
    let id = scope
        .run(&scope.plain("chatty", "echo first; sleep 1; echo second"))
        .await;
    let stream = scope.runtime.logs(&id, None, true).await.unwrap();
    let chunks: Vec<Vec<u8>> = tokio::time::timeout(Duration::from_secs(20), stream.try_collect())
        .await
        .expect("the stream ends when the container exits")
        .unwrap();
    assert_eq!(
        String::from_utf8(chunks.concat()).unwrap(),
        "first\nsecond\n"
    );

    let missing = scope.runtime.logs(&scope.name("absent"), None, false).await;
    assert!(matches!(missing, Err(RuntimeError::NotFound { .. })));
}

#[tokio::test]
async fn an_absent_image_fails_to_pull_quickly_and_is_refused_under_never() {
    let scope = Scope::new().await;
    let absent = "flotilla/absent:never";
    let started = Instant::now();
    let pulled = scope
        .runtime
        .ensure_image(absent, PullPolicy::IfNotPresent)
        .await;
    assert!(
        matches!(&pulled, Err(RuntimeError::ImagePull { image, message }) if image == absent && !message.is_empty()),
        "{pulled:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(35),
        "took {:?}",
        started.elapsed()
    );

    let never = scope.runtime.ensure_image(absent, PullPolicy::Never).await;
    assert!(
        matches!(never, Err(RuntimeError::ImageNeverPull { .. })),
        "{never:?}"
    );
    scope
        .runtime
        .ensure_image(BUSYBOX, PullPolicy::IfNotPresent)
        .await
        .unwrap();
    scope
        .runtime
        .ensure_image(BUSYBOX, PullPolicy::Never)
        .await
        .unwrap();
}

#[tokio::test]
async fn list_finds_containers_by_every_label_and_remove_is_idempotent() {
    let scope = Scope::new().await;
    let mut first = scope.plain("first", "exec sleep 3600");
    first.labels.insert("role".to_owned(), "a".to_owned());
    let mut second = scope.plain("second", "exec sleep 3600");
    second.labels.insert("role".to_owned(), "b".to_owned());
    let first_id = scope.runtime.create_container(&first).await.unwrap();
    let second_id = scope.runtime.create_container(&second).await.unwrap();
    scope.runtime.start_container(&second_id).await.unwrap();

    let names =
        |containers: Vec<ContainerInfo>| containers.into_iter().map(|c| c.name).collect::<Vec<_>>();
    let all = scope
        .runtime
        .list_containers(&scope.labels())
        .await
        .unwrap();
    assert_eq!(all.len(), 2);
    assert_eq!(all[0].id, first_id);
    assert_eq!(all[0].state, ContainerState::Created);
    // Docker adds the image's labels to the container's.
    assert!(
        first
            .labels
            .iter()
            .all(|(key, value)| all[0].labels.get(key) == Some(value)),
        "{:?}",
        all[0].labels
    );
    assert!(
        matches!(all[1].state, ContainerState::Running { .. }),
        "{:?}",
        all[1]
    );

    let mut only_a = scope.labels();
    only_a.insert("role".to_owned(), "a".to_owned());
    assert_eq!(
        names(scope.runtime.list_containers(&only_a).await.unwrap()),
        [scope.name("first")]
    );

    let taken = scope.runtime.create_container(&first).await;
    assert!(
        matches!(taken, Err(RuntimeError::Engine { .. })),
        "a name is taken once: {taken:?}"
    );

    scope.runtime.remove_container(&first_id).await.unwrap();
    scope.runtime.remove_container(&second_id).await.unwrap();
    scope.runtime.remove_container(&second_id).await.unwrap();
    assert!(scope
        .runtime
        .list_containers(&scope.labels())
        .await
        .unwrap()
        .is_empty());
    let gone = scope.runtime.inspect_container(&first_id).await;
    assert!(
        matches!(gone, Err(RuntimeError::NotFound { .. })),
        "{gone:?}"
    );
    let start_gone = scope.runtime.start_container(&first_id).await;
    assert!(
        matches!(start_gone, Err(RuntimeError::NotFound { .. })),
        "{start_gone:?}"
    );
}

#[tokio::test]
async fn a_network_is_created_once_with_its_subnet_labels_and_options() {
    let scope = Scope::new().await;
    let (spec, prefix) = scope.network(true).await;
    scope.runtime.ensure_network(&spec).await.unwrap();

    let filters =
        std::collections::HashMap::from([("label", vec![format!("{TEST_LABEL}={}", scope.id)])]);
    let listed = scope
        .runtime
        .client()
        .list_networks(Some(
            bollard::query_parameters::ListNetworksOptionsBuilder::default()
                .filters(&filters)
                .build(),
        ))
        .await
        .unwrap();
    assert_eq!(listed.len(), 1, "ensure_network is idempotent: {listed:?}");
    let network = &listed[0];
    assert_eq!(network.name.as_deref(), Some(spec.name.as_str()));
    assert_eq!(network.driver.as_deref(), Some("bridge"));
    let options = network.options.clone().unwrap_or_default();
    assert_eq!(
        options
            .get("com.docker.network.bridge.inhibit_ipv4")
            .map(String::as_str),
        Some("true")
    );
    let ipam = network
        .ipam
        .clone()
        .and_then(|ipam| ipam.config)
        .unwrap_or_default();
    assert_eq!(ipam.len(), 1);
    assert_eq!(
        ipam[0].subnet.as_deref(),
        Some(format!("{prefix}.0/24").as_str())
    );
    assert_eq!(
        ipam[0].gateway.as_deref(),
        Some(format!("{prefix}.1").as_str())
    );

    scope.runtime.remove_network(&spec.name).await.unwrap();
    scope.runtime.remove_network(&spec.name).await.unwrap();
}

#[tokio::test]
async fn create_applies_the_environment_working_dir_mounts_and_limits() {
    let scope = Scope::new().await;
    let host = tempfile::tempdir().unwrap();
    std::fs::write(host.path().join("payload"), "payload\n").unwrap();
    let mut spec = scope.plain(
        "configured",
        "echo \"$GREETING\"; pwd; cat /data/payload; touch /data/x 2>/dev/null && echo writable || echo read-only",
    );
    spec.env = vec![("GREETING".to_owned(), "hi there".to_owned())];
    spec.working_dir = Some("/tmp".to_owned());
    spec.mounts = vec![Mount {
        host_path: host.path().display().to_string(),
        container_path: "/data".to_owned(),
        read_only: true,
    }];
    spec.memory_limit_bytes = Some(64 * 1024 * 1024);
    spec.nano_cpus = Some(500_000_000);
    let id = scope.run(&spec).await;
    let state = scope.wait_exited(&id, Duration::from_secs(30)).await;
    assert!(
        matches!(state, ContainerState::Exited { exit_code: 0, .. }),
        "{state:?}"
    );
    assert_eq!(
        scope.logs(&id, None).await,
        "hi there\n/tmp\npayload\nread-only\n"
    );

    let inspected = scope
        .runtime
        .client()
        .inspect_container(&id, None)
        .await
        .unwrap();
    let host_config = inspected.host_config.unwrap();
    assert_eq!(host_config.memory, Some(64 * 1024 * 1024));
    assert_eq!(host_config.nano_cpus, Some(500_000_000));
    assert_eq!(host_config.privileged, Some(false));
}

#[tokio::test]
async fn a_container_on_a_host_bridge_is_wired_at_start_and_one_that_cannot_be_is_not_left_running()
{
    let scope = Scope::new().await;
    let third = uuid::Uuid::new_v4().as_bytes()[0];
    let prefix = format!("10.249.{third}");
    let mut labels = scope.labels();
    labels.insert(
        flotilla_runtime::labels::CLUSTER.to_owned(),
        scope.cluster(),
    );
    let bridge = format!("fltt{}", &scope.id[..10]);
    let network = NetworkSpec {
        name: bridge.clone(),
        subnet: format!("{prefix}.0/24"),
        gateway: Some(format!("{prefix}.1")),
        labels,
        inhibit_host_address: false,
        host_bridge: true,
    };
    scope
        .runtime
        .ensure_network(&network)
        .await
        .expect("bridge");
    scope
        .runtime
        .ensure_network(&network)
        .await
        .expect("a bridge that exists is fine");
    let on_bridge = |suffix: &str, host: u8| {
        scope.spec(
            suffix,
            "sleep 30",
            NetworkMode::OwnNamespace {
                network: bridge.clone(),
                hostname: suffix.to_owned(),
                dns_servers: Vec::new(),
                dns_search: Vec::new(),
                dns_options: Vec::new(),
                ipv4_address: Some(format!("{prefix}.{host}")),
            },
        )
    };
    let id = scope.run(&on_bridge("wired", 5)).await;
    let info = scope.runtime.inspect_container(&id).await.expect("inspect");
    assert_eq!(info.ip_address, Some(format!("{prefix}.5")));
    let command = |script: &str| vec!["sh".to_owned(), "-c".to_owned(), script.to_owned()];
    let eth0 = scope
        .runtime
        .exec(
            &id,
            &command("ip -4 addr show eth0"),
            Duration::from_secs(10),
        )
        .await
        .expect("exec ip");
    assert!(
        String::from_utf8_lossy(&eth0.stdout).contains(&format!("inet {prefix}.5/24")),
        "{eth0:?}"
    );
    let ping = scope
        .runtime
        .exec(
            &id,
            &command(&format!("ping -c 1 {prefix}.1")),
            Duration::from_secs(10),
        )
        .await
        .expect("exec ping");
    assert_eq!(
        ping.exit_code, 0,
        "the gateway on the host answers: {ping:?}"
    );

    // The bridge gone behind the runtime's back: the next container cannot be wired.
    let deleted = Command::new("ip")
        .args(["link", "delete", "dev", &bridge])
        .status()
        .expect("run ip");
    assert!(deleted.success());
    let unwired = scope
        .runtime
        .create_container(&on_bridge("unwired", 6))
        .await
        .expect("create");
    let started = scope.runtime.start_container(&unwired).await;
    assert!(
        started.is_err(),
        "wiring to a missing bridge fails the start"
    );
    let state = scope.wait_exited(&unwired, Duration::from_secs(10)).await;
    assert!(matches!(state, ContainerState::Exited { .. }), "{state:?}");
    let leftover = Command::new("ip")
        .args(["link", "show", "dev", &format!("flv{}", &unwired[..12])])
        .output()
        .expect("run ip");
    assert!(!leftover.status.success(), "no veth is left on the host");
    let label = format!("{}={}", flotilla_runtime::labels::CLUSTER, scope.cluster());
    drop(scope);
    let rules = Command::new("iptables")
        .args(["-S", "FORWARD"])
        .output()
        .expect("run iptables");
    assert!(
        !String::from_utf8_lossy(&rules.stdout).contains(&label),
        "the bridge's rules went with the test, though the bridge was gone before"
    );
}

#[tokio::test]
async fn creating_a_container_of_an_absent_image_says_the_image_is_not_present() {
    let scope = Scope::new().await;
    let mut spec = scope.plain("absent", "true");
    spec.image = format!("flotilla/absent-{}:never", scope.id);
    match scope.runtime.create_container(&spec).await {
        Err(RuntimeError::ImageNotPresent { image }) => assert_eq!(image, spec.image),
        other => panic!("expected ImageNotPresent, got {other:?}"),
    }
}
