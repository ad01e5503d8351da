//! Measure 9: the peers a Rust user would pick instead, in the same run.
//!
//! - One key: sqlx's own [`PgAdvisoryLock`] (`try_acquire` + `release_now`
//!   on a `PgConnection`) beside shardlock's session and the raw
//!   statements, rounds of the three interleaved.
//! - N sets, "Marten-style": one pooled connection per set, each sending
//!   its own `pg_try_advisory_lock` (all N at once) and keeping its
//!   connection for as long as it holds the lock; beside shardlock's one
//!   session per database taking the N keys in one batched statement.
//! - The resident memory a Postgres node adds while holding 10,000 sets.

use std::time::{Duration, Instant};

use shardlock_benches::{fmt_duration, ratio, Row, Samples, Target, Verdict};
use shardlock_core::{
    Agent, AgentContext, AgentError, Coordinator, DatabaseId, Driver, LockKey, NodeId, Session,
    ShardId,
};
use shardlock_distributors::SingleTenant;
use shardlock_postgres::sqlx::pool::PoolConnection;
use shardlock_postgres::sqlx::postgres::{
    PgAdvisoryLock, PgAdvisoryLockKey, PgConnection, PgPoolOptions, Postgres,
};
use shardlock_postgres::sqlx::{self, Connection, Either};
use tokio::task::JoinSet;

use crate::micro::p50_p99;
use crate::{err, progress, Ctx, BENCH_DB};

const M9A: &str = "9 peers: single-key cycle, sqlx `PgAdvisoryLock` beside shardlock";
const M9B: &str = "9 peers: single-key cycle, sqlx `PgAdvisoryLock` against raw";
const M9N: &str = "9 peers: N sets, Marten-style (a connection per set) beside shardlock";
const M9M: &str = "9 resident memory of a node holding N sets";

/// Measure 9 (Postgres only).
pub(crate) async fn run(ctx: &mut Ctx) {
    progress("measure 9: peers (sqlx PgAdvisoryLock, Marten-style connection per set)");
    // First, while the process is still small.
    let n = ctx.config.pick(1_000, 10_000);
    let row = memory(ctx, n)
        .await
        .unwrap_or_else(|why| Row::not_measured(M9M, "postgres", Target::None, why));
    ctx.report.push(row);
    match single(ctx).await {
        Ok(rows) => rows.into_iter().for_each(|r| ctx.report.push(r)),
        Err(why) => ctx.report.push(Row::not_measured(
            M9A,
            "postgres",
            Target::RatioAtMost(1.05),
            why,
        )),
    }
    for n in ctx.config.pick(vec![100, 1_000], vec![100, 1_000, 10_000]) {
        progress(format!("  postgres: {n} sets, Marten-style"));
        let row = marten(ctx, n)
            .await
            .unwrap_or_else(|why| Row::not_measured(M9N, "postgres", Target::None, why));
        ctx.report.push(row);
    }
}

