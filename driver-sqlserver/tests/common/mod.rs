//! The SQL Server test harness: which server, how to end a session from the
//! server side, and a real holder process to kill.
//!
//! # Which server
//!
//! 1. `SHARDLOCK_MSSQL_URL` set: that server (an ADO.NET string, a JDBC
//!    string or a `sqlserver://` URL), no Docker. The tests use the database
//!    `SHARDLOCK_MSSQL_DATABASE` (default `shardlock_contract`), creating it
//!    when missing; the login needs `CREATE DATABASE` for that (or an existing
//!    database) and `ALTER ANY CONNECTION` for `KILL`.
//! 2. Otherwise, when `docker image inspect` finds the image
//!    `SHARDLOCK_MSSQL_IMAGE` (default
//!    `mcr.microsoft.com/mssql/server:2022-latest`) locally, a container of it
//!    through testcontainers' `MssqlServer` module (EULA accepted, the
//!    module's `sa` password).
//! 3. Otherwise every test prints
//!    `SKIPPED: sqlserver: no SQL Server, set SHARDLOCK_MSSQL_URL to run`
//!    (and fails instead when `SHARDLOCK_REQUIRE` contains `sqlserver`).
//!
//! # One container for all tests
//!
//! nextest runs every test in its own process, and every `#[tokio::test]`
//! has its own runtime, so a container handle kept in a `static` would
//! neither be shared across tests nor be dropped (removed) at the end; SQL
//! Server also takes 10–30 s to start. The harness therefore shares the
//! container through Docker itself: it has a fixed name derived from the
//! image (`shardlock-test-mssql-<image>`), the label
//! `shardlock.test=sqlserver`, and testcontainers' `ReuseDirective::Always`,
//! so the first test process creates it and every later process (of this run
//! and of later runs) finds it by name and reuses it; two processes racing to
//! create it get a name conflict, and the loser's retry finds the winner's
//! container. Reused containers are never removed by testcontainers, so no
//! handle needs to stay alive and nothing is tied to a runtime: the harness
//! keeps only the connection string, in a `OnceLock` (one Docker round per
//! `cargo test` process). The container outlives the test run; remove it
//! with `docker rm -f $(docker ps -aq --filter label=shardlock.test=sqlserver)`.
//! Tests never wipe shared state: every test uses fresh key names.

#![allow(dead_code, unreachable_pub)]

use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use shardlock_contract_tests::{skip, Harness, Holder, Timings};
use shardlock_core::{BoxError, DatabaseId, LockKey};
use shardlock_sqlserver::{DatabaseMapping, MssqlDriver, MssqlOptions, MssqlSession, TdsClient};
use testcontainers::runners::SyncRunner;
use testcontainers::{ImageExt, ReuseDirective};
use testcontainers_modules::mssql_server::MssqlServer;

/// Environment variable naming a server to use instead of a container.
pub const URL_ENV: &str = "SHARDLOCK_MSSQL_URL";
/// Environment variable naming the image (`name:tag`).
pub const IMAGE_ENV: &str = "SHARDLOCK_MSSQL_IMAGE";
/// Environment variable naming the test database.
pub const DATABASE_ENV: &str = "SHARDLOCK_MSSQL_DATABASE";
/// Microsoft's image.
pub const DEFAULT_IMAGE: &str = "mcr.microsoft.com/mssql/server:2022-latest";
/// The database the tests use unless `SHARDLOCK_MSSQL_DATABASE` says
/// otherwise.
pub const DEFAULT_DATABASE: &str = "shardlock_contract";

/// How the suite reaches SQL Server.
#[derive(Debug, Clone)]
pub struct MssqlHarness {
    url: String,
    options: MssqlOptions,
    database: DatabaseId,
    timings: Timings,
}

