//! The shared driver contract suite against the SQLite driver, plus
//! cross-process tests with real child processes (the crate's holder
//! example, `shardlock_contract_tests::holder`'s protocol).

use std::path::{Path, PathBuf};
use std::time::Duration;

use shardlock_contract_tests::holder::{self, HolderProcess};
use shardlock_contract_tests::{unique_keys, until_waiting, Harness, Holder};
use shardlock_core::{BoxError, CancellationToken, DatabaseId, Driver, LockKey, NodeId, Session};
use shardlock_sqlite::{SqliteDriver, SqliteSession};

struct SqliteHarness {
    /// One driver for every "node": a separately opened driver on the same
    /// directory behaves the same (faults are per session: its liveness
    /// file), and sharing it lets the harness see waiters
    /// (`SqliteDriver::waiting` counts its own and its clones' sessions).
    driver: SqliteDriver,
}

fn lock_dir(what: &str) -> PathBuf {
    let suffix: u64 = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    std::env::temp_dir().join(format!(
        "shardlock-test-{what}-{}-{suffix:x}",
        std::process::id()
    ))
}

/// The crate's holder example.
fn holder_program() -> PathBuf {
    holder::example("shardlock-sqlite-holder")
}

/// Starts a holder of `keys` in `database` of the lock directory `dir` and
/// waits for its `GRANTED` line.
fn start_holder(dir: &Path, database: &str, keys: &[LockKey]) -> HolderProcess {
    let dir = dir.to_str().expect("a UTF-8 temp dir");
    HolderProcess::start(&holder_program(), dir, &DatabaseId::new(database), keys)
        .unwrap_or_else(|e| panic!("holder: {e}"))
}

impl Harness for SqliteHarness {
    type Driver = SqliteDriver;

    fn driver(&self) -> SqliteDriver {
        self.driver.clone()
    }

    fn database(&self) -> DatabaseId {
        DatabaseId::new("contract")
    }

    async fn terminate(&self, session: &SqliteSession) {
        // An operator ends a session by deleting its liveness file.
        std::fs::remove_file(session.liveness_file()).expect("remove the session's file");
    }

    async fn spawn_holder(&self, keys: Vec<LockKey>) -> Result<Holder, BoxError> {
        let dir = self.driver.dir().to_str().ok_or("a UTF-8 lock directory")?;
        holder::spawn(holder_program(), dir.to_string(), self.database(), keys).await
    }

    fn round_trips(&self, session: &SqliteSession) -> Option<u64> {
        Some(session.round_trips())
    }

    async fn wait_until_waiting(&self, key: &LockKey) -> bool {
        let db = self.database();
        until_waiting(self.settle(), key, "the SQLite driver", || {
            self.driver.waiting(&db, key)
        })
        .await
    }

    fn unreachable_driver(&self) -> Option<SqliteDriver> {
        // The embedded "server" is the lock directory: a driver whose
        // directory was replaced by a plain file after it was opened.
        let dir = lock_dir("unreachable");
        let driver = SqliteDriver::open(&dir).ok()?;
        std::fs::remove_dir_all(&dir).ok()?;
        std::fs::write(&dir, "not a lock directory").ok()?;
        Some(driver)
    }
}

async fn harness() -> Option<SqliteHarness> {
    let driver = SqliteDriver::open(lock_dir("contract")).expect("lock directory");
    Some(SqliteHarness { driver })
}

shardlock_contract_tests::driver_contract_tests!(harness().await);

/// Two processes race for the same 200 keys: every key goes to exactly one.
#[tokio::test]
async fn two_processes_never_share_a_key() {
    let dir = lock_dir("race");
    let _driver = SqliteDriver::open(&dir).expect("lock directory");
    let keys = unique_keys("race", 200);
    let (d1, d2) = (dir.clone(), dir.clone());
    let (k1, k2) = (keys.clone(), keys.clone());
    let a = tokio::task::spawn_blocking(move || start_holder(&d1, "race", &k1));
    let b = tokio::task::spawn_blocking(move || start_holder(&d2, "race", &k2));
    let a = a.await.expect("holder a");
    let b = b.await.expect("holder b");
    let (ga, gb) = (a.granted(), b.granted());
    assert_eq!((ga.len(), gb.len()), (200, 200));
    for i in 0..200 {
        let winners = usize::from(ga[i]) + usize::from(gb[i]);
        assert_eq!(winners, 1, "key {i} granted to {winners} processes");
    }
    eprintln!(
        "race: process a got {}, process b got {}",
        ga.iter().filter(|g| **g).count(),
        gb.iter().filter(|g| **g).count()
    );
    a.kill();
    b.kill();
    let _ = std::fs::remove_dir_all(&dir);
}

