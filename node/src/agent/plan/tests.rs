use serde_json::json;

use super::*;

fn pod(policy: &str, init: &[&str], containers: &[&str]) -> Pod {
    let list = |names: &[&str]| {
        names
            .iter()
            .map(|n| json!({"name": n, "image": "flotilla/busybox:latest"}))
            .collect::<Vec<_>>()
    };
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "p", "namespace": "default", "uid": "u"},
        "spec": {"restartPolicy": policy, "initContainers": list(init), "containers": list(containers)}
    }))
    .expect("pod parses")
}

fn running(id: &str, container: &str, attempt: u32) -> Observed {
    Observed {
        id: id.into(),
        container: container.into(),
        attempt,
        state: ContainerState::Running {
            started_at: "2026-01-01T00:00:00Z".into(),
        },
        ip_address: (container == SANDBOX).then(|| "10.244.0.5".to_string()),
    }
}

fn exited(id: &str, container: &str, attempt: u32, exit_code: i64, finished_at: &str) -> Observed {
    Observed {
        id: id.into(),
        container: container.into(),
        attempt,
        state: ContainerState::Exited {
            exit_code,
            started_at: "2026-01-01T00:00:00Z".into(),
            finished_at: finished_at.into(),
            oom_killed: false,
        },
        ip_address: None,
    }
}

const FINISHED: &str = "2026-01-01T00:01:00Z";

fn ms(rfc3339: &str) -> i64 {
    rfc3339
        .parse::<jiff::Timestamp>()
        .expect("timestamp")
        .as_millisecond()
}

struct Check {
    pod: Pod,
    observed: Vec<Observed>,
    probes: BTreeMap<String, ProbeResult>,
    pulls: BTreeMap<String, PullFailure>,
    now_ms: i64,
}

impl Check {
    fn new(pod: Pod, observed: Vec<Observed>) -> Check {
        Check {
            pod,
            observed,
            probes: BTreeMap::new(),
            pulls: BTreeMap::new(),
            now_ms: ms(FINISHED),
        }
    }

    fn facts(&self) -> PodFacts<'_> {
        PodFacts {
            pod: &self.pod,
            observed: &self.observed,
            probes: &self.probes,
            pull_failures: &self.pulls,
            backoff: Backoff::default(),
            now_ms: self.now_ms,
        }
    }

    fn plan(&self) -> Vec<Action> {
        plan(&self.facts())
    }

    fn status(&self) -> Value {
        status(
            &self.facts(),
            &json!({}),
            "10.0.0.1",
            "2026-01-01T00:02:00Z",
        )
    }
}

fn start(name: &str, attempt: u32) -> Action {
    Action::StartContainer {
        name: name.into(),
        init: false,
        attempt,
    }
}

fn start_init(name: &str) -> Action {
    Action::StartContainer {
        name: name.into(),
        init: true,
        attempt: 0,
    }
}

#[test]
fn a_new_pod_starts_its_sandbox_first_then_every_container() {
    let check = Check::new(pod("Always", &[], &["a", "b"]), vec![]);
    assert_eq!(check.plan(), vec![Action::StartSandbox]);
    let check = Check::new(
        pod("Always", &[], &["a", "b"]),
        vec![running("s", SANDBOX, 0)],
    );
    assert_eq!(check.plan(), vec![start("a", 0), start("b", 0)]);
    assert_eq!(check.status()["phase"], "Pending");
}

#[test]
fn restart_policies_treat_exit_codes_as_kubernetes_does() {
    let later = ms(FINISHED) + 3_600_000;
    for (policy, code, expect_restart, phase) in [
        ("Always", 0, true, "Running"),
        ("Always", 1, true, "Running"),
        ("OnFailure", 0, false, "Succeeded"),
        ("OnFailure", 1, true, "Running"),
        ("Never", 0, false, "Succeeded"),
        ("Never", 1, false, "Failed"),
    ] {
        let mut check = Check::new(
            pod(policy, &[], &["a"]),
            vec![
                running("s", SANDBOX, 0),
                exited("c0", "a", 0, code, FINISHED),
            ],
        );
        check.now_ms = later;
        let restarted = check.plan() == vec![start("a", 1)];
        assert_eq!(restarted, expect_restart, "{policy} exit {code}");
        assert_eq!(check.status()["phase"], phase, "{policy} exit {code}");
    }
}

