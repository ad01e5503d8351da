//! Session-fenced transactions on SQLite (issue 14, item 4): the
//! projection's writes and its checkpoint commit in the application's
//! database only while the leader's session holds its lock, so a leader
//! whose session was ended (its liveness file removed, as an operator or
//! the contract harness's `terminate` does) cannot commit a stale effect.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use shardlock_core::{
    acquire_leadership, projection_leadership_key, CheckpointError, CheckpointStore, DatabaseId,
    Error, FencedError, LeadershipGuard, LockKey, NodeId,
};
use shardlock_sqlite::rusqlite::{self, params, Connection};
use shardlock_sqlite::{SqliteCheckpoints, SqliteDriver, SqliteSession};

fn temp_dir(what: &str) -> PathBuf {
    let n = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    std::env::temp_dir().join(format!(
        "shardlock-fenced-{what}-{}-{n:x}",
        std::process::id()
    ))
}

struct Setup {
    dir: PathBuf,
    driver: SqliteDriver,
    store: SqliteCheckpoints,
    db: PathBuf,
    key: LockKey,
    name: String,
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn setup(what: &str) -> Setup {
    let dir = temp_dir(what);
    std::fs::create_dir_all(&dir).expect("temp dir");
    let driver = SqliteDriver::open(dir.join("locks")).expect("driver");
    let db = dir.join("app.db");
    let store = SqliteCheckpoints::connect(&db).await.expect("store");
    Connection::open(&db)
        .and_then(|c| {
            c.execute_batch(
                "CREATE TABLE effects(position INTEGER PRIMARY KEY, leader INTEGER NOT NULL)",
            )
        })
        .expect("effects table");
    let name = what.to_string();
    let key = projection_leadership_key(&name).expect("key");
    Setup {
        dir,
        driver,
        store,
        db,
        key,
        name,
    }
}

fn effects(db: &Path) -> i64 {
    Connection::open(db)
        .and_then(|c| c.query_row("SELECT count(*) FROM effects", [], |r| r.get(0)))
        .expect("count effects")
}

fn write_effects(
    tx: &rusqlite::Transaction<'_>,
    from: i64,
    n: i64,
    leader: i64,
) -> Result<(), FencedError> {
    for p in from + 1..=from + n {
        tx.execute("INSERT INTO effects VALUES (?1, ?2)", params![p, leader])
            .map_err(FencedError::effects)?;
    }
    Ok(())
}

async fn lead(s: &Setup, node: &str) -> LeadershipGuard<SqliteSession> {
    let started = Instant::now();
    loop {
        match acquire_leadership(
            &s.driver,
            &DatabaseId::new("app"),
            &NodeId::new(node),
            s.key.clone(),
        )
        .await
        {
            Ok(guard) => return guard,
            Err(Error::LockNotAcquired { .. }) if started.elapsed() < Duration::from_secs(5) => {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(e) => panic!("leadership: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fenced_transaction_commits_effects_and_checkpoint_atomically() {
    let s = setup("ok").await;
    let mut guard = lead(&s, "leader").await;
    let claimed = s.store.claim(&s.name).await.expect("claim");
    s.store
        .fenced_checkpoint(
            guard.leader_session().expect("session"),
            &s.key,
            &s.name,
            claimed.epoch,
            3,
            |tx| write_effects(tx, 0, 3, 1),
        )
        .await
        .expect("commit");
    assert_eq!(effects(&s.db), 3);
    let cp = s.store.load(&s.name).await.expect("load").expect("row");
    assert_eq!((cp.position, cp.epoch), (3, claimed.epoch));
    guard.verify().await.expect("still leading");

    // A newer claim fences this epoch off: the effects roll back with it.
    let newer = s.store.claim(&s.name).await.expect("newer claim");
    let refused = s
        .store
        .fenced_checkpoint(
            guard.leader_session().expect("session"),
            &s.key,
            &s.name,
            claimed.epoch,
            4,
            |tx| write_effects(tx, 3, 1, 1),
        )
        .await;
    match refused {
        Err(FencedError::Checkpoint(CheckpointError::FencedOff { ours, current, .. })) => {
            assert_eq!((ours, current), (claimed.epoch, newer.epoch));
        }
        other => panic!("expected FencedOff, got {other:?}"),
    }
    assert_eq!(effects(&s.db), 3, "the fenced-off effect rolled back");
    guard
        .verify()
        .await
        .expect("a refused save leaves the session sound");

    // A key the session does not hold cannot fence a commit.
    let other = LockKey::new("not-held").expect("key");
    let not_held = s
        .store
        .fenced(guard.leader_session().expect("session"), &other, |tx| {
            write_effects(tx, 3, 1, 1)
        })
        .await;
    assert!(
        matches!(not_held, Err(FencedError::SessionLost(_))),
        "{not_held:?}"
    );
    assert_eq!(effects(&s.db), 3);
    guard.release().await.expect("release");
}

/// The leader's session is ended mid-batch (its liveness file removed, as
/// `Harness::terminate` does), after it wrote its effects and the
/// checkpoint in the transaction but before the commit: the commit is
/// refused with `SessionLost`, nothing is committed, and a follower takes
/// over and commits. Even rounds commit at once (the worker has not noticed
/// yet: the pin's own check refuses), odd ones after the loss signal fired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminated_leader_cannot_commit_its_fenced_transaction() {
    const ROUNDS: i64 = 6;
    let s = setup("kill").await;
    let mut stale = 0;
    let mut position = 0;
    for round in 0..ROUNDS {
        let leader_no = round + 1;
        let mut guard = lead(&s, &format!("leader-{round}")).await;
        let lost = guard.lost();
        let claimed = s.store.claim(&s.name).await.expect("claim");
        assert_eq!(claimed.position, position);
        let before = effects(&s.db);
        let liveness = guard
            .session()
            .expect("session")
            .liveness_file()
            .to_path_buf();
        let wait_for_loss = round % 2 == 1;
        let (name, epoch) = (s.name.clone(), claimed.epoch);
        let refused = s
            .store
            .fenced(
                guard.leader_session().expect("session"),
                &s.key,
                move |tx| {
                    write_effects(tx, position, 3, leader_no)?;
                    SqliteCheckpoints::save_in(tx, &name, epoch, position + 3)?;
                    // Mid-batch: the session is ended from outside.
                    std::fs::remove_file(&liveness).expect("remove the liveness file");
                    if wait_for_loss {
                        let started = Instant::now();
                        while !lost.is_cancelled() {
                            assert!(started.elapsed() < Duration::from_secs(5), "loss signal");
                            std::thread::sleep(Duration::from_millis(5));
                        }
                    }
                    Ok(())
                },
            )
            .await;
        assert!(
            matches!(&refused, Err(e) if e.is_session_lost()),
            "round {round}: {refused:?}"
        );
        drop(guard);
        stale += effects(&s.db) - before;
        let cp = s.store.load(&s.name).await.expect("load").expect("row");
        assert_eq!(
            (cp.position, cp.epoch),
            (position, claimed.epoch),
            "round {round}: the checkpoint did not move"
        );

        // A follower takes over and commits the same batch.
        let mut follower = lead(&s, "follower").await;
        let next = s.store.claim(&s.name).await.expect("follower claims");
        assert_eq!(next.position, position);
        s.store
            .fenced_checkpoint(
                follower.leader_session().expect("session"),
                &s.key,
                &s.name,
                next.epoch,
                position + 3,
                move |tx| write_effects(tx, position, 3, -leader_no),
            )
            .await
            .expect("the follower commits");
        position += 3;
        follower.release().await.expect("release");
    }
    let by_terminated: i64 = Connection::open(&s.db)
        .and_then(|c| {
            c.query_row("SELECT count(*) FROM effects WHERE leader > 0", [], |r| {
                r.get(0)
            })
        })
        .expect("count");
    println!(
        "sqlite fenced transactions: {ROUNDS} leaders terminated mid-batch, stale effects \
         committed: {stale} (rows by terminated leaders: {by_terminated})"
    );
    assert_eq!(stale, 0, "no stale effect committed");
    assert_eq!(by_terminated, 0);
    assert_eq!(effects(&s.db), ROUNDS * 3);
}

/// The liveness file is removed at a random moment around the commit, from
/// another thread: whichever way the race goes, effects and checkpoint
/// commit together, and the follower's claim sees every committed effect
/// (no effect lands after the successor took over).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn termination_racing_the_commit_never_leaves_an_uncovered_effect() {
    const ROUNDS: i64 = 20;
    let s = setup("race").await;
    let (mut committed, mut refused) = (0, 0);
    for round in 0..ROUNDS {
        let mut guard = lead(&s, &format!("leader-{round}")).await;
        let claimed = s.store.claim(&s.name).await.expect("claim");
        let position = claimed.position;
        let liveness = guard
            .session()
            .expect("session")
            .liveness_file()
            .to_path_buf();
        let delay = Duration::from_micros(fastish(round) % 800);
        let killer = std::thread::spawn(move || {
            std::thread::sleep(delay);
            let _ = std::fs::remove_file(&liveness);
        });
        let outcome = s
            .store
            .fenced_checkpoint(
                guard.leader_session().expect("session"),
                &s.key,
                &s.name,
                claimed.epoch,
                position + 2,
                move |tx| write_effects(tx, position, 2, round + 1),
            )
            .await;
        match outcome {
            Ok(()) => committed += 1,
            Err(e) if e.is_session_lost() => refused += 1,
            Err(e) => panic!("round {round}: {e:?}"),
        }
        killer.join().expect("killer");
        drop(guard);
        // The successor: its claim must cover every committed effect.
        let _follower = lead(&s, "follower").await;
        let next = s.store.claim(&s.name).await.expect("claim");
        assert_eq!(
            next.position,
            effects(&s.db),
            "round {round}: an effect committed without its checkpoint"
        );
    }
    println!(
        "sqlite fenced commits racing termination: {committed} committed before the lock was \
         freed, {refused} refused, 0 uncovered effects"
    );
}

/// A cheap spread of delays without a random-number dependency.
fn fastish(round: i64) -> u64 {
    (round as u64).wrapping_mul(2_654_435_761) >> 7
}
