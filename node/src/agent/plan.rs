//! The pod state machine, without IO: from a pod's spec, the containers the runtime reports for
//! it, probe results, image pull failures and `now`, decide what to do next and what the pod's
//! status is. The agent's shell executes the actions and writes the status.

use std::collections::BTreeMap;

use flotilla_runtime::ContainerState;
use k8s_openapi::api::core::v1::{Container, Pod};
use serde_json::{json, Value};

/// One container of a pod as the runtime reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    pub id: String,
    /// The spec container's name, or the sandbox label.
    pub container: String,
    /// 0 for the first start, 1 after one restart, ...
    pub attempt: u32,
    pub state: ContainerState,
    pub ip_address: Option<String>,
}

/// What the probes of one container found last.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ProbeResult {
    /// Readiness passed (or the container has no readiness probe).
    pub ready: bool,
    /// Liveness failed `failureThreshold` times in a row: restart the container.
    pub liveness_failed: bool,
    /// Startup probe passed (or none).
    pub started: bool,
}

/// An image that could not be made present for a container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PullFailure {
    pub message: String,
    pub failures: u32,
    pub last_failure_ms: i64,
}

/// Exponential back-off of restarts and pulls, as the kubelet does it (10 s doubling to 5 min).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub base_ms: i64,
    pub max_ms: i64,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            base_ms: 10_000,
            max_ms: 300_000,
        }
    }
}

impl Backoff {
    /// The wait after the `failures`-th failure (1-based).
    pub fn delay_ms(&self, failures: u32) -> i64 {
        let exponent = failures.saturating_sub(1).min(20);
        self.base_ms
            .saturating_mul(1i64 << exponent)
            .min(self.max_ms)
    }
}

/// Everything the planner looks at.
#[derive(Debug, Clone)]
pub struct PodFacts<'a> {
    pub pod: &'a Pod,
    pub observed: &'a [Observed],
    pub probes: &'a BTreeMap<String, ProbeResult>,
    pub pull_failures: &'a BTreeMap<String, PullFailure>,
    pub backoff: Backoff,
    pub now_ms: i64,
}

/// What the shell should do next for a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    StartSandbox,
    StartContainer {
        name: String,
        init: bool,
        attempt: u32,
    },
    /// Stop a running container (liveness failed); it is restarted on a later pass.
    Kill {
        id: String,
    },
    Remove {
        id: String,
    },
}

pub const SANDBOX: &str = flotilla_runtime::labels::POD_SANDBOX;

fn restart_policy(pod: &Pod) -> &str {
    pod.spec
        .as_ref()
        .and_then(|s| s.restart_policy.as_deref())
        .unwrap_or("Always")
}

fn app_containers(pod: &Pod) -> &[Container] {
    pod.spec
        .as_ref()
        .map(|s| s.containers.as_slice())
        .unwrap_or(&[])
}

fn init_containers(pod: &Pod) -> &[Container] {
    pod.spec
        .as_ref()
        .and_then(|s| s.init_containers.as_deref())
        .unwrap_or(&[])
}

/// Whether a pod runs in a sandbox container that holds its network namespace, as the
/// kubelet's pause container does. A pod of one container and no init containers needs none:
/// that container holds the namespace itself, which halves the containers the engine creates
/// (its start is most of a pod's start). The exceptions: a container that reads its own
/// `status.podIP` from the downward API (the address must be known before it is created), and
/// a pod that already has a sandbox (started that way, it stays that way).
pub fn needs_sandbox(pod: &Pod, observed: &[Observed]) -> bool {
    let [container] = app_containers(pod) else {
        return true;
    };
    let reads_pod_ip = container.env.iter().flatten().any(|variable| {
        variable
            .value_from
            .as_ref()
            .and_then(|source| source.field_ref.as_ref())
            .is_some_and(|field| field.field_path.starts_with("status.podIP"))
    });
    !init_containers(pod).is_empty()
        || reads_pod_ip
        || observed.iter().any(|o| o.container == SANDBOX)
}

/// The container that holds the pod's network namespace (and so its address): the newest
/// sandbox, or the newest attempt of the only container of a pod without one.
pub fn network_holder<'a>(pod: &Pod, observed: &'a [Observed]) -> Option<&'a Observed> {
    if needs_sandbox(pod, observed) {
        attempts(observed, SANDBOX).0
    } else {
        attempts(observed, &app_containers(pod).first()?.name).0
    }
}

/// The newest attempt of a container, and the one before it.
fn attempts<'a>(
    observed: &'a [Observed],
    name: &str,
) -> (Option<&'a Observed>, Option<&'a Observed>) {
    let mut mine: Vec<&Observed> = observed.iter().filter(|o| o.container == name).collect();
    mine.sort_by_key(|o| o.attempt);
    let latest = mine.pop();
    (latest, mine.pop())
}

