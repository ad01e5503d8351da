//! The end-to-end scenarios shared by the SQL servers whose sessions hold
//! their locks on one connection (Postgres, MySQL/MariaDB): the server ends
//! the leader's connection mid-stream ([`failover`]), and mid-batch, before
//! a fenced transaction commits ([`fenced_batch`]).
//!
//! A driver's test file implements [`SqlServer`] (its types and the few
//! statements that differ between servers) and calls the scenarios.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use eventcore::ProjectionConfig;
use eventcore_memory::InMemoryEventStore;
use eventcore_types::{
    BatchSize, CheckpointStore as _, EventFilter, EventPage, EventReader as _, StreamPosition,
};
use shardlock_core::{
    CancellationToken, CheckpointError, CheckpointStore, DatabaseId, Driver, Error, FencedError,
};
use shardlock_eventcore::{
    position_prefix, run_projection, BackendGuard, PositionTable, RunError, ShardlockBackend,
    ShardlockCheckpoints, ShardlockCoordinator,
};

use super::{applied_by, seed, Recorder};

/// The session type of a server's driver.
pub type SessionOf<S> = <<S as SqlServer>::Driver as Driver>::Session;

/// A node's backend over the shared in-memory event store.
pub type Backend<'e, S> = ShardlockBackend<
    &'e InMemoryEventStore,
    <S as SqlServer>::Driver,
    <S as SqlServer>::Store,
    <S as SqlServer>::Positions,
>;

