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

// ===== positions: the table orders like eventcore =====

/// [`common::advance_only_forward`] on the `uuid` column.
#[tokio::test]
async fn positions_advance_only_forward() {
    let Some((url, _, _)) = server().await else {
        return;
    };
    let positions = PgPositions::from_pool(pool(&url).await)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    common::advance_only_forward(&positions).await;
}

// ===== end to end: the server ends the leader's session =====

use common::sql::{self, SqlServer};
use shardlock_eventcore::leadership_key;
use shardlock_postgres::sqlx::{self, postgres::PgConnection, Connection as _};
use shardlock_postgres::PgTransaction;

/// The shared scenarios' view of the server: `pg_terminate_backend` ends a
/// session's backend.
struct Pg {
    url: String,
    options: PgOptions,
    database: DatabaseId,
}

impl Pg {
    async fn new() -> Option<Self> {
        let (url, options, database) = server().await?;
        Some(Self {
            url,
            options,
            database,
        })
    }

    async fn side(&self) -> PgConnection {
        PgConnection::connect(&self.url)
            .await
            .unwrap_or_else(|e| panic!("side connection: {e}"))
    }
}

fn pid(id: u64) -> i32 {
    i32::try_from(id).unwrap_or_else(|e| panic!("backend pid {id}: {e}"))
}

impl SqlServer for Pg {
    type Driver = PgDriver;
    type Store = PgCheckpoints;
    type Positions = PgPositions;
    type Tx<'s> = PgTransaction<'s>;

    const NAME: &'static str = "postgres";
    const ENDED: &'static str = "its backend was terminated";

    fn driver(&self) -> PgDriver {
        PgDriver::new(self.options.clone())
    }

    fn database(&self) -> DatabaseId {
        self.database.clone()
    }

    async fn checkpoints(&self) -> ShardlockCheckpoints<PgCheckpoints, PgPositions> {
        checkpoints(&self.url).await
    }

    async fn create_effects(&self, table: &str) {
        let mut conn = self.side().await;
        sqlx::query(&format!(
            "CREATE TABLE {table} (n BIGINT PRIMARY KEY, node VARCHAR(8) NOT NULL)"
        ))
        .execute(&mut conn)
        .await
        .unwrap_or_else(|e| panic!("effects table: {e}"));
        let _ = conn.close().await;
    }

    async fn effects_by(&self, table: &str, node: &str) -> i64 {
        let mut conn = self.side().await;
        let n = sqlx::query_scalar(&format!("SELECT count(*) FROM {table} WHERE node = $1"))
            .bind(node)
            .fetch_one(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("count: {e}"));
        let _ = conn.close().await;
        n
    }

    /// The backend pid holding the advisory lock of the leadership key.
    async fn holder(&self, name: &str) -> Option<u64> {
        let key = leadership_key(name).unwrap_or_else(|e| panic!("{e}"));
        let bits = key.id() as u64;
        let (classid, objid) = ((bits >> 32) as i64, (bits & 0xffff_ffff) as i64);
        let mut conn = self.side().await;
        let pid: Option<i32> = sqlx::query_scalar(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted \
             AND objsubid = 1 AND classid::bigint = $1 AND objid::bigint = $2",
        )
        .bind(classid)
        .bind(objid)
        .fetch_optional(&mut conn)
        .await
        .unwrap_or_else(|e| panic!("pg_locks: {e}"));
        let _ = conn.close().await;
        pid.map(|pid| u64::try_from(pid).unwrap_or_else(|e| panic!("backend pid {pid}: {e}")))
    }

    async fn end_connection(&self, id: u64, wait: bool) {
        let mut side = self.side().await;
        let ended: bool = if wait {
            sqlx::query_scalar("SELECT pg_terminate_backend($1, 5000)")
        } else {
            sqlx::query_scalar("SELECT pg_terminate_backend($1)")
        }
        .bind(pid(id))
        .fetch_one(&mut side)
        .await
        .unwrap_or_else(|e| panic!("pg_terminate_backend: {e}"));
        assert!(ended, "backend {id} was not running");
        tokio::spawn(async move {
            let _ = side.close().await;
        });
    }

    fn tx_connection(tx: &PgTransaction<'_>) -> u64 {
        u64::try_from(tx.backend_pid()).unwrap_or_else(|e| panic!("backend pid: {e}"))
    }

    async fn write_effect(tx: &mut Self::Tx<'_>, table: &str, n: i64, node: &str) {
        sqlx::query(&format!("INSERT INTO {table} (n, node) VALUES ($1, $2)"))
            .bind(n)
            .bind(node)
            .execute(&mut **tx)
            .await
            .unwrap_or_else(|e| panic!("effect: {e}"));
    }

    forward_fenced!(PgCheckpoints, PgPositions);
}

/// [`sql::failover`]: the server terminates the leader's backend
/// mid-stream (`pg_terminate_backend`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn projection_failover_postgres_terminate() {
    let Some(server) = Pg::new().await else {
        return;
    };
    sql::failover(&server).await;
}

/// [`sql::fenced_batch`]: the leader's backend is terminated before its
/// batch commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fenced_batch_terminated_leader_commits_nothing() {
    let Some(server) = Pg::new().await else {
        return;
    };
    sql::fenced_batch(&server).await;
}