/// A waiter in this process gets a key the moment a killed child's lock is
/// freed by the kernel.
#[tokio::test]
async fn kill_minus_nine_hands_the_key_to_a_waiter() {
    let dir = lock_dir("kill9");
    let driver = SqliteDriver::open(&dir).expect("lock directory");
    let keys = unique_keys("kill9", 1);
    let child = start_holder(&dir, "kill9", &keys);
    assert_eq!(child.granted(), [true]);
    let mut session = driver
        .connect(&DatabaseId::new("kill9"), &NodeId::new("waiter"))
        .await
        .expect("connect");
    assert_eq!(session.try_acquire(&keys).await.expect("try"), vec![false]);
    let cancel = CancellationToken::new();
    let killed = std::time::Instant::now();
    child.kill();
    let got = tokio::time::timeout(Duration::from_secs(10), session.acquire(&keys[0], &cancel))
        .await
        .expect("takeover within 10 s")
        .expect("acquire");
    assert!(got);
    eprintln!("sqlite: kill -9 takeover took {:?}", killed.elapsed());
    session.close().await.expect("close");
    let status = shardlock_sqlite::status(&dir).expect("status");
    assert!(status.is_empty(), "nothing held after close: {status:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A `--wait` holder waits for a key another holder has, and gets it once
/// that one is killed.
#[tokio::test]
async fn a_waiting_holder_gets_the_key_of_a_killed_one() {
    let dir = lock_dir("wait");
    let _driver = SqliteDriver::open(&dir).expect("lock directory");
    let keys = unique_keys("wait", 1);
    let first = start_holder(&dir, "wait", &keys);
    assert_eq!(first.granted(), [true]);
    let (d, k) = (dir.clone(), keys.clone());
    let mut second = tokio::task::spawn_blocking(move || {
        let d = d.to_str().expect("a UTF-8 temp dir").to_string();
        HolderProcess::start_waiting(&holder_program(), &d, &DatabaseId::new("wait"), &k)
    })
    .await
    .expect("join")
    .expect("waiting holder");
    assert!(second.granted().is_empty(), "no answer before the wait");
    first.kill();
    let granted = tokio::task::spawn_blocking(move || {
        let granted = second.wait_granted().map(<[bool]>::to_vec);
        (second, granted)
    });
    let (second, granted) = tokio::time::timeout(Duration::from_secs(10), granted)
        .await
        .expect("the waiter is granted within 10 s")
        .expect("join");
    assert_eq!(granted.expect("GRANTED line"), [true]);
    let rows = shardlock_sqlite::status(&dir).expect("status");
    assert!(
        rows.iter().any(|r| r.pid == second.id()),
        "the waiter holds the key: {rows:?}"
    );
    second.kill();
    let _ = std::fs::remove_dir_all(&dir);
}

/// `status` shows live holders with node and pid, and drops dead ones.
#[tokio::test]
async fn status_lists_live_holders_only() {
    let dir = lock_dir("status");
    let driver = SqliteDriver::open(&dir).expect("lock directory");
    let keys = unique_keys("status", 2);
    let child = start_holder(&dir, "main", &keys[..1]);
    let mut mine = driver
        .connect(&DatabaseId::new("main"), &NodeId::new("me"))
        .await
        .expect("connect");
    assert_eq!(mine.try_acquire(&keys[1..]).await.expect("try"), vec![true]);
    let rows = shardlock_sqlite::status(&dir).expect("status");
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert!(rows
        .iter()
        .any(|r| r.pid == child.id() && r.name == keys[0].name()));
    assert!(rows
        .iter()
        .any(|r| r.node == "me" && r.pid == std::process::id()));
    child.kill();
    let rows = shardlock_sqlite::status(&dir).expect("status");
    assert_eq!(rows.len(), 1, "the dead holder's row is gone: {rows:?}");
    mine.close().await.expect("close");
    assert!(shardlock_sqlite::status(&dir).expect("status").is_empty());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_directories_are_typed_errors() {
    let dir = lock_dir("bad");
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::write(dir.join("unrelated.txt"), "data").expect("write");
    assert!(matches!(
        SqliteDriver::open(&dir),
        Err(shardlock_sqlite::SqliteError::NotALockDirectory { .. })
    ));
    assert!(matches!(
        shardlock_sqlite::status(&dir),
        Err(shardlock_sqlite::SqliteError::NotALockDirectory { .. })
    ));
    let file = dir.join("unrelated.txt");
    assert!(
        SqliteDriver::open(&file).is_err(),
        "a file is not a lock directory"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
