//! The local Docker daemon as the benchmarks use it: a client for its API, containers created
//! and removed in parallel, and a guard that removes everything carrying a label.
//!
//! Nothing here touches a container or network that does not carry the labels it is given, so
//! a benchmark only ever removes what it (or the Flotilla cluster it started) created.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use bollard::query_parameters::{
    ListContainersOptionsBuilder, ListNetworksOptionsBuilder, RemoveContainerOptionsBuilder,
};
use bollard::Docker;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::cluster::flotilla_status;

/// How long one Docker API request may take.
const API_TIMEOUT: Duration = Duration::from_secs(120);

/// Connects to the local daemon (`DOCKER_HOST` or `/var/run/docker.sock`) and negotiates the
/// API version.
pub async fn connect() -> Result<Docker> {
    let mut docker = Docker::connect_with_local_defaults().context("connect to docker")?;
    docker.set_timeout(API_TIMEOUT);
    docker
        .negotiate_version()
        .await
        .context("negotiate the docker API version")
}

/// The label (`io.flotilla.cluster=<id>`) on every container and network of the Flotilla
/// cluster that the node at `addr` belongs to. Waits (up to `timeout`) for the node to know the
/// cluster's id: right after `--init` its status may not carry it yet.
pub async fn cluster_label(addr: SocketAddr, timeout: Duration) -> Result<String> {
    let deadline = Instant::now() + timeout;
    loop {
        let last = match flotilla_status(addr).await {
            Ok(status) if !status.cluster_id.is_empty() => {
                return Ok(format!("io.flotilla.cluster={}", status.cluster_id));
            }
            Ok(_) => "its status has no cluster id yet".to_owned(),
            Err(err) => format!("{err:#}"),
        };
        if Instant::now() >= deadline {
            bail!("the node at {addr} did not report the cluster id within {timeout:?}: {last}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Docker's filter map for containers or networks that carry every one of `labels`
/// (`key=value` each); several `label` filters are ANDed by the daemon.
pub fn label_filters(labels: &[String]) -> HashMap<String, Vec<String>> {
    HashMap::from([("label".to_owned(), labels.to_vec())])
}

/// Runs `job(i)` for `i` in `0..count`, at most `parallelism` at once; fails with the first
/// error after every started job has ended.
pub async fn in_parallel<F, Fut>(count: usize, parallelism: usize, job: F) -> Result<()>
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = Result<()>> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(parallelism.max(1)));
    let mut jobs = JoinSet::new();
    for index in 0..count {
        let slot = slots
            .clone()
            .acquire_owned()
            .await
            .context("acquire a slot")?;
        let work = job(index);
        jobs.spawn(async move {
            let result = work.await;
            drop(slot);
            result
        });
    }
    let mut first_error = None;
    while let Some(joined) = jobs.join_next().await {
        let result = joined
            .map_err(|err| anyhow!("a job panicked or was cancelled: {err}"))
            .and_then(|result| result);
        if let Err(err) = result {
            first_error.get_or_insert(err);
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// How many containers (running or not) carry all of `labels`.
pub async fn count_containers(docker: &Docker, labels: &[String]) -> Result<usize> {
    Ok(labelled_container_ids(docker, labels).await?.len())
}

/// The ids of the containers (running or not) carrying all of `labels`.
async fn labelled_container_ids(docker: &Docker, labels: &[String]) -> Result<Vec<String>> {
    let options = ListContainersOptionsBuilder::default()
        .all(true)
        .filters(&label_filters(labels))
        .build();
    Ok(docker
        .list_containers(Some(options))
        .await
        .with_context(|| format!("list containers labelled {labels:?}"))?
        .into_iter()
        .filter_map(|c| c.id)
        .collect())
}

/// Force-removes (with their anonymous volumes) every container carrying all of `labels`,
/// `parallelism` at once; returns how many there were.
pub async fn remove_containers(
    docker: &Docker,
    labels: &[String],
    parallelism: usize,
) -> Result<usize> {
    let ids = Arc::new(labelled_container_ids(docker, labels).await?);
    in_parallel(ids.len(), parallelism, |index| {
        let docker = docker.clone();
        let id = ids.get(index).cloned().unwrap_or_default();
        async move {
            let options = RemoveContainerOptionsBuilder::default()
                .force(true)
                .v(true)
                .build();
            match docker.remove_container(&id, Some(options)).await {
                Ok(()) => Ok(()),
                // Already gone, or being removed by someone else (an agent).
                Err(bollard::errors::Error::DockerResponseServerError {
                    status_code: 404 | 409,
                    ..
                }) => Ok(()),
                Err(err) => Err(err).with_context(|| format!("remove container {id}")),
            }
        }
    })
    .await?;
    Ok(ids.len())
}

/// Whether a network carrying all of `labels` exists.
pub async fn network_exists(docker: &Docker, labels: &[String]) -> Result<bool> {
    let options = ListNetworksOptionsBuilder::default()
        .filters(&label_filters(labels))
        .build();
    let networks = docker
        .list_networks(Some(options))
        .await
        .with_context(|| format!("list networks labelled {labels:?}"))?;
    Ok(!networks.is_empty())
}

/// The first `10.X.0.0/16` with X in `second_octets` that no Docker network's subnet lies in
/// (a network Docker cannot remove, with a stale endpoint count, would make a cluster in it
/// fail to create its pod network).
pub async fn free_cluster_cidr(
    docker: &Docker,
    second_octets: std::ops::RangeInclusive<u8>,
) -> Result<String> {
    let networks = docker
        .list_networks(None::<bollard::query_parameters::ListNetworksOptions>)
        .await
        .context("list the networks")?;
    let subnets: Vec<String> = networks
        .into_iter()
        .flat_map(|n| n.ipam.and_then(|ipam| ipam.config).unwrap_or_default())
        .filter_map(|config| config.subnet)
        .collect();
    second_octets
        .map(|second| format!("10.{second}."))
        .find(|prefix| !subnets.iter().any(|subnet| subnet.starts_with(prefix)))
        .map(|prefix| format!("{prefix}0.0/16"))
        .ok_or_else(|| anyhow!("no free 10.X.0.0/16 for a cluster: Docker networks use all"))
}

/// The names of the networks of any Flotilla cluster (label `io.flotilla.cluster`) on the
/// daemon. Each cluster numbers its nodes' pod subnets from 10.244.0.0/24, and Docker refuses a
/// second bridge network on a subnet in use: a cluster started while another one's networks
/// exist (a concurrent test, or one left behind) cannot run pods on its first nodes.
pub async fn flotilla_networks(docker: &Docker) -> Result<Vec<String>> {
    let options = ListNetworksOptionsBuilder::default()
        .filters(&HashMap::from([("label", vec!["io.flotilla.cluster"])]))
        .build();
    let networks = docker
        .list_networks(Some(options))
        .await
        .context("list the networks of Flotilla clusters")?;
    Ok(networks.into_iter().filter_map(|n| n.name).collect())
}

/// Warns when other Flotilla clusters' networks exist: they are harmless to this run (each
/// benchmark uses a cluster CIDR of its own) but they load the daemon and may skew figures.
pub async fn warn_about_other_clusters(docker: &Docker) -> Result<()> {
    let networks = flotilla_networks(docker).await?;
    if !networks.is_empty() {
        eprintln!(
            "warning: the Docker daemon already has networks of other Flotilla clusters ({}); \
             figures may be skewed if they are busy",
            networks.join(", ")
        );
    }
    Ok(())
}

/// The ids `docker <args>` prints, one per word (empty if the command fails).
fn docker_ids(args: &[&str]) -> Vec<String> {
    Command::new("docker")
        .args(args)
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .map(String::from)
                .collect()
        })
        .unwrap_or_default()
}

/// Removes, with the `docker` command, every container and then every network carrying all of
/// `labels`, and with one label the host bridges of nodes started with `--pod-bridge` that
/// carry it; returns how many containers and networks (bridges included) it found. Blocking:
/// for guards and for the end of a run.
pub fn remove_labelled(labels: &[String]) -> (usize, usize) {
    let (containers, networks) = remove_docker_labelled(labels);
    let bridges = match labels {
        [label] => flotilla_runtime::host_bridge::remove_labelled_blocking(label),
        _ => 0,
    };
    (containers, networks + bridges)
}

fn remove_docker_labelled(labels: &[String]) -> (usize, usize) {
    let filters: Vec<String> = labels
        .iter()
        .flat_map(|label| ["--filter".to_owned(), format!("label={label}")])
        .collect();
    let filters: Vec<&str> = filters.iter().map(String::as_str).collect();
    let list_containers = || docker_ids(&[&["ps", "-aq"][..], &filters[..]].concat());
    let list_networks = || docker_ids(&[&["network", "ls", "-q"][..], &filters[..]].concat());
    let mut removed_containers = HashSet::new();
    let mut removed_networks = HashSet::new();
    let mut last_error = String::new();
    // A container whose removal is already under way (e.g. asked by a killed agent) still
    // holds its network endpoint for a moment: list again and retry, a bounded number of times.
    for attempt in 0..REMOVE_ATTEMPTS {
        if attempt > 0 {
            std::thread::sleep(REMOVE_RETRY_PAUSE);
        }
        let containers = list_containers();
        if !containers.is_empty() {
            if let Err(err) = run_docker(&[&["rm", "-f", "-v"][..], &as_strs(&containers)].concat())
            {
                last_error = err;
            }
            removed_containers.extend(containers);
        }
        let networks = list_networks();
        if !networks.is_empty() {
            if let Err(err) = run_docker(&[&["network", "rm"][..], &as_strs(&networks)].concat()) {
                last_error = err;
            }
            removed_networks.extend(networks);
        }
        if list_containers().is_empty() && list_networks().is_empty() {
            return (removed_containers.len(), removed_networks.len());
        }
    }
    eprintln!(
        "warning: containers or networks labelled {labels:?} are left after \
         {REMOVE_ATTEMPTS} attempts: containers {:?}, networks {:?}; last error: {last_error} \
         (a network refused with \"has active endpoints\" while it lists no containers has a \
         stale Docker endpoint count: only a restart of dockerd clears it)",
        list_containers(),
        list_networks()
    );
    (removed_containers.len(), removed_networks.len())
}

/// How many times [`remove_labelled`] lists and removes before it gives up.
const REMOVE_ATTEMPTS: usize = 10;
/// The pause between two attempts of [`remove_labelled`].
const REMOVE_RETRY_PAUSE: Duration = Duration::from_secs(1);

fn as_strs(items: &[String]) -> Vec<&str> {
    items.iter().map(String::as_str).collect()
}

/// Runs `docker <args>`; the error is its stderr.
fn run_docker(args: &[&str]) -> std::result::Result<(), String> {
    match Command::new("docker").args(args).output() {
        Ok(output) if output.status.success() => Ok(()),
        Ok(output) => Err(String::from_utf8_lossy(&output.stderr).trim().to_owned()),
        Err(err) => Err(format!("run docker: {err}")),
    }
}

/// Removes every container and network carrying all of its labels when dropped (nothing while
/// it has none). Declare it before a [`crate::cluster::FlotillaCluster`] so that it is dropped
/// after the cluster's processes are dead: a live agent would start its pods again.
#[derive(Debug, Default)]
pub struct LabelCleanup {
    labels: Vec<String>,
}

impl LabelCleanup {
    /// A guard for everything labelled `label` (`key=value`).
    pub fn new(label: impl Into<String>) -> Self {
        Self {
            labels: vec![label.into()],
        }
    }

    /// From now on, the guard removes what carries `label` (`key=value`).
    pub fn set(&mut self, label: impl Into<String>) {
        self.labels = vec![label.into()];
    }
}

impl Drop for LabelCleanup {
    fn drop(&mut self) {
        if self.labels.is_empty() {
            return;
        }
        let (containers, networks) = remove_labelled(&self.labels);
        if containers + networks > 0 {
            println!(
                "cleanup: removed {containers} containers and {networks} networks labelled {}",
                self.labels.join(",")
            );
        }
    }
}
