//! The faults of each scenario, and what each one must show beyond the checks every
//! scenario gets (linearizable history, no lost write, identical stores, workloads restored,
//! no pod running twice; see `runner.rs`).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use flotilla_local::{LocalCluster, LocalNode};
use flotilla_proto::objects_client::ObjectsClient;
use flotilla_proto::{DeleteRequest, ListRequest, ObjectRequest};
use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use serde_json::{json, Value};

use crate::cluster::{connect, flotilla_status};
use crate::history::History;

/// Every scenario, by the name `run` takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    LeaderKill,
    FollowerKills,
    LeaderIsolation,
    OneWayIsolation,
    QuorumLoss,
    LeaderPause,
    RollingRestart,
    KillAll,
    DiskFull,
    LaggingFollower,
    MembershipDuringLeaderKill,
    MachineLoss,
    ContainersKilled,
}

impl Scenario {
    pub const ALL: [Scenario; 13] = [
        Scenario::LeaderKill,
        Scenario::FollowerKills,
        Scenario::LeaderIsolation,
        Scenario::OneWayIsolation,
        Scenario::QuorumLoss,
        Scenario::LeaderPause,
        Scenario::RollingRestart,
        Scenario::KillAll,
        Scenario::DiskFull,
        Scenario::LaggingFollower,
        Scenario::MembershipDuringLeaderKill,
        Scenario::MachineLoss,
        Scenario::ContainersKilled,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Scenario::LeaderKill => "leader-kill",
            Scenario::FollowerKills => "follower-kills",
            Scenario::LeaderIsolation => "leader-isolation",
            Scenario::OneWayIsolation => "one-way-isolation",
            Scenario::QuorumLoss => "quorum-loss",
            Scenario::LeaderPause => "leader-pause",
            Scenario::RollingRestart => "rolling-restart",
            Scenario::KillAll => "kill-all",
            Scenario::DiskFull => "disk-full",
            Scenario::LaggingFollower => "lagging-follower",
            Scenario::MembershipDuringLeaderKill => "membership-during-leader-kill",
            Scenario::MachineLoss => "machine-loss",
            Scenario::ContainersKilled => "containers-killed",
        }
    }

    pub fn parse(name: &str) -> Option<Scenario> {
        Scenario::ALL.into_iter().find(|s| s.name() == name)
    }

    /// What the scenario does and what it must show, as the report prints it.
    pub fn description(self) -> &'static str {
        match self {
            Scenario::LeaderKill => "kill -9 the leader under load, restart it; a new leader is elected",
            Scenario::FollowerKills => "kill -9 a random follower and restart it, three times",
            Scenario::LeaderIsolation => {
                "cut the leader off both ways for 4 s; the isolated node acknowledges nothing meanwhile"
            }
            Scenario::OneWayIsolation => {
                "drop what the leader receives for 4 s; it acknowledges nothing meanwhile"
            }
            Scenario::QuorumLoss => {
                "kill a majority for 4 s; the survivors acknowledge nothing, then all recover"
            }
            Scenario::LeaderPause => {
                "freeze the leader past the election timeout, thaw it; it must not act on its old term"
            }
            Scenario::RollingRestart => "stop (SIGTERM) and start every node in turn",
            Scenario::KillAll => "kill -9 every node at once and restart them; nothing acknowledged is lost",
            Scenario::DiskFull => {
                "fill the last node's small data disk; the others keep serving, nothing is lost"
            }
            Scenario::LaggingFollower => {
                "kill a follower, write past two snapshots, restart it; it catches up from a snapshot"
            }
            Scenario::MembershipDuringLeaderKill => "add a node while killing the leader; it becomes a member",
            Scenario::MachineLoss => "kill a node with its pods; replacements run elsewhere, none twice after",
            Scenario::ContainersKilled => {
                "kill a node's pod containers behind its agent; the agent restarts them"
            }
        }
    }

    /// Extra `serve` flags the scenario's nodes need.
    pub fn node_args(self) -> Vec<String> {
        match self {
            // Snapshots every 300 entries, so a follower away for seconds needs one.
            Scenario::LaggingFollower => [
                "--snapshot-every-entries",
                "300",
                "--log-entries-kept-after-snapshot",
                "50",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect(),
            _ => Vec::new(),
        }
    }

    /// Nodes whose data directory is a small tmpfs, as (1-based index, MiB).
    pub fn small_disks(self, nodes: usize) -> Vec<(usize, u64)> {
        match self {
            Scenario::DiskFull => vec![(nodes, 32)],
            _ => Vec::new(),
        }
    }
}

