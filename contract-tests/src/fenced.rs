//! Session-fenced transactions (issue 14), for drivers that open a
//! transaction on the connection holding a session's locks (Postgres'
//! `PgSession::transaction`, MySQL's `MySqlSession::transaction`): the
//! projection's writes and its checkpoint commit together there, so a
//! leader whose connection was ended cannot commit a stale effect (eventcore
//! 2.1's `leadership_loss_fencing_contract`: "stale effect must not
//! commit").
//!
//! A driver's test implements [`FencedHarness`] (its transaction type, its
//! effects table, how to end a connection from the server's side) and calls
//! the `fenced_*` scenarios.

use std::future::Future;
use std::time::{Duration, Instant};

use shardlock_core::{
    acquire_leadership, projection_leadership_key, CheckpointError, CheckpointStore, Driver,
    DriverLeadership, Error, FencedError, LeadershipGuard, NodeId, ProjectorCoordinator,
};

use crate::harness::{unique_name, Harness, SessionOf};

/// What the fenced-transaction scenarios need from a driver beyond
/// [`Harness`]: its transaction type and the few statements that differ
/// between servers. Effects tables have two columns, `position` (primary
/// key) and `leader` (the writer's number: positive for a leader that is
/// then ended, negative for the follower that takes over).
pub trait FencedHarness: Harness {
    /// The driver's fenced transaction on the session's connection.
    type Tx<'s>: Send;
    /// The driver's checkpoint store.
    type Checkpoints: CheckpointStore;

    /// A checkpoint store in the harness's database.
    fn checkpoints(&self) -> impl Future<Output = Self::Checkpoints> + Send;

    /// Creates a fresh, transactional effects table named `table`.
    fn create_effects(&self, table: &str) -> impl Future<Output = ()> + Send;

    /// Committed rows of `table`, from a fresh connection; only the rows of
    /// ended leaders (`leader > 0`) when `by_leaders`.
    fn count_effects(&self, table: &str, by_leaders: bool) -> impl Future<Output = i64> + Send;

    /// Opens the session's fenced transaction.
    fn transaction(
        session: &mut SessionOf<Self>,
    ) -> impl Future<Output = Result<Self::Tx<'_>, Error>> + Send;

    /// The server's id of the session's connection (backend pid,
    /// `CONNECTION_ID()`), as the session reports it.
    fn session_connection(session: &SessionOf<Self>) -> u64;

