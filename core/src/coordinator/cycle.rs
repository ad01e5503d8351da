//! The coordinator loop: one cycle every poll interval.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use tokio::sync::{mpsc, watch, Notify, Semaphore};
use tokio::task::{AbortHandle, JoinHandle};
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::{debug, error, info, info_span, warn, Instrument};

use super::agents::{stop_all, Ended, SetAgents};
use super::{Assignment, CoordinatorConfig, OwnedSet};
use crate::agent::Agent;
use crate::balancing::{fair_share, Balancing};
use crate::distributor::Distributor;
use crate::driver::{Driver, Session, Support};
use crate::error::Error;
use crate::health::Health;
use crate::hints::ReleaseHints;
use crate::holds::IdHash;
use crate::ids::DatabaseId;
use crate::key::LockKey;
use crate::lock_set::{Guard, LockSet};
use crate::metrics::{CoordinatorMetrics, LossCause};
use crate::signals::SessionSignals;

/// A database's connection slot.
struct Conn<S> {
    session: Option<S>,
    /// The open session's signals, kept here because the session itself is
    /// moved into a task for each round trip.
    signals: Option<SessionSignals>,
    /// Ends the task that forwards the loss signal to the loop when the
    /// session is replaced or closed.
    _watch: Option<DropGuard>,
    /// Member slots this node holds in the database (balancing): index and
    /// key. Lost with the session.
    members: Vec<(u32, LockKey)>,
    /// Slots the previous probe saw held elsewhere (balancing with a probe
    /// that takes and gives back: a member counts once seen twice in a row).
    seen: HashSet<u32>,
    failures: u32,
    retry_at: Instant,
    /// Why the database has no session (for [`Health`]).
    last_error: Option<String>,
    /// A connect running in the background (its answer comes as
    /// [`Settled::Connected`]).
    connecting: Option<AbortHandle>,
    /// A verify the cycle stopped waiting for: the session is inside it
    /// until it answers ([`Settled::Verified`]) or its deadline passes.
    verifying: Option<AbortHandle>,
    /// Tells a background task's answer from a stale one: each connect and
    /// each verify gets a new generation.
    generation: u64,
    /// Releases asked for while the session was inside a straggling verify:
    /// sent when it comes back.
    pending_release: Vec<(LockKey, bool)>,
}

impl<S> Conn<S> {
    fn new(retry_at: Instant) -> Self {
        Self {
            session: None,
            signals: None,
            _watch: None,
            members: Vec::new(),
            seen: HashSet::new(),
            failures: 0,
            retry_at,
            last_error: None,
            connecting: None,
            verifying: None,
            generation: 0,
            pending_release: Vec::new(),
        }
    }

    /// The session is out in a background task (connecting or a straggling
    /// verify): no round trip can be sent now.
    fn busy(&self) -> bool {
        self.connecting.is_some() || self.verifying.is_some()
    }

    /// Whether the database has a session, here or inside a verify.
    fn has_session(&self) -> bool {
        self.session.is_some() || self.verifying.is_some()
    }

    /// Cancels what runs in the background for this slot (the session
    /// inside a straggling verify is dropped with its task).
    fn abort_background(&mut self) {
        if let Some(task) = self.connecting.take() {
            task.abort();
        }
        if let Some(task) = self.verifying.take() {
            task.abort();
        }
        self.pending_release.clear();
    }

    fn is_lost(&self) -> bool {
        self.signals.as_ref().is_some_and(SessionSignals::is_lost)
    }

    /// Whether a background task's answer of `generation` is the current
    /// one for the handle `task` picks (which it then clears); a stale
    /// answer (the slot was lost, closed or moved on) is not.
    fn answered(
        &mut self,
        generation: u64,
        task: impl FnOnce(&mut Self) -> &mut Option<AbortHandle>,
    ) -> bool {
        generation == self.generation && task(self).take().is_some()
    }
}

/// What granting one database's sets needs, looked up once per batch (not
/// per set): its release hints, the session's loss token, and the time of
/// the grant (every set of a batch was granted by the same round trip).
struct Grant {
    hints: Option<ReleaseHints>,
    parent: CancellationToken,
    since: SystemTime,
    at: Instant,
    /// Sets granted clean (no takeover delay) and not, for the metrics.
    clean: usize,
    delayed: usize,
    /// The sets granted, recorded into the owned tree together at the end
    /// of the batch (see [`Runner::granted_batch`]).
    new: Vec<(LockKey, Owned)>,
}

impl Grant {
    /// Whether each set's last release was announced clean, in order
    /// (forgotten either way; see [`ReleaseHints::take_clean`]).
    fn take_clean(&self, sets: &[(Arc<Listed>, bool)]) -> Vec<bool> {
        match &self.hints {
            Some(hints) => hints.take_clean_many(sets.iter().map(|(set, _)| &set.key)),
            None => vec![false; sets.len()],
        }
    }
}

/// A round trip running in its own task: the session and the result.
type RoundTask<D, T> = JoinHandle<(<D as Driver>::Session, crate::error::Result<T>)>;

/// What a background task of a database's slot answers, through the
/// runner's channel.
enum Settled<S> {
    /// A connect ended.
    Connected {
        db: DatabaseId,
        generation: u64,
        result: crate::error::Result<S>,
    },
    /// A verify ended (how long it took, or why it failed).
    Verified {
        db: DatabaseId,
        generation: u64,
        session: S,
        result: crate::error::Result<Duration>,
    },
}

/// A verify that answers this much later than the others did (and at least
/// [`STRAGGLER_FLOOR`] after the cycle sent them) is left running: the
/// cycle goes on without that database, whose own deadline still stands.
const STRAGGLER_FACTOR: u32 = 4;
/// See [`STRAGGLER_FACTOR`].
const STRAGGLER_FLOOR: Duration = Duration::from_millis(25);

/// Member slots: index and key.
type Slots = Vec<(u32, LockKey)>;

/// What to try per database: sets, and member slots.
type TryPlan = HashMap<DatabaseId, (Vec<Arc<Listed>>, Slots)>;

/// What one database answered to a batched `try_acquire`.
struct TryOutcome {
    db: DatabaseId,
    sets: Vec<(Arc<Listed>, bool)>,
    slots: Vec<((u32, LockKey), bool)>,
}

/// Agents spawned per batch when a cycle starts many sets' agents: the
/// coordinator yields to the runtime between batches, so winning 10,000 sets
/// never makes 10,000 tasks runnable at once.
const AGENT_START_BATCH: usize = 256;

/// A set as the distributor lists it, shared by the distribution and the
/// owned record built from it, with this node's fencing epoch for its key.
struct Listed {
    set: LockSet,
    /// How many times this node acquired the key. Kept with the set so a
    /// grant finds it without a lookup; carried to the key's next listing
    /// when the set changes, and into [`Distribution::retired`] when the
    /// key leaves the table.
    epoch: AtomicU64,
    /// The key's place in key order among the table's keys, so sets won
    /// together are put in key order without comparing names (see
    /// [`Distribution::rank`]). Only a hint: the owned tree sorts anyway.
    rank: AtomicUsize,
}

impl Listed {
    fn new(set: LockSet, epoch: u64, rank: usize) -> Arc<Self> {
        Arc::new(Self {
            set,
            epoch: AtomicU64::new(epoch),
            rank: AtomicUsize::new(rank),
        })
    }

    fn rank(&self) -> usize {
        self.rank.load(Ordering::Relaxed)
    }

    /// Counts one more acquisition of the key; answers its epoch.
    fn next_epoch(&self) -> u64 {
        // Only the coordinator's task touches it: the atomic is for `Sync`.
        self.epoch.fetch_add(1, Ordering::Relaxed) + 1
    }
}

impl std::ops::Deref for Listed {
    type Target = LockSet;

    fn deref(&self) -> &LockSet {
        &self.set
    }
}

/// A key's entry in [`Distribution::table`].
struct Entry {
    listed: Arc<Listed>,
    /// The last list that named the key.
    generation: u64,
}

/// The distributor's sets as last listed, and what the cycle derives from
/// them: built (deduplicated, shuffled, grouped) once per change of the
/// list, not every cycle.
#[derive(Default)]
struct Distribution {
    /// The list as the distributor last handed it out: the same `Arc`
    /// again means unchanged, without comparing.
    source: Option<Arc<[LockSet]>>,
    /// Its sets, one per entry of `source` (a key listed twice gets its
    /// first listing), each shared with the owned records built from it.
    /// An equal list again (another `Arc`) is compared with `source`.
    listed: Vec<Arc<Listed>>,
    /// Every key listed now or still held from an earlier list, with its
    /// listing: a list that names a set again (a tenant's sets after one
    /// more tenant was added, or sets that left and came back) reuses it,
    /// so a new list costs one lookup per set, not a copy of each.
    table: HashMap<LockKey, Entry, IdHash>,
    /// The epochs of keys that left the table (not listed, not held).
    retired: HashMap<LockKey, u64, IdHash>,
    /// Counts the lists taken (see [`Entry::generation`]).
    generation: u64,
    /// Per database, the indices into `listed` of its sets (each key once,
    /// the first listing wins), in a random order: nodes started together
    /// do not all try the same sets first.
    by_db: Vec<(DatabaseId, Vec<usize>)>,
    /// Sets wanted (each key once), and how many of them are exclusive.
    wanted: usize,
    exclusive: usize,
    /// Whether any set is a sentinel.
    sentinels: bool,
}

