//! Measure 11: many databases, 100 tenant databases × 100 shards on one
//! node (PostgreSQL), with and without a dead tenant database
//! (`--quick`: 10 × 10); then a node holding 100,000 lock sets across the
//! 100 tenant databases (`--quick`: 10 × 1,000 = 10,000 sets).
//!
//! The tenants are the databases `shardlock_bench_t000` … (the ones
//! measure 6 uses), created once per server if missing, four at a time.
//! Four configurations run one after the other in the same run:
//!
//! - **(a) MultiTenanted**: one coordinator, `MultiTenanted` over the T
//!   tenants: one lock set per tenant holding its S shards (T sets, T × S
//!   agents).
//! - **(b) SingleTenant per tenant**: T coordinators in this process (one
//!   node id), each `SingleTenant` over its tenant with S shards: one set
//!   per shard (T × S sets, T × S agents).
//! - **(c) dead tenant**: (a) plus one more tenant database whose id the
//!   driver maps to a loopback TCP listener this bench opens itself: it
//!   accepts connections and never answers, so every connect to it hangs
//!   until the driver's `connect_timeout` (2 s here; the coordinator's
//!   connect deadline is set explicitly to 3 s, the driver's + 1 s, which
//!   the builder would raise it to anyway). A routing [`Driver`] sends that
//!   one id to a `PgDriver` pointed at the listener and every other id to
//!   the real server. The last row sets (c) beside (a): how often the live
//!   tenants are verified, their cycles and their time to own, the
//!   measurement of "a dead tenant database does not slow the others'
//!   cycles".
//! - **(d) 100,000 sets**: T coordinators (one per tenant database),
//!   `SingleTenant` each with 1,000 sets of one shard, all owned and held
//!   (T × 1,000 sets; needs `max_locks_per_transaction × max_connections`
//!   above that, checked first). The node runs in a child process of its
//!   own (`shardlock-bench m11-sets-node`, its outcome read back from
//!   stdout), so that its resident memory is its own: in one process, memory
//!   an earlier measure freed is reused and the growth reads near zero. The
//!   raw side for it: T connections each locking its 1,000 keys in one
//!   `unnest` batch, alone before the node starts, closed before it ends.
//!   Its coordinators poll every 5 s (the default; 1 s in `--quick`), not
//!   100 ms: a session's first verify (and one a minute after) reads all of
//!   `pg_locks`, 100,000 rows here, and before the light verify (`SELECT
//!   pg_backend_pid()` in between, `PgOptions::lock_check_interval`) 100
//!   sessions doing so every 100 ms saturated the server until verifies
//!   missed their deadline. Its window starts once the node's T
//!   connections are up.
//!
//! Rows per configuration: the steady cycle time p50/p95 (every published
//! `Assignment.last_cycle` over a time window); the verify interval per
//! live tenant (the window divided by the statements the server ran in
//! that database, from `pg_stat_statements`: only the verify runs there in
//! the steady state; a cycle woken by a background answer may skip the
//! verify, so the published cycles alone no longer say how often each
//! database is checked); the wall time from `start()` until every set is
//! owned and held; connections of the node in `pg_stat_activity` per kind
//! (`application_name` `shardlock:<node>` the sessions, anything else
//! under the prefix, e.g. a side connection cancelling a wait, counted
//! apart); process CPU over the window (per thread,
//! [`CpuSnapshot`]) per verify round (every live tenant verified once);
//! resident memory (`VmRSS`, process-wide) before the start vs while
//! holding, per 1,000 sets where each set is one shard ((b), (d)), else per
//! 1,000 shards. Every configuration's coordinators are stopped, so its
//! locks freed, before the next starts.
//!
//! The raw baseline, same run, before each configuration and alone (its
//! 10,000 held keys would lengthen every read of `pg_locks`, which is what
//! the verify is): T plain connections, one per tenant database, opened in
//! parallel once; each locks its S keys in one `pg_try_advisory_lock`
//! `unnest` batch, all tenants in parallel; its steady check is one
//! `count(*) from pg_locks` per connection, all in parallel.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use shardlock_benches::Verdict;
use shardlock_benches::{fmt_duration, ratio, CpuSnapshot, PgEnv, RawPg, Row, Samples, Target};
use shardlock_core::{
    Agent, AgentContext, AgentError, Capabilities, Coordinator, CoordinatorHandle, DatabaseId,
    Distributor, Driver, LockKey, NodeId, ShardId, SharedTenants,
};
use shardlock_distributors::{MultiTenanted, SingleTenant};
use shardlock_postgres::sqlx::postgres::PgConnectOptions;
use shardlock_postgres::sqlx::{self, Executor as _};
use shardlock_postgres::{DatabaseMapping, PgDriver, PgOptions, PgSession};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::coordinated::{snapshot, Snapshot, PG_CONNECTIONS_PER_DATABASE};
use crate::{err, progress, Ctx, BENCH_DB};

const M11S: &str = "11 many databases: steady cycle time";
const M11O: &str = "11 many databases: time to own every set";
const M11C: &str = "11 many databases: connections per node";
const M11P: &str = "11 many databases: CPU per steady cycle";
const M11M: &str = "11 many databases: resident memory";
const M11D: &str = "11 many databases: a dead tenant beside the live ones";
const M11V: &str = "11 many databases: verify interval per tenant";

/// The schema part of the coordinators' lock names.
const SCHEMA: &str = "bench-m11";
/// The schema part of the raw side's key names (other keys, same databases).
const RAW_SCHEMA: &str = "bench-m11-raw";
/// Poll and pause interval of every coordinator.
const POLL: Duration = Duration::from_millis(100);
/// Poll interval of (d)'s coordinators in a full run: the default. A full
/// verify reads all of `pg_locks`, whose cost grows with every lock on the
/// server (with 100,000 held, 100 full verifies every 100 ms would be more
/// than a core does); the light one in between costs nothing of the kind,
/// but the window is kept at the default poll.
const SETS_POLL: Duration = Duration::from_secs(5);
/// (d)'s steady window in a full run: a few verify rounds at [`SETS_POLL`].
const SETS_WINDOW: Duration = Duration::from_secs(16);
/// The driver's connect timeout in (c): how long a connect to the dead
/// tenant hangs.
const DEAD_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// The coordinator's connect deadline in (c), set explicitly.
const DEAD_COORDINATOR_CONNECT: Duration = Duration::from_secs(3);
/// Longest wait for a coordinator to own everything.
const OWN_LIMIT: Duration = Duration::from_secs(120);
/// The dead tenant's database id.
const DEAD_DB: &str = "shardlock_bench_dead";
/// Databases created at once when some are missing.
const CREATE_CONCURRENCY: usize = 4;

/// Sizes and windows of one run.
struct Shape {
    tenants: usize,
    shards: usize,
    /// Steady window: every published cycle, and process CPU over it.
    window: Duration,
    /// Raw checks before each configuration.
    raw_checks: usize,
    /// The coordinators' poll interval.
    poll: Duration,
    /// Whether the steady window waits for every connection of the node to
    /// be up (one session per database) before it starts.
    settle: bool,
}

/// An agent that does nothing until told to stop.
struct Idle;

impl Agent for Idle {
    async fn run(&self, _shard: &ShardId, ctx: AgentContext) -> Result<(), AgentError> {
        ctx.cancel.cancelled().await;
        Ok(())
    }
}

