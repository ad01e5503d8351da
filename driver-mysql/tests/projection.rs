//! Projection scenarios on MySQL/MariaDB: leadership through `GET_LOCK`,
//! checkpoints in the `subscriptions` table (events from an in-memory log),
//! the checkpoint-store contract, and a transactional checkpoint.

mod common;

use shardlock_contract_tests::{assert_fenced_off, assert_not_claimed, Harness, ProjectionHarness};
use shardlock_core::{CheckpointStore, NodeId};
use shardlock_memory::MemoryEventLog;
use shardlock_mysql::sqlx::{self, Connection};
use shardlock_mysql::MySqlCheckpoints;

struct MySqlProjectionHarness {
    inner: common::MySqlHarness,
    checkpoints: MySqlCheckpoints,
}

shardlock_contract_tests::forward_harness!(MySqlProjectionHarness => inner: common::MySqlHarness);

impl ProjectionHarness for MySqlProjectionHarness {
    type Events = MemoryEventLog<i64>;
    type Checkpoints = MySqlCheckpoints;

    async fn stream(&self, n: usize) -> MemoryEventLog<i64> {
        let log = MemoryEventLog::new();
        for i in 1..=n as i64 {
            log.append(i);
        }
        log
    }

    async fn checkpoints(&self) -> MySqlCheckpoints {
        self.checkpoints.clone()
    }

    /// Kills the session connection of every watcher labelled with `node`
    /// (see the crate docs, "Finding a node's sessions").
    async fn kill_node(&self, node: &NodeId) {
        let mut conn = self.inner.raw().await;
        let label = format!("/* shardlock:{} session=%", node.as_str());
        let infos: Vec<String> =
            sqlx::query_scalar("SELECT INFO FROM information_schema.PROCESSLIST WHERE INFO LIKE ?")
                .bind(label)
                .fetch_all(&mut conn)
                .await
                .expect("read the processlist");
        let _ = conn.close().await;
        for info in infos {
            let id = info
                .split("session=")
                .nth(1)
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|id| id.parse::<u64>().ok())
                .expect("a labelled watcher names its session");
            common::kill(self.inner.url(), id).await;
        }
    }
}

async fn harness() -> Option<MySqlProjectionHarness> {
    let inner = common::harness().await?;
    let checkpoints = MySqlCheckpoints::connect(inner.options(), &inner.database())
        .await
        .expect("checkpoint store");
    Some(MySqlProjectionHarness { inner, checkpoints })
}

shardlock_contract_tests::projection_tests!(harness().await);

/// The projection's own rows and the checkpoint commit in one transaction;
/// a save without a claim or a stale leader's transaction is rolled back
/// whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactional_checkpoint_commits_with_the_projection() {
    let Some(h) = harness().await else { return };
    let name = shardlock_contract_tests::unique_name("tx");
    let table = format!("view_{}", name.replace('-', "_").to_lowercase());
    let mut conn = h.inner.raw().await;
    sqlx::query(&format!(
        "CREATE TABLE {table} (id bigint PRIMARY KEY) ENGINE = InnoDB"
    ))
    .execute(&mut conn)
    .await
    .expect("view table");
    let mut tx = conn.begin().await.expect("begin");
    sqlx::query(&format!("INSERT INTO {table} VALUES (0)"))
        .execute(&mut *tx)
        .await
        .expect("row");
    assert_not_claimed(
        &MySqlCheckpoints::save_in(&mut tx, &name, 1, 1).await,
        &name,
    );
    tx.rollback().await.expect("rollback");
    assert_eq!(h.checkpoints.load(&name).await.expect("load"), None);
    let first = h.checkpoints.claim(&name).await.expect("claim");
    let mut tx = conn.begin().await.expect("begin");
    sqlx::query(&format!("INSERT INTO {table} VALUES (1)"))
        .execute(&mut *tx)
        .await
        .expect("row");
    MySqlCheckpoints::save_in(&mut tx, &name, first.epoch, 1)
        .await
        .expect("save in tx");
    tx.commit().await.expect("commit");

    let newer = h
        .checkpoints
        .claim(&name)
        .await
        .expect("a new leader claims");
    let mut tx = conn.begin().await.expect("begin");
    sqlx::query(&format!("INSERT INTO {table} VALUES (2)"))
        .execute(&mut *tx)
        .await
        .expect("row");
    let stale = MySqlCheckpoints::save_in(&mut tx, &name, first.epoch, 2).await;
    assert_fenced_off(&stale, first.epoch, newer.epoch);
    tx.rollback().await.expect("rollback");
    let rows: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
        .fetch_one(&mut conn)
        .await
        .expect("count");
    assert_eq!(
        rows, 1,
        "the fenced-off write was rolled back with its checkpoint"
    );
    let cp = h.checkpoints.load(&name).await.expect("load").expect("row");
    assert_eq!((cp.position, cp.epoch), (1, newer.epoch));
    sqlx::query(&format!("DROP TABLE {table}"))
        .execute(&mut conn)
        .await
        .expect("drop");
}