impl Distribution {
    /// Takes the distributor's new list; answers whether it differs from
    /// the last one (then everything derived is rebuilt).
    fn update(&mut self, sets: Arc<[LockSet]>) -> bool {
        if let Some(source) = &self.source {
            if Arc::ptr_eq(source, &sets) {
                return false;
            }
        }
        if self.source.as_deref() == Some(&*sets) {
            // Keep the new `Arc`: a distributor that caches its list hands
            // this one back next time.
            self.source = Some(sets);
            return false;
        }
        self.generation += 1;
        let generation = self.generation;
        let mut listed = Vec::with_capacity(sets.len());
        // Grouped by database: lists come in runs of one database, so the
        // group is looked up only when the database changes.
        let mut groups: Vec<(DatabaseId, Vec<usize>)> = Vec::new();
        let mut group_of: HashMap<DatabaseId, usize> = HashMap::new();
        let mut current: Option<usize> = None;
        let (mut wanted, mut exclusive, mut sentinels) = (0, 0, false);
        let mut added = false;
        for (i, set) in sets.iter().enumerate() {
            let first = match self.table.get_mut(&set.key) {
                Some(entry) if entry.generation == generation => {
                    // Listed twice: the first listing wins.
                    listed.push(Arc::clone(&entry.listed));
                    continue;
                }
                Some(entry) => {
                    if entry.listed.set != *set {
                        // The set changed: a new listing, the same epoch
                        // and place.
                        let epoch = entry.listed.epoch.load(Ordering::Relaxed);
                        entry.listed = Listed::new(set.clone(), epoch, entry.listed.rank());
                    }
                    entry.generation = generation;
                    Arc::clone(&entry.listed)
                }
                None => {
                    let epoch = self.retired.remove(&set.key).unwrap_or(0);
                    let new = Listed::new(set.clone(), epoch, 0);
                    added = true;
                    let entry = Entry {
                        listed: Arc::clone(&new),
                        generation,
                    };
                    self.table.insert(set.key.clone(), entry);
                    new
                }
            };
            listed.push(first);
            let group = match current {
                Some(g) if groups[g].0 == set.database => g,
                _ => *group_of.entry(set.database.clone()).or_insert_with(|| {
                    groups.push((set.database.clone(), Vec::new()));
                    groups.len() - 1
                }),
            };
            current = Some(group);
            groups[group].1.push(i);
            wanted += 1;
            match set.guard {
                Guard::Exclusive => exclusive += 1,
                Guard::Sentinel => sentinels = true,
            }
        }
        // The old listings go first, so a listing only an owned record
        // still holds is told apart by its count.
        self.listed = listed;
        self.source = Some(sets);
        let Self { table, retired, .. } = self;
        table.retain(|key, entry| {
            let keep = entry.generation == generation || Arc::strong_count(&entry.listed) > 1;
            if !keep {
                retired.insert(key.clone(), entry.listed.epoch.load(Ordering::Relaxed));
            }
            keep
        });
        if added {
            self.rank();
        }
        groups.sort_by(|a, b| a.0.cmp(&b.0));
        for (_, sets) in &mut groups {
            fastrand::shuffle(sets);
        }
        self.by_db = groups;
        self.wanted = wanted;
        self.exclusive = exclusive;
        self.sentinels = sentinels;
        true
    }

    /// Numbers the table's keys in key order (see [`Listed::rank`]): a
    /// sort of every key, run when a list brings new keys, not when it
    /// names known ones again.
    fn rank(&self) {
        let mut keys: Vec<&Arc<Listed>> = self.table.values().map(|e| &e.listed).collect();
        keys.sort_unstable_by(|a, b| a.key.cmp(&b.key));
        for (rank, listed) in keys.into_iter().enumerate() {
            listed.rank.store(rank, Ordering::Relaxed);
        }
    }

    /// Whether `key` is in the current list.
    fn wants(&self, key: &LockKey) -> bool {
        self.table
            .get(key)
            .is_some_and(|entry| entry.generation == self.generation)
    }

    /// Whether `db` has wanted sets.
    fn wants_database(&self, db: &DatabaseId) -> bool {
        self.by_db.iter().any(|(d, _)| d == db)
    }
}

/// A set this node runs.
struct Owned {
    set: Arc<Listed>,
    /// Whether the session holds the key (false only for a sentinel set whose
    /// sentinel is held elsewhere or whose session is down).
    held: bool,
    epoch: u64,
    since: SystemTime,
    /// When its agents were allowed to start (grant + takeover delay, or the
    /// grant itself for a clean handover): released after it, the set's
    /// handover is clean for the next holder too.
    clean_from: Instant,
    agents: SetAgents,
}

impl Owned {
    /// Whether releasing it now (agents stopped) hands it over cleanly.
    fn clean(&self) -> bool {
        Instant::now() >= self.clean_from
    }
}

/// Balancing state carried from cycle to cycle.
#[derive(Default)]
struct Balance {
    /// Cycles in a row this node was seen above its share.
    above: u32,
    members: usize,
    share: Option<usize>,
    moves: u64,
    /// Cycle again soon (membership changed, or surplus left to release).
    hurry: bool,
    /// Members and share seen in the last cycle.
    last_view: Option<(usize, usize)>,
}

pub(super) struct Runner<D: Driver, S, A> {
    driver: D,
    distributor: S,
    agent: Arc<A>,
    config: Arc<CoordinatorConfig>,
    stop: CancellationToken,
    wake: Arc<Notify>,
    /// Woken by any session's loss signal.
    lost: Arc<Notify>,
    /// Woken by any session's release hints.
    hinted: Arc<Notify>,
    tx: watch::Sender<Assignment>,
    /// Declared before `conns`: fields drop in order, so if the task is
    /// aborted the agents are aborted before the sessions (and their locks)
    /// go.
    owned: BTreeMap<LockKey, Owned>,
    /// `owned` as last published; `None` once `owned` changed since.
    published: Option<Arc<[OwnedSet]>>,
    /// Held sets per database, counted with `published`.
    held_per_db: HashMap<DatabaseId, usize>,
    /// Some owned set has agents recorded but not spawned yet.
    launch_pending: bool,
    /// Marked when an agent's task ends: supervision has work.
    agents_ended: Ended,
    distribution: Distribution,
    conns: HashMap<DatabaseId, Conn<D::Session>>,
    /// Sentinel keys found held by another node, so the error is logged once.
    sentinel_conflicts: HashSet<LockKey, IdHash>,
    denied: usize,
    failing: usize,
    cycles: u64,
    sessions_lost: u64,
    balance: Balance,
    wakeups: u64,
    /// The next cycle was triggered by another node's announcement.
    woken_by_hint: bool,
    /// When the sessions were last verified.
    last_verify: Instant,
    metrics: CoordinatorMetrics,
    health: watch::Sender<Health>,
    /// Sets the distributor gave each database in the last cycle.
    wanted_per_db: HashMap<DatabaseId, usize>,
    /// Why the distributor failed in the last cycle, if it did.
    distributor_error: Option<String>,
    /// Background connects and straggling verifies answer here.
    settled_tx: mpsc::UnboundedSender<Settled<D::Session>>,
    settled_rx: mpsc::UnboundedReceiver<Settled<D::Session>>,
    /// Bounds the connects running at once.
    connect_permits: Arc<Semaphore>,
    /// The last generation handed to a slot's background task.
    generation: u64,
    /// The next cycle was triggered by a background task's answer.
    woken_by_settle: bool,
}

impl<D: Driver, S: Distributor, A: Agent> Runner<D, S, A> {
    pub(super) fn new(
        driver: D,
        distributor: S,
        agent: Arc<A>,
        config: Arc<CoordinatorConfig>,
        stop: CancellationToken,
        wake: Arc<Notify>,
        (tx, health): (watch::Sender<Assignment>, watch::Sender<Health>),
    ) -> Self {
        let metrics = CoordinatorMetrics::new(&config.node_id, driver.name());
        let (settled_tx, settled_rx) = mpsc::unbounded_channel();
        let connect_permits = Arc::new(Semaphore::new(config.connect_concurrency.max(1)));
        Self {
            driver,
            distributor,
            agent,
            config,
            stop,
            wake,
            lost: Arc::new(Notify::new()),
            hinted: Arc::new(Notify::new()),
            tx,
            owned: BTreeMap::new(),
            published: None,
            held_per_db: HashMap::new(),
            launch_pending: false,
            agents_ended: Ended::default(),
            distribution: Distribution::default(),
            conns: HashMap::new(),
            sentinel_conflicts: HashSet::default(),
            denied: 0,
            failing: 0,
            cycles: 0,
            sessions_lost: 0,
            balance: Balance::default(),
            wakeups: 0,
            woken_by_hint: false,
            last_verify: Instant::now(),
            metrics,
            health,
            wanted_per_db: HashMap::new(),
            distributor_error: None,
            settled_tx,
            settled_rx,
            connect_permits,
            generation: 0,
            woken_by_settle: false,
        }
    }

