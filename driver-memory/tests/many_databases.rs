//! Many databases: one that cannot be reached, or stops answering, delays
//! no other database's cycles; its own deadline still stands.
//!
//! The faults are per database, so the memory driver is wrapped: a
//! database listed as *dead* never finishes a connect, and a *stalled*
//! database's calls wait until it is let go. Each test's deadlines are far
//! longer than its waits: a coordinator that waited for the faulty database
//! would never reach the state the test waits for.

use std::collections::HashSet;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use shardlock_contract_tests::{shards, Recorder, RecordingAgent};
use shardlock_core::{
    Assignment, CancellationToken, Coordinator, CoordinatorHandle, DatabaseId, Distributor, Driver,
    Health, Holds, LockKey, LockSet, NodeId, Result, Session, SessionSignals, ShardId,
    SharedTenants,
};
use shardlock_distributors::MultiTenanted;
use shardlock_memory::{MemoryDriver, MemoryServer};
use tokio::sync::watch;

/// Bound on every wait (generous: the check is the state reached, not when).
const PATIENCE: Duration = Duration::from_secs(20);
/// Longer than any test runs: a coordinator that waited for it would hang.
const FOREVER: Duration = Duration::from_secs(3600);

/// Per-database faults shared by the wrapped driver and its sessions.
#[derive(Clone, Default)]
struct Faults {
    /// Connects to these never finish.
    dead: Arc<Mutex<HashSet<DatabaseId>>>,
    /// Calls on sessions of these wait while the flag is up.
    stalled: Arc<Mutex<Vec<Gate>>>,
}

/// A database and its stall switch.
type Gate = (DatabaseId, watch::Sender<bool>);

impl Faults {
    fn kill(&self, db: &str) {
        lock(&self.dead).insert(DatabaseId::new(db));
    }

    fn gate(&self, db: &DatabaseId) -> watch::Receiver<bool> {
        let mut stalled = lock(&self.stalled);
        if let Some((_, tx)) = stalled.iter().find(|(d, _)| d == db) {
            return tx.subscribe();
        }
        let (tx, rx) = watch::channel(false);
        stalled.push((db.clone(), tx));
        rx
    }

