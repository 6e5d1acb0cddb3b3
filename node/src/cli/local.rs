//! `flotilla local …`: a multi-node cluster on this host, every node a container running this
//! very binary, and the faults of the chaos harness on demand (see the `flotilla-local` crate).

use std::time::Duration;

use anyhow::Context;
use clap::Subcommand;
use flotilla_local::{LocalCluster, UpOptions};

const DEFAULT_NAME: &str = "flotilla";

#[derive(Debug, Subcommand)]
pub enum LocalCommand {
    /// Start a cluster of node containers on this host's Docker daemon and wait until healthy.
    Up {
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        /// Voters the cluster keeps (default: 5 from 5 nodes, 3 from 3, else 1).
        #[arg(long)]
        voters: Option<usize>,
        #[arg(long, default_value = DEFAULT_NAME)]
        name: String,
        /// An extra `serve` flag for every node, e.g. --node-arg=--heartbeat-ms=500; repeatable.
        #[arg(long = "node-arg", allow_hyphen_values = true)]
        node_args: Vec<String>,
        /// Seconds to wait for the cluster to become healthy.
        #[arg(long, default_value_t = 120)]
        timeout_seconds: u64,
    },
    /// Remove every container (nodes and pods), network and rule of the cluster.
    Down {
        #[arg(long, default_value = DEFAULT_NAME)]
        name: String,
    },
    /// Kill a node's process at once; --with-pods also kills its pods, as a machine loss would.
    Kill {
        node: String,
        #[arg(long, default_value = DEFAULT_NAME)]
        name: String,
        #[arg(long)]
        with_pods: bool,
    },
    /// Freeze a node (its process stops without noticing).
    Pause {
        node: String,
        #[arg(long, default_value = DEFAULT_NAME)]
        name: String,
    },
    /// Thaw a frozen node.
    Unpause {
        node: String,
        #[arg(long, default_value = DEFAULT_NAME)]
        name: String,
    },
    /// Start a killed node again, or stop and start a running one; it keeps its data.
    Restart {
        node: String,
        #[arg(long, default_value = DEFAULT_NAME)]
        name: String,
    },
    /// Silently drop a node's traffic with its peers (--one-way: only what it receives).
    Isolate {
        node: String,
        #[arg(long, default_value = DEFAULT_NAME)]
        name: String,
        #[arg(long)]
        one_way: bool,
    },
    /// Undo every isolation of a node.
    Heal {
        node: String,
        #[arg(long, default_value = DEFAULT_NAME)]
        name: String,
    },
}

pub async fn run(command: LocalCommand) -> anyhow::Result<()> {
    match command {
        LocalCommand::Up {
            nodes,
            voters,
            name,
            node_args,
            timeout_seconds,
        } => {
            let binary = std::env::current_exe().context("find this flotilla binary")?;
            let mut options = UpOptions::new(&name, nodes, binary);
            if let Some(voters) = voters {
                options.voters = voters;
            }
            options.node_args = node_args;
            options.ready_timeout = Duration::from_secs(timeout_seconds);
            eprintln!("starting local cluster {name} with {nodes} nodes…");
            let cluster = LocalCluster::up(&options)
                .await
                .with_context(|| format!("start local cluster {name}"))?;
            for node in cluster.nodes() {
                println!("{}\t{}\t{}", node.name, node.container, node.addr());
            }
            println!();
            println!("Local cluster {name} is healthy. Point the CLI at it with:");
            let credentials = cluster
                .write_credentials()
                .context("write the admin's credentials")?;
            println!("  export FLOTILLA_SERVER={}", cluster.servers());
            println!("  export FLOTILLA_CONFIG={}", credentials.display());
            println!("Remove it with: flotilla local down --name {name}");
            Ok(())
        }
        LocalCommand::Down { name } => {
            let docker = flotilla_local::connect_docker().await?;
            let report = flotilla_local::down(&docker, &name)
                .await
                .with_context(|| format!("remove local cluster {name}"))?;
            match std::fs::remove_file(flotilla_local::credentials_path(&name)) {
                Ok(()) => {}
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
                Err(error) => eprintln!("remove the admin's credentials of {name}: {error}"),
            }
            println!(
                "removed local cluster {name}: {} node containers, {} pod containers, {} networks",
                report.node_containers, report.pod_containers, report.networks
            );
            Ok(())
        }
        LocalCommand::Kill {
            node,
            name,
            with_pods,
        } => attach(&name)
            .await?
            .kill(&node, with_pods)
            .await
            .map_err(Into::into),
        LocalCommand::Pause { node, name } => {
            attach(&name).await?.pause(&node).await.map_err(Into::into)
        }
        LocalCommand::Unpause { node, name } => attach(&name)
            .await?
            .unpause(&node)
            .await
            .map_err(Into::into),
        LocalCommand::Restart { node, name } => attach(&name)
            .await?
            .restart(&node)
            .await
            .map_err(Into::into),
        LocalCommand::Isolate {
            node,
            name,
            one_way,
        } => attach(&name)
            .await?
            .isolate(&node, one_way)
            .await
            .map_err(Into::into),
        LocalCommand::Heal { node, name } => {
            attach(&name).await?.heal(&node).await.map_err(Into::into)
        }
    }
}

async fn attach(name: &str) -> anyhow::Result<LocalCluster> {
    LocalCluster::attach(name)
        .await
        .with_context(|| format!("find local cluster {name}"))
}
