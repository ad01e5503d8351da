//! `shardlock node`: one coordinator process with a sample agent.

use std::io::Read;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use shardlock::{
    Agent, AgentContext, AgentError, AnyDriver, Coordinator, DatabaseId, Distributor, LockSet,
    MultiTenanted, NodeId, ShardId, SingleTenant, Solo,
};
use tracing::info;

use crate::records::RecordWriter;

/// Which lock backend to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum DriverKind {
    /// Lock directory on this host (`--dir`).
    Sqlite,
    /// PostgreSQL advisory locks (`--url`).
    Postgres,
    /// SQL Server application locks (`--url`: an ADO.NET connection string
    /// or `sqlserver://` URL).
    Sqlserver,
    /// In-process; only meaningful inside `demo`.
    Memory,
}

/// Where the locks live.
#[derive(Debug, Clone, Args)]
pub(crate) struct DriverArgs {
    /// Lock backend.
    #[arg(long, value_enum, default_value = "sqlite")]
    pub(crate) driver: DriverKind,
    /// Lock directory (sqlite driver).
    #[arg(long)]
    pub(crate) dir: Option<PathBuf>,
    /// Server URL: `postgres://user:pw@host:5432/app` (postgres), or an
    /// ADO.NET connection string / `sqlserver://` URL (sqlserver).
    #[arg(long)]
    pub(crate) url: Option<String>,
}

impl DriverArgs {
    /// Opens the driver. With `fixed_database`, every `DatabaseId` maps to
    /// the URL's database (single-tenant); otherwise ids are database names
    /// on the URL's server (one database per tenant).
    pub(crate) fn open(&self, fixed_database: bool) -> Result<AnyDriver> {
        match self.driver {
            DriverKind::Postgres => {
                let Some(url) = &self.url else {
                    bail!(
                        "--driver postgres needs --url postgres://user:password@host:port/database"
                    );
                };
                let mut options =
                    shardlock::postgres::PgOptions::parse(url).context("invalid --url")?;
                if fixed_database {
                    let name = options
                        .get_connect_options()
                        .get_database()
                        .unwrap_or("postgres")
                        .to_string();
                    options =
                        options.database_mapping(shardlock::postgres::DatabaseMapping::Fixed(name));
                }
                Ok(shardlock::postgres::PgDriver::new(options).into())
            }
            DriverKind::Sqlite => {
                let Some(dir) = &self.dir else {
                    bail!("--driver sqlite needs --dir <lock directory>");
                };
                let driver = shardlock::sqlite::SqliteDriver::open(dir)
                    .with_context(|| format!("opening lock directory {}", dir.display()))?;
                Ok(driver.into())
            }
            DriverKind::Sqlserver => {
                let Some(url) = &self.url else {
                    bail!("--driver sqlserver needs --url \"server=tcp:host,1433;user=..;password=..;database=..\"");
                };
                let mut options =
                    shardlock::sqlserver::MssqlOptions::parse(url).context("invalid --url")?;
                if fixed_database {
                    options = options
                        .database_mapping(shardlock::sqlserver::DatabaseMapping::ConnectionString);
                }
                Ok(shardlock::sqlserver::MssqlDriver::new(options).into())
            }
            DriverKind::Memory => bail!(
                "the memory driver lives inside one process; use `shardlock demo --driver memory`"
            ),
        }
    }
}

/// How shards are grouped into lock sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum DistributorKind {
    /// One lock per shard in one database.
    SingleTenant,
    /// One lock per tenant database holding all its shards.
    MultiTenanted,
    /// This node is alone: run everything, a sentinel detects a second node.
    Solo,
}