fn parse_ms(rfc3339: &str) -> Option<i64> {
    rfc3339
        .parse::<jiff::Timestamp>()
        .ok()
        .map(|t| t.as_millisecond())
}

fn is_running(state: &ContainerState) -> bool {
    matches!(state, ContainerState::Running { .. })
}

/// Whether an exited container should run again under `policy`.
fn restarts(policy: &str, exit_code: i64) -> bool {
    match policy {
        "Never" => false,
        "OnFailure" => exit_code != 0,
        _ => true,
    }
}

/// When the exited `latest` attempt may be restarted.
fn restart_at_ms(facts: &PodFacts<'_>, latest: &Observed) -> i64 {
    match &latest.state {
        ContainerState::Exited { finished_at, .. } => {
            parse_ms(finished_at).unwrap_or(0) + facts.backoff.delay_ms(latest.attempt + 1)
        }
        _ => 0,
    }
}

/// Whether a pull failure for `name` is still in back-off.
fn pull_backing_off(facts: &PodFacts<'_>, name: &str) -> bool {
    facts
        .pull_failures
        .get(name)
        .is_some_and(|f| facts.now_ms < f.last_failure_ms + facts.backoff.delay_ms(f.failures))
}

/// Decides the next actions for `facts.pod`.
pub fn plan(facts: &PodFacts<'_>) -> Vec<Action> {
    let mut actions = Vec::new();
    let policy = restart_policy(facts.pod);
    let spec_names: Vec<&str> = init_containers(facts.pod)
        .iter()
        .chain(app_containers(facts.pod))
        .map(|c| c.name.as_str())
        .collect();

    // Containers of older attempts than the previous one, and of names not in the spec, go.
    for observed in facts.observed {
        if observed.container == SANDBOX {
            continue;
        }
        let (latest, previous) = attempts(facts.observed, &observed.container);
        let keep = spec_names.contains(&observed.container.as_str())
            && (latest.map(|o| &o.id) == Some(&observed.id)
                || previous.map(|o| &o.id) == Some(&observed.id));
        if !keep {
            actions.push(Action::Remove {
                id: observed.id.clone(),
            });
        }
    }

    let (sandbox, _) = attempts(facts.observed, SANDBOX);
    if needs_sandbox(facts.pod, facts.observed) && !sandbox.is_some_and(|s| is_running(&s.state)) {
        // A dead sandbox takes its network namespace with it: everything restarts in a new one.
        if terminal_phase(facts).is_some() {
            return actions;
        }
        for observed in facts.observed {
            if !actions.contains(&Action::Remove {
                id: observed.id.clone(),
            }) {
                actions.push(Action::Remove {
                    id: observed.id.clone(),
                });
            }
        }
        actions.push(Action::StartSandbox);
        return actions;
    }

    for container in init_containers(facts.pod) {
        let (latest, _) = attempts(facts.observed, &container.name);
        match latest.map(|l| &l.state) {
            None => {
                if !pull_backing_off(facts, &container.name) {
                    actions.push(Action::StartContainer {
                        name: container.name.clone(),
                        init: true,
                        attempt: 0,
                    });
                }
                return actions;
            }
            Some(ContainerState::Exited { exit_code: 0, .. }) => continue,
            Some(ContainerState::Exited { .. }) => {
                if let Some(latest) = latest.filter(|_| policy != "Never") {
                    if facts.now_ms >= restart_at_ms(facts, latest) {
                        actions.push(Action::StartContainer {
                            name: container.name.clone(),
                            init: true,
                            attempt: latest.attempt + 1,
                        });
                    }
                }
                return actions;
            }
            Some(ContainerState::Created) | Some(ContainerState::Other(_)) => {
                if let Some(latest) = latest {
                    actions.push(Action::Remove {
                        id: latest.id.clone(),
                    });
                }
                return actions;
            }
            Some(ContainerState::Running { .. }) => return actions,
        }
    }

    for container in app_containers(facts.pod) {
        let (latest, _) = attempts(facts.observed, &container.name);
        let Some(latest) = latest else {
            if !pull_backing_off(facts, &container.name) {
                actions.push(Action::StartContainer {
                    name: container.name.clone(),
                    init: false,
                    attempt: 0,
                });
            }
            continue;
        };
        match &latest.state {
            ContainerState::Running { .. } => {
                if facts
                    .probes
                    .get(&container.name)
                    .is_some_and(|p| p.liveness_failed)
                {
                    actions.push(Action::Kill {
                        id: latest.id.clone(),
                    });
                }
            }
            ContainerState::Exited { exit_code, .. } => {
                if restarts(policy, *exit_code) && facts.now_ms >= restart_at_ms(facts, latest) {
                    actions.push(Action::StartContainer {
                        name: container.name.clone(),
                        init: false,
                        attempt: latest.attempt + 1,
                    });
                }
            }
            ContainerState::Created | ContainerState::Other(_) => {
                actions.push(Action::Remove {
                    id: latest.id.clone(),
                });
            }
        }
    }
    actions
}

