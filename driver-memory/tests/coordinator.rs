//! Coordinator scenarios that need the memory server's fault switches and
//! lock history: severed and partitioned sessions, tenants coming and going,
//! solo sentinels, stop ordering.

use std::time::{Duration, Instant};

use shardlock_contract_tests::{all_owned_once, shards, Recorder, RecordingAgent};
use shardlock_core::{
    Agent, AgentContext, AgentError, Coordinator, CoordinatorHandle, DatabaseId, Distributor,
    Error, Guard, NodeId, ShardId, SharedTenants,
};
use shardlock_distributors::{MultiTenanted, SingleTenant, Solo};
use shardlock_memory::{LockEventKind, MemoryDriver, MemoryServer};

const POLL: Duration = Duration::from_millis(200);

fn start<D: Distributor>(
    driver: MemoryDriver,
    distributor: D,
    node: &str,
    recorder: &Recorder,
) -> CoordinatorHandle {
    start_with_poll(driver, distributor, node, recorder, POLL)
}

fn single(db: &str, n: usize) -> SingleTenant {
    SingleTenant::new(DatabaseId::new(db), "app", shards(n))
}

/// For every shard, each run starts only after the previous run (on any
/// node) stopped.
fn assert_handovers_ordered(recorder: &Recorder) {
    let mut runs = recorder.runs();
    runs.sort_by_key(|r| r.started);
    for (i, later) in runs.iter().enumerate() {
        for earlier in &runs[..i] {
            if earlier.shard == later.shard
                && earlier.database == later.database
                && earlier.node != later.node
            {
                let stopped = earlier
                    .stopped
                    .unwrap_or_else(|| panic!("{earlier:?} still running when {later:?} started"));
                assert!(
                    stopped <= later.started,
                    "{later:?} started before {earlier:?} stopped"
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_stop_stops_agents_before_releasing_locks() {
    let server = MemoryServer::new();
    let recorder = Recorder::new();
    let a = start(server.driver(), single("db", 6), "a", &recorder);
    assert!(
        recorder
            .wait_for(Duration::from_secs(5), |r| r.running_on(&NodeId::new("a"))
                == 6)
            .await
    );
    let b = start(server.driver(), single("db", 6), "b", &recorder);
    a.stop().await.expect("stop");
    let stops: Vec<Instant> = recorder
        .runs()
        .iter()
        .filter(|r| r.node.as_str() == "a")
        .map(|r| r.stopped.expect("stopped after stop()"))
        .collect();
    let last_agent_stop = stops.iter().max().copied().expect("a ran agents");
    let releases: Vec<Instant> = server
        .events()
        .iter()
        .filter(|e| e.node.as_str() == "a" && e.kind == LockEventKind::Released)
        .map(|e| e.at)
        .collect();
    assert_eq!(
        releases.len(),
        6,
        "a released each of its 6 locks explicitly"
    );
    assert!(
        releases.iter().all(|r| *r >= last_agent_stop),
        "every lock released after the last agent stopped"
    );
    assert!(
        recorder
            .wait_for(Duration::from_secs(5), |r| all_owned_once(r, &shards(6)))
            .await
    );
    assert!(recorder
        .running()
        .values()
        .flatten()
        .all(|n| n.as_str() == "b"));
    b.stop().await.expect("stop");
    assert!(
        server.holders().is_empty(),
        "no lock left: {:?}",
        server.holders()
    );
    assert_eq!(recorder.overlaps(), 0);
    assert_handovers_ordered(&recorder);
}

/// A node whose connections break stops its agents before the server frees
/// its locks (self-fencing), then reconnects and competes again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn severed_session_stops_work_before_takeover_and_reconnects() {
    let server = MemoryServer::with_release_window(Duration::from_millis(1500));
    let recorder = Recorder::new();
    let all = shards(12);
    let victim_driver = server.driver();
    let victim = start(victim_driver.clone(), single("db", 12), "victim", &recorder);
    assert!(
        recorder
            .wait_for(Duration::from_secs(5), |r| r
                .running_on(&NodeId::new("victim"))
                == 12)
            .await
    );
    let others: Vec<_> = ["b", "c"]
        .iter()
        .map(|n| start(server.driver(), single("db", 12), n, &recorder))
        .collect();
    tokio::time::sleep(POLL * 2).await;

    victim_driver.sever();
    let severed_at = Instant::now();
    assert!(
        recorder
            .wait_for(Duration::from_secs(5), |r| r
                .running_on(&NodeId::new("victim"))
                == 0)
            .await,
        "the severed node stopped its agents"
    );
    let stopped_after = severed_at.elapsed();
    assert!(
        recorder
            .wait_for(Duration::from_secs(10), |r| all_owned_once(r, &all))
            .await,
        "others took over after the server freed the locks"
    );
    let taken_over = severed_at.elapsed();
    assert!(
        stopped_after < taken_over,
        "fenced itself ({stopped_after:?}) before takeover ({taken_over:?})"
    );
    assert_eq!(recorder.overlaps(), 0, "no shard ran twice");
    assert_handovers_ordered(&recorder);
    eprintln!(
        "severed: victim stopped after {stopped_after:?}, others owned all after {taken_over:?}"
    );

    // Once its network is back the victim reconnects and competes again:
    // stop the others and it takes everything back.
    victim_driver.heal();
    let lost = victim.assignment().borrow().sessions_lost;
    assert!(lost >= 1, "the loss was counted");
    for node in others {
        node.stop().await.expect("stop");
    }
    assert!(
        recorder
            .wait_for(Duration::from_secs(10), |r| r
                .running_on(&NodeId::new("victim"))
                == 12)
            .await,
        "the severed node reconnected and took the work back"
    );
    victim.stop().await.expect("stop");
    assert_eq!(recorder.overlaps(), 0);
}

/// A node cut off by a partition sees its calls hang, not fail: the
/// lock-loss deadline stops its work before the server frees its locks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_node_fences_itself_by_deadline() {
    let server = MemoryServer::with_release_window(Duration::from_millis(1500));
    let recorder = Recorder::new();
    let all = shards(4);
    let victim_driver = server.driver();
    let victim = start(victim_driver.clone(), single("db", 4), "victim", &recorder);
    assert!(
        recorder
            .wait_for(Duration::from_secs(5), |r| r
                .running_on(&NodeId::new("victim"))
                == 4)
            .await
    );
    let other = start(server.driver(), single("db", 4), "other", &recorder);

    victim_driver.partition();
    assert!(
        recorder
            .wait_for(Duration::from_secs(5), |r| r
                .running_on(&NodeId::new("victim"))
                == 0)
            .await,
        "the partitioned node stopped its agents by deadline"
    );
    assert!(
        recorder
            .wait_for(Duration::from_secs(10), |r| all_owned_once(r, &all))
            .await
    );
    assert_eq!(recorder.overlaps(), 0);
    assert_handovers_ordered(&recorder);
    victim_driver.heal();
    other.stop().await.expect("stop");
    assert!(
        recorder
            .wait_for(Duration::from_secs(10), |r| r
                .running_on(&NodeId::new("victim"))
                == 4)
            .await,
        "after healing the node competes again"
    );
    victim.stop().await.expect("stop");
}

/// Coordinator timing that cannot fence before the server frees locks is
/// refused at build time, unless explicitly allowed.
#[tokio::test]
async fn unsafe_timing_is_a_config_error() {
    let server = MemoryServer::with_release_window(Duration::from_secs(1));
    let build = |allow: bool| {
        let b = Coordinator::builder(
            server.driver(),
            single("db", 1),
            RecordingAgent::new(Recorder::new()),
        );
        if allow {
            b.allow_unsafe_timing().build()
        } else {
            b.build()
        }
    };
    match build(false) {
        Err(Error::Config(msg)) => assert!(msg.contains("lock release window"), "{msg}"),
        other => panic!("expected a config error, got {other:?}"),
    }
    assert!(build(true).is_ok());
    let zero = Coordinator::builder(
        server.driver(),
        single("db", 1),
        RecordingAgent::new(Recorder::new()),
    )
    .poll_interval(Duration::ZERO)
    .allow_unsafe_timing()
    .build();
    assert!(matches!(zero, Err(Error::Config(_))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_added_and_removed() {
    let server = MemoryServer::new();
    let recorder = Recorder::new();
    let tenants = SharedTenants::new([DatabaseId::new("t1")]);
    let node = start(
        server.driver(),
        MultiTenanted::new(tenants.clone(), "app", shards(3)),
        "n",
        &recorder,
    );
    let t1 = DatabaseId::new("t1");
    let t2 = DatabaseId::new("t2");
    let running_in = |db: &DatabaseId| {
        let db = db.clone();
        move |r: &Recorder| r.running().keys().filter(|(d, _)| *d == db).count()
    };
    assert!(
        recorder
            .wait_for(Duration::from_secs(5), |r| running_in(&t1)(r) == 3)
            .await
    );
    tenants.add(t2.clone());
    assert!(
        recorder
            .wait_for(POLL * 2 + Duration::from_secs(2), |r| running_in(&t2)(r)
                == 3)
            .await,
        "new tenant picked up within a cycle"
    );
    assert!(
        server.holders().iter().any(|h| h.database == t2),
        "its lock lives in its own database"
    );
    tenants.remove(&t1);
    assert!(
        recorder
            .wait_for(POLL * 2 + Duration::from_secs(2), |r| running_in(&t1)(r)
                == 0)
            .await,
        "removed tenant's agents stopped"
    );
    assert!(
        server.holders().iter().all(|h| h.database != t1),
        "removed tenant's lock released: {:?}",
        server.holders()
    );
    let assignment = node.assignment().borrow().clone();
    assert_eq!(assignment.owned.len(), 1);
    assert_eq!(assignment.owned[0].database, t2);
    node.stop().await.expect("stop");
    assert!(server.holders().is_empty());
}

/// Solo runs everything even when a second solo node holds the sentinel
/// (that is logged as an error); only one of them holds the sentinel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn solo_nodes_run_everything_and_detect_each_other() {
    let server = MemoryServer::new();
    let recorder = Recorder::new();
    let solo = || Solo::new([DatabaseId::new("db")], "app", shards(2));
    let a = start(server.driver(), solo(), "a", &recorder);
    assert!(
        recorder
            .wait_for(Duration::from_secs(5), |r| r.running_on(&NodeId::new("a"))
                == 2)
            .await
    );
    let b = start(server.driver(), solo(), "b", &recorder);
    assert!(
        recorder
            .wait_for(Duration::from_secs(5), |r| r.running_on(&NodeId::new("b"))
                == 2)
            .await
    );
    tokio::time::sleep(POLL * 2).await;
    let held: Vec<bool> = [&a, &b]
        .iter()
        .map(|h| {
            let asg = h.assignment().borrow().clone();
            assert_eq!(asg.owned.len(), 1);
            assert_eq!(asg.owned[0].guard, Guard::Sentinel);
            asg.owned[0].held
        })
        .collect();
    assert_eq!(
        held,
        vec![true, false],
        "the first holds the sentinel, the second is denied"
    );
    assert_eq!(server.holders().len(), 1);
    a.stop().await.expect("stop");
    b.stop().await.expect("stop");
}

/// An agent that ignores cancellation is aborted after the stop timeout, so
/// stop() still returns and the lock is released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stubborn_agent_is_aborted() {
    struct Stubborn(Recorder);
    impl Agent for Stubborn {
        async fn run(&self, shard: &ShardId, ctx: AgentContext) -> Result<(), AgentError> {
            let _run = self.0.start(&ctx.node, &ctx.database, shard);
            loop {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    let server = MemoryServer::new();
    let recorder = Recorder::new();
    let node = Coordinator::builder(server.driver(), single("db", 2), Stubborn(recorder.clone()))
        .poll_interval(POLL)
        .start_jitter(Duration::ZERO)
        .stop_timeout(Duration::from_millis(200))
        .build()
        .expect("config")
        .start()
        .expect("start");
    assert!(
        recorder
            .wait_for(Duration::from_secs(5), |r| r.running().len() == 2)
            .await
    );
    node.stop().await.expect("stop");
    assert!(
        recorder.running().is_empty(),
        "aborted agents do not run on"
    );
    assert!(
        server.holders().is_empty(),
        "locks released after the abort"
    );
}

/// A failing distributor keeps the current assignment instead of dropping it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_distributor_keeps_assignment() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    struct Flaky(SingleTenant, Arc<AtomicBool>);
    impl Distributor for Flaky {
        async fn lock_sets(&self) -> shardlock_core::Result<Vec<shardlock_core::LockSet>> {
            if self.1.load(Ordering::SeqCst) {
                Err(Error::Distributor("tenant catalogue unreachable".into()))
            } else {
                self.0.lock_sets().await
            }
        }
    }
    let server = MemoryServer::new();
    let recorder = Recorder::new();
    let broken = Arc::new(AtomicBool::new(false));
    let node = start(
        server.driver(),
        Flaky(single("db", 3), broken.clone()),
        "n",
        &recorder,
    );
    assert!(
        recorder
            .wait_for(Duration::from_secs(5), |r| r.running().len() == 3)
            .await
    );
    broken.store(true, Ordering::SeqCst);
    tokio::time::sleep(POLL * 3).await;
    assert_eq!(
        recorder.running().len(),
        3,
        "work keeps running through distributor failures"
    );
    assert_eq!(recorder.runs().len(), 3, "and is not restarted");
    node.stop().await.expect("stop");
}

// ===== server-side loss: loss signal, lock-delay, panicking driver calls =====

fn start_with_poll<D: Distributor>(
    driver: impl shardlock_core::Driver,
    distributor: D,
    node: &str,
    recorder: &Recorder,
    poll: Duration,
) -> CoordinatorHandle {
    Coordinator::builder(driver, distributor, RecordingAgent::new(recorder.clone()))
        .node_id(NodeId::new(node))
        .poll_interval(poll)
        .pause_interval(Duration::from_millis(100))
        .start_jitter(Duration::from_millis(20))
        .lock_loss_timeout(Duration::from_millis(300))
        .stop_timeout(Duration::from_millis(300))
        .restart_backoff(Duration::from_millis(50), Duration::from_millis(500))
        .build()
        .expect("valid config")
        .start()
        .expect("start")
}

/// The server ends a holder's session while the holder sleeps through a
/// long poll: its agents must stop on the loss signal, not at its next
/// verify, and the node that takes over must not start before they stopped.
/// (Without the signal, `a` would run for 30 s beside `b`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_ended_session_stops_agents_at_once() {
    // A 30 s poll needs a release window beyond poll + deadlines.
    let server = MemoryServer::with_release_window(Duration::from_secs(60));
    let recorder = Recorder::new();
    let a_id = NodeId::new("a");
    let a = start_with_poll(
        server.driver(),
        single("db", 6),
        "a",
        &recorder,
        Duration::from_secs(30),
    );
    assert!(
        recorder
            .wait_for(Duration::from_secs(5), |r| r.running_on(&a_id) == 6)
            .await,
        "a runs all 6 sets"
    );
    let b = start_with_poll(
        server.driver(),
        single("db", 6),
        "b",
        &recorder,
        Duration::from_millis(100),
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(recorder.running_on(&NodeId::new("b")), 0, "b is a standby");

    let terminated = Instant::now();
    server.terminate_node(&a_id);
    assert!(
        recorder
            .wait_for(Duration::from_secs(5), |r| r.running_on(&a_id) == 0)
            .await,
        "a's agents still run {:?} after the server ended its session",
        terminated.elapsed()
    );
    let stopped_after = terminated.elapsed();
    assert!(
        stopped_after < Duration::from_secs(5),
        "a stopped on the signal ({stopped_after:?}), not at its 30 s poll"
    );
    assert!(
        recorder
            .wait_for(Duration::from_secs(5), |r| all_owned_once(r, &shards(6)))
            .await,
        "b took every set over"
    );
    assert_eq!(recorder.overlaps(), 0, "runs: {:?}", recorder.runs());
    assert_handovers_ordered(&recorder);
    b.stop().await.expect("stop b");
    a.stop().await.expect("stop a");
}

/// A set taken with `try_acquire` starts its agents only after the takeover
/// delay, measured from the grant in the server's history.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_start_after_the_takeover_delay() {
    let server = MemoryServer::new();
    let recorder = Recorder::new();
    let delay = Duration::from_millis(300);
    let a = Coordinator::builder(
        server.driver(),
        single("db", 3),
        RecordingAgent::new(recorder.clone()),
    )
    .node_id(NodeId::new("a"))
    .poll_interval(POLL)
    .start_jitter(Duration::ZERO)
    .takeover_delay(delay)
    .build()
    .expect("valid config")
    .start()
    .expect("start");
    assert!(
        recorder
            .wait_for(Duration::from_secs(5), |r| r.running_on(&NodeId::new("a"))
                == 3)
            .await
    );
    let grants: Vec<Instant> = server
        .events()
        .iter()
        .filter(|e| e.kind == LockEventKind::Acquired)
        .map(|e| e.at)
        .collect();
    let first_grant = grants.iter().min().copied().expect("granted");
    for run in recorder.runs() {
        let waited = run.started.duration_since(first_grant);
        assert!(
            waited >= delay,
            "{run:?} started {waited:?} after its grant, before the {delay:?} takeover delay"
        );
    }
    a.stop().await.expect("stop");
}

/// A takeover delay below the driver's loss detection bound is refused:
/// the old holder might still be running the work.
#[tokio::test]
async fn takeover_delay_below_detection_bound_is_refused() {
    let server = MemoryServer::new();
    let driver = server.driver();
    let bound = shardlock_core::Driver::capabilities(&driver)
        .loss_detection_bound
        .expect("the memory driver signals loss");
    assert!(!bound.is_zero());
    let refused = Coordinator::builder(
        driver.clone(),
        single("db", 1),
        RecordingAgent::new(Recorder::new()),
    )
    .takeover_delay(bound / 2)
    .build();
    match refused {
        Err(Error::Config(message)) => {
            assert!(message.contains("takeover_delay"), "{message}")
        }
        other => panic!("expected a config error, got {other:?}"),
    }
    let allowed = Coordinator::builder(
        driver,
        single("db", 1),
        RecordingAgent::new(Recorder::new()),
    )
    .takeover_delay(bound / 2)
    .allow_unsafe_timing()
    .build();
    assert!(allowed.is_ok());
}

/// The leadership guard carries the session's loss signal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leadership_guard_signals_loss() {
    let server = MemoryServer::new();
    let node = NodeId::new("leader");
    let key = shardlock_core::LockKey::new("leadership-loss").expect("valid");
    let guard =
        shardlock_core::acquire_leadership(&server.driver(), &DatabaseId::new("db"), &node, key)
            .await
            .expect("leader");
    let lost = guard.lost();
    assert!(!lost.is_cancelled());
    server.terminate_node(&node);
    tokio::time::timeout(Duration::from_secs(5), lost.cancelled())
        .await
        .expect("the guard's loss signal fires when the server ends the session");
    drop(guard);
}

mod panicking {
    //! A driver wrapper whose `verify` panics on demand.

    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    use shardlock_core::{
        CancellationToken, Capabilities, DatabaseId, Driver, Holds, LockKey, NodeId, Result,
        Session,
    };
    use shardlock_memory::{MemoryDriver, MemorySession};

    #[derive(Debug, Clone)]
    pub(super) struct PanickyDriver {
        pub(super) inner: MemoryDriver,
        pub(super) panic: Arc<AtomicBool>,
        /// What it answers for `Driver::connect_timeout`.
        pub(super) connect_timeout: Option<std::time::Duration>,
    }

    #[derive(Debug)]
    pub(super) struct PanickySession {
        inner: MemorySession,
        panic: Arc<AtomicBool>,
    }

    impl Driver for PanickyDriver {
        type Session = PanickySession;

        fn name(&self) -> &'static str {
            "panicky"
        }

        async fn connect(&self, database: &DatabaseId, node: &NodeId) -> Result<PanickySession> {
            Ok(PanickySession {
                inner: self.inner.connect(database, node).await?,
                panic: Arc::clone(&self.panic),
            })
        }

        fn capabilities(&self) -> Capabilities {
            self.inner.capabilities()
        }

        fn connect_timeout(&self) -> Option<std::time::Duration> {
            self.connect_timeout
        }
    }

    impl Session for PanickySession {
        fn holds(&self) -> &Holds {
            self.inner.holds()
        }

        async fn try_acquire(&mut self, keys: &[LockKey]) -> Result<Vec<bool>> {
            self.inner.try_acquire(keys).await
        }

        async fn acquire(&mut self, key: &LockKey, cancel: &CancellationToken) -> Result<bool> {
            self.inner.acquire(key, cancel).await
        }

        async fn release_many(&mut self, keys: &[LockKey]) -> Result<Vec<bool>> {
            self.inner.release_many(keys).await
        }

        async fn verify(&mut self) -> Result<()> {
            if self.panic.load(Ordering::SeqCst) {
                panic!("injected panic in verify");
            }
            self.inner.verify().await
        }

        async fn close(self) -> Result<()> {
            self.inner.close().await
        }
    }
}

/// A driver call that panics is a lost session: the agents stop first, then
/// the session (and so its locks) goes, then the node reconnects. Never
/// "nothing happened" with agents running on a dropped session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn panicking_driver_call_stops_agents_before_the_session_goes() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    let server = MemoryServer::new();
    let recorder = Recorder::new();
    let a_id = NodeId::new("a");
    let panic = Arc::new(AtomicBool::new(false));
    let driver = panicking::PanickyDriver {
        inner: server.driver(),
        panic: Arc::clone(&panic),
        connect_timeout: None,
    };
    let a = start_with_poll(driver, single("db", 3), "a", &recorder, POLL);
    assert!(
        recorder
            .wait_for(Duration::from_secs(5), |r| r.running_on(&a_id) == 3)
            .await
    );
    panic.store(true, Ordering::SeqCst);
    assert!(
        recorder
            .wait_for(Duration::from_secs(5), |r| r.running_on(&a_id) == 0)
            .await,
        "agents still run after their session's verify panicked"
    );
    let last_stop = recorder
        .runs()
        .iter()
        .filter_map(|r| r.stopped)
        .max()
        .expect("a's runs stopped");
    // The session was dropped after the agents stopped: its locks were
    // given back no earlier than that.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let released: Vec<Instant> = server
            .events()
            .iter()
            .filter(|e| e.node == a_id && e.kind != LockEventKind::Acquired)
            .map(|e| e.at)
            .collect();
        if released.len() >= 3 {
            assert!(
                released.iter().all(|at| *at >= last_stop),
                "a lock was freed before the agents stopped"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the panicked session kept its locks"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic.store(false, Ordering::SeqCst);
    assert!(
        recorder
            .wait_for(Duration::from_secs(5), |r| r.running_on(&a_id) == 3)
            .await,
        "a reconnects and runs its sets again"
    );
    assert_eq!(recorder.overlaps(), 0);
    a.stop().await.expect("stop");
}

/// A projection leader whose session the server ends stops applying at once
/// with `LeadershipLost` (through the guard's loss signal), instead of
/// applying on until its next checkpoint write is fenced off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn projection_stops_on_leadership_loss() {
    use shardlock_contract_tests::{Applied, TestProjector};
    use shardlock_core::{
        CancellationToken, DriverLeadership, ProjectionBackend, ProjectionError, ProjectionRunner,
    };
    use shardlock_memory::{MemoryCheckpoints, MemoryEventLog};

    let server = MemoryServer::new();
    let events = MemoryEventLog::new();
    for i in 1..=10_000 {
        assert_eq!(events.append(i), i);
    }
    let node = NodeId::new("projector-node");
    let backend = ProjectionBackend {
        events,
        checkpoints: MemoryCheckpoints::new(),
        leadership: DriverLeadership::new(server.driver(), DatabaseId::new("db"), node.clone()),
    };
    let applied = Applied::default();
    let projector = TestProjector::new("loss", "leader", &applied).slow(Duration::from_millis(2));
    let cancel = CancellationToken::new();
    let run = {
        let (backend, projector, cancel) = (backend.clone(), projector.clone(), cancel.clone());
        tokio::spawn(async move {
            ProjectionRunner::new(&projector, &backend)
                .run(&cancel)
                .await
        })
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while applied.all().len() < 20 {
        assert!(Instant::now() < deadline, "the projection does not start");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    server.terminate_node(&node);
    let terminated = Instant::now();
    let result = tokio::time::timeout(Duration::from_secs(5), run)
        .await
        .expect("the runner stops after its leadership is lost")
        .expect("task");
    let applied_at_stop = applied.all().len();
    assert!(
        matches!(result, Err(ProjectionError::LeadershipLost { .. })),
        "{result:?}"
    );
    eprintln!(
        "projection stopped {:?} after the server ended its session, {applied_at_stop} events applied",
        terminated.elapsed()
    );
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        applied.all().len(),
        applied_at_stop,
        "nothing applied after the stop"
    );
}

/// The coordinator's connect deadline stays above the driver's own connect
/// timeout, so the driver's typed timeout (naming the server) is reported
/// rather than a bare deadline.
#[tokio::test]
async fn connect_deadline_stays_above_the_drivers_own() {
    let server = MemoryServer::new();
    let driver = panicking::PanickyDriver {
        inner: server.driver(),
        panic: Default::default(),
        connect_timeout: Some(Duration::from_secs(15)),
    };
    let coordinator = Coordinator::builder(
        driver.clone(),
        single("db", 1),
        RecordingAgent::new(Recorder::new()),
    )
    .build()
    .expect("valid config");
    assert_eq!(
        coordinator.config().connect_timeout,
        Duration::from_secs(16)
    );
    let short = Coordinator::builder(
        panicking::PanickyDriver {
            connect_timeout: Some(Duration::from_secs(2)),
            ..driver
        },
        single("db", 1),
        RecordingAgent::new(Recorder::new()),
    )
    .build()
    .expect("valid config");
    assert_eq!(
        short.config().connect_timeout,
        Duration::from_secs(10),
        "a driver timeout below the default leaves the default"
    );
}

// ===== scale: 10,000-set steady state, batched agent start =====

/// Counts agent starts, and ends every running agent (with an error) when
/// told to.
#[derive(Clone, Default)]
struct Quitting {
    starts: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    quit: std::sync::Arc<tokio::sync::Notify>,
}

impl Agent for Quitting {
    async fn run(&self, _shard: &ShardId, ctx: AgentContext) -> Result<(), AgentError> {
        let quit = self.quit.notified();
        self.starts
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        tokio::select! {
            _ = ctx.cancel.cancelled() => Ok(()),
            _ = quit => Err("told to quit".into()),
        }
    }
}

/// More sets than one batch of agent starts: every agent starts exactly
/// once; a cycle that changes nothing publishes the very same owned list
/// (shared, not copied); and agents that end in the steady state are still
/// seen and restarted (supervision no longer walks every set each cycle).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_sets_start_in_batches_and_steady_cycles_copy_nothing() {
    const N: usize = 700;
    let server = MemoryServer::new();
    let agent = Quitting::default();
    let handle = Coordinator::builder(server.driver(), single("db", N), agent.clone())
        .node_id(NodeId::new("a"))
        .poll_interval(Duration::from_millis(50))
        .pause_interval(Duration::from_millis(50))
        .start_jitter(Duration::ZERO)
        .restart_backoff(Duration::from_millis(20), Duration::from_millis(100))
        .build()
        .expect("valid config")
        .start()
        .expect("start");
    let starts = || agent.starts.load(std::sync::atomic::Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(10);
    while starts() < N && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(starts(), N, "every agent started");
    let mut rx = handle.assignment();
    let first = rx.borrow_and_update().clone();
    assert_eq!(first.owned.len(), N);
    assert!(first.owned.iter().all(|s| s.held));
    let mut later = first.clone();
    while later.cycles < first.cycles + 2 {
        rx.changed().await.expect("running");
        later = rx.borrow_and_update().clone();
    }
    assert!(
        std::sync::Arc::ptr_eq(&first.owned, &later.owned),
        "steady cycles publish the same owned list"
    );
    assert_eq!(starts(), N, "no agent started twice");
    agent.quit.notify_waiters();
    let deadline = Instant::now() + Duration::from_secs(10);
    while starts() < 2 * N && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(starts(), 2 * N, "every agent that ended was restarted");
    let now = rx.borrow_and_update().clone();
    assert_eq!(now.owned.len(), N, "no set was lost meanwhile");
    handle.stop().await.expect("stop");
}