/// Options of `shardlock node`.
#[derive(Debug, Args)]
pub(crate) struct NodeArgs {
    #[command(flatten)]
    pub(crate) driver: DriverArgs,
    /// Distributor.
    #[arg(long, value_enum, default_value = "single-tenant")]
    pub(crate) distributor: DistributorKind,
    /// Database (single-tenant and solo).
    #[arg(long, default_value = "main")]
    pub(crate) database: String,
    /// Tenant databases, comma separated (multi-tenanted).
    #[arg(long, value_delimiter = ',')]
    pub(crate) tenants: Vec<String>,
    /// Schema part of lock names.
    #[arg(long, default_value = "app")]
    pub(crate) schema: String,
    /// Number of shards (named `orders:00`, `orders:01`, ...).
    #[arg(long, default_value_t = 12)]
    pub(crate) shards: usize,
    /// Node id (default: host name, pid and a random suffix).
    #[arg(long)]
    pub(crate) node_id: Option<String>,
    /// Poll interval in milliseconds.
    #[arg(long, default_value_t = 5000)]
    pub(crate) poll_ms: u64,
    /// Pause interval in milliseconds (while agents restart).
    #[arg(long, default_value_t = 1000)]
    pub(crate) pause_ms: u64,
    /// Deadline of each lock round trip in milliseconds.
    #[arg(long, default_value_t = 5000)]
    pub(crate) loss_timeout_ms: u64,
    /// How long agents get to stop, in milliseconds.
    #[arg(long, default_value_t = 5000)]
    pub(crate) stop_timeout_ms: u64,
    /// How long a set taken over waits before its agents start, in
    /// milliseconds (default: the driver's loss detection bound; shorter is
    /// refused).
    #[arg(long)]
    pub(crate) takeover_delay_ms: Option<u64>,
    /// Write agent start/stop records here (one file per node).
    #[arg(long)]
    pub(crate) records: Option<PathBuf>,
    /// Keep each shard's tick count here (one file per shard).
    #[arg(long)]
    pub(crate) checkpoints: Option<PathBuf>,
    /// Stop gracefully when standard input closes (for supervisors).
    #[arg(long)]
    pub(crate) stop_on_stdin_eof: bool,
}

/// The sample agent: ticks every 200 ms, counting ticks per shard in a
/// checkpoint file, so a shard's count resumes where the last owner left it.
#[derive(Debug, Clone)]
struct TickAgent {
    records: Option<RecordWriter>,
    checkpoints: Option<PathBuf>,
}

impl TickAgent {
    fn checkpoint(&self, shard: &ShardId) -> Option<PathBuf> {
        let name: String = shard
            .as_str()
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        self.checkpoints.as_ref().map(|dir| dir.join(name))
    }
}

impl Agent for TickAgent {
    async fn run(&self, shard: &ShardId, ctx: AgentContext) -> Result<(), AgentError> {
        if let Some(r) = &self.records {
            r.write_with("start", shard.as_str(), &format!("epoch={}", ctx.epoch));
        }
        let file = self.checkpoint(shard);
        let mut ticks: u64 = match &file {
            Some(f) => tokio::fs::read_to_string(f)
                .await
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or(0),
            None => 0,
        };
        info!(%shard, epoch = ctx.epoch, resume_from = ticks, "agent started");
        let mut interval = tokio::time::interval(Duration::from_millis(200));
        loop {
            tokio::select! {
                _ = ctx.cancel.cancelled() => {
                    // The moment this agent saw its cancel (before any
                    // clean-up): what fault tests compare with the fault.
                    if let Some(r) = &self.records {
                        r.write("cancel", shard.as_str());
                    }
                    break;
                }
                _ = interval.tick() => {
                    ticks += 1;
                    if let Some(f) = &file {
                        tokio::fs::write(f, ticks.to_string()).await?;
                    }
                }
            }
        }
        info!(%shard, ticks, "agent stopped");
        if let Some(r) = &self.records {
            r.write("stop", shard.as_str());
        }
        Ok(())
    }
}

/// One of the distributors, chosen on the command line.
enum AnyDistributor {
    Single(SingleTenant),
    Multi(MultiTenanted<Vec<DatabaseId>>),
    Solo(Solo),
}

impl Distributor for AnyDistributor {
    async fn lock_sets(&self) -> shardlock::Result<Vec<LockSet>> {
        match self {
            Self::Single(d) => d.lock_sets().await,
            Self::Multi(d) => d.lock_sets().await,
            Self::Solo(d) => d.lock_sets().await,
        }
    }
}