    pub(super) async fn run(mut self) {
        let span = info_span!("coordinator", node = %self.config.node_id);
        async move {
            info!(driver = self.driver.name(), "coordinator started");
            let jitter = random_duration(self.config.start_jitter);
            tokio::select! {
                _ = self.stop.cancelled() => {}
                _ = tokio::time::sleep(jitter) => {}
            }
            while !self.stop.is_cancelled() {
                let started = Instant::now();
                self.cycle().await;
                // The cycle ends with its sets recorded (and published);
                // the agents of sets it won are spawned right after, in
                // batches, so winning 10,000 sets is not 10,000 task spawns
                // inside the round (their start is the agents' own: see the
                // ownerless metric).
                self.publish(started.elapsed(), false);
                self.launch_agents().await;
                let pause = if self.failing > 0 {
                    self.config.pause_interval
                } else if self.balance.hurry {
                    // Membership just changed, or a surplus is left: look
                    // again soon rather than a whole poll later.
                    (self.config.poll_interval / 4).min(self.config.pause_interval)
                } else {
                    // ±10 %: nodes started together do not stay in step
                    // (their probes and tries would keep meeting).
                    jittered(self.config.poll_interval)
                };
                // A database waiting to reconnect is tried when its delay
                // is up, not a whole poll later.
                let pause = match self.next_reconnect() {
                    Some(at) => pause.min(at.saturating_duration_since(Instant::now())),
                    None => pause,
                };
                let until = Instant::now() + pause;
                let stopping = loop {
                    tokio::select! {
                        _ = self.stop.cancelled() => break true,
                        _ = self.lost.notified() => {
                            // A session signalled its loss: its agents are
                            // already cancelled (their tokens are children
                            // of its loss token); await them and drop it
                            // now, not at the next poll.
                            self.handle_lost().await;
                            self.publish(Duration::ZERO, false);
                            break false;
                        }
                        _ = self.wake.notified() => break false,
                        Some(settled) = self.settled_rx.recv() => {
                            // A connect or a straggling verify answered: act
                            // on it now (a new session acquires at once; a
                            // failed verify stops its agents at its own
                            // deadline). A verify that came back sound
                            // changes nothing: keep waiting.
                            if self.settle(settled).await {
                                self.woken_by_settle = true;
                                break false;
                            }
                        }
                        _ = self.hinted.notified() => {
                            // Another node released sets: try at once.
                            self.wakeups += 1;
                            self.woken_by_hint = true;
                            debug!("release announced elsewhere: cycling now");
                            break false;
                        }
                        _ = tokio::time::sleep_until(until) => break false,
                    }
                };
                if stopping {
                    break;
                }
            }
            self.shutdown().await;
            self.publish(Duration::ZERO, true);
            info!("coordinator stopped");
        }
        .instrument(span)
        .await;
    }

    /// When the earliest database without a session may connect again
    /// (never sooner than a pause from now when that time has passed, so a
    /// slot nobody asks to connect cannot spin the loop).
    fn next_reconnect(&self) -> Option<Instant> {
        let earliest = self
            .conns
            .values()
            .filter(|c| !c.has_session() && !c.busy())
            .map(|c| c.retry_at)
            .min()?;
        let now = Instant::now();
        Some(if earliest > now {
            earliest
        } else {
            now + self.config.pause_interval
        })
    }

    async fn cycle(&mut self) {
        // Connects and straggling verifies that answered since.
        while let Ok(settled) = self.settled_rx.try_recv() {
            self.settle(settled).await;
        }
        let sets = match tokio::time::timeout(
            self.config.lock_loss_timeout,
            self.distributor.shared_lock_sets(),
        )
        .await
        {
            Ok(Ok(sets)) => sets,
            Ok(Err(e)) => {
                warn!(error = %e.report(), "distributor failed; keeping the current assignment");
                self.distributor_error = Some(e.report().to_string());
                self.verify_sessions().await;
                return;
            }
            Err(_) => {
                warn!("distributor did not answer in time; keeping the current assignment");
                self.distributor_error = Some(format!(
                    "did not answer within {:?}",
                    self.config.lock_loss_timeout
                ));
                self.verify_sessions().await;
                return;
            }
        };
        self.distributor_error = None;
        let balancing = self.distributor.balancing().cloned();
        let changed = self.distribution.update(sets);
        if changed {
            self.wanted_per_db = self
                .distribution
                .by_db
                .iter()
                .map(|(db, sets)| (db.clone(), sets.len()))
                .collect();
        }

        // Sessions first: a lost session's agents stop before anything else.
        // A cycle woken by another node's announcement skips the verify if
        // one ran within the poll interval (loss signals are still handled):
        // each hop of a handover is then one round trip shorter, and every
        // session is still verified at least once per poll.
        // The same holds for a cycle woken by a connect or a verify that
        // answered in the background.
        let woken_early = self.woken_by_hint || self.woken_by_settle;
        if woken_early && self.last_verify.elapsed() < self.config.poll_interval {
            self.handle_lost().await;
        } else {
            self.verify_sessions().await;
            self.last_verify = Instant::now();
        }
        self.woken_by_hint = false;
        self.woken_by_settle = false;
        // Every owned set comes from the distribution, so none can have
        // left it unless it changed.
        if changed {
            self.release_departed().await;
        }
        self.supervise_agents();
        match balancing {
            Some(balancing) => self.acquire_balanced(&balancing).await,
            None => {
                self.balance = Balance::default();
                self.acquire_missing().await;
            }
        }
        self.close_idle_sessions().await;
    }

    /// Verifies every open session in parallel, each under the lock-loss
    /// deadline; a failed one has its agents stopped, then is dropped. A
    /// verify task that panics counts as a failed verify.
    ///
    /// Answers are taken as they come. Once the others are in, a database
    /// whose verify is still out ([`STRAGGLER_FACTOR`] times the slowest
    /// answer so far, at least [`STRAGGLER_FLOOR`]) is not waited for: its
    /// session stays inside the task, the database is skipped until it
    /// answers, and its answer (or its deadline) is acted on when it comes
    /// (see [`settle`](Self::settle)). One slow or dead database does not
    /// hold up the others' cycles.
    async fn verify_sessions(&mut self) {
        self.handle_lost().await;
        let deadline = self.config.lock_loss_timeout;
        let mut waiting: HashMap<DatabaseId, u64> = HashMap::new();
        for (db, conn) in &mut self.conns {
            let Some(mut session) = conn.session.take() else {
                continue;
            };
            self.generation += 1;
            let generation = self.generation;
            let (tx, task_db) = (self.settled_tx.clone(), db.clone());
            let task = tokio::spawn(async move {
                let started = Instant::now();
                let result = guarded("verify", &task_db, deadline, session.verify()).await;
                // The receiver lives as long as the runner; a runner gone
                // drops the session with this message.
                let _ = tx.send(Settled::Verified {
                    db: task_db,
                    generation,
                    session,
                    result: result.map(|()| started.elapsed()),
                });
            });
            conn.verifying = Some(task.abort_handle());
            conn.generation = generation;
            waiting.insert(db.clone(), generation);
        }
        let (sent, total) = (Instant::now(), waiting.len());
        let mut slowest = Duration::ZERO;
        while !waiting.is_empty() {
            let next = if waiting.len() < total {
                let grace = (slowest * STRAGGLER_FACTOR).max(STRAGGLER_FLOOR);
                match tokio::time::timeout_at(sent + grace, self.settled_rx.recv()).await {
                    Ok(next) => next,
                    Err(_) => break,
                }
            } else {
                self.settled_rx.recv().await
            };
            let Some(settled) = next else {
                break;
            };
            if let Settled::Verified { db, generation, .. } = &settled {
                if waiting.get(db) == Some(generation) {
                    waiting.remove(db);
                    slowest = sent.elapsed();
                }
            }
            self.settle(settled).await;
        }
        if !waiting.is_empty() {
            // Debug, not warn: a server answering many sessions' verifies in
            // turn leaves some behind every cycle; one that misses its
            // deadline is logged as a lost session.
            let slow: Vec<&str> = waiting.keys().map(DatabaseId::as_str).collect();
            debug!(
                databases = ?slow,
                waited = ?sent.elapsed(),
                "verify still running: not waiting for it (its deadline still stands)"
            );
        }
    }

