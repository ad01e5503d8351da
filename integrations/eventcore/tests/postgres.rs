//! eventcore's published contract on the PostgreSQL driver and checkpoint
//! store, against the shared test server (`SHARDLOCK_PG_URL`, or the
//! container of `SHARDLOCK_PG_IMAGE`, default `shardlock-test/postgres:15`;
//! see `shardlock_contract_tests::container`).

#![cfg(feature = "postgres")]

#[macro_use]
mod common;

use std::time::{Duration, Instant};

use eventcore_memory::InMemoryEventStore;
use shardlock_contract_tests::container::{self, SharedContainer, Spec};
use shardlock_core::DatabaseId;
use shardlock_eventcore::{
    PgPositions, ShardlockBackend, ShardlockCheckpoints, ShardlockCoordinator,
};
use shardlock_postgres::sqlx::postgres::PgPool;
use shardlock_postgres::{PgCheckpoints, PgDriver, PgOptions};
use testcontainers_modules::postgres::Postgres;

/// The driver crate's shared container: the same spec, so the same
/// container (`driver-postgres/tests/common`).
static SERVER: SharedContainer = SharedContainer::new(Spec {
    group: "postgres",
    name: "pg",
    url_env: "SHARDLOCK_PG_URL",
    image_env: "SHARDLOCK_PG_IMAGE",
    default_image: "shardlock-test/postgres:15",
    port: 5432,
    local_only: false,
    startup_timeout: Duration::from_secs(120),
});

/// The server's URL, options and database, or `None` after the loud skip
/// line.
async fn server() -> Option<(String, PgOptions, DatabaseId)> {
    let url = container::shared(&SERVER, Postgres::default(), |host, port| {
        format!("postgres://postgres:postgres@{host}:{port}/postgres")
    })
    .await?;
    let options = PgOptions::parse(&url).unwrap_or_else(|e| panic!("not a usable URL: {e}"));
    let database = {
        let connect = options.get_connect_options();
        connect
            .get_database()
            .unwrap_or_else(|| connect.get_username())
            .to_string()
    };
    Some((url, options, DatabaseId::new(database)))
}

/// A pool, once the server answers (a reused container may still start).
async fn pool(url: &str) -> PgPool {
    let started = Instant::now();
    loop {
        match PgPool::connect(url).await {
            Ok(pool) => return pool,
            Err(e) if started.elapsed() > Duration::from_secs(90) => {
                panic!("PostgreSQL is not reachable: {e}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

async fn checkpoints(url: &str) -> ShardlockCheckpoints<PgCheckpoints, PgPositions> {
    let pool = pool(url).await;
    let store = PgCheckpoints::from_pool(pool.clone())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let positions = PgPositions::from_pool(pool)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    ShardlockCheckpoints::new(store, positions)
}

checkpoint_contract!(
    checkpoints,
    async {
        let (url, _, _) = server().await?;
        let checkpoints = checkpoints(&url).await;
        Some(move || checkpoints.clone())
    }
    .await
);

coordination_contract!(
    coordinator,
    async {
        let (url, options, database) = server().await?;
        drop(pool(&url).await);
        Some(move || ShardlockCoordinator::new(PgDriver::new(options.clone()), database.clone()))
    }
    .await
);

coordination_contract!(
    backend,
    async {
        let (url, options, database) = server().await?;
        let checkpoints = checkpoints(&url).await;
        Some(move || {
            ShardlockBackend::new(
                InMemoryEventStore::new(),
                ShardlockCoordinator::new(PgDriver::new(options.clone()), database.clone()),
                checkpoints.clone(),
            )
        })
    }
    .await
);
