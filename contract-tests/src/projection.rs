//! Projection runner scenarios and the checkpoint-store contract, for every
//! backend.

use std::collections::BTreeSet;
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use shardlock_core::{
    projection_leadership_key, BoxError, CancellationToken, Capabilities, CheckpointError,
    CheckpointStore, DatabaseId, DeadLetter, Driver, DriverLeadership, EventReader, NodeId,
    Positioned, ProjectionBackend, ProjectionError, ProjectionOptions, ProjectionRunner, Projector,
    ProjectorCoordinator, Session,
};

use crate::harness::{unique_name, within, Harness};

/// What a backend provides for the projection scenarios.
pub trait ProjectionHarness: Harness {
    /// The event stream type; payloads are `i64` equal to their position.
    type Events: EventReader<Event = i64> + Clone + Send + Sync + 'static;
    /// The checkpoint store type.
    type Checkpoints: CheckpointStore + Clone + Send + Sync + 'static;

    /// A fresh stream holding events `1..=n`.
    fn stream(&self, n: usize) -> impl Future<Output = Self::Events> + Send;

    /// The checkpoint store.
    fn checkpoints(&self) -> impl Future<Output = Self::Checkpoints> + Send;

    /// Ends every session of `node` as a crash would (its locks are freed).
    fn kill_node(&self, node: &NodeId) -> impl Future<Output = ()> + Send;
}

/// Records the positions a projector applied, in order.
#[derive(Debug, Clone, Default)]
pub struct Applied(Arc<Mutex<Vec<(String, i64)>>>);

impl Applied {
    fn push(&self, who: &str, position: i64) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((who.to_string(), position));
    }

    /// Every (runner, position) applied so far.
    pub fn all(&self) -> Vec<(String, i64)> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn positions(&self) -> BTreeSet<i64> {
        self.all().into_iter().map(|(_, p)| p).collect()
    }
}

/// A test projector: checks payload == position, records, may sleep or fail.
#[derive(Debug, Clone)]
pub struct TestProjector {
    name: String,
    who: String,
    applied: Applied,
    delay: Duration,
    fail_at: Option<i64>,
}

impl TestProjector {
    /// A projector named `name`, run by `who`, recording into `applied`.
    pub fn new(name: &str, who: &str, applied: &Applied) -> Self {
        Self {
            name: name.to_string(),
            who: who.to_string(),
            applied: applied.clone(),
            delay: Duration::ZERO,
            fail_at: None,
        }
    }

    /// Sleeps this long per event.
    pub fn slow(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }

    /// Always fails the event at `position`.
    pub fn failing_at(mut self, position: i64) -> Self {
        self.fail_at = Some(position);
        self
    }
}

impl Projector for TestProjector {
    type Event = i64;

    fn name(&self) -> &str {
        &self.name
    }

    async fn apply(&self, event: &Positioned<i64>) -> Result<(), BoxError> {
        assert_eq!(
            event.event, event.position,
            "events arrive with their own position"
        );
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        if self.fail_at == Some(event.position) {
            return Err(format!("poison event {}", event.position).into());
        }
        self.applied.push(&self.who, event.position);
        Ok(())
    }
}

fn fast_options() -> ProjectionOptions {
    ProjectionOptions::default()
        .batch_size(25)
        .retries(3, Duration::from_millis(5))
        .idle(Duration::from_millis(10), Duration::from_millis(50))
}

type Backend<H> = ProjectionBackend<
    <H as ProjectionHarness>::Events,
    <H as ProjectionHarness>::Checkpoints,
    DriverLeadership<<H as Harness>::Driver>,
>;

fn backend<H: ProjectionHarness>(
    h: &H,
    events: &H::Events,
    checkpoints: &H::Checkpoints,
    node: &str,
) -> Backend<H> {
    ProjectionBackend {
        events: events.clone(),
        checkpoints: checkpoints.clone(),
        leadership: DriverLeadership::new(h.driver(), h.database(), NodeId::new(node)),
    }
}

/// Runs a projector as a follower that polls: retries while another node
/// leads.
async fn follow<H: ProjectionHarness>(
    backend: Backend<H>,
    projector: TestProjector,
    cancel: CancellationToken,
) -> Result<(), ProjectionError> {
    loop {
        match ProjectionRunner::new(&projector, &backend)
            .options(fast_options())
            .run(&cancel)
            .await
        {
            Err(ProjectionError::LeadershipError { .. }) if !cancel.is_cancelled() => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            other => return other,
        }
    }
}

