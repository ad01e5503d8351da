//! Projection runner scenarios and the checkpoint-store contract, for every
//! backend.

use std::collections::BTreeSet;
use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use shardlock_core::{
    BoxError, CancellationToken, CheckpointError, CheckpointStore, DeadLetter, DriverLeadership,
    EventReader, NodeId, Positioned, ProjectionBackend, ProjectionError, ProjectionOptions,
    ProjectionRunner, Projector, ProjectorCoordinator,
};

use crate::harness::{unique_name, Harness};

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

/// Runs a projector as a follower: retries while another node leads.
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
    let follower = {
        let p = TestProjector::new(&name, "b", &applied).slow(Duration::from_millis(1));
        let b = backend(h, &events, &checkpoints, "proj-b");
        let c = cancel.clone();
        tokio::spawn(async move { follow::<H>(b, p, c).await })
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

/// Instantiates the projection scenarios for a [`ProjectionHarness`]
/// expression of type `Option<H>`.
#[macro_export]
macro_rules! projection_tests {
    ($harness:expr) => {
        $crate::driver_contract_tests!(@tests $harness;
            projection_leader_killed_resumes,
            projection_stale_leader_fenced_off,
            projection_failing_event,
            projection_cancel_releases_leadership,
        );
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn checkpoint_store_contract() {
            let Some(harness) = $harness else { return; };
            let store = $crate::ProjectionHarness::checkpoints(&harness).await;
            $crate::checkpoint_store_contract(&store).await;
        }
    };
}
