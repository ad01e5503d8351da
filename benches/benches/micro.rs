//! Criterion micro-benchmarks: shardlock beside the raw operations it
//! wraps, one criterion group per comparison (`shardlock` and `raw`).
//!
//! ```text
//! cargo bench -p shardlock-benches --bench micro            # memory + SQLite
//! SHARDLOCK_PG_URL=postgres://… cargo bench -p shardlock-benches --bench micro
//! ```
//!
//! Criterion runs the two benchmarks of a group one after the other; the
//! interleaved, noise-cancelling comparison is the `shardlock-bench`
//! harness (see `scripts/bench.sh`). Postgres groups need
//! `SHARDLOCK_PG_URL` and are skipped (with a line on stderr) without it.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use shardlock_benches::{PgEnv, RawMemoryLocks, RawPg, RawSqlite};
use shardlock_core::{DatabaseId, Driver, LockKey, NodeId, Session};
use shardlock_memory::MemoryServer;
use shardlock_sqlite::SqliteDriver;

const DB: &str = "shardlock_bench";

fn runtime() -> tokio::runtime::Runtime {
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => panic!("cannot start a Tokio runtime: {e}"),
    }
}

fn key(name: &str) -> LockKey {
    match LockKey::new(name) {
        Ok(key) => key,
        Err(e) => panic!("bad key name {name:?}: {e}"),
    }
}

fn check<T, E: std::fmt::Display>(r: Result<T, E>, what: &str) -> T {
    match r {
        Ok(v) => v,
        Err(e) => panic!("{what}: {e}"),
    }
}

fn memory(c: &mut Criterion) {
    let rt = runtime();
    let server = MemoryServer::new();
    let mut session = check(
        rt.block_on(
            server
                .driver()
                .connect(&DatabaseId::new(DB), &NodeId::new("bench")),
        ),
        "connect",
    );
    let k = key("bench:criterion:memory");
    let keys = std::slice::from_ref(&k);
    let raw = RawMemoryLocks::default();
    let mut group = c.benchmark_group("try_acquire_release/memory");
    group.bench_function("shardlock", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let started = Instant::now();
                for _ in 0..iters {
                    black_box(check(session.try_acquire(keys).await, "try_acquire"));
                    black_box(check(session.release(&k).await, "release"));
                }
                started.elapsed()
            })
        })
    });
    group.bench_function("raw", |b| {
        b.iter(|| {
            black_box(raw.try_lock(black_box(k.id()), 1));
            black_box(raw.unlock(black_box(k.id()), 1));
        })
    });
    group.finish();
}

fn sqlite(c: &mut Criterion) {
    let rt = runtime();
    let dir = std::env::temp_dir().join(format!("shardlock-criterion-{}", std::process::id()));
    let driver = check(SqliteDriver::open(&dir), "open lock directory");
    let mut session = check(
        rt.block_on(driver.connect(&DatabaseId::new(DB), &NodeId::new("bench"))),
        "connect",
    );
    let k = key("bench:criterion:sqlite");
    let keys = std::slice::from_ref(&k);
    let raw_dir = dir.join("raw");
    check(std::fs::create_dir_all(&raw_dir), "raw dir");
    let raw_path = raw_dir.join("key.lock");
    let mut group = c.benchmark_group("try_acquire_release/sqlite");
    group.bench_function("shardlock", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let started = Instant::now();
                for _ in 0..iters {
                    black_box(check(session.try_acquire(keys).await, "try_acquire"));
                    black_box(check(session.release(&k).await, "release"));
                }
                started.elapsed()
            })
        })
    });
    group.bench_function("raw", |b| {
        b.iter(|| black_box(check(RawSqlite::try_lock(&raw_path), "raw lock")))
    });
    group.finish();
    drop(session);
    let _ = std::fs::remove_dir_all(&dir);
}

fn postgres(c: &mut Criterion) {
    let rt = runtime();
    let mut env = match rt.block_on(PgEnv::from_env(Duration::from_secs(30))) {
        Ok(Some(env)) => env,
        Ok(None) => {
            eprintln!(
                "SKIPPED postgres benchmarks: set {}",
                shardlock_benches::URL_ENV
            );
            return;
        }
        Err(why) => {
            eprintln!("SKIPPED postgres benchmarks: {why}");
            return;
        }
    };
    check(rt.block_on(env.ensure_database(DB)), "create database");
    let db = DatabaseId::new(DB);
    let mut session = check(
        rt.block_on(env.driver().connect(&db, &NodeId::new("bench-criterion"))),
        "connect",
    );
    let mut raw = check(
        rt.block_on(RawPg::connect(&env.options_for(DB))),
        "raw connect",
    );
    let k = key("bench:criterion:postgres");
    let keys = std::slice::from_ref(&k);
    let raw_key = key("bench:criterion:postgres:raw").id();

    let mut group = c.benchmark_group("try_acquire_release/postgres");
    group.bench_function("shardlock", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let started = Instant::now();
                for _ in 0..iters {
                    black_box(check(session.try_acquire(keys).await, "try_acquire"));
                    black_box(check(session.release(&k).await, "release"));
                }
                started.elapsed()
            })
        })
    });
    group.bench_function("raw", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let started = Instant::now();
                for _ in 0..iters {
                    black_box(check(raw.try_lock(raw_key).await, "raw lock"));
                    black_box(check(raw.unlock(raw_key).await, "raw unlock"));
                }
                started.elapsed()
            })
        })
    });
    group.finish();

    for size in [1_000usize, 10_000] {
        let keys: Vec<LockKey> = (0..size)
            .map(|i| key(&format!("bench:criterion:batch:{i}")))
            .collect();
        let raw_keys: Vec<i64> = (0..size)
            .map(|i| key(&format!("bench:criterion:batch:raw:{i}")).id())
            .collect();
        let mut group = c.benchmark_group(format!("batch_{size}/postgres"));
        group.sample_size(20);
        group.bench_function("shardlock", |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let started = Instant::now();
                    for _ in 0..iters {
                        black_box(check(session.try_acquire(&keys).await, "try_acquire"));
                        check(session.release_all().await, "release_all");
                    }
                    started.elapsed()
                })
            })
        });
        group.bench_function("raw", |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let started = Instant::now();
                    for _ in 0..iters {
                        black_box(check(raw.try_lock_many(&raw_keys).await, "raw batch"));
                        check(raw.unlock_all().await, "raw unlock all");
                    }
                    started.elapsed()
                })
            })
        });
        group.finish();
    }
    let _ = rt.block_on(session.close());
    let _ = rt.block_on(raw.close());
}

criterion_group!(benches, memory, sqlite, postgres);
criterion_main!(benches);