/// The harness, or `None` (after a loud skip line) without a server.
pub async fn harness() -> Option<MssqlHarness> {
    let url = match std::env::var(URL_ENV) {
        Ok(url) if !url.trim().is_empty() => url,
        _ => match container_url().await {
            Ok(Some(url)) => url,
            Ok(None) => {
                skip("sqlserver", "no SQL Server", URL_ENV);
                return None;
            }
            Err(why) => {
                skip("sqlserver", &why, URL_ENV);
                return None;
            }
        },
    };
    let options = match MssqlOptions::parse(&url) {
        Ok(options) => options.database_mapping(DatabaseMapping::SameServer),
        Err(e) => panic!("{URL_ENV} is not a usable connection string: {e}"),
    };
    let database = std::env::var(DATABASE_ENV)
        .ok()
        .filter(|d| !d.trim().is_empty())
        .unwrap_or_else(|| DEFAULT_DATABASE.to_string());
    let round_trip = match prepare(&options, &database, Duration::from_secs(120)).await {
        Ok(round_trip) => round_trip,
        Err(why) => panic!("SQL Server at {} is not usable: {why}", options.addr()),
    };
    Some(MssqlHarness {
        url,
        options,
        database: DatabaseId::new(database),
        timings: Timings::from_round_trip(round_trip),
    })
}

impl MssqlHarness {
    /// The connection string.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The driver options.
    pub fn options(&self) -> &MssqlOptions {
        &self.options
    }

    /// A plain tiberius connection to `database`, for side checks.
    pub async fn raw(&self, database: &str) -> TdsClient {
        let driver = MssqlDriver::new(self.options.clone());
        match driver
            .connect_client(&DatabaseId::new(database), "shardlock-contract-side")
            .await
        {
            Ok(client) => client,
            Err(e) => panic!("side connection failed: {e}"),
        }
    }
}

impl Harness for MssqlHarness {
    type Driver = MssqlDriver;

    fn driver(&self) -> MssqlDriver {
        MssqlDriver::new(self.options.clone())
    }

    fn database(&self) -> DatabaseId {
        self.database.clone()
    }

    fn terminate(&self, session: &MssqlSession) -> impl std::future::Future<Output = ()> + Send {
        let spid = session.spid();
        let harness = self.clone();
        async move {
            let mut client = harness.raw("master").await;
            // KILL takes no variables; the spid is an integer the server gave us.
            let killed = match client.simple_query(format!("KILL {spid}")).await {
                Ok(stream) => stream.into_results().await.map(|_| ()),
                Err(e) => Err(e),
            };
            if let Err(e) = killed {
                panic!("KILL {spid} failed: {e}");
            }
            let _ = client.close().await;
        }
    }

    fn spawn_holder(
        &self,
        keys: Vec<LockKey>,
    ) -> impl std::future::Future<Output = Result<Holder, BoxError>> + Send {
        let url = self.url.clone();
        let database = self.database.clone();
        async move {
            tokio::task::spawn_blocking(move || spawn_holder_process(&url, &database, &keys))
                .await?
        }
    }

    fn round_trips(&self, session: &MssqlSession) -> Option<u64> {
        Some(session.round_trips())
    }

    fn unreachable_driver(&self) -> Option<MssqlDriver> {
        let port = closed_port()?;
        let options = MssqlOptions::parse(&format!(
            "Server=tcp:127.0.0.1,{port};User Id=sa;Password=unused;TrustServerCertificate=true"
        ))
        .ok()?
        .database_mapping(DatabaseMapping::SameServer)
        .connect_timeout(Duration::from_secs(5));
        Some(MssqlDriver::new(options))
    }

    fn settle(&self) -> Duration {
        self.timings.settle
    }

    fn slack(&self) -> Duration {
        self.timings.slack
    }
}

/// A loopback port nobody listens on (bound, then closed), or `None` when
/// no port can be bound.
pub fn closed_port() -> Option<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").ok()?;
    listener.local_addr().ok().map(|a| a.port())
}

/// Starts `shardlock-mssql-holder` (this crate's binary) and waits for its
/// `GRANTED` line; fails unless it got every key.
fn spawn_holder_process(
    url: &str,
    database: &DatabaseId,
    keys: &[LockKey],
) -> Result<Holder, BoxError> {
    let mut command = Command::new(env!("CARGO_BIN_EXE_shardlock-mssql-holder"));
    command
        .arg(database.as_str())
        .args(keys.iter().map(LockKey::name))
        .env("SHARDLOCK_MSSQL_HOLDER_URL", url)
        .stdin(Stdio::null());
    shardlock_contract_tests::spawn_holder_process(command, "GRANTED ", |line| {
        let bits = line.split_whitespace().nth(1).unwrap_or_default();
        bits.len() == keys.len() && !bits.contains('0')
    })
}