/// One cycle of each side, in an order that rotates every round.
async fn single(ctx: &mut Ctx) -> Result<Vec<Row>, String> {
    let (rounds, per_round) = ctx.config.pick((6, 30), (40, 150));
    let env = ctx.pg()?;
    let driver = env.driver();
    let options = env.options_for(BENCH_DB);
    let db = DatabaseId::new(BENCH_DB);
    let mut session = driver
        .connect(&db, &NodeId::new("bench-m9"))
        .await
        .map_err(err)?;
    let key = LockKey::new("bench:m9:shardlock").map_err(err)?;
    let keys = std::slice::from_ref(&key);
    let mut peer_conn = PgConnection::connect_with(&options).await.map_err(err)?;
    let peer = PgAdvisoryLock::with_key(PgAdvisoryLockKey::BigInt(
        LockKey::new("bench:m9:sqlx").map_err(err)?.id(),
    ));
    let mut raw_conn = PgConnection::connect_with(&options).await.map_err(err)?;
    let raw_key = LockKey::new("bench:m9:raw").map_err(err)?.id();
    let (mut ours, mut theirs, mut raw) =
        (Samples::default(), Samples::default(), Samples::default());
    for round in 0..rounds + 1 {
        for side in 0..3 {
            for _ in 0..per_round {
                let started = Instant::now();
                match (round + side) % 3 {
                    0 => {
                        if session.try_acquire(keys).await.map_err(err)? != [true] {
                            return Err("the key was not granted".into());
                        }
                        session.release(&key).await.map_err(err)?;
                    }
                    1 => match peer.try_acquire(&mut peer_conn).await.map_err(err)? {
                        Either::Left(guard) => drop(guard.release_now().await.map_err(err)?),
                        Either::Right(_) => return Err("sqlx's lock was not granted".into()),
                    },
                    _ => {
                        let got: bool = sqlx::query_scalar("select pg_try_advisory_lock($1)")
                            .bind(raw_key)
                            .fetch_one(&mut raw_conn)
                            .await
                            .map_err(err)?;
                        if !got {
                            return Err("the raw key was not granted".into());
                        }
                        let _: bool = sqlx::query_scalar("select pg_advisory_unlock($1)")
                            .bind(raw_key)
                            .fetch_one(&mut raw_conn)
                            .await
                            .map_err(err)?;
                    }
                }
                // Round 0 warms connections, statement caches and the server.
                if round > 0 {
                    let took = started.elapsed();
                    match (round + side) % 3 {
                        0 => ours.push(took),
                        1 => theirs.push(took),
                        _ => raw.push(took),
                    }
                }
            }
        }
    }
    let _ = session.close().await;
    let _ = peer_conn.close().await;
    let _ = raw_conn.close().await;
    let setup = |n: usize| {
        format!(
            "{n} cycles each, {rounds} rounds of the three sides in rotating order; sqlx: \
             `PgAdvisoryLock::try_acquire` + `release_now` on one `PgConnection` (two statements); \
             shardlock: `Session::try_acquire` + `release` (two statements); raw: \
             `select pg_try_advisory_lock($1)` + `select pg_advisory_unlock($1)`"
        )
    };
    let row = |measure: &str, a: &Samples, b: &Samples, target: Target| {
        let r = match (a.p50(), b.p50()) {
            (Some(x), Some(y)) => ratio(x, y),
            _ => None,
        };
        Row {
            measure: measure.to_string(),
            driver: "postgres".to_string(),
            setup: setup(a.len()),
            ours: p50_p99(a),
            raw: p50_p99(b),
            ratio: r,
            target,
            verdict: target.judge_ratio(r),
            note: None,
        }
    };
    Ok(vec![
        row(M9A, &ours, &theirs, Target::RatioAtMost(1.05)),
        row(M9B, &theirs, &raw, Target::None),
    ])
}

