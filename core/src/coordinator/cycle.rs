//! The coordinator loop: one cycle every poll interval.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::{debug, error, info, info_span, warn, Instrument};

use super::agents::{stop_all, SetAgents};
use super::{Assignment, CoordinatorConfig, OwnedSet};
use crate::agent::Agent;
use crate::distributor::Distributor;
use crate::driver::{Driver, Session};
use crate::error::Error;
use crate::ids::DatabaseId;
use crate::key::LockKey;
use crate::lock_set::{Guard, LockSet};
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
    failures: u32,
    retry_at: Instant,
}

impl<S> Conn<S> {
    fn new(retry_at: Instant) -> Self {
        Self {
            session: None,
            signals: None,
            _watch: None,
            failures: 0,
            retry_at,
        }
    }

    fn is_lost(&self) -> bool {
        self.signals.as_ref().is_some_and(SessionSignals::is_lost)
    }
}

/// A set this node runs.
struct Owned {
    set: LockSet,
    /// Whether the session holds the key (false only for a sentinel set whose
    /// sentinel is held elsewhere or whose session is down).
    held: bool,
    epoch: u64,
    since: SystemTime,
    agents: SetAgents,
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
    tx: watch::Sender<Assignment>,
    /// Declared before `conns`: fields drop in order, so if the task is
    /// aborted the agents are aborted before the sessions (and their locks)
    /// go.
    owned: BTreeMap<LockKey, Owned>,
    conns: HashMap<DatabaseId, Conn<D::Session>>,
    epochs: HashMap<LockKey, u64>,
    /// Sentinel keys found held by another node, so the error is logged once.
    sentinel_conflicts: HashSet<LockKey>,
    denied: usize,
    failing: usize,
    cycles: u64,
    sessions_lost: u64,
}

