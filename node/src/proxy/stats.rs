//! The proxy's counters, written every second (when changed) as JSON to
//! `<data_dir>/proxy-stats.json`, where tests and operators read them. The Ingress listener's
//! are `ingressAddress`, `ingressRequests`, `ingress404`, `ingress503` and
//! `ingressBadRequests`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use serde::Serialize;
use tokio_util::sync::CancellationToken;

pub(crate) const FILE_NAME: &str = "proxy-stats.json";

#[derive(Debug, Default)]
pub(crate) struct Stats {
    /// Client connections accepted on a frontend.
    pub(crate) connections: AtomicU64,
    /// Connections spliced to a pod on this node.
    pub(crate) direct: AtomicU64,
    /// Connections refused at once: no ready endpoint, or the endpoint could not be reached.
    pub(crate) refused: AtomicU64,
    /// Bytes copied between clients and endpoints, both ways, direct or tunnelled.
    pub(crate) bytes: AtomicU64,
    /// QUIC connections made to other nodes' proxies.
    pub(crate) tunnels_connected: AtomicU64,
    /// Streams opened on tunnels, by the node at the other end.
    pub(crate) streams_opened: Mutex<BTreeMap<String, u64>>,
    /// Streams accepted from other nodes' proxies, by their certificate's name... or address.
    pub(crate) streams_accepted: Mutex<BTreeMap<String, u64>>,
    /// Bytes sent into tunnels and received from them.
    pub(crate) tunnel_bytes_sent: AtomicU64,
    pub(crate) tunnel_bytes_received: AtomicU64,
    /// The frontends listened on and the cluster IPs bound, as last synced.
    pub(crate) frontends: Mutex<Vec<String>>,
    pub(crate) cluster_ips: Mutex<Vec<String>>,
    /// Where the Ingress listener listens, once it does.
    pub(crate) ingress_address: Mutex<Option<String>>,
    /// Complete request heads the Ingress listener read.
    pub(crate) ingress_requests: AtomicU64,
    /// Of those, the ones no rule matched (404) and the ones whose Service port had no
    /// endpoint that could be reached (503).
    pub(crate) ingress_not_found: AtomicU64,
    pub(crate) ingress_unavailable: AtomicU64,
    /// Heads malformed (400), too large (431) or too slow (408).
    pub(crate) ingress_bad_requests: AtomicU64,
}

#[derive(Debug, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
struct Snapshot {
    node: String,
    connections: u64,
    direct: u64,
    refused: u64,
    bytes: u64,
    tunnels_connected: u64,
    streams_opened: BTreeMap<String, u64>,
    streams_accepted: BTreeMap<String, u64>,
    tunnel_bytes_sent: u64,
    tunnel_bytes_received: u64,
    frontends: Vec<String>,
    cluster_ips: Vec<String>,
    ingress_address: Option<String>,
    ingress_requests: u64,
    #[serde(rename = "ingress404")]
    ingress_not_found: u64,
    #[serde(rename = "ingress503")]
    ingress_unavailable: u64,
    ingress_bad_requests: u64,
}

fn lock<T: Clone>(mutex: &Mutex<T>) -> T {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .clone()
}

pub(crate) fn bump(map: &Mutex<BTreeMap<String, u64>>, key: &str) {
    *map.lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .entry(key.to_owned())
        .or_default() += 1;
}

impl Stats {
    fn snapshot(&self, node: &str) -> Snapshot {
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        Snapshot {
            node: node.to_owned(),
            connections: load(&self.connections),
            direct: load(&self.direct),
            refused: load(&self.refused),
            bytes: load(&self.bytes),
            tunnels_connected: load(&self.tunnels_connected),
            streams_opened: lock(&self.streams_opened),
            streams_accepted: lock(&self.streams_accepted),
            tunnel_bytes_sent: load(&self.tunnel_bytes_sent),
            tunnel_bytes_received: load(&self.tunnel_bytes_received),
            frontends: lock(&self.frontends),
            cluster_ips: lock(&self.cluster_ips),
            ingress_address: lock(&self.ingress_address),
            ingress_requests: load(&self.ingress_requests),
            ingress_not_found: load(&self.ingress_not_found),
            ingress_unavailable: load(&self.ingress_unavailable),
            ingress_bad_requests: load(&self.ingress_bad_requests),
        }
    }
}

fn write_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let temporary = path.with_extension("json.tmp");
    std::fs::write(&temporary, bytes)?;
    std::fs::rename(&temporary, path)
}

/// Writes the counters to `<data_dir>/proxy-stats.json` every second while they change.
pub(crate) async fn run_writer(
    stats: std::sync::Arc<Stats>,
    node: String,
    data_dir: PathBuf,
    shutdown: CancellationToken,
) {
    let path = data_dir.join(FILE_NAME);
    let mut written: Option<Snapshot> = None;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let snapshot = stats.snapshot(&node);
        if written.as_ref() == Some(&snapshot) {
            continue;
        }
        match serde_json::to_vec_pretty(&snapshot) {
            Ok(bytes) => match write_file(&path, &bytes) {
                Ok(()) => {
                    if written
                        .as_ref()
                        .map(|w| (&w.streams_opened, &w.streams_accepted))
                        != Some((&snapshot.streams_opened, &snapshot.streams_accepted))
                    {
                        tracing::info!(
                            opened = ?snapshot.streams_opened,
                            accepted = ?snapshot.streams_accepted,
                            "proxy tunnel streams"
                        );
                    }
                    written = Some(snapshot);
                }
                Err(error) => tracing::warn!(%error, path = %path.display(), "write proxy stats"),
            },
            Err(error) => tracing::warn!(%error, "encode proxy stats"),
        }
    }
}
