//! Session-fenced transactions on MySQL/MariaDB (issue 14): the
//! projection's writes and its checkpoint commit in one transaction on the
//! connection that holds the leadership lock (`GET_LOCK`), so a leader whose
//! connection was killed cannot commit a stale effect (eventcore 2.1's
//! `leadership_loss_fencing_contract`: "stale effect must not commit"). The
//! server rolls a killed connection's transaction back before it frees its
//! named locks (`THD::cleanup`); these tests check the outcome.

mod common;

use std::time::{Duration, Instant};

use shardlock_contract_tests::{unique_name, Harness};
use shardlock_core::{
    acquire_leadership, projection_leadership_key, CheckpointError, CheckpointStore,
    DriverLeadership, Error, FencedError, LeadershipGuard, NodeId, ProjectorCoordinator,
};
use shardlock_mysql::sqlx::{self, Connection};
use shardlock_mysql::{MySqlCheckpoints, MySqlSession, MySqlTransaction};

/// A fresh InnoDB effects table and subscription name.
async fn setup(h: &common::MySqlHarness, what: &str) -> (String, String, MySqlCheckpoints) {
    let name = unique_name(what);
    let table = format!("fx_{}", name.replace('-', "_").to_lowercase());
    let mut conn = h.raw().await;
    sqlx::query(&format!(
        "CREATE TABLE {table} (position BIGINT PRIMARY KEY, leader INT NOT NULL) ENGINE = InnoDB"
    ))
    .execute(&mut conn)
    .await
    .expect("effects table");
    let _ = conn.close().await;
    let store = MySqlCheckpoints::connect(h.options(), &h.database())
        .await
        .expect("checkpoint store");
    (name, table, store)
}

/// Effect rows, counted from a fresh connection (committed rows only).
async fn effects(h: &common::MySqlHarness, table: &str) -> i64 {
    let mut conn = h.raw().await;
    let n = sqlx::query_scalar(&format!("SELECT COUNT(*) FROM {table}"))
        .fetch_one(&mut conn)
        .await
        .expect("count effects");
    let _ = conn.close().await;
    n
}

async fn write_effect(tx: &mut MySqlTransaction<'_>, table: &str, position: i64, leader: i32) {
    sqlx::query(&format!("INSERT INTO {table} VALUES (?, ?)"))
        .bind(position)
        .bind(leader)
        .execute(&mut **tx)
        .await
        .expect("effect row");
}

async fn lead(
    h: &common::MySqlHarness,
    projector: &str,
    node: &str,
) -> LeadershipGuard<MySqlSession> {
    let key = projection_leadership_key(projector).expect("key");
    acquire_leadership(&h.driver(), &h.database(), &NodeId::new(node), key)
        .await
        .expect("leadership")
}

fn assert_session_lost(result: &Result<(), Error>) {
    match result {
        Err(Error::SessionLost { .. }) => {}
        other => panic!("expected SessionLost, got {other:?}"),
    }
}

/// Whether the server still lists connection `id`.
async fn connection_listed(h: &common::MySqlHarness, id: u64) -> bool {
    let mut conn = h.raw().await;
    let n: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE ID = ?")
            .bind(id)
            .fetch_one(&mut conn)
            .await
            .expect("processlist");
    let _ = conn.close().await;
    n > 0
}

/// The positive path: effects and checkpoint commit together on the
/// leader's own connection; a fenced-off save rolls the effects back; a
/// dropped transaction rolls back; the session stays usable throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fenced_transaction_commits_effects_and_checkpoint_atomically() {
    let Some(h) = common::harness().await else {
        return;
    };
    let (name, table, store) = setup(&h, "fenced-ok").await;
    let mut guard = lead(&h, &name, "leader").await;
    let claimed = store.claim(&name).await.expect("claim");

    let session = guard.leader_session().expect("session");
    let id = session.connection_id();
    let before = session.round_trips();
    let mut tx = session.transaction().await.expect("begin");
    assert_eq!(tx.connection_id(), id, "the lock-holding connection");
    let in_tx: u64 = sqlx::query_scalar("SELECT CONNECTION_ID()")
        .fetch_one(&mut *tx)
        .await
        .expect("connection id");
    assert_eq!(in_tx, id, "the transaction runs on the lock's connection");
    for p in 1..=3 {
        write_effect(&mut tx, &table, p, 1).await;
    }
    assert_eq!(
        effects(&h, &table).await,
        0,
        "nothing visible before commit"
    );
    tx.commit_checkpoint(&name, claimed.epoch, 3)
        .await
        .expect("commit");
    assert_eq!(effects(&h, &table).await, 3);
    let cp = store.load(&name).await.expect("load").expect("row");
    assert_eq!((cp.position, cp.epoch), (3, claimed.epoch));
    let session = guard.leader_session().expect("session");
    assert_eq!(
        session.round_trips() - before,
        2,
        "BEGIN and COMMIT count on the session (statements through the transaction do not)"
    );

    // The session is still the leader's and still usable for locks.
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
        effects(&h, &table).await,
        3,
        "the fenced-off effect rolled back"
    );
    guard
        .verify()
        .await
        .expect("a refused save leaves the session sound");

    // A save that was never claimed is refused the same way.
    let mut tx = guard
        .leader_session()
        .expect("session")
        .transaction()
        .await
        .expect("begin");
    write_effect(&mut tx, &table, 5, 1).await;
    match tx
        .commit_checkpoint(&unique_name("never-claimed"), 1, 5)
        .await
    {
        Err(FencedError::Checkpoint(CheckpointError::NotClaimed { .. })) => {}
        other => panic!("expected NotClaimed, got {other:?}"),
    }
    assert_eq!(
        effects(&h, &table).await,
        3,
        "the unclaimed save rolled back"
    );

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
        .expect("the session sends the rollback");
    assert_eq!(
        effects(&h, &table).await,
        3,
        "the dropped transaction rolled back"
    );

    // An explicit rollback, then a plain commit with the checkpoint saved
    // through save_in.
    let mut tx = guard
        .leader_session()
        .expect("session")
        .transaction()
        .await
        .expect("begin");
    write_effect(&mut tx, &table, 7, 1).await;
    tx.rollback().await.expect("rollback");
    assert_eq!(effects(&h, &table).await, 3, "rolled back");
    let mut tx = guard
        .leader_session()
        .expect("session")
        .transaction()
        .await
        .expect("begin");
    write_effect(&mut tx, &table, 4, 1).await;
    MySqlCheckpoints::save_in(&mut tx, &name, newer.epoch, 4)
        .await
        .expect("save in the transaction");
    tx.commit().await.expect("commit");
    assert_eq!(effects(&h, &table).await, 4);
    let cp = store.load(&name).await.expect("load").expect("row");
    assert_eq!((cp.position, cp.epoch), (4, newer.epoch));
    guard.release().await.expect("release");
}

