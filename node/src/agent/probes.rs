//! Liveness, readiness and startup probes: one task per running container with probes,
//! publishing results the planner reads.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flotilla_runtime::ContainerRuntime;
use k8s_openapi::api::core::v1::{Container, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use super::plan::ProbeResult;

/// Probe results by (pod uid, container name), and a signal when a verdict changes (the
/// pod's status follows at once, not at the agent's next pass).
#[derive(Debug, Clone, Default)]
pub(super) struct ProbeResults {
    pub(super) by_container: Arc<Mutex<HashMap<(String, String), ProbeResult>>>,
    pub(super) changed: Arc<tokio::sync::Notify>,
}

/// One probe's thresholds and timing, with Kubernetes' defaults.
#[derive(Debug, Clone, Copy)]
struct Timing {
    initial_delay: Duration,
    period: Duration,
    timeout: Duration,
    failure_threshold: u32,
    success_threshold: u32,
}

fn timing(probe: &Probe) -> Timing {
    let seconds =
        |v: Option<i32>, default: i32| Duration::from_secs(v.unwrap_or(default).max(0) as u64);
    Timing {
        initial_delay: seconds(probe.initial_delay_seconds, 0),
        period: seconds(probe.period_seconds, 10).max(Duration::from_millis(500)),
        timeout: seconds(probe.timeout_seconds, 1).max(Duration::from_millis(200)),
        failure_threshold: probe.failure_threshold.unwrap_or(3).max(1) as u32,
        success_threshold: probe.success_threshold.unwrap_or(1).max(1) as u32,
    }
}

fn port_of(port: &IntOrString, container: &Container) -> Option<u16> {
    match port {
        IntOrString::Int(port) => u16::try_from(*port).ok(),
        IntOrString::String(name) => container
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name.as_str()))
            .and_then(|p| u16::try_from(p.container_port).ok()),
    }
}

/// Runs one probe once: true when it passed.
async fn run_once(
    runtime: &dyn ContainerRuntime,
    container_id: &str,
    pod_ip: &str,
    container: &Container,
    probe: &Probe,
    timeout: Duration,
) -> bool {
    if let Some(exec) = &probe.exec {
        let command = exec.command.clone().unwrap_or_default();
        return matches!(runtime.exec(container_id, &command, timeout).await, Ok(output) if output.exit_code == 0);
    }
    if let Some(http) = &probe.http_get {
        let Some(port) = port_of(&http.port, container) else {
            return false;
        };
        let host = http.host.clone().unwrap_or_else(|| pod_ip.to_string());
        let path = http.path.clone().unwrap_or_else(|| "/".into());
        let attempt = async {
            let mut stream = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
            let request = format!("GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: flotilla-probe\r\nConnection: close\r\n\r\n");
            stream.write_all(request.as_bytes()).await?;
            let mut head = [0u8; 64];
            let read = stream.read(&mut head).await?;
            let line = String::from_utf8_lossy(&head[..read]).to_string();
            let code: u16 = line
                .split_whitespace()
                .nth(1)
                .and_then(|c| c.parse().ok())
                .unwrap_or(0);
            std::io::Result::Ok((200..400).contains(&code))
        };
        return matches!(tokio::time::timeout(timeout, attempt).await, Ok(Ok(true)));
    }
    if let Some(tcp) = &probe.tcp_socket {
        let Some(port) = port_of(&tcp.port, container) else {
            return false;
        };
        let host = tcp.host.clone().unwrap_or_else(|| pod_ip.to_string());
        return matches!(
            tokio::time::timeout(
                timeout,
                tokio::net::TcpStream::connect((host.as_str(), port))
            )
            .await,
            Ok(Ok(_))
        );
    }
    false
}

/// How soon a readiness probe that has not passed yet runs again during its first period,
/// instead of a whole period later: a tenth of the period, at least 100 ms. A container is not
/// ready before its readiness probe first passes whatever the failures, so this only makes a
/// starting container ready sooner (a replacement pod serves within 100 ms of its listener
/// opening, not up to a period later); at most about ten extra probes, and only network ones
/// (an `exec` probe costs the engine a process each time).
fn startup_retry(probe: &Probe, timing: &Timing, passed_once: bool) -> Option<Duration> {
    let network_probe = probe.http_get.is_some() || probe.tcp_socket.is_some();
    (!passed_once && network_probe)
        .then(|| (timing.period / 10).max(Duration::from_millis(100)))
        .filter(|retry| *retry < timing.period)
}

/// A probe's running verdict from consecutive results.
#[derive(Debug, Default)]
struct Streak {
    successes: u32,
    failures: u32,
}

impl Streak {
    fn record(&mut self, passed: bool) {
        if passed {
            self.successes += 1;
            self.failures = 0;
        } else {
            self.failures += 1;
            self.successes = 0;
        }
    }
}

