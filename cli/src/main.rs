//! The `shardlock` command: a live demo of nodes sharing work through
//! database locks.

mod demo;
mod node;
mod records;
mod serve;
mod status;
mod tracker;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

/// Decide which process runs which background work, with session locks in
/// the database the work belongs to.
#[derive(Debug, Parser)]
#[command(name = "shardlock", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run balanced nodes over a set of shards (3 nodes, 12 shards: 4/4/4),
    /// kill -9 one (6/6), stop another gracefully (12), start a new one
    /// (6/6), live; ends with the counts and rebalance times of each phase
    /// and `overlaps: N`.
    Demo(demo::DemoArgs),
    /// Run one coordinator process with a sample agent that ticks each
    /// shard it owns; ctrl-c or SIGTERM stops it gracefully;
    /// `--metrics-addr` serves Prometheus metrics and health.
    Node(node::NodeArgs),
    /// List the locks held in every database (or `--tenants`), with their
    /// holders, the sets per node and the live members of a balancing group
    /// with their shares; `--watch` redraws every second.
    Status(status::StatusArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_filter = match cli.command {
        // The demo draws its own table; library logs would scroll it away.
        Command::Demo(_) => "off",
        Command::Node(_) => "info",
        Command::Status(_) => "warn",
    };
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Demo(args) => demo::run(args).await,
            Command::Node(args) => node::run(args).await.map(|()| ExitCode::SUCCESS),
            Command::Status(args) => status::run(args).await.map(|()| ExitCode::SUCCESS),
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