/// What a scenario measured and what the runner must check beyond the common checks.
#[derive(Debug, Default)]
pub struct Measures {
    pub new_leader: Vec<Duration>,
    pub replicas_restored: Vec<Duration>,
    /// (node, from, to) in history time (ns): no operation through `node` may succeed.
    pub quiet_windows: Vec<(String, u64, u64)>,
    /// Nodes left broken on purpose, left out of the final checks.
    pub excluded: Vec<String>,
    pub notes: Vec<String>,
    /// Failures the scenario found itself.
    pub failures: Vec<String>,
}

/// What a scenario works with.
pub struct Context<'a> {
    pub cluster: &'a mut LocalCluster,
    pub history: &'a History,
    pub random: StdRng,
    /// The Deployment every scenario runs, and its replicas.
    pub app: &'a str,
    pub replicas: usize,
    pub measures: Measures,
}

const POLL: Duration = Duration::from_millis(20);
/// After a cut, how long the minority may still answer: replies already decided, and reads
/// under the old leader's lease (the longest election timeout, 500 ms), plus slack.
const QUIET_MARGIN_NS: u64 = 800_000_000;

/// The node a majority of the reachable nodes names as leader.
pub async fn current_leader(nodes: &[LocalNode]) -> Option<LocalNode> {
    let mut votes: Vec<(String, usize)> = Vec::new();
    for node in nodes {
        if let Ok(status) = flotilla_status(node.addr()).await {
            if let Some(leader) = status.leader {
                match votes.iter_mut().find(|(name, _)| *name == leader) {
                    Some((_, count)) => *count += 1,
                    None => votes.push((leader, 1)),
                }
            }
        }
    }
    let (name, _) = votes.into_iter().max_by_key(|(_, count)| *count)?;
    nodes.iter().find(|n| n.name == name).cloned()
}

