//! eventcore's published contract on the memory driver and store, and the
//! integration's own behaviour: fencing, loss, guards.

#[macro_use]
mod common;

use eventcore_memory::InMemoryEventStore;
use shardlock_core::DatabaseId;
use shardlock_eventcore::{
    MemoryPositions, ShardlockBackend, ShardlockCheckpoints, ShardlockCoordinator,
};
use shardlock_memory::{MemoryCheckpoints, MemoryServer};

fn coordinator(server: &MemoryServer) -> ShardlockCoordinator<shardlock_memory::MemoryDriver> {
    ShardlockCoordinator::new(server.driver(), DatabaseId::new("main"))
}

checkpoint_contract!(
    checkpoints,
    async { Some(|| ShardlockCheckpoints::new(MemoryCheckpoints::new(), MemoryPositions::new())) }
        .await
);

coordination_contract!(
    coordinator,
    async {
        let server = MemoryServer::new();
        Some(move || coordinator(&server))
    }
    .await
);

coordination_contract!(
    backend,
    async {
        let server = MemoryServer::new();
        let checkpoints =
            ShardlockCheckpoints::new(MemoryCheckpoints::new(), MemoryPositions::new());
        Some(move || {
            ShardlockBackend::new(
                InMemoryEventStore::new(),
                coordinator(&server),
                checkpoints.clone(),
            )
        })
    }
    .await
);

// ===== the integration's own behaviour =====

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{applied_by, positions, seed, Recorder, Tick};
use eventcore::ProjectionConfig;
use eventcore_types::{
    CheckpointStore as _, EventFilter, EventPage, EventReader as _, ProjectorCoordinator as _,
    StreamPosition,
};
use shardlock_eventcore::{
    run_projection, CheckpointStoreError, CoordinationError, ReadError, RunError,
};
use shardlock_memory::MemoryDriver;

type Backend<'a> =
    ShardlockBackend<&'a InMemoryEventStore, MemoryDriver, MemoryCheckpoints, MemoryPositions>;

fn node<'a>(
    server: &MemoryServer,
    events: &'a InMemoryEventStore,
    checkpoints: &ShardlockCheckpoints<MemoryCheckpoints, MemoryPositions>,
) -> (MemoryDriver, Backend<'a>) {
    let driver = server.driver();
    let backend = ShardlockBackend::new(
        events,
        ShardlockCoordinator::new(driver.clone(), DatabaseId::new("main")),
        checkpoints.clone(),
    );
    (driver, backend)
}

fn shared_checkpoints() -> ShardlockCheckpoints<MemoryCheckpoints, MemoryPositions> {
    ShardlockCheckpoints::new(MemoryCheckpoints::new(), MemoryPositions::new())
}

/// [`common::advance_only_forward`] on the in-memory table.
#[tokio::test]
async fn positions_advance_only_forward() {
    common::advance_only_forward(&MemoryPositions::new()).await;
}

#[tokio::test]
async fn leadership_held_elsewhere_is_an_error() {
    let (server, events, checkpoints) = (
        MemoryServer::new(),
        InMemoryEventStore::new(),
        shared_checkpoints(),
    );
    let (_, a) = node(&server, &events, &checkpoints);
    let (_, b) = node(&server, &events, &checkpoints);
    let _led = a.try_acquire("p").await.unwrap_or_else(|e| panic!("{e}"));
    match b.try_acquire("p").await {
        Err(e @ CoordinationError::HeldElsewhere { .. }) => {
            assert!(e.is_held_elsewhere());
            assert!(e.to_string().contains("projector:p"), "{e}");
        }
        other => panic!("expected HeldElsewhere, got {other:?}"),
    }
    assert!(matches!(
        b.try_acquire("nul\0name").await,
        Err(CoordinationError::InvalidName { .. })
    ));
}

#[tokio::test]
async fn each_leadership_claims_a_new_epoch() {
    let (server, events, checkpoints) = (
        MemoryServer::new(),
        InMemoryEventStore::new(),
        shared_checkpoints(),
    );
    let (_, a) = node(&server, &events, &checkpoints);
    let first = a.try_acquire("p").await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(first.epoch(), 1);
    drop(first);
    let second = a.try_acquire("p").await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(second.epoch(), 2);
}

#[tokio::test]
async fn a_save_without_leadership_is_refused() {
    let (server, events, checkpoints) = (
        MemoryServer::new(),
        InMemoryEventStore::new(),
        shared_checkpoints(),
    );
    let (_, a) = node(&server, &events, &checkpoints);
    let position = StreamPosition::new(uuid::Uuid::from_u128(7));
    assert!(matches!(
        a.save("p", position).await,
        Err(CheckpointStoreError::NotLeading { .. })
    ));
    let guard = a.try_acquire("p").await.unwrap_or_else(|e| panic!("{e}"));
    a.save("p", position)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    drop(guard);
    assert!(matches!(
        a.save("p", position).await,
        Err(CheckpointStoreError::NotLeading { .. })
    ));
    assert_eq!(
        a.load("p").await.unwrap_or_else(|e| panic!("{e}")),
        Some(position)
    );
}

