//! `probe` and announced releases (contract clauses 11 and 12) on the SQLite
//! driver: in one process (two drivers over one lock directory, as two
//! nodes would open it) and across real processes (the crate's holder and
//! announcer examples).

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use shardlock_contract_tests::holder::{self, HolderProcess};
use shardlock_contract_tests::unique_keys;
use shardlock_core::{
    CancellationToken, DatabaseId, Driver, LockKey, NodeId, ReleaseHints, Session, Support,
};
use shardlock_sqlite::{SqliteDriver, SqliteSession, RELEASE_HINT_BOUND};

/// How long a test waits for a hint that must come (generous: a loaded
/// machine; the latency itself is printed and checked separately).
const ARRIVES: Duration = Duration::from_secs(5);
/// How long a test waits to see that a hint does not come: several worker
/// checks (50 ms each).
const ABSENT: Duration = Duration::from_millis(300);

fn lock_dir(what: &str) -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    std::env::temp_dir().join(format!(
        "shardlock-hints-{what}-{}-{nanos:x}",
        std::process::id()
    ))
}

async fn connect(driver: &SqliteDriver, db: &str, node: &str) -> SqliteSession {
    driver
        .connect(&DatabaseId::new(db), &NodeId::new(node))
        .await
        .expect("connect")
}

fn hints(session: &SqliteSession) -> ReleaseHints {
    session
        .signals()
        .release_hints()
        .cloned()
        .expect("every SQLite session has release hints")
}

/// Waits for a hint; answers how long it took, `None` if none came.
async fn woken(hints: &ReleaseHints, wait: Duration) -> Option<Duration> {
    let start = Instant::now();
    tokio::time::timeout(wait, hints.released())
        .await
        .ok()
        .map(|()| start.elapsed())
}

/// Rows of the registry's `holders` table for `session`-less checks: how
/// many rows name keys of `database`.
fn registry_rows(dir: &Path, sql: &str) -> i64 {
    let conn = shardlock_sqlite::rusqlite::Connection::open(dir.join("registry.db"))
        .expect("open the registry");
    conn.query_row(sql, [], |r| r.get(0)).expect("query")
}

