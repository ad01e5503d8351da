//! eventcore's published contract on the MySQL/MariaDB driver and
//! checkpoint store, against the shared test server (`SHARDLOCK_MYSQL_URL`,
//! or the container of `SHARDLOCK_MYSQL_IMAGE`, default
//! `shardlock-test/mariadb:10.11`; see `shardlock_contract_tests::container`).

#![cfg(feature = "mysql")]

#[macro_use]
mod common;

use std::time::{Duration, Instant};

use eventcore_memory::InMemoryEventStore;
use shardlock_contract_tests::container::{self, SharedContainer, Spec};
use shardlock_core::DatabaseId;
use shardlock_eventcore::{
    MySqlPositions, ShardlockBackend, ShardlockCheckpoints, ShardlockCoordinator,
};
use shardlock_mysql::sqlx::mysql::MySqlPool;
use shardlock_mysql::{MySqlCheckpoints, MySqlDriver, MySqlOptions};
use testcontainers_modules::mariadb::Mariadb;

/// The driver crate's shared container: the same spec, so the same
/// container (`driver-mysql/tests/common`).
static SERVER: SharedContainer = SharedContainer::new(Spec {
    group: "mysql",
    name: "mysql",
    url_env: "SHARDLOCK_MYSQL_URL",
    image_env: "SHARDLOCK_MYSQL_IMAGE",
    default_image: "shardlock-test/mariadb:10.11",
    port: 3306,
    local_only: false,
    startup_timeout: Duration::from_secs(120),
});

/// The server's URL, options and database, or `None` after the loud skip
/// line.
async fn server() -> Option<(String, MySqlOptions, DatabaseId)> {
    let url = container::shared(&SERVER, Mariadb::default(), |host, port| {
        format!("mysql://root@{host}:{port}/test")
    })
    .await?;
    let options = MySqlOptions::parse(&url).unwrap_or_else(|e| panic!("not a usable URL: {e}"));
    let database = options
        .get_connect_options()
        .get_database()
        .unwrap_or("test")
        .to_string();
    Some((url, options, DatabaseId::new(database)))
}