    /// The server's id of the transaction's connection, as the transaction
    /// reports it.
    fn tx_connection(tx: &Self::Tx<'_>) -> u64;

    /// The server's id of the connection, asked with a statement inside the
    /// transaction.
    fn connection_in(tx: &mut Self::Tx<'_>) -> impl Future<Output = u64> + Send;

    /// Inserts the effect row `(position, leader)` into `table`.
    fn write_effect(
        tx: &mut Self::Tx<'_>,
        table: &str,
        position: i64,
        leader: i32,
    ) -> impl Future<Output = ()> + Send;

    /// The store's `save_in`: the checkpoint written inside the transaction.
    fn save_in(
        tx: &mut Self::Tx<'_>,
        subscription: &str,
        epoch: i64,
        position: i64,
    ) -> impl Future<Output = Result<(), CheckpointError>> + Send;

    /// The transaction's `commit`.
    fn commit(tx: Self::Tx<'_>) -> impl Future<Output = Result<(), Error>> + Send;

    /// The transaction's `commit_checkpoint`.
    fn commit_checkpoint(
        tx: Self::Tx<'_>,
        subscription: &str,
        epoch: i64,
        position: i64,
    ) -> impl Future<Output = Result<(), FencedError>> + Send;

    /// The transaction's `rollback`.
    fn rollback(tx: Self::Tx<'_>) -> impl Future<Output = Result<(), Error>> + Send;

    /// Ends connection `id` from another connection, as an operator would
    /// (`pg_terminate_backend`, `KILL CONNECTION`), mid-transaction.
    fn end_connection(&self, id: u64) -> impl Future<Output = ()> + Send;

    /// Whether the session's loss signal fires while a fenced transaction
    /// holds its connection idle: yes for a driver that watches the session
    /// from a second connection (the default); no for one that reads the
    /// session's own connection between calls (Postgres), whose transaction
    /// learns of the end at its next statement or commit, which then fails:
    /// fencing holds either way.
    fn loss_signal_during_transaction(&self) -> bool {
        true
    }

    /// The session's round trips as the positive path counts them (BEGIN
    /// and COMMIT, statements through the transaction not included); the
    /// default is [`Harness::round_trips`]. `None` skips the check, for a
    /// driver that sends the transaction's statements through the session
    /// and counts each (SQL Server).
    fn fenced_round_trips(&self, session: &SessionOf<Self>) -> Option<u64> {
        self.round_trips(session)
    }

    /// Whether the server still lists connection `id`; `None` (the default)
    /// when the harness cannot look.
    fn connection_listed(&self, id: u64) -> impl Future<Output = Option<bool>> + Send {
        let _ = id;
        async { None }
    }
}

/// A fresh effects table and subscription name, with a checkpoint store.
async fn setup<H: FencedHarness>(h: &H, what: &str) -> (String, String, H::Checkpoints) {
    let name = unique_name(what);
    let table = format!("fx_{}", name.replace('-', "_").to_lowercase());
    h.create_effects(&table).await;
    (name, table, h.checkpoints().await)
}

async fn lead<H: Harness>(h: &H, projector: &str, node: &str) -> LeadershipGuard<SessionOf<H>> {
    let key = projection_leadership_key(projector).expect("key");
    acquire_leadership(&h.driver(), &h.database(), &NodeId::new(node), key)
        .await
        .expect("leadership")
}

async fn begin<H: FencedHarness>(guard: &mut LeadershipGuard<SessionOf<H>>) -> H::Tx<'_> {
    let session = guard.leader_session().expect("session");
    H::transaction(session).await.expect("begin")
}

fn assert_session_lost(result: &Result<(), Error>) {
    match result {
        Err(Error::SessionLost { .. }) => {}
        other => panic!("expected SessionLost, got {other:?}"),
    }
}

/// The positive path: effects and checkpoint commit together on the
/// leader's own connection (BEGIN and COMMIT are the session's round trips);
/// a fenced-off or unclaimed save rolls the effects back; a dropped
/// transaction and an explicit rollback roll back; `save_in` + `commit`
/// commits both; the session stays usable throughout.
pub async fn fenced_commits_atomically<H: FencedHarness>(h: &H) {
    let (name, table, store) = setup(h, "fenced-ok").await;
    let mut guard = lead(h, &name, "leader").await;
    let claimed = store.claim(&name).await.expect("claim");

    let session = guard.leader_session().expect("session");
    let id = H::session_connection(session);
    let before = h.fenced_round_trips(session);
    let mut tx = H::transaction(session).await.expect("begin");
    assert_eq!(H::tx_connection(&tx), id, "the lock-holding connection");
    assert_eq!(
        H::connection_in(&mut tx).await,
        id,
        "the transaction runs on the lock's connection"
    );
    for p in 1..=3 {
        H::write_effect(&mut tx, &table, p, 1).await;
    }
    assert_eq!(
        h.count_effects(&table, false).await,
        0,
        "nothing visible before commit"
    );
    H::commit_checkpoint(tx, &name, claimed.epoch, 3)
        .await
        .expect("commit");
    assert_eq!(h.count_effects(&table, false).await, 3);
    let cp = store.load(&name).await.expect("load").expect("row");
    assert_eq!((cp.position, cp.epoch), (3, claimed.epoch));
    let after = h.fenced_round_trips(guard.leader_session().expect("session"));
    if let (Some(before), Some(after)) = (before, after) {
        assert_eq!(
            after - before,
            2,
            "BEGIN and COMMIT count on the session (statements through the transaction do not)"
        );
    }

    // The session is still the leader's and still usable for locks.
    guard.verify().await.expect("still leading");

    // A newer claim fences this epoch off: the effects roll back with it.
    let newer = store.claim(&name).await.expect("newer claim");
    let mut tx = begin::<H>(&mut guard).await;
    H::write_effect(&mut tx, &table, 4, 1).await;
    match H::commit_checkpoint(tx, &name, claimed.epoch, 4).await {
        Err(FencedError::Checkpoint(CheckpointError::FencedOff { ours, current, .. })) => {
            assert_eq!((ours, current), (claimed.epoch, newer.epoch));
        }
        other => panic!("expected FencedOff, got {other:?}"),
    }
    assert_eq!(
        h.count_effects(&table, false).await,
        3,
        "the fenced-off effect rolled back"
    );
    guard
        .verify()
        .await
        .expect("a refused save leaves the session sound");

    // A save that was never claimed is refused the same way.
    let mut tx = begin::<H>(&mut guard).await;
    H::write_effect(&mut tx, &table, 5, 1).await;
    match H::commit_checkpoint(tx, &unique_name("never-claimed"), 1, 5).await {
        Err(FencedError::Checkpoint(CheckpointError::NotClaimed { .. })) => {}
        other => panic!("expected NotClaimed, got {other:?}"),
    }
    assert_eq!(
        h.count_effects(&table, false).await,
        3,
        "the unclaimed save rolled back"
    );

    // A transaction dropped without commit is rolled back.
    {
        let mut tx = begin::<H>(&mut guard).await;
        H::write_effect(&mut tx, &table, 6, 1).await;
    }
    guard
        .verify()
        .await
        .expect("the session sends the rollback");
    assert_eq!(
        h.count_effects(&table, false).await,
        3,
        "the dropped transaction rolled back"
    );

    // An explicit rollback, then a plain commit with the checkpoint saved
    // through save_in.
    let mut tx = begin::<H>(&mut guard).await;
    H::write_effect(&mut tx, &table, 7, 1).await;
    H::rollback(tx).await.expect("rollback");
    assert_eq!(h.count_effects(&table, false).await, 3, "rolled back");
    let mut tx = begin::<H>(&mut guard).await;
    H::write_effect(&mut tx, &table, 4, 1).await;
    H::save_in(&mut tx, &name, newer.epoch, 4)
        .await
        .expect("save in the transaction");
    H::commit(tx).await.expect("commit");
    assert_eq!(h.count_effects(&table, false).await, 4);
    let cp = store.load(&name).await.expect("load").expect("row");
    assert_eq!((cp.position, cp.epoch), (4, newer.epoch));
    guard.release().await.expect("release");
}

/// The leader's connection is ended from the server's side mid-batch, after
/// it wrote its effects and the checkpoint but before it committed: the
/// commit fails with `SessionLost`, nothing is committed, and a follower
/// takes over, resumes from the last committed checkpoint and commits.
/// Repeated, alternately committing at once after the end and after the
/// loss signal fired (then the commit is refused before it is sent; for
/// drivers whose signal fires during a transaction, see
/// [`FencedHarness::loss_signal_during_transaction`]); the total of stale
/// effects must be 0.
pub async fn fenced_leader_ended_mid_batch<H: FencedHarness>(h: &H) {
    const ROUNDS: i64 = 6;
    let (name, table, store) = setup(h, "fenced-kill").await;
    let mut stale = 0;
    let mut position = 0;
    for round in 0..ROUNDS {
        let leader_no = i32::try_from(round + 1).expect("few rounds");
        let mut guard = lead(h, &name, &format!("leader-{round}")).await;
        let lost = guard.lost();
        let claimed = store.claim(&name).await.expect("claim");
        assert_eq!(
            claimed.position, position,
            "resumes where the last commit left off"
        );
        let before = h.count_effects(&table, false).await;

        let mut tx = begin::<H>(&mut guard).await;
        for p in 1..=3 {
            H::write_effect(&mut tx, &table, position + p, leader_no).await;
        }
        H::save_in(&mut tx, &name, claimed.epoch, position + 3)
            .await
            .expect("save in the transaction");

        // Mid-batch: end the leader's connection from another connection.
        let id = H::tx_connection(&tx);
        h.end_connection(id).await;
        if round % 2 == 1 && h.loss_signal_during_transaction() {
            // Let the watcher see it: the commit is refused before it is
            // sent.
            tokio::time::timeout(Duration::from_secs(5), lost.cancelled())
                .await
                .expect("the loss signal fires");
        }
        let committed = H::commit(tx).await;
        assert_session_lost(&committed);
        assert!(
            lost.is_cancelled(),
            "round {round}: a commit that failed for a lost session leaves the guard lost"
        );
        drop(guard);

        let after = h.count_effects(&table, false).await;
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
        if let Some(listed) = h.connection_listed(id).await {
            assert!(
                !listed,
                "round {round}: the follower got the lock only after connection {id} ended"
            );
        }
        let next = store.claim(&name).await.expect("follower claims");
        assert_eq!(next.position, position, "resumes from the last commit");
        assert!(next.epoch > claimed.epoch);
        let mut tx = begin::<H>(&mut follower).await;
        for p in 1..=3 {
            H::write_effect(&mut tx, &table, position + p, -leader_no).await;
        }
        H::commit_checkpoint(tx, &name, next.epoch, position + 3)
            .await
            .expect("the follower commits");
        position += 3;
        coordinator.step_down(follower).await;
    }
    // Every effect row is a follower's (negative leader), none the ended
    // leaders'.
    let by_ended = h.count_effects(&table, true).await;
    println!(
        "fenced transactions ({}): {ROUNDS} leaders ended mid-batch, stale effects committed: \
         {stale} (rows by ended leaders: {by_ended})",
        h.driver().name()
    );
    assert_eq!(stale, 0, "no stale effect committed");
    assert_eq!(by_ended, 0);
    assert_eq!(h.count_effects(&table, false).await, ROUNDS * 3);
    let cp = store.load(&name).await.expect("load").expect("row");
    assert_eq!(cp.position, ROUNDS * 3);
}

/// A guard whose session was lost answers `SessionLost` before any
/// transaction is opened, and the session itself refuses `transaction()`
/// without sending anything.
pub async fn fenced_lost_leader_gets_no_transaction<H: FencedHarness>(h: &H) {
    let name = unique_name("fenced-lost");
    let mut guard = lead(h, &name, "leader").await;
    let lost = guard.lost();
    h.terminate(guard.session().expect("session")).await;
    tokio::time::timeout(Duration::from_secs(5), lost.cancelled())
        .await
        .expect("the loss signal fires");
    match guard.leader_session() {
        Err(Error::SessionLost { .. }) => {}
        Err(other) => panic!("expected SessionLost, got {other:?}"),
        Ok(_) => panic!("expected SessionLost, got the session"),
    }
    // The guard refuses; the session itself refuses too, sending nothing.
    let session = guard.session_mut().expect("session");
    let sent = h.round_trips(session);
    match H::transaction(session).await {
        Err(Error::SessionLost { .. }) => {}
        Err(other) => panic!("expected SessionLost, got {other:?}"),
        Ok(_) => panic!("expected SessionLost, got a transaction"),
    }
    assert_eq!(h.round_trips(session), sent, "no BEGIN was sent");
}