#[test]
fn a_crashing_container_waits_a_growing_back_off() {
    let backoff = Backoff::default();
    assert_eq!(backoff.delay_ms(1), 10_000);
    assert_eq!(backoff.delay_ms(2), 20_000);
    assert_eq!(backoff.delay_ms(3), 40_000);
    assert_eq!(backoff.delay_ms(30), 300_000);

    // Third crash (attempt 2): 40 s back-off.
    let mut check = Check::new(
        pod("Always", &[], &["a"]),
        vec![
            running("s", SANDBOX, 0),
            exited("c1", "a", 1, 1, "2026-01-01T00:00:30Z"),
            exited("c2", "a", 2, 1, FINISHED),
        ],
    );
    check.now_ms = ms(FINISHED) + 39_000;
    assert_eq!(check.plan(), vec![]);
    let status = check.status();
    let container = &status["containerStatuses"][0];
    assert_eq!(container["state"]["waiting"]["reason"], "CrashLoopBackOff");
    assert_eq!(container["restartCount"], 2);
    assert_eq!(container["lastState"]["terminated"]["exitCode"], 1);
    check.now_ms = ms(FINISHED) + 40_000;
    assert_eq!(check.plan(), vec![start("a", 3)]);
}

#[test]
fn older_attempts_than_the_previous_one_are_removed() {
    let check = Check::new(
        pod("Always", &[], &["a"]),
        vec![
            running("s", SANDBOX, 0),
            exited("c0", "a", 0, 1, FINISHED),
            exited("c1", "a", 1, 1, FINISHED),
            running("c2", "a", 2),
        ],
    );
    assert_eq!(check.plan(), vec![Action::Remove { id: "c0".into() }]);
}

#[test]
fn a_failed_liveness_probe_kills_the_container_and_readiness_drives_ready() {
    let mut check = Check::new(
        pod("Always", &[], &["a"]),
        vec![running("s", SANDBOX, 0), running("c0", "a", 0)],
    );
    assert_eq!(check.status()["conditions"][3]["status"], "True");
    check.probes.insert(
        "a".into(),
        ProbeResult {
            ready: false,
            liveness_failed: false,
            started: true,
        },
    );
    check.pod.spec.as_mut().expect("spec").containers[0].readiness_probe = Some(Default::default());
    assert_eq!(check.status()["conditions"][3]["status"], "False");
    assert_eq!(check.status()["phase"], "Running");
    check.probes.insert(
        "a".into(),
        ProbeResult {
            ready: true,
            liveness_failed: true,
            started: true,
        },
    );
    assert_eq!(check.plan(), vec![Action::Kill { id: "c0".into() }]);
}

#[test]
fn init_containers_run_in_order_to_completion_before_the_others() {
    let init_pod = || pod("Always", &["i1", "i2"], &["a"]);
    let check = Check::new(init_pod(), vec![running("s", SANDBOX, 0)]);
    assert_eq!(check.plan(), vec![start_init("i1")]);
    let check = Check::new(
        init_pod(),
        vec![running("s", SANDBOX, 0), running("i", "i1", 0)],
    );
    assert_eq!(check.plan(), vec![]);
    let check = Check::new(
        init_pod(),
        vec![running("s", SANDBOX, 0), exited("i", "i1", 0, 0, FINISHED)],
    );
    assert_eq!(check.plan(), vec![start_init("i2")]);
    assert_eq!(check.status()["conditions"][1]["status"], "False");
    let check = Check::new(
        init_pod(),
        vec![
            running("s", SANDBOX, 0),
            exited("i", "i1", 0, 0, FINISHED),
            exited("j", "i2", 0, 0, FINISHED),
        ],
    );
    assert_eq!(check.plan(), vec![start("a", 0)]);
    assert_eq!(check.status()["conditions"][1]["status"], "True");
}

#[test]
fn an_image_that_cannot_be_pulled_shows_err_image_pull_then_back_off() {
    let mut check = Check::new(pod("Always", &[], &["a"]), vec![running("s", SANDBOX, 0)]);
    let failure = |failures| PullFailure {
        message: "no such image".into(),
        failures,
        last_failure_ms: ms(FINISHED),
    };
    check.pulls.insert("a".into(), failure(1));
    assert_eq!(check.plan(), vec![], "pulls back off too");
    let waiting =
        |check: &Check| check.status()["containerStatuses"][0]["state"]["waiting"].clone();
    assert_eq!(waiting(&check)["reason"], "ErrImagePull");
    assert_eq!(waiting(&check)["message"], "no such image");
    check.pulls.insert("a".into(), failure(2));
    assert_eq!(waiting(&check)["reason"], "ImagePullBackOff");
    check.now_ms += 60_000;
    assert_eq!(check.plan(), vec![start("a", 0)]);
}