/// Measure 11.
pub(crate) async fn run(ctx: &mut Ctx) {
    let (shape, sets) = ctx.config.pick(
        (
            Shape {
                tenants: 10,
                shards: 10,
                window: Duration::from_secs(4),
                raw_checks: 3,
                poll: POLL,
                settle: false,
            },
            Shape {
                tenants: 10,
                shards: 1_000,
                window: Duration::from_secs(4),
                raw_checks: 3,
                poll: Duration::from_secs(1),
                settle: true,
            },
        ),
        (
            Shape {
                tenants: 100,
                shards: 100,
                window: Duration::from_secs(15),
                raw_checks: 5,
                poll: POLL,
                settle: false,
            },
            Shape {
                tenants: 100,
                shards: 1_000,
                window: SETS_WINDOW,
                raw_checks: 3,
                poll: SETS_POLL,
                settle: true,
            },
        ),
    );
    progress(format!(
        "measure 11: {} tenant databases × {} shards, then {} × {} sets (postgres)",
        shape.tenants, shape.shards, sets.tenants, sets.shards
    ));
    match postgres(ctx, &shape).await {
        Ok(rows) => rows.into_iter().for_each(|r| ctx.report.push(r)),
        Err(why) => ctx
            .report
            .push(Row::not_measured(M11S, "postgres", Target::None, why)),
    }
    progress(format!(
        "  (d) {} coordinators, SingleTenant each, {} sets each",
        sets.tenants, sets.shards
    ));
    match many_sets(ctx, &sets).await {
        Ok(rows) => rows.into_iter().for_each(|r| ctx.report.push(r)),
        Err(why) => ctx.report.push(Row::not_measured(
            M11M,
            "postgres",
            Target::None,
            format!("{}: {why}", many_sets_what(&sets)),
        )),
    }
}

/// Connections of one node in `pg_stat_activity`, per kind.
#[derive(Debug, Default, Clone, Copy)]
struct Conns {
    sessions: i64,
    other: i64,
}

impl Conns {
    fn total(&self) -> i64 {
        self.sessions + self.other
    }

    fn describe(&self) -> String {
        let mut text = format!("{} ({} sessions", self.total(), self.sessions);
        if self.other > 0 {
            text.push_str(&format!(" + {} other", self.other));
        }
        text.push(')');
        text
    }
}

async fn node_connections(env: &mut PgEnv, node: &str) -> Result<Conns, String> {
    let name = format!("shardlock:{node}");
    let (sessions, all): (i64, i64) = sqlx::query_as(
        "select count(*) filter (where application_name = $1), \
                count(*) filter (where application_name = $1 \
                    or left(application_name, length($1) + 1) = $1 || ':') \
         from pg_stat_activity",
    )
    .bind(name)
    .fetch_one(env.admin())
    .await
    .map_err(err)?;
    Ok(Conns {
        sessions,
        other: all - sessions,
    })
}

/// Resident memory of this process in KiB (`VmRSS`).
fn rss_kib() -> Option<u64> {
    std::fs::read_to_string("/proc/self/status")
        .ok()?
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// KiB in MiB.
fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// `n` with a comma every three digits (`100,000`).
fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The tenant database names.
fn tenant_names(t: usize) -> Vec<String> {
    (0..t).map(|i| format!("shardlock_bench_t{i:03}")).collect()
}

/// Creates the tenant databases that are missing, `CREATE_CONCURRENCY` at a
/// time; answers how many were created.
async fn ensure_tenants(env: &mut PgEnv, names: &[String]) -> Result<usize, String> {
    let existing: Vec<String> =
        sqlx::query_scalar("select datname from pg_database where datname = any($1)")
            .bind(names)
            .fetch_all(env.admin())
            .await
            .map_err(err)?;
    let missing: Vec<String> = names
        .iter()
        .filter(|n| !existing.contains(n))
        .cloned()
        .collect();
    if missing.is_empty() {
        return Ok(0);
    }
    let mut tasks = JoinSet::new();
    for lane in 0..CREATE_CONCURRENCY.min(missing.len()) {
        let mine: Vec<String> = missing
            .iter()
            .skip(lane)
            .step_by(CREATE_CONCURRENCY)
            .cloned()
            .collect();
        let options = env.options_for(BENCH_DB);
        tasks.spawn(async move {
            let mut conn = RawPg::connect(&options).await.map_err(err)?;
            for name in mine {
                let quoted = name.replace('"', "\"\"");
                let sql = format!("create database \"{quoted}\"");
                conn.conn()
                    .execute(sql.as_str())
                    .await
                    .map_err(|e| format!("create database {name}: {}", err(e)))?;
            }
            conn.close().await.map_err(err)
        });
    }
    while let Some(joined) = tasks.join_next().await {
        joined.map_err(err)??;
    }
    Ok(missing.len())
}

/// The raw side: one connection per tenant database, each with its keys.
struct RawTenants {
    conns: Vec<(RawPg, Vec<i64>)>,
}

#[derive(Clone, Copy)]
enum Op {
    Acquire,
    Check,
    Release,
}

impl RawTenants {
    /// Connects to every tenant at once; answers the side and the time.
    async fn connect(
        env: &PgEnv,
        names: &[String],
        shards: usize,
    ) -> Result<(Self, Duration), String> {
        let started = Instant::now();
        let mut tasks = JoinSet::new();
        for name in names {
            let options = env.options_for(name);
            let keys = (0..shards)
                .map(|i| LockKey::for_shard(name, RAW_SCHEMA, &format!("k-{i}")).map(|k| k.id()))
                .collect::<Result<Vec<_>, _>>()
                .map_err(err)?;
            tasks.spawn(async move { RawPg::connect(&options).await.map(|c| (c, keys)) });
        }
        let mut conns = Vec::with_capacity(names.len());
        let mut failure = None;
        while let Some(joined) = tasks.join_next().await {
            match joined.map_err(err)? {
                Ok(conn) => conns.push(conn),
                Err(e) => failure = Some(err(e)),
            }
        }
        let elapsed = started.elapsed();
        let side = Self { conns };
        match failure {
            Some(why) => {
                side.close().await;
                Err(format!("raw connect: {why}"))
            }
            None => Ok((side, elapsed)),
        }
    }

    /// Runs `op` on every connection at once; answers the wall time.
    async fn all(&mut self, op: Op) -> Result<Duration, String> {
        let started = Instant::now();
        let mut tasks = JoinSet::new();
        for (mut conn, keys) in self.conns.drain(..) {
            tasks.spawn(async move {
                let ok = match op {
                    Op::Acquire => conn
                        .try_lock_many(&keys)
                        .await
                        .map(|got| got.iter().all(|g| *g)),
                    Op::Check => conn.count_held().await.map(|n| n == keys.len() as i64),
                    Op::Release => conn.unlock_all().await.map(|()| true),
                };
                (conn, keys, ok)
            });
        }
        let mut failure = None;
        while let Some(joined) = tasks.join_next().await {
            let (conn, keys, ok) = joined.map_err(err)?;
            self.conns.push((conn, keys));
            match ok {
                Ok(true) => {}
                Ok(false) => failure = Some("a raw tenant's keys are not all held".to_string()),
                Err(e) => failure = Some(err(e)),
            }
        }
        let elapsed = started.elapsed();
        failure.map_or(Ok(elapsed), Err)
    }

    async fn close(self) {
        for (conn, _) in self.conns {
            let _ = conn.close().await;
        }
    }
}

/// A loopback TCP listener that accepts connections and never answers: a
/// dead database server whose connects hang until the client gives up.
struct DeadServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    accepted: Arc<AtomicUsize>,
    thread: Option<JoinHandle<()>>,
}

