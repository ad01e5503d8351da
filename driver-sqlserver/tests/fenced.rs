//! Session-fenced transactions on SQL Server (issue 14 item 4, issue 16):
//! the projection's writes and its checkpoint commit in one transaction on
//! the connection whose server session owns the leadership lock, so a
//! leader whose session was `KILL`ed cannot commit a stale effect. Same
//! gate as the contract suite (`SHARDLOCK_MSSQL_URL`, a local
//! `SHARDLOCK_MSSQL_IMAGE`, or a loud `SKIPPED` line): see `common/mod.rs`.

mod common;

use std::time::{Duration, Instant};

use shardlock_contract_tests::{unique_name, Harness};
use shardlock_core::{
    acquire_leadership, projection_leadership_key, CheckpointError, CheckpointStore,
    DriverLeadership, Error, FencedError, LeadershipGuard, NodeId, ProjectorCoordinator,
};
use shardlock_sqlserver::{MssqlCheckpoints, MssqlSession, MssqlTransaction};

/// A fresh effects table and subscription name, and the store.
async fn setup(h: &common::MssqlHarness, what: &str) -> (String, String, MssqlCheckpoints) {
    let name = unique_name(what);
    // A generated name (letters, digits, underscores), never user input.
    let table = format!("fx_{}", name.replace('-', "_").to_lowercase());
    let mut side = h.raw(h.database().as_str()).await;
    side.simple_query(format!(
        "CREATE TABLE {table} (position bigint PRIMARY KEY, leader int NOT NULL)"
    ))
    .await
    .expect("effects table")
    .into_results()
    .await
    .expect("created");
    let _ = side.close().await;
    let store = MssqlCheckpoints::connect(h.options(), &h.database())
        .await
        .expect("checkpoint store");
    (name, table, store)
}

/// Effect rows (optionally only `where`), counted from a fresh connection.
async fn effects(h: &common::MssqlHarness, table: &str, filter: &str) -> i64 {
    let mut side = h.raw(h.database().as_str()).await;
    let n: Option<i64> = side
        .simple_query(format!("SELECT COUNT_BIG(*) FROM {table} {filter}"))
        .await
        .expect("count effects")
        .into_row()
        .await
        .expect("row")
        .and_then(|row| row.get(0));
    let _ = side.close().await;
    n.unwrap_or(0)
}

async fn write_effect(tx: &mut MssqlTransaction<'_>, table: &str, position: i64, leader: i32) {
    let inserted = tx
        .execute(
            &format!("INSERT INTO {table} (position, leader) VALUES (@P1, @P2)"),
            &[&position, &leader],
        )
        .await
        .expect("effect row");
    assert_eq!(inserted, 1);
}

async fn lead(
    h: &common::MssqlHarness,
    projector: &str,
    node: &str,
) -> LeadershipGuard<MssqlSession> {
    let key = projection_leadership_key(projector).expect("key");
    acquire_leadership(&h.driver(), &h.database(), &NodeId::new(node), key)
        .await
        .expect("leadership")
}

/// `KILL`s `spid` from another connection.
async fn kill(h: &common::MssqlHarness, spid: i32) {
    let mut side = h.raw("master").await;
    // KILL takes no variables; the spid is an integer the server gave us.
    side.simple_query(format!("KILL {spid}"))
        .await
        .expect("KILL")
        .into_results()
        .await
        .expect("killed");
    let _ = side.close().await;
}

/// The positive path: effects and checkpoint commit together on the
/// leader's own connection; a fenced-off save rolls the effects back; a
/// dropped transaction is rolled back; the session keeps its lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fenced_transaction_commits_effects_and_checkpoint_atomically() {
    let Some(h) = common::harness().await else {
        return;
    };
    let (name, table, store) = setup(&h, "fenced-ok").await;
    let mut guard = lead(&h, &name, "leader").await;
    let claimed = store.claim(&name).await.expect("claim");

    let session = guard.leader_session().expect("session");
    let spid = session.spid();
    let mut tx = session.transaction().await.expect("begin");
    assert_eq!(tx.spid(), spid, "the lock-holding session");
    let in_tx: Option<i16> = tx
        .query("SELECT CAST(@@SPID AS smallint)", &[])
        .await
        .expect("spid")
        .first()
        .and_then(|row| row.get(0));
    assert_eq!(
        in_tx.map(i32::from),
        Some(spid),
        "the transaction runs on the lock's session"
    );
    for p in 1..=3 {
        write_effect(&mut tx, &table, p, 1).await;
    }
    tx.commit_checkpoint(&name, claimed.epoch, 3)
        .await
        .expect("commit");
    assert_eq!(effects(&h, &table, "").await, 3);
    let cp = store.load(&name).await.expect("load").expect("row");
    assert_eq!((cp.position, cp.epoch), (3, claimed.epoch));
    guard.verify().await.expect("still leading");

    // A newer claim fences this epoch off: the effects roll back with it.
    let newer = store.claim(&name).await.expect("newer claim");
    let mut tx = guard
        .leader_session()
        .expect("session")
        .transaction()
        .await
        .expect("begin");
    write_effect(&mut tx, &table, 4, 1).await;
    match tx.commit_checkpoint(&name, claimed.epoch, 4).await {
        Err(FencedError::Checkpoint(CheckpointError::FencedOff { ours, current, .. })) => {
            assert_eq!((ours, current), (claimed.epoch, newer.epoch));
        }
        other => panic!("expected FencedOff, got {other:?}"),
    }
    assert_eq!(
        effects(&h, &table, "").await,
        3,
        "the fenced-off effect rolled back"
    );
    guard
        .verify()
        .await
        .expect("a refused save leaves the session sound");

    // A failing statement rolls the whole transaction back (XACT_ABORT ON):
    // the commit is refused, nothing of it is committed.
    let mut tx = guard
        .leader_session()
        .expect("session")
        .transaction()
        .await
        .expect("begin");
    write_effect(&mut tx, &table, 5, 1).await;
    let duplicate = tx
        .execute(
            &format!("INSERT INTO {table} (position, leader) VALUES (@P1, @P2)"),
            &[&1i64, &1i32],
        )
        .await;
    assert!(duplicate.is_err(), "a duplicate key fails");
    match tx.commit_checkpoint(&name, newer.epoch, 5).await {
        Err(e) if !e.is_session_lost() => {}
        other => panic!("a failed statement makes the commit fail: {other:?}"),
    }
    assert_eq!(effects(&h, &table, "").await, 3, "nothing of it committed");

    // A transaction dropped without commit is rolled back.
    {
        let mut tx = guard
            .leader_session()
            .expect("session")
            .transaction()
            .await
            .expect("begin");
        write_effect(&mut tx, &table, 6, 1).await;
    }
    guard
        .verify()
        .await
        .expect("the session sends the rollback first");
    assert_eq!(
        effects(&h, &table, "").await,
        3,
        "the dropped transaction rolled back"
    );
    guard.release().await.expect("release");
}