#[test]
fn a_dead_sandbox_restarts_the_whole_pod() {
    let check = Check::new(
        pod("Always", &[], &["a"]),
        vec![
            exited("s", SANDBOX, 0, 137, FINISHED),
            running("c0", "a", 0),
        ],
    );
    assert_eq!(
        check.plan(),
        vec![
            Action::Remove { id: "s".into() },
            Action::Remove { id: "c0".into() },
            Action::StartSandbox
        ]
    );
}

#[test]
fn a_running_pod_reports_its_ip_and_ready_conditions() {
    let check = Check::new(
        pod("Always", &[], &["a"]),
        vec![running("s", SANDBOX, 0), running("c0", "a", 0)],
    );
    let status = check.status();
    assert_eq!(status["phase"], "Running");
    assert_eq!(status["podIP"], "10.244.0.5");
    assert_eq!(status["containerStatuses"][0]["ready"], true);
    assert_eq!(status["containerStatuses"][0]["containerID"], "docker://c0");
}

fn with_address(mut observed: Observed, address: &str) -> Observed {
    observed.ip_address = Some(address.into());
    observed
}

#[test]
fn a_pod_of_one_container_starts_it_without_a_sandbox_and_takes_its_address() {
    let check = Check::new(pod("Always", &[], &["a"]), vec![]);
    assert_eq!(check.plan(), vec![start("a", 0)]);
    assert_eq!(check.status()["phase"], "Pending");

    let check = Check::new(
        pod("Always", &[], &["a"]),
        vec![with_address(running("c0", "a", 0), "10.244.0.9")],
    );
    assert_eq!(check.plan(), vec![]);
    let status = check.status();
    assert_eq!(status["phase"], "Running");
    assert_eq!(status["podIP"], "10.244.0.9");
    assert_eq!(status["conditions"][3]["status"], "True");
}

#[test]
fn a_crashed_only_container_is_restarted_on_its_own_and_the_pod_keeps_its_address_meanwhile() {
    let mut check = Check::new(
        pod("Always", &[], &["a"]),
        vec![exited("c0", "a", 0, 1, FINISHED)],
    );
    assert_eq!(check.plan(), vec![], "back-off first");
    let previous = json!({"podIP": "10.244.0.9"});
    let waiting = status(&check.facts(), &previous, "10.0.0.1", FINISHED);
    assert_eq!(
        waiting["podIP"], "10.244.0.9",
        "the pod keeps its address for the restart"
    );
    assert_eq!(waiting["phase"], "Running");
    check.now_ms = ms(FINISHED) + 10_000;
    assert_eq!(check.plan(), vec![start("a", 1)]);

    let mut done = Check::new(
        pod("Never", &[], &["a"]),
        vec![exited("c0", "a", 0, 0, FINISHED)],
    );
    done.now_ms = ms(FINISHED) + 10_000;
    let finished = status(&done.facts(), &previous, "10.0.0.1", FINISHED);
    assert_eq!(finished["phase"], "Succeeded");
    assert!(
        finished.get("podIP").is_none(),
        "a finished pod holds no address"
    );
}

#[test]
fn init_containers_several_containers_a_pod_ip_variable_or_an_old_sandbox_keep_the_sandbox() {
    let plain = pod("Always", &[], &["a"]);
    assert!(!needs_sandbox(&plain, &[]));
    assert!(needs_sandbox(&pod("Always", &["i"], &["a"]), &[]));
    assert!(needs_sandbox(&pod("Always", &[], &["a", "b"]), &[]));
    assert!(
        needs_sandbox(&plain, &[running("s", SANDBOX, 0)]),
        "a pod started with a sandbox keeps it"
    );
    let mut reads_ip = plain.clone();
    reads_ip.spec.as_mut().expect("spec").containers[0].env = Some(vec![serde_json::from_value(
        json!({"name": "MY_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}),
    )
    .expect("env var parses")]);
    assert!(needs_sandbox(&reads_ip, &[]));
    assert_eq!(
        Check::new(reads_ip, vec![]).plan(),
        vec![Action::StartSandbox]
    );
}