    /// Acts on what a background connect or straggling verify answered;
    /// an answer for a slot that moved on since (lost, closed, a newer
    /// task) is dropped with its session. Answers whether a cycle should
    /// follow (a new session, a failed connect or a lost session: not a
    /// verify that came back sound, nor a stale answer).
    async fn settle(&mut self, settled: Settled<D::Session>) -> bool {
        match settled {
            Settled::Connected {
                db,
                generation,
                result,
            } => {
                let Some(conn) = self.conns.get_mut(&db) else {
                    return false;
                };
                if !conn.answered(generation, |c| &mut c.connecting) {
                    return false;
                }
                match result {
                    Ok(session) => {
                        conn.last_error = None;
                        debug!(database = %db, "connected");
                        self.attach(&db, session);
                    }
                    Err(e) => {
                        conn.failures = conn.failures.saturating_add(1);
                        let delay = reconnect_delay(&self.config, conn.failures);
                        conn.retry_at = Instant::now() + delay;
                        conn.last_error = Some(format!("cannot connect: {}", e.report()));
                        warn!(database = %db, error = %e.report(), retry_in = ?delay, "cannot connect");
                    }
                }
                true
            }
            Settled::Verified {
                db,
                generation,
                session,
                result,
            } => {
                let Some(conn) = self.conns.get_mut(&db) else {
                    return false;
                };
                if !conn.answered(generation, |c| &mut c.verifying) {
                    return false;
                }
                match result {
                    Ok(took) => {
                        self.metrics.verified(&db, took);
                        conn.session = Some(session);
                        let queued = std::mem::take(&mut conn.pending_release);
                        if !queued.is_empty() {
                            self.release_keys(&db, &queued).await;
                        }
                        false
                    }
                    Err(e) => {
                        let cause = cause_of(&e, LossCause::Verify);
                        self.lose_session(&db, Some(session), &e, cause).await;
                        true
                    }
                }
            }
        }
    }

    /// Starts opening `db`'s session in the background, at most
    /// `connect_concurrency` at once; the answer comes as
    /// [`Settled::Connected`] and wakes the loop.
    fn start_connect(&mut self, db: &DatabaseId) {
        self.generation += 1;
        let generation = self.generation;
        let (driver, node) = (self.driver.clone(), self.config.node_id.clone());
        let (tx, permits) = (self.settled_tx.clone(), Arc::clone(&self.connect_permits));
        let deadline = self.config.connect_timeout;
        let task_db = db.clone();
        let task = tokio::spawn(async move {
            // The permit is held for the connect alone; its deadline starts
            // once the permit is had. The semaphore is never closed.
            let _permit = permits.acquire_owned().await.ok();
            let result = guarded(
                "connect",
                &task_db,
                deadline,
                driver.connect(&task_db, &node),
            )
            .await;
            let _ = tx.send(Settled::Connected {
                db: task_db,
                generation,
                result,
            });
        });
        let now = Instant::now();
        let conn = self
            .conns
            .entry(db.clone())
            .or_insert_with(|| Conn::new(now));
        conn.connecting = Some(task.abort_handle());
        conn.generation = generation;
        debug!(database = %db, "connecting");
    }

    /// Drops every session whose loss signal fired, its agents stopped
    /// first.
    async fn handle_lost(&mut self) {
        let lost: Vec<DatabaseId> = self
            .conns
            .iter()
            .filter(|(_, c)| c.is_lost())
            .map(|(db, _)| db.clone())
            .collect();
        for db in lost {
            let Some(conn) = self.conns.get_mut(&db) else {
                continue;
            };
            let session = conn.session.take();
            // A session inside a straggling verify goes with its task.
            conn.abort_background();
            let reason = conn
                .signals
                .as_ref()
                .and_then(SessionSignals::reason)
                .unwrap_or_else(|| "the connection ended".to_string());
            let error = Error::session_lost(&db, format!("loss signalled by the driver: {reason}"));
            self.lose_session(&db, session, &error, LossCause::Signal)
                .await;
        }
    }

    /// Puts a (new or returning) session into `db`'s slot; a new one has its
    /// loss signal forwarded to the loop.
    fn attach(&mut self, db: &DatabaseId, session: D::Session) {
        let lost = Arc::clone(&self.lost);
        let conn = self
            .conns
            .entry(db.clone())
            .or_insert_with(|| Conn::new(Instant::now()));
        if conn.signals.is_none() {
            let signals = session.signals();
            let watch = CancellationToken::new();
            let (token, ended) = (signals.lost().clone(), watch.clone());
            drop(tokio::spawn(async move {
                tokio::select! {
                    _ = token.cancelled() => lost.notify_one(),
                    _ = ended.cancelled() => {}
                }
            }));
            if let Some(hints) = signals.release_hints().cloned() {
                let (hinted, ended) = (Arc::clone(&self.hinted), watch.clone());
                drop(tokio::spawn(async move {
                    loop {
                        tokio::select! {
                            _ = hints.released() => hinted.notify_one(),
                            _ = ended.cancelled() => break,
                        }
                    }
                }));
            }
            conn.signals = Some(signals);
            conn._watch = Some(watch.drop_guard());
        }
        conn.session = Some(session);
    }

    /// The token an exclusive set's agents in `db` descend from: the
    /// session's loss token.
    fn parent_token(&self, db: &DatabaseId) -> CancellationToken {
        match self.conns.get(db).and_then(|c| c.signals.as_ref()) {
            Some(signals) => signals.lost().clone(),
            // No session means no lock: should not happen for a grant, but
            // a cancelled parent keeps the agents from running if it does.
            None => {
                let token = CancellationToken::new();
                token.cancel();
                token
            }
        }
    }

    /// Stops the agents of every exclusive set in `db`, **then** drops the
    /// session, and schedules a reconnect.
    async fn lose_session(
        &mut self,
        db: &DatabaseId,
        session: Option<D::Session>,
        reason: &Error,
        cause: LossCause,
    ) {
        let seen = Instant::now();
        let keys: Vec<LockKey> = self
            .owned
            .iter()
            .filter(|(_, o)| &o.set.database == db && o.held)
            .map(|(k, _)| k.clone())
            .collect();
        let mut stopping = Vec::new();
        for key in &keys {
            let exclusive = self
                .owned
                .get(key)
                .is_some_and(|o| o.set.guard == Guard::Exclusive);
            if exclusive {
                if let Some(owned) = self.owned.remove(key) {
                    stopping.push(owned.agents);
                }
            } else if let Some(owned) = self.owned.get_mut(key) {
                owned.held = false;
            }
        }
        if !keys.is_empty() {
            self.published = None;
        }
        let stopped = stopping.len();
        stop_all(stopping, self.config.stop_timeout).await;
        self.metrics.stopped_after_loss(db, seen.elapsed());
        self.metrics.lost(db, cause);
        drop(session);
        self.sessions_lost += 1;
        let names: Vec<&str> = keys.iter().map(LockKey::name).collect();
        error!(
            database = %db,
            error = %reason.report(),
            lost = names.len(),
            stopped_sets = stopped,
            keys = ?names,
            "session lost: agents stopped, locks treated as lost"
        );
        if let Some(conn) = self.conns.get_mut(db) {
            conn.session = None;
            conn.abort_background();
            conn.signals = None;
            conn._watch = None;
            conn.members.clear();
            conn.seen.clear();
            conn.failures = conn.failures.saturating_add(1);
            conn.retry_at = Instant::now() + reconnect_delay(&self.config, conn.failures);
            conn.last_error = Some(reason.report().to_string());
        }
    }

    /// Sets no longer distributed: stop their agents, then release the keys.
    async fn release_departed(&mut self) {
        let distribution = &self.distribution;
        let departed: Vec<LockKey> = self
            .owned
            .keys()
            .filter(|k| !distribution.wants(k))
            .cloned()
            .collect();
        if departed.is_empty() {
            return;
        }
        for set in self.retire(departed).await {
            info!(key = %set.key, database = %set.database, "set left the distribution: agents stopped");
        }
    }

    /// Stops the agents of the owned sets `keys` **then** releases the held
    /// ones, announced, each marked clean when its agents had been allowed
    /// to start (see [`Owned::clean`]). Answers the sets that left.
    async fn retire(&mut self, keys: Vec<LockKey>) -> Vec<Arc<Listed>> {
        let mut leaving = Vec::new();
        let mut stopping = Vec::new();
        for key in keys {
            if let Some(owned) = self.owned.remove(&key) {
                stopping.push(owned.agents);
                leaving.push((owned.set, owned.held, owned.clean_from));
            }
        }
        if !leaving.is_empty() {
            self.published = None;
        }
        stop_all(stopping, self.config.stop_timeout).await;
        let mut by_db: HashMap<DatabaseId, Vec<(LockKey, bool)>> = HashMap::new();
        let mut sets = Vec::with_capacity(leaving.len());
        for (set, held, clean_from) in leaving {
            if held {
                let clean = Instant::now() >= clean_from;
                by_db
                    .entry(set.database.clone())
                    .or_default()
                    .push((set.key.clone(), clean));
            }
            sets.push(set);
        }
        for (db, keys) in by_db {
            self.metrics.handed_off(&db, keys.len());
            self.release_keys(&db, &keys).await;
        }
        sets
    }

    /// Releases `keys` in `db` in one call (one round trip where the driver
    /// can), announced to the database's other sessions with each key's
    /// clean mark; a failure or a missed deadline loses the session.
    async fn release_keys(&mut self, db: &DatabaseId, keys: &[(LockKey, bool)]) {
        let (keys, clean): (Vec<LockKey>, Vec<bool>) = keys.iter().cloned().unzip();
        let deadline = self.config.lock_loss_timeout;
        let Some(conn) = self.conns.get_mut(db) else {
            return;
        };
        let Some(session) = conn.session.as_mut() else {
            if conn.verifying.is_some() {
                // The session is inside a straggling verify: release when
                // it comes back (if it is lost instead, so are the locks).
                conn.pending_release.extend(keys.into_iter().zip(clean));
            }
            return;
        };
        let failure =
            match tokio::time::timeout(deadline, session.release_announced(&keys, &clean)).await {
                Ok(Ok(_)) => {
                    debug!(database = %db, keys = keys.len(), "released");
                    return;
                }
                Ok(Err(e)) => e,
                Err(_) => Error::Timeout {
                    operation: "release",
                    database: db.clone(),
                    after: deadline,
                },
            };
        let session = conn.session.take();
        let cause = cause_of(&failure, LossCause::Error);
        self.lose_session(db, session, &failure, cause).await;
    }