/// The leader's session is `KILL`ed mid-batch, after it wrote its effects
/// and the checkpoint but before it committed: the commit fails with
/// `SessionLost`, nothing is committed (KILL rolled the transaction back
/// before the session, and its locks, ended), and a follower takes over
/// and commits. Repeated, once committing at once and once after the loss
/// signal fired; the total of stale effects must be 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_leader_cannot_commit_its_fenced_transaction() {
    let Some(h) = common::harness().await else {
        return;
    };
    const ROUNDS: i64 = 6;
    let (name, table, store) = setup(&h, "fenced-kill").await;
    let mut stale = 0;
    let mut position = 0;
    for round in 0..ROUNDS {
        let leader_no = round as i32 + 1;
        let mut guard = lead(&h, &name, &format!("leader-{round}")).await;
        let lost = guard.lost();
        let claimed = store.claim(&name).await.expect("claim");
        assert_eq!(
            claimed.position, position,
            "resumes where the last commit left off"
        );
        let before = effects(&h, &table, "").await;

        let session = guard.leader_session().expect("session");
        let mut tx = session.transaction().await.expect("begin");
        for p in 1..=3 {
            write_effect(&mut tx, &table, position + p, leader_no).await;
        }
        MssqlCheckpoints::save_in(&mut tx, &name, claimed.epoch, position + 3)
            .await
            .expect("save in the transaction");

        // Mid-batch: KILL the leader's session from another connection.
        kill(&h, tx.spid()).await;
        if round % 2 == 1 {
            // Let the driver see it: the commit is refused before it is sent.
            tokio::time::timeout(Duration::from_secs(5), lost.cancelled())
                .await
                .expect("the loss signal fires");
        }
        match tx.commit().await {
            Err(Error::SessionLost { .. }) => {}
            other => panic!("round {round}: expected SessionLost, got {other:?}"),
        }
        drop(guard);

        // Counting waits for the killed session's rollback (its row locks)
        // under READ COMMITTED, or reads the last committed rows under RCSI.
        let after = effects(&h, &table, "").await;
        stale += after - before;
        let cp = store.load(&name).await.expect("load").expect("row");
        assert_eq!(
            (cp.position, cp.epoch),
            (position, claimed.epoch),
            "round {round}: the checkpoint did not move"
        );

        // A follower takes over and commits the same batch.
        let started = Instant::now();
        let coordinator = DriverLeadership::new(h.driver(), h.database(), NodeId::new("follower"));
        let mut follower = loop {
            if let Some(guard) = coordinator.try_lead(&name).await.expect("try_lead") {
                break guard;
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "the follower takes over"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let next = store.claim(&name).await.expect("follower claims");
        assert_eq!(next.position, position);
        let mut tx = follower
            .leader_session()
            .expect("session")
            .transaction()
            .await
            .expect("begin");
        for p in 1..=3 {
            write_effect(&mut tx, &table, position + p, -leader_no).await;
        }
        tx.commit_checkpoint(&name, next.epoch, position + 3)
            .await
            .expect("the follower commits");
        position += 3;
        coordinator.step_down(follower).await;
    }
    // Every effect row is a follower's (negative leader), none a killed
    // leader's.
    let by_killed = effects(&h, &table, "WHERE leader > 0").await;
    println!(
        "fenced transactions (SQL Server): {ROUNDS} leaders killed mid-batch, stale effects committed: \
         {stale} (rows by killed leaders: {by_killed})"
    );
    assert_eq!(stale, 0, "no stale effect committed");
    assert_eq!(by_killed, 0);
    assert_eq!(effects(&h, &table, "").await, ROUNDS * 3);
    let cp = store.load(&name).await.expect("load").expect("row");
    assert_eq!(cp.position, ROUNDS * 3);
}

/// A guard whose session was lost answers `SessionLost` before any
/// transaction is opened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_leader_gets_no_transaction() {
    let Some(h) = common::harness().await else {
        return;
    };
    let name = unique_name("fenced-lost");
    let mut guard = lead(&h, &name, "leader").await;
    let lost = guard.lost();
    h.terminate(guard.session().expect("session")).await;
    tokio::time::timeout(Duration::from_secs(5), lost.cancelled())
        .await
        .expect("the loss signal fires");
    match guard.leader_session() {
        Err(Error::SessionLost { .. }) => {}
        other => panic!("expected SessionLost, got {other:?}"),
    }
}
