//! A focused workload for profiling the coordinator (`perf record` on it
//! shows the cycle, not a benchmark's setup): one coordinator holding N
//! sets, cycled on demand through `CoordinatorHandle::wake`.
//!
//! ```text
//! cargo build --release -p shardlock-benches --example steady_profile
//! perf record -F 2000 -g --call-graph dwarf -- \
//!     target/release/examples/steady_profile [steady|acquire|batch] [memory|postgres] [N] [cycles]
//! ```
//!
//! `steady` wakes a coordinator that already holds every set (the verify
//! cycle of measure 5); `acquire` alternates the distribution between one
//! anchor set and all N + 1, so every other cycle acquires N new sets (the
//! acquisition cycle of measure 6); `batch` is measure 2's cycle on one
//! session (`try_acquire` of N keys, then `release_all`). `postgres` reads `SHARDLOCK_PG_URL` and
//! uses the URL's database. Prints the CPU time of the process per cycle
//! (from `/proc`, over the cycling only) and the p50 of the coordinator's
//! own cycle times. Like the bench, it runs on a current-thread runtime.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use shardlock_benches::CpuSnapshot;
use shardlock_core::{
    Agent, AgentContext, AgentError, Assignment, Coordinator, CoordinatorHandle, DatabaseId,
    Distributor, Driver, LockKey, LockSet, ShardId,
};
use shardlock_memory::MemoryServer;
use shardlock_postgres::{DatabaseMapping, PgDriver, PgOptions};
use tokio::sync::watch;

/// An agent that does nothing until told to stop.
struct Idle;

impl Agent for Idle {
    async fn run(&self, _shard: &ShardId, ctx: AgentContext) -> Result<(), AgentError> {
        ctx.cancel.cancelled().await;
        Ok(())
    }
}

/// A list the example swaps between cycles, handed out as one shared `Arc`.
#[derive(Clone, Default)]
struct Switchable(Arc<RwLock<Arc<[LockSet]>>>);

impl Switchable {
    fn set(&self, sets: Arc<[LockSet]>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = sets;
    }

    fn current(&self) -> Arc<[LockSet]> {
        Arc::clone(&self.0.read().unwrap_or_else(|p| p.into_inner()))
    }
}

impl Distributor for Switchable {
    async fn lock_sets(&self) -> shardlock_core::Result<Vec<LockSet>> {
        Ok(self.current().to_vec())
    }

    async fn shared_lock_sets(&self) -> shardlock_core::Result<Arc<[LockSet]>> {
        Ok(self.current())
    }
}

fn sets(db: &DatabaseId, prefix: &str, n: usize) -> anyhow::Result<Vec<LockSet>> {
    (0..n)
        .map(|i| {
            let shard = format!("{prefix}-{i}");
            let key = LockKey::for_shard(db.as_str(), "profile", &shard)?;
            Ok(LockSet::new(key, db.clone(), vec![ShardId::new(shard)]))
        })
        .collect()
}

/// Waits for the first publish after cycle `after` that satisfies `want`.
async fn until(
    rx: &mut watch::Receiver<Assignment>,
    after: u64,
    want: impl Fn(&Assignment) -> bool,
) -> anyhow::Result<(u64, Duration)> {
    loop {
        {
            let a = rx.borrow_and_update();
            if a.cycles > after && want(&a) {
                return Ok((a.cycles, a.last_cycle));
            }
        }
        rx.changed().await?;
    }
}

fn p50(samples: &mut [Duration]) -> Duration {
    samples.sort();
    samples.get(samples.len() / 2).copied().unwrap_or_default()
}