    /// Restarts agents that ended on their own. Walks the sets only when an
    /// agent ended since the last walk or one waits for its restart: a
    /// steady cycle with 10,000 sets does not look at 10,000 tasks.
    fn supervise_agents(&mut self) {
        if self.failing == 0 && !self.agents_ended.take() {
            return;
        }
        let mut failing = 0;
        for owned in self.owned.values_mut() {
            let seen = owned.agents.supervise(
                &self.agent,
                &owned.set,
                owned.epoch,
                &self.config,
                &self.agents_ended,
            );
            failing += seen.waiting;
            for _ in 0..seen.failed {
                self.metrics.agent_failed(&owned.set.database);
            }
            for _ in 0..seen.restarted {
                self.metrics.agent_restarted(&owned.set.database);
            }
        }
        self.failing = failing;
    }

    /// Spawns the agents of sets granted this cycle, [`AGENT_START_BATCH`]
    /// at a time, yielding to the runtime between batches. Each agent still
    /// runs from its set's grant plus takeover delay, not from its spawn.
    async fn launch_agents(&mut self) {
        if !std::mem::take(&mut self.launch_pending) {
            return;
        }
        let mut budget = AGENT_START_BATCH;
        for owned in self.owned.values_mut() {
            while !owned.agents.launch(
                &self.agent,
                &owned.set,
                owned.epoch,
                &self.config,
                &self.agents_ended,
                &mut budget,
            ) {
                tokio::task::yield_now().await;
                budget = AGENT_START_BATCH;
            }
        }
    }

    /// Runs `round` on `db`'s session in a task of its own (so a panic or a
    /// dropped future cannot take the session's agents' guarantees with
    /// it). `None` while `db` has no session at hand: then a connect is
    /// started in the background if none runs and the reconnect delay is
    /// up, and the database is tried again once it answers.
    fn spawn_round<T, F, Fut>(&mut self, db: &DatabaseId, round: F) -> Option<RoundTask<D, T>>
    where
        T: Send + 'static,
        F: FnOnce(D::Session) -> Fut + Send + 'static,
        Fut: Future<Output = (D::Session, crate::error::Result<T>)> + Send + 'static,
    {
        let now = Instant::now();
        let conn = self
            .conns
            .entry(db.clone())
            .or_insert_with(|| Conn::new(now));
        if conn.busy() {
            debug!(database = %db, "session busy (connecting or verifying): skipped this cycle");
            return None;
        }
        match conn.session.take() {
            Some(session) => Some(tokio::spawn(round(session))),
            None => {
                if conn.retry_at <= now {
                    self.start_connect(db);
                } else {
                    debug!(database = %db, "waiting to reconnect");
                }
                None
            }
        }
    }

    /// Awaits round tasks: a success puts the session back, any failure
    /// loses the session (agents stopped first). Answers the successes.
    async fn collect_rounds<T, X>(
        &mut self,
        rounds: Vec<(DatabaseId, X, RoundTask<D, T>)>,
    ) -> Vec<(DatabaseId, X, T)> {
        let mut done = Vec::with_capacity(rounds.len());
        for (db, extra, task) in rounds {
            let (session, result) = match join(task).await {
                Ok((session, result)) => (Some(session), result),
                Err(e) => (None, Err(e)),
            };
            match result {
                Ok(value) => {
                    if let Some(session) = session {
                        self.attach(&db, session);
                    }
                    if let Some(conn) = self.conns.get_mut(&db) {
                        conn.failures = 0;
                        conn.last_error = None;
                    }
                    done.push((db, extra, value));
                }
                Err(e) => {
                    let cause = cause_of(&e, LossCause::Error);
                    self.lose_session(&db, session, &e, cause).await;
                }
            }
        }
        done
    }

    /// One batched `try_acquire` per database of `sets` plus `slots` (member
    /// slots), databases in parallel. Answers, per database reached, the
    /// sets and the slots with whether each was granted.
    async fn try_round(&mut self, plan: TryPlan) -> (Vec<TryOutcome>, usize) {
        let deadline = self.config.lock_loss_timeout;
        let mut rounds = Vec::new();
        let mut unreached = 0usize;
        for (db, (sets, slots)) in plan {
            let mut keys: Vec<LockKey> = sets.iter().map(|s| s.key.clone()).collect();
            keys.extend(slots.iter().map(|(_, k)| k.clone()));
            self.metrics.batch(&db, keys.len());
            let task_db = db.clone();
            let task = self.spawn_round(&db, move |mut session| async move {
                let result = guarded(
                    "try_acquire",
                    &task_db,
                    deadline,
                    session.try_acquire(&keys),
                )
                .await;
                (session, result)
            });
            match task {
                Some(task) => rounds.push((db, (sets, slots), task)),
                None => unreached += sets.len(),
            }
        }
        let asked: usize = rounds.iter().map(|(_, (sets, _), _)| sets.len()).sum();
        let done = self.collect_rounds(rounds).await;
        let answered: usize = done.iter().map(|(_, (sets, _), _)| sets.len()).sum();
        let outcomes = done
            .into_iter()
            .map(|(db, (sets, slots), granted)| {
                let (for_sets, for_slots) = granted.split_at(sets.len().min(granted.len()));
                TryOutcome {
                    sets: sets.into_iter().zip(for_sets.iter().copied()).collect(),
                    slots: slots.into_iter().zip(for_slots.iter().copied()).collect(),
                    db,
                }
            })
            .collect();
        (outcomes, unreached + asked - answered)
    }

    /// The wanted sets this node does not hold, by database. Costs one
    /// pass over the owned sets when it holds them all (the steady state).
    fn missing(&mut self) -> HashMap<DatabaseId, Vec<Arc<Listed>>> {
        let mut by_db: HashMap<DatabaseId, Vec<Arc<Listed>>> = HashMap::new();
        // Owned sets are all wanted (see `release_departed`), and only a
        // sentinel set can be owned without being held: as many owned as
        // wanted, every one held, means none is missing.
        if self.owned.len() == self.distribution.wanted
            && (!self.distribution.sentinels || self.owned.values().all(|o| o.held))
        {
            return by_db;
        }
        for (db, indices) in &self.distribution.by_db {
            let sets: Vec<Arc<Listed>> = indices
                .iter()
                .map(|i| &self.distribution.listed[*i])
                .filter(|set| self.owned.get(&set.key).is_none_or(|o| !o.held))
                .cloned()
                .collect();
            if !sets.is_empty() {
                by_db.insert(db.clone(), sets);
            }
        }
        // Sentinel sets run whether or not the sentinel can be taken.
        let sentinels: Vec<Arc<Listed>> = by_db
            .values()
            .flatten()
            .filter(|s| s.guard == Guard::Sentinel && !self.owned.contains_key(&s.key))
            .cloned()
            .collect();
        for set in sentinels {
            self.start_sentinel(set);
        }
        by_db
    }

    /// Without balancing: batched try-acquire of every wanted set not held,
    /// one round trip per database, databases in parallel; starts the agents
    /// of granted sets.
    async fn acquire_missing(&mut self) {
        let plan = self
            .missing()
            .into_iter()
            .map(|(db, sets)| (db, (sets, Vec::new())))
            .collect();
        let (outcomes, mut denied) = self.try_round(plan).await;
        let mut acquired = 0usize;
        for outcome in outcomes {
            let (mut here_acquired, mut here_denied) = (0, 0);
            let sets = outcome.sets;
            let mut grant = self.grant(&outcome.db, sets.len());
            let clean = grant.take_clean(&sets);
            let mut won = Vec::with_capacity(sets.len());
            for ((set, ok), clean) in sets.into_iter().zip(clean) {
                if ok {
                    won.push((set, clean));
                } else {
                    here_denied += 1;
                    self.denied_set(&set);
                }
            }
            if bulk_merge(won.len(), self.owned.len()) {
                // Granted in key order, the batch is recorded by one merge
                // (see `granted_batch`). By rank, read once per set: no
                // name is compared. Denied sets (a standby node's whole
                // batch) are not sorted.
                won.sort_by_cached_key(|(set, _)| set.rank());
            }
            for (set, clean) in won {
                here_acquired += 1;
                self.granted(set, clean, &mut grant);
            }
            self.granted_batch(&outcome.db, grant);
            self.metrics
                .acquired(&outcome.db, here_acquired, here_denied);
            acquired += here_acquired;
            denied += here_denied;
        }
        self.tally(acquired, denied);
    }