/// Containers waiting out a restart back-off now, with their attempt number.
pub fn backing_off(facts: &PodFacts<'_>) -> Vec<(String, u32)> {
    let policy = restart_policy(facts.pod);
    let inits = init_containers(facts.pod).iter().map(|c| (c, true));
    inits
        .chain(app_containers(facts.pod).iter().map(|c| (c, false)))
        .filter_map(|(container, init)| {
            let (latest, _) = attempts(facts.observed, &container.name);
            let latest = latest?;
            match &latest.state {
                ContainerState::Exited { exit_code, .. }
                    if restarts(policy, *exit_code)
                        && !(init && *exit_code == 0)
                        && policy != "Never"
                        && facts.now_ms < restart_at_ms(facts, latest) =>
                {
                    Some((container.name.clone(), latest.attempt))
                }
                _ => None,
            }
        })
        .collect()
}

/// `Succeeded` or `Failed` once no container of the pod will run again.
fn terminal_phase(facts: &PodFacts<'_>) -> Option<&'static str> {
    let policy = restart_policy(facts.pod);
    for container in init_containers(facts.pod) {
        let (latest, _) = attempts(facts.observed, &container.name);
        if let Some(ContainerState::Exited { exit_code, .. }) = latest.map(|l| &l.state) {
            if *exit_code != 0 && policy == "Never" {
                return Some("Failed");
            }
        }
    }
    let containers = app_containers(facts.pod);
    if containers.is_empty() || policy == "Always" {
        return None;
    }
    let mut any_failed = false;
    for container in containers {
        let (latest, _) = attempts(facts.observed, &container.name);
        match latest.map(|l| &l.state) {
            Some(ContainerState::Exited { exit_code, .. }) => {
                if restarts(policy, *exit_code) {
                    return None;
                }
                any_failed |= *exit_code != 0;
            }
            _ => return None,
        }
    }
    Some(if any_failed { "Failed" } else { "Succeeded" })
}

fn container_status(facts: &PodFacts<'_>, container: &Container, init: bool) -> (Value, bool) {
    let (latest, previous) = attempts(facts.observed, &container.name);
    let probe = facts.probes.get(&container.name).copied();
    let has_readiness = container.readiness_probe.is_some();
    let terminated = |o: &Observed| match &o.state {
        ContainerState::Exited {
            exit_code,
            started_at,
            finished_at,
            oom_killed,
        } => Some(json!({"terminated": {
            "exitCode": exit_code,
            "reason": if *oom_killed { "OOMKilled" } else if *exit_code == 0 { "Completed" } else { "Error" },
            "startedAt": started_at,
            "finishedAt": finished_at,
            "containerID": format!("docker://{}", o.id),
        }})),
        _ => None,
    };
    let waiting = |reason: &str, message: Option<String>| match message {
        Some(message) => json!({"waiting": {"reason": reason, "message": message}}),
        None => json!({"waiting": {"reason": reason}}),
    };
    let policy = restart_policy(facts.pod);
    let (state, ready, last_state) = match latest {
        None => {
            let state = match facts.pull_failures.get(&container.name) {
                Some(failure) if failure.failures <= 1 => {
                    waiting("ErrImagePull", Some(failure.message.clone()))
                }
                Some(failure) => waiting("ImagePullBackOff", Some(failure.message.clone())),
                None if init => waiting("PodInitializing", None),
                None => waiting("ContainerCreating", None),
            };
            (state, false, json!({}))
        }
        Some(latest) => {
            let last_state = previous.and_then(terminated).unwrap_or_else(|| json!({}));
            match &latest.state {
                ContainerState::Running { started_at } => {
                    let ready = !init
                        && probe
                            .map(|p| p.ready && p.started)
                            .unwrap_or(!has_readiness);
                    (
                        json!({"running": {"startedAt": started_at}}),
                        ready,
                        last_state,
                    )
                }
                ContainerState::Exited { exit_code, .. }
                    if restarts(policy, *exit_code) && !(init && *exit_code == 0) =>
                {
                    let delay_s = facts.backoff.delay_ms(latest.attempt + 1) / 1000;
                    let message = format!(
                        "back-off {delay_s}s restarting failed container={} pod={}",
                        container.name,
                        pod_name(facts.pod)
                    );
                    (
                        waiting("CrashLoopBackOff", Some(message)),
                        false,
                        terminated(latest).unwrap_or_else(|| json!({})),
                    )
                }
                ContainerState::Exited { .. } => {
                    (terminated(latest).unwrap_or_default(), false, last_state)
                }
                ContainerState::Created | ContainerState::Other(_) => {
                    (waiting("ContainerCreating", None), false, last_state)
                }
            }
        }
    };
    let status = json!({
        "name": container.name,
        "image": container.image.clone().unwrap_or_default(),
        "imageID": "",
        "containerID": latest.map(|l| format!("docker://{}", l.id)),
        "ready": ready,
        "started": latest.is_some_and(|l| is_running(&l.state)),
        "restartCount": latest.map(|l| l.attempt).unwrap_or(0),
        "state": state,
        "lastState": last_state,
    });
    (status, ready)
}

fn pod_name(pod: &Pod) -> &str {
    pod.metadata.name.as_deref().unwrap_or("")
}

fn condition(kind: &str, value: bool, previous: &Value, now: &str) -> Value {
    let status = if value { "True" } else { "False" };
    // Keep the transition time while the condition's value stays the same.
    let since = previous
        .get("conditions")
        .and_then(Value::as_array)
        .and_then(|c| {
            c.iter()
                .find(|c| c.get("type").and_then(Value::as_str) == Some(kind))
        })
        .filter(|c| c.get("status").and_then(Value::as_str) == Some(status))
        .and_then(|c| c.get("lastTransitionTime").cloned())
        .unwrap_or_else(|| Value::String(now.to_string()));
    json!({"type": kind, "status": status, "lastTransitionTime": since})
}

/// The pod's status as the kubelet would write it.
pub fn status(facts: &PodFacts<'_>, previous: &Value, host_ip: &str, now: &str) -> Value {
    let holder_ip = network_holder(facts.pod, facts.observed)
        .filter(|s| is_running(&s.state))
        .and_then(|s| s.ip_address.clone())
        .filter(|ip| !ip.is_empty());
    // A pod without a sandbox keeps its address while its only container waits to restart (a
    // sandbox would hold it): the restarted container asks for it back.
    let kept_ip = || {
        let waiting = !needs_sandbox(facts.pod, facts.observed)
            && terminal_phase(facts).is_none()
            && !facts.observed.is_empty();
        waiting
            .then(|| previous.get("podIP").and_then(Value::as_str))
            .flatten()
            .map(str::to_owned)
    };
    let pod_ip = holder_ip.or_else(kept_ip);
    let init_statuses: Vec<(Value, bool)> = init_containers(facts.pod)
        .iter()
        .map(|c| container_status(facts, c, true))
        .collect();
    let app_statuses: Vec<(Value, bool)> = app_containers(facts.pod)
        .iter()
        .map(|c| container_status(facts, c, false))
        .collect();
    let initialized = init_containers(facts.pod).iter().all(|c| {
        matches!(
            attempts(facts.observed, &c.name).0.map(|l| &l.state),
            Some(ContainerState::Exited { exit_code: 0, .. })
        )
    });
    let all_ready = !app_statuses.is_empty() && app_statuses.iter().all(|(_, ready)| *ready);
    let any_started = app_containers(facts.pod)
        .iter()
        .any(|c| attempts(facts.observed, &c.name).0.is_some());
    let phase =
        terminal_phase(facts).unwrap_or(if initialized && any_started && pod_ip.is_some() {
            "Running"
        } else {
            "Pending"
        });
    let start_time = previous
        .get("startTime")
        .cloned()
        .unwrap_or_else(|| Value::String(now.to_string()));
    let mut status = json!({
        "phase": phase,
        "hostIP": host_ip,
        "hostIPs": [{"ip": host_ip}],
        "startTime": start_time,
        "conditions": [
            condition("PodScheduled", true, previous, now),
            condition("Initialized", initialized, previous, now),
            condition("ContainersReady", all_ready, previous, now),
            condition("Ready", all_ready, previous, now),
        ],
        "containerStatuses": app_statuses.into_iter().map(|(s, _)| s).collect::<Vec<_>>(),
    });
    if !init_statuses.is_empty() {
        status["initContainerStatuses"] =
            Value::Array(init_statuses.into_iter().map(|(s, _)| s).collect());
    }
    if let Some(ip) = pod_ip {
        status["podIP"] = Value::String(ip.clone());
        status["podIPs"] = json!([{"ip": ip}]);
    }
    status
}

#[cfg(test)]
mod tests;