async fn run<D: Driver>(
    driver: D,
    db: DatabaseId,
    steady: bool,
    n: usize,
    cycles: usize,
) -> anyhow::Result<()> {
    let anchor: Arc<[LockSet]> = sets(&db, "anchor", 1)?.into();
    let mut everything = anchor.to_vec();
    everything.extend(sets(&db, "shard", n)?);
    let everything: Arc<[LockSet]> = everything.into();
    let distributor = Switchable::default();
    distributor.set(if steady {
        Arc::clone(&everything)
    } else {
        Arc::clone(&anchor)
    });
    let handle: CoordinatorHandle = Coordinator::builder(driver, distributor.clone(), Idle)
        .node_id("steady-profile")
        // Polls longer than the cycling between them: nearly every
        // measured cycle is one the example woke. Poll + loss timeout + stop
        // timeout stays inside Postgres' 25 s release window.
        .poll_interval(Duration::from_secs(5))
        .pause_interval(Duration::from_secs(5))
        .start_jitter(Duration::ZERO)
        .lock_loss_timeout(Duration::from_secs(10))
        .build()?
        .start()?;
    let mut rx = handle.assignment();
    let first = if steady { n + 1 } else { 1 };
    let (mut seen, _) = until(&mut rx, 0, |a| {
        a.owned.len() == first && a.owned.iter().all(|s| s.held)
    })
    .await?;
    let mut times = Vec::with_capacity(cycles);
    let mut measured_cpu = Duration::ZERO;
    let cpu_before = CpuSnapshot::now()?;
    for i in 0..cycles {
        let cycle_before = CpuSnapshot::now()?;
        let want = if steady || i % 2 == 0 {
            if !steady {
                distributor.set(Arc::clone(&everything));
            }
            n + 1
        } else {
            distributor.set(Arc::clone(&anchor));
            1
        };
        handle.wake();
        let (cycle, took) = until(&mut rx, seen, |a| a.owned.len() == want).await?;
        seen = cycle;
        if steady || i % 2 == 0 {
            times.push(took);
            measured_cpu += CpuSnapshot::now()?.since(&cycle_before);
        }
    }
    let cpu = CpuSnapshot::now()?.since(&cpu_before);
    println!(
        "{} {n} sets: {cycles} cycles, process CPU per cycle {:?}; the {} measured cycles \
         ({}): CPU {:?} each, p50 {:?}",
        if steady { "steady" } else { "acquire/release" },
        cpu / cycles.max(1) as u32,
        times.len(),
        if steady { "all" } else { "acquisitions" },
        measured_cpu / times.len().max(1) as u32,
        p50(&mut times),
    );
    handle.stop().await?;
    Ok(())
}

/// Measure 2's cycle on one session: `try_acquire` of `n` keys, then
/// `release_all`, `cycles` times.
async fn batch<D: Driver>(
    driver: D,
    db: DatabaseId,
    n: usize,
    cycles: usize,
) -> anyhow::Result<()> {
    use shardlock_core::{NodeId, Session};
    let mut session = driver.connect(&db, &NodeId::new("batch-profile")).await?;
    let keys: Vec<LockKey> = (0..n)
        .map(|i| LockKey::new(format!("batch-profile:{i}")))
        .collect::<Result<_, _>>()?;
    let mut times = Vec::with_capacity(cycles);
    let cpu_before = CpuSnapshot::now()?;
    for _ in 0..cycles {
        let started = std::time::Instant::now();
        let granted = session.try_acquire(&keys).await?;
        anyhow::ensure!(granted.iter().all(|g| *g), "a key was not granted");
        session.release_all().await?;
        times.push(started.elapsed());
    }
    let cpu = CpuSnapshot::now()?.since(&cpu_before);
    println!(
        "batch of {n} keys: {cycles} cycles (try_acquire + release_all), process CPU per cycle \
         {:?}, p50 {:?}",
        cpu / cycles.max(1) as u32,
        p50(&mut times),
    );
    session.close().await?;
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let mode = args.get(1).map_or("steady", String::as_str);
    let driver = args.get(2).map_or("memory", String::as_str);
    let n: usize = args.get(3).map_or(Ok(10_000), |s| s.parse())?;
    let cycles: usize = args.get(4).map_or(Ok(2_000), |s| s.parse())?;
    let steady = match mode {
        "steady" | "batch" => true,
        "acquire" => false,
        other => anyhow::bail!("mode {other:?}: steady, acquire or batch"),
    };
    let batched = mode == "batch";
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        match driver {
            "memory" => {
                let server = MemoryServer::with_release_window(Duration::from_secs(60));
                let db = DatabaseId::new("app");
                if batched {
                    return batch(server.driver(), db, n, cycles).await;
                }
                run(server.driver(), db, steady, n, cycles).await
            }
            "postgres" => {
                let url = std::env::var("SHARDLOCK_PG_URL")?;
                let options = PgOptions::parse(&url)?.database_mapping(DatabaseMapping::SameServer);
                let db = options
                    .get_connect_options()
                    .get_database()
                    .unwrap_or("postgres")
                    .to_string();
                let (driver, db) = (PgDriver::new(options), DatabaseId::new(db));
                if batched {
                    return batch(driver, db, n, cycles).await;
                }
                run(driver, db, steady, n, cycles).await
            }
            other => anyhow::bail!("driver {other:?}: memory or postgres"),
        }
    })
}
