//! Projection scenarios with SQLite leadership and the SQLite checkpoint
//! store (events from an in-memory log), plus the checkpoint-store contract
//! and a transactional checkpoint.

use std::path::PathBuf;

use shardlock_contract_tests::{
    assert_fenced_off, assert_not_claimed, until_waiting, Harness, Holder, ProjectionHarness,
};
use shardlock_core::{BoxError, CheckpointStore, DatabaseId, LockKey, NodeId};
use shardlock_memory::MemoryEventLog;
use shardlock_sqlite::{SqliteCheckpoints, SqliteDriver, SqliteSession};

struct SqliteProjectionHarness {
    dir: PathBuf,
    /// One driver, cloned for every node, so its waiter count sees them all.
    driver: SqliteDriver,
    checkpoints: SqliteCheckpoints,
}

fn temp_dir(what: &str) -> PathBuf {
    let n = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    std::env::temp_dir().join(format!(
        "shardlock-proj-{what}-{}-{n:x}",
        std::process::id()
    ))
}

impl Harness for SqliteProjectionHarness {
    type Driver = SqliteDriver;

    fn driver(&self) -> SqliteDriver {
        self.driver.clone()
    }

    fn database(&self) -> DatabaseId {
        DatabaseId::new("projections")
    }

    async fn terminate(&self, session: &SqliteSession) {
        let _ = std::fs::remove_file(session.liveness_file());
    }

    async fn spawn_holder(&self, _keys: Vec<LockKey>) -> Result<Holder, BoxError> {
        Err("not used by the projection scenarios".into())
    }

    async fn wait_until_waiting(&self, key: &LockKey) -> bool {
        let db = self.database();
        until_waiting(self.settle(), key, "the SQLite driver", || {
            self.driver.waiting(&db, key)
        })
        .await
    }
}

impl ProjectionHarness for SqliteProjectionHarness {
    type Events = MemoryEventLog<i64>;
    type Checkpoints = SqliteCheckpoints;

    async fn stream(&self, n: usize) -> MemoryEventLog<i64> {
        let log = MemoryEventLog::new();
        for i in 1..=n as i64 {
            log.append(i);
        }
        log
    }

    async fn checkpoints(&self) -> SqliteCheckpoints {
        self.checkpoints.clone()
    }

    async fn kill_node(&self, node: &NodeId) {
        // Ending a session = removing its liveness file; a node's session
        // files start with its (file-safe) name.
        let sessions = self.dir.join("locks").join("projections").join("sessions");
        let prefix = format!("{}-", node.as_str());
        if let Ok(entries) = std::fs::read_dir(&sessions) {
            for entry in entries.flatten() {
                if entry.file_name().to_string_lossy().starts_with(&prefix) {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
    }
}

async fn harness() -> Option<SqliteProjectionHarness> {
    let dir = temp_dir("suite");
    std::fs::create_dir_all(&dir).expect("temp dir");
    let checkpoints = SqliteCheckpoints::connect(dir.join("app.db"))
        .await
        .expect("checkpoint store");
    let driver = SqliteDriver::open(dir.join("locks")).expect("lock directory");
    Some(SqliteProjectionHarness {
        dir,
        driver,
        checkpoints,
    })
}

shardlock_contract_tests::projection_tests!(harness().await);

/// The projection's own rows and its checkpoint commit together, or not at
/// all; a save without a claim or with a stale epoch rolls both back.
#[tokio::test]
async fn transactional_checkpoint_commits_with_the_projection() {
    let dir = temp_dir("tx");
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("app.db");
    let store = SqliteCheckpoints::connect(&path).await.expect("store");
    let mut conn = rusqlite::Connection::open(&path).expect("open");
    conn.execute_batch("CREATE TABLE orders_view(id INTEGER PRIMARY KEY)")
        .expect("table");
    {
        // Before any claim: refused, and the transaction rolls back whole.
        let tx = conn.transaction().expect("tx");
        tx.execute("INSERT INTO orders_view(id) VALUES (0)", [])
            .expect("row");
        assert_not_claimed(&SqliteCheckpoints::save_in(&tx, "orders", 1, 1), "orders");
    }
    assert_eq!(store.load("orders").await.expect("load"), None);
    let claimed = store.claim("orders").await.expect("claim");
    {
        let tx = conn.transaction().expect("tx");
        tx.execute("INSERT INTO orders_view(id) VALUES (1)", [])
            .expect("row");
        SqliteCheckpoints::save_in(&tx, "orders", claimed.epoch, 1).expect("save in tx");
        tx.commit().expect("commit");
    }
    let newer = store.claim("orders").await.expect("claim again");
    {
        let tx = conn.transaction().expect("tx");
        tx.execute("INSERT INTO orders_view(id) VALUES (2)", [])
            .expect("row");
        let stale = SqliteCheckpoints::save_in(&tx, "orders", claimed.epoch, 2);
        assert_fenced_off(&stale, claimed.epoch, newer.epoch);
        // Dropping the transaction rolls the row back with the checkpoint.
    }
    let rows: i64 = conn
        .query_row("SELECT count(*) FROM orders_view", [], |r| r.get(0))
        .expect("count");
    assert_eq!(
        rows, 1,
        "the unclaimed and the fenced-off writes were rolled back"
    );
    let cp = store.load("orders").await.expect("load").expect("row");
    assert_eq!((cp.position, cp.epoch), (1, newer.epoch));
    let _ = std::fs::remove_dir_all(&dir);
}
