//! The coordinator loop: one cycle every poll interval.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::{watch, Notify};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
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

/// A database's connection slot.
struct Conn<S> {
    session: Option<S>,
    failures: u32,
    retry_at: Instant,
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
    tx: watch::Sender<Assignment>,
    conns: HashMap<DatabaseId, Conn<D::Session>>,
    owned: BTreeMap<LockKey, Owned>,
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
            tx,
            conns: HashMap::new(),
            owned: BTreeMap::new(),
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
    /// a failed one has its agents stopped, then is dropped.
    async fn verify_sessions(&mut self) {
        let deadline = self.config.lock_loss_timeout;
        let mut checks = JoinSet::new();
        for (db, conn) in &mut self.conns {
            if let Some(mut session) = conn.session.take() {
                let db = db.clone();
                checks.spawn(async move {
                    let result = match tokio::time::timeout(deadline, session.verify()).await {
                        Ok(result) => result,
                        Err(_) => Err(Error::Timeout {
                            operation: "verify",
                            database: db.to_string(),
                            after: deadline,
                        }),
                    };
                    (db, session, result)
                });
            }
        }
        let mut lost = Vec::new();
        while let Some(joined) = checks.join_next().await {
            let Ok((db, session, result)) = joined else {
                continue;
            };
            match result {
                Ok(()) => {
                    if let Some(conn) = self.conns.get_mut(&db) {
                        conn.session = Some(session);
                    }
                }
                Err(e) => lost.push((db, session, e)),
            }
        }
        for (db, session, reason) in lost {
            self.lose_session(&db, Some(session), &reason).await;
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
                database: db.to_string(),
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
        let mut rounds = JoinSet::new();
        for (db, sets) in by_db {
            let conn = self.conns.entry(db.clone()).or_insert_with(|| Conn {
                session: None,
                failures: 0,
                retry_at: now,
            });
            if conn.session.is_none() && conn.retry_at > now {
                debug!(database = %db, "waiting to reconnect");
                continue;
            }
            let session = conn.session.take();
            let driver = self.driver.clone();
            let node = self.config.node_id.clone();
            rounds.spawn(async move {
                let mut session = match session {
                    Some(s) => s,
                    None => {
                        match tokio::time::timeout(connect_deadline, driver.connect(&db, &node))
                            .await
                        {
                            Ok(Ok(s)) => s,
                            Ok(Err(e)) => return (db, sets, None, Err(e), true),
                            Err(_) => {
                                let e = Error::Timeout {
                                    operation: "connect",
                                    database: db.to_string(),
                                    after: connect_deadline,
                                };
                                return (db, sets, None, Err(e), true);
                            }
                        }
                    }
                };
                let keys: Vec<LockKey> = sets.iter().map(|s| s.key.clone()).collect();
                let result = match tokio::time::timeout(deadline, session.try_acquire(&keys)).await
                {
                    Ok(r) => r,
                    Err(_) => Err(Error::Timeout {
                        operation: "try_acquire",
                        database: db.to_string(),
                        after: deadline,
                    }),
                };
                (db, sets, Some(session), result, false)
            });
        }

        let mut acquired = 0usize;
        let mut denied = 0usize;
        while let Some(joined) = rounds.join_next().await {
            let Ok((db, sets, session, result, connect_failed)) = joined else {
                continue;
            };
            match result {
                Ok(granted) => {
                    if let Some(conn) = self.conns.get_mut(&db) {
                        conn.session = session;
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
        let agents = SetAgents::start(&self.agent, &set, epoch, &self.config);
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
        let agents = SetAgents::start(&self.agent, &set, 0, &self.config);
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
