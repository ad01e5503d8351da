//! eventcore's coordination contract on the SQL Server driver (shardlock
//! has no SQL Server checkpoint store yet, so the checkpoint half is not
//! run here). Needs `SHARDLOCK_MSSQL_URL`, or the image
//! `SHARDLOCK_MSSQL_IMAGE` present locally; otherwise every test prints a
//! loud `SKIPPED` line.

#[macro_use]
mod common;

use std::time::Duration;

use shardlock_contract_tests::container::{self, SharedContainer, Spec};
use shardlock_core::DatabaseId;
use shardlock_eventcore::ShardlockCoordinator;
use shardlock_sqlserver::{DatabaseMapping, MssqlDriver, MssqlOptions};
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

/// Options and the database holding the locks (`SHARDLOCK_MSSQL_DATABASE`,
/// default `master`, which always exists), or `None` after the skip line.
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
        .unwrap_or_else(|| "master".to_string());
    Some((options, DatabaseId::new(database)))
}

coordination_contract!(
    coordinator,
    async {
        let (options, database) = server().await?;
        Some(move || ShardlockCoordinator::new(MssqlDriver::new(options.clone()), database.clone()))
    }
    .await
);