impl DeadServer {
    fn start() -> Result<Self, String> {
        let listener = TcpListener::bind("127.0.0.1:0").map_err(err)?;
        let addr = listener.local_addr().map_err(err)?;
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicUsize::new(0));
        let (s, a) = (Arc::clone(&stop), Arc::clone(&accepted));
        let thread = std::thread::Builder::new()
            .name("m11-dead-tenant".into())
            .spawn(move || {
                // Held open, never read nor written, until the bench stops.
                let mut held = Vec::new();
                for conn in listener.incoming() {
                    if s.load(Ordering::SeqCst) {
                        break;
                    }
                    if let Ok(conn) = conn {
                        a.fetch_add(1, Ordering::SeqCst);
                        held.push(conn);
                    }
                }
            })
            .map_err(err)?;
        Ok(Self {
            addr,
            stop,
            accepted,
            thread: Some(thread),
        })
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for DeadServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the accept loop so it sees the flag.
        let _ = TcpStream::connect(self.addr);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A Postgres driver that sends one database id to another server (the
/// dead one) and every other id to the real one.
#[derive(Clone)]
struct WithDeadTenant {
    live: PgDriver,
    dead: PgDriver,
    dead_db: DatabaseId,
}

impl Driver for WithDeadTenant {
    type Session = PgSession;

    fn name(&self) -> &'static str {
        self.live.name()
    }

    fn connect(
        &self,
        database: &DatabaseId,
        node: &NodeId,
    ) -> impl std::future::Future<Output = shardlock_core::Result<PgSession>> + Send {
        let driver = if *database == self.dead_db {
            self.dead.clone()
        } else {
            self.live.clone()
        };
        let (database, node) = (database.clone(), node.clone());
        async move { driver.connect(&database, &node).await }
    }

    fn lock_release_window(&self) -> Option<Duration> {
        self.live.lock_release_window()
    }

    fn connect_timeout(&self) -> Option<Duration> {
        self.live.connect_timeout()
    }

    fn capabilities(&self) -> Capabilities {
        self.live.capabilities()
    }
}

fn start<D: Driver, S: Distributor>(
    driver: D,
    distributor: S,
    node: &str,
    poll: Duration,
    connect_timeout: Option<Duration>,
) -> Result<CoordinatorHandle, String> {
    let mut builder = Coordinator::builder(driver, distributor, Idle)
        .node_id(node)
        .poll_interval(poll)
        .pause_interval(POLL)
        .start_jitter(Duration::ZERO)
        .lock_loss_timeout(Duration::from_secs(10));
    if let Some(timeout) = connect_timeout {
        builder = builder.connect_timeout(timeout);
    }
    builder.build().map_err(err)?.start().map_err(err)
}

/// What one configuration measured.
struct Outcome {
    /// Wall time from `start()` until every set was owned and held.
    own: Duration,
    /// The most cycles any coordinator had run by then.
    own_cycles: u64,
    /// The raw side's batch before this configuration started.
    raw_acquire: Duration,
    /// Published cycle durations in the steady window.
    cycles: Vec<Duration>,
    /// The steady window's length.
    window: Duration,
    /// Cycles completed in the steady window (all coordinators).
    window_cycles: u64,
    /// Of those, cycles not seen (a watch keeps only the latest publish).
    unobserved: u64,
    /// Published cycles of at least [`SLOW_CYCLE`].
    slow: usize,
    /// Raw checks before this configuration started.
    raw: Samples,
    /// Process CPU over the steady window.
    cpu: Option<Duration>,
    /// Statements the server ran in each live tenant database over the
    /// steady window (`pg_stat_statements`; the verifies, nothing else
    /// runs there then), or why they are not known.
    statements: Result<Vec<i64>, String>,
    /// `VmRSS` before the start and while holding, KiB.
    rss: Option<(u64, u64)>,
    conns: Conns,
    /// Health reasons of the coordinators at the end (degraded only).
    health: Vec<String>,
    /// How long after owning the node's connections were all up, when the
    /// window waited for them.
    settled: Option<Duration>,
}

impl Outcome {
    /// Owned after `own` and `own_cycles`; the steady window not yet run.
    fn new(own: Duration, own_cycles: u64, window: Duration) -> Self {
        Self {
            own,
            own_cycles,
            raw_acquire: Duration::ZERO,
            cycles: Vec::new(),
            window,
            window_cycles: 0,
            unobserved: 0,
            slow: 0,
            raw: Samples::default(),
            cpu: None,
            statements: Err("not counted".into()),
            rss: None,
            conns: Conns::default(),
            health: Vec::new(),
            settled: None,
        }
    }
}

/// The publishes of every coordinator, tagged with its index.
type Publishes = mpsc::UnboundedReceiver<(usize, Snapshot)>;

fn forward(handles: &[CoordinatorHandle], tasks: &mut JoinSet<()>) -> Publishes {
    let (tx, rx) = mpsc::unbounded_channel();
    for (i, handle) in handles.iter().enumerate() {
        let mut assignment = handle.assignment();
        let tx = tx.clone();
        tasks.spawn(async move {
            loop {
                let s = snapshot(&assignment.borrow_and_update());
                if tx.send((i, s)).is_err() || assignment.changed().await.is_err() {
                    break;
                }
            }
        });
    }
    rx
}

/// Starts the coordinators (`launch`), waits until coordinator `i` owns
/// `expected[i]` sets, all held, then measures the steady state.
async fn measure(
    env: &mut PgEnv,
    names: &[String],
    shape: &Shape,
    raw: &mut RawTenants,
    node: &str,
    expected: &[usize],
    launch: impl FnOnce() -> Result<Vec<CoordinatorHandle>, String>,
) -> Result<Outcome, String> {
    let (raw_acquire, raw_checks) = raw_round(raw, shape).await?;
    let mut out = hold(env, names, shape, node, expected, launch).await?;
    out.raw_acquire = raw_acquire;
    out.raw = raw_checks;
    Ok(out)
}

/// The raw side alone (its held keys would otherwise make every read of
/// `pg_locks`, the coordinator's verify, longer): acquire, checks,
/// release. Answers the acquire's time and the checks'.
async fn raw_round(raw: &mut RawTenants, shape: &Shape) -> Result<(Duration, Samples), String> {
    let raw_acquire = raw.all(Op::Acquire).await?;
    let mut raw_checks = Samples::default();
    for _ in 0..shape.raw_checks {
        raw_checks.push(raw.all(Op::Check).await?);
    }
    raw.all(Op::Release).await?;
    Ok((raw_acquire, raw_checks))
}

/// Starts the coordinators (`launch`), waits until coordinator `i` owns
/// `expected[i]` sets, all held, measures the steady state, then stops
/// them; the raw fields are left empty.
async fn hold(
    env: &mut PgEnv,
    names: &[String],
    shape: &Shape,
    node: &str,
    expected: &[usize],
    launch: impl FnOnce() -> Result<Vec<CoordinatorHandle>, String>,
) -> Result<Outcome, String> {
    let rss_before = rss_kib();
    let started = Instant::now();
    let handles = launch()?;
    let mut forwarders = JoinSet::new();
    let mut rx = forward(&handles, &mut forwarders);
    let result = observe(env, names, node, &mut rx, shape, expected, started).await;
    let rss_while = rss_kib();
    let result = match result {
        Ok(mut out) => match node_connections(env, node).await {
            Ok(conns) => {
                out.conns = conns;
                out.rss = rss_before.zip(rss_while);
                out.health = handles
                    .iter()
                    .flat_map(|h| h.health().reasons())
                    .map(|r| r.to_string())
                    .collect();
                Ok(out)
            }
            Err(why) => Err(why),
        },
        Err(why) => Err(why),
    };
    forwarders.abort_all();
    let mut stopped = Ok(());
    for handle in handles {
        if let Err(e) = handle.stop().await {
            stopped = Err(err(e));
        }
    }
    let out = result?;
    stopped?;
    Ok(out)
}

/// The own phase and the steady window.
async fn observe(
    env: &mut PgEnv,
    names: &[String],
    node: &str,
    rx: &mut Publishes,
    shape: &Shape,
    expected: &[usize],
    started: Instant,
) -> Result<Outcome, String> {
    let n = expected.len();
    let mut latest: Vec<Option<Snapshot>> = vec![None; n];
    let owns = |i: usize, s: &Snapshot| s.owned == expected[i] && s.all_held;
    let mut owning = 0usize;
    let deadline = tokio::time::Instant::now() + OWN_LIMIT;
    while owning < n {
        let (i, s) = match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(message)) => message,
            Ok(None) => return Err("the coordinators stopped".into()),
            Err(_) => {
                return Err(format!(
                    "{owning} of {n} coordinators owned their sets within {OWN_LIMIT:?}"
                ))
            }
        };
        let before = latest[i].is_some_and(|p| owns(i, &p));
        let now = owns(i, &s);
        latest[i] = Some(s);
        match (before, now) {
            (false, true) => owning += 1,
            (true, false) => owning -= 1,
            _ => {}
        }
    }
    let own = started.elapsed();
    let own_cycles = latest.iter().flatten().map(|s| s.cycles).max().unwrap_or(0);
    let mut last: Vec<Snapshot> = latest.into_iter().flatten().collect();
    let mut out = Outcome::new(own, own_cycles, shape.window);
    if shape.settle {
        let want = (names.len() * PG_CONNECTIONS_PER_DATABASE) as i64;
        out.settled = Some(settle(env, node, want).await?);
        // Cycles run meanwhile are not the window's.
        while let Ok((i, s)) = rx.try_recv() {
            if s.cycles > last[i].cycles {
                last[i] = s;
            }
        }
    }
    // Per thread: a runtime thread that exits in the window must not make
    // the process total go down.
    let counting = reset_statements(env).await;
    let cpu_before = CpuSnapshot::now().ok();
    window(rx, shape.window, expected, &mut last, &mut out).await?;
    let cpu_after = CpuSnapshot::now().ok();
    out.statements = match counting {
        Ok(()) => tenant_statements(env, names).await,
        Err(why) => Err(why),
    };
    if let (Some(a), Some(b)) = (cpu_before, cpu_after) {
        out.cpu = Some(b.since(&a));
    }
    Ok(out)
}