    /// With balancing: learn the live members, release a lasting surplus,
    /// take free sets up to this node's share and give back at once any
    /// taken beyond it (announced, so nodes with room take them).
    async fn acquire_balanced(&mut self, balancing: &Balancing) {
        let member_keys = match balancing.member_keys() {
            Ok(keys) => keys,
            Err(e) => {
                warn!(error = %e.report(), "invalid balancing group: balancing off this cycle");
                return self.acquire_missing().await;
            }
        };
        let total = self.distribution.exclusive;
        let dbs: BTreeSet<DatabaseId> = self
            .distribution
            .by_db
            .iter()
            .map(|(db, _)| db.clone())
            .collect();

        // 1. Probe the member slots in every database (connecting first).
        let deadline = self.config.lock_loss_timeout;
        let mut rounds = Vec::new();
        for db in &dbs {
            let keys = member_keys.clone();
            let task_db = db.clone();
            let task = self.spawn_round(db, move |mut session| async move {
                let result = guarded("probe", &task_db, deadline, session.probe(&keys)).await;
                (session, result)
            });
            if let Some(task) = task {
                rounds.push((db.clone(), (), task));
            }
        }
        let probed = self.collect_rounds(rounds).await;

        // 2. Membership: the live slots per database, and slots to take.
        let native_probe = self.driver.capabilities().probe == Support::Native;
        let mut unconfirmed = false;
        let mut views: BTreeMap<DatabaseId, (Vec<u32>, Vec<u32>)> = BTreeMap::new();
        let mut requests: HashMap<DatabaseId, Vec<(u32, LockKey)>> = HashMap::new();
        for (db, (), elsewhere) in probed {
            let Some(conn) = self.conns.get_mut(&db) else {
                continue;
            };
            let mine: Vec<u32> = conn.members.iter().map(|(i, _)| *i).collect();
            let held_now: HashSet<u32> = (0u32..)
                .zip(&elsewhere)
                .filter(|(_, held)| **held)
                .map(|(i, _)| i)
                .collect();
            // A probe that takes and gives back sees other probes'
            // momentary holds: count a slot seen on two probes in a row (a
            // member holds it throughout; a prober for one round trip). A
            // slot no longer held counts as gone at once.
            let mut live: Vec<u32> = if native_probe {
                held_now.iter().copied().collect()
            } else {
                held_now.intersection(&conn.seen).copied().collect()
            };
            let taken_by_others: Vec<u32> = held_now.iter().copied().collect();
            // Unconfirmed slots: look again soon to confirm them.
            unconfirmed |= !native_probe && held_now != conn.seen;
            conn.seen = held_now;
            let mut counted = mine.clone();
            let need = usize::try_from(balancing.weight)
                .unwrap_or(usize::MAX)
                .saturating_sub(mine.len());
            let wanted_slots: Vec<(u32, LockKey)> = (0u32..)
                .zip(&member_keys)
                .filter(|(i, _)| !mine.contains(i) && !taken_by_others.contains(i))
                .take(need)
                .map(|(i, k)| (i, k.clone()))
                .collect();
            if wanted_slots.len() < need {
                warn!(
                    database = %db,
                    group = %balancing.group,
                    max_members = balancing.max_members,
                    "every member slot is taken: this node gets no share; raise max_members"
                );
            }
            // Counted as ours already: a lost race for a slot is fixed next
            // cycle, and meanwhile this node still counts itself.
            counted.extend(wanted_slots.iter().map(|(i, _)| *i));
            live.extend(counted.iter().copied());
            requests.insert(db.clone(), wanted_slots);
            views.insert(db, (live, counted));
        }
        // The database with the most live slots speaks for the group (all
        // agree once everyone holds its slots everywhere).
        let view = views
            .values()
            .max_by_key(|(live, _)| live.len())
            .cloned()
            .unwrap_or_default();
        let share = fair_share(total, &view.0, &view.1);
        self.balance.members = view.0.len();
        self.balance.share = Some(share);
        // A changed view is confirmed (or corrected) by a quick second look,
        // so settling after a join or a leave takes about a poll, not two.
        let changed =
            self.balance.last_view.replace((view.0.len(), share)) != Some((view.0.len(), share));

        // 3. A lasting surplus goes, a few sets per cycle.
        let held = self
            .owned
            .values()
            .filter(|o| o.held && o.set.guard == Guard::Exclusive)
            .count();
        self.balance.hurry = changed || unconfirmed;
        if held > share {
            self.balance.above += 1;
            if self.balance.above >= balancing.settle_cycles.max(1) {
                let surplus = (held - share).min(balancing.max_moves_per_cycle);
                self.release_surplus(surplus, share).await;
                let left = held - surplus > share;
                self.balance.hurry |= left;
                if !left {
                    // Settled: a later surplus must be seen anew on
                    // `settle_cycles` cycles before anything moves.
                    self.balance.above = 0;
                }
            } else {
                debug!(
                    held,
                    share,
                    seen = self.balance.above,
                    "above fair share: settling"
                );
            }
        } else {
            self.balance.above = 0;
        }

        // 4. Take free sets up to the share (and the slots still missing).
        let mut room = share.saturating_sub(held);
        let mut plan: TryPlan = HashMap::new();
        // At its share, a node tries only sentinel sets (if there are any).
        let missing = if room > 0 || self.distribution.sentinels {
            self.missing()
        } else {
            HashMap::new()
        };
        for (db, sets) in missing {
            let sets: Vec<Arc<Listed>> = if room > 0 {
                sets
            } else {
                sets.into_iter()
                    .filter(|s| s.guard == Guard::Sentinel)
                    .collect()
            };
            plan.entry(db).or_default().0 = sets;
        }
        for (db, slots) in requests {
            if !slots.is_empty() {
                plan.entry(db).or_default().1 = slots;
            }
        }
        plan.retain(|_, (sets, slots)| !sets.is_empty() || !slots.is_empty());
        let (outcomes, mut denied) = self.try_round(plan).await;
        let (mut acquired, mut extras) = (0usize, Vec::new());
        for outcome in outcomes {
            if let Some(conn) = self.conns.get_mut(&outcome.db) {
                for (slot, ok) in &outcome.slots {
                    if *ok && !conn.members.iter().any(|(i, _)| i == &slot.0) {
                        conn.members.push(slot.clone());
                    }
                }
            }
            let mut giving_back = Vec::new();
            let (mut here_acquired, mut here_denied) = (0, 0);
            let sets = outcome.sets;
            let mut grant = self.grant(&outcome.db, sets.len());
            let clean = grant.take_clean(&sets);
            for ((set, ok), clean) in sets.into_iter().zip(clean) {
                if !ok {
                    here_denied += 1;
                    self.denied_set(&set);
                } else if set.guard == Guard::Sentinel {
                    self.granted(set, clean, &mut grant);
                } else if room > 0 {
                    room -= 1;
                    here_acquired += 1;
                    self.granted(set, clean, &mut grant);
                } else {
                    // Won beyond the share: never started, handed on.
                    giving_back.push((set.key.clone(), clean));
                }
            }
            self.granted_batch(&outcome.db, grant);
            self.metrics
                .acquired(&outcome.db, here_acquired, here_denied);
            acquired += here_acquired;
            denied += here_denied;
            if !giving_back.is_empty() {
                extras.push((outcome.db, giving_back));
            }
        }
        for (db, keys) in extras {
            debug!(database = %db, sets = keys.len(), "taken beyond the fair share: handed on");
            self.balance.moves += keys.len() as u64;
            self.release_keys(&db, &keys).await;
        }
        self.tally(acquired, denied);
    }

    /// Stops the agents of `count` sets (the most recently taken first),
    /// then releases them, announced.
    async fn release_surplus(&mut self, count: usize, share: usize) {
        let mut candidates: Vec<(SystemTime, LockKey)> = self
            .owned
            .iter()
            .filter(|(_, o)| o.held && o.set.guard == Guard::Exclusive)
            .map(|(k, o)| (o.since, k.clone()))
            .collect();
        candidates.sort_by_key(|c| std::cmp::Reverse(c.0));
        let keys: Vec<LockKey> = candidates.into_iter().take(count).map(|(_, k)| k).collect();
        let moved = keys.len();
        info!(
            moved,
            share,
            members = self.balance.members,
            "above fair share: stopping agents, releasing surplus sets"
        );
        self.balance.moves += moved as u64;
        self.retire(keys).await;
    }

    /// One line per cycle, not one per lock: 10,000 sets must not mean
    /// 10,000 log lines.
    fn tally(&mut self, acquired: usize, denied: usize) {
        self.denied = denied;
        if acquired > 0 {
            info!(
                acquired,
                denied,
                owned = self.owned.len(),
                "locks acquired: agents started"
            );
        } else if denied > 0 {
            debug!(denied, owned = self.owned.len(), "cycle tally");
        }
    }

    /// The per-database part of granting a batch of up to `sets` of `db`'s
    /// sets.
    fn grant(&self, db: &DatabaseId, sets: usize) -> Grant {
        let conn = self.conns.get(db);
        Grant {
            hints: conn
                .and_then(|c| c.signals.as_ref())
                .and_then(SessionSignals::release_hints)
                .cloned(),
            parent: self.parent_token(db),
            since: SystemTime::now(),
            at: Instant::now(),
            clean: 0,
            delayed: 0,
            new: Vec::with_capacity(sets),
        }
    }