/// Probes one container until `stop` is cancelled, publishing results under `key`.
pub(super) async fn run_probes(
    runtime: Arc<dyn ContainerRuntime>,
    results: ProbeResults,
    key: (String, String),
    container_id: String,
    pod_ip: String,
    container: Container,
    stop: CancellationToken,
) {
    let publish = |result: ProbeResult| {
        let previous = results
            .by_container
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.clone(), result);
        if previous != Some(result) {
            results.changed.notify_one();
        }
    };
    let mut result = ProbeResult {
        ready: container.readiness_probe.is_none(),
        liveness_failed: false,
        started: container.startup_probe.is_none(),
    };
    publish(result);
    let probes = [
        ("startup", container.startup_probe.clone()),
        ("liveness", container.liveness_probe.clone()),
        ("readiness", container.readiness_probe.clone()),
    ];
    let mut streaks: [Streak; 3] = Default::default();
    // When the readiness probe first ran, and whether it has passed since the container started.
    let mut readiness_first_run = None;
    let mut readiness_passed_once = false;
    let started_at = tokio::time::Instant::now();
    let mut next_run = [started_at; 3];
    for (idx, (_, probe)) in probes.iter().enumerate() {
        if let Some(probe) = probe {
            next_run[idx] = started_at + timing(probe).initial_delay;
        }
    }
    loop {
        let due = probes
            .iter()
            .enumerate()
            .filter(|(idx, (kind, probe))| {
                probe.is_some()
                    && (*kind == "startup" || result.started)
                    && !(*kind == "startup" && result.started)
                    && *idx < 3
            })
            .map(|(idx, _)| next_run[idx])
            .min();
        let Some(due) = due else {
            // Nothing left to probe (only a startup probe that passed): wait for the end.
            stop.cancelled().await;
            return;
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep_until(due) => {}
        }
        let now = tokio::time::Instant::now();
        for (idx, (kind, probe)) in probes.iter().enumerate() {
            let Some(probe) = probe else { continue };
            if next_run[idx] > now
                || (*kind != "startup" && !result.started)
                || (*kind == "startup" && result.started)
            {
                continue;
            }
            let timing = timing(probe);
            next_run[idx] = now + timing.period;
            let passed = run_once(
                runtime.as_ref(),
                &container_id,
                &pod_ip,
                &container,
                probe,
                timing.timeout,
            )
            .await;
            streaks[idx].record(passed);
            if *kind == "readiness" {
                let first_run = *readiness_first_run.get_or_insert(now);
                readiness_passed_once |= passed;
                if let Some(retry) = startup_retry(probe, &timing, readiness_passed_once) {
                    if now < first_run + timing.period {
                        next_run[idx] = now + retry;
                    }
                }
            }
            match *kind {
                "startup" => {
                    if streaks[idx].successes >= 1 {
                        result.started = true;
                    } else if streaks[idx].failures >= timing.failure_threshold {
                        result.liveness_failed = true;
                    }
                }
                "liveness" => {
                    if streaks[idx].failures >= timing.failure_threshold {
                        result.liveness_failed = true;
                    }
                }
                _ => {
                    if streaks[idx].successes >= timing.success_threshold {
                        result.ready = true;
                    } else if streaks[idx].failures >= timing.failure_threshold {
                        result.ready = false;
                    }
                }
            }
        }
        publish(result);
        if result.liveness_failed {
            // The container will be killed and restarted; its successor gets a new prober.
            stop.cancelled().await;
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probe(json: serde_json::Value) -> Probe {
        serde_json::from_value(json).expect("probe parses")
    }

    #[test]
    fn a_network_readiness_probe_retries_within_a_tenth_of_its_period_until_it_first_passes() {
        let http = probe(serde_json::json!({"httpGet": {"port": 8080}, "periodSeconds": 10}));
        let every_second =
            probe(serde_json::json!({"tcpSocket": {"port": 80}, "periodSeconds": 1}));
        assert_eq!(
            startup_retry(&http, &timing(&http), false),
            Some(Duration::from_secs(1))
        );
        assert_eq!(
            startup_retry(&every_second, &timing(&every_second), false),
            Some(Duration::from_millis(100))
        );
        assert_eq!(
            startup_retry(&http, &timing(&http), true),
            None,
            "once passed, every period as Kubernetes does"
        );
    }

    #[test]
    fn an_exec_probe_or_a_short_period_keeps_its_period() {
        let exec = probe(serde_json::json!({"exec": {"command": ["true"]}, "periodSeconds": 10}));
        assert_eq!(startup_retry(&exec, &timing(&exec), false), None);
        let mut fast = probe(serde_json::json!({"httpGet": {"port": 8080}}));
        let mut fast_timing = timing(&fast);
        fast_timing.period = Duration::from_millis(100);
        assert_eq!(startup_retry(&fast, &fast_timing, false), None);
        fast.period_seconds = Some(1);
        assert!(startup_retry(&fast, &timing(&fast), false).is_some());
    }
}