/// The leader's connection is killed from the server side (`KILL
/// CONNECTION`) mid-batch, after it wrote its effects and the checkpoint
/// but before it committed: the commit fails with `SessionLost`, nothing is
/// committed, and a follower takes over, resumes from the last committed
/// checkpoint and commits. Repeated, alternately committing at once after
/// the kill and after the loss signal fired (then the commit is refused
/// before it is sent); the total of stale effects must be 0.
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
        let before = effects(&h, &table).await;

        let session = guard.leader_session().expect("session");
        let mut tx = session.transaction().await.expect("begin");
        for p in 1..=3 {
            write_effect(&mut tx, &table, position + p, leader_no).await;
        }
        MySqlCheckpoints::save_in(&mut tx, &name, claimed.epoch, position + 3)
            .await
            .expect("save in the transaction");

        // Mid-batch: end the leader's connection from another connection.
        let id = tx.connection_id();
        let mut side = h.raw().await;
        sqlx::query(&format!("KILL CONNECTION {id}"))
            .execute(&mut side)
            .await
            .expect("KILL CONNECTION");
        let _ = side.close().await;
        if round % 2 == 1 {
            // Let the watcher see it (the server freed the liveness lock,
            // i.e. it has rolled back): the commit is refused unsent.
            tokio::time::timeout(Duration::from_secs(5), lost.cancelled())
                .await
                .expect("the loss signal fires");
        }
        let committed = tx.commit().await;
        assert_session_lost(&committed);
        drop(guard);

        let after = effects(&h, &table).await;
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
        assert!(
            !connection_listed(&h, id).await,
            "round {round}: the follower got the lock only after connection {id} ended"
        );
        let next = store.claim(&name).await.expect("follower claims");
        assert_eq!(next.position, position, "resumes from the last commit");
        assert!(next.epoch > claimed.epoch);
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
    // Every effect row is a follower's (negative leader), none the killed
    // leaders'.
    let mut conn = h.raw().await;
    let by_killed: i64 =
        sqlx::query_scalar(&format!("SELECT COUNT(*) FROM {table} WHERE leader > 0"))
            .fetch_one(&mut conn)
            .await
            .expect("count");
    let _ = conn.close().await;
    println!(
        "fenced transactions (MySQL): {ROUNDS} leaders killed mid-batch, stale effects \
         committed: {stale} (rows by killed leaders: {by_killed})"
    );
    assert_eq!(stale, 0, "no stale effect committed");
    assert_eq!(by_killed, 0);
    assert_eq!(effects(&h, &table).await, ROUNDS * 3);
    let cp = store.load(&name).await.expect("load").expect("row");
    assert_eq!(cp.position, ROUNDS * 3);
}

/// A guard whose session was lost answers `SessionLost` before any
/// transaction is opened, and a session whose loss signal fired refuses
/// `transaction()` itself.
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

    // The session itself, outside a guard.
    let key = projection_leadership_key(&unique_name("fenced-lost-raw")).expect("key");
    let mut guard = acquire_leadership(&h.driver(), &h.database(), &NodeId::new("raw"), key)
        .await
        .expect("leadership");
    let lost = guard.lost();
    let session = guard.leader_session().expect("session");
    let id = session.connection_id();
    common::kill(h.url(), id).await;
    tokio::time::timeout(Duration::from_secs(5), lost.cancelled())
        .await
        .expect("the loss signal fires");
    // The guard refuses; the session itself refuses too, sending nothing.
    assert!(guard.leader_session().is_err());
    let session = guard.session_mut().expect("session");
    let sent = session.round_trips();
    match session.transaction().await {
        Err(Error::SessionLost { .. }) => {}
        other => panic!("expected SessionLost, got {other:?}"),
    }
    assert_eq!(session.round_trips(), sent, "no BEGIN was sent");
}
