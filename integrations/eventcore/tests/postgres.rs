//! eventcore's published contract on the PostgreSQL driver and checkpoint
//! store, against the shared test server (`SHARDLOCK_PG_URL`, or the
//! container of `SHARDLOCK_PG_IMAGE`, default `shardlock-test/postgres:15`;
//! see `shardlock_contract_tests::container`), and the shared end-to-end
//! scenarios (`common::sql`) with the server terminating the leader's
//! backend.

#![cfg(feature = "postgres")]

#[macro_use]
mod common;

use std::time::{Duration, Instant};

use common::sql::{self, SqlServer};
use shardlock_contract_tests::container::{self, SharedContainer, Spec};
use shardlock_core::DatabaseId;
use shardlock_eventcore::{leadership_key, PgPositions, ShardlockCheckpoints};
use shardlock_postgres::sqlx::postgres::{PgConnection, PgPool};
use shardlock_postgres::sqlx::{self, Connection as _};
use shardlock_postgres::{PgCheckpoints, PgDriver, PgOptions, PgTransaction};
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

/// The shared scenarios' view of the server: `pg_terminate_backend` ends a
/// session's backend.
#[derive(Clone)]
struct Pg {
    url: String,
    options: PgOptions,
    database: DatabaseId,
}

impl Pg {
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

    async fn start() -> Option<Self> {
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
        Some(Self {
            url,
            options,
            database: DatabaseId::new(database),
        })
    }

    async fn ready(&self) {
        drop(pool(&self.url).await);
    }

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

sql_contract!(Pg);

// ===== end to end: the server ends the leader's session =====

/// [`sql::failover`]: the server terminates the leader's backend
/// mid-stream (`pg_terminate_backend`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn projection_failover_postgres_terminate() {
    let Some(server) = Pg::start().await else {
        return;
    };
    sql::failover(&server).await;
}

/// [`sql::fenced_batch`]: the leader's backend is terminated before its
/// batch commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fenced_batch_terminated_leader_commits_nothing() {
    let Some(server) = Pg::start().await else {
        return;
    };
    sql::fenced_batch(&server).await;
}
