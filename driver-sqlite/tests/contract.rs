//! The shared driver contract suite against the SQLite driver, plus
//! cross-process tests with real child processes.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use shardlock_contract_tests::{unique_keys, Harness, Holder};
use shardlock_core::{BoxError, CancellationToken, DatabaseId, Driver, LockKey, NodeId, Session};
use shardlock_sqlite::{SqliteDriver, SqliteSession};

struct SqliteHarness {
    dir: PathBuf,
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

/// Starts the holder process for `keys` and waits for its `GRANTED` line.
fn spawn_holder_process(
    dir: &PathBuf,
    database: &str,
    keys: &[LockKey],
) -> Result<(Child, String), BoxError> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_shardlock-sqlite-holder"))
        .arg(dir)
        .arg(database)
        .args(keys.iter().map(LockKey::name))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    let bits = line
        .trim()
        .strip_prefix("GRANTED ")
        .ok_or_else(|| format!("holder said {line:?}"))?
        .to_string();
    Ok((child, bits))
}

impl Harness for SqliteHarness {
    type Driver = SqliteDriver;

    fn driver(&self) -> SqliteDriver {
        SqliteDriver::open(&self.dir).expect("lock directory")
    }

    fn database(&self) -> DatabaseId {
        DatabaseId::new("contract")
    }

    async fn terminate(&self, session: &SqliteSession) {
        // An operator ends a session by deleting its liveness file.
        std::fs::remove_file(session.liveness_file()).expect("remove the session's file");
    }

    async fn spawn_holder(&self, keys: Vec<LockKey>) -> Result<Holder, BoxError> {
        let dir = self.dir.clone();
        let (mut child, bits) =
            tokio::task::spawn_blocking(move || spawn_holder_process(&dir, "contract", &keys))
                .await??;
        if bits.contains('0') {
            let _ = child.kill();
            return Err(format!("holder did not get every key: {bits}").into());
        }
        Ok(Holder::new(format!("pid {}", child.id()), move || {
            // SIGKILL: the process gets no chance to clean up.
            let _ = child.kill();
            let _ = child.wait();
        }))
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
    Some(SqliteHarness {
        dir: lock_dir("contract"),
    })
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
    let a = tokio::task::spawn_blocking(move || spawn_holder_process(&d1, "race", &k1));
    let b = tokio::task::spawn_blocking(move || spawn_holder_process(&d2, "race", &k2));
    let (mut a, bits_a) = a.await.expect("join").expect("holder a");
    let (mut b, bits_b) = b.await.expect("join").expect("holder b");
    let (ba, bb): (Vec<char>, Vec<char>) = (bits_a.chars().collect(), bits_b.chars().collect());
    assert_eq!(ba.len(), 200);
    assert_eq!(bb.len(), 200);
    for i in 0..200 {
        let winners = usize::from(ba[i] == '1') + usize::from(bb[i] == '1');
        assert_eq!(winners, 1, "key {i} granted to {winners} processes");
    }
    eprintln!(
        "race: process a got {}, process b got {}",
        ba.iter().filter(|c| **c == '1').count(),
        bb.iter().filter(|c| **c == '1').count()
    );
    let _ = a.kill();
    let _ = b.kill();
    let _ = a.wait();
    let _ = b.wait();
    let _ = std::fs::remove_dir_all(&dir);
}

/// A waiter in this process gets a key the moment a killed child's lock is
/// freed by the kernel.
#[tokio::test]
async fn kill_minus_nine_hands_the_key_to_a_waiter() {
    let dir = lock_dir("kill9");
    let driver = SqliteDriver::open(&dir).expect("lock directory");
    let keys = unique_keys("kill9", 1);
    let (mut child, bits) = spawn_holder_process(&dir, "kill9", &keys).expect("holder");
    assert_eq!(bits, "1");
    let mut session = driver
        .connect(&DatabaseId::new("kill9"), &NodeId::new("waiter"))
        .await
        .expect("connect");
    assert_eq!(session.try_acquire(&keys).await.expect("try"), vec![false]);
    let cancel = CancellationToken::new();
    let killed = std::time::Instant::now();
    child.kill().expect("SIGKILL");
    let got = tokio::time::timeout(Duration::from_secs(10), session.acquire(&keys[0], &cancel))
        .await
        .expect("takeover within 10 s")
        .expect("acquire");
    assert!(got);
    eprintln!("sqlite: kill -9 takeover took {:?}", killed.elapsed());
    let _ = child.wait();
    session.close().await.expect("close");
    let status = shardlock_sqlite::status(&dir).expect("status");
    assert!(status.is_empty(), "nothing held after close: {status:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `status` shows live holders with node and pid, and drops dead ones.
#[tokio::test]
async fn status_lists_live_holders_only() {
    let dir = lock_dir("status");
    let driver = SqliteDriver::open(&dir).expect("lock directory");
    let keys = unique_keys("status", 2);
    let (mut child, _) = spawn_holder_process(&dir, "main", &keys[..1]).expect("holder");
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
    child.kill().expect("kill");
    let _ = child.wait();
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
