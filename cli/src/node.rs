//! `shardlock node`: one coordinator process with a sample agent.

use std::io::Read;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use shardlock::{
    Agent, AgentContext, AgentError, Assignment, Balanced, Balancing, CancellationToken,
    Coordinator, DatabaseId, Distributor, Driver, LockSet, MultiTenanted, NodeId, ShardId,
    SingleTenant, Solo,
};
use tokio::sync::watch;
use tracing::info;

use crate::records::{AssignmentRecord, RecordWriter};

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
    /// MySQL/MariaDB `GET_LOCK` named locks (`--url mysql://...`).
    Mysql,
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
    /// Server URL: `postgres://user:pw@host:5432/app` (postgres),
    /// `mysql://user:pw@host:3306/app` (mysql), or an ADO.NET connection
    /// string / `sqlserver://` URL (sqlserver).
    #[arg(long)]
    pub(crate) url: Option<String>,
}

/// An opened driver, by its concrete type: the coordinator is built for
/// each, so the driver's own session methods (its probe, its announced
/// releases) are called directly, with no enum in between.
pub(crate) enum OpenedDriver {
    Postgres(shardlock::postgres::PgDriver),
    Sqlite(shardlock::sqlite::SqliteDriver),
    Sqlserver(shardlock::sqlserver::MssqlDriver),
    Mysql(shardlock::mysql::MySqlDriver),
}

impl DriverArgs {
    /// Opens the driver. With `fixed_database`, every `DatabaseId` maps to
    /// the URL's database (single-tenant); otherwise ids are database names
    /// on the URL's server (one database per tenant).
    pub(crate) fn open(&self, fixed_database: bool) -> Result<OpenedDriver> {
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
                } else {
                    // One database per tenant: ids name databases on the
                    // URL's server (the driver's default would pin every id
                    // to the URL's own database).
                    options =
                        options.database_mapping(shardlock::postgres::DatabaseMapping::SameServer);
                }
                Ok(OpenedDriver::Postgres(shardlock::postgres::PgDriver::new(
                    options,
                )))
            }
            DriverKind::Sqlite => {
                let Some(dir) = &self.dir else {
                    bail!("--driver sqlite needs --dir <lock directory>");
                };
                let driver = shardlock::sqlite::SqliteDriver::open(dir)
                    .with_context(|| format!("opening lock directory {}", dir.display()))?;
                Ok(OpenedDriver::Sqlite(driver))
            }
            DriverKind::Mysql => {
                let Some(url) = &self.url else {
                    bail!("--driver mysql needs --url mysql://user:password@host:port/database");
                };
                let mut options =
                    shardlock::mysql::MySqlOptions::parse(url).context("invalid --url")?;
                // Named locks are server-wide; the mapping decides which
                // database a session connects to (checkpoints live there).
                options = if fixed_database {
                    options.database_mapping(shardlock::mysql::DatabaseMapping::ConnectionString)
                } else {
                    options.database_mapping(shardlock::mysql::DatabaseMapping::SameServer)
                };
                Ok(OpenedDriver::Mysql(shardlock::mysql::MySqlDriver::new(
                    options,
                )))
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
                Ok(OpenedDriver::Sqlserver(
                    shardlock::sqlserver::MssqlDriver::new(options),
                ))
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
    /// One lock per shard in one database, each node taking its fair share
    /// (single-tenant wrapped in `Balanced`): 3 nodes and 12 shards run
    /// 4/4/4.
    Balanced,
    /// One lock per shard in one database, no balancing: the first node to
    /// cycle takes every shard, the others stand by.
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
    #[arg(long, value_enum, default_value = "balanced")]
    pub(crate) distributor: DistributorKind,
    #[command(flatten)]
    pub(crate) balance: BalanceArgs,
    /// This node's capacity (balanced): a node of weight 2 holds two member
    /// slots and gets twice the share of a node of weight 1.
    #[arg(long, default_value_t = 1)]
    pub(crate) weight: u32,
    /// Database (balanced, single-tenant and solo).
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
    /// Serve Prometheus metrics on `/metrics` and health on `/healthz`
    /// (200 when healthy, 503 when degraded or stopped) and `/livez` (503
    /// only when stopped) at this address, e.g. `127.0.0.1:9464`. Off by
    /// default.
    #[arg(long, value_name = "ADDR")]
    pub(crate) metrics_addr: Option<std::net::SocketAddr>,
    /// Stop gracefully when standard input closes (for supervisors).
    #[arg(long)]
    pub(crate) stop_on_stdin_eof: bool,
}