/// A leader cut off from the database (no loss signal: the network is
/// partitioned) keeps running; once another node takes over and claims,
/// its saves are fenced off and its reads refused.
#[tokio::test]
async fn a_stale_leader_is_fenced_off() {
    let server = MemoryServer::with_release_window(Duration::from_millis(50));
    let (events, checkpoints) = (InMemoryEventStore::new(), shared_checkpoints());
    seed(&events, 3).await;
    let at = positions(&events).await;
    let (driver_a, a) = node(&server, &events, &checkpoints);
    let (_, b) = node(&server, &events, &checkpoints);

    let guard_a = a.try_acquire("p").await.unwrap_or_else(|e| panic!("{e}"));
    a.save("p", at[0]).await.unwrap_or_else(|e| panic!("{e}"));
    driver_a.partition();
    let guard_b = loop {
        match b.try_acquire("p").await {
            Ok(guard) => break guard,
            Err(CoordinationError::HeldElsewhere { .. }) => {
                tokio::time::sleep(Duration::from_millis(10)).await
            }
            Err(e) => panic!("{e}"),
        }
    };
    assert_eq!((guard_a.epoch(), guard_b.epoch()), (1, 2));
    assert!(!guard_a.lost().is_cancelled(), "a partition is silent");

    match a.save("p", at[1]).await {
        Err(CheckpointStoreError::FencedOff { ours, current, .. }) => {
            assert_eq!((ours, current), (1, 2))
        }
        other => panic!("expected FencedOff, got {other:?}"),
    }
    assert!(guard_a.stopped().is_cancelled());
    let page = EventPage::first(eventcore_types::BatchSize::new(10));
    assert!(matches!(
        a.read_events::<Tick>(EventFilter::all(), page).await,
        Err(ReadError::FencedOff { .. })
    ));
    // The checkpoint did not move; the new leader saves on.
    assert_eq!(
        b.load("p").await.unwrap_or_else(|e| panic!("{e}")),
        Some(at[0])
    );
    b.save("p", at[2]).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        b.load("p").await.unwrap_or_else(|e| panic!("{e}")),
        Some(at[2])
    );
    drop(guard_a);
}

/// The session's loss signal (the process holding it died, the server
/// ended it) stops reads at once; saves stay fenced by the epoch (nobody
/// claimed yet, so the one already applied is kept).
#[tokio::test]
async fn a_lost_session_refuses_reads() {
    let (server, events, checkpoints) = (
        MemoryServer::new(),
        InMemoryEventStore::new(),
        shared_checkpoints(),
    );
    let (driver_a, a) = node(&server, &events, &checkpoints);
    let guard = a.try_acquire("p").await.unwrap_or_else(|e| panic!("{e}"));
    let lost = guard.lost();
    driver_a.kill();
    tokio::time::timeout(Duration::from_secs(5), lost.cancelled())
        .await
        .unwrap_or_else(|_| panic!("the loss signal did not fire"));
    assert!(guard.stopped().is_cancelled());
    let position = StreamPosition::new(uuid::Uuid::from_u128(1));
    a.save("p", position)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let page = EventPage::first(eventcore_types::BatchSize::new(10));
    assert!(matches!(
        a.read_events::<Tick>(EventFilter::all(), page).await,
        Err(ReadError::LeadershipLost { .. })
    ));
    drop(guard);
    // The lease is gone with the guard: reads work again.
    assert!(a
        .read_events::<Tick>(EventFilter::all(), page)
        .await
        .is_ok());
}

/// A follower waits in the database (no polling) and takes over as soon
/// as the leader lets go; eventcore's `try_acquire` then answers the
/// leadership it waited for, with a freshly claimed epoch.
#[tokio::test]
async fn a_follower_waits_in_the_database() {
    let (server, events, checkpoints) = (
        MemoryServer::new(),
        InMemoryEventStore::new(),
        shared_checkpoints(),
    );
    let (_, a) = node(&server, &events, &checkpoints);
    let (_, b) = node(&server, &events, &checkpoints);
    let led = a.try_acquire("p").await.unwrap_or_else(|e| panic!("{e}"));
    let never = shardlock_core::CancellationToken::new();
    let waiting = b.wait_for_leadership("p", &never);
    tokio::pin!(waiting);
    assert!(
        tokio::time::timeout(Duration::from_millis(100), waiting.as_mut())
            .await
            .is_err(),
        "the follower must wait while a leads"
    );
    assert_eq!(
        server.waiting(
            &DatabaseId::new("main"),
            &shardlock_eventcore::leadership_key("p").unwrap_or_else(|e| panic!("{e}"))
        ),
        1
    );
    drop(led);
    let got = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .unwrap_or_else(|_| panic!("the follower did not take over"));
    assert!(got.unwrap_or_else(|e| panic!("{e}")));
    // a cannot take it back; b's try_acquire answers what it waited for.
    assert!(a.try_acquire("p").await.is_err());
    let guard = b.try_acquire("p").await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(guard.epoch(), 2);

    // A cancelled wait holds nothing.
    let (_, c) = node(&server, &events, &checkpoints);
    let cancel = shardlock_core::CancellationToken::new();
    cancel.cancel();
    assert!(!c
        .wait_for_leadership("p", &cancel)
        .await
        .unwrap_or_else(|e| panic!("{e}")));
}

