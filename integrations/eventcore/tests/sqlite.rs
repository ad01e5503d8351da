//! eventcore's published contract on the SQLite driver and checkpoint
//! store.

#![cfg(feature = "sqlite")]

#[macro_use]
mod common;

use eventcore_memory::InMemoryEventStore;
use shardlock_core::DatabaseId;
use shardlock_eventcore::{
    ShardlockBackend, ShardlockCheckpoints, ShardlockCoordinator, SqlitePositions,
};
use shardlock_sqlite::{SqliteCheckpoints, SqliteDriver};

async fn checkpoints(
    dir: &std::path::Path,
) -> ShardlockCheckpoints<SqliteCheckpoints, SqlitePositions> {
    let file = dir.join("checkpoints.db");
    let store = SqliteCheckpoints::connect(&file)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let positions = SqlitePositions::connect(&file)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    ShardlockCheckpoints::new(store, positions)
}

fn driver(dir: &std::path::Path) -> SqliteDriver {
    SqliteDriver::open(dir.join("locks")).unwrap_or_else(|e| panic!("{e}"))
}

checkpoint_contract!(
    checkpoints,
    async {
        let checkpoints = checkpoints(&common::temp_dir("sqlite-checkpoints")).await;
        Some(move || checkpoints.clone())
    }
    .await
);

coordination_contract!(
    coordinator,
    async {
        let driver = driver(&common::temp_dir("sqlite-coordinator"));
        Some(move || ShardlockCoordinator::new(driver.clone(), DatabaseId::new("main")))
    }
    .await
);

coordination_contract!(
    backend,
    async {
        let dir = common::temp_dir("sqlite-backend");
        let (driver, checkpoints) = (driver(&dir), checkpoints(&dir).await);
        Some(move || {
            ShardlockBackend::new(
                InMemoryEventStore::new(),
                ShardlockCoordinator::new(driver.clone(), DatabaseId::new("main")),
                checkpoints.clone(),
            )
        })
    }
    .await
);

/// [`common::advance_only_forward`] on the SQLite table.
#[tokio::test]
async fn positions_advance_only_forward() {
    let file = common::temp_dir("sqlite-positions").join("checkpoints.db");
    let positions = SqlitePositions::connect(&file)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    common::advance_only_forward(&positions).await;
}