impl<D: Driver, S: Distributor, A: Agent> Runner<D, S, A> {
    pub(super) fn new(
        driver: D,
        distributor: S,
        agent: Arc<A>,
        config: Arc<CoordinatorConfig>,
        stop: CancellationToken,
        wake: Arc<Notify>,
        tx: watch::Sender<Assignment>,
    ) -> Self {
        Self {
            driver,
            distributor,
            agent,
            config,
            stop,
            wake,
            lost: Arc::new(Notify::new()),
            tx,
            owned: BTreeMap::new(),
            conns: HashMap::new(),
            epochs: HashMap::new(),
            sentinel_conflicts: HashSet::new(),
            denied: 0,
            failing: 0,
            cycles: 0,
            sessions_lost: 0,
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
                self.publish(started.elapsed(), false);
                let pause = if self.failing > 0 || self.reconnect_pending() {
                    self.config.pause_interval
                } else {
                    self.config.poll_interval
                };
                tokio::select! {
                    _ = self.stop.cancelled() => break,
                    _ = self.lost.notified() => {
                        // A session signalled its loss: its agents are
                        // already cancelled (their tokens are children of
                        // its loss token); await them and drop it now, not
                        // at the next poll.
                        self.handle_lost().await;
                        self.publish(Duration::ZERO, false);
                    }
                    _ = self.wake.notified() => {}
                    _ = tokio::time::sleep(pause) => {}
                }
            }
            self.shutdown().await;
            self.publish(Duration::ZERO, true);
            info!("coordinator stopped");
        }
        .instrument(span)
        .await;
    }

    fn reconnect_pending(&self) -> bool {
        self.conns.values().any(|c| c.session.is_none())
    }

    async fn cycle(&mut self) {
        let sets = match tokio::time::timeout(
            self.config.lock_loss_timeout,
            self.distributor.lock_sets(),
        )
        .await
        {
            Ok(Ok(sets)) => sets,
            Ok(Err(e)) => {
                warn!(error = %e.report(), "distributor failed; keeping the current assignment");
                self.verify_sessions().await;
                return;
            }
            Err(_) => {
                warn!("distributor did not answer in time; keeping the current assignment");
                self.verify_sessions().await;
                return;
            }
        };
        let mut wanted: Vec<LockSet> = Vec::with_capacity(sets.len());
        let mut seen = HashSet::with_capacity(sets.len());
        for set in sets {
            if seen.insert(set.key.clone()) {
                wanted.push(set);
            }
        }
        fastrand::shuffle(&mut wanted);
        let wanted_dbs: HashSet<DatabaseId> = wanted.iter().map(|s| s.database.clone()).collect();

        // Sessions first: a lost session's agents stop before anything else.
        self.verify_sessions().await;
        self.release_departed(&seen).await;
        self.supervise_agents();
        self.acquire_missing(wanted).await;
        self.close_idle_sessions(&wanted_dbs).await;
    }

    /// Verifies every open session in parallel under the lock-loss deadline;
    /// a failed one has its agents stopped, then is dropped. A verify task
    /// that panics counts as a failed verify.
    async fn verify_sessions(&mut self) {
        self.handle_lost().await;
        let deadline = self.config.lock_loss_timeout;
        let mut checks = Vec::new();
        for (db, conn) in &mut self.conns {
            if let Some(mut session) = conn.session.take() {
                let task_db = db.clone();
                let task = tokio::spawn(async move {
                    let result = guarded("verify", &task_db, deadline, session.verify()).await;
                    (session, result)
                });
                checks.push((db.clone(), task));
            }
        }
        let mut lost = Vec::new();
        for (db, task) in checks {
            match join(task).await {
                Ok((session, Ok(()))) => {
                    if let Some(conn) = self.conns.get_mut(&db) {
                        conn.session = Some(session);
                    }
                }
                Ok((session, Err(e))) => lost.push((db, Some(session), e)),
                Err(e) => lost.push((db, None, e)),
            }
        }
        for (db, session, reason) in lost {
            self.lose_session(&db, session, &reason).await;
        }
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
            let reason = conn
                .signals
                .as_ref()
                .and_then(SessionSignals::reason)
                .unwrap_or_else(|| "the connection ended".to_string());
            let error = Error::session_lost(&db, format!("loss signalled by the driver: {reason}"));
            self.lose_session(&db, session, &error).await;
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
    async fn lose_session(&mut self, db: &DatabaseId, session: Option<D::Session>, reason: &Error) {
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
        let stopped = stopping.len();
        stop_all(stopping, self.config.stop_timeout).await;
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
            conn.signals = None;
            conn._watch = None;
            conn.failures = conn.failures.saturating_add(1);
            conn.retry_at = Instant::now()
                + self
                    .config
                    .backoff(self.config.pause_interval, conn.failures - 1);
        }
    }

    /// Sets no longer distributed: stop their agents, then release the keys.
    async fn release_departed(&mut self, wanted: &HashSet<LockKey>) {
        let departed: Vec<LockKey> = self
            .owned
            .keys()
            .filter(|k| !wanted.contains(*k))
            .cloned()
            .collect();
        if departed.is_empty() {
            return;
        }
        let mut leaving = Vec::new();
        let mut stopping = Vec::new();
        for key in departed {
            if let Some(owned) = self.owned.remove(&key) {
                stopping.push(owned.agents);
                leaving.push((owned.set, owned.held));
            }
        }
        stop_all(stopping, self.config.stop_timeout).await;
        let mut by_db: HashMap<DatabaseId, Vec<LockKey>> = HashMap::new();
        for (set, held) in leaving {
            info!(key = %set.key, database = %set.database, "set left the distribution: agents stopped");
            if held {
                by_db.entry(set.database).or_default().push(set.key);
            }
        }
        for (db, keys) in by_db {
            self.release_keys(&db, &keys).await;
        }
    }

    /// Releases `keys` in `db` in one call (one round trip where the driver
    /// can); a failure or a missed deadline loses the session.
    async fn release_keys(&mut self, db: &DatabaseId, keys: &[LockKey]) {
        let deadline = self.config.lock_loss_timeout;
        let Some(conn) = self.conns.get_mut(db) else {
            return;
        };
        let Some(session) = conn.session.as_mut() else {
            return;
        };
        let failure = match tokio::time::timeout(deadline, session.release_many(keys)).await {
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
        self.lose_session(db, session, &failure).await;
    }

    fn supervise_agents(&mut self) {
        let mut failing = 0;
        for owned in self.owned.values_mut() {
            failing += owned
                .agents
                .supervise(&self.agent, &owned.set, owned.epoch, &self.config);
        }
        self.failing = failing;
    }

    /// Batched try-acquire of every wanted set not held, one round trip per
    /// database, databases in parallel; starts the agents of granted sets.
    async fn acquire_missing(&mut self, wanted: Vec<LockSet>) {
        let mut by_db: HashMap<DatabaseId, Vec<LockSet>> = HashMap::new();
        for set in wanted {
            let needs_lock = match self.owned.get(&set.key) {
                None => true,
                Some(owned) => !owned.held,
            };
            if needs_lock {
                by_db.entry(set.database.clone()).or_default().push(set);
            }
        }
        // Sentinel sets run whether or not the sentinel can be taken.
        for sets in by_db.values() {
            for set in sets.iter().filter(|s| s.guard == Guard::Sentinel) {
                if !self.owned.contains_key(&set.key) {
                    self.start_set(set.clone(), false);
                }
            }
        }

        let now = Instant::now();
        let deadline = self.config.lock_loss_timeout;
        let connect_deadline = self.config.connect_timeout;
        let mut rounds = Vec::new();
        for (db, sets) in by_db {
            let conn = self
                .conns
                .entry(db.clone())
                .or_insert_with(|| Conn::new(now));
            if conn.session.is_none() && conn.retry_at > now {
                debug!(database = %db, "waiting to reconnect");
                continue;
            }
            let session = conn.session.take();
            let driver = self.driver.clone();
            let node = self.config.node_id.clone();
            let task_db = db.clone();
            let keys: Vec<LockKey> = sets.iter().map(|s| s.key.clone()).collect();
            let task = tokio::spawn(async move {
                let db = task_db;
                let mut session = match session {
                    Some(s) => s,
                    None => {
                        match guarded("connect", &db, connect_deadline, driver.connect(&db, &node))
                            .await
                        {
                            Ok(s) => s,
                            Err(e) => return (None, Err(e), true),
                        }
                    }
                };
                let result =
                    guarded("try_acquire", &db, deadline, session.try_acquire(&keys)).await;
                (Some(session), result, false)
            });
            rounds.push((db, sets, task));
        }

        let mut acquired = 0usize;
        let mut denied = 0usize;
        for (db, sets, task) in rounds {
            let (session, result, connect_failed) = match join(task).await {
                Ok(out) => out,
                Err(e) => (None, Err(e), false),
            };
            match result {
                Ok(granted) => {
                    if let Some(session) = session {
                        self.attach(&db, session);
                    }
                    if let Some(conn) = self.conns.get_mut(&db) {
                        conn.failures = 0;
                    }
                    for (set, ok) in sets.into_iter().zip(granted) {
                        if ok {
                            acquired += 1;
                            self.granted(set);
                        } else {
                            denied += 1;
                            self.denied_set(&set);
                        }
                    }
                }
                Err(e) if connect_failed => {
                    denied += sets.len();
                    if let Some(conn) = self.conns.get_mut(&db) {
                        conn.failures = conn.failures.saturating_add(1);
                        let delay = self
                            .config
                            .backoff(self.config.pause_interval, conn.failures - 1);
                        conn.retry_at = Instant::now() + delay;
                        warn!(database = %db, error = %e.report(), retry_in = ?delay, "cannot connect");
                    }
                }
                Err(e) => {
                    denied += sets.len();
                    self.lose_session(&db, session, &e).await;
                }
            }
        }
        self.denied = denied;
        // One line per cycle, not one per lock: 10,000 sets must not mean
        // 10,000 log lines.
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

    fn granted(&mut self, set: LockSet) {
        let key = set.key.clone();
        let epoch = {
            let e = self.epochs.entry(key.clone()).or_insert(0);
            *e += 1;
            *e
        };
        if set.guard == Guard::Sentinel {
            if self.sentinel_conflicts.remove(&key) {
                info!(%key, "sentinel free again: no other solo node seen");
            }
            if let Some(owned) = self.owned.get_mut(&key) {
                owned.held = true;
                owned.epoch = epoch;
                return;
            }
        }
        debug!(%key, database = %set.database, shards = set.shards.len(), epoch, "lock acquired: starting agents");
        self.owned.remove(&key);
        let parent = self.parent_token(&set.database);
        let agents = SetAgents::start(
            &self.agent,
            &set,
            epoch,
            &self.config,
            &parent,
            self.config.takeover_delay,
        );
        self.owned.insert(
            key,
            Owned {
                set,
                held: true,
                epoch,
                since: SystemTime::now(),
                agents,
            },
        );
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

    fn start_set(&mut self, set: LockSet, held: bool) {
        let key = set.key.clone();
        // A sentinel set runs whether or not its session lives.
        let agents = SetAgents::start(
            &self.agent,
            &set,
            0,
            &self.config,
            &CancellationToken::new(),
            Duration::ZERO,
        );
        self.owned.insert(
            key,
            Owned {
                set,
                held,
                epoch: 0,
                since: SystemTime::now(),
                agents,
            },
        );
    }

    /// Closes sessions of databases this node no longer runs anything in
    /// (e.g. a removed tenant).
    async fn close_idle_sessions(&mut self, wanted: &HashSet<DatabaseId>) {
        let idle: Vec<DatabaseId> = self
            .conns
            .keys()
            .filter(|db| {
                !wanted.contains(*db) && !self.owned.values().any(|o| &o.set.database == *db)
            })
            .cloned()
            .collect();
        for db in idle {
            if let Some(conn) = self.conns.remove(&db) {
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
        let mut stopping = Vec::new();
        let mut held: HashMap<DatabaseId, Vec<LockKey>> = HashMap::new();
        for (key, o) in owned {
            stopping.push(o.agents);
            if o.held {
                held.entry(o.set.database).or_default().push(key);
            }
        }
        let agents = stopping.len();
        stop_all(stopping, self.config.stop_timeout).await;
        info!(sets = agents, "agents stopped; releasing locks");
        for (db, keys) in held {
            self.release_keys(&db, &keys).await;
        }
        for (db, conn) in self.conns.drain() {
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
        let owned = self
            .owned
            .values()
            .map(|o| OwnedSet {
                key: o.set.key.clone(),
                database: o.set.database.clone(),
                shards: o.set.shards.clone(),
                guard: o.set.guard,
                held: o.held,
                epoch: o.epoch,
                since: o.since,
            })
            .collect();
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
        };
        self.tx.send_replace(assignment);
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