async fn leader_of(cluster: &LocalCluster) -> Result<LocalNode> {
    for _ in 0..100 {
        if let Some(leader) = current_leader(cluster.nodes()).await {
            return Ok(leader);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("no leader among {}", cluster.servers())
}

/// Time from `since` until one of `watchers` names a leader other than `old`.
async fn wait_new_leader(
    watchers: &[LocalNode],
    old: &str,
    since: Instant,
    limit: Duration,
) -> Option<Duration> {
    while since.elapsed() < limit {
        for node in watchers {
            if let Ok(status) = flotilla_status(node.addr()).await {
                if status.leader.as_deref().is_some_and(|leader| leader != old) {
                    return Some(since.elapsed());
                }
            }
        }
        tokio::time::sleep(POLL).await;
    }
    None
}

fn others(cluster: &LocalCluster, name: &str) -> Vec<LocalNode> {
    cluster
        .nodes()
        .iter()
        .filter(|n| n.name != name)
        .cloned()
        .collect()
}

/// The Deployment's pods as (name, node, ready).
pub async fn app_pods(target: SocketAddr, app: &str) -> Result<Vec<(String, String, bool)>> {
    let channel = connect(target, Duration::from_secs(2)).await?;
    let reply = tokio::time::timeout(
        Duration::from_secs(3),
        ObjectsClient::new(channel).list(ListRequest {
            kind: "Pod".into(),
            namespace: "default".into(),
            label_selector: format!("app={app}"),
            field_selector: String::new(),
            local: false,
        }),
    )
    .await
    .context("list pods: timed out")?
    .map_err(|status| anyhow::anyhow!("list pods: {}", status.message()))?;
    let mut pods = Vec::new();
    for item in reply.into_inner().items_json {
        let pod: Value = serde_json::from_slice(&item)?;
        let text = |pointer: &str| {
            pod.pointer(pointer)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned()
        };
        let ready = pod
            .pointer("/status/conditions")
            .and_then(Value::as_array)
            .is_some_and(|conditions| {
                conditions
                    .iter()
                    .any(|c| c["type"] == "Ready" && c["status"] == "True")
            });
        pods.push((text("/metadata/name"), text("/spec/nodeName"), ready));
    }
    Ok(pods)
}

/// Waits until `replicas` pods of the app are Ready on nodes other than `lost`.
pub async fn wait_replicas_ready(
    cluster: &LocalCluster,
    app: &str,
    replicas: usize,
    lost: &[String],
    limit: Duration,
) -> Result<Duration> {
    let started = Instant::now();
    let mut last = String::from("no answer");
    while started.elapsed() < limit {
        for node in cluster.nodes().iter().filter(|n| !lost.contains(&n.name)) {
            match app_pods(node.addr(), app).await {
                Ok(pods) => {
                    let ready = pods
                        .iter()
                        .filter(|(_, node, ready)| *ready && !lost.contains(node))
                        .count();
                    if ready >= replicas {
                        return Ok(started.elapsed());
                    }
                    last = format!("{ready} of {replicas} ready ({} pods)", pods.len());
                    break;
                }
                Err(error) => last = error.to_string(),
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("{replicas} replicas of {app} Ready within {limit:?}: {last}")
}

/// How full the node's data directory is, from busybox `df` in its container (0 if unknown).
async fn disk_used_percent(cluster: &LocalCluster, node: &str) -> u32 {
    let printed = cluster
        .exec(node, &["df", "-k", "/data"])
        .await
        .unwrap_or_default();
    printed
        .lines()
        .last()
        .and_then(|line| line.split_whitespace().find(|f| f.ends_with('%')))
        .and_then(|f| f.trim_end_matches('%').parse().ok())
        .unwrap_or(0)
}

impl Context<'_> {
    fn now_ns(&self) -> u64 {
        self.history.now_ns()
    }

    fn pick<'n>(&mut self, nodes: &'n [LocalNode]) -> Result<&'n LocalNode> {
        nodes.choose(&mut self.random).context("no node to pick")
    }

    /// Records the time from `started` until another node leads, or a failure after 10 s.
    async fn measure_new_leader(&mut self, old: &str, started: Instant) {
        let watchers = others(self.cluster, old);
        match wait_new_leader(&watchers, old, started, Duration::from_secs(10)).await {
            Some(elapsed) => self.measures.new_leader.push(elapsed),
            None => self
                .measures
                .failures
                .push(format!("no node but {old} leads within 10 s of the fault")),
        }
    }

    async fn leader_kill(&mut self) -> Result<()> {
        let leader = leader_of(self.cluster).await?;
        let started = Instant::now();
        self.cluster.kill(&leader.name, false).await?;
        self.measure_new_leader(&leader.name, started).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        self.cluster.restart(&leader.name).await?;
        Ok(())
    }

    async fn follower_kills(&mut self) -> Result<()> {
        for _ in 0..3 {
            let leader = leader_of(self.cluster).await?;
            let followers = others(self.cluster, &leader.name);
            let victim = self.pick(&followers)?.clone();
            self.cluster.kill(&victim.name, false).await?;
            tokio::time::sleep(Duration::from_millis(1500)).await;
            self.cluster.restart(&victim.name).await?;
            self.cluster.wait_healthy(Duration::from_secs(30)).await?;
        }
        Ok(())
    }

    /// Isolates the leader (both ways, or only what it receives) for 4 s.
    async fn leader_isolation(&mut self, one_way: bool) -> Result<()> {
        let leader = leader_of(self.cluster).await?;
        let started = Instant::now();
        self.cluster.isolate(&leader.name, one_way).await?;
        // Replies decided before the cut may still arrive, and the old leader may serve
        // reads under its lease (safe: no one else can lead before it ends) for one longest
        // election timeout.
        let quiet_from = self.now_ns() + QUIET_MARGIN_NS;
        match wait_new_leader(
            &others(self.cluster, &leader.name),
            &leader.name,
            started,
            Duration::from_secs(4),
        )
        .await
        {
            Some(elapsed) => self.measures.new_leader.push(elapsed),
            None if one_way => self.measures.notes.push(
                "one-way: the followers kept hearing the old leader; no election until healed"
                    .into(),
            ),
            None => self
                .measures
                .failures
                .push("no new leader while the old one was cut off".into()),
        }
        let remaining = Duration::from_secs(4).saturating_sub(started.elapsed());
        tokio::time::sleep(remaining).await;
        let quiet_to = self.now_ns();
        self.cluster.heal(&leader.name).await?;
        self.measures
            .quiet_windows
            .push((leader.name.clone(), quiet_from, quiet_to));
        Ok(())
    }

    async fn quorum_loss(&mut self) -> Result<()> {
        let nodes = self.cluster.nodes().to_vec();
        let majority = nodes.len() / 2 + 1;
        let mut victims = nodes.clone();
        // Keep a random minority alive.
        while victims.len() > majority {
            let index = rand::Rng::random_range(&mut self.random, 0..victims.len());
            victims.remove(index);
        }
        for victim in &victims {
            self.cluster.kill(&victim.name, false).await?;
        }
        let quiet_from = self.now_ns() + QUIET_MARGIN_NS;
        tokio::time::sleep(Duration::from_secs(4)).await;
        let quiet_to = self.now_ns();
        for survivor in nodes.iter().filter(|n| !victims.contains(n)) {
            self.measures
                .quiet_windows
                .push((survivor.name.clone(), quiet_from, quiet_to));
        }
        for victim in &victims {
            self.cluster.restart(&victim.name).await?;
        }
        Ok(())
    }

    async fn leader_pause(&mut self) -> Result<()> {
        let leader = leader_of(self.cluster).await?;
        let started = Instant::now();
        self.cluster.pause(&leader.name).await?;
        self.measure_new_leader(&leader.name, started).await;
        // Well past the election timeout (500 ms at most).
        tokio::time::sleep(Duration::from_millis(1500)).await;
        self.cluster.unpause(&leader.name).await?;
        Ok(())
    }

    async fn rolling_restart(&mut self) -> Result<()> {
        for node in self.cluster.nodes().to_vec() {
            self.cluster.restart(&node.name).await?;
            self.cluster.wait_healthy(Duration::from_secs(40)).await?;
        }
        Ok(())
    }

    async fn kill_all(&mut self) -> Result<()> {
        for node in self.cluster.nodes().to_vec() {
            self.cluster.kill(&node.name, false).await?;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        for node in self.cluster.nodes().to_vec() {
            self.cluster.restart(&node.name).await?;
        }
        Ok(())
    }

    /// Writes ~1 MiB objects until the small-disk node stops answering (or 80 of them), then
    /// deletes them again.
    async fn disk_full(&mut self) -> Result<()> {
        let nodes = self.cluster.nodes().to_vec();
        let full = nodes.last().context("no node")?.clone();
        let writer = nodes.first().context("no node")?.clone();
        let mut written = 0;
        let mut attempted = 0;
        let mut full_at = None;
        let mut used_percent = 0;
        for index in 0..80 {
            // Random text: RocksDB compresses its files, and a repeated byte takes no room.
            let filler: String = (0..1_000_000)
                .map(|_| char::from(b'a' + rand::Rng::random_range(&mut self.random, 0..26u8)))
                .collect();
            let object = json!({
                "apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": format!("filler-{index}"), "namespace": "default"},
                "data": {"fill": filler},
            });
            let channel = connect(writer.addr(), Duration::from_secs(2)).await?;
            let result = tokio::time::timeout(
                Duration::from_secs(5),
                ObjectsClient::new(channel).apply(ObjectRequest {
                    object_json: serde_json::to_vec(&object)?,
                }),
            )
            .await;
            if matches!(result, Ok(Ok(_))) {
                written += 1;
            }
            attempted = index + 1;
            if index % 2 == 1 {
                used_percent = disk_used_percent(self.cluster, &full.name).await;
                // RocksDB removes the file it failed to write, so the disk may look less
                // than full once the node has stopped on it: its log tells.
                let logs = self.cluster.logs(&full.name).await.unwrap_or_default();
                let out_of_space =
                    String::from_utf8_lossy(&logs).contains("No space left on device");
                if used_percent >= 95 || out_of_space {
                    full_at = Some(index);
                    break;
                }
            }
        }
        self.measures.notes.push(format!(
            "{written} filler objects of 1 MB written; {}'s /data {used_percent}% used{}",
            full.name,
            full_at
                .map(|i| format!(" after {} fillers", i + 1))
                .unwrap_or_default()
        ));
        if full_at.is_none() {
            self.measures
                .failures
                .push(format!("{}'s small disk never filled", full.name));
        }
        // Some writes may have committed without an answer: delete every one attempted.
        for index in 0..attempted {
            let channel = connect(writer.addr(), Duration::from_secs(2)).await?;
            let _ = ObjectsClient::new(channel)
                .delete(DeleteRequest {
                    kind: "ConfigMap".into(),
                    namespace: "default".into(),
                    name: format!("filler-{index}"),
                    resource_version: String::new(),
                })
                .await;
        }
        self.measures.excluded.push(full.name.clone());
        Ok(())
    }

    async fn lagging_follower(&mut self) -> Result<()> {
        let leader = leader_of(self.cluster).await?;
        let followers = others(self.cluster, &leader.name);
        let lagging = self.pick(&followers)?.clone();
        self.cluster.kill(&lagging.name, false).await?;
        // Node heartbeats and the workload write far more than 600 entries meanwhile.
        tokio::time::sleep(Duration::from_secs(8)).await;
        self.cluster.restart(&lagging.name).await?;
        self.cluster.wait_healthy(Duration::from_secs(40)).await?;
        let logs = String::from_utf8_lossy(&self.cluster.logs(&lagging.name).await?).into_owned();
        if logs.contains("installed snapshot") {
            self.measures
                .notes
                .push(format!("{} caught up from a snapshot", lagging.name));
        } else {
            self.measures.failures.push(format!(
                "{} caught up without installing a snapshot",
                lagging.name
            ));
        }
        Ok(())
    }

    async fn membership_during_leader_kill(&mut self) -> Result<()> {
        let leader = leader_of(self.cluster).await?;
        let through = others(self.cluster, &leader.name)
            .first()
            .map(|n| n.name.clone())
            .context("no follower")?;
        let started = Instant::now();
        self.cluster.kill(&leader.name, false).await?;
        let added = self.cluster.add_node(Some(&through)).await?;
        self.measure_new_leader(&leader.name, started).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        self.cluster.restart(&leader.name).await?;
        self.cluster.wait_healthy(Duration::from_secs(60)).await?;
        self.measures.notes.push(format!(
            "{} joined while {} was down",
            added.name, leader.name
        ));
        Ok(())
    }

    async fn machine_loss(&mut self) -> Result<()> {
        let nodes = self.cluster.nodes().to_vec();
        let pods = app_pods(nodes[0].addr(), self.app).await?;
        let candidates: Vec<LocalNode> = nodes
            .iter()
            .filter(|n| pods.iter().any(|(_, node, _)| *node == n.name))
            .cloned()
            .collect();
        let victim = self.pick(&candidates)?.clone();
        self.cluster.kill(&victim.name, true).await?;
        let lost = vec![victim.name.clone()];
        let restored = wait_replicas_ready(
            self.cluster,
            self.app,
            self.replicas,
            &lost,
            Duration::from_secs(60),
        )
        .await?;
        self.measures.replicas_restored.push(restored);
        self.cluster.restart(&victim.name).await?;
        Ok(())
    }

    async fn containers_killed(&mut self) -> Result<()> {
        let nodes = self.cluster.nodes().to_vec();
        let victim = self.pick(&nodes)?.clone();
        let containers = self.cluster.pod_containers(&victim.name).await?;
        let started = Instant::now();
        for (id, _) in &containers {
            let _ = self
                .cluster
                .docker()
                .kill_container(id, None::<bollard::query_parameters::KillContainerOptions>)
                .await;
        }
        // Ready again means the agent noticed, restarted, and reported.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let restored = wait_replicas_ready(
            self.cluster,
            self.app,
            self.replicas,
            &[],
            Duration::from_secs(60),
        )
        .await?;
        self.measures
            .replicas_restored
            .push(started.elapsed().max(restored));
        self.measures.notes.push(format!(
            "killed {} containers on {}",
            containers.len(),
            victim.name
        ));
        Ok(())
    }

    /// Runs the scenario's faults; it leaves every node running (or excluded) when done.
    pub async fn inject(&mut self, scenario: Scenario) -> Result<()> {
        match scenario {
            Scenario::LeaderKill => self.leader_kill().await,
            Scenario::FollowerKills => self.follower_kills().await,
            Scenario::LeaderIsolation => self.leader_isolation(false).await,
            Scenario::OneWayIsolation => self.leader_isolation(true).await,
            Scenario::QuorumLoss => self.quorum_loss().await,
            Scenario::LeaderPause => self.leader_pause().await,
            Scenario::RollingRestart => self.rolling_restart().await,
            Scenario::KillAll => self.kill_all().await,
            Scenario::DiskFull => self.disk_full().await,
            Scenario::LaggingFollower => self.lagging_follower().await,
            Scenario::MembershipDuringLeaderKill => self.membership_during_leader_kill().await,
            Scenario::MachineLoss => self.machine_loss().await,
            Scenario::ContainersKilled => self.containers_killed().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_scenario_is_found_by_its_name() {
        for scenario in Scenario::ALL {
            assert_eq!(Scenario::parse(scenario.name()), Some(scenario));
        }
        assert_eq!(Scenario::parse("no-such-thing"), None);
    }
}