/// Marten-style: N connections from a pool, each taking its own key at
/// once; against one shardlock session taking the N keys in one batch.
/// Both then release; wall time of the taking, 5 rounds each, interleaved.
async fn marten(ctx: &mut Ctx, n: usize) -> Result<Row, String> {
    const ROUNDS: usize = 5;
    let env = ctx.pg()?;
    let max = env.max_connections().await?;
    let in_use: i64 = sqlx::query_scalar("select count(*) from pg_stat_activity")
        .fetch_one(env.admin())
        .await
        .map_err(err)?;
    let reserved: i64 =
        sqlx::query_scalar("select current_setting('superuser_reserved_connections')::int8")
            .fetch_one(env.admin())
            .await
            .map_err(err)?;
    let room = max - in_use - reserved - 5;
    // Connections of a shardlock node per database: its session (read while
    // idle for the loss signal and release hints).
    const OURS: usize = 1;
    if (n as i64) > room {
        return Ok(Row {
            measure: M9N.to_string(),
            driver: "postgres".to_string(),
            setup: format!(
                "N = {n}: Marten-style needs {n} connections held at once (one per set); this \
                 server allows max_connections = {max} ({in_use} in use); shardlock needs \
                 {OURS} for any N in one database"
            ),
            ours: format!("{OURS} connection"),
            raw: format!("not possible: {n} connections > max_connections {max}"),
            ratio: None,
            target: Target::None,
            verdict: Verdict::NoTarget,
            note: None,
        });
    }
    let options = env.options_for(BENCH_DB);
    let driver = env.driver();
    let db = DatabaseId::new(BENCH_DB);
    let mut session = driver
        .connect(&db, &NodeId::new("bench-m9-batch"))
        .await
        .map_err(err)?;
    let keys: Vec<LockKey> = (0..n)
        .map(|i| LockKey::new(format!("bench:m9:{n}:ours:{i}")))
        .collect::<Result<_, _>>()
        .map_err(err)?;
    let peer_keys: Vec<i64> = (0..n)
        .map(|i| LockKey::new(format!("bench:m9:{n}:marten:{i}")).map(|k| k.id()))
        .collect::<Result<_, _>>()
        .map_err(err)?;
    let pool = PgPoolOptions::new()
        .max_connections(u32::try_from(n).map_err(err)?)
        .min_connections(u32::try_from(n).map_err(err)?)
        .acquire_timeout(Duration::from_secs(60))
        .connect_with(options)
        .await
        .map_err(err)?;
    // Warm: every connection open before the first timed round.
    let mut warm = Vec::with_capacity(n);
    for _ in 0..n {
        warm.push(pool.acquire().await.map_err(err)?);
    }
    drop(warm);
    let (mut ours, mut theirs) = (Samples::default(), Samples::default());
    for round in 0..ROUNDS * 2 {
        if round % 2 == 0 {
            let started = Instant::now();
            let granted = session.try_acquire(&keys).await.map_err(err)?;
            ours.push(started.elapsed());
            if !granted.iter().all(|g| *g) {
                return Err("a shardlock key was not granted".into());
            }
            session.release_all().await.map_err(err)?;
        } else {
            let started = Instant::now();
            let held = take_each(&pool, &peer_keys).await?;
            theirs.push(started.elapsed());
            release_each(held).await?;
        }
    }
    let _ = session.close().await;
    pool.close().await;
    let r = match (ours.p50(), theirs.p50()) {
        (Some(o), Some(t)) => ratio(o, t),
        _ => None,
    };
    Ok(Row {
        measure: M9N.to_string(),
        driver: "postgres".to_string(),
        setup: format!(
            "N = {n}, {ROUNDS} rounds each, interleaved; wall time until all N are held. \
             Marten-style: a warm sqlx `PgPool` of {n} connections, one task per set taking a \
             pooled connection and sending `select pg_try_advisory_lock($1)`, all at once, each \
             keeping its connection while it holds the lock: {n} connections. shardlock: one \
             session, one batched `try_acquire` of the {n} keys: {OURS} connection (the \
             session); p50 of the Marten-style side: {}",
            theirs.p50().map(fmt_duration).unwrap_or_default()
        ),
        ours: format!("{} ({OURS} connection)", p50_p99(&ours)),
        raw: format!("{} ({n} connections)", p50_p99(&theirs)),
        ratio: r,
        target: Target::None,
        verdict: Verdict::NoTarget,
        note: None,
    })
}

/// Each key on its own pooled connection, all at once; the connections
/// come back holding their locks.
async fn take_each(
    pool: &sqlx::PgPool,
    keys: &[i64],
) -> Result<Vec<PoolConnection<Postgres>>, String> {
    let mut tasks = JoinSet::new();
    for key in keys.iter().copied() {
        let pool = pool.clone();
        tasks.spawn(async move {
            let mut conn = pool.acquire().await?;
            let got: bool = sqlx::query_scalar("select pg_try_advisory_lock($1)")
                .bind(key)
                .fetch_one(&mut *conn)
                .await?;
            Ok::<_, sqlx::Error>((conn, got))
        });
    }
    let mut held = Vec::with_capacity(keys.len());
    while let Some(joined) = tasks.join_next().await {
        let (conn, got) = joined.map_err(err)?.map_err(err)?;
        if !got {
            return Err("a Marten-style key was not granted".into());
        }
        held.push(conn);
    }
    Ok(held)
}