/// Runs a projector as a follower that waits for leadership in the
/// database ([`ProjectionOptions::wait_for_leadership`]): one call.
async fn follow_waiting<H: ProjectionHarness>(
    backend: Backend<H>,
    projector: TestProjector,
    cancel: CancellationToken,
) -> Result<(), ProjectionError> {
    ProjectionRunner::new(&projector, &backend)
        .options(fast_options().wait_for_leadership(true))
        .run(&cancel)
        .await
}

async fn wait_until(within: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if done() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    done()
}

/// The leader dies mid-stream: the follower resumes from the last
/// checkpoint; no event is skipped and the checkpoint never moves back.
pub async fn projection_leader_killed_resumes<H: ProjectionHarness>(h: &H) {
    const TOTAL: i64 = 300;
    let name = unique_name("proj-kill");
    let events = h.stream(TOTAL as usize).await;
    let checkpoints = h.checkpoints().await;
    let applied = Applied::default();
    let cancel = CancellationToken::new();
    let leader = {
        let p = TestProjector::new(&name, "a", &applied).slow(Duration::from_millis(2));
        let b = backend(h, &events, &checkpoints, "proj-a");
        let c = cancel.clone();
        tokio::spawn(async move { follow::<H>(b, p, c).await })
    };
    assert!(
        wait_until(Duration::from_secs(10), || applied.positions().len() >= 60).await,
        "leader made progress"
    );
    // The follower waits for leadership in the database.
    let follower = {
        let p = TestProjector::new(&name, "b", &applied).slow(Duration::from_millis(1));
        let b = backend(h, &events, &checkpoints, "proj-b");
        let c = cancel.clone();
        tokio::spawn(async move { follow_waiting::<H>(b, p, c).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        applied.all().iter().all(|(who, _)| who == "a"),
        "the follower waits while the leader leads"
    );
    // The leader's epoch, read before the crash (the follower may claim a
    // newer one the moment the leader's lock is gone).
    let leader_epoch = checkpoints
        .load(&name)
        .await
        .expect("load")
        .expect("claimed")
        .epoch;
    // Crash: the runner stops mid-stream and its sessions die.
    leader.abort();
    let _ = leader.await;
    h.kill_node(&NodeId::new("proj-a")).await;
    let at_kill = checkpoints
        .load(&name)
        .await
        .expect("load")
        .expect("checkpoint exists");
    let mut last_seen = at_kill.position;
    let complete = wait_until(Duration::from_secs(30), || {
        applied.positions().len() as i64 >= TOTAL
    })
    .await;
    assert!(
        complete,
        "the follower finished the stream: {} of {TOTAL}",
        applied.positions().len()
    );
    let mut final_cp = at_kill;
    let deadline = Instant::now() + Duration::from_secs(10);
    while final_cp.position < TOTAL && Instant::now() < deadline {
        if let Some(cp) = checkpoints.load(&name).await.expect("load") {
            assert!(
                cp.position >= last_seen,
                "checkpoint moved back: {} < {last_seen}",
                cp.position
            );
            last_seen = cp.position;
            final_cp = cp;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        final_cp.position, TOTAL,
        "final checkpoint reaches the end: {final_cp:?}"
    );
    let all = applied.all();
    let first_b = all
        .iter()
        .find(|(who, _)| who == "b")
        .map(|(_, p)| *p)
        .expect("b applied events");
    assert!(
        first_b <= at_kill.position + 1,
        "b resumed at {first_b}, after the checkpoint {} (an event was skipped)",
        at_kill.position
    );
    let positions = applied.positions();
    assert_eq!(
        positions,
        (1..=TOTAL).collect(),
        "every event applied at least once"
    );
    assert!(
        final_cp.epoch > leader_epoch,
        "the follower claimed a newer epoch than the leader's {leader_epoch}: {final_cp:?}"
    );
    eprintln!(
        "projection: leader killed at checkpoint {}, follower resumed at {first_b}, {} events re-applied",
        at_kill.position,
        all.len() as i64 - TOTAL
    );
    cancel.cancel();
    let _ = follower.await;
}

/// A leader that lost its lock but keeps running is fenced off at its next
/// checkpoint write; the new leader's progress is not disturbed.
pub async fn projection_stale_leader_fenced_off<H: ProjectionHarness>(h: &H) {
    const TOTAL: i64 = 200;
    let name = unique_name("proj-stale");
    let events = h.stream(TOTAL as usize).await;
    let checkpoints = h.checkpoints().await;
    let applied = Applied::default();
    let cancel = CancellationToken::new();
    let stale = {
        let p = TestProjector::new(&name, "stale", &applied).slow(Duration::from_millis(5));
        let b = backend(h, &events, &checkpoints, "proj-stale");
        let c = cancel.clone();
        tokio::spawn(async move {
            ProjectionRunner::new(&p, &b)
                .options(fast_options())
                .run(&c)
                .await
        })
    };
    assert!(wait_until(Duration::from_secs(10), || applied.positions().len() >= 30).await);
    // Its leadership session dies, but the runner does not notice.
    h.kill_node(&NodeId::new("proj-stale")).await;
    let fresh = {
        let p = TestProjector::new(&name, "fresh", &applied);
        let b = backend(h, &events, &checkpoints, "proj-fresh");
        let c = cancel.clone();
        tokio::spawn(async move { follow::<H>(b, p, c).await })
    };
    let stale_result = tokio::time::timeout(Duration::from_secs(20), stale)
        .await
        .expect("the stale leader stops")
        .expect("task");
    // A driver with a loss signal stops the runner as the session dies
    // (`LeadershipLost`); without one, the runner keeps going until its next
    // checkpoint write is refused (`FencedOff`). Either way it stopped
    // without moving the checkpoint past the new leader.
    match &stale_result {
        Err(ProjectionError::FencedOff { .. }) => {
            eprintln!("projection: the stale leader was fenced off at its next checkpoint write")
        }
        Err(ProjectionError::LeadershipLost { .. }) => {
            eprintln!("projection: the stale leader stopped on its loss signal")
        }
        other => {
            panic!("stale leader must be fenced off or stop on its loss signal, got {other:?}")
        }
    }
    assert!(
        wait_until(Duration::from_secs(20), || applied.positions().len() as i64
            >= TOTAL)
        .await,
        "the new leader finished"
    );
    let mut done = false;
    for _ in 0..200 {
        if checkpoints
            .load(&name)
            .await
            .expect("load")
            .map(|c| c.position)
            == Some(TOTAL)
        {
            done = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(done, "the new leader's checkpoint reached the end");
    cancel.cancel();
    let _ = fresh.await;
}

/// A dead-letter hook that remembers what it got.
#[derive(Debug, Clone, Default)]
pub struct RecordingDeadLetter(Arc<Mutex<Vec<i64>>>);

impl DeadLetter<i64> for RecordingDeadLetter {
    async fn record(&self, _: &str, event: &Positioned<i64>, _: &BoxError) -> Result<(), BoxError> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(event.position);
        Ok(())
    }
}

/// A failing event is retried; without a hook the runner stops and the
/// checkpoint stays before it; with a hook it is recorded and skipped.
pub async fn projection_failing_event<H: ProjectionHarness>(h: &H) {
    let events = h.stream(20).await;
    let checkpoints = h.checkpoints().await;
    let cancel = CancellationToken::new();

    let name = unique_name("proj-fail");
    let applied = Applied::default();
    let p = TestProjector::new(&name, "a", &applied).failing_at(7);
    let b = backend(h, &events, &checkpoints, "proj-fail");
    let result = ProjectionRunner::new(&p, &b)
        .options(fast_options())
        .run(&cancel)
        .await;
    match result {
        Err(ProjectionError::Apply {
            position, attempts, ..
        }) => {
            assert_eq!(position, 7);
            assert_eq!(attempts, 3, "retried up to max_attempts");
        }
        other => panic!("expected Apply error, got {other:?}"),
    }
    let cp = checkpoints.load(&name).await.expect("load").expect("row");
    assert_eq!(
        cp.position, 6,
        "the checkpoint stays before the failing event"
    );

    let name = unique_name("proj-dlq");
    let applied = Applied::default();
    let hook = RecordingDeadLetter::default();
    let p = TestProjector::new(&name, "a", &applied).failing_at(7);
    let b = backend(h, &events, &checkpoints, "proj-dlq");
    let run = {
        let cancel = cancel.clone();
        let hook = hook.clone();
        async move {
            ProjectionRunner::new(&p, &b)
                .options(fast_options())
                .dead_letter(hook)
                .run(&cancel)
                .await
        }
    };
    let task = tokio::spawn(run);
    assert!(wait_until(Duration::from_secs(10), || applied.positions().len() >= 19).await);
    let mut reached = false;
    for _ in 0..200 {
        if checkpoints
            .load(&name)
            .await
            .expect("load")
            .map(|c| c.position)
            == Some(20)
        {
            reached = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(reached, "the runner moved past the dead-lettered event");
    cancel.cancel();
    task.await.expect("task").expect("clean stop");
    assert_eq!(*hook.0.lock().unwrap_or_else(|p| p.into_inner()), vec![7]);
    assert!(!applied.positions().contains(&7));
}

/// Cancellation stops the runner promptly and releases leadership, also
/// when the runner lives on a current-thread runtime.
pub async fn projection_cancel_releases_leadership<H: ProjectionHarness>(h: &H) {
    let name = unique_name("proj-cancel");
    let events = h.stream(5).await;
    let checkpoints = h.checkpoints().await;
    let applied = Applied::default();
    let cancel = CancellationToken::new();
    let (b, p, c) = (
        backend(h, &events, &checkpoints, "proj-ct"),
        TestProjector::new(&name, "a", &applied),
        cancel.clone(),
    );
    let thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            ProjectionRunner::new(&p, &b)
                .options(fast_options())
                .run(&c)
                .await
        })
    });
    assert!(wait_until(Duration::from_secs(10), || applied.positions().len() == 5).await);
    let cancelled = Instant::now();
    cancel.cancel();
    let result = tokio::task::spawn_blocking(move || thread.join())
        .await
        .expect("join")
        .expect("thread");
    assert!(result.is_ok(), "a cancelled runner returns Ok: {result:?}");
    let stop_took = cancelled.elapsed();
    assert!(
        stop_took < Duration::from_secs(5),
        "stopped promptly: {stop_took:?}"
    );
    let other = DriverLeadership::new(h.driver(), h.database(), NodeId::new("proj-next"));
    let mut led = false;
    for _ in 0..200 {
        if other.try_lead(&name).await.expect("try_lead").is_some() {
            led = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(led, "leadership was released when the runner stopped");
    let cp = checkpoints.load(&name).await.expect("load").expect("row");
    assert_eq!(cp.position, 5);
}

/// The stored epoch of `name`, once it is above `above`, within `limit`.
async fn epoch_above<C: CheckpointStore>(
    checkpoints: &C,
    name: &str,
    above: i64,
    limit: Duration,
) -> Option<i64> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(cp) = checkpoints.load(name).await.expect("load") {
            if cp.epoch > above {
                return Some(cp.epoch);
            }
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// A follower started with [`ProjectionOptions::wait_for_leadership`] waits
/// in the database (the harness sees it waiting on the projector's
/// [`projection_leadership_key`]), applies nothing while the leader leads,
/// and takes over as soon as the leader stops (its runner steps down); a
/// waiting follower cancelled before it leads answers `Ok` promptly and
/// takes nothing.
pub async fn projection_follower_waits_in_database<H: ProjectionHarness>(h: &H) {
    const TOTAL: i64 = 30;
    let settle = h.settle();
    let name = unique_name("proj-wait");
    let key = projection_leadership_key(&name).expect("key");
    let events = h.stream(TOTAL as usize).await;
    let checkpoints = h.checkpoints().await;
    let applied = Applied::default();
    let (stop_a, stop_b, stop_c) = (
        CancellationToken::new(),
        CancellationToken::new(),
        CancellationToken::new(),
    );
    let leader = {
        let p = TestProjector::new(&name, "a", &applied);
        let b = backend(h, &events, &checkpoints, "proj-wait-a");
        let c = stop_a.clone();
        tokio::spawn(async move { follow_waiting::<H>(b, p, c).await })
    };
    assert!(
        wait_until(settle, || applied.positions().len() as i64 == TOTAL).await,
        "the first runner leads and applies the stream"
    );
    let leader_epoch = checkpoints
        .load(&name)
        .await
        .expect("load")
        .expect("claimed")
        .epoch;
    let mut follower = {
        let p = TestProjector::new(&name, "b", &applied);
        let b = backend(h, &events, &checkpoints, "proj-wait-b");
        let c = stop_b.clone();
        tokio::spawn(async move { follow_waiting::<H>(b, p, c).await })
    };
    let seen = within(settle + h.slack(), "seeing the follower wait", async {
        tokio::select! {
            seen = h.wait_until_waiting(&key) => seen,
            done = &mut follower => panic!("the follower returned instead of waiting: {done:?}"),
        }
    })
    .await;
    if !seen {
        eprintln!("NOT SEEN: projection follower: the harness cannot see a waiter; it only slept");
    }
    assert!(
        !follower.is_finished(),
        "the follower waits while the leader leads"
    );
    assert!(
        applied.all().iter().all(|(who, _)| who == "a"),
        "the follower applies nothing while waiting"
    );
    // A second waiting follower, cancelled before it leads: `Ok`, promptly,
    // holding nothing (checked below: `b`, not `c`, takes over).
    let waiter = {
        let p = TestProjector::new(&name, "c", &applied);
        let b = backend(h, &events, &checkpoints, "proj-wait-c");
        let c = stop_c.clone();
        tokio::spawn(async move { follow_waiting::<H>(b, p, c).await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    let cancelled = Instant::now();
    stop_c.cancel();
    let result = within(settle, "a cancelled waiting follower", waiter)
        .await
        .expect("task");
    assert!(
        result.is_ok(),
        "a follower cancelled while waiting answers Ok: {result:?}"
    );
    let took = cancelled.elapsed();
    assert!(
        took < settle,
        "the cancelled follower stopped promptly: {took:?}"
    );
    // The leader stops: its runner steps down and the follower, waiting in
    // the database, takes over at once.
    let stopped = Instant::now();
    stop_a.cancel();
    within(settle, "the leader's stop", leader)
        .await
        .expect("task")
        .expect("the leader stops cleanly");
    let epoch = epoch_above(&checkpoints, &name, leader_epoch, settle)
        .await
        .expect("the waiting follower claimed the subscription after the leader stopped");
    eprintln!(
        "projection follower: took over {:?} after the leader was told to stop (epoch {leader_epoch} -> {epoch})",
        stopped.elapsed()
    );
    assert!(
        applied.all().iter().all(|(who, _)| who != "c"),
        "the cancelled follower never led"
    );
    assert!(!follower.is_finished(), "the new leader keeps leading");
    stop_b.cancel();
    within(settle, "the follower's stop", follower)
        .await
        .expect("task")
        .expect("the new leader stops cleanly");
}

/// A [`Driver`] that counts the sessions it opens (a wrapper around the
/// harness's driver), so a clause can tell how many connections a
/// leadership source made.
#[derive(Debug, Clone)]
pub struct CountingDriver<D> {
    inner: D,
    connects: Arc<AtomicUsize>,
}

impl<D: Driver> CountingDriver<D> {
    /// Wraps `inner`; clones share the count.
    pub fn new(inner: D) -> Self {
        Self {
            inner,
            connects: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Sessions opened so far (attempts, successful or not).
    pub fn connects(&self) -> usize {
        self.connects.load(Ordering::SeqCst)
    }
}

impl<D: Driver> Driver for CountingDriver<D> {
    type Session = D::Session;

    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn connect(
        &self,
        database: &DatabaseId,
        node: &NodeId,
    ) -> impl Future<Output = shardlock_core::Result<Self::Session>> + Send {
        self.connects.fetch_add(1, Ordering::SeqCst);
        self.inner.connect(database, node)
    }

    fn lock_release_window(&self) -> Option<Duration> {
        self.inner.lock_release_window()
    }

    fn connect_timeout(&self) -> Option<Duration> {
        self.inner.connect_timeout()
    }

    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
}

/// [`DriverLeadership`] keeps one session per database for its attempts: a
/// follower's refused `try_lead`s and its `wait_lead` reuse one connection;
/// `wait_lead` waits in the database and is granted when the leader steps
/// down; a cancelled `wait_lead` answers `None` and holds nothing; the
/// guard's loss signal fires when its session is ended from outside; a
/// guard dropped on a current-thread runtime frees the key.
pub async fn leadership_attempts_share_one_session<H: Harness>(h: &H) {
    const ATTEMPTS: usize = 20;
    let settle = h.settle();
    let name = unique_name("lead-share");
    let key = projection_leadership_key(&name).expect("key");
    let db = h.database();
    let leader = DriverLeadership::new(h.driver(), db.clone(), NodeId::new("share-a"));
    let counting = CountingDriver::new(h.driver());
    let follower = DriverLeadership::new(counting.clone(), db.clone(), NodeId::new("share-b"));
    let guard = within(settle, "first try_lead", leader.try_lead(&name))
        .await
        .expect("try_lead")
        .expect("nobody leads yet");
    assert_eq!(
        guard.key(),
        &key,
        "leadership is held on projection_leadership_key"
    );
    assert!(
        guard.session().is_some_and(|s| s.held().contains(&key)),
        "the guard's session holds the key"
    );
    for i in 0..ATTEMPTS {
        let refused = within(settle, "a refused try_lead", follower.try_lead(&name))
            .await
            .expect("try_lead");
        assert!(refused.is_none(), "attempt {i}: another node leads");
    }
    assert_eq!(
        counting.connects(),
        1,
        "{ATTEMPTS} refused attempts share one session (one connection)"
    );
    // A cancelled wait answers None and leaves the session parked.
    let cancelled = CancellationToken::new();
    cancelled.cancel();
    let none = within(
        settle,
        "a cancelled wait_lead",
        follower.wait_lead(&name, &cancelled),
    )
    .await
    .expect("wait_lead");
    assert!(none.is_none(), "a cancelled wait gets no guard");
    // A waiting follower, on the same session.
    let cancel = CancellationToken::new();
    let mut waiting = {
        let (follower, name, cancel) = (follower.clone(), name.clone(), cancel.clone());
        tokio::spawn(async move {
            let guard = follower.wait_lead(&name, &cancel).await;
            (guard, Instant::now())
        })
    };
    let seen = within(settle + h.slack(), "seeing wait_lead wait", async {
        tokio::select! {
            seen = h.wait_until_waiting(&key) => seen,
            done = &mut waiting => panic!(
                "wait_lead returned instead of waiting: {:?}",
                done.map(|(guard, _)| guard.map(|g| g.is_some()))
            ),
        }
    })
    .await;
    if !seen {
        eprintln!("NOT SEEN: leadership: the harness cannot see a waiter; it only slept");
    }
    assert!(
        !waiting.is_finished(),
        "wait_lead waits while another node leads"
    );
    let stepped_down = Instant::now();
    within(settle, "step_down", leader.step_down(guard)).await;
    let (guard, granted) = within(settle, "wait_lead granted after step_down", waiting)
        .await
        .expect("task");
    let guard = guard.expect("wait_lead").expect("granted");
    eprintln!(
        "leadership: wait_lead granted {:?} after step_down",
        granted.saturating_duration_since(stepped_down)
    );
    assert_eq!(
        counting.connects(),
        1,
        "refused attempts, a cancelled wait and a granted wait: one session"
    );
    // The guard's loss signal is its own session's.
    let lost = <DriverLeadership<CountingDriver<H::Driver>> as ProjectorCoordinator>::lost(&guard)
        .expect("DriverLeadership guards tell their loss");
    assert!(!lost.is_cancelled());
    h.terminate(guard.session().expect("the guard holds its session"))
        .await;
    within(settle, "the guard's loss signal", lost.cancelled()).await;
    drop(guard);
    // The next attempt needs a new session (the last one went to the guard).
    let again = within(settle, "try_lead after the loss", async {
        loop {
            if let Some(guard) = leader.try_lead(&name).await.expect("try_lead") {
                return guard;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    // A guard dropped inside a current-thread runtime (then the runtime
    // itself) frees the key.
    let driver = h.driver();
    let (db2, name2) = (db.clone(), unique_name("lead-ct"));
    let name3 = name2.clone();
    let thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let lead = DriverLeadership::new(driver, db2, NodeId::new("share-ct"));
            let guard = lead.try_lead(&name3).await.expect("try_lead");
            assert!(guard.is_some(), "nobody leads {name3}");
            drop(guard);
        });
    });
    tokio::task::spawn_blocking(move || thread.join())
        .await
        .expect("join")
        .expect("the current-thread runtime's thread");
    let freed = within(
        settle,
        "leadership freed by a drop on a current-thread runtime",
        async {
            loop {
                if let Some(guard) = leader.try_lead(&name2).await.expect("try_lead") {
                    return guard;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        },
    )
    .await;
    within(settle, "step_down", leader.step_down(freed)).await;
    within(settle, "step_down", leader.step_down(again)).await;
}

/// How many drop / re-acquire rounds [`leadership_drop_then_reacquire`]
/// runs.
pub const DROP_REACQUIRE_ROUNDS: usize = 300;

/// A leadership guard dropped, then the key taken again **at once** by an
/// open session (of the same node or another): granted every time, in
/// [`DROP_REACQUIRE_ROUNDS`] rounds. The driver's drop frees the key before
/// another session of this process can ask for it (SQLite: a re-acquire
/// waits for the dropped session's release in flight).
///
/// Each round, the next leader first tries while the guard is held (refused,
/// which leaves its session open and parked), so the attempt after the drop
/// is one round trip on a connection that is already there: the race the
/// clause is about, with no connect in between to hide it.
pub async fn leadership_drop_then_reacquire<H: Harness>(h: &H) {
    let settle = h.settle();
    let name = unique_name("lead-drop");
    let db = h.database();
    let nodes = [
        DriverLeadership::new(h.driver(), db.clone(), NodeId::new("drop-a")),
        DriverLeadership::new(h.driver(), db.clone(), NodeId::new("drop-b")),
    ];
    let mut guard = within(settle, "first try_lead", nodes[0].try_lead(&name))
        .await
        .expect("try_lead")
        .expect("nobody leads yet");
    let started = Instant::now();
    let mut refused = Vec::new();
    for round in 0..DROP_REACQUIRE_ROUNDS {
        // Next leaders go a, b, b, a, a, b, ...: the same node and the other.
        let next = &nodes[round.div_ceil(2) % 2];
        let early = within(settle, "try_lead while led", next.try_lead(&name))
            .await
            .expect("try_lead");
        assert!(
            early.is_none(),
            "round {round}: the key is held by the guard"
        );
        drop(guard);
        guard = match within(settle, "try_lead after the drop", next.try_lead(&name))
            .await
            .expect("try_lead")
        {
            Some(guard) => guard,
            None => {
                refused.push(round);
                within(settle, "leadership freed", async {
                    loop {
                        if let Some(guard) = next.try_lead(&name).await.expect("try_lead") {
                            return guard;
                        }
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                })
                .await
            }
        };
    }
    drop(guard);
    eprintln!(
        "leadership: {DROP_REACQUIRE_ROUNDS} drop/re-acquire rounds in {:?}, {} refused",
        started.elapsed(),
        refused.len()
    );
    assert!(
        refused.is_empty(),
        "a re-acquire right after a guard's drop was refused in {} of {DROP_REACQUIRE_ROUNDS} rounds: {refused:?}",
        refused.len()
    );
}

/// Checkpoint-store contract: claim bumps the epoch, saves are fenced by
/// epoch, positions never move backwards, names are independent.
pub async fn checkpoint_store_contract<C: CheckpointStore>(store: &C) {
    let name = unique_name("cp");
    let other = format!("{name}-'; DROP TABLE subscriptions; -- ü");
    assert!(
        store.load(&name).await.expect("load").is_none(),
        "unknown subscription"
    );
    let first = store.claim(&name).await.expect("claim");
    assert_eq!(first.position, 0);
    store.save(&name, first.epoch, 10).await.expect("save");
    store
        .save(&name, first.epoch, 5)
        .await
        .expect("a lower position is ignored");
    assert_eq!(
        store.load(&name).await.expect("load").map(|c| c.position),
        Some(10),
        "never backwards"
    );
    let second = store.claim(&name).await.expect("claim");
    assert!(
        second.epoch > first.epoch,
        "claim bumps the epoch: {first:?} -> {second:?}"
    );
    assert_eq!(second.position, 10, "claim keeps the position");
    assert_fenced_off(
        &store.save(&name, first.epoch, 20).await,
        first.epoch,
        second.epoch,
    );
    assert_eq!(
        store.load(&name).await.expect("load").map(|c| c.position),
        Some(10)
    );
    store
        .save(&name, second.epoch, 20)
        .await
        .expect("current epoch saves");
    let o = store.claim(&other).await.expect("claim other");
    assert_eq!(o.position, 0, "subscriptions are independent");
    store.save(&other, o.epoch, 3).await.expect("save other");
    assert_eq!(
        store.load(&name).await.expect("load").map(|c| c.position),
        Some(20)
    );
    assert_eq!(
        store.load(&other).await.expect("load").map(|c| c.position),
        Some(3)
    );
}

/// Checkpoint-store contract, refusals: a save without a claim is
/// [`CheckpointError::NotClaimed`] (saying to call `claim()`), a save with
/// another epoch is [`CheckpointError::FencedOff`], and a refused save
/// changes nothing: `load` answers exactly what it answered before, `None`
/// for a subscription never claimed.
pub async fn checkpoint_store_refusals<C: CheckpointStore>(store: &C) {
    let name = unique_name("cp-refused");
    for epoch in [1, 0, -3, i64::MAX] {
        let refused = store.save(&name, epoch, 5).await;
        assert_not_claimed(&refused, &name);
        assert_eq!(
            store.load(&name).await.expect("load"),
            None,
            "a refused save (epoch {epoch}) of a subscription never claimed creates no row"
        );
    }
    let message = match store.save(&name, 1, 5).await {
        Err(e) => e.to_string(),
        Ok(()) => panic!("a save without a claim must be refused"),
    };
    assert!(
        message.contains("claim()"),
        "the error says to call claim() first: {message}"
    );
    let first = store.claim(&name).await.expect("claim");
    store.save(&name, first.epoch, 7).await.expect("save");
    let before = store.load(&name).await.expect("load");
    assert_eq!(
        before.map(|c| (c.position, c.epoch)),
        Some((7, first.epoch))
    );
    assert_fenced_off(
        &store.save(&name, first.epoch + 1, 9).await,
        first.epoch + 1,
        first.epoch,
    );
    assert_eq!(
        store.load(&name).await.expect("load"),
        before,
        "a save with a newer epoch than the stored one changes nothing"
    );
    assert_not_claimed(&store.save(&name, 0, 9).await, &name);
    assert_eq!(
        store.load(&name).await.expect("load"),
        before,
        "a save with epoch 0 changes nothing"
    );
    let second = store.claim(&name).await.expect("claim");
    let claimed = store.load(&name).await.expect("load");
    assert_fenced_off(
        &store.save(&name, first.epoch, 20).await,
        first.epoch,
        second.epoch,
    );
    assert_eq!(
        store.load(&name).await.expect("load"),
        claimed,
        "a stale save changes nothing"
    );
}

/// Asserts that a checkpoint write for `subscription` was refused because
/// it was never claimed ([`CheckpointError::NotClaimed`]); for stores' own
/// transactional writes (`save_in`) as well as [`CheckpointStore::save`].
pub fn assert_not_claimed<T: fmt::Debug>(result: &Result<T, CheckpointError>, subscription: &str) {
    match result {
        Err(CheckpointError::NotClaimed { subscription: s }) => assert_eq!(s, subscription),
        other => {
            panic!("a write to {subscription:?} without a claim must be NotClaimed, got {other:?}")
        }
    }
}

/// Asserts that a checkpoint write with the stale epoch `ours` was refused
/// because the store holds the newer epoch `current`
/// ([`CheckpointError::FencedOff`]); for stores' own transactional writes
/// (`save_in`) as well as [`CheckpointStore::save`].
pub fn assert_fenced_off<T: fmt::Debug>(
    result: &Result<T, CheckpointError>,
    ours: i64,
    current: i64,
) {
    match result {
        Err(CheckpointError::FencedOff {
            ours: o,
            current: c,
            ..
        }) => assert_eq!(
            (*o, *c),
            (ours, current),
            "fenced off with (ours, current) epochs {:?}, expected {:?}",
            (o, c),
            (ours, current)
        ),
        other => panic!(
            "a write with stale epoch {ours} (current {current}) must be fenced off, got {other:?}"
        ),
    }
}

/// Instantiates the projection scenarios and the checkpoint-store contract
/// (both parts, [`checkpoint_store_contract`] and
/// [`checkpoint_store_refusals`]) for a [`ProjectionHarness`] expression of
/// type `Option<H>`: every driver crate with a checkpoint store runs it.
/// The leadership clauses that need no checkpoint store
/// ([`leadership_attempts_share_one_session`],
/// [`leadership_drop_then_reacquire`]) are part of
/// [`driver_contract_tests!`](crate::driver_contract_tests), so every driver
/// runs them.
#[macro_export]
macro_rules! projection_tests {
    ($harness:expr) => {
        $crate::driver_contract_tests!(@tests $harness;
            projection_leader_killed_resumes,
            projection_stale_leader_fenced_off,
            projection_failing_event,
            projection_cancel_releases_leadership,
            projection_follower_waits_in_database,
        );
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn checkpoint_store_contract() {
            let Some(harness) = $harness else { return; };
            let store = $crate::ProjectionHarness::checkpoints(&harness).await;
            $crate::checkpoint_store_contract(&store).await;
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn checkpoint_store_refusals() {
            let Some(harness) = $harness else { return; };
            let store = $crate::ProjectionHarness::checkpoints(&harness).await;
            $crate::checkpoint_store_refusals(&store).await;
        }
    };
}
