//! Projection scenarios on SQL Server: leadership through session-owned
//! application locks, checkpoints in the `subscriptions` table (events from
//! an in-memory log), the checkpoint-store contract, and a checkpoint saved
//! in the caller's own transaction. Same gate as the contract suite
//! (`SHARDLOCK_MSSQL_URL`, a local `SHARDLOCK_MSSQL_IMAGE`, or a loud
//! `SKIPPED` line): see `common/mod.rs`.

mod common;

use std::time::{Duration, Instant};

use shardlock_contract_tests::{
    assert_fenced_off, assert_not_claimed, unique_name, Harness, Holder, ProjectionHarness,
};
use shardlock_core::{BoxError, CheckpointStore, DatabaseId, LockKey, NodeId};
use shardlock_memory::MemoryEventLog;
use shardlock_sqlserver::{tran_locks_name, MssqlCheckpoints, MssqlDriver, MssqlSession};

struct MssqlProjectionHarness {
    inner: common::MssqlHarness,
    checkpoints: MssqlCheckpoints,
}

impl Harness for MssqlProjectionHarness {
    type Driver = MssqlDriver;

    fn driver(&self) -> MssqlDriver {
        self.inner.driver()
    }

    fn database(&self) -> DatabaseId {
        self.inner.database()
    }

    async fn terminate(&self, session: &MssqlSession) {
        self.inner.terminate(session).await;
    }

    async fn spawn_holder(&self, keys: Vec<LockKey>) -> Result<Holder, BoxError> {
        self.inner.spawn_holder(keys).await
    }

