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
//!    `SKIPPED: sqlserver: no image <image> here (…), set SHARDLOCK_MSSQL_URL to run`
//!    (and fails instead when `SHARDLOCK_REQUIRE` contains `sqlserver`).
//!
//! The container is shared by every test process, found by name and the
//! label `shardlock.test=sqlserver`: see `shardlock_contract_tests::container`
//! (remove it with
//! `docker rm -f $(docker ps -aq --filter label=shardlock.test=sqlserver)`).

#![allow(dead_code, unreachable_pub)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use shardlock_contract_tests::container::{self, SharedContainer, Spec};
use shardlock_contract_tests::{closed_port, holder, median_round_trip, Harness, Holder, Timings};
use shardlock_core::{BoxError, DatabaseId, LockKey};
use shardlock_sqlserver::{DatabaseMapping, MssqlDriver, MssqlOptions, MssqlSession, TdsClient};
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

/// The shared container, when no URL is given.
static SERVER: SharedContainer = SharedContainer::new(Spec {
    group: "sqlserver",
    name: "mssql",
    url_env: URL_ENV,
    image_env: IMAGE_ENV,
    default_image: DEFAULT_IMAGE,
    port: 1433,
    // Microsoft's image is large and licensed: used when present, never
    // pulled.
    local_only: true,
    startup_timeout: Duration::from_secs(180),
});

/// The crate's holder example (`shardlock_contract_tests::holder`).
pub fn holder_program() -> PathBuf {
    holder::example("shardlock-mssql-holder")
}

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
    let image = MssqlServer::default().with_accept_eula();
    let url = container::shared(&SERVER, image, |host, port| {
        format!(
            "Server=tcp:{host},{port};User Id=sa;Password={};TrustServerCertificate=true",
            MssqlServer::DEFAULT_SA_PASSWORD
        )
    })
    .await?;
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
        holder::spawn(
            holder_program(),
            self.url.clone(),
            self.database.clone(),
            keys,
        )
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

    fn timings(&self) -> Timings {
        self.timings
    }
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
    let round_trip = median_round_trip(async || match client.simple_query("SELECT 1").await {
        Ok(stream) => stream.into_results().await.map(drop),
        Err(e) => Err(e),
    })
    .await
    .map_err(|e| format!("SELECT 1 failed: {e}"))?;
    let _ = client.close().await;
    Ok(round_trip)
}
