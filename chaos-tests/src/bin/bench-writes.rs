//! Write benchmark: Flotilla against etcd, with the same load generator, on 127.0.0.1.
//!
//! For each cluster size (`--sizes`, default 1 and 3) it starts a Flotilla cluster of real
//! `flotilla serve` processes and then an etcd cluster of the same size, and drives each with 1
//! and 64 concurrent clients (`--clients`) writing 256-byte values (`--value-size`) for
//! `--seconds` after a `--warmup`. A Flotilla write is an `Objects.Apply` of a ConfigMap; an etcd
//! write is a `KV.Put`. Each client has its own connection, to node `client % size`.
//!
//! Then it measures failover on a fresh 3-node Flotilla cluster `--kills` times: it finds the
//! leader, kills its process with SIGKILL, times the first write acknowledged through a
//! survivor, restarts the killed node on its data directory and waits until it is healthy again.
//!
//! It prints the command line, a table of both systems side by side, and the failover p50/p99.
//! Every process it starts is killed and every temporary directory removed on exit, on error
//! and on Ctrl-C.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use chaos_tests::cluster::{
    apply_configmap, connect, connect_plain, etcd_put, EtcdCluster, FlotillaCluster, RestartMode,
};
use chaos_tests::etcdserverpb::kv_client::KvClient;
use chaos_tests::stats::{millis, percentile};
use clap::Parser;
use flotilla_proto::objects_client::ObjectsClient;
use tokio::task::JoinSet;
use tonic::transport::Channel;

/// At most this many writes per client and phase, whatever the duration.
const MAX_WRITES_PER_CLIENT: u64 = 10_000_000;
/// The pause after a failed write in a load phase, so that a broken cluster is not hammered.
const ERROR_BACKOFF: Duration = Duration::from_millis(10);
/// At most this many probe rounds (one write per survivor each) per failover.
const MAX_FAILOVER_ROUNDS: u64 = 20_000;
/// How long opening a client connection may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Parser)]
#[command(about = "Write throughput, latency and failover of Flotilla, side by side with etcd")]
struct Args {
    /// The flotilla binary [default: `flotilla` next to this executable].
    #[arg(long)]
    flotilla: Option<PathBuf>,
    /// The etcd binary.
    #[arg(long, default_value = "/usr/bin/etcd")]
    etcd: PathBuf,
    /// Measured duration of each load phase, in seconds.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Warm-up before each load phase, in seconds (writes made then are not counted).
    #[arg(long, default_value_t = 2)]
    warmup: u64,
    /// Cluster sizes to measure, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "1,3")]
    sizes: Vec<usize>,
    /// Numbers of concurrent clients, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "1,64")]
    clients: Vec<usize>,
    /// Size of each written value in bytes.
    #[arg(long, default_value_t = 256)]
    value_size: usize,
    /// How many times to kill the leader of a 3-node Flotilla cluster (0 skips failover).
    #[arg(long, default_value_t = 10)]
    kills: usize,
    /// Timeout of one write in a load phase, in milliseconds.
    #[arg(long, default_value_t = 5000)]
    request_timeout_ms: u64,
    /// Timeout of one write attempt while waiting for failover, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    failover_request_timeout_ms: u64,
    /// Interval between two failover probe rounds (one write per survivor, attempts overlap),
    /// in milliseconds: the resolution of the failover times.
    #[arg(long, default_value_t = 10)]
    failover_probe_interval_ms: u64,
    /// Give up on a failover that has not acknowledged a write after this many seconds.
    #[arg(long, default_value_t = 30)]
    failover_max_seconds: u64,
    /// How long a cluster may take to start, or a killed node to be healthy again, in seconds.
    #[arg(long, default_value_t = 60)]
    ready_timeout: u64,
    /// Measure Flotilla only.
    #[arg(long)]
    skip_etcd: bool,
    /// Measure etcd only (no Flotilla load phases, no failover).
    #[arg(long, conflicts_with = "skip_etcd")]
    skip_flotilla: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum System {
    Flotilla,
    Etcd,
}

/// One client's connection: all writes of a client go through it.
enum Writer {
    Flotilla(ObjectsClient<Channel>),
    Etcd(KvClient<Channel>),
}

impl Writer {
    async fn connect(system: System, addr: SocketAddr) -> Result<Self> {
        let channel = match system {
            System::Flotilla => connect(addr, CONNECT_TIMEOUT).await?,
            System::Etcd => connect_plain(addr, CONNECT_TIMEOUT).await?,
        };
        Ok(match system {
            System::Flotilla => Self::Flotilla(ObjectsClient::new(channel)),
            System::Etcd => Self::Etcd(KvClient::new(channel)),
        })
    }

