//! `chaos-tests`: runs chaos scenarios against local clusters of node containers and prints
//! one report row per scenario and repetition. Exits non-zero if any run failed.
//!
//! `cargo build --release -p flotilla-node && cargo run -p chaos-tests --release -- run all`

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use chaos_tests::runner::{header, run_scenario, Row, RunOptions};
use chaos_tests::scenarios::Scenario;
use chaos_tests::stats::percentile;
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "chaos-tests",
    about = "Chaos scenarios against local Flotilla clusters"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run one scenario, a comma-separated list, or `all`.
    Run {
        scenarios: String,
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Runs of each scenario.
        #[arg(long, default_value_t = 1)]
        repeat: usize,
        /// The flotilla binary (default: the one next to this program).
        #[arg(long)]
        flotilla: Option<PathBuf>,
        /// Where failed runs keep their evidence.
        #[arg(long, default_value = "chaos-results")]
        results: PathBuf,
    },
    /// List the scenarios.
    List,
}

fn scenarios(names: &str) -> Result<Vec<Scenario>> {
    if names == "all" {
        return Ok(Scenario::ALL.to_vec());
    }
    names
        .split(',')
        .map(|name| {
            Scenario::parse(name.trim()).with_context(|| {
                format!(
                    "unknown scenario {name:?} (known: {})",
                    Scenario::ALL.map(Scenario::name).join(", ")
                )
            })
        })
        .collect()
}

fn flotilla_binary(explicit: Option<PathBuf>) -> Result<PathBuf> {
    let binary = match explicit {
        Some(path) => path,
        None => std::env::current_exe()
            .context("find this program")?
            .with_file_name("flotilla"),
    };
    if !binary.exists() {
        bail!(
            "no flotilla binary at {} (build it first: cargo build --release -p flotilla-node, or pass --flotilla)",
            binary.display()
        );
    }
    Ok(binary)
}

fn summary(label: &str, mut samples: Vec<Duration>) {
    if samples.is_empty() {
        return;
    }
    samples.sort();
    let p = |q: f64| {
        percentile(&samples, q)
            .map(|d| d.as_millis())
            .unwrap_or_default()
    };
    println!(
        "{label}: n={} p50={} ms p99={} ms max={} ms",
        samples.len(),
        p(50.0),
        p(99.0),
        samples.last().map(|d| d.as_millis()).unwrap_or_default()
    );
}

async fn run(cli: Cli) -> Result<bool> {
    match cli.command {
        Command::List => {
            for scenario in Scenario::ALL {
                println!("{:<30} {}", scenario.name(), scenario.description());
            }
            Ok(true)
        }
        Command::Run {
            scenarios: names,
            nodes,
            seed,
            repeat,
            flotilla,
            results,
        } => {
            let chosen = scenarios(&names)?;
            let mut options = RunOptions::new(flotilla_binary(flotilla)?, nodes, seed);
            options.results = results;
            println!("{}", header());
            let mut rows: Vec<Row> = Vec::new();
            for scenario in chosen {
                for repetition in 0..repeat.max(1) {
                    let row = run_scenario(scenario, repetition, &options).await;
                    println!("{}", row.line());
                    for failure in &row.failures {
                        println!("    failure: {failure}");
                    }
                    for note in &row.notes {
                        println!("    note: {note}");
                    }
                    rows.push(row);
                }
            }
            summary(
                "time to new leader",
                rows.iter().flat_map(|r| r.new_leader.clone()).collect(),
            );
            summary(
                "time to replicas restored",
                rows.iter()
                    .flat_map(|r| r.replicas_restored.clone())
                    .collect(),
            );
            let failed = rows.iter().filter(|r| !r.passed).count();
            println!("{} runs, {failed} failed", rows.len());
            Ok(failed == 0)
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
