//! eventcore's published contract on the SQL Server driver and checkpoint
//! store: the coordination half, the checkpoint half (`MssqlCheckpoints`
//! for the fencing epochs, with a position table kept in SQL Server by this
//! test, see [`MssqlPositions`]), and the backend. Needs
//! `SHARDLOCK_MSSQL_URL`, or the image `SHARDLOCK_MSSQL_IMAGE` present
//! locally; otherwise every test prints a loud `SKIPPED` line.

#[macro_use]
mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use eventcore_memory::InMemoryEventStore;
use eventcore_types::StreamPosition;
use shardlock_contract_tests::container::{self, SharedContainer, Spec};
use shardlock_core::{BoxError, DatabaseId};
use shardlock_eventcore::{
    PositionTable, ShardlockBackend, ShardlockCheckpoints, ShardlockCoordinator,
};
use shardlock_sqlserver::{
    DatabaseMapping, MssqlCheckpoints, MssqlDriver, MssqlOptions, TdsClient,
};
use testcontainers_modules::mssql_server::MssqlServer;

/// The driver crate's shared container (`driver-sqlserver/tests/common`).
static SERVER: SharedContainer = SharedContainer::new(Spec {
    group: "sqlserver",
    name: "mssql",
    url_env: "SHARDLOCK_MSSQL_URL",
    image_env: "SHARDLOCK_MSSQL_IMAGE",
    default_image: "mcr.microsoft.com/mssql/server:2022-latest",
    port: 1433,
    local_only: true,
    startup_timeout: Duration::from_secs(180),
});

/// Options and the database holding the locks and tables
/// (`SHARDLOCK_MSSQL_DATABASE`, default `shardlock_contract`, as the driver
/// crate's suite; created when missing), or `None` after the skip line.
async fn server() -> Option<(MssqlOptions, DatabaseId)> {
    let image = MssqlServer::default().with_accept_eula();
    let url = container::shared(&SERVER, image, |host, port| {
        format!(
            "Server=tcp:{host},{port};User Id=sa;Password={};TrustServerCertificate=true",
            MssqlServer::DEFAULT_SA_PASSWORD
        )
    })
    .await?;
    let options = MssqlOptions::parse(&url)
        .unwrap_or_else(|e| panic!("SHARDLOCK_MSSQL_URL is not usable: {e}"))
        .database_mapping(DatabaseMapping::SameServer);
    let database = std::env::var("SHARDLOCK_MSSQL_DATABASE")
        .ok()
        .filter(|d| !d.trim().is_empty())
        .unwrap_or_else(|| "shardlock_contract".to_string());
    create_database(&options, &database).await;
    Some((options, DatabaseId::new(database)))
}