    /// Records what a batch granted in `db`: the sets (a previous record of
    /// a key, a sentinel set's, is replaced and its agents dropped) and the
    /// takeover delays.
    fn granted_batch(&mut self, db: &DatabaseId, grant: Grant) {
        self.metrics.ownerless(db, Duration::ZERO, grant.clean);
        self.metrics
            .ownerless(db, self.config.takeover_delay, grant.delayed);
        if grant.new.is_empty() {
            return;
        }
        self.launch_pending = true;
        self.published = None;
        if bulk_merge(grant.new.len(), self.owned.len()) {
            // Sorted (a batch granted in key order is sorted in one pass),
            // built bottom-up and merged in one pass, not searched for
            // 10,000 times. The batch's records win over previous ones.
            let mut new: BTreeMap<LockKey, Owned> = grant.new.into_iter().collect();
            if self.owned.len() * 8 < new.len() {
                // Few records before (the first acquisition): move those
                // into the batch's tree rather than rebuild it around them.
                for (key, owned) in std::mem::take(&mut self.owned) {
                    new.entry(key).or_insert(owned);
                }
                self.owned = new;
            } else {
                self.owned.append(&mut new);
            }
        } else {
            for (key, owned) in grant.new {
                self.owned.insert(key, owned);
            }
        }
    }

    /// Starts recording a granted set: its agents run after the takeover
    /// delay, or at once when its previous holder announced a clean
    /// handover. A sentinel set already recorded is only marked held.
    fn granted(&mut self, set: Arc<Listed>, clean: bool, grant: &mut Grant) {
        let epoch = set.next_epoch();
        if set.guard == Guard::Sentinel {
            if self.sentinel_conflicts.remove(&set.key) {
                info!(key = %set.key, "sentinel free again: no other solo node seen");
            }
            if let Some(owned) = self.owned.get_mut(&set.key) {
                owned.held = true;
                owned.epoch = epoch;
                self.published = None;
                return;
            }
        }
        let delay = if clean {
            grant.clean += 1;
            Duration::ZERO
        } else {
            grant.delayed += 1;
            self.config.takeover_delay
        };
        debug!(key = %set.key, database = %set.database, shards = set.shards.len(), epoch, clean, "lock acquired: starting agents");
        let agents = SetAgents::new(&set, &grant.parent, grant.at + delay);
        let owned = Owned {
            set,
            held: true,
            epoch,
            since: grant.since,
            clean_from: grant.at + delay,
            agents,
        };
        grant.new.push((owned.set.key.clone(), owned));
    }

    fn denied_set(&mut self, set: &LockSet) {
        if set.guard == Guard::Sentinel && self.sentinel_conflicts.insert(set.key.clone()) {
            error!(
                key = %set.key,
                database = %set.database,
                "another solo node holds the sentinel lock: two nodes declared alone are running the same work"
            );
        }
    }

    fn start_sentinel(&mut self, set: Arc<Listed>) {
        let key = set.key.clone();
        // A sentinel set runs whether or not its session lives.
        let agents = SetAgents::new(&set, &CancellationToken::new(), Instant::now());
        self.launch_pending = true;
        self.published = None;
        self.owned.insert(
            key,
            Owned {
                set,
                held: false,
                epoch: 0,
                since: SystemTime::now(),
                clean_from: Instant::now(),
                agents,
            },
        );
    }

    /// Closes sessions of databases this node no longer runs anything in
    /// (e.g. a removed tenant).
    async fn close_idle_sessions(&mut self) {
        let idle: Vec<DatabaseId> = self
            .conns
            .keys()
            .filter(|db| {
                !self.distribution.wants_database(db)
                    && !self.owned.values().any(|o| &o.set.database == *db)
            })
            .cloned()
            .collect();
        for db in idle {
            if let Some(mut conn) = self.conns.remove(&db) {
                conn.abort_background();
                if let Some(session) = conn.session {
                    let _ =
                        tokio::time::timeout(self.config.lock_loss_timeout, session.close()).await;
                    debug!(database = %db, "closed idle session");
                }
            }
        }
    }

    /// Agents first, then locks, then sessions.
    async fn shutdown(&mut self) {
        let owned = std::mem::take(&mut self.owned);
        self.published = None;
        let mut stopping = Vec::new();
        let mut held: HashMap<DatabaseId, Vec<(LockKey, bool)>> = HashMap::new();
        for (key, o) in owned {
            let clean = o.clean();
            stopping.push(o.agents);
            if o.held {
                held.entry(o.set.database.clone())
                    .or_default()
                    .push((key, clean));
            }
        }
        let agents = stopping.len();
        stop_all(stopping, self.config.stop_timeout).await;
        info!(sets = agents, "agents stopped; releasing locks");
        for (db, keys) in &held {
            self.metrics.handed_off(db, keys.len());
        }
        // Member slots go in the same round trip as the sets, so the nodes
        // the announcement wakes already count one member less.
        for (db, conn) in &self.conns {
            if !conn.members.is_empty() && conn.session.is_some() {
                let slots = conn.members.iter().map(|(_, k)| (k.clone(), false));
                held.entry(db.clone()).or_default().extend(slots);
            }
        }
        for (db, keys) in held {
            self.release_keys(&db, &keys).await;
        }
        for (db, mut conn) in self.conns.drain() {
            // A session still inside a straggling verify or a connect is
            // dropped with its task: the server frees its locks.
            conn.abort_background();
            self.metrics.owned(&db, 0);
            self.metrics.session_open(&db, false);
            if let Some(session) = conn.session {
                match tokio::time::timeout(self.config.lock_loss_timeout, session.close()).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        warn!(database = %db, error = %e.report(), "closing session failed")
                    }
                    Err(_) => warn!(database = %db, "closing session timed out"),
                }
            }
        }
    }

    fn publish(&mut self, cycle: Duration, stopped: bool) {
        if !stopped {
            self.cycles += 1;
        }
        if cycle > Duration::ZERO {
            self.metrics.cycle(cycle);
        }
        // Rebuilt only when the owned sets changed: a steady cycle copies
        // and counts nothing.
        let owned = match &self.published {
            Some(owned) => Arc::clone(owned),
            None => {
                self.held_per_db.clear();
                let held_per_db = &mut self.held_per_db;
                let owned: Arc<[OwnedSet]> = self
                    .owned
                    .values()
                    .map(|o| {
                        if o.held {
                            *held_per_db.entry(o.set.database.clone()).or_default() += 1;
                        }
                        OwnedSet {
                            key: o.set.key.clone(),
                            database: o.set.database.clone(),
                            shards: o.set.shards.clone(),
                            guard: o.set.guard,
                            held: o.held,
                            epoch: o.epoch,
                            since: o.since,
                        }
                    })
                    .collect();
                self.published = Some(Arc::clone(&owned));
                owned
            }
        };
        self.record_gauges();
        let health = self.health_now(stopped);
        self.health.send_if_modified(|old| {
            let changed = *old != health;
            if changed {
                match &health {
                    Health::Healthy => info!("health: healthy"),
                    other => warn!(health = %other, "health changed"),
                }
                *old = health;
            }
            changed
        });
        let assignment = Assignment {
            node: self.config.node_id.clone(),
            owned,
            denied: self.denied,
            failing_agents: self.failing,
            cycles: self.cycles,
            last_cycle: cycle,
            last_cycle_at: Some(SystemTime::now()),
            sessions_lost: self.sessions_lost,
            stopped,
            members: self.balance.members,
            share: self.balance.share,
            moves: self.balance.moves,
            wakeups: self.wakeups,
        };
        self.tx.send_replace(assignment);
    }

    /// The per-database gauges: sets held and wanted, members, sessions.
    fn record_gauges(&mut self) {
        let Self {
            conns,
            wanted_per_db,
            held_per_db,
            balance,
            metrics,
            ..
        } = self;
        let not_connected = wanted_per_db.keys().filter(|db| !conns.contains_key(*db));
        for db in conns.keys().chain(not_connected) {
            metrics.owned(db, held_per_db.get(db).copied().unwrap_or(0));
            // Balancing: the node's share of the group (one group per
            // deployment, usually in one database); else all it is given.
            let wanted = balance
                .share
                .unwrap_or_else(|| wanted_per_db.get(db).copied().unwrap_or(0));
            metrics.wanted(db, wanted);
            if balance.share.is_some() {
                metrics.members(db, balance.members);
            }
            metrics.session_open(db, conns.get(db).is_some_and(Conn::has_session));
        }
    }

    /// Health from what the last cycle saw.
    fn health_now(&self, stopped: bool) -> Health {
        if stopped {
            return Health::Stopped {
                reason: "stopped".to_string(),
            };
        }
        let mut reasons = Vec::new();
        if let Some(e) = &self.distributor_error {
            reasons.push(format!("distributor failed: {e}"));
        }
        let mut dbs: Vec<&DatabaseId> = self.wanted_per_db.keys().collect();
        dbs.sort();
        for db in dbs {
            match self.conns.get(db) {
                Some(conn) if conn.has_session() => {}
                Some(conn) => reasons.push(match (&conn.last_error, conn.connecting.is_some()) {
                    (Some(e), true) => format!("database {db} unreachable: {e} (connecting again)"),
                    (Some(e), false) => format!("database {db} unreachable: {e}"),
                    (None, true) => format!("database {db}: connecting"),
                    (None, false) => format!("database {db} unreachable: reconnecting"),
                }),
                None => reasons.push(format!("database {db}: not connected yet")),
            }
        }
        if self.failing > 0 {
            reasons.push(format!(
                "{} agents failing (restarting with backoff)",
                self.failing
            ));
        }
        Health::from_reasons(reasons)
    }
}

