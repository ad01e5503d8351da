//! eventcore's published contract on the MySQL/MariaDB driver and
//! checkpoint store, against the shared test server (`SHARDLOCK_MYSQL_URL`,
//! or the container of `SHARDLOCK_MYSQL_IMAGE`, default
//! `shardlock-test/mariadb:10.11`; see `shardlock_contract_tests::container`),
//! and the shared end-to-end scenarios (`common::sql`) with the server
//! killing the leader's connection.

#![cfg(feature = "mysql")]

#[macro_use]
mod common;

use std::time::{Duration, Instant};

use common::sql::{self, SqlServer};
use shardlock_contract_tests::container::{self, SharedContainer, Spec};
use shardlock_core::DatabaseId;
use shardlock_eventcore::{leadership_key, MySqlPositions, ShardlockCheckpoints};
use shardlock_mysql::sqlx::mysql::{MySqlConnection, MySqlPool};
use shardlock_mysql::sqlx::{self, Connection as _};
use shardlock_mysql::{MySqlCheckpoints, MySqlDriver, MySqlOptions, MySqlTransaction};
use testcontainers_modules::mariadb::Mariadb;

/// The driver crate's shared container: the same spec, so the same
/// container (`driver-mysql/tests/common`).
static SERVER: SharedContainer = SharedContainer::new(Spec {
    group: "mysql",
    name: "mysql",
    url_env: "SHARDLOCK_MYSQL_URL",
    image_env: "SHARDLOCK_MYSQL_IMAGE",
    default_image: "shardlock-test/mariadb:10.11",
    port: 3306,
    local_only: false,
    startup_timeout: Duration::from_secs(120),
});

/// A pool, once the server answers (a reused container may still start).
async fn pool(url: &str) -> MySqlPool {
    let started = Instant::now();
    loop {
        let attempt = async {
            let pool = MySqlPool::connect(url).await?;
            shardlock_mysql::sqlx::query("SELECT 1")
                .execute(&pool)
                .await?;
            Ok::<_, shardlock_mysql::sqlx::Error>(pool)
        };
        match attempt.await {
            Ok(pool) => return pool,
            Err(e) if started.elapsed() > Duration::from_secs(90) => {
                panic!("MySQL is not reachable: {e}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

async fn checkpoints(url: &str) -> ShardlockCheckpoints<MySqlCheckpoints, MySqlPositions> {
    let pool = pool(url).await;
    let store = MySqlCheckpoints::from_pool(pool.clone())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let positions = MySqlPositions::from_pool(store.pool().clone())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    ShardlockCheckpoints::new(store, positions)
}

/// The shared scenarios' view of the server: `KILL CONNECTION` ends a
/// session's connection.
#[derive(Clone)]
struct MySql {
    url: String,
    options: MySqlOptions,
    database: DatabaseId,
}

impl MySql {
    async fn side(&self) -> MySqlConnection {
        MySqlConnection::connect(&self.url)
            .await
            .unwrap_or_else(|e| panic!("side connection: {e}"))
    }
}

impl SqlServer for MySql {
    type Driver = MySqlDriver;
    type Store = MySqlCheckpoints;
    type Positions = MySqlPositions;
    type Tx<'s> = MySqlTransaction<'s>;

    const NAME: &'static str = "mysql";
    const ENDED: &'static str = "its connection was killed";

    async fn start() -> Option<Self> {
        let url = container::shared(&SERVER, Mariadb::default(), |host, port| {
            format!("mysql://root@{host}:{port}/test")
        })
        .await?;
        let options = MySqlOptions::parse(&url).unwrap_or_else(|e| panic!("not a usable URL: {e}"));
        let database = options
            .get_connect_options()
            .get_database()
            .unwrap_or("test")
            .to_string();
        Some(Self {
            url,
            options,
            database: DatabaseId::new(database),
        })
    }

    async fn ready(&self) {
        drop(pool(&self.url).await);
    }

    fn driver(&self) -> MySqlDriver {
        MySqlDriver::new(self.options.clone())
    }

    fn database(&self) -> DatabaseId {
        self.database.clone()
    }

    async fn checkpoints(&self) -> ShardlockCheckpoints<MySqlCheckpoints, MySqlPositions> {
        checkpoints(&self.url).await
    }

    async fn create_effects(&self, table: &str) {
        let mut conn = self.side().await;
        sqlx::query(&format!(
            "CREATE TABLE {table} (n BIGINT PRIMARY KEY, node VARCHAR(8) NOT NULL) ENGINE = InnoDB"
        ))
        .execute(&mut conn)
        .await
        .unwrap_or_else(|e| panic!("effects table: {e}"));
        let _ = conn.close().await;
    }

    async fn effects_by(&self, table: &str, node: &str) -> i64 {
        let mut conn = self.side().await;
        let n = sqlx::query_scalar(&format!("SELECT COUNT(*) FROM {table} WHERE node = ?"))
            .bind(node)
            .fetch_one(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("count: {e}"));
        let _ = conn.close().await;
        n
    }

    /// The connection id holding the named lock of the leadership key.
    async fn holder(&self, name: &str) -> Option<u64> {
        let key = leadership_key(name).unwrap_or_else(|e| panic!("{e}"));
        let mut conn = self.side().await;
        let id: Option<i64> = sqlx::query_scalar("SELECT CAST(IS_USED_LOCK(?) AS SIGNED)")
            .bind(shardlock_mysql::lock_name(&key))
            .fetch_one(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("IS_USED_LOCK: {e}"));
        let _ = conn.close().await;
        id.map(|id| u64::try_from(id).unwrap_or_else(|e| panic!("connection id {id}: {e}")))
    }

    /// `KILL CONNECTION` answers once the connection is ended, so `wait`
    /// changes nothing.
    async fn end_connection(&self, id: u64, _wait: bool) {
        let mut side = self.side().await;
        sqlx::query(&format!("KILL CONNECTION {id}"))
            .execute(&mut side)
            .await
            .unwrap_or_else(|e| panic!("KILL CONNECTION {id}: {e}"));
        tokio::spawn(async move {
            let _ = side.close().await;
        });
    }

    fn tx_connection(tx: &Self::Tx<'_>) -> u64 {
        tx.connection_id()
    }

    async fn write_effect(tx: &mut Self::Tx<'_>, table: &str, n: i64, node: &str) {
        sqlx::query(&format!("INSERT INTO {table} (n, node) VALUES (?, ?)"))
            .bind(n)
            .bind(node)
            .execute(&mut **tx)
            .await
            .unwrap_or_else(|e| panic!("effect: {e}"));
    }

    forward_fenced!(MySqlCheckpoints, MySqlPositions);
}

sql_contract!(MySql);

// ===== end to end: the server ends the leader's session =====

/// [`sql::failover`]: the server kills the leader's connection mid-stream
/// (`KILL CONNECTION`); the follower waits in `GET_LOCK`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn projection_failover_mysql_kill() {
    let Some(server) = MySql::start().await else {
        return;
    };
    sql::failover(&server).await;
}

/// [`sql::fenced_batch`]: the leader's connection is killed before its
/// batch commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fenced_batch_killed_leader_commits_nothing() {
    let Some(server) = MySql::start().await else {
        return;
    };
    sql::fenced_batch(&server).await;
}