    fn stall(&self, db: &str, on: bool) {
        let db = DatabaseId::new(db);
        drop(self.gate(&db));
        for (d, tx) in lock(&self.stalled).iter() {
            if *d == db {
                tx.send_replace(on);
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[derive(Clone)]
struct FaultyDriver {
    inner: MemoryDriver,
    faults: Faults,
}

struct FaultySession {
    inner: <MemoryDriver as Driver>::Session,
    gate: watch::Receiver<bool>,
}

impl FaultySession {
    /// Waits while the database is stalled.
    async fn pass(&mut self) {
        let _ = self.gate.wait_for(|stalled| !*stalled).await;
    }
}

impl Driver for FaultyDriver {
    type Session = FaultySession;

    fn name(&self) -> &'static str {
        "faulty-memory"
    }

    fn connect(
        &self,
        database: &DatabaseId,
        node: &NodeId,
    ) -> impl Future<Output = Result<Self::Session>> + Send {
        let (inner, faults) = (self.inner.clone(), self.faults.clone());
        let (database, node) = (database.clone(), node.clone());
        async move {
            if lock(&faults.dead).contains(&database) {
                std::future::pending::<()>().await;
            }
            let gate = faults.gate(&database);
            Ok(FaultySession {
                inner: inner.connect(&database, &node).await?,
                gate,
            })
        }
    }

    fn lock_release_window(&self) -> Option<Duration> {
        self.inner.lock_release_window()
    }

    fn capabilities(&self) -> shardlock_core::Capabilities {
        self.inner.capabilities()
    }
}

impl Session for FaultySession {
    fn holds(&self) -> &Holds {
        self.inner.holds()
    }

    fn signals(&self) -> SessionSignals {
        self.inner.signals()
    }

    async fn try_acquire(&mut self, keys: &[LockKey]) -> Result<Vec<bool>> {
        self.pass().await;
        self.inner.try_acquire(keys).await
    }

    async fn acquire(&mut self, key: &LockKey, cancel: &CancellationToken) -> Result<bool> {
        self.pass().await;
        self.inner.acquire(key, cancel).await
    }

    async fn release_many(&mut self, keys: &[LockKey]) -> Result<Vec<bool>> {
        self.pass().await;
        self.inner.release_many(keys).await
    }

    async fn release_announced(&mut self, keys: &[LockKey], clean: &[bool]) -> Result<Vec<bool>> {
        self.pass().await;
        self.inner.release_announced(keys, clean).await
    }

    async fn probe(&mut self, keys: &[LockKey]) -> Result<Vec<bool>> {
        self.pass().await;
        self.inner.probe(keys).await
    }

    async fn verify(&mut self) -> Result<()> {
        self.pass().await;
        self.inner.verify().await
    }

    async fn close(self) -> Result<()> {
        self.inner.close().await
    }
}

fn tenants(names: &[&str]) -> SharedTenants {
    SharedTenants::new(names.iter().map(|n| DatabaseId::new(*n)))
}

fn start(
    driver: FaultyDriver,
    tenants: SharedTenants,
    lock_loss_timeout: Duration,
) -> (CoordinatorHandle, Recorder) {
    let distributor = MultiTenanted::new(tenants, "app", shards(2));
    start_with(driver, distributor, lock_loss_timeout)
}

fn start_with<S: Distributor>(
    driver: FaultyDriver,
    distributor: S,
    lock_loss_timeout: Duration,
) -> (CoordinatorHandle, Recorder) {
    let recorder = Recorder::new();
    let handle = Coordinator::builder(driver, distributor, RecordingAgent::new(recorder.clone()))
        .node_id("n1")
        .poll_interval(Duration::from_millis(100))
        .pause_interval(Duration::from_millis(50))
        .start_jitter(Duration::ZERO)
        .lock_loss_timeout(lock_loss_timeout)
        .connect_timeout(FOREVER)
        .stop_timeout(Duration::from_secs(2))
        .takeover_delay(Duration::ZERO)
        .allow_unsafe_timing()
        .build()
        .expect("coordinator")
        .start()
        .expect("start");
    (handle, recorder)
}

fn owns(a: &Assignment, db: &str) -> bool {
    a.owned.iter().any(|o| o.database.as_str() == db && o.held)
}

/// Waits until the assignment satisfies `want`; panics with the last one.
async fn until(handle: &CoordinatorHandle, what: &str, want: impl Fn(&Assignment) -> bool) {
    let mut rx = handle.assignment();
    let reached = tokio::time::timeout(PATIENCE, rx.wait_for(|a| want(a))).await;
    let last = handle.assignment().borrow().clone();
    assert!(
        matches!(reached, Ok(Ok(_))),
        "never reached: {what}; owned {:?}, cycles {}, health {}",
        last.owned
            .iter()
            .map(|o| o.database.as_str())
            .collect::<Vec<_>>(),
        last.cycles,
        handle.health()
    );
}

fn faulty() -> (FaultyDriver, MemoryServer, Faults) {
    let server = MemoryServer::new();
    let faults = Faults::default();
    let driver = FaultyDriver {
        inner: server.driver(),
        faults: faults.clone(),
    };
    (driver, server, faults)
}

#[tokio::test]
async fn a_database_whose_connect_never_ends_delays_no_other() {
    let (driver, _server, faults) = faulty();
    faults.kill("dead");
    let list = tenants(&["live1", "dead", "live2"]);
    let (handle, _recorder) = start(driver, list.clone(), Duration::from_secs(5));

    until(&handle, "both live tenants owned", |a| {
        owns(a, "live1") && owns(a, "live2")
    })
    .await;
    // Cycles go on while the dead tenant's connect is still out, and a
    // tenant added now is taken by one of them.
    let cycles = handle.assignment().borrow().cycles;
    list.add(DatabaseId::new("live3"));
    until(
        &handle,
        "a tenant added later owned, cycles going on",
        |a| owns(a, "live3") && a.cycles >= cycles + 2,
    )
    .await;
    let a = handle.assignment().borrow().clone();
    assert!(!owns(&a, "dead"), "nothing of the dead tenant is owned");
    let health = handle.health();
    assert!(
        matches!(&health, Health::Degraded { reasons } if reasons.iter().any(|r| r.contains("database dead: connecting"))),
        "health names the dead tenant: {health}"
    );
    handle.stop().await.expect("stop");
}

#[tokio::test]
async fn a_database_that_stops_answering_delays_no_other() {
    let (driver, _server, faults) = faulty();
    let list = tenants(&["live", "slow"]);
    // The stalled verify's own deadline is far away: cycles that waited for
    // it would not come.
    let (handle, _recorder) = start(driver, list.clone(), FOREVER);
    until(&handle, "both owned", |a| {
        owns(a, "live") && owns(a, "slow")
    })
    .await;

    faults.stall("slow", true);
    let cycles = handle.assignment().borrow().cycles;
    list.add(DatabaseId::new("later"));
    until(&handle, "a tenant added while one stalls owned", |a| {
        owns(a, "later") && a.cycles >= cycles + 3
    })
    .await;
    let a = handle.assignment().borrow().clone();
    assert!(
        owns(&a, "slow"),
        "the stalled tenant's set stays owned until its verify answers or its deadline passes"
    );

    faults.stall("slow", false);
    until(&handle, "all three still owned after the stall", |a| {
        owns(a, "live") && owns(a, "slow") && owns(a, "later")
    })
    .await;
    assert_eq!(handle.assignment().borrow().sessions_lost, 0);
    handle.stop().await.expect("stop");
}

#[tokio::test]
async fn a_straggling_verify_still_misses_its_own_deadline() {
    let (driver, server, faults) = faulty();
    let list = tenants(&["live", "slow"]);
    let (handle, recorder) = start(driver, list, Duration::from_millis(500));
    until(&handle, "both owned", |a| {
        owns(a, "live") && owns(a, "slow")
    })
    .await;
    let slow_key = handle
        .assignment()
        .borrow()
        .owned
        .iter()
        .find(|o| o.database.as_str() == "slow")
        .map(|o| o.key.clone())
        .expect("slow's set");

    faults.stall("slow", true);
    // The verify left running fails at its deadline: the set's agents stop
    // and the session is dropped (self-fencing), while "live" keeps its set.
    until(&handle, "the stalled tenant's set given up", |a| {
        !owns(a, "slow") && owns(a, "live") && a.sessions_lost >= 1
    })
    .await;
    assert!(
        recorder
            .running()
            .keys()
            .all(|(db, _)| db.as_str() != "slow"),
        "no agent of the stalled tenant runs: {:?}",
        recorder.running()
    );
    // The dropped session's locks are freed by the server.
    let freed = tokio::time::timeout(PATIENCE, async {
        while server.holder(&DatabaseId::new("slow"), &slow_key).is_some() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(freed.is_ok(), "the lost session's lock is freed");
    faults.stall("slow", false);
    until(&handle, "taken again once it answers", |a| owns(a, "slow")).await;
    handle.stop().await.expect("stop");
}

/// A list of sets the test changes (several sets per database).
#[derive(Clone, Default)]
struct Sets(Arc<Mutex<Vec<LockSet>>>);

impl Sets {
    fn add(&self, db: &str, shard: &str) -> LockKey {
        let key = LockKey::for_shard(db, "app", shard).expect("key");
        lock(&self.0).push(LockSet::new(
            key.clone(),
            DatabaseId::new(db),
            vec![ShardId::new(shard)],
        ));
        key
    }

    fn remove(&self, key: &LockKey) {
        lock(&self.0).retain(|s| &s.key != key);
    }
}

impl Distributor for Sets {
    async fn lock_sets(&self) -> Result<Vec<LockSet>> {
        Ok(lock(&self.0).clone())
    }
}

#[tokio::test]
async fn a_release_asked_during_a_straggling_verify_is_sent_when_it_answers() {
    let (driver, server, faults) = faulty();
    let sets = Sets::default();
    sets.add("live", "a");
    let kept = sets.add("slow", "a");
    let leaving = sets.add("slow", "b");
    let (handle, _recorder) = start_with(driver, sets.clone(), FOREVER);
    let slow = DatabaseId::new("slow");
    until(&handle, "all three owned", |a| a.owned.len() == 3).await;

    faults.stall("slow", true);
    // Let a cycle leave the stalled verify running, then drop one of the
    // stalled database's sets: its agents stop, its release must wait.
    let cycles = handle.assignment().borrow().cycles;
    until(&handle, "cycles going on", |a| a.cycles >= cycles + 2).await;
    sets.remove(&leaving);
    until(&handle, "the removed set stopped", |a| {
        a.owned.iter().all(|o| o.key != leaving)
    })
    .await;
    assert!(
        server.holder(&slow, &leaving).is_some(),
        "still held: the session is inside the stalled verify"
    );

    faults.stall("slow", false);
    let released = tokio::time::timeout(PATIENCE, async {
        while server.holder(&slow, &leaving).is_some() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(
        released.is_ok(),
        "the queued release is sent once the verify answers"
    );
    assert!(
        server.holder(&slow, &kept).is_some(),
        "the other set is kept"
    );
    assert_eq!(handle.assignment().borrow().sessions_lost, 0);
    handle.stop().await.expect("stop");
}