/// What the scenarios need of one SQL server: its driver, checkpoint store
/// and position table, its session-fenced transaction, and the statements
/// that differ between servers. Effects tables have two columns, `n` (the
/// tick, primary key) and `node` (who applied it).
pub trait SqlServer: Clone + Send + Sync + 'static {
    /// The driver under test.
    type Driver: Driver;
    /// The driver's checkpoint store.
    type Store: CheckpointStore + Clone + 'static;
    /// The position table beside it.
    type Positions: PositionTable + Clone + 'static;
    /// The driver's fenced transaction on the session's connection.
    type Tx<'s>: Send;

    /// The server's name in the scenarios' last line (`postgres`).
    const NAME: &'static str;
    /// How the server ends a connection, for messages
    /// (`its backend was terminated`).
    const ENDED: &'static str;

    /// The shared test server, or `None` after the loud `SKIPPED` line.
    fn start() -> impl Future<Output = Option<Self>> + Send;

    /// Returns once the server answers (a reused container may still be
    /// starting).
    fn ready(&self) -> impl Future<Output = ()> + Send;

    /// A driver as one node would have it.
    fn driver(&self) -> Self::Driver;

    /// The database the locks live in.
    fn database(&self) -> DatabaseId;

    /// The checkpoint store and position table, over one pool.
    fn checkpoints(
        &self,
    ) -> impl Future<Output = ShardlockCheckpoints<Self::Store, Self::Positions>> + Send;

    /// Creates a fresh, transactional effects table named `table`.
    fn create_effects(&self, table: &str) -> impl Future<Output = ()> + Send;

    /// Committed rows of `table` written by `node`, from a fresh connection.
    fn effects_by(&self, table: &str, node: &str) -> impl Future<Output = i64> + Send;

    /// The server's id of the connection holding the lock of `name`'s
    /// leadership key, asked from a fresh connection.
    fn holder(&self, name: &str) -> impl Future<Output = Option<u64>> + Send;

    /// Ends connection `id` from another connection, as an operator would,
    /// and returns as soon as the statement answered (the side connection
    /// closes in the background, so the caller observes what happened right
    /// then); with `wait`, only once the server has ended it, so the next
    /// statement on it fails.
    fn end_connection(&self, id: u64, wait: bool) -> impl Future<Output = ()> + Send;

    /// Opens the session's fenced transaction.
    fn transaction(
        session: &mut SessionOf<Self>,
    ) -> impl Future<Output = Result<Self::Tx<'_>, Error>> + Send;

    /// The server's id of the transaction's connection.
    fn tx_connection(tx: &Self::Tx<'_>) -> u64;

    /// Inserts the effect row `(n, node)` into `table`.
    fn write_effect(
        tx: &mut Self::Tx<'_>,
        table: &str,
        n: i64,
        node: &str,
    ) -> impl Future<Output = ()> + Send;

    /// The position table's `advance_in`.
    fn advance_in(
        tx: &mut Self::Tx<'_>,
        subscription: &str,
        position: StreamPosition,
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

    /// A coordinator as one node would have it.
    fn coordinator(&self) -> ShardlockCoordinator<Self::Driver> {
        ShardlockCoordinator::new(self.driver(), self.database())
    }
}

/// eventcore's contract on one [`SqlServer`] (the checkpoint half, the
/// coordination half on the coordinator and on the backend, as
/// `checkpoint_contract!` and `coordination_contract!`), and the position
/// table's order ([`advance_only_forward`](super::advance_only_forward)).
macro_rules! sql_contract {
    ($server:ty) => {
        checkpoint_contract!(
            checkpoints,
            async {
                let server = <$server as common::sql::SqlServer>::start().await?;
                let checkpoints = common::sql::SqlServer::checkpoints(&server).await;
                Some(move || checkpoints.clone())
            }
            .await
        );

        coordination_contract!(
            coordinator,
            async {
                let server = <$server as common::sql::SqlServer>::start().await?;
                common::sql::SqlServer::ready(&server).await;
                Some(move || common::sql::SqlServer::coordinator(&server))
            }
            .await
        );

        coordination_contract!(
            backend,
            async {
                let server = <$server as common::sql::SqlServer>::start().await?;
                let checkpoints = common::sql::SqlServer::checkpoints(&server).await;
                Some(move || {
                    shardlock_eventcore::ShardlockBackend::new(
                        eventcore_memory::InMemoryEventStore::new(),
                        common::sql::SqlServer::coordinator(&server),
                        checkpoints.clone(),
                    )
                })
            }
            .await
        );

        /// `common::advance_only_forward` on the server's position table.
        #[tokio::test]
        async fn positions_advance_only_forward() {
            let Some(server) = <$server as common::sql::SqlServer>::start().await else {
                return;
            };
            let checkpoints = common::sql::SqlServer::checkpoints(&server).await;
            common::advance_only_forward(checkpoints.positions()).await;
        }
    };
}

/// The [`SqlServer`] methods that only forward to the driver's session,
/// fenced transaction, store and position table (the same calls for every
/// driver): `transaction`, `advance_in`, `save_in`, `commit`,
/// `commit_checkpoint`. Invoked inside the `impl SqlServer` with the store
/// and position table types.
macro_rules! forward_fenced {
    ($store:ty, $positions:ty) => {
        async fn transaction(
            session: &mut common::sql::SessionOf<Self>,
        ) -> Result<Self::Tx<'_>, shardlock_core::Error> {
            session.transaction().await
        }

        async fn advance_in(
            tx: &mut Self::Tx<'_>,
            subscription: &str,
            position: eventcore_types::StreamPosition,
        ) {
            <$positions>::advance_in(tx, subscription, position)
                .await
                .unwrap_or_else(|e| panic!("position: {e}"));
        }

        async fn save_in(
            tx: &mut Self::Tx<'_>,
            subscription: &str,
            epoch: i64,
            position: i64,
        ) -> Result<(), shardlock_core::CheckpointError> {
            <$store>::save_in(tx, subscription, epoch, position).await
        }

        async fn commit(tx: Self::Tx<'_>) -> Result<(), shardlock_core::Error> {
            tx.commit().await
        }

        async fn commit_checkpoint(
            tx: Self::Tx<'_>,
            subscription: &str,
            epoch: i64,
            position: i64,
        ) -> Result<(), shardlock_core::FencedError> {
            tx.commit_checkpoint(subscription, epoch, position).await
        }
    };
}