/// Which member slots the balanced nodes hold (shared by `node` and
/// `status`).
#[derive(Debug, Clone, Args)]
pub(crate) struct BalanceArgs {
    /// Balancing group: nodes balance with the nodes of the same group,
    /// holding member slots `members:<group>:<i>`. Default
    /// `<database>:<schema>`, the prefix of the lock names, so nodes
    /// balance exactly with the nodes competing for the same locks.
    #[arg(long)]
    pub(crate) group: Option<String>,
    /// Member slots per database (the largest total weight of a group);
    /// every node of a group must use the same number.
    #[arg(long, default_value_t = 64)]
    pub(crate) max_members: u32,
}

impl BalanceArgs {
    /// The group, or its default for `database` and `schema`.
    pub(crate) fn group(&self, database: &str, schema: &str) -> String {
        self.group
            .clone()
            .unwrap_or_else(|| default_group(database, schema))
    }
}

/// The default balancing group: the lock names' `<database>:<schema>`
/// prefix.
pub(crate) fn default_group(database: &str, schema: &str) -> String {
    format!("{database}:{schema}")
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
pub(crate) enum AnyDistributor {
    Balanced(Balanced<SingleTenant>),
    Single(SingleTenant),
    Multi(MultiTenanted<Vec<DatabaseId>>),
    Solo(Solo),
}

impl AnyDistributor {
    /// Single-tenant over `shards`, balanced in `group` with `weight` when
    /// `balancing` is given.
    pub(crate) fn single_tenant(
        database: DatabaseId,
        schema: &str,
        shards: Vec<ShardId>,
        balancing: Option<&Balancing>,
    ) -> Self {
        let inner = SingleTenant::new(database, schema, shards);
        match balancing {
            Some(b) => Self::Balanced(
                Balanced::new(inner)
                    .group(b.group.clone())
                    .weight(b.weight)
                    .max_members(b.max_members),
            ),
            None => Self::Single(inner),
        }
    }
}

impl Distributor for AnyDistributor {
    async fn lock_sets(&self) -> shardlock::Result<Vec<LockSet>> {
        match self {
            Self::Balanced(d) => d.lock_sets().await,
            Self::Single(d) => d.lock_sets().await,
            Self::Multi(d) => d.lock_sets().await,
            Self::Solo(d) => d.lock_sets().await,
        }
    }

    async fn shared_lock_sets(&self) -> shardlock::Result<std::sync::Arc<[LockSet]>> {
        match self {
            Self::Balanced(d) => d.shared_lock_sets().await,
            Self::Single(d) => d.shared_lock_sets().await,
            Self::Multi(d) => d.shared_lock_sets().await,
            Self::Solo(d) => d.shared_lock_sets().await,
        }
    }

    fn balancing(&self) -> Option<&Balancing> {
        match self {
            Self::Balanced(d) => d.balancing(),
            Self::Single(_) | Self::Multi(_) | Self::Solo(_) => None,
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
    let balanced = args.distributor == DistributorKind::Balanced;
    if !balanced && (args.weight != 1 || args.balance.group.is_some()) {
        bail!("--weight and --group need --distributor balanced");
    }
    let shards = shard_names(args.shards);
    let database = DatabaseId::new(&args.database);
    let mut balancing = Balancing::new();
    balancing.group = args.balance.group(&args.database, &args.schema);
    balancing.weight = args.weight;
    balancing.max_members = args.balance.max_members;
    if balanced {
        balancing
            .validate()
            .context("invalid --weight, --group or --max-members")?;
    }
    let driver = args
        .driver
        .open(args.distributor != DistributorKind::MultiTenanted)?;
    let distributor = match args.distributor {
        DistributorKind::Balanced => {
            AnyDistributor::single_tenant(database, &args.schema, shards, Some(&balancing))
        }
        DistributorKind::SingleTenant => {
            AnyDistributor::single_tenant(database, &args.schema, shards, None)
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
    let settings = Settings {
        node,
        balancing: balanced.then_some(balancing),
    };
    match driver {
        OpenedDriver::Postgres(d) => serve(d, distributor, agent, &args, settings).await,
        OpenedDriver::Sqlite(d) => serve(d, distributor, agent, &args, settings).await,
        OpenedDriver::Sqlserver(d) => serve(d, distributor, agent, &args, settings).await,
        OpenedDriver::Mysql(d) => serve(d, distributor, agent, &args, settings).await,
    }
}

/// What `serve` needs besides the driver, distributor and agent.
struct Settings {
    node: NodeId,
    /// With the balanced distributor.
    balancing: Option<Balancing>,
}

/// Runs the coordinator until a stop is asked for, then stops it
/// gracefully.
async fn serve<D: Driver>(
    driver: D,
    distributor: AnyDistributor,
    agent: TickAgent,
    args: &NodeArgs,
    settings: Settings,
) -> Result<()> {
    let Settings { node, balancing } = settings;
    let records = agent.records.clone();
    // Before the coordinator is built: metric handles registered earlier
    // would stay no-ops.
    let exporter = match args.metrics_addr {
        Some(addr) => Some((
            crate::serve::install_recorder()?,
            crate::serve::bind(addr).await?,
        )),
        None => None,
    };
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
        // One line with the settings in force, for whoever reads the records.
        let c = coordinator.config();
        let distributor = match args.distributor.to_possible_value() {
            Some(v) => v.get_name().to_string(),
            None => format!("{:?}", args.distributor),
        };
        let mut fields = format!(
            "pid={} poll_ms={} loss_timeout_ms={} stop_timeout_ms={} takeover_delay_ms={} distributor={distributor}",
            std::process::id(),
            c.poll_interval.as_millis(),
            c.lock_loss_timeout.as_millis(),
            c.stop_timeout.as_millis(),
            c.takeover_delay.as_millis()
        );
        if let Some(b) = &balancing {
            fields.push_str(&format!(
                " group={} weight={} max_members={}",
                b.group, b.weight, b.max_members
            ));
        }
        r.write_with("config", "-", &fields);
    }
    let handle = coordinator.start()?;
    if let Some(b) = &balancing {
        info!(%node, group = %b.group, weight = b.weight, "node running, balanced; ctrl-c or SIGTERM stops it gracefully");
    } else {
        info!(%node, "node running; ctrl-c or SIGTERM stops it gracefully");
    }
    let watcher = tokio::spawn(report_assignments(handle.assignment(), records));
    let serving = CancellationToken::new();
    if let Some((metrics, listener)) = exporter {
        let health = handle.health_changes();
        let endpoints = crate::serve::Endpoints {
            metrics,
            health: Box::new(move || health.borrow().clone()),
        };
        drop(crate::serve::spawn(listener, endpoints, serving.clone()));
    }
    wait_for_shutdown(args.stop_on_stdin_eof).await;
    info!(%node, "stopping: agents first, then locks");
    let stopped = handle.stop().await;
    serving.cancel();
    stopped?;
    // The coordinator is gone, so the watch is closed and the reporter ends
    // after the final assignment.
    if tokio::time::timeout(Duration::from_secs(1), watcher)
        .await
        .is_err()
    {
        tracing::debug!("assignment reporter still busy after the stop");
    }
    info!(%node, "stopped");
    Ok(())
}

/// Sets, shards, members, share, moves, wake-ups, sessions lost.
type Notable = (usize, usize, usize, Option<usize>, u64, u64, u64);

/// The fields of an assignment worth a record or a log line when they
/// change (not the cycle count, which changes every cycle).
fn notable(a: &Assignment) -> Notable {
    (
        a.owned.len(),
        a.shard_count(),
        a.members,
        a.share,
        a.moves,
        a.wakeups,
        a.sessions_lost,
    )
}

/// Writes an `assignment` record (and logs the balance) each time the
/// node's sets, members, share, moves, wake-ups or lost sessions change.
async fn report_assignments(mut rx: watch::Receiver<Assignment>, records: Option<RecordWriter>) {
    let mut last: Option<Notable> = None;
    loop {
        let current = rx.borrow_and_update().clone();
        let key = notable(&current);
        if last.as_ref() != Some(&key) {
            let balance_changed = last.is_none_or(|l| (l.0, l.2, l.3) != (key.0, key.2, key.3));
            if balance_changed && current.share.is_some() && !current.stopped {
                info!(
                    sets = current.owned.len(),
                    members = current.members,
                    share = current.share,
                    moves = current.moves,
                    wakeups = current.wakeups,
                    "balance"
                );
            }
            if let Some(r) = &records {
                r.write_with("assignment", "-", &AssignmentRecord::fields(&current));
            }
            last = Some(key);
        }
        if rx.changed().await.is_err() {
            break;
        }
    }
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