/// Waits for the server to accept logins (a reused container may still be
/// starting) and creates `database` if it is missing.
async fn create_database(options: &MssqlOptions, database: &str) {
    let driver = MssqlDriver::new(options.clone());
    let started = Instant::now();
    let mut client = loop {
        match driver
            .connect_client(&DatabaseId::new("master"), "eventcore-setup")
            .await
        {
            Ok(client) => break client,
            Err(e) if started.elapsed() > Duration::from_secs(120) => {
                panic!("SQL Server is not reachable: {e}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    };
    // The name is bound and quoted server-side.
    let created = client
        .execute(
            "DECLARE @db sysname = @P1;
             IF DB_ID(@db) IS NULL
             BEGIN
                 DECLARE @sql nvarchar(max) = N'CREATE DATABASE ' + QUOTENAME(@db);
                 EXEC (@sql);
             END;",
            &[&database],
        )
        .await;
    if let Err(e) = created {
        // 1801: another test process created it first.
        assert_eq!(
            e.code(),
            Some(1801),
            "cannot create database {database}: {e}"
        );
    }
    let _ = client.close().await;
}

/// Exact eventcore positions in a SQL Server table beside `subscriptions`,
/// for this test (shardlock-eventcore ships Postgres, MySQL, SQLite and memory
/// tables). A position is a UUID kept as `binary(16)`, big-endian, so the
/// server's binary comparison is the positions' order (`uniqueidentifier`
/// compares its bytes in another order); it only ever moves forward.
#[derive(Clone)]
struct MssqlPositions {
    client: Arc<tokio::sync::Mutex<TdsClient>>,
}

impl MssqlPositions {
    async fn open(mut client: TdsClient) -> Self {
        let created = match client
            .simple_query(
                "IF OBJECT_ID(N'eventcore_positions', N'U') IS NULL
                    CREATE TABLE eventcore_positions (
                        subscription_name nvarchar(450) COLLATE Latin1_General_100_BIN2 NOT NULL PRIMARY KEY,
                        position binary(16) NOT NULL,
                        updated_at datetime2(6) NOT NULL DEFAULT SYSUTCDATETIME());",
            )
            .await
        {
            Ok(stream) => stream.into_results().await.map(|_| ()),
            Err(e) => Err(e),
        };
        if let Err(e) = created {
            // 2714: a concurrent test created it first.
            assert_eq!(e.code(), Some(2714), "eventcore_positions: {e}");
        }
        Self {
            client: Arc::new(tokio::sync::Mutex::new(client)),
        }
    }
}

impl PositionTable for MssqlPositions {
    async fn load(&self, subscription: &str) -> Result<Option<StreamPosition>, BoxError> {
        let mut client = self.client.lock().await;
        let row = client
            .query(
                "SELECT position FROM eventcore_positions WHERE subscription_name = @P1",
                &[&subscription],
            )
            .await?
            .into_row()
            .await?;
        let Some(row) = row else { return Ok(None) };
        let bytes: Option<&[u8]> = row.try_get(0)?;
        let bytes = bytes.ok_or("position is NULL")?;
        Ok(Some(StreamPosition::new(uuid::Uuid::from_slice(bytes)?)))
    }

    async fn advance(&self, subscription: &str, position: StreamPosition) -> Result<(), BoxError> {
        let bits: uuid::Uuid = position.into_inner();
        let bytes: &[u8] = bits.as_bytes();
        let mut client = self.client.lock().await;
        client
            .execute(
                "MERGE eventcore_positions WITH (HOLDLOCK) AS t
                 USING (SELECT @P1 AS subscription_name, CAST(@P2 AS binary(16)) AS position) AS s
                    ON t.subscription_name = s.subscription_name
                 WHEN MATCHED AND t.position < s.position THEN
                    UPDATE SET position = s.position, updated_at = SYSUTCDATETIME()
                 WHEN NOT MATCHED THEN
                    INSERT (subscription_name, position) VALUES (s.subscription_name, s.position);",
                &[&subscription, &bytes],
            )
            .await?;
        Ok(())
    }
}

async fn checkpoints(
    options: &MssqlOptions,
    database: &DatabaseId,
) -> ShardlockCheckpoints<MssqlCheckpoints, MssqlPositions> {
    let store = MssqlCheckpoints::connect(options, database)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let client = MssqlDriver::new(options.clone())
        .connect_client(database, "eventcore-positions")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    ShardlockCheckpoints::new(store, MssqlPositions::open(client).await)
}

checkpoint_contract!(
    checkpoints,
    async {
        let (options, database) = server().await?;
        let checkpoints = checkpoints(&options, &database).await;
        Some(move || checkpoints.clone())
    }
    .await
);

coordination_contract!(
    coordinator,
    async {
        let (options, database) = server().await?;
        Some(move || ShardlockCoordinator::new(MssqlDriver::new(options.clone()), database.clone()))
    }
    .await
);

coordination_contract!(
    backend,
    async {
        let (options, database) = server().await?;
        let checkpoints = checkpoints(&options, &database).await;
        Some(move || {
            ShardlockBackend::new(
                InMemoryEventStore::new(),
                ShardlockCoordinator::new(MssqlDriver::new(options.clone()), database.clone()),
                checkpoints.clone(),
            )
        })
    }
    .await
);

/// [`common::advance_only_forward`] on this test's `binary(16)` table.
#[tokio::test]
async fn positions_advance_only_forward() {
    let Some((options, database)) = server().await else {
        return;
    };
    let checkpoints = checkpoints(&options, &database).await;
    common::advance_only_forward(checkpoints.positions()).await;
}