/// Two nodes (two drivers, one shared checkpoint table), eventcore's
/// in-memory event store; the server ends the leader's connection
/// mid-stream. The leader's loss signal stops its run; the follower,
/// waiting in the database, takes over, claims a new epoch and resumes
/// from the checkpoint: no event lost, and only events the old leader
/// applied after its connection ended (not checkpointed) are applied again.
pub async fn failover<S: SqlServer>(server: &S) {
    const EVENTS: u64 = 300;
    let name = shardlock_contract_tests::unique_name("eventcore-failover");
    let events = Arc::new(InMemoryEventStore::new());
    seed(&events, EVENTS).await;
    let checkpoints = server.checkpoints().await;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let recorder = |node| Recorder {
        name: name.clone(),
        node,
        seen: Arc::clone(&seen),
        pace: Duration::from_millis(1),
    };
    let count =
        |node: &str| applied_by(&seen.lock().unwrap_or_else(|p| p.into_inner()), node).len();
    let node =
        |events: Arc<InMemoryEventStore>| (events, server.coordinator(), checkpoints.clone());

    let leader = {
        let (events, coordinator, checkpoints) = node(Arc::clone(&events));
        let projector = recorder("a");
        tokio::spawn(async move {
            let backend = ShardlockBackend::new(&*events, coordinator, checkpoints);
            let config = ProjectionConfig::default().continuous();
            run_projection(projector, &backend, config).await
        })
    };
    let started = Instant::now();
    while count("a") < 60 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "a did not start"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let follower = {
        let (events, coordinator, checkpoints) = node(Arc::clone(&events));
        let (projector, name) = (recorder("b"), name.clone());
        tokio::spawn(async move {
            let backend = ShardlockBackend::new(&*events, coordinator, checkpoints);
            let waited = backend
                .wait_for_leadership(&name, &CancellationToken::new())
                .await;
            assert!(matches!(waited, Ok(true)), "b's wait answered {waited:?}");
            // Batch mode: returns once every event is applied.
            run_projection(projector, &backend, ProjectionConfig::default()).await
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(count("b"), 0, "b applied while a led");

    let id = server
        .holder(&name)
        .await
        .unwrap_or_else(|| panic!("no connection holds the leadership lock"));
    server.end_connection(id, false).await;
    let at_end = count("a");

    let led = tokio::time::timeout(Duration::from_secs(10), leader)
        .await
        .unwrap_or_else(|_| panic!("the leader did not stop after {}", S::ENDED))
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        matches!(
            led,
            Err(RunError::LeadershipLost { .. } | RunError::FencedOff { .. })
        ),
        "the leader answered {led:?}"
    );
    let followed = tokio::time::timeout(Duration::from_secs(60), follower)
        .await
        .unwrap_or_else(|_| panic!("the follower did not finish"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(followed.is_ok(), "the follower answered {followed:?}");

    let seen = seen.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let (a_last, b_first) = super::handed_over(&seen, EVENTS);
    // No gap; everything a applied before its connection ended was
    // checkpointed (but the event in flight).
    assert!(
        b_first <= a_last + 1,
        "b started at {b_first} after a's last {a_last}: events lost"
    );
    assert!(
        b_first as usize >= at_end,
        "b started at {b_first} though a had applied {at_end} before {}",
        S::ENDED
    );
    println!(
        "{} failover: a applied 1..={a_last} ({at_end} when {}; stopped with {led:?}); \
         b waited in the database, resumed at {b_first} through {EVENTS}",
        S::NAME,
        S::ENDED
    );
}

/// Reads the next batch (after the committed position) through `backend`
/// and stages it in a fenced transaction on the leader's connection: one
/// effect row per tick, the exact position and the checkpoint. Answers the
/// open transaction, the batch's last position and its size.
async fn stage<'g, S: SqlServer>(
    backend: &Backend<'_, S>,
    lead: &'g mut BackendGuard<SessionOf<S>>,
    name: &str,
    table: &str,
    node: &str,
) -> (S::Tx<'g>, StreamPosition, usize) {
    let page = match backend.load(name).await.unwrap_or_else(|e| panic!("{e}")) {
        Some(after) => EventPage::after(after, BatchSize::new(10)),
        None => EventPage::first(BatchSize::new(10)),
    };
    let batch = backend
        .read_events::<super::Tick>(EventFilter::all(), page)
        .await
        .unwrap_or_else(|e| panic!("read: {e}"));
    let &(_, last) = batch.last().unwrap_or_else(|| panic!("an empty batch"));
    let epoch = lead.epoch();
    let session = lead.leader_session().unwrap_or_else(|e| panic!("{e}"));
    let mut tx = S::transaction(session)
        .await
        .unwrap_or_else(|e| panic!("begin: {e}"));
    for (tick, _) in &batch {
        S::write_effect(&mut tx, table, tick.n as i64, node).await;
    }
    S::advance_in(&mut tx, name, last).await;
    S::save_in(&mut tx, name, epoch, position_prefix(last))
        .await
        .unwrap_or_else(|e| panic!("checkpoint: {e}"));
    (tx, last, batch.len())
}

/// What eventcore-testing's `leadership_loss_fencing_contract` asserts of
/// eventcore-postgres' transactional runner, on shardlock's fenced
/// transaction: the leader writes a batch's effects, exact position and
/// checkpoint in one transaction on its lock's connection; the server ends
/// that connection before the commit; the leader fails with a lost
/// leadership, and neither its effects nor its progress committed. The
/// follower then takes over and resumes from the last committed batch; a
/// superseded epoch rolls a whole batch back.
pub async fn fenced_batch<S: SqlServer>(server: &S) {
    let name = shardlock_contract_tests::unique_name("eventcore-fenced");
    let table = format!("fx_{}", name.replace('-', "_").to_lowercase());
    let events = InMemoryEventStore::new();
    seed(&events, 30).await;
    let ticks = super::positions(&events).await;
    let checkpoints = server.checkpoints().await;
    server.create_effects(&table).await;
    let node = |_: &str| -> Backend<'_, S> {
        ShardlockBackend::new(&events, server.coordinator(), checkpoints.clone())
    };

    // a leads and commits the first batch.
    let a = node("a");
    let mut lead = a.acquire(&name).await.unwrap_or_else(|e| panic!("{e}"));
    let (tx, last, n) = stage::<S>(&a, &mut lead, &name, &table, "a").await;
    S::commit(tx)
        .await
        .unwrap_or_else(|e| panic!("commit: {e}"));
    assert_eq!((last, n), (ticks[9], 10));

    // a stages the second batch; its connection is ended before it commits.
    let (tx, _, _) = stage::<S>(&a, &mut lead, &name, &table, "a").await;
    let id = S::tx_connection(&tx);
    server.end_connection(id, true).await;
    let failure = S::commit(tx).await;
    assert!(
        matches!(failure, Err(Error::SessionLost { .. })),
        "the stale leader's commit answered {failure:?}"
    );
    drop(lead);
    assert_eq!(
        server.effects_by(&table, "a").await,
        10,
        "stale effect must not commit"
    );
    assert_eq!(
        a.load(&name).await.unwrap_or_else(|e| panic!("{e}")),
        Some(ticks[9]),
        "stale progress must not commit"
    );

    // b takes over at once and resumes after the last committed batch.
    let b = node("b");
    let started = Instant::now();
    let mut lead = loop {
        match b.acquire(&name).await {
            Ok(lead) => break lead,
            Err(e) => {
                assert!(
                    started.elapsed() < Duration::from_secs(10),
                    "b did not take over: {e}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    for expected in [ticks[19], ticks[29]] {
        let (tx, last, _) = stage::<S>(&b, &mut lead, &name, &table, "b").await;
        assert_eq!(last, expected);
        S::commit(tx)
            .await
            .unwrap_or_else(|e| panic!("b commits: {e}"));
    }
    assert_eq!(server.effects_by(&table, "b").await, 20);
    assert_eq!(
        b.load(&name).await.unwrap_or_else(|e| panic!("{e}")),
        Some(ticks[29])
    );
    // A superseded epoch rolls a whole batch back (FencedOff).
    let newer = CheckpointStore::claim(a.checkpoints().store(), &name).await;
    assert!(newer.is_ok(), "{newer:?}");
    let epoch = lead.epoch();
    let session = lead.leader_session().unwrap_or_else(|e| panic!("{e}"));
    let mut tx = S::transaction(session)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    S::write_effect(&mut tx, &table, 31, "b").await;
    let refused = S::commit_checkpoint(tx, &name, epoch, i64::MAX).await;
    assert!(
        matches!(refused, Err(FencedError::Checkpoint(_))),
        "{refused:?}"
    );
    assert_eq!(server.effects_by(&table, "b").await, 20, "rolled back");
    println!(
        "{} fenced batch: connection {id} ended before its commit; stale effects 0, \
         progress stayed at tick 10, b resumed at tick 11",
        S::NAME
    );
}