/// A pool, once the server answers (a reused container may still start).
async fn pool(url: &str) -> MySqlPool {
    let started = Instant::now();
    loop {
        let attempt = async {
            let pool = MySqlPool::connect(url).await?;
            shardlock_mysql::sqlx::query("SELECT 1")
                .execute(&pool)
                .await?;
            Ok::<_, shardlock_mysql::sqlx::Error>(pool)
        };
        match attempt.await {
            Ok(pool) => return pool,
            Err(e) if started.elapsed() > Duration::from_secs(90) => {
                panic!("MySQL is not reachable: {e}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

async fn checkpoints(url: &str) -> ShardlockCheckpoints<MySqlCheckpoints, MySqlPositions> {
    let pool = pool(url).await;
    let store = MySqlCheckpoints::from_pool(pool.clone())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let positions = MySqlPositions::from_pool(store.pool().clone())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    ShardlockCheckpoints::new(store, positions)
}

checkpoint_contract!(
    checkpoints,
    async {
        let (url, _, _) = server().await?;
        let checkpoints = checkpoints(&url).await;
        Some(move || checkpoints.clone())
    }
    .await
);

coordination_contract!(
    coordinator,
    async {
        let (url, options, database) = server().await?;
        drop(pool(&url).await);
        Some(move || ShardlockCoordinator::new(MySqlDriver::new(options.clone()), database.clone()))
    }
    .await
);

coordination_contract!(
    backend,
    async {
        let (url, options, database) = server().await?;
        let checkpoints = checkpoints(&url).await;
        Some(move || {
            ShardlockBackend::new(
                InMemoryEventStore::new(),
                ShardlockCoordinator::new(MySqlDriver::new(options.clone()), database.clone()),
                checkpoints.clone(),
            )
        })
    }
    .await
);

// ===== positions: the table orders like eventcore =====

use eventcore_types::StreamPosition;
use shardlock_eventcore::PositionTable as _;

/// `advance` keeps the greatest position (bytewise = eventcore's order,
/// including the top bit and the last byte), and `load` answers it exactly.
#[tokio::test]
async fn positions_advance_only_forward() {
    let Some((url, _, _)) = server().await else {
        return;
    };
    let positions = MySqlPositions::from_pool(pool(&url).await)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let name = shardlock_contract_tests::unique_name("positions");
    let at = |bits: u128| StreamPosition::new(uuid::Uuid::from_u128(bits));
    let load = || async {
        positions
            .load(&name)
            .await
            .unwrap_or_else(|e| panic!("load: {e}"))
    };
    assert_eq!(load().await, None);
    for (advance, expected) in [
        (at(5), at(5)),
        (at(4), at(5)),
        (at(1 << 127), at(1 << 127)),
        (at(u128::MAX - 1), at(u128::MAX - 1)),
        (at(7), at(u128::MAX - 1)),
        (at(u128::MAX), at(u128::MAX)),
    ] {
        positions
            .advance(&name, advance)
            .await
            .unwrap_or_else(|e| panic!("advance: {e}"));
        assert_eq!(
            load().await,
            Some(expected),
            "after advancing to {advance:?}"
        );
    }
}

// ===== end to end: the server ends the leader's session =====

use std::sync::{Arc, Mutex};

use common::{applied_by, seed, Recorder};
use eventcore::ProjectionConfig;
use shardlock_core::CancellationToken;
use shardlock_eventcore::{leadership_key, run_projection, RunError};
use shardlock_mysql::sqlx::{self, mysql::MySqlConnection, Connection as _};

/// The connection id holding the named lock of `name`'s leadership key.
async fn holder_id(url: &str, name: &str) -> Option<u64> {
    let key = leadership_key(name).unwrap_or_else(|e| panic!("{e}"));
    let mut conn = MySqlConnection::connect(url)
        .await
        .unwrap_or_else(|e| panic!("side connection: {e}"));
    let id: Option<i64> = sqlx::query_scalar("SELECT CAST(IS_USED_LOCK(?) AS SIGNED)")
        .bind(shardlock_mysql::lock_name(&key))
        .fetch_one(&mut conn)
        .await
        .unwrap_or_else(|e| panic!("IS_USED_LOCK: {e}"));
    let _ = conn.close().await;
    id.map(|id| u64::try_from(id).unwrap_or_else(|e| panic!("connection id {id}: {e}")))
}

/// Two nodes (two MySQL drivers, one shared checkpoint table), eventcore's
/// in-memory event store; the server kills the leader's connection
/// mid-stream (`KILL CONNECTION`). The leader's loss signal stops its run;
/// the follower, waiting in the database (`GET_LOCK`), takes over, claims a
/// new epoch and resumes from the checkpoint: no event lost, and only
/// events the old leader applied after its connection ended (not
/// checkpointed) are applied again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn projection_failover_mysql_kill() {
    const EVENTS: u64 = 300;
    let Some((url, options, database)) = server().await else {
        return;
    };
    let name = shardlock_contract_tests::unique_name("eventcore-failover");
    let events = Arc::new(InMemoryEventStore::new());
    seed(&events, EVENTS).await;
    let checkpoints = checkpoints(&url).await;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let recorder = |node| Recorder {
        name: name.clone(),
        node,
        seen: Arc::clone(&seen),
        pace: Duration::from_millis(1),
    };
    let count =
        |node: &str| applied_by(&seen.lock().unwrap_or_else(|p| p.into_inner()), node).len();
    let node = |events: Arc<InMemoryEventStore>| {
        let coordinator =
            ShardlockCoordinator::new(MySqlDriver::new(options.clone()), database.clone());
        (events, coordinator, checkpoints.clone())
    };

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

    let id = holder_id(&url, &name)
        .await
        .unwrap_or_else(|| panic!("no connection holds the leadership lock"));
    let mut side = MySqlConnection::connect(&url)
        .await
        .unwrap_or_else(|e| panic!("side connection: {e}"));
    let at_end: usize = {
        sqlx::query(&format!("KILL CONNECTION {id}"))
            .execute(&mut side)
            .await
            .unwrap_or_else(|e| panic!("KILL CONNECTION {id}: {e}"));
        count("a")
    };
    let _ = side.close().await;

    let led = tokio::time::timeout(Duration::from_secs(10), leader)
        .await
        .unwrap_or_else(|_| panic!("the killed leader did not stop"))
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
    let (a, b) = (applied_by(&seen, "a"), applied_by(&seen, "b"));
    assert_eq!(a, (1..=a.len() as u64).collect::<Vec<_>>());
    let (a_last, b_first) = (*a.last().unwrap_or(&0), *b.first().unwrap_or(&0));
    assert_eq!(
        b,
        (b_first..=EVENTS).collect::<Vec<_>>(),
        "b skipped or repeated"
    );
    // No gap; everything a applied before its connection ended was
    // checkpointed (but the event in flight).
    assert!(
        b_first <= a_last + 1,
        "b started at {b_first} after a's last {a_last}: events lost"
    );
    assert!(
        b_first as usize >= at_end,
        "b started at {b_first} though a had applied {at_end} before its connection ended"
    );
    println!(
        "mysql failover: a applied 1..={a_last} ({at_end} when its connection was killed; \
         stopped with {led:?}); b waited in the database, resumed at {b_first} through {EVENTS}"
    );
}

// ===== a fenced batch: no stale effect, no stale progress =====

use eventcore_types::{BatchSize, CheckpointStore as _, EventFilter, EventPage, EventReader as _};
use shardlock_core::{Error, FencedError};
use shardlock_eventcore::{position_prefix, BackendGuard};
use shardlock_mysql::{MySqlSession, MySqlTransaction};

type MySqlBackend<'e> =
    ShardlockBackend<&'e InMemoryEventStore, MySqlDriver, MySqlCheckpoints, MySqlPositions>;

/// Reads the next batch (after the committed position) through `backend`
/// and stages it in a fenced transaction on the leader's connection: one
/// effect row per tick, the exact position and the checkpoint. Answers the
/// open transaction, the batch's last position and its size.
async fn stage<'g>(
    backend: &MySqlBackend<'_>,
    lead: &'g mut BackendGuard<MySqlSession>,
    name: &str,
    table: &str,
    node: &str,
) -> (MySqlTransaction<'g>, StreamPosition, usize) {
    let page = match backend.load(name).await.unwrap_or_else(|e| panic!("{e}")) {
        Some(after) => EventPage::after(after, BatchSize::new(10)),
        None => EventPage::first(BatchSize::new(10)),
    };
    let batch = backend
        .read_events::<common::Tick>(EventFilter::all(), page)
        .await
        .unwrap_or_else(|e| panic!("read: {e}"));
    let &(_, last) = batch.last().unwrap_or_else(|| panic!("an empty batch"));
    let epoch = lead.epoch();
    let mut tx = lead
        .leader_session()
        .unwrap_or_else(|e| panic!("{e}"))
        .transaction()
        .await
        .unwrap_or_else(|e| panic!("begin: {e}"));
    for (tick, _) in &batch {
        sqlx::query(&format!("INSERT INTO {table} (n, node) VALUES (?, ?)"))
            .bind(tick.n as i64)
            .bind(node)
            .execute(&mut *tx)
            .await
            .unwrap_or_else(|e| panic!("effect: {e}"));
    }
    MySqlPositions::advance_in(&mut tx, name, last)
        .await
        .unwrap_or_else(|e| panic!("position: {e}"));
    MySqlCheckpoints::save_in(&mut tx, name, epoch, position_prefix(last))
        .await
        .unwrap_or_else(|e| panic!("checkpoint: {e}"));
    (tx, last, batch.len())
}

/// Effect rows (committed only), by node.
async fn effects_by(url: &str, table: &str, node: &str) -> i64 {
    let mut conn = MySqlConnection::connect(url)
        .await
        .unwrap_or_else(|e| panic!("side connection: {e}"));
    let n = sqlx::query_scalar(&format!("SELECT COUNT(*) FROM {table} WHERE node = ?"))
        .bind(node)
        .fetch_one(&mut conn)
        .await
        .unwrap_or_else(|e| panic!("count: {e}"));
    let _ = conn.close().await;
    n
}

/// What eventcore-testing's `leadership_loss_fencing_contract` asserts of
/// eventcore-postgres' transactional runner, on shardlock's MySQL fenced
/// transaction: the leader writes a batch's effects, exact position and
/// checkpoint in one transaction on its lock's connection; the connection
/// is killed before the commit; the leader fails with a lost leadership,
/// and neither its effects nor its progress committed. The follower then
/// takes over and resumes from the last committed batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fenced_batch_killed_leader_commits_nothing() {
    let Some((url, options, database)) = server().await else {
        return;
    };
    let name = shardlock_contract_tests::unique_name("eventcore-fenced");
    let table = format!("fx_{}", name.replace('-', "_").to_lowercase());
    let events = InMemoryEventStore::new();
    seed(&events, 30).await;
    let ticks = common::positions(&events).await;
    let checkpoints = checkpoints(&url).await;
    sqlx::query(&format!(
        "CREATE TABLE {table} (n BIGINT PRIMARY KEY, node VARCHAR(8) NOT NULL) ENGINE = InnoDB"
    ))
    .execute(checkpoints.store().pool())
    .await
    .unwrap_or_else(|e| panic!("effects table: {e}"));
    let node = |_: &str| {
        ShardlockBackend::new(
            &events,
            ShardlockCoordinator::new(MySqlDriver::new(options.clone()), database.clone()),
            checkpoints.clone(),
        )
    };

    // a leads and commits the first batch.
    let a = node("a");
    let mut lead = a.acquire(&name).await.unwrap_or_else(|e| panic!("{e}"));
    let (tx, last, n) = stage(&a, &mut lead, &name, &table, "a").await;
    tx.commit().await.unwrap_or_else(|e| panic!("commit: {e}"));
    assert_eq!((last, n), (ticks[9], 10));

    // a stages the second batch; its connection is killed before it commits.
    let (tx, _, _) = stage(&a, &mut lead, &name, &table, "a").await;
    let id = tx.connection_id();
    let mut side = MySqlConnection::connect(&url)
        .await
        .unwrap_or_else(|e| panic!("side connection: {e}"));
    sqlx::query(&format!("KILL CONNECTION {id}"))
        .execute(&mut side)
        .await
        .unwrap_or_else(|e| panic!("KILL CONNECTION {id}: {e}"));
    let _ = side.close().await;
    let failure = tx.commit().await;
    assert!(
        matches!(failure, Err(Error::SessionLost { .. })),
        "the stale leader's commit answered {failure:?}"
    );
    drop(lead);
    assert_eq!(
        effects_by(&url, &table, "a").await,
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
        let (tx, last, _) = stage(&b, &mut lead, &name, &table, "b").await;
        assert_eq!(last, expected);
        tx.commit()
            .await
            .unwrap_or_else(|e| panic!("b commits: {e}"));
    }
    assert_eq!(effects_by(&url, &table, "b").await, 20);
    assert_eq!(
        b.load(&name).await.unwrap_or_else(|e| panic!("{e}")),
        Some(ticks[29])
    );
    // A superseded epoch rolls a whole batch back (FencedOff).
    let newer = shardlock_core::CheckpointStore::claim(a.checkpoints().store(), &name).await;
    assert!(newer.is_ok(), "{newer:?}");
    let epoch = lead.epoch();
    let session = lead.leader_session().unwrap_or_else(|e| panic!("{e}"));
    let mut tx = session
        .transaction()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    sqlx::query(&format!("INSERT INTO {table} (n, node) VALUES (31, 'b')"))
        .execute(&mut *tx)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let refused = tx.commit_checkpoint(&name, epoch, i64::MAX).await;
    assert!(
        matches!(refused, Err(FencedError::Checkpoint(_))),
        "{refused:?}"
    );
    assert_eq!(effects_by(&url, &table, "b").await, 20, "rolled back");
    println!(
        "mysql fenced batch: connection {id} killed before its commit; stale effects 0, \
         progress stayed at tick 10, b resumed at tick 11"
    );
}