    /// One write of `value` under `key` (the ConfigMap's name, or the etcd key).
    async fn write(&mut self, key: &str, value: &str) -> Result<()> {
        match self {
            Self::Flotilla(client) => apply_configmap(client, key, value).await,
            Self::Etcd(client) => etcd_put(client, key, value).await,
        }
    }
}

/// Makes the pseudo-random alphanumeric values the clients write (xorshift64*, seeded per
/// client), so that no two writes carry the same bytes.
struct Values {
    state: u64,
    buffer: String,
}

impl Values {
    fn new(seed: u64, size: usize) -> Self {
        Self {
            state: seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
            buffer: String::with_capacity(size),
        }
    }

    fn next(&mut self, size: usize) -> &str {
        const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
        self.buffer.clear();
        for _ in 0..size {
            self.state ^= self.state >> 12;
            self.state ^= self.state << 25;
            self.state ^= self.state >> 27;
            let random = self.state.wrapping_mul(0x2545_F491_4F6C_DD1D);
            let index = (random >> 32) as usize % ALPHABET.len();
            self.buffer
                .push(char::from(ALPHABET.get(index).copied().unwrap_or(b'x')));
        }
        &self.buffer
    }
}

/// The timing of one load phase.
#[derive(Debug, Clone, Copy)]
struct Window {
    measure_start: Instant,
    end: Instant,
    request_timeout: Duration,
    value_size: usize,
}

/// What one client saw during a load phase.
#[derive(Debug, Default)]
struct ClientStats {
    /// Latencies of the writes started and acknowledged inside the measured window.
    latencies: Vec<Duration>,
    errors: u64,
    first_error: Option<String>,
}

async fn client_loop(mut writer: Writer, client: u64, window: Window) -> ClientStats {
    let mut stats = ClientStats::default();
    let mut values = Values::new(client, window.value_size);
    for seq in 0..MAX_WRITES_PER_CLIENT {
        let started = Instant::now();
        if started >= window.end {
            break;
        }
        let key = format!("bench-{client}-{seq}");
        let value = values.next(window.value_size);
        let outcome = tokio::time::timeout(window.request_timeout, writer.write(&key, value)).await;
        let done = Instant::now();
        let counted = started >= window.measure_start && done <= window.end;
        match outcome {
            Ok(Ok(())) => {
                if counted {
                    stats.latencies.push(done - started);
                }
            }
            Ok(Err(err)) => {
                stats.errors += 1;
                stats.first_error.get_or_insert_with(|| format!("{err:#}"));
                tokio::time::sleep(ERROR_BACKOFF).await;
            }
            Err(_) => {
                stats.errors += 1;
                stats.first_error.get_or_insert_with(|| {
                    format!("a write timed out after {:?}", window.request_timeout)
                });
            }
        }
    }
    stats
}

/// The result of one load phase.
#[derive(Debug, Clone)]
struct PhaseResult {
    writes_per_second: f64,
    p50: Option<Duration>,
    p99: Option<Duration>,
    errors: u64,
    first_error: Option<String>,
}

/// Runs `clients` concurrent clients against `addrs` (client `i` on `addrs[i % len]`), each
/// with its own connection, for the warm-up and the measured duration.
async fn run_phase(
    system: System,
    addrs: &[SocketAddr],
    clients: usize,
    first_client_id: u64,
    args: &Args,
) -> Result<PhaseResult> {
    if addrs.is_empty() {
        bail!("no address to send writes to");
    }
    let mut writers = Vec::with_capacity(clients);
    for index in 0..clients {
        let addr = addrs
            .get(index % addrs.len())
            .copied()
            .ok_or_else(|| anyhow!("no address for client {index}"))?;
        writers.push(Writer::connect(system, addr).await?);
    }
    let start = Instant::now();
    let window = Window {
        measure_start: start + Duration::from_secs(args.warmup),
        end: start + Duration::from_secs(args.warmup + args.seconds),
        request_timeout: Duration::from_millis(args.request_timeout_ms),
        value_size: args.value_size,
    };
    let mut tasks = JoinSet::new();
    for (index, writer) in writers.into_iter().enumerate() {
        tasks.spawn(client_loop(writer, first_client_id + index as u64, window));
    }
    let mut latencies = Vec::new();
    let mut errors = 0;
    let mut first_error = None;
    while let Some(joined) = tasks.join_next().await {
        let stats = joined.context("join a client task")?;
        latencies.extend(stats.latencies);
        errors += stats.errors;
        if first_error.is_none() {
            first_error = stats.first_error;
        }
    }
    latencies.sort_unstable();
    Ok(PhaseResult {
        writes_per_second: latencies.len() as f64 / args.seconds as f64,
        p50: percentile(&latencies, 50.0),
        p99: percentile(&latencies, 99.0),
        errors,
        first_error,
    })
}

/// One row of the result table.
#[derive(Debug)]
struct Row {
    size: usize,
    clients: usize,
    flotilla: Option<PhaseResult>,
    etcd: Option<PhaseResult>,
}

/// Runs every client count against one cluster and stores the results in `rows`.
async fn measure_cluster(
    system: System,
    size: usize,
    addrs: &[SocketAddr],
    args: &Args,
    next_client_id: &mut u64,
    rows: &mut Vec<Row>,
) -> Result<()> {
    for &clients in &args.clients {
        println!(
            "  {system:?} {size} node(s), {clients} client(s): {} s warm-up + {} s ...",
            args.warmup, args.seconds
        );
        let result = run_phase(system, addrs, clients, *next_client_id, args)
            .await
            .with_context(|| {
                format!("measure {system:?} with {size} node(s), {clients} client(s)")
            })?;
        *next_client_id += clients as u64;
        println!(
            "    {:.1} writes/s, p50 {} ms, p99 {} ms, {} error(s)",
            result.writes_per_second,
            opt_millis(result.p50),
            opt_millis(result.p99),
            result.errors
        );
        if let Some(err) = &result.first_error {
            println!("    first error: {err}");
        }
        let row = match rows
            .iter()
            .position(|r| r.size == size && r.clients == clients)
        {
            Some(index) => rows
                .get_mut(index)
                .ok_or_else(|| anyhow!("row {index} vanished"))?,
            None => {
                rows.push(Row {
                    size,
                    clients,
                    flotilla: None,
                    etcd: None,
                });
                rows.last_mut()
                    .ok_or_else(|| anyhow!("row just pushed vanished"))?
            }
        };
        match system {
            System::Flotilla => row.flotilla = Some(result),
            System::Etcd => row.etcd = Some(result),
        }
    }
    Ok(())
}

/// One leader kill and what followed.
#[derive(Debug)]
struct FailoverSample {
    /// From the SIGKILL to the first write acknowledged through a survivor.
    failover: Duration,
}

/// Sends an `Apply` to every survivor every `--failover-probe-interval-ms` (attempts overlap,
/// each with a short timeout, bounded in number and time) and returns the time from
/// `killed_at` to the first acknowledged write, the survivor that acknowledged it and the
/// number of the probe round that carried it. Overlapping attempts keep the measurement's
/// resolution at the probe interval even when a write hangs until its timeout.
async fn first_acknowledged_write(
    survivors: Vec<(String, ObjectsClient<Channel>)>,
    kill_number: usize,
    killed_at: Instant,
    args: &Args,
) -> Result<(Duration, String, u64)> {
    let request_timeout = Duration::from_millis(args.failover_request_timeout_ms);
    let give_up = Duration::from_secs(args.failover_max_seconds);
    let mut ticker = tokio::time::interval(Duration::from_millis(
        args.failover_probe_interval_ms.max(1),
    ));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut values = Values::new(1_000_000 + kill_number as u64, args.value_size);
    let mut attempts = JoinSet::new();
    let mut round = 0;
    let mut last_error = String::from("no attempt finished");
    loop {
        let may_launch = round < MAX_FAILOVER_ROUNDS && killed_at.elapsed() < give_up;
        tokio::select! {
            _ = ticker.tick(), if may_launch => {
                round += 1;
                for (survivor_index, (name, client)) in survivors.iter().enumerate() {
                    let key = format!("bench-failover{kill_number}s{survivor_index}-{round}");
                    let value = values.next(args.value_size).to_owned();
                    let (name, mut client) = (name.clone(), client.clone());
                    attempts.spawn(async move {
                        let write = apply_configmap(&mut client, &key, &value);
                        match tokio::time::timeout(request_timeout, write).await {
                            Ok(Ok(())) => Ok((killed_at.elapsed(), name, round)),
                            Ok(Err(err)) => Err(format!("{name}: {err:#}")),
                            Err(_) => Err(format!("{name}: timed out after {request_timeout:?}")),
                        }
                    });
                }
            }
            Some(joined) = attempts.join_next(), if !attempts.is_empty() => match joined {
                Ok(Ok(first)) => {
                    attempts.abort_all();
                    return Ok(first);
                }
                Ok(Err(err)) => last_error = err,
                Err(err) => last_error = format!("a failover attempt failed: {err}"),
            },
            else => break,
        }
    }
    bail!(
        "no survivor acknowledged a write within {give_up:?} ({round} probe rounds); \
         last error: {last_error}"
    )
}

/// Kills the leader of a fresh 3-node Flotilla cluster `args.kills` times.
async fn measure_failover(flotilla: &std::path::Path, args: &Args) -> Result<Vec<FailoverSample>> {
    let ready_timeout = Duration::from_secs(args.ready_timeout);
    let mut cluster = FlotillaCluster::start(flotilla, 3, ready_timeout)
        .await
        .context("start the 3-node Flotilla cluster for failover")?;
    let mut samples = Vec::with_capacity(args.kills);
    for kill_number in 0..args.kills {
        let (leader, status) = cluster
            .wait_ready(ready_timeout)
            .await
            .context("wait for a healthy cluster before a kill")?;
        let mut survivors = Vec::new();
        for (index, node) in cluster.nodes().iter().enumerate() {
            if index != leader {
                let channel = connect(node.addr(), CONNECT_TIMEOUT).await?;
                survivors.push((node.name().to_owned(), ObjectsClient::new(channel)));
            }
        }
        let leader_name = cluster
            .nodes()
            .get(leader)
            .map(|node| node.name().to_owned())
            .ok_or_else(|| anyhow!("no node {leader}"))?;
        let killed_at = Instant::now();
        let pid = cluster.kill(leader)?;
        let (failover, via, round) =
            first_acknowledged_write(survivors, kill_number, killed_at, args)
                .await
                .with_context(|| format!("kill {}: wait for failover", kill_number + 1))?;
        let restart_started = Instant::now();
        let mode = cluster
            .restart(leader, ready_timeout)
            .await
            .with_context(|| format!("kill {}: restart {leader_name}", kill_number + 1))?;
        let mode = match mode {
            RestartMode::Bare => "bare serve",
            RestartMode::Join => "serve --join",
        };
        println!(
            "  kill {}/{}: leader {leader_name} (term {}, pid {pid}) killed; first write \
             acknowledged after {} ms via {via} (probe round {round}); restarted ({mode}), \
             healthy after {} ms",
            kill_number + 1,
            args.kills,
            status.term,
            millis(failover),
            millis(restart_started.elapsed()),
        );
        samples.push(FailoverSample { failover });
    }
    Ok(samples)
}

fn opt_millis(duration: Option<Duration>) -> String {
    duration.map_or_else(|| "-".to_owned(), millis)
}

/// The command line, quoted for a POSIX shell where needed.
fn command_line() -> String {
    std::env::args()
        .map(|arg| {
            let plain = !arg.is_empty()
                && arg
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./=,:+@".contains(c));
            if plain {
                arg
            } else {
                format!("'{}'", arg.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn print_table(rows: &[Row], args: &Args) {
    println!();
    println!(
        "Writes of {}-byte values, {} s measured after {} s warm-up per phase; latency in ms.",
        args.value_size, args.seconds, args.warmup
    );
    println!(
        "{:>5} {:>7} | {:>13} {:>8} {:>8} | {:>13} {:>8} {:>8} | {:>13}",
        "nodes", "clients", "flotilla w/s", "p50", "p99", "etcd w/s", "p50", "p99", "flotilla/etcd"
    );
    println!("{}", "-".repeat(97));
    let cells = |result: &Option<PhaseResult>| match result {
        Some(r) => (
            format!("{:.1}", r.writes_per_second),
            opt_millis(r.p50),
            opt_millis(r.p99),
        ),
        None => ("-".to_owned(), "-".to_owned(), "-".to_owned()),
    };
    for row in rows {
        let (fw, f50, f99) = cells(&row.flotilla);
        let (ew, e50, e99) = cells(&row.etcd);
        let ratio = match (&row.flotilla, &row.etcd) {
            (Some(f), Some(e)) if e.writes_per_second > 0.0 => {
                format!("{:.2}", f.writes_per_second / e.writes_per_second)
            }
            _ => "-".to_owned(),
        };
        println!(
            "{:>5} {:>7} | {fw:>13} {f50:>8} {f99:>8} | {ew:>13} {e50:>8} {e99:>8} | {ratio:>13}",
            row.size, row.clients
        );
    }
    for row in rows {
        for (system, result) in [("flotilla", &row.flotilla), ("etcd", &row.etcd)] {
            if let Some(r) = result.as_ref().filter(|r| r.errors > 0) {
                println!(
                    "note: {system} {} node(s) {} client(s): {} failed write(s), first: {}",
                    row.size,
                    row.clients,
                    r.errors,
                    r.first_error.as_deref().unwrap_or("?")
                );
            }
        }
    }
}

async fn run(args: &Args, command: &str) -> Result<()> {
    let flotilla = chaos_tests::process::flotilla_binary(args.flotilla.as_deref())?;
    if args.seconds == 0 {
        bail!("--seconds must be at least 1");
    }
    if args.sizes.contains(&0) || args.clients.contains(&0) {
        bail!("--sizes and --clients must be at least 1");
    }
    if !args.skip_flotilla {
        println!("flotilla: {}", flotilla.display());
    }
    if !args.skip_etcd {
        println!("etcd: {}", args.etcd.display());
    }
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!("cores: {cores} (clients and servers share them)");

    let ready_timeout = Duration::from_secs(args.ready_timeout);
    let mut rows = Vec::new();
    let mut next_client_id = 0;
    for &size in &args.sizes {
        if !args.skip_flotilla {
            let cluster = FlotillaCluster::start(&flotilla, size, ready_timeout)
                .await
                .with_context(|| format!("start a {size}-node Flotilla cluster"))?;
            let pids: Vec<String> = cluster
                .nodes()
                .iter()
                .map(|n| format!("{} {} pid {}", n.name(), n.addr(), opt_pid(n.pid())))
                .collect();
            println!("Flotilla {size}-node cluster ready: {}", pids.join(", "));
            let addrs = cluster.addresses();
            measure_cluster(
                System::Flotilla,
                size,
                &addrs,
                args,
                &mut next_client_id,
                &mut rows,
            )
            .await?;
        }

        if !args.skip_etcd {
            let cluster = EtcdCluster::start(&args.etcd, size, ready_timeout)
                .await
                .with_context(|| format!("start a {size}-member etcd cluster"))?;
            let members: Vec<String> = cluster
                .members()
                .iter()
                .map(|m| format!("{} {}", m.name(), m.client_addr()))
                .collect();
            println!("etcd {size}-member cluster ready: {}", members.join(", "));
            let addrs = cluster.addresses();
            measure_cluster(
                System::Etcd,
                size,
                &addrs,
                args,
                &mut next_client_id,
                &mut rows,
            )
            .await?;
        }
    }

    let failover = if args.kills > 0 && !args.skip_flotilla {
        println!(
            "Failover: {} kill(s) of the leader of a 3-node Flotilla cluster",
            args.kills
        );
        let samples = measure_failover(&flotilla, args).await?;
        let mut times: Vec<Duration> = samples.iter().map(|s| s.failover).collect();
        times.sort_unstable();
        Some(times)
    } else {
        None
    };

    println!();
    println!("command: {command}");
    print_table(&rows, args);
    if let Some(times) = failover {
        println!();
        println!(
            "Failover (3 nodes, {} leader kills, SIGKILL to first acknowledged write): \
             p50 {} ms, p99 {} ms (min {} ms, max {} ms)",
            times.len(),
            opt_millis(percentile(&times, 50.0)),
            opt_millis(percentile(&times, 99.0)),
            opt_millis(times.first().copied()),
            opt_millis(times.last().copied()),
        );
    }
    Ok(())
}

fn opt_pid(pid: Option<u32>) -> String {
    pid.map_or_else(|| "-".to_owned(), |pid| pid.to_string())
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let command = command_line();
    println!("command: {command}");
    // Dropping `run`'s future on a signal drops the cluster guards, which kill their processes
    // and remove their directories.
    let result = tokio::select! {
        result = run(&args, &command) => result,
        signal = chaos_tests::process::shutdown_signal() => match signal {
            Ok(()) => Err(anyhow!("interrupted; stopped every process started")),
            Err(err) => Err(err),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