/// Longest wait for a node's connections after it owns its sets.
const SETTLE_LIMIT: Duration = Duration::from_secs(30);

/// Waits until `node` has `want` connections; answers how long that took.
async fn settle(env: &mut PgEnv, node: &str, want: i64) -> Result<Duration, String> {
    let started = Instant::now();
    loop {
        let conns = node_connections(env, node).await?;
        if conns.total() >= want {
            return Ok(started.elapsed());
        }
        if started.elapsed() > SETTLE_LIMIT {
            return Err(format!(
                "the node had {} of its {want} connections {SETTLE_LIMIT:?} after owning its sets",
                conns.describe()
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `pg_stat_statements_reset()`, or why statements cannot be counted.
async fn reset_statements(env: &mut PgEnv) -> Result<(), String> {
    sqlx::query("select pg_stat_statements_reset()")
        .execute(env.admin())
        .await
        .map(drop)
        .map_err(|e| format!("pg_stat_statements not usable: {}", err(e)))
}

/// Statements run in each of `names` since the reset, in that order.
async fn tenant_statements(env: &mut PgEnv, names: &[String]) -> Result<Vec<i64>, String> {
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "select d.datname, coalesce(sum(s.calls), 0)::bigint from pg_database d \
         left join pg_stat_statements s on s.dbid = d.oid \
         where d.datname = any($1) group by d.datname",
    )
    .bind(names)
    .fetch_all(env.admin())
    .await
    .map_err(err)?;
    Ok(names
        .iter()
        .map(|n| rows.iter().find(|(d, _)| d == n).map_or(0, |(_, c)| *c))
        .collect())
}

/// Per live tenant, the window divided by its statements: how often its
/// session was verified. Answers the median and the worst tenant's.
fn verify_intervals(out: &Outcome) -> Option<(Duration, Duration)> {
    let calls = out.statements.as_ref().ok()?;
    let mut intervals = Samples::default();
    for &c in calls {
        // A tenant never verified counts as the whole window.
        intervals.push(out.window.div_f64(c.max(1) as f64));
    }
    Some((intervals.p50()?, intervals.max()?))
}

/// Collects the publishes of one time window.
async fn window(
    rx: &mut Publishes,
    length: Duration,
    expected: &[usize],
    last: &mut [Snapshot],
    out: &mut Outcome,
) -> Result<(), String> {
    let end = tokio::time::Instant::now() + length;
    loop {
        let (i, s) = match tokio::time::timeout_at(end, rx.recv()).await {
            Ok(Some(message)) => message,
            Ok(None) => return Err("the coordinators stopped".into()),
            Err(_) => return Ok(()),
        };
        let previous = last[i].cycles;
        if s.cycles <= previous {
            continue;
        }
        // A lost session's sets leave the owned list: count them too.
        if s.owned != expected[i] || !s.all_held {
            return Err(format!(
                "a set was lost during the steady state ({} of {} owned)",
                s.owned, expected[i]
            ));
        }
        out.window_cycles += s.cycles - previous;
        out.unobserved += s.cycles - previous - 1;
        out.cycles.push(s.last_cycle);
        out.slow += usize::from(s.last_cycle >= SLOW_CYCLE);
        last[i] = s;
    }
}

fn samples(values: &[Duration]) -> Samples {
    let mut s = Samples::default();
    values.iter().for_each(|v| s.push(*v));
    s
}

fn p50_p95(s: &Samples) -> String {
    match (s.p50(), s.percentile(95.0)) {
        (Some(p50), Some(p95)) => format!("p50 {} (p95 {})", fmt_duration(p50), fmt_duration(p95)),
        _ => "—".to_string(),
    }
}

/// Fails unless the server takes a node over `t` tenants beside the raw
/// side.
async fn check_connections(env: &mut PgEnv, t: usize) -> Result<(), String> {
    let needed = (t * (PG_CONNECTIONS_PER_DATABASE + 1) + 10) as i64;
    let max = env.max_connections().await?;
    if max < needed {
        return Err(format!(
            "T = {t} needs max_connections ≥ {needed} ({PG_CONNECTIONS_PER_DATABASE} per tenant \
             for the node, 1 per tenant for the raw side, a few for the bench); the server has \
             {max}: raise it in scripts/bench.sh"
        ));
    }
    Ok(())
}

/// The tenant databases `shardlock_bench_t000` … for `t` tenants, created
/// if missing.
async fn tenants_ready(env: &mut PgEnv, t: usize) -> Result<Vec<String>, String> {
    let names = tenant_names(t);
    let creating = Instant::now();
    let created = ensure_tenants(env, &names).await?;
    progress(format!(
        "  {created} tenant databases created in {} ({} existed)",
        fmt_duration(creating.elapsed()),
        t - created
    ));
    Ok(names)
}

/// Driver options for the live tenants: `base`'s server, the tenant id as
/// the database name.
fn live_options(base: &PgConnectOptions, timeout: Option<Duration>) -> PgOptions {
    let options =
        PgOptions::from_connect_options(base.clone()).database_mapping(DatabaseMapping::SameServer);
    match timeout {
        Some(timeout) => options.connect_timeout(timeout),
        None => options,
    }
}

/// The raw side's steady check, as the rows describe it.
const RAW_CHECK: &str = "one `select count(*) from pg_locks …` per raw connection, all at once";

async fn postgres(ctx: &mut Ctx, shape: &Shape) -> Result<Vec<Row>, String> {
    let env = ctx.pg()?;
    let (t, s) = (shape.tenants, shape.shards);
    check_connections(env, t).await?;
    let names = tenants_ready(env, t).await?;
    let (mut raw, raw_connect) = RawTenants::connect(env, &names, s).await?;
    let result = configurations(env, shape, &names, &mut raw, raw_connect).await;
    raw.close().await;
    result
}

async fn configurations(
    env: &mut PgEnv,
    shape: &Shape,
    names: &[String],
    raw: &mut RawTenants,
    raw_connect: Duration,
) -> Result<Vec<Row>, String> {
    let (t, s) = (shape.tenants, shape.shards);
    let tenants: Vec<DatabaseId> = names.iter().map(DatabaseId::new).collect();
    let shards = || (0..s).map(|i| ShardId::new(format!("shard-{i}")));
    let base = env.options_for(BENCH_DB);
    let live_options = |timeout: Option<Duration>| live_options(&base, timeout);
    let mut rows = Vec::new();

    progress("  (a) one coordinator, MultiTenanted");
    let node_a = "bench-m11-multi";
    let driver = PgDriver::new(live_options(None));
    let list = tenants.clone();
    let a = measure(env, names, shape, raw, node_a, &[t], || {
        let distributor = MultiTenanted::new(SharedTenants::new(list), SCHEMA, shards());
        Ok(vec![start(driver, distributor, node_a, POLL, None)?])
    })
    .await;

    progress(format!("  (b) {t} coordinators, SingleTenant each"));
    let node_b = "bench-m11-single";
    let driver = PgDriver::new(live_options(None));
    let list = tenants.clone();
    let b = measure(env, names, shape, raw, node_b, &vec![s; t], || {
        list.into_iter()
            .map(|db| {
                start(
                    driver.clone(),
                    SingleTenant::new(db, SCHEMA, shards()),
                    node_b,
                    POLL,
                    None,
                )
            })
            .collect()
    })
    .await;

    progress("  (c) MultiTenanted with a dead tenant database");
    let node_c = "bench-m11-dead";
    let c = match DeadServer::start() {
        Ok(dead) => {
            let driver = WithDeadTenant {
                live: PgDriver::new(live_options(Some(DEAD_CONNECT_TIMEOUT))),
                dead: PgDriver::new(
                    live_options(Some(DEAD_CONNECT_TIMEOUT))
                        .host("127.0.0.1")
                        .port(dead.addr.port()),
                ),
                dead_db: DatabaseId::new(DEAD_DB),
            };
            let mut list = tenants.clone();
            list.push(DatabaseId::new(DEAD_DB));
            let out = measure(env, names, shape, raw, node_c, &[t], || {
                let distributor = MultiTenanted::new(SharedTenants::new(list), SCHEMA, shards());
                Ok(vec![start(
                    driver,
                    distributor,
                    node_c,
                    POLL,
                    Some(DEAD_COORDINATOR_CONNECT),
                )?])
            })
            .await;
            let accepted = dead.accepted();
            drop(dead);
            out.map(|o| (o, accepted))
        }
        Err(why) => Err(format!("cannot open the dead tenant's listener: {why}")),
    };

    let setups = [
        (
            "a",
            format!("(a) one node, one coordinator, MultiTenanted over T = {t} tenant databases, S = {s} shards each ({t} sets of {s} shards)"),
            node_a,
            t,
            &a,
        ),
        (
            "b",
            format!("(b) one node, {t} coordinators in one process, SingleTenant each over its tenant database with S = {s} shards ({} sets of 1 shard)", thousands(t * s)),
            node_b,
            t * s,
            &b,
        ),
    ];
    for (tag, what, node, sets, outcome) in setups {
        match outcome {
            Ok(out) => rows.extend(config_rows(
                &Setup {
                    tag,
                    what: &what,
                    node,
                    t,
                    s,
                    sets,
                    raw_connect,
                    own_process: false,
                    poll: POLL,
                },
                out,
                "",
            )),
            Err(why) => rows.push(Row::not_measured(
                M11S,
                "postgres",
                Target::None,
                format!("{what}: {why}"),
            )),
        }
    }
    let what_c = format!(
        "(c) (a) plus a dead tenant database (T = {t} live + 1 whose connects hang: a loopback \
         listener that accepts and never answers; driver connect_timeout {}, coordinator \
         connect_timeout {} set explicitly)",
        fmt_duration(DEAD_CONNECT_TIMEOUT),
        fmt_duration(DEAD_COORDINATOR_CONNECT)
    );
    match &c {
        Ok((out, accepted)) => {
            let extra = format!(
                "; the dead listener accepted {accepted} connections; health at the end: {}",
                if out.health.is_empty() {
                    "healthy".to_string()
                } else {
                    out.health.join("; ")
                }
            );
            rows.extend(config_rows(
                &Setup {
                    tag: "c",
                    what: &what_c,
                    node: node_c,
                    t,
                    s,
                    sets: t,
                    raw_connect,
                    own_process: false,
                    poll: POLL,
                },
                out,
                &extra,
            ));
            if let Ok(a) = &a {
                rows.extend(dead_rows(t, s, a, out));
            }
        }
        Err(why) => rows.push(Row::not_measured(
            M11D,
            "postgres",
            Target::None,
            format!("{what_c}: {why}"),
        )),
    }
    Ok(rows)
}

/// (d) in words.
fn many_sets_what(shape: &Shape) -> String {
    let (t, s) = (shape.tenants, shape.shards);
    format!(
        "(d) one node holding {} lock sets across {t} tenant databases: {t} coordinators in one \
         process, SingleTenant each over its tenant database with {} sets of 1 shard",
        thousands(t * s),
        thousands(s)
    )
}

/// Advisory locks the server's shared lock table has room for at least:
/// `max_locks_per_transaction × (max_connections +
/// max_prepared_transactions)` (the table also counts the background
/// workers' slots, so this is a floor).
async fn lock_room(env: &mut PgEnv) -> Result<i64, String> {
    sqlx::query_scalar(
        "select current_setting('max_locks_per_transaction')::bigint \
             * (current_setting('max_connections')::bigint \
                + current_setting('max_prepared_transactions')::bigint)",
    )
    .fetch_one(env.admin())
    .await
    .map_err(err)
}

/// (d): T SingleTenant coordinators in this process, S sets of one shard
/// each, all held (T × S lock sets); the raw side, alone before them, T
/// connections each locking its S keys in one `unnest` batch. Everything is
/// freed (coordinators stopped, raw connections closed) before it returns.
async fn many_sets(ctx: &mut Ctx, shape: &Shape) -> Result<Vec<Row>, String> {
    let env = ctx.pg()?;
    let (t, s) = (shape.tenants, shape.shards);
    let total = t * s;
    check_connections(env, t).await?;
    // Every set's lock, and room to spare.
    let needed = (total + 1_000) as i64;
    let room = lock_room(env).await?;
    if room < needed {
        return Err(format!(
            "{} advisory locks need a shared lock table of ≥ {needed} (max_locks_per_transaction \
             × (max_connections + max_prepared_transactions)); the server has {room}: raise \
             max_locks_per_transaction in scripts/bench.sh",
            thousands(total)
        ));
    }
    let names = tenants_ready(env, t).await?;
    let (mut raw, raw_connect) = RawTenants::connect(env, &names, s).await?;
    let raw_side = raw_round(&mut raw, shape).await;
    // The node runs in a process of its own, so that its resident memory
    // is its own and not memory an earlier measure freed and this reuses.
    let child = match raw_side {
        Ok(_) => run_sets_node(shape).await,
        Err(_) => Err("not started".into()),
    };
    raw.close().await;
    let (raw_acquire, raw_checks) = raw_side?;
    let mut out = child?;
    out.raw_acquire = raw_acquire;
    out.raw = raw_checks;
    let what = many_sets_what(shape);
    let extra = out.settled.map_or(String::new(), |d| {
        format!(
            "; the window starts once the node's {} connections are up ({} after owning)",
            t * PG_CONNECTIONS_PER_DATABASE,
            fmt_duration(d)
        )
    });
    Ok(config_rows(
        &Setup {
            tag: "d",
            what: &what,
            node: SETS_NODE_ID,
            t,
            s,
            sets: total,
            raw_connect,
            own_process: true,
            poll: shape.poll,
        },
        &out,
        &extra,
    ))
}

/// The hidden sub-command that runs (d)'s node in a process of its own.
pub(crate) const SETS_NODE: &str = "m11-sets-node";
/// (d)'s node id.
const SETS_NODE_ID: &str = "bench-m11-sets";
/// The line prefix of the child's answer on stdout.
const ANSWER: &str = "m11 ";

/// Runs `shardlock-bench m11-sets-node <tenants> <sets> <window ms> <poll
/// ms>` and
/// reads its outcome (the raw fields empty).
async fn run_sets_node(shape: &Shape) -> Result<Outcome, String> {
    let exe = std::env::current_exe().map_err(err)?;
    let args = [
        SETS_NODE.to_string(),
        shape.tenants.to_string(),
        shape.shards.to_string(),
        shape.window.as_millis().to_string(),
        shape.poll.as_millis().to_string(),
    ];
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(exe)
            .args(args)
            .stdin(std::process::Stdio::null())
            .stderr(std::process::Stdio::inherit())
            .output()
    })
    .await
    .map_err(err)?
    .map_err(|e| format!("cannot run {SETS_NODE}: {}", err(e)))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() && !stdout.contains(ANSWER) {
        return Err(format!("{SETS_NODE} ended with {}", output.status));
    }
    decode(&stdout)
}

/// The child side of (d): `<tenants> <sets per tenant> <window ms> <poll
/// ms>`; the
/// server from `SHARDLOCK_PG_URL`. Prints the outcome (or why there is
/// none) on stdout for [`decode`].
pub(crate) fn sets_node(args: &[String]) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let number = |i: usize, what: &str| -> anyhow::Result<usize> {
        let arg = args.get(i).with_context(|| {
            format!("usage: {SETS_NODE} <tenants> <sets> <window ms> <poll ms> ({what})")
        })?;
        arg.parse()
            .with_context(|| format!("{SETS_NODE}: {what} {arg:?}"))
    };
    let shape = Shape {
        tenants: number(0, "tenants")?,
        shards: number(1, "sets per tenant")?,
        window: Duration::from_millis(number(2, "window ms")? as u64),
        raw_checks: 0,
        poll: Duration::from_millis(number(3, "poll ms")? as u64),
        settle: true,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start a Tokio runtime")?;
    let outcome = runtime.block_on(async {
        let mut env = match PgEnv::from_env(Duration::from_secs(60)).await {
            Ok(Some(env)) => env,
            Ok(None) => return Err(format!("no server: set {}", shardlock_benches::URL_ENV)),
            Err(why) => return Err(why),
        };
        hold_sets(&mut env, &shape).await
    });
    print!("{}", encode(&outcome));
    Ok(())
}

/// (d)'s node: T SingleTenant coordinators, S sets each, held and measured.
async fn hold_sets(env: &mut PgEnv, shape: &Shape) -> Result<Outcome, String> {
    let (t, s) = (shape.tenants, shape.shards);
    let names = tenant_names(t);
    let driver = PgDriver::new(live_options(&env.options_for(BENCH_DB), None));
    let tenants: Vec<DatabaseId> = names.iter().map(DatabaseId::new).collect();
    hold(env, &names, shape, SETS_NODE_ID, &vec![s; t], || {
        tenants
            .into_iter()
            .map(|db| {
                let shards = (0..s).map(|i| ShardId::new(format!("shard-{i}")));
                start(
                    driver.clone(),
                    SingleTenant::new(db, SCHEMA, shards),
                    SETS_NODE_ID,
                    shape.poll,
                    None,
                )
            })
            .collect()
    })
    .await
}

/// The outcome as `m11 <field> <value>` lines (the raw fields left out).
fn encode(outcome: &Result<Outcome, String>) -> String {
    let out = match outcome {
        Ok(out) => out,
        Err(why) => return format!("{ANSWER}error {}\n", one_line(why)),
    };
    let us = |d: Duration| d.as_micros().to_string();
    let list = |v: &mut dyn Iterator<Item = String>| v.collect::<Vec<_>>().join(",");
    let mut text = String::new();
    let mut line = |field: &str, value: String| {
        text.push_str(&format!("{ANSWER}{field} {value}\n"));
    };
    line("own", us(out.own));
    line("own_cycles", out.own_cycles.to_string());
    line("window", us(out.window));
    line("window_cycles", out.window_cycles.to_string());
    line("unobserved", out.unobserved.to_string());
    line("slow", out.slow.to_string());
    line("cycles", list(&mut out.cycles.iter().map(|d| us(*d))));
    if let Some(cpu) = out.cpu {
        line("cpu", us(cpu));
    }
    if let Some(settled) = out.settled {
        line("settled", us(settled));
    }
    match &out.statements {
        Ok(calls) => line("statements", list(&mut calls.iter().map(i64::to_string))),
        Err(why) => line("statements_error", one_line(why)),
    }
    if let Some((before, held)) = out.rss {
        line("rss", format!("{before} {held}"));
    }
    let c = out.conns;
    line("conns", format!("{} {}", c.sessions, c.other));
    for reason in &out.health {
        line("health", one_line(reason));
    }
    text
}

fn one_line(text: &str) -> String {
    text.replace(['\n', '\r'], " ")
}

/// Reads [`encode`]'s lines back (other lines are ignored).
fn decode(text: &str) -> Result<Outcome, String> {
    let mut out = Outcome::new(Duration::ZERO, 0, Duration::ZERO);
    let mut seen_own = false;
    let bad = |field: &str, value: &str| format!("{SETS_NODE} answered {field} {value:?}");
    let number = |field: &str, value: &str| -> Result<u64, String> {
        value.trim().parse().map_err(|_| bad(field, value))
    };
    let numbers = |field: &str, value: &str| -> Result<Vec<u64>, String> {
        value
            .split([',', ' '])
            .filter(|v| !v.is_empty())
            .map(|v| number(field, v))
            .collect()
    };
    for l in text.lines() {
        let Some(rest) = l.strip_prefix(ANSWER) else {
            continue;
        };
        let (field, value) = rest.split_once(' ').unwrap_or((rest, ""));
        let micros = |v: u64| Duration::from_micros(v);
        match field {
            "error" => return Err(value.to_string()),
            "own" => {
                out.own = micros(number(field, value)?);
                seen_own = true;
            }
            "own_cycles" => out.own_cycles = number(field, value)?,
            "window" => out.window = micros(number(field, value)?),
            "window_cycles" => out.window_cycles = number(field, value)?,
            "unobserved" => out.unobserved = number(field, value)?,
            "slow" => out.slow = number(field, value)? as usize,
            "cycles" => {
                out.cycles = numbers(field, value)?.into_iter().map(micros).collect();
            }
            "cpu" => out.cpu = Some(micros(number(field, value)?)),
            "settled" => out.settled = Some(micros(number(field, value)?)),
            "statements" => {
                out.statements = Ok(numbers(field, value)?
                    .into_iter()
                    .map(|n| n as i64)
                    .collect());
            }
            "statements_error" => out.statements = Err(value.to_string()),
            "rss" => match numbers(field, value)?.as_slice() {
                [before, held] => out.rss = Some((*before, *held)),
                _ => return Err(bad(field, value)),
            },
            "conns" => match numbers(field, value)?.as_slice() {
                [s, o] => {
                    out.conns = Conns {
                        sessions: *s as i64,
                        other: *o as i64,
                    }
                }
                _ => return Err(bad(field, value)),
            },
            "health" => out.health.push(value.to_string()),
            _ => return Err(bad(field, value)),
        }
    }
    if seen_own {
        Ok(out)
    } else {
        Err(format!("{SETS_NODE} gave no outcome"))
    }
}

/// Cycles of at least this long count as held up by a connect.
const SLOW_CYCLE: Duration = Duration::from_secs(1);

/// `p50 X (worst tenant Y)` of the per-tenant verify intervals.
fn describe_intervals(out: &Outcome) -> String {
    match verify_intervals(out) {
        Some((p50, worst)) => format!(
            "p50 {} (worst tenant {})",
            fmt_duration(p50),
            fmt_duration(worst)
        ),
        None => match &out.statements {
            Err(why) => format!("not measured: {why}"),
            Ok(_) => "—".to_string(),
        },
    }
}

/// What one configuration was, for its rows.
struct Setup<'a> {
    /// `a`, `b`, …
    tag: &'a str,
    /// The configuration in words.
    what: &'a str,
    /// Its node id.
    node: &'a str,
    /// Live tenant databases.
    t: usize,
    /// Shards per tenant.
    s: usize,
    /// Lock sets of the node (every live one).
    sets: usize,
    /// The raw side's connect time, once.
    raw_connect: Duration,
    /// Whether the node ran in a child process of its own.
    own_process: bool,
    /// The coordinators' poll interval.
    poll: Duration,
}

fn config_rows(setup: &Setup<'_>, out: &Outcome, extra: &str) -> Vec<Row> {
    let &Setup {
        tag,
        what,
        node,
        t,
        s,
        sets,
        raw_connect,
        own_process: _,
        poll,
    } = setup;
    let shards_total = t * s;
    let cycles = samples(&out.cycles);
    let r = match (cycles.p50(), out.raw.p50()) {
        (Some(o), Some(r)) => ratio(o, r),
        _ => None,
    };
    let mut rows = vec![Row {
        measure: M11S.to_string(),
        driver: "postgres".into(),
        setup: format!(
            "{what}; `Assignment.last_cycle` of {} published cycles over {} ({} completed, {} \
             not seen: a watch keeps the latest), poll {}; {} cycles ≥ {} (a cycle woken by a \
             background answer within a poll of the last verify skips the verify and counts \
             too); raw: {} checks ({RAW_CHECK}) with its {} keys held, run alone before the \
             configuration{extra}",
            out.cycles.len(),
            fmt_duration(out.window),
            out.window_cycles,
            out.unobserved,
            fmt_duration(poll),
            out.slow,
            fmt_duration(SLOW_CYCLE),
            out.raw.len(),
            thousands(t * s)
        ),
        ours: p50_p95(&cycles),
        raw: p50_p95(&out.raw),
        ratio: r,
        target: Target::None,
        verdict: Verdict::NoTarget,
        note: None,
    }];
    let total_statements = out.statements.as_ref().ok().map(|c| c.iter().sum::<i64>());
    rows.push(Row {
        measure: M11V.to_string(),
        driver: "postgres".into(),
        setup: format!(
            "({tag}) per live tenant database: the {} steady window divided by the statements \
             the server ran in it (`pg_stat_statements`; only the verify runs there in the \
             steady state){}; poll {}: the best is the poll plus one verify",
            fmt_duration(out.window),
            total_statements.map_or(String::new(), |n| format!(", {n} in all")),
            fmt_duration(poll)
        ),
        ours: describe_intervals(out),
        raw: "—".into(),
        ratio: None,
        target: Target::None,
        verdict: Verdict::NoTarget,
        note: None,
    });
    let raw_own = raw_connect + out.raw_acquire;
    rows.push(Row {
        measure: M11O.to_string(),
        driver: "postgres".into(),
        setup: format!(
            "({tag}) wall time from `start()` until every one of the {} sets is owned and held \
             (after {} cycle(s); connects + acquire); raw: {t} connections opened in parallel \
             ({}, once) + {t} `unnest` batches of {s} keys in parallel ({})",
            thousands(sets),
            out.own_cycles,
            fmt_duration(raw_connect),
            fmt_duration(out.raw_acquire)
        ),
        ours: fmt_duration(out.own),
        raw: fmt_duration(raw_own),
        ratio: ratio(out.own, raw_own),
        target: Target::None,
        verdict: Verdict::NoTarget,
        note: None,
    });
    let target = Target::Exactly((t * PG_CONNECTIONS_PER_DATABASE) as f64);
    rows.push(Row {
        measure: M11C.to_string(),
        driver: "postgres".into(),
        setup: format!(
            "({tag}) `pg_stat_activity` rows under application_name `shardlock:{node}` \
             (sessions), anything else under the prefix apart; counted after the steady \
             window"
        ),
        ours: out.conns.describe(),
        raw: format!("{t} databases × {PG_CONNECTIONS_PER_DATABASE}"),
        ratio: None,
        target,
        verdict: target.judge_count(Some(out.conns.total() as f64)),
        note: None,
    });
    if let Some(cpu) = out.cpu {
        // A verify round: every live tenant verified once.
        let rounds = total_statements
            .filter(|n| *n > 0)
            .map(|n| n as f64 / t as f64);
        let per_cycle = cpu.div_f64(out.window_cycles.max(1) as f64);
        let (ours, unit) = match rounds {
            Some(r) => (
                fmt_duration(cpu.div_f64(r)),
                format!("{r:.1} verify rounds (every live tenant verified once)"),
            ),
            None => (
                fmt_duration(per_cycle),
                "published cycles (statements not counted)".to_string(),
            ),
        };
        rows.push(Row {
            measure: M11P.to_string(),
            driver: "postgres".into(),
            setup: format!(
                "({tag}) process CPU (per thread, /proc schedstat) over the {} steady window, \
                 {}, divided by its {unit}; per published cycle {}",
                fmt_duration(out.window),
                fmt_duration(cpu),
                fmt_duration(per_cycle)
            ),
            ours,
            raw: "—".into(),
            ratio: None,
            target: Target::None,
            verdict: Verdict::NoTarget,
            note: None,
        });
    }
    if let Some((before, held)) = out.rss {
        let grown = held.saturating_sub(before);
        // One shard per set: the sets are what the node holds.
        let (count, unit) = if sets == shards_total {
            (sets, "sets")
        } else {
            (shards_total, "shards")
        };
        let per_1000 = grown as f64 / (count.max(1) as f64 / 1000.0);
        let held_what = if sets == shards_total {
            format!("{} sets of 1 shard, one agent each", thousands(sets))
        } else {
            format!(
                "{} shards in {} sets, one agent per shard",
                thousands(shards_total),
                thousands(sets)
            )
        };
        rows.push(Row {
            measure: M11M.to_string(),
            driver: "postgres".into(),
            setup: format!(
                "({tag}) `VmRSS` {} before `start()` {:.1} MiB vs while holding {:.1} MiB \
                 ({held_what})",
                if setup.own_process {
                    "of a child process running only this node (`shardlock-bench \
                     m11-sets-node`; process-wide: its runtime and the bench's one admin \
                     connection count too, nothing freed before it starts)"
                } else {
                    "of the whole bench process (process-wide: memory freed by an earlier \
                     configuration or measure is reused, so the growth is a lower bound; only \
                     the first configuration of an `--only 11` run starts clean)"
                },
                mib(before),
                mib(held),
            ),
            ours: format!(
                "+{:.1} MiB for {} {unit}, {:.2} MiB per 1,000 {unit}",
                mib(grown),
                thousands(count),
                per_1000 / 1024.0
            ),
            raw: "—".into(),
            ratio: None,
            target: Target::None,
            verdict: Verdict::NoTarget,
            note: None,
        });
    }
    rows
}

/// (c) beside (a): how often the live tenants are verified, their cycles
/// and their time to own.
fn dead_rows(t: usize, s: usize, a: &Outcome, c: &Outcome) -> Vec<Row> {
    let target = Target::RatioAtMost(1.5);
    let (ia, ic) = (verify_intervals(a), verify_intervals(c));
    let r = match (ic, ia) {
        (Some((c, _)), Some((a, _))) => ratio(c, a),
        _ => None,
    };
    let worst = match (ic, ia) {
        (Some((_, c)), Some((_, a))) => ratio(c, a).map_or("—".into(), |r| format!("{r:.2}×")),
        _ => "—".into(),
    };
    let mut row = Row {
        measure: M11D.to_string(),
        driver: "postgres".into(),
        setup: format!(
            "how often each of the {t} live tenants ({s} shards each) is verified with a dead \
             tenant database present (c) vs none (a), same run (the shardlock column is (c), \
             the baseline column (a); worst tenants' ratio {worst}); published cycles (c) \
             {} ({} ≥ {}) vs (a) {} ({} ≥ {}); time to own every live set (c) {} vs (a) {}",
            p50_p95(&samples(&c.cycles)),
            c.slow,
            fmt_duration(SLOW_CYCLE),
            p50_p95(&samples(&a.cycles)),
            a.slow,
            fmt_duration(SLOW_CYCLE),
            fmt_duration(c.own),
            fmt_duration(a.own),
        ),
        ours: describe_intervals(c),
        raw: describe_intervals(a),
        ratio: r,
        target,
        verdict: target.judge_ratio(r),
        note: None,
    };
    if row.verdict == Verdict::Missed {
        row.note = Some(format!(
            "A dead tenant database slows the live tenants: their sessions are verified less \
             often than without it. Before connects ran in the background, every cycle waited \
             for the dead database's connect attempt (retried within a poll interval) until \
             the driver's connect_timeout ({}) ended it; see the published cycles in the \
             setup column.",
            fmt_duration(DEAD_CONNECT_TIMEOUT)
        ));
    }
    vec![row]
}

#[cfg(test)]
mod tests {
    use std::io::Read as _;

    use super::*;

    #[test]
    fn the_dead_server_accepts_and_never_answers() {
        let dead = DeadServer::start().unwrap();
        let mut conn = TcpStream::connect(dead.addr).unwrap();
        conn.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut buf = [0u8; 16];
        let e = conn.read(&mut buf).unwrap_err();
        assert!(
            matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
            "{e}"
        );
        assert_eq!(dead.accepted(), 1);
        drop(dead);
        // Stopped: the held connection is closed.
        assert_eq!(conn.read(&mut buf).unwrap(), 0);
    }

    #[test]
    fn only_the_dead_id_is_routed_to_the_dead_server() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let dead = DeadServer::start().unwrap();
        // The "live" server is a closed port: refused at once.
        let closed = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let options = |port: u16| {
            PgOptions::parse(&format!("postgres://u:p@127.0.0.1:{port}"))
                .unwrap()
                .connect_timeout(Duration::from_millis(300))
        };
        let driver = WithDeadTenant {
            live: PgDriver::new(options(closed)),
            dead: PgDriver::new(options(dead.addr.port())),
            dead_db: DatabaseId::new(DEAD_DB),
        };
        let node = NodeId::new("t");
        runtime.block_on(async {
            let live = driver.connect(&DatabaseId::new("live"), &node).await;
            assert!(live.is_err());
            assert_eq!(dead.accepted(), 0, "the live id went to the dead server");
            let e = driver
                .connect(&DatabaseId::new(DEAD_DB), &node)
                .await
                .err()
                .unwrap();
            assert!(err(e).contains(&dead.addr.port().to_string()));
            assert!(dead.accepted() >= 1);
        });
    }

    #[test]
    fn verify_intervals_divide_the_window_by_each_tenants_statements() {
        let mut out = Outcome::new(Duration::ZERO, 0, Duration::from_secs(10));
        assert_eq!(verify_intervals(&out), None);
        out.statements = Ok(vec![10, 5, 0]);
        // 1 s, 2 s, and a tenant never verified counts as the window.
        assert_eq!(
            verify_intervals(&out),
            Some((Duration::from_secs(2), Duration::from_secs(10)))
        );
        assert_eq!(describe_intervals(&out), "p50 2.00 s (worst tenant 10.0 s)");
    }

    #[test]
    fn the_childs_outcome_reads_back_whole() {
        let mut out = Outcome::new(Duration::from_millis(1500), 7, Duration::from_secs(10));
        out.window_cycles = 90;
        out.unobserved = 3;
        out.slow = 1;
        out.cycles = vec![Duration::from_micros(250), Duration::from_millis(12)];
        out.cpu = Some(Duration::from_micros(4321));
        out.settled = Some(Duration::from_millis(800));
        out.statements = Ok(vec![40, 0, 12]);
        out.rss = Some((10_240, 300_000));
        out.conns = Conns {
            sessions: 100,
            other: 1,
        };
        out.health = vec!["tenant t001:\nsession lost".into()];
        let text = format!("noise before\n{}", encode(&Ok(out)));
        let back = decode(&text).unwrap();
        assert_eq!(back.own, Duration::from_millis(1500));
        assert_eq!(back.own_cycles, 7);
        assert_eq!(back.window, Duration::from_secs(10));
        assert_eq!((back.window_cycles, back.unobserved, back.slow), (90, 3, 1));
        assert_eq!(
            back.cycles,
            [Duration::from_micros(250), Duration::from_millis(12)]
        );
        assert_eq!(back.cpu, Some(Duration::from_micros(4321)));
        assert_eq!(back.settled, Some(Duration::from_millis(800)));
        assert_eq!(back.statements, Ok(vec![40, 0, 12]));
        assert_eq!(back.rss, Some((10_240, 300_000)));
        assert_eq!(back.conns.describe(), "101 (100 sessions + 1 other)");
        assert_eq!(back.health, ["tenant t001: session lost"]);
    }

    #[test]
    fn the_childs_failures_and_silence_are_errors() {
        let why = decode(&encode(
            &Err("1 of 2 coordinators owned\ntheir sets".into()),
        ));
        assert_eq!(why.err().unwrap(), "1 of 2 coordinators owned their sets");
        assert!(decode("").err().unwrap().contains("no outcome"));
        assert!(decode("m11 own 12\nm11 rss 1\n")
            .err()
            .unwrap()
            .contains("rss"));
        assert!(decode("m11 own soon\n").is_err());
        let mut empty = Outcome::new(Duration::ZERO, 0, Duration::ZERO);
        empty.statements = Err("pg_stat_statements not usable".into());
        let back = decode(&encode(&Ok(empty))).unwrap();
        assert!(back.cycles.is_empty() && back.cpu.is_none() && back.rss.is_none());
        assert!(back.settled.is_none());
        assert_eq!(back.statements, Err("pg_stat_statements not usable".into()));
    }

    #[test]
    fn thousands_are_separated() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1_000), "1,000");
        assert_eq!(thousands(100_000), "100,000");
        assert_eq!(thousands(1_234_567), "1,234,567");
    }

    #[test]
    fn connections_are_described_per_kind() {
        let mut c = Conns {
            sessions: 2,
            other: 0,
        };
        assert_eq!(c.describe(), "2 (2 sessions)");
        c.other = 1;
        assert_eq!(c.total(), 3);
        assert_eq!(c.describe(), "3 (2 sessions + 1 other)");
    }
}
