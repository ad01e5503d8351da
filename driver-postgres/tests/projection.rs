//! Projection scenarios on PostgreSQL: leadership through advisory locks,
//! checkpoints in the `subscriptions` table (events from an in-memory log),
//! the checkpoint-store contract, and a transactional checkpoint.

mod common;

use shardlock_contract_tests::{assert_fenced_off, assert_not_claimed, Harness, ProjectionHarness};
use shardlock_core::{CheckpointStore, NodeId};
use shardlock_memory::MemoryEventLog;
use shardlock_postgres::sqlx::{self, Connection};
use shardlock_postgres::PgCheckpoints;

struct PgProjectionHarness {
    inner: common::PgHarness,
    checkpoints: PgCheckpoints,
}

shardlock_contract_tests::forward_harness!(PgProjectionHarness => inner: common::PgHarness);

impl ProjectionHarness for PgProjectionHarness {
    type Events = MemoryEventLog<i64>;
    type Checkpoints = PgCheckpoints;

    async fn stream(&self, n: usize) -> MemoryEventLog<i64> {
        let log = MemoryEventLog::new();
        for i in 1..=n as i64 {
            log.append(i);
        }
        log
    }

    async fn checkpoints(&self) -> PgCheckpoints {
        self.checkpoints.clone()
    }

    async fn kill_node(&self, node: &NodeId) {
        let mut conn = self.inner.raw().await;
        sqlx::query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
        )
        .bind(format!("shardlock:{node}"))
        .execute(&mut conn)
        .await
        .expect("terminate the node's sessions");
        let _ = conn.close().await;
    }
}

async fn harness() -> Option<PgProjectionHarness> {
    let inner = common::harness().await?;
    // The same inputs as the driver: its options and the database id.
    let checkpoints = PgCheckpoints::connect(inner.options(), &inner.database())
        .await
        .expect("checkpoint store");
    Some(PgProjectionHarness { inner, checkpoints })
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
    sqlx::query(&format!("CREATE TABLE {table} (id bigint PRIMARY KEY)"))
        .execute(&mut conn)
        .await
        .expect("view table");
    // Before any claim: refused, and the transaction rolls back whole.
    let mut tx = conn.begin().await.expect("begin");
    sqlx::query(&format!("INSERT INTO {table} VALUES (0)"))
        .execute(&mut *tx)
        .await
        .expect("row");
    assert_not_claimed(&PgCheckpoints::save_in(&mut tx, &name, 1, 1).await, &name);
    tx.rollback().await.expect("rollback");
    assert_eq!(h.checkpoints.load(&name).await.expect("load"), None);
    let first = h.checkpoints.claim(&name).await.expect("claim");
    let mut tx = conn.begin().await.expect("begin");
    sqlx::query(&format!("INSERT INTO {table} VALUES (1)"))
        .execute(&mut *tx)
        .await
        .expect("row");
    PgCheckpoints::save_in(&mut tx, &name, first.epoch, 1)
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
    let stale = PgCheckpoints::save_in(&mut tx, &name, first.epoch, 2).await;
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