#[test]
fn the_driver_states_emulated_release_hints_and_a_native_probe() {
    let dir = lock_dir("caps");
    let driver = SqliteDriver::open(&dir).expect("lock directory");
    let caps = driver.capabilities();
    assert_eq!(caps.release_hint, Support::Emulated);
    assert_eq!(caps.loss_signal, Support::Emulated);
    assert_eq!(caps.probe, Support::Native, "the probe takes nothing");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn probe_sees_other_sessions_holds_in_one_round_trip_and_takes_nothing() {
    let dir = lock_dir("probe");
    let one = SqliteDriver::open(&dir).expect("lock directory");
    let two = SqliteDriver::open(&dir).expect("the same lock directory");
    let mut a = connect(&one, "db", "a").await;
    let mut b = connect(&two, "db", "b").await;
    let k = unique_keys("probe", 3);
    let (k0, k2) = (&k[0], &k[2]);
    assert_eq!(
        a.try_acquire(&[k0.clone(), k2.clone()])
            .await
            .expect("take"),
        vec![true, true]
    );

    let before = b.round_trips();
    assert_eq!(b.probe(&k).await.expect("probe"), vec![true, false, true]);
    assert_eq!(b.round_trips() - before, 1, "a probe is one worker call");
    assert!(b.held().is_empty(), "the prober holds nothing");

    let before = a.round_trips();
    assert_eq!(
        a.probe(&[k0.clone(), k2.clone(), k0.clone()])
            .await
            .expect("own probe"),
        vec![false, false, false],
        "a session's own keys answer false"
    );
    assert_eq!(a.round_trips(), before, "own keys cost no round trip");
    assert_eq!(a.probe(&k).await.expect("probe"), vec![false, false, false]);
    assert_eq!(a.held().len(), 2, "probing keeps a's keys");
    assert_eq!(
        b.probe(&[k0.clone(), k0.clone()]).await.expect("probe"),
        vec![true, true],
        "duplicates answer alike"
    );
    assert!(b.probe(&[]).await.expect("empty probe").is_empty());

    // A third session takes the free key: the probes left it free.
    let mut c = connect(&one, "db", "c").await;
    assert_eq!(
        c.try_acquire(&k).await.expect("take"),
        vec![false, true, false]
    );
    assert_eq!(b.probe(&k).await.expect("probe"), vec![true, true, true]);
    // Another database's locks are not seen.
    let mut other = connect(&two, "other", "o").await;
    assert_eq!(
        other.probe(&k).await.expect("probe"),
        vec![false, false, false]
    );
    // A released key is free again at once.
    assert!(a.release(k0).await.expect("release"));
    assert_eq!(b.probe(&k).await.expect("probe"), vec![false, true, true]);

    // A session ended from outside (its liveness file deleted) no longer
    // counts, even before its worker notices.
    #[cfg(unix)]
    {
        std::fs::remove_file(c.liveness_file()).expect("end c");
        assert_eq!(b.probe(&k).await.expect("probe"), vec![false, false, true]);
    }
    for s in [a, b, other] {
        s.close().await.expect("close");
    }
    drop(c);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A killed process's registry rows stay behind; probe must not count them.
#[tokio::test]
async fn probe_across_processes_ignores_a_killed_holders_rows() {
    let dir = lock_dir("probe-kill");
    let driver = SqliteDriver::open(&dir).expect("lock directory");
    let k = unique_keys("probe-kill", 3);
    let held = [k[0].clone(), k[2].clone()];
    let child = {
        let (dir, held) = (dir.clone(), held.clone());
        tokio::task::spawn_blocking(move || {
            HolderProcess::start(
                &holder::example("shardlock-sqlite-holder"),
                dir.to_str().expect("a UTF-8 temp dir"),
                &DatabaseId::new("db"),
                &held,
            )
            .unwrap_or_else(|e| panic!("holder: {e}"))
        })
        .await
        .expect("join")
    };
    assert_eq!(child.granted(), [true, true]);
    let mut b = connect(&driver, "db", "b").await;
    assert_eq!(
        b.probe(&k).await.expect("probe"),
        vec![true, false, true],
        "keys held by another process"
    );
    assert!(b.held().is_empty());

    child.kill();
    let stale = registry_rows(&dir, "SELECT COUNT(*) FROM holders WHERE database = 'db'");
    assert_eq!(stale, 2, "the killed holder left its rows behind");
    assert_eq!(
        b.probe(&k).await.expect("probe"),
        vec![false, false, false],
        "a dead holder's leftover rows are not held"
    );
    assert_eq!(
        registry_rows(&dir, "SELECT COUNT(*) FROM holders WHERE database = 'db'"),
        0,
        "and the probe removed them"
    );
    assert_eq!(b.try_acquire(&k).await.expect("take"), vec![true; 3]);
    b.close().await.expect("close");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn an_announced_release_wakes_the_other_sessions_with_clean_marks() {
    let dir = lock_dir("announce");
    let one = SqliteDriver::open(&dir).expect("lock directory");
    let two = SqliteDriver::open(&dir).expect("the same lock directory");
    let mut a = connect(&one, "db", "a").await;
    let mut b = connect(&two, "db", "b").await;
    let c = connect(&one, "db", "c").await;
    let other_db = connect(&two, "other", "o").await;
    let (ha, hb, hc, ho) = (hints(&a), hints(&b), hints(&c), hints(&other_db));
    let k = unique_keys("announce", 4);
    assert_eq!(a.try_acquire(&k[..3]).await.expect("take"), vec![true; 3]);
    assert_eq!(b.try_acquire(&k[3..]).await.expect("take"), vec![true]);

    let before = a.round_trips();
    let answers = a
        .release_announced(
            &[k[0].clone(), k[1].clone(), k[3].clone(), k[2].clone()],
            // k2's mark is missing: not clean; k3 is b's, not a's.
            &[true, false, true],
        )
        .await
        .expect("release_announced");
    assert_eq!(answers, vec![true, true, false, true]);
    assert_eq!(a.round_trips() - before, 1, "one worker call");
    assert!(a.held().is_empty());

    for (who, h) in [("b (another driver)", &hb), ("c (the same driver)", &hc)] {
        let took = woken(h, ARRIVES)
            .await
            .unwrap_or_else(|| panic!("{who} was not woken within {ARRIVES:?}"));
        eprintln!("sqlite: announced release reached {who} after {took:?}");
        assert_eq!(h.received(), 1, "{who} heard one announcement");
        assert!(h.take_clean(&k[0]), "{who}: k0 was handed over cleanly");
        assert!(!h.take_clean(&k[1]), "{who}: k1 was released not clean");
        assert!(!h.take_clean(&k[2]), "{who}: k2 had no clean entry");
        assert!(!h.take_clean(&k[3]), "{who}: k3 was not released by a");
    }
    assert!(woken(&ha, ABSENT).await.is_none(), "a hears no echo");
    assert_eq!(ha.received(), 0);
    assert_eq!(ho.received(), 0, "another database's session hears nothing");
    assert_eq!(
        b.try_acquire(&k[..3]).await.expect("take"),
        vec![true; 3],
        "the announced keys are free"
    );
    for s in [a, b, c, other_db] {
        s.close().await.expect("close");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_release_that_frees_nothing_announces_nothing() {
    let dir = lock_dir("nothing");
    let driver = SqliteDriver::open(&dir).expect("lock directory");
    let mut a = connect(&driver, "db", "a").await;
    let mut b = connect(&driver, "db", "b").await;
    let hb = hints(&b);
    let k = unique_keys("nothing", 2);
    assert_eq!(b.try_acquire(&k[..1]).await.expect("take"), vec![true]);
    let before = a.round_trips();
    assert_eq!(
        a.release_announced(&k, &[true, true])
            .await
            .expect("release_announced"),
        vec![false, false]
    );
    assert_eq!(a.round_trips(), before, "nothing held, nothing sent");
    assert!(woken(&hb, ABSENT).await.is_none(), "b hears nothing");
    assert_eq!(hb.received(), 0);
    assert!(!hb.take_clean(&k[1]));
    assert_eq!(
        registry_rows(&dir, "SELECT COUNT(*) FROM announcements"),
        0,
        "no announcement row"
    );
    assert_eq!(b.held(), k[..1].to_vec(), "b's key is untouched");
    a.close().await.expect("close");
    b.close().await.expect("close");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_new_session_does_not_hear_earlier_releases() {
    let dir = lock_dir("late");
    let driver = SqliteDriver::open(&dir).expect("lock directory");
    let mut a = connect(&driver, "db", "a").await;
    let k = unique_keys("late", 1);
    assert_eq!(a.try_acquire(&k).await.expect("take"), vec![true]);
    assert_eq!(
        a.release_announced(&k, &[true]).await.expect("release"),
        vec![true]
    );
    let late = connect(&driver, "db", "late").await;
    let hl = hints(&late);
    assert!(woken(&hl, ABSENT).await.is_none(), "old news is not news");
    assert!(!hl.take_clean(&k[0]));
    a.close().await.expect("close");
    late.close().await.expect("close");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A session blocked in `acquire` (its worker busy waiting for a lock)
/// still hears releases of other keys.
#[tokio::test]
async fn a_session_waiting_in_acquire_still_hears_releases() {
    let dir = lock_dir("waiting");
    let driver = SqliteDriver::open(&dir).expect("lock directory");
    let mut a = connect(&driver, "db", "a").await;
    let mut holder = connect(&driver, "db", "holder").await;
    let mut waiter = connect(&driver, "db", "waiter").await;
    let hw = hints(&waiter);
    let k = unique_keys("waiting", 2);
    assert_eq!(holder.try_acquire(&k[..1]).await.expect("take"), vec![true]);
    assert_eq!(a.try_acquire(&k[1..]).await.expect("take"), vec![true]);
    let cancel = CancellationToken::new();
    let wait = {
        let (key, cancel) = (k[0].clone(), cancel.clone());
        tokio::spawn(async move {
            let got = waiter.acquire(&key, &cancel).await;
            (waiter, got)
        })
    };
    let deadline = Instant::now() + ARRIVES;
    while driver.waiting(&DatabaseId::new("db"), &k[0]) == 0 {
        assert!(Instant::now() < deadline, "the waiter never waited");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(
        a.release_announced(&k[1..], &[true])
            .await
            .expect("release"),
        vec![true]
    );
    let took = woken(&hw, ARRIVES)
        .await
        .expect("the waiting session heard the release");
    eprintln!("sqlite: a waiting session heard the release after {took:?}");
    assert!(hw.take_clean(&k[1]));
    assert!(!wait.is_finished(), "it was still waiting");
    cancel.cancel();
    let (waiter, got) = wait.await.expect("join");
    assert!(!got.expect("a cancelled acquire"));
    for s in [a, holder, waiter] {
        s.close().await.expect("close");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn old_announcements_are_pruned() {
    let dir = lock_dir("prune");
    let driver = SqliteDriver::open(&dir).expect("lock directory");
    let mut a = connect(&driver, "db", "a").await;
    let k = unique_keys("prune", 1);
    for _ in 0..300 {
        assert_eq!(a.try_acquire(&k).await.expect("take"), vec![true]);
        assert_eq!(
            a.release_announced(&k, &[false]).await.expect("release"),
            vec![true]
        );
    }
    let rows = registry_rows(&dir, "SELECT COUNT(*) FROM announcements");
    assert!((1..=256).contains(&rows), "{rows} announcement rows kept");
    assert_eq!(
        registry_rows(&dir, "SELECT MAX(seq) FROM announcements"),
        300,
        "sequence numbers only grow"
    );
    a.close().await.expect("close");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The crate's announcer example: a real process that takes keys and gives
/// them back with `release_announced` when told to.
struct Announcer {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

impl Announcer {
    fn start(dir: &Path, database: &str, clean: &str, keys: &[LockKey]) -> Self {
        let mut child = Command::new(holder::example("shardlock-sqlite-announcer"))
            .arg(dir)
            .arg(database)
            .arg(clean)
            .args(keys.iter().map(LockKey::name))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the announcer example (built with the tests)");
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        Self {
            child,
            stdin,
            stdout,
        }
    }

    /// The next line, which must start with `tag`; answers the rest.
    fn expect(&mut self, tag: &str) -> String {
        let mut line = String::new();
        self.stdout
            .read_line(&mut line)
            .expect("read the announcer");
        line.trim_end()
            .strip_prefix(tag)
            .unwrap_or_else(|| panic!("expected {tag}, got {line:?}"))
            .trim()
            .to_string()
    }

    fn release(&mut self) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        writeln!(stdin, "release").expect("tell the announcer");
        stdin.flush().expect("flush");
    }
}

impl Drop for Announcer {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn an_announced_release_in_another_process_wakes_this_one() {
    let dir = lock_dir("cross");
    let driver = SqliteDriver::open(&dir).expect("lock directory");
    let k = unique_keys("cross", 2);
    let mut child = {
        let (dir, keys) = (dir.clone(), k.clone());
        tokio::task::spawn_blocking(move || {
            let mut child = Announcer::start(&dir, "db", "10", &keys);
            assert_eq!(child.expect("GRANTED"), "11");
            child
        })
        .await
        .expect("join")
    };
    let mut b = connect(&driver, "db", "b").await;
    let hb = hints(&b);
    assert_eq!(
        b.probe(&k).await.expect("probe"),
        vec![true, true],
        "held by the other process"
    );
    assert_eq!(b.try_acquire(&k).await.expect("try"), vec![false, false]);

    let told = Instant::now();
    let child = tokio::task::spawn_blocking(move || {
        child.release();
        assert_eq!(child.expect("RELEASED"), "11");
        (child, Instant::now())
    });
    let woke = woken(&hb, ARRIVES)
        .await
        .expect("the other process's release reached this session");
    let (child, released) = child.await.expect("join");
    let latency = Instant::now().saturating_duration_since(released);
    eprintln!(
        "sqlite: cross-process hint {woke:?} after the command, at most {latency:?} after the \
         release returned in the child (bound {RELEASE_HINT_BOUND:?})"
    );
    assert!(
        told.elapsed() < ARRIVES,
        "woken within {ARRIVES:?} of the command"
    );
    assert!(hb.take_clean(&k[0]), "k0 was handed over cleanly");
    assert!(!hb.take_clean(&k[1]), "k1 was not");
    assert_eq!(
        b.try_acquire(&k).await.expect("take"),
        vec![true, true],
        "the announced keys are free"
    );
    drop(child);
    b.close().await.expect("close");
    let _ = std::fs::remove_dir_all(&dir);
}
