//! Session-fenced transactions (issue 14, item 4): the projection's writes
//! and its checkpoint commit in one transaction on the connection that
//! holds the leadership lock, so a leader whose backend was terminated
//! cannot commit a stale effect (eventcore 2.1's
//! `leadership_loss_fencing_contract`: "stale effect must not commit").

mod common;

use std::time::{Duration, Instant};

use shardlock_contract_tests::{unique_name, Harness};
use shardlock_core::{
    acquire_leadership, projection_leadership_key, CheckpointError, CheckpointStore,
    DriverLeadership, Error, FencedError, LeadershipGuard, NodeId, ProjectorCoordinator,
};
use shardlock_postgres::sqlx::{self, Connection};
use shardlock_postgres::{PgCheckpoints, PgSession, PgTransaction};

/// A fresh effects table and subscription name.
async fn setup(h: &common::PgHarness, what: &str) -> (String, String, PgCheckpoints) {
    let name = unique_name(what);
    let table = format!("fx_{}", name.replace('-', "_").to_lowercase());
    let mut conn = h.raw().await;
    sqlx::query(&format!(
        "CREATE TABLE {table} (position bigint PRIMARY KEY, leader int NOT NULL)"
    ))
    .execute(&mut conn)
    .await
    .expect("effects table");
    let _ = conn.close().await;
    let store = PgCheckpoints::connect(h.options(), &h.database())
        .await
        .expect("checkpoint store");
    (name, table, store)
}

/// Effect rows, counted from a fresh connection.
async fn effects(h: &common::PgHarness, table: &str) -> i64 {
    let mut conn = h.raw().await;
    let n = sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
        .fetch_one(&mut conn)
        .await
        .expect("count effects");
    let _ = conn.close().await;
    n
}

async fn write_effect(tx: &mut PgTransaction<'_>, table: &str, position: i64, leader: i32) {
    sqlx::query(&format!("INSERT INTO {table} VALUES ($1, $2)"))
        .bind(position)
        .bind(leader)
        .execute(&mut **tx)
        .await
        .expect("effect row");
}

async fn lead(h: &common::PgHarness, projector: &str, node: &str) -> LeadershipGuard<PgSession> {
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

/// The positive path: effects and checkpoint commit together on the
/// leader's own connection; a fenced-off save rolls the effects back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fenced_transaction_commits_effects_and_checkpoint_atomically() {
    let Some(h) = common::harness().await else {
        return;
    };
    let (name, table, store) = setup(&h, "fenced-ok").await;
    let mut guard = lead(&h, &name, "leader").await;
    let claimed = store.claim(&name).await.expect("claim");

    let session = guard.leader_session().expect("session");
    let pid = session.backend_pid();
    let mut tx = session.transaction().await.expect("begin");
    assert_eq!(tx.backend_pid(), pid, "the lock-holding backend");
    let in_tx: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut *tx)
        .await
        .expect("pid");
    assert_eq!(in_tx, pid, "the transaction runs on the lock's connection");
    for p in 1..=3 {
        write_effect(&mut tx, &table, p, 1).await;
    }
    tx.commit_checkpoint(&name, claimed.epoch, 3)
        .await
        .expect("commit");
    assert_eq!(effects(&h, &table).await, 3);
    let cp = store.load(&name).await.expect("load").expect("row");
    assert_eq!((cp.position, cp.epoch), (3, claimed.epoch));

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
    // A transaction dropped without commit is rolled back.
    {
        let mut tx = guard
            .leader_session()
            .expect("session")
            .transaction()
            .await
            .expect("begin");
        write_effect(&mut tx, &table, 5, 1).await;
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
    guard.release().await.expect("release");
}

/// The leader's backend is terminated mid-batch, after it wrote its effects
/// and the checkpoint but before it committed: the commit fails with
/// `SessionLost`, nothing is committed, and a follower takes over and
/// commits. Repeated, once committing at once and once after the loss
/// signal fired; the total of stale effects must be 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminated_leader_cannot_commit_its_fenced_transaction() {
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
        PgCheckpoints::save_in(&mut tx, &name, claimed.epoch, position + 3)
            .await
            .expect("save in the transaction");

        // Mid-batch: end the leader's backend from another connection,
        // waiting (up to 5 s, PostgreSQL 14+) until it has exited.
        let pid = tx.backend_pid();
        let mut side = h.raw().await;
        let ended: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1, 5000)")
            .bind(pid)
            .fetch_one(&mut side)
            .await
            .expect("terminate");
        assert!(ended, "backend {pid} was running");
        let _ = side.close().await;
        if round % 2 == 1 {
            // Let the watcher see it: the commit is refused before it is sent.
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
    // Every effect row is the follower's (negative leader), none the
    // terminated leaders'.
    let mut conn = h.raw().await;
    let by_terminated: i64 =
        sqlx::query_scalar(&format!("SELECT count(*) FROM {table} WHERE leader > 0"))
            .fetch_one(&mut conn)
            .await
            .expect("count");
    let _ = conn.close().await;
    println!(
        "fenced transactions: {ROUNDS} leaders terminated mid-batch, stale effects committed: \
         {stale} (rows by terminated leaders: {by_terminated})"
    );
    assert_eq!(stale, 0, "no stale effect committed");
    assert_eq!(by_terminated, 0);
    assert_eq!(effects(&h, &table).await, ROUNDS * 3);
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