/// A guard dropped where there is no runtime still frees the lock.
#[test]
fn a_guard_dropped_outside_a_runtime_releases() {
    let server = MemoryServer::new();
    let make = || ShardlockCoordinator::new(server.driver(), DatabaseId::new("main"));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    let guard = runtime
        .block_on(make().try_acquire("p"))
        .unwrap_or_else(|e| panic!("{e}"));
    drop(runtime);
    drop(guard);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    let again = runtime.block_on(make().try_acquire("p"));
    assert!(again.is_ok(), "{again:?}");
}

/// End to end on one process: eventcore's in-memory event store, two nodes
/// (two backends over two memory drivers, one shared checkpoint store), the
/// leader killed mid-stream; the follower resumes from the checkpoint, no
/// event is lost and at most the leader's last (not checkpointed) event is
/// applied twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn projection_failover_memory_kill() {
    const EVENTS: u64 = 300;
    let server = MemoryServer::new();
    let (events, checkpoints) = (Arc::new(InMemoryEventStore::new()), shared_checkpoints());
    seed(&events, EVENTS).await;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let recorder = |node| Recorder {
        name: "recorder".to_string(),
        node,
        seen: Arc::clone(&seen),
        pace: Duration::from_millis(1),
    };
    let count =
        |node: &str| applied_by(&seen.lock().unwrap_or_else(|p| p.into_inner()), node).len();

    let driver_a = server.driver();
    let leader = {
        let (events, checkpoints, driver, projector) = (
            Arc::clone(&events),
            checkpoints.clone(),
            driver_a.clone(),
            recorder("a"),
        );
        tokio::spawn(async move {
            let backend = ShardlockBackend::new(
                &*events,
                ShardlockCoordinator::new(driver, DatabaseId::new("main")),
                checkpoints,
            );
            run_projection(
                projector,
                &backend,
                ProjectionConfig::default().continuous(),
            )
            .await
        })
    };
    while count("a") < 80 {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let follower_tries = Arc::new(AtomicUsize::new(0));
    let follower = {
        let (events, checkpoints, driver, seen, tries) = (
            Arc::clone(&events),
            checkpoints.clone(),
            server.driver(),
            Arc::clone(&seen),
            Arc::clone(&follower_tries),
        );
        tokio::spawn(async move {
            let backend = ShardlockBackend::new(
                &*events,
                ShardlockCoordinator::new(driver, DatabaseId::new("main")),
                checkpoints,
            );
            loop {
                tries.fetch_add(1, Ordering::Relaxed);
                let projector = Recorder {
                    name: "recorder".to_string(),
                    node: "b",
                    seen: Arc::clone(&seen),
                    pace: Duration::from_millis(1),
                };
                // Batch mode: returns once every event is applied.
                match run_projection(projector, &backend, ProjectionConfig::default()).await {
                    Err(RunError::Projection(eventcore::ProjectionError::LeadershipError(_))) => {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    other => return other,
                }
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        follower_tries.load(Ordering::Relaxed) >= 2,
        "the follower is refused while a leads"
    );
    assert_eq!(count("b"), 0, "b applied while a led");

    // The process dies: its sessions end, the lock is free at once, and the
    // loss signal stops a's run at its next checkpoint save.
    driver_a.kill();
    let at_kill = count("a");
    let led = tokio::time::timeout(Duration::from_secs(10), leader)
        .await
        .unwrap_or_else(|_| panic!("the killed leader did not stop"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        matches!(led, Err(RunError::LeadershipLost { .. })),
        "the leader answered {led:?}"
    );
    let after_kill = count("a") - at_kill;
    assert!(
        after_kill <= 1,
        "a applied {after_kill} events after its loss"
    );

    let followed = tokio::time::timeout(Duration::from_secs(30), follower)
        .await
        .unwrap_or_else(|_| panic!("the follower did not finish"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(followed.is_ok(), "the follower answered {followed:?}");

    let seen = seen.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let (a_last, b_first) = common::handed_over(&seen, EVENTS);
    assert!(
        b_first == a_last || b_first == a_last + 1,
        "b started at {b_first}, a's last event was {a_last}"
    );
    println!(
        "memory failover: a applied 1..={a_last}, killed; b resumed at {b_first} through {EVENTS}"
    );
}
