//! The MySQL/MariaDB test harness: which server, how to end a session from
//! the server side, and a real holder process to kill.
//!
//! # Which server
//!
//! 1. `SHARDLOCK_MYSQL_URL` set (`mysql://user:pw@host:3306/db`, MySQL 8 or
//!    MariaDB): that server, no Docker.
//! 2. Otherwise a container of `SHARDLOCK_MYSQL_IMAGE` (default
//!    `shardlock-test/mariadb:10.11`, built by `scripts/build-images.sh`;
//!    `mariadb:11` or any official tag works on a normal machine), through
//!    testcontainers' `Mariadb` module (root without a password, database
//!    `test`).
//! 3. No Docker: every test prints a `SKIPPED` line naming
//!    `SHARDLOCK_MYSQL_URL` (and fails instead when `SHARDLOCK_REQUIRE`
//!    contains `mysql`, as in CI).
//!
//! The container is shared by every test process (label
//! `shardlock.test=mysql`): see `shardlock_contract_tests::container`.

#![allow(dead_code, unreachable_pub)]

use std::path::PathBuf;
use std::time::Duration;

use shardlock_contract_tests::container::{self, SharedContainer, Spec};
use shardlock_contract_tests::{
    closed_port, holder, median_round_trip, until_ready, Harness, Holder, Timings, WaiterPoll,
};
use shardlock_core::{BoxError, DatabaseId, LockKey};
use shardlock_mysql::sqlx::mysql::MySqlConnection;
use shardlock_mysql::sqlx::{self, Connection, Executor};
use shardlock_mysql::{lock_name, MySqlDriver, MySqlOptions, MySqlSession};
use testcontainers_modules::mariadb::Mariadb;

/// Environment variable naming a server to use instead of a container.
pub const URL_ENV: &str = "SHARDLOCK_MYSQL_URL";
/// Environment variable naming the image (`name:tag`).
pub const IMAGE_ENV: &str = "SHARDLOCK_MYSQL_IMAGE";
/// The image the project builds locally.
pub const DEFAULT_IMAGE: &str = "shardlock-test/mariadb:10.11";

/// The shared container, when no URL is given.
static SERVER: SharedContainer = SharedContainer::new(Spec {
    group: "mysql",
    name: "mysql",
    url_env: URL_ENV,
    image_env: IMAGE_ENV,
    default_image: DEFAULT_IMAGE,
    port: 3306,
    local_only: false,
    startup_timeout: Duration::from_secs(120),
});

/// The crate's holder example.
pub fn holder_program() -> PathBuf {
    holder::example("shardlock-mysql-holder")
}

/// How the suite reaches MySQL.
#[derive(Debug, Clone)]
pub struct MySqlHarness {
    url: String,
    options: MySqlOptions,
    database: DatabaseId,
    timings: Timings,
}

/// The harness, or `None` (after a loud skip line) without a server.
pub async fn harness() -> Option<MySqlHarness> {
    let url = container::shared(&SERVER, Mariadb::default(), |host, port| {
        format!("mysql://root@{host}:{port}/test")
    })
    .await?;
    let options = match MySqlOptions::parse(&url) {
        Ok(options) => options,
        Err(e) => panic!("{URL_ENV} is not a usable URL: {e}"),
    };
    let database = options
        .get_connect_options()
        .get_database()
        .unwrap_or("test")
        .to_string();
    let round_trip = match wait_ready(&url, Duration::from_secs(90)).await {
        Ok(round_trip) => round_trip,
        Err(why) => panic!("MySQL at {url} is not reachable: {why}"),
    };
    Some(MySqlHarness {
        url,
        options,
        database: DatabaseId::new(database),
        timings: Timings::from_round_trip(round_trip),
    })
}

impl MySqlHarness {
    /// The server's URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The driver options.
    pub fn options(&self) -> &MySqlOptions {
        &self.options
    }

    /// A plain sqlx connection to the suite's database, for side checks.
    pub async fn raw(&self) -> MySqlConnection {
        match MySqlConnection::connect(&self.url).await {
            Ok(conn) => conn,
            Err(e) => panic!("side connection failed: {e}"),
        }
    }
}

/// `KILL <id>` from a side connection to `url`.
pub async fn kill(url: &str, id: u64) {
    let mut conn = match MySqlConnection::connect(url).await {
        Ok(conn) => conn,
        Err(e) => panic!("side connection failed: {e}"),
    };
    if let Err(e) = conn.execute(format!("KILL {id}").as_str()).await {
        panic!("KILL {id} failed: {e}");
    }
    let _ = conn.close().await;
}

/// How many connections wait in `GET_LOCK` for `key` (processlist state
/// `User lock`, statement naming the key's hex literal).
pub async fn waiters(conn: &mut MySqlConnection, key: &LockKey) -> Result<i64, sqlx::Error> {
    let hex: String = lock_name(key)
        .as_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    sqlx::query_scalar(
        "SELECT COUNT(*) FROM information_schema.PROCESSLIST \
         WHERE STATE = 'User lock' AND INFO LIKE CONCAT('%', ?, '%')",
    )
    .bind(hex)
    .fetch_one(conn)
    .await
}

impl Harness for MySqlHarness {
    type Driver = MySqlDriver;

    fn driver(&self) -> MySqlDriver {
        MySqlDriver::new(self.options.clone())
    }

    fn database(&self) -> DatabaseId {
        self.database.clone()
    }

    fn terminate(&self, session: &MySqlSession) -> impl std::future::Future<Output = ()> + Send {
        let id = session.connection_id();
        let url = self.url.clone();
        async move { kill(&url, id).await }
    }

    fn spawn_holder(
        &self,
        keys: Vec<LockKey>,
    ) -> impl std::future::Future<Output = Result<Holder, BoxError>> + Send {
        holder::spawn(
            holder_program(),
            self.url.clone(),
            self.database.clone(),
            keys,
        )
    }

    fn round_trips(&self, session: &MySqlSession) -> Option<u64> {
        Some(session.round_trips())
    }

    fn wait_until_waiting(&self, key: &LockKey) -> impl std::future::Future<Output = bool> + Send {
        let (url, limit, key) = (self.url.clone(), self.settle(), key.clone());
        async move {
            let mut conn = match MySqlConnection::connect(&url).await {
                Ok(conn) => conn,
                Err(e) => panic!("side connection failed: {e}"),
            };
            let poll = WaiterPoll::new(
                limit,
                &key,
                format!("the processlist (lock {})", lock_name(&key)),
            );
            while !poll.seen(waiters(&mut conn, &key).await).await {}
            let _ = conn.close().await;
            true
        }
    }

    fn unreachable_driver(&self) -> Option<MySqlDriver> {
        let port = closed_port()?;
        let options = self
            .options
            .clone()
            .host("127.0.0.1")
            .port(port)
            .connect_timeout(Duration::from_secs(5));
        Some(MySqlDriver::new(options))
    }

    fn timings(&self) -> Timings {
        self.timings
    }
}

/// Waits until a real query succeeds (a reused container may still be
/// starting), then answers the median of five `SELECT 1` round trips.
async fn wait_ready(url: &str, limit: Duration) -> Result<Duration, String> {
    until_ready(limit, async || {
        let mut conn = MySqlConnection::connect(url).await?;
        let round_trip =
            median_round_trip(async || conn.execute("SELECT 1").await.map(drop)).await?;
        let _ = conn.close().await;
        Ok::<Duration, sqlx::Error>(round_trip)
    })
    .await
}
