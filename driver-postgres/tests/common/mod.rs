//! The PostgreSQL test harness: which server, how to end a session from the
//! server side, and a real holder process to kill.
//!
//! # Which server
//!
//! 1. `SHARDLOCK_PG_URL` set: that server, no Docker.
//! 2. Otherwise a container of `SHARDLOCK_PG_IMAGE` (default
//!    `shardlock-test/postgres:15`, built by `scripts/build-images.sh`;
//!    `postgres:16` or any official tag works on a normal machine), through
//!    testcontainers' `Postgres` module.
//! 3. No Docker: every test prints a `SKIPPED` line naming
//!    `SHARDLOCK_PG_URL` (and fails instead when `SHARDLOCK_REQUIRE`
//!    contains `postgres`, as in CI).
//!
//! The container is shared by every test process, found by name and the
//! label `shardlock.test=postgres`: see `shardlock_contract_tests::container`
//! (remove it with
//! `docker rm -f $(docker ps -aq --filter label=shardlock.test=postgres)`,
//! needed after rebuilding the image so the new image is used). Tests never
//! wipe shared state: every test uses fresh key names.

#![allow(dead_code, unreachable_pub)]

use std::path::PathBuf;
use std::time::Duration;

use shardlock_contract_tests::container::testcontainers::runners::SyncRunner;
use shardlock_contract_tests::container::testcontainers::ImageExt;
use shardlock_contract_tests::container::{self, split_image, SharedContainer, Spec};
use shardlock_contract_tests::{
    closed_port, holder, median_round_trip, until_ready, Harness, Holder, Timings, WaiterPoll,
};
use shardlock_core::{BoxError, DatabaseId, LockKey};
use shardlock_postgres::sqlx::postgres::PgConnection;
use shardlock_postgres::sqlx::{self, Connection};
use shardlock_postgres::{PgDriver, PgOptions, PgSession};
use testcontainers_modules::postgres::Postgres;

/// Environment variable naming a server to use instead of a container.
pub const URL_ENV: &str = "SHARDLOCK_PG_URL";
/// Environment variable naming the image (`name:tag`).
pub const IMAGE_ENV: &str = "SHARDLOCK_PG_IMAGE";
/// The image the project builds locally.
pub const DEFAULT_IMAGE: &str = "shardlock-test/postgres:15";

/// The shared container, when no URL is given.
static SERVER: SharedContainer = SharedContainer::new(Spec {
    group: "postgres",
    name: "pg",
    url_env: URL_ENV,
    image_env: IMAGE_ENV,
    default_image: DEFAULT_IMAGE,
    port: 5432,
    local_only: false,
    startup_timeout: Duration::from_secs(120),
});

/// The crate's holder example (`shardlock_contract_tests::holder`).
pub fn holder_program() -> PathBuf {
    holder::example("shardlock-pg-holder")
}

/// How the suite reaches PostgreSQL.
#[derive(Debug, Clone)]
pub struct PgHarness {
    url: String,
    options: PgOptions,
    database: DatabaseId,
    timings: Timings,
}

/// The harness, or `None` (after a loud skip line) without a server.
pub async fn harness() -> Option<PgHarness> {
    let url = container::shared(&SERVER, Postgres::default(), |host, port| {
        format!("postgres://postgres:postgres@{host}:{port}/postgres")
    })
    .await?;
    let options = match PgOptions::parse(&url) {
        Ok(options) => options,
        Err(e) => panic!("{URL_ENV} is not a usable URL: {e}"),
    };
    let database = options
        .get_connect_options()
        .get_database()
        .unwrap_or_else(|| options.get_connect_options().get_username())
        .to_string();
    let round_trip = match wait_ready(&url, Duration::from_secs(90)).await {
        Ok(round_trip) => round_trip,
        Err(why) => panic!(
            "PostgreSQL at {} is not reachable: {why}",
            options_target(&options)
        ),
    };
    Some(PgHarness {
        url,
        options,
        database: DatabaseId::new(database),
        timings: Timings::from_round_trip(round_trip),
    })
}

fn options_target(options: &PgOptions) -> String {
    let o = options.get_connect_options();
    format!("{}:{}", o.get_host(), o.get_port())
}

impl PgHarness {
    /// The server's URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The driver options.
    pub fn options(&self) -> &PgOptions {
        &self.options
    }

    /// A plain sqlx connection to the suite's database, for side checks.
    pub async fn raw(&self) -> PgConnection {
        match PgConnection::connect(&self.url).await {
            Ok(conn) => conn,
            Err(e) => panic!("side connection failed: {e}"),
        }
    }
}

impl Harness for PgHarness {
    type Driver = PgDriver;

    fn driver(&self) -> PgDriver {
        PgDriver::new(self.options.clone())
    }

    fn database(&self) -> DatabaseId {
        self.database.clone()
    }