/// Waits until the server accepts logins (a reused container may still be
/// starting), makes sure `database` exists, and answers the median of five
/// `SELECT 1` round trips, from which the suite's patience is derived.
async fn prepare(
    options: &MssqlOptions,
    database: &str,
    limit: Duration,
) -> Result<Duration, String> {
    let driver = MssqlDriver::new(
        options
            .clone()
            .database_mapping(DatabaseMapping::SameServer),
    );
    let started = Instant::now();
    let master = DatabaseId::new("master");
    let mut client = loop {
        let attempt = driver.connect_client(&master, "shardlock-contract-setup");
        match tokio::time::timeout(Duration::from_secs(10), attempt).await {
            Ok(Ok(client)) => break client,
            Ok(Err(e)) if started.elapsed() > limit => return Err(e.to_string()),
            Err(_) if started.elapsed() > limit => return Err("timed out".into()),
            _ => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    };
    // The name is bound, quoted server-side: no user data in the SQL text.
    const CREATE: &str = "DECLARE @db sysname = @P1;
IF DB_ID(@db) IS NULL
BEGIN
    DECLARE @sql nvarchar(max) = N'CREATE DATABASE ' + QUOTENAME(@db);
    EXEC (@sql);
END;";
    let created = client.execute(CREATE, &[&database]).await;
    if let Err(e) = created {
        // 1801: another test process created it first.
        if e.code() != Some(1801) {
            return Err(format!("cannot create database {database:?}: {e}"));
        }
    }
    let mut times = Vec::with_capacity(5);
    for _ in 0..5 {
        let sent = Instant::now();
        let answered = match client.simple_query("SELECT 1").await {
            Ok(stream) => stream.into_results().await.map(|_| ()),
            Err(e) => Err(e),
        };
        if let Err(e) = answered {
            return Err(format!("SELECT 1 failed: {e}"));
        }
        times.push(sent.elapsed());
    }
    times.sort_unstable();
    let _ = client.close().await;
    Ok(times[2])
}

static CONTAINER_URL: OnceLock<Result<Option<String>, String>> = OnceLock::new();

/// The connection string of the shared container, starting it on first use;
/// `Ok(None)` when the image is not present locally.
async fn container_url() -> Result<Option<String>, String> {
    tokio::task::spawn_blocking(|| CONTAINER_URL.get_or_init(start_container).clone())
        .await
        .map_err(|e| format!("container start panicked: {e}"))?
}

/// `name:tag` split at the tag's colon (a registry port is not a tag).
pub fn split_image(image: &str) -> (&str, &str) {
    match image.rsplit_once(':') {
        Some((name, tag)) if !tag.contains('/') => (name, tag),
        _ => (image, "latest"),
    }
}

/// True when `docker image inspect` finds `image` locally.
fn image_present(image: &str) -> bool {
    Command::new("docker")
        .args(["image", "inspect", image])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn start_container() -> Result<Option<String>, String> {
    let image = std::env::var(IMAGE_ENV)
        .ok()
        .filter(|i| !i.trim().is_empty())
        .unwrap_or_else(|| DEFAULT_IMAGE.to_string());
    if !image_present(&image) {
        return Ok(None);
    }
    let (name, tag) = split_image(&image);
    let container_name: String = format!("shardlock-test-mssql-{image}")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    let mut last = String::new();
    for attempt in 0..5 {
        let request = MssqlServer::default()
            .with_accept_eula()
            .with_name(name)
            .with_tag(tag)
            .with_container_name(&container_name)
            .with_label("shardlock.test", "sqlserver")
            .with_reuse(ReuseDirective::Always)
            .with_startup_timeout(Duration::from_secs(180));
        match request.start() {
            Ok(container) => {
                let host = container.get_host().map_err(|e| e.to_string())?;
                let port = container
                    .get_host_port_ipv4(1433)
                    .map_err(|e| e.to_string())?;
                // Reused containers are not removed on drop.
                drop(container);
                return Ok(Some(format!(
                    "Server=tcp:{host},{port};User Id=sa;Password={};TrustServerCertificate=true",
                    MssqlServer::DEFAULT_SA_PASSWORD
                )));
            }
            Err(e) => {
                // Most likely another test process is creating the same
                // container: the next attempt finds and reuses it.
                last = format!("cannot start container {container_name} from {image}: {e}");
                std::thread::sleep(Duration::from_millis(500 * (attempt + 1)));
            }
        }
    }
    Err(last)
}