    /// Looks in `sys.dm_tran_locks` for a request waiting on the key's
    /// application lock (the harness logs in as `sa`, which may read it).
    async fn wait_until_waiting(&self, key: &LockKey) -> bool {
        let shown = tran_locks_name(key);
        let mut side = self.inner.raw(self.database().as_str()).await;
        let deadline = Instant::now() + self.settle();
        loop {
            let waiting: Option<i32> = side
                .query(
                    "SELECT COUNT(*) FROM sys.dm_tran_locks
                      WHERE resource_type = N'APPLICATION' AND request_status = N'WAIT'
                        AND resource_database_id = DB_ID()
                        AND CHARINDEX(@P1, resource_description) > 0",
                    &[&shown.as_str()],
                )
                .await
                .expect("read sys.dm_tran_locks")
                .into_row()
                .await
                .expect("row")
                .and_then(|row| row.get(0));
            if waiting.unwrap_or(0) > 0 {
                let _ = side.close().await;
                return true;
            }
            assert!(
                Instant::now() < deadline,
                "no session waits for {key} on SQL Server within {:?}",
                self.settle()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn settle(&self) -> Duration {
        self.inner.settle()
    }

    fn slack(&self) -> Duration {
        self.inner.slack()
    }
}

impl ProjectionHarness for MssqlProjectionHarness {
    type Events = MemoryEventLog<i64>;
    type Checkpoints = MssqlCheckpoints;

    async fn stream(&self, n: usize) -> MemoryEventLog<i64> {
        let log = MemoryEventLog::new();
        for i in 1..=n as i64 {
            log.append(i);
        }
        log
    }

    async fn checkpoints(&self) -> MssqlCheckpoints {
        self.checkpoints.clone()
    }

    /// `KILL`s every session labelled `shardlock:<node>` (the driver's
    /// application name), as a crash of that node would end them.
    async fn kill_node(&self, node: &NodeId) {
        let mut side = self.inner.raw("master").await;
        // KILL takes no variables: the server builds the statements from
        // the session ids it finds for the bound program name.
        side.execute(
            "DECLARE @sql nvarchar(max) = N'';
             SELECT @sql = @sql + N'KILL ' + CAST(session_id AS nvarchar(11)) + N'; '
               FROM sys.dm_exec_sessions
              WHERE program_name = @P1 AND session_id <> @@SPID;
             EXEC (@sql);",
            &[&format!("shardlock:{node}")],
        )
        .await
        .expect("kill the node's sessions");
        let _ = side.close().await;
    }
}

async fn harness() -> Option<MssqlProjectionHarness> {
    let inner = common::harness().await?;
    // The same inputs as the driver: its options and the database id.
    let checkpoints = MssqlCheckpoints::connect(inner.options(), &inner.database())
        .await
        .expect("checkpoint store");
    Some(MssqlProjectionHarness { inner, checkpoints })
}

shardlock_contract_tests::projection_tests!(harness().await);

/// Opening the store twice (another process starting) finds the table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_table_is_created_idempotently() {
    let Some(h) = harness().await else { return };
    let again = MssqlCheckpoints::connect(h.inner.options(), &h.inner.database())
        .await
        .expect("a second open finds the table");
    let name = unique_name("cp-again");
    let claimed = again.claim(&name).await.expect("claim");
    assert_eq!(
        h.checkpoints.load(&name).await.expect("load"),
        Some(claimed),
        "both stores see the same table"
    );
}

/// The projection's own rows and the checkpoint commit in one transaction
/// on the caller's own connection (`save_in` with a tiberius client inside
/// `BEGIN TRANSACTION`); a save without a claim or a stale leader's
/// transaction is rolled back whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactional_checkpoint_commits_with_the_projection() {
    let Some(h) = harness().await else { return };
    let name = unique_name("tx");
    // A generated name (letters, digits, underscores), never user input.
    let table = format!("view_{}", name.replace('-', "_").to_lowercase());
    let mut conn = h.inner.raw(h.database().as_str()).await;
    conn.simple_query(format!("CREATE TABLE {table} (id bigint PRIMARY KEY)"))
        .await
        .expect("view table")
        .into_results()
        .await
        .expect("created");

    // Before any claim: refused, and the transaction rolls back whole.
    conn.simple_query("BEGIN TRANSACTION")
        .await
        .expect("begin")
        .into_results()
        .await
        .expect("begun");
    conn.execute(format!("INSERT INTO {table} VALUES (0)"), &[])
        .await
        .expect("row");
    assert_not_claimed(
        &MssqlCheckpoints::save_in(&mut conn, &name, 1, 1).await,
        &name,
    );
    rollback(&mut conn).await;
    assert_eq!(h.checkpoints.load(&name).await.expect("load"), None);

    let first = h.checkpoints.claim(&name).await.expect("claim");
    conn.simple_query("BEGIN TRANSACTION")
        .await
        .expect("begin")
        .into_results()
        .await
        .expect("begun");
    conn.execute(format!("INSERT INTO {table} VALUES (1)"), &[])
        .await
        .expect("row");
    MssqlCheckpoints::save_in(&mut conn, &name, first.epoch, 1)
        .await
        .expect("save in tx");
    conn.simple_query("COMMIT TRANSACTION")
        .await
        .expect("commit")
        .into_results()
        .await
        .expect("committed");

    let newer = h
        .checkpoints
        .claim(&name)
        .await
        .expect("a new leader claims");
    conn.simple_query("BEGIN TRANSACTION")
        .await
        .expect("begin")
        .into_results()
        .await
        .expect("begun");
    conn.execute(format!("INSERT INTO {table} VALUES (2)"), &[])
        .await
        .expect("row");
    let stale = MssqlCheckpoints::save_in(&mut conn, &name, first.epoch, 2).await;
    assert_fenced_off(&stale, first.epoch, newer.epoch);
    rollback(&mut conn).await;
    let rows: Option<i64> = conn
        .simple_query(format!("SELECT COUNT_BIG(*) FROM {table}"))
        .await
        .expect("count")
        .into_row()
        .await
        .expect("row")
        .and_then(|row| row.get(0));
    assert_eq!(
        rows,
        Some(1),
        "the fenced-off write was rolled back with its checkpoint"
    );
    let cp = h.checkpoints.load(&name).await.expect("load").expect("row");
    assert_eq!((cp.position, cp.epoch), (1, newer.epoch));
    conn.simple_query(format!("DROP TABLE {table}"))
        .await
        .expect("drop")
        .into_results()
        .await
        .expect("dropped");
    let _ = conn.close().await;
}

async fn rollback(conn: &mut shardlock_sqlserver::TdsClient) {
    conn.simple_query("IF @@TRANCOUNT > 0 ROLLBACK TRANSACTION")
        .await
        .expect("rollback")
        .into_results()
        .await
        .expect("rolled back");
}