/// Whether `new` sets are recorded into an owned tree of `owned` by one
/// sorted merge (a pass over both) rather than by a search each (about
/// log2 of the tree's size in key comparisons per set).
fn bulk_merge(new: usize, owned: usize) -> bool {
    new > 64 && new * 8 >= owned
}

/// How long a database waits before the next connect after `failures`
/// failures in a row: doubling from the pause interval, but never more than
/// a poll, so a database that returns is back (and health turns healthy)
/// within one poll interval.
fn reconnect_delay(config: &CoordinatorConfig, failures: u32) -> Duration {
    config
        .backoff(config.pause_interval, failures.saturating_sub(1))
        .min(config.poll_interval)
}

/// The loss cause of a failed round trip: a missed deadline, else `other`.
fn cause_of(error: &Error, other: LossCause) -> LossCause {
    if matches!(error, Error::Timeout { .. }) {
        LossCause::Deadline
    } else {
        other
    }
}

/// Runs one driver round trip under `deadline`; a timeout or a panic becomes
/// a session-fatal error, so the caller stops the session's agents first.
async fn guarded<T>(
    operation: &'static str,
    db: &DatabaseId,
    deadline: Duration,
    round_trip: impl Future<Output = crate::error::Result<T>> + Send,
) -> crate::error::Result<T> {
    match tokio::time::timeout(deadline, CatchPanic(Box::pin(round_trip))).await {
        Ok(Ok(result)) => result,
        Ok(Err(panic)) => {
            error!(database = %db, operation, panic = %panic, "a driver call panicked: treating the session as lost");
            Err(Error::TaskFailed {
                task: operation,
                detail: format!("the driver panicked: {panic}"),
            })
        }
        Err(_) => Err(Error::Timeout {
            operation,
            database: db.clone(),
            after: deadline,
        }),
    }
}

/// Awaits a round-trip task; a task that panicked outside [`guarded`] or was
/// cancelled is a session-fatal error (its session is gone with it).
async fn join<T>(task: JoinHandle<T>) -> crate::error::Result<T> {
    task.await.map_err(|e| Error::TaskFailed {
        task: "round trip",
        detail: e.to_string(),
    })
}

/// Turns a panic while polling the inner future into an `Err` with the
/// panic's message, so the session the future borrowed survives to be
/// dropped only after its agents stopped.
struct CatchPanic<F>(Pin<Box<F>>);

impl<F: Future> Future for CatchPanic<F> {
    type Output = Result<F::Output, String>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let inner = self.0.as_mut();
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| inner.poll(cx))) {
            Ok(Poll::Ready(out)) => Poll::Ready(Ok(out)),
            Ok(Poll::Pending) => Poll::Pending,
            Err(payload) => Poll::Ready(Err(panic_text(payload.as_ref()))),
        }
    }
}

/// The message of a panic payload (`&str` or `String`), for logs.
pub(super) fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_string()
    }
}

/// `interval` ± 10 %, at random.
fn jittered(interval: Duration) -> Duration {
    interval.mul_f64(0.9 + fastrand::f64() * 0.2)
}

fn random_duration(max: Duration) -> Duration {
    let max_ms = u64::try_from(max.as_millis()).unwrap_or(u64::MAX);
    if max_ms == 0 {
        Duration::ZERO
    } else {
        Duration::from_millis(fastrand::u64(0..=max_ms))
    }
}

impl<D: Driver, S, A> Drop for Runner<D, S, A> {
    fn drop(&mut self) {
        // Agents are aborted by `SetAgents::drop`; sessions drop and free
        // their locks. Only reached without `shutdown` if the task is aborted.
        if !self.owned.is_empty() {
            error!(
                sets = self.owned.len(),
                "coordinator dropped without stopping; aborting agents"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::ShardId;

    fn set(db: &str, shard: &str) -> LockSet {
        let key = LockKey::for_shard(db, "s", shard).unwrap();
        LockSet::new(key, DatabaseId::new(db), vec![ShardId::new(shard)])
    }

    fn listing<'a>(d: &'a Distribution, s: &LockSet) -> &'a Arc<Listed> {
        &d.table[&s.key].listed
    }

    #[test]
    fn a_key_listed_twice_is_wanted_once_first_listing_winning() {
        let (a, b) = (set("db", "a"), set("db", "b"));
        let mut twice = a.clone();
        twice.shards.push(ShardId::new("other"));
        let mut d = Distribution::default();
        assert!(d.update(Arc::from(vec![a.clone(), b.clone(), twice])));
        assert_eq!((d.wanted, d.exclusive), (2, 2));
        assert_eq!(d.by_db.len(), 1);
        assert_eq!(d.by_db[0].1.len(), 2);
        assert_eq!(listing(&d, &a).set, a, "the first listing wins");
        assert!(d.wants(&a.key) && d.wants(&b.key));
    }

    #[test]
    fn the_same_list_again_changes_nothing() {
        let list: Arc<[LockSet]> = Arc::from(vec![set("db", "a")]);
        let mut d = Distribution::default();
        assert!(d.update(Arc::clone(&list)));
        assert!(!d.update(Arc::clone(&list)), "the same Arc");
        assert!(!d.update(Arc::from(list.to_vec())), "an equal list");
    }

    #[test]
    fn sets_are_grouped_by_database_in_any_order() {
        let list = vec![set("x", "1"), set("y", "1"), set("x", "2"), set("y", "2")];
        let mut d = Distribution::default();
        d.update(Arc::from(list));
        let groups: Vec<(&str, usize)> = d
            .by_db
            .iter()
            .map(|(db, sets)| (db.as_str(), sets.len()))
            .collect();
        assert_eq!(groups, [("x", 2), ("y", 2)]);
        for (db, sets) in &d.by_db {
            assert!(sets.iter().all(|i| &d.listed[*i].database == db));
        }
    }

    #[test]
    fn a_set_listed_again_keeps_its_listing_and_its_epoch() {
        let (a, b) = (set("db", "a"), set("db", "b"));
        let mut d = Distribution::default();
        d.update(Arc::from(vec![a.clone(), b.clone()]));
        assert_eq!(listing(&d, &a).next_epoch(), 1);
        // `a` is held (an owned record shares its listing) while a list
        // without it is taken, then listed again unchanged.
        let held = Arc::clone(listing(&d, &a));
        d.update(Arc::from(vec![b.clone()]));
        assert!(!d.wants(&a.key), "not in the current list");
        d.update(Arc::from(vec![a.clone(), b.clone()]));
        assert!(
            Arc::ptr_eq(listing(&d, &a), &held),
            "no copy of an unchanged set"
        );
        assert_eq!(listing(&d, &a).next_epoch(), 2);
        // Listed changed: a new listing, the epoch carried over.
        let mut changed = a.clone();
        changed.shards.push(ShardId::new("more"));
        d.update(Arc::from(vec![changed.clone(), b.clone()]));
        assert_eq!(listing(&d, &a).set, changed);
        assert_eq!(listing(&d, &a).next_epoch(), 3);
    }

    #[test]
    fn ranks_follow_key_order_as_keys_come_and_change() {
        let names = ["m", "c", "x", "a"];
        let sets: Vec<LockSet> = names.iter().map(|n| set("db", n)).collect();
        let mut d = Distribution::default();
        d.update(Arc::from(sets[..2].to_vec()));
        d.update(Arc::from(sets.clone()));
        let mut by_rank: Vec<&LockSet> = sets.iter().collect();
        by_rank.sort_by_key(|s| listing(&d, s).rank());
        let mut by_key = by_rank.clone();
        by_key.sort_by(|a, b| a.key.cmp(&b.key));
        assert_eq!(by_rank, by_key);
        let mut changed = sets[0].clone();
        changed.shards.push(ShardId::new("more"));
        let rank = listing(&d, &sets[0]).rank();
        d.update(Arc::from(vec![changed, sets[1].clone()]));
        assert_eq!(
            listing(&d, &sets[0]).rank(),
            rank,
            "a changed set keeps its place"
        );
    }

    #[test]
    fn a_key_that_left_the_table_keeps_its_epoch() {
        let (a, b) = (set("db", "a"), set("db", "b"));
        let mut d = Distribution::default();
        d.update(Arc::from(vec![a.clone(), b.clone()]));
        listing(&d, &a).next_epoch();
        listing(&d, &a).next_epoch();
        // Not listed and not held: the key leaves the table.
        d.update(Arc::from(vec![b.clone()]));
        assert!(!d.table.contains_key(&a.key));
        assert_eq!(d.retired.get(&a.key), Some(&2));
        d.update(Arc::from(vec![a.clone(), b.clone()]));
        assert_eq!(listing(&d, &a).next_epoch(), 3);
        assert!(d.retired.is_empty());
    }
}