    fn terminate(&self, session: &PgSession) -> impl std::future::Future<Output = ()> + Send {
        let pid = session.backend_pid();
        let url = self.url.clone();
        async move {
            let mut conn = match PgConnection::connect(&url).await {
                Ok(conn) => conn,
                Err(e) => panic!("side connection failed: {e}"),
            };
            let ended: bool = match sqlx::query_scalar("SELECT pg_terminate_backend($1)")
                .bind(pid)
                .fetch_one(&mut conn)
                .await
            {
                Ok(ended) => ended,
                Err(e) => panic!("pg_terminate_backend({pid}) failed: {e}"),
            };
            assert!(ended, "backend {pid} was not running");
            let _ = conn.close().await;
        }
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

    fn round_trips(&self, session: &PgSession) -> Option<u64> {
        Some(session.round_trips())
    }

    fn wait_until_waiting(&self, key: &LockKey) -> impl std::future::Future<Output = bool> + Send {
        let (url, limit, key) = (self.url.clone(), self.settle(), key.clone());
        async move {
            let mut conn = match PgConnection::connect(&url).await {
                Ok(conn) => conn,
                Err(e) => panic!("side connection failed: {e}"),
            };
            let poll = WaiterPoll::new(limit, &key, format!("pg_locks (id {})", key.id()));
            while !poll.seen(waiters(&mut conn, &key).await).await {}
            let _ = conn.close().await;
            true
        }
    }

    fn unreachable_driver(&self) -> Option<PgDriver> {
        let port = closed_port()?;
        let options = self
            .options
            .clone()
            .host("127.0.0.1")
            .port(port)
            .connect_timeout(Duration::from_secs(5));
        Some(PgDriver::new(options))
    }

    fn timings(&self) -> Timings {
        self.timings
    }
}

/// How many backends wait, not granted, for the advisory lock of `key`.
///
/// `pg_advisory_lock(bigint)` shows its key in `pg_locks` as `classid` (the
/// high 32 bits) and `objid` (the low 32 bits), both `oid`, with
/// `objsubid = 1` (see the driver's `sql` module; checked against a real
/// server by `waiters_match_pg_locks` in `tests/postgres.rs`).
pub async fn waiters(conn: &mut PgConnection, key: &LockKey) -> Result<i64, sqlx::Error> {
    Ok(waiting_pids(conn, key).await?.len() as i64)
}

/// The backend pids waiting, not granted, for the advisory lock of `key`
/// (see [`waiters`]).
pub async fn waiting_pids(conn: &mut PgConnection, key: &LockKey) -> Result<Vec<i32>, sqlx::Error> {
    let (classid, objid) = split_key(key.id());
    sqlx::query_scalar(
        "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND NOT granted \
         AND objsubid = 1 AND classid::bigint = $1 AND objid::bigint = $2",
    )
    .bind(classid)
    .bind(objid)
    .fetch_all(conn)
    .await
}

/// `(classid, objid)` of a `bigint` advisory key, as `pg_locks` shows them
/// (widened to `bigint`, since both are unsigned 32-bit `oid`s).
pub fn split_key(id: i64) -> (i64, i64) {
    let bits = id as u64;
    ((bits >> 32) as i64, (bits & 0xffff_ffff) as i64)
}

/// Waits until a real query succeeds (a reused container may still be
/// starting, or restarting after initdb), then answers the median of five
/// `SELECT 1` round trips, from which the suite's patience is derived.
async fn wait_ready(url: &str, limit: Duration) -> Result<Duration, String> {
    until_ready(limit, async || {
        let mut conn = PgConnection::connect(url).await?;
        let round_trip = median_round_trip(async || {
            sqlx::query_scalar::<_, i32>("SELECT 1")
                .fetch_one(&mut conn)
                .await
                .map(drop)
        })
        .await?;
        let _ = conn.close().await;
        Ok::<Duration, sqlx::Error>(round_trip)
    })
    .await
}

/// A container of its own for one test, with extra server arguments; removed
/// when the returned guard is dropped (on a thread of its own, so no runtime
/// is involved, even when the test panics).
pub struct OwnContainer {
    /// The server's URL.
    pub url: String,
    done: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for OwnContainer {
    fn drop(&mut self) {
        drop(self.done.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl OwnContainer {
    /// Starts `postgres <args>` from the test image; `Err` when Docker or
    /// the image is not available.
    pub async fn start(args: &[&str]) -> Result<Self, String> {
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let (url_tx, url_rx) = std::sync::mpsc::channel::<Result<String, String>>();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            let image = SERVER.spec().image();
            let (name, tag) = split_image(&image);
            let mut cmd = vec!["-c".to_string(), "fsync=off".to_string()];
            cmd.extend(args);
            let started = Postgres::default()
                .with_name(name)
                .with_tag(tag)
                .with_cmd(cmd)
                .with_label("shardlock.test", "postgres-own")
                .with_startup_timeout(Duration::from_secs(120))
                .start();
            let container = match started {
                Ok(container) => container,
                Err(e) => {
                    let _ = url_tx.send(Err(format!("cannot start a container from {image}: {e}")));
                    return;
                }
            };
            let url = container
                .get_host()
                .and_then(|host| Ok((host, container.get_host_port_ipv4(5432)?)))
                .map(|(host, port)| format!("postgres://postgres:postgres@{host}:{port}/postgres"))
                .map_err(|e| e.to_string());
            let _ = url_tx.send(url);
            // Until the guard is dropped (or the test thread is gone).
            let _ = done_rx.recv();
            drop(container);
        });
        let url = tokio::task::spawn_blocking(move || url_rx.recv())
            .await
            .map_err(|e| e.to_string())?
            .map_err(|_| "the container thread ended".to_string())??;
        let _ = wait_ready(&url, Duration::from_secs(90)).await?;
        Ok(Self {
            url,
            done: Some(done_tx),
            thread: Some(thread),
        })
    }
}
