//! `shardlock demo`: nodes sharing shards; one killed or severed, one
//! stopped gracefully; a live table and a summary ending in `overlaps: N`.

mod memory;
mod processes;

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Result};
use clap::{Args, ValueEnum};

/// Which driver the demo runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum DemoDriver {
    /// Real `shardlock node` processes sharing a lock directory: one is
    /// killed with SIGKILL, one stopped gracefully.
    Sqlite,
    /// Every node inside this process on the in-memory driver: one is
    /// stopped gracefully, one has its connection severed.
    Memory,
    /// Real `shardlock node` processes on PostgreSQL advisory locks
    /// (`--url`): one killed with SIGKILL, one stopped gracefully.
    Postgres,
}

/// Options of `shardlock demo`.
#[derive(Debug, Args)]
pub(crate) struct DemoArgs {
    /// Driver to coordinate through.
    #[arg(long, value_enum, default_value = "sqlite")]
    pub(crate) driver: DemoDriver,
    /// Number of nodes (at least 3: one is stopped, one killed or severed).
    #[arg(long, default_value_t = 3)]
    pub(crate) nodes: usize,
    /// Number of shards.
    #[arg(long, default_value_t = 12)]
    pub(crate) shards: usize,
    /// Seconds until the demo ends by itself.
    #[arg(long, default_value_t = 15)]
    pub(crate) duration: u64,
    /// Print events line by line instead of redrawing a table (default when
    /// the output is not a terminal).
    #[arg(long)]
    pub(crate) plain: bool,
    /// Server URL for `--driver postgres`.
    #[arg(long)]
    pub(crate) url: Option<String>,
    /// Keep the demo's working directory (node logs, records, lock
    /// directory) instead of deleting it at the end.
    #[arg(long)]
    pub(crate) keep: bool,
}

pub(crate) async fn run(args: DemoArgs) -> Result<ExitCode> {
    if args.nodes < 3 || args.nodes > 32 {
        bail!("--nodes must be between 3 and 32 (one is stopped, one killed or severed, one takes over)");
    }
    if args.shards == 0 || args.shards > 10_000 {
        bail!("--shards must be between 1 and 10000");
    }
    if args.duration < 6 {
        bail!("--duration must be at least 6 seconds (a takeover after a sever takes about 2.5 s)");
    }
    match args.driver {
        DemoDriver::Memory => memory::run(&args).await,
        DemoDriver::Sqlite => processes::run(&args, None).await,
        DemoDriver::Postgres => match &args.url {
            Some(url) => processes::run(&args, Some(url)).await,
            None => {
                bail!("--driver postgres needs --url postgres://user:password@host:port/database")
            }
        },
    }
}

/// `N shards taken over, p50 X ms, max Y ms`, or why not.
pub(crate) fn percentiles(times: &mut [Duration]) -> String {
    times.sort();
    match (times.get(times.len() / 2), times.last()) {
        (Some(p50), Some(max)) => format!(
            "{} shards taken over, p50 {:.0} ms, max {:.0} ms",
            times.len(),
            p50.as_secs_f64() * 1e3,
            max.as_secs_f64() * 1e3
        ),
        _ => "no shard moved".to_string(),
    }
}

/// One redraw of the live table.
pub(crate) struct Screen<'a> {
    /// First line.
    pub(crate) title: String,
    /// Each shard with its owner and for how many seconds, if owned.
    pub(crate) shards: Vec<(String, Option<(String, f64)>)>,
    /// Each node with its shard count and state.
    pub(crate) nodes: Vec<(String, usize, &'a str)>,
    /// Extra line under the nodes (may be empty).
    pub(crate) note: String,
    /// The latest events, seconds since start.
    pub(crate) log: Vec<(f64, String)>,
}

impl Screen<'_> {
    /// Clears the terminal and draws the screen.
    pub(crate) fn draw(&self) {
        use std::fmt::Write as _;
        use std::io::Write as _;
        let mut out = String::from("\x1b[2J\x1b[H");
        let _ = writeln!(out, "{}\n", self.title);
        let _ = writeln!(out, "  {:<12} {:<10} {:>8}", "shard", "owner", "for");
        for (shard, owner) in &self.shards {
            let (owner, age) = match owner {
                Some((node, secs)) => (node.as_str(), format!("{secs:.1}s")),
                None => ("-", String::new()),
            };
            let _ = writeln!(out, "  {shard:<12} {owner:<10} {age:>8}");
        }
        out.push('\n');
        for (node, count, note) in &self.nodes {
            let _ = writeln!(out, "  {node:<8} {count:>3} shards  {note}");
        }
        let _ = writeln!(out, "\n{}", self.note);
        for (at, line) in &self.log {
            let _ = writeln!(out, "  [{at:>5.1}s] {line}");
        }
        let mut stdout = std::io::stdout().lock();
        let _ = stdout.write_all(out.as_bytes());
        let _ = stdout.flush();
    }
}