pub(crate) fn shard_names(n: usize) -> Vec<ShardId> {
    (0..n)
        .map(|i| ShardId::new(format!("orders:{i:02}")))
        .collect()
}

pub(crate) async fn run(args: NodeArgs) -> Result<()> {
    if args.shards == 0 || args.shards > 100_000 {
        bail!("--shards must be between 1 and 100000");
    }
    let driver = args
        .driver
        .open(args.distributor != DistributorKind::MultiTenanted)?;
    let shards = shard_names(args.shards);
    let database = DatabaseId::new(&args.database);
    let distributor = match args.distributor {
        DistributorKind::SingleTenant => {
            AnyDistributor::Single(SingleTenant::new(database, &args.schema, shards))
        }
        DistributorKind::Solo => AnyDistributor::Solo(Solo::new([database], &args.schema, shards)),
        DistributorKind::MultiTenanted => {
            if args.tenants.is_empty() {
                bail!("--distributor multi-tenanted needs --tenants a,b,c");
            }
            let tenants = args.tenants.iter().map(DatabaseId::new).collect();
            AnyDistributor::Multi(MultiTenanted::new(tenants, &args.schema, shards))
        }
    };
    let node = args
        .node_id
        .clone()
        .map(NodeId::new)
        .unwrap_or_else(NodeId::generate);
    let records = match &args.records {
        Some(dir) => Some(RecordWriter::create(dir, node.as_str())?),
        None => None,
    };
    if let Some(dir) = &args.checkpoints {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let agent = TickAgent {
        records,
        checkpoints: args.checkpoints.clone(),
    };
    let records = agent.records.clone();
    let mut builder = Coordinator::builder(driver, distributor, agent)
        .node_id(node.clone())
        .poll_interval(Duration::from_millis(args.poll_ms))
        .pause_interval(Duration::from_millis(args.pause_ms))
        .lock_loss_timeout(Duration::from_millis(args.loss_timeout_ms))
        .stop_timeout(Duration::from_millis(args.stop_timeout_ms));
    if let Some(ms) = args.takeover_delay_ms {
        builder = builder.takeover_delay(Duration::from_millis(ms));
    }
    let coordinator = builder.build().context("invalid node configuration")?;
    if let Some(r) = &records {
        // One line with the timings in force, for whoever reads the records.
        let c = coordinator.config();
        r.write_with(
            "config",
            "-",
            &format!(
                "pid={} poll_ms={} loss_timeout_ms={} stop_timeout_ms={} takeover_delay_ms={}",
                std::process::id(),
                c.poll_interval.as_millis(),
                c.lock_loss_timeout.as_millis(),
                c.stop_timeout.as_millis(),
                c.takeover_delay.as_millis()
            ),
        );
    }
    let handle = coordinator.start()?;
    info!(%node, "node running; ctrl-c or SIGTERM stops it gracefully");
    wait_for_shutdown(args.stop_on_stdin_eof).await;
    info!(%node, "stopping: agents first, then locks");
    handle.stop().await?;
    info!(%node, "stopped");
    Ok(())
}

async fn wait_for_shutdown(stdin_eof: bool) {
    let stdin = async {
        if stdin_eof {
            // A plain thread, not `tokio::io::stdin()`: tokio reads stdin on
            // a blocking-pool thread that the runtime waits for at shutdown,
            // so after ctrl-c or SIGTERM the process would hang until its
            // input closed. A detached thread does not keep it alive.
            let (tx, rx) = tokio::sync::oneshot::channel::<()>();
            let spawned = std::thread::Builder::new()
                .name("stdin-eof".into())
                .spawn(move || {
                    let mut buf = [0u8; 64];
                    let mut input = std::io::stdin().lock();
                    while matches!(input.read(&mut buf), Ok(n) if n > 0) {}
                    let _ = tx.send(());
                });
            match spawned {
                Ok(_) => {
                    let _ = rx.await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        } else {
            std::future::pending::<()>().await;
        }
    };
    // SIGTERM exists on Unix only; elsewhere ctrl-c and stdin stop the node.
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
        _ = stdin => {}
    }
}