/// Releases what [`take_each`] took (its connections go back to the pool).
async fn release_each(held: Vec<PoolConnection<Postgres>>) -> Result<(), String> {
    let mut tasks = JoinSet::new();
    for mut conn in held {
        tasks.spawn(async move {
            sqlx::query("select pg_advisory_unlock_all()")
                .execute(&mut *conn)
                .await
                .map(drop)
        });
    }
    while let Some(joined) = tasks.join_next().await {
        joined.map_err(err)?.map_err(err)?;
    }
    Ok(())
}

/// An agent that does nothing until told to stop.
struct Idle;

impl Agent for Idle {
    async fn run(&self, _shard: &ShardId, ctx: AgentContext) -> Result<(), AgentError> {
        ctx.cancel.cancelled().await;
        Ok(())
    }
}

/// `VmRSS` of this process, in KiB.
fn resident_kib() -> Result<u64, String> {
    let status = std::fs::read_to_string("/proc/self/status").map_err(err)?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| "no VmRSS in /proc/self/status".to_string())
}

/// The resident memory a coordinator adds while it holds `n` sets of one
/// Postgres database (`SingleTenant`, an idle agent per set).
async fn memory(ctx: &mut Ctx, n: usize) -> Result<Row, String> {
    progress(format!("  postgres: resident memory with {n} sets"));
    let env = ctx.pg()?;
    let driver = env.driver();
    let db = DatabaseId::new(BENCH_DB);
    let shards: Vec<ShardId> = (0..n).map(|i| ShardId::new(format!("rss-{i}"))).collect();
    let before = resident_kib()?;
    let handle = Coordinator::builder(driver, SingleTenant::new(db, "bench-m9", shards), Idle)
        .node_id("bench-m9-rss")
        .poll_interval(Duration::from_millis(250))
        .pause_interval(Duration::from_millis(250))
        .start_jitter(Duration::ZERO)
        .lock_loss_timeout(Duration::from_secs(10))
        .build()
        .map_err(err)?
        .start()
        .map_err(err)?;
    let mut rx = handle.assignment();
    let result = async {
        let held = async {
            loop {
                let (owned, cycles) = {
                    let a = rx.borrow_and_update();
                    (a.owned.iter().filter(|s| s.held).count(), a.cycles)
                };
                if owned == n {
                    return Ok(cycles);
                }
                if rx.changed().await.is_err() {
                    return Err("the coordinator stopped".to_string());
                }
            }
        };
        let at = tokio::time::timeout(Duration::from_secs(120), held)
            .await
            .map_err(|_| format!("{n} sets not held within 120 s"))??;
        // Two steady cycles more, so the agents have started and settled.
        while rx.borrow().cycles < at + 2 {
            rx.changed().await.map_err(err)?;
        }
        resident_kib()
    }
    .await;
    let stopped = handle.stop().await;
    let after = result?;
    stopped.map_err(err)?;
    let added = after.saturating_sub(before);
    let per_thousand = added as f64 * 1000.0 / n as f64;
    Ok(Row {
        measure: M9M.to_string(),
        driver: "postgres".to_string(),
        setup: format!(
            "N = {n} sets in one database (`SingleTenant`, an idle agent per set), held and two \
             cycles steady; `VmRSS` of the bench process before the coordinator started \
             ({before} KiB) and then ({after} KiB): the node's own sessions, sets, agents' \
             tasks and sqlx buffers (memory freed by earlier measures may be reused, so run \
             `--only 9` alone for a clean figure); no raw baseline"
        ),
        ours: format!(
            "{:.1} MiB ({per_thousand:.0} KiB per 1,000 sets)",
            added as f64 / 1024.0
        ),
        raw: "—".to_string(),
        ratio: None,
        target: Target::None,
        verdict: Verdict::NoTarget,
        note: None,
    })
}
