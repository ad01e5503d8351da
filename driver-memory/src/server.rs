//! The in-process "database server": lock tables, sessions, fault injection.
//!
//! The server keeps each session's [`SessionSignals`] (registered when the
//! session opens) and fires its `lost` token the moment it ends that session
//! in a way the node can see: [`MemoryServer::terminate`],
//! [`MemoryServer::terminate_node`], [`MemoryDriver::kill`] and
//! [`MemoryDriver::sever`] fire it at once; [`MemoryDriver::partition`] does
//! not (a cut network is silent, the coordinator's deadline handles it).
//!
//! The same signals carry the session's [`ReleaseHints`]: an announced
//! release ([`Session::release_announced`](shardlock_core::Session::release_announced))
//! calls [`ReleaseHints::announce`] on every *other* reachable session of
//! the database while the server applies the release, so a hint is a
//! channel in effect. A session that is partitioned, severed or ended
//! receives none (it could not hear the server); a session that ends is
//! forgotten with its record.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use shardlock_core::{
    Capabilities, DatabaseId, Driver, DriverError, Error, ErrorKind, IdHash, LockKey, NodeId,
    ReleaseHints, Result, SessionSignals, Support,
};
use tokio::sync::{watch, Notify};
use tracing::debug;

use crate::session::MemorySession;

/// How many lock events the server remembers (the oldest are dropped).
const EVENT_HISTORY: usize = 100_000;

/// Default time the server keeps a severed or partitioned session's locks.
pub const DEFAULT_RELEASE_WINDOW: Duration = Duration::from_secs(20);

/// The loss-detection bound the memory driver states in
/// [`Driver::capabilities`]: the server fires a session's loss signal
/// synchronously when it ends the session, so this only covers scheduling.
pub const LOSS_DETECTION_BOUND: Duration = Duration::from_millis(10);

/// Errors of the memory driver (the source of [`Error::Connect`] and
/// [`Error::Driver`] values it returns).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MemoryError {
    /// The node's network is severed ([`MemoryDriver::sever`]): new
    /// connections are refused until [`MemoryDriver::heal`].
    #[error("connection refused: the node's network is severed")]
    Refused,
}

impl DriverError for MemoryError {
    fn driver(&self) -> &'static str {
        "memory"
    }

    fn kind(&self) -> ErrorKind {
        ErrorKind::SessionFatal
    }
}

/// Identifies one session on a [`MemoryServer`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(pub u64);

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "s{}", self.0)
    }
}

/// What happened to a lock, for tests that check ordering.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockEventKind {
    /// A session took the key.
    Acquired,
    /// The session released the key (explicitly, by close or by drop).
    Released,
    /// The server freed the key because its session died or was terminated.
    Freed,
}

/// One entry of the server's lock history.
#[derive(Debug, Clone)]
pub struct LockEvent {
    /// When it happened.
    pub at: Instant,
    /// What happened.
    pub kind: LockEventKind,
    /// The key's name.
    pub key: String,
    /// The key's database.
    pub database: DatabaseId,
    /// The session.
    pub session: SessionId,
    /// The session's node.
    pub node: NodeId,
}

/// A held lock, as `status` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HolderInfo {
    /// The database.
    pub database: DatabaseId,
    /// The key.
    pub key: LockKey,
    /// The holding session.
    pub session: SessionId,
    /// The holding node.
    pub node: NodeId,
    /// Since when.
    pub since: SystemTime,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Health {
    Up,
    /// Calls fail at once (connection reset).
    Severed,
    /// Calls hang (network cut).
    Partitioned,
    /// The server ended the session.
    Dead,
}

pub(crate) struct SessionRecord {
    pub(crate) node: NodeId,
    pub(crate) driver: u64,
    /// The database the session is connected to: announced releases reach
    /// the other sessions of the same database.
    database: DatabaseId,
    pub(crate) health: Health,
    /// The session's signals, fired when the server ends it visibly, and
    /// its release hints, told of other sessions' announced releases.
    signals: SessionSignals,
}

struct Held {
    session: SessionId,
    key: LockKey,
    since: SystemTime,
}

/// One database's lock table, by key id ([`LockKey::id`]): a batch or a
/// verify looks its database up once and then hashes 8 bytes per key.
type Table = HashMap<i64, Held, IdHash>;

#[derive(Default)]
pub(crate) struct State {
    locks: HashMap<DatabaseId, Table>,
    pub(crate) sessions: HashMap<SessionId, SessionRecord>,
    /// Sessions blocked in `acquire`, per key.
    waiters: HashMap<(DatabaseId, i64), usize>,
    events: VecDeque<LockEvent>,
    next_session: u64,
}

pub(crate) struct Inner {
    state: Mutex<State>,
    /// Woken whenever a lock is freed, so waiting sessions retry.
    pub(crate) freed: Notify,
    /// Bumped when a partition heals, so hanging calls resume.
    pub(crate) health: watch::Sender<u64>,
    release_window: Duration,
    round_trips: AtomicU64,
    /// Announced releases that reached at least one other session.
    announcements: AtomicU64,
    next_driver: AtomicU64,
}

/// The shared lock table every [`MemoryDriver`] made from it talks to.
///
/// Clones share the server.
#[derive(Clone)]
pub struct MemoryServer {
    pub(crate) inner: Arc<Inner>,
}

impl Default for MemoryServer {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryServer {
    /// A server with the default release window.
    pub fn new() -> Self {
        Self::with_release_window(DEFAULT_RELEASE_WINDOW)
    }

    /// A server that frees a severed or partitioned session's locks after
    /// `window`, as a database does once its keepalives give up.
    pub fn with_release_window(window: Duration) -> Self {
        Self {
            inner: Arc::new(Inner {
                state: Mutex::new(State::default()),
                freed: Notify::new(),
                health: watch::Sender::new(0),
                release_window: window,
                round_trips: AtomicU64::new(0),
                announcements: AtomicU64::new(0),
                next_driver: AtomicU64::new(0),
            }),
        }
    }

    /// A new driver (a node's connection factory) for this server.
    pub fn driver(&self) -> MemoryDriver {
        MemoryDriver {
            server: self.clone(),
            id: self.inner.next_driver.fetch_add(1, Ordering::Relaxed),
            network: Arc::new(Mutex::new(Health::Up)),
        }
    }

    /// The release window.
    pub fn release_window(&self) -> Duration {
        self.inner.release_window
    }

    /// Every lock currently held.
    pub fn holders(&self) -> Vec<HolderInfo> {
        let state = self.inner.lock();
        let mut out: Vec<HolderInfo> = state
            .locks
            .iter()
            .flat_map(|(db, table)| table.values().map(move |held| (db, held)))
            .map(|(db, held)| HolderInfo {
                database: db.clone(),
                key: held.key.clone(),
                session: held.session,
                node: state
                    .sessions
                    .get(&held.session)
                    .map(|s| s.node.clone())
                    .unwrap_or_else(|| NodeId::new("?")),
                since: held.since,
            })
            .collect();
        out.sort_by(|a, b| a.key.name().cmp(b.key.name()));
        out
    }

    /// The session holding `key` in `database`, if any.
    pub fn holder(&self, database: &DatabaseId, key: &LockKey) -> Option<SessionId> {
        let state = self.inner.lock();
        state.held(database, key).map(|h| h.session)
    }

    /// The lock history (the latest 100,000 events).
    pub fn events(&self) -> Vec<LockEvent> {
        self.inner.lock().events.iter().cloned().collect()
    }

    /// Lock round trips served, to check batching: one per request that
    /// reaches the server (a batched `try_acquire`, a `release_many`, a
    /// `verify`, each attempt of a blocking `acquire`). Calls the session
    /// answers from its own bookkeeping (keys it already holds, releases of
    /// keys it does not hold) send nothing and count nothing.
    pub fn round_trips(&self) -> u64 {
        self.inner.round_trips.load(Ordering::Relaxed)
    }

    /// Announced releases served: one per
    /// [`release_announced`](shardlock_core::Session::release_announced)
    /// that released at least one key (whether or not another session was
    /// there to hear it). For tests and metrics.
    pub fn announcements(&self) -> u64 {
        self.inner.announcements.load(Ordering::Relaxed)
    }

    /// How many sessions are blocked in [`acquire`](shardlock_core::Session::acquire)
    /// on `key` in `database` right now: a waiter counts from the moment its
    /// first attempt was denied (and it is registered for the wake-up) until
    /// its `acquire` returns or its future is dropped. Tests use it to wait
    /// until a waiter really waits instead of sleeping.
    pub fn waiting(&self, database: &DatabaseId, key: &LockKey) -> usize {
        self.inner
            .lock()
            .waiters
            .get(&(database.clone(), key.id()))
            .copied()
            .unwrap_or(0)
    }

    /// Ends every session of `node` as if its process died: their locks are
    /// freed at once, their loss signals fire and their next calls fail.
    pub fn terminate_node(&self, node: &NodeId) {
        let ids: Vec<SessionId> = {
            let state = self.inner.lock();
            state
                .sessions
                .iter()
                .filter(|(_, r)| &r.node == node && r.health != Health::Dead)
                .map(|(id, _)| *id)
                .collect()
        };
        for id in ids {
            self.terminate(id);
        }
    }

    /// Ends `session` as an operator would (`pg_terminate_backend`): its locks
    /// are freed at once, its loss signal fires at once, and its next call
    /// fails.
    pub fn terminate(&self, session: SessionId) {
        let signals = {
            let mut state = self.inner.lock();
            let signals = state.sessions.get_mut(&session).map(|record| {
                record.health = Health::Dead;
                record.signals.clone()
            });
            self.inner
                .free_session(&mut state, session, LockEventKind::Freed);
            signals
        };
        // Fired outside the table's mutex: woken tasks may call the server.
        if let Some(signals) = signals {
            signals.fire_lost("session terminated by the server");
        }
    }
}

impl fmt::Debug for MemoryServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.inner.lock();
        f.debug_struct("MemoryServer")
            .field("sessions", &state.sessions.len())
            .field(
                "locks",
                &state.locks.values().map(Table::len).sum::<usize>(),
            )
            .field("release_window", &self.inner.release_window)
            .finish()
    }
}

/// Appends to the lock history, dropping the oldest event when full.
fn record(events: &mut VecDeque<LockEvent>, event: LockEvent) {
    if events.len() >= EVENT_HISTORY {
        let _ = events.pop_front();
    }
    events.push_back(event);
}

impl State {
    /// The lock on `key` in `database`, if any session holds it.
    fn held(&self, database: &DatabaseId, key: &LockKey) -> Option<&Held> {
        self.locks.get(database)?.get(&key.id())
    }
}

#[derive(Clone, Copy)]
pub(crate) enum Grant {
    Granted,
    Denied,
}

impl Inner {
    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this mutex cannot leave the table half
        // updated (every update is a single map operation), so recover.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn count_round_trip(&self) {
        self.round_trips.fetch_add(1, Ordering::Relaxed);
    }

    /// Registers a new session of `node` on `database`; the server keeps
    /// its signals (to fire `lost`, and to deliver release hints) until the
    /// session is forgotten.
    pub(crate) fn open_session(
        &self,
        node: &NodeId,
        driver: u64,
        database: &DatabaseId,
        signals: SessionSignals,
    ) -> SessionId {
        let mut state = self.lock();
        state.next_session += 1;
        let id = SessionId(state.next_session);
        state.sessions.insert(
            id,
            SessionRecord {
                node: node.clone(),
                driver,
                database: database.clone(),
                health: Health::Up,
                signals,
            },
        );
        id
    }

    /// Announces a release by `from` to every other reachable session of
    /// `database` (see the module docs): each one's
    /// [`ReleaseHints::announce`] gets `clean`, the ids of the keys handed
    /// over cleanly. Partitioned, severed and ended sessions hear nothing.
    /// Answers how many sessions were told.
    pub(crate) fn announce(
        &self,
        state: &State,
        from: SessionId,
        database: &DatabaseId,
        clean: &[i64],
    ) -> usize {
        self.announcements.fetch_add(1, Ordering::Relaxed);
        let mut told = 0;
        for (id, record) in &state.sessions {
            if *id == from || record.health != Health::Up || &record.database != database {
                continue;
            }
            // `announce` never blocks and never calls the server back, so it
            // is safe under the table's mutex.
            if let Some(hints) = record.signals.release_hints() {
                hints.announce(clean.iter().copied());
                told += 1;
            }
        }
        debug!(%database, session = %from, clean = clean.len(), told, "release announced");
        told
    }

    /// Whether a session other than `session` holds `key` in `database`
    /// (the server's view: a cut-off session's locks count until the server
    /// frees them).
    pub(crate) fn held_elsewhere(
        &self,
        state: &State,
        session: SessionId,
        database: &DatabaseId,
        key: &LockKey,
    ) -> bool {
        state
            .held(database, key)
            .is_some_and(|h| h.session != session)
    }

    /// Counts one more session blocked in `acquire` on `slot`.
    pub(crate) fn add_waiter(&self, state: &mut State, slot: (DatabaseId, i64)) {
        *state.waiters.entry(slot).or_insert(0) += 1;
    }

    /// Counts one session fewer blocked in `acquire` on `slot`.
    pub(crate) fn remove_waiter(&self, slot: &(DatabaseId, i64)) {
        let mut state = self.lock();
        if let Some(n) = state.waiters.get_mut(slot) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                let _ = state.waiters.remove(slot);
            }
        }
    }

    pub(crate) fn try_take(
        &self,
        state: &mut State,
        session: SessionId,
        database: &DatabaseId,
        key: &LockKey,
    ) -> Grant {
        self.try_take_many(state, session, database, std::slice::from_ref(key))
            .into_iter()
            .next()
            .unwrap_or(Grant::Denied)
    }

    /// [`try_take`](Self::try_take) of each key of a batch, the database's
    /// table looked up once: one answer per key.
    pub(crate) fn try_take_many(
        &self,
        state: &mut State,
        session: SessionId,
        database: &DatabaseId,
        keys: &[LockKey],
    ) -> Vec<Grant> {
        let node = node_of(state, session);
        let State { locks, events, .. } = state;
        let table = match locks.get_mut(database) {
            Some(table) => table,
            None => locks.entry(database.clone()).or_default(),
        };
        keys.iter()
            .map(|key| match table.get(&key.id()) {
                Some(held) if held.session == session => Grant::Granted,
                Some(_) => Grant::Denied,
                None => {
                    table.insert(
                        key.id(),
                        Held {
                            session,
                            key: key.clone(),
                            since: SystemTime::now(),
                        },
                    );
                    record(
                        events,
                        LockEvent {
                            at: Instant::now(),
                            kind: LockEventKind::Acquired,
                            key: key.name().to_string(),
                            database: database.clone(),
                            session,
                            node: node.clone(),
                        },
                    );
                    Grant::Granted
                }
            })
            .collect()
    }

    /// Frees each key of `keys` that `session` holds, the database's table
    /// looked up once; answers, per key, whether it was freed. Waiters are
    /// woken once if any was.
    pub(crate) fn give_back_many(
        &self,
        state: &mut State,
        session: SessionId,
        database: &DatabaseId,
        keys: &[LockKey],
        kind: LockEventKind,
    ) -> Vec<bool> {
        let node = node_of(state, session);
        let State { locks, events, .. } = state;
        let Some(table) = locks.get_mut(database) else {
            return vec![false; keys.len()];
        };
        let freed: Vec<bool> = keys
            .iter()
            .map(|key| {
                if table.get(&key.id()).is_none_or(|h| h.session != session) {
                    return false;
                }
                table.remove(&key.id());
                record(
                    events,
                    LockEvent {
                        at: Instant::now(),
                        kind,
                        key: key.name().to_string(),
                        database: database.clone(),
                        session,
                        node: node.clone(),
                    },
                );
                true
            })
            .collect();
        if freed.contains(&true) {
            self.freed.notify_waiters();
        }
        freed
    }

    /// The names of the keys of `keys` that `session` no longer holds in
    /// `database` (a verify), the database's table looked up once.
    pub(crate) fn not_held<'k>(
        &self,
        state: &State,
        session: SessionId,
        database: &DatabaseId,
        keys: impl Iterator<Item = &'k LockKey>,
    ) -> Vec<String> {
        let table = state.locks.get(database);
        keys.filter(|key| {
            table
                .and_then(|t| t.get(&key.id()))
                .is_none_or(|h| h.session != session)
        })
        .map(|key| key.name().to_string())
        .collect()
    }

    pub(crate) fn free_session(&self, state: &mut State, session: SessionId, kind: LockEventKind) {
        let node = node_of(state, session);
        let State { locks, events, .. } = state;
        for (database, table) in locks.iter_mut() {
            table.retain(|_, held| {
                if held.session != session {
                    return true;
                }
                record(
                    events,
                    LockEvent {
                        at: Instant::now(),
                        kind,
                        key: held.key.name().to_string(),
                        database: database.clone(),
                        session,
                        node: node.clone(),
                    },
                );
                false
            });
        }
        self.freed.notify_waiters();
    }

    pub(crate) fn forget_session(&self, state: &mut State, session: SessionId) {
        state.sessions.remove(&session);
    }
}

fn node_of(state: &State, session: SessionId) -> NodeId {
    state
        .sessions
        .get(&session)
        .map(|s| s.node.clone())
        .unwrap_or_else(|| NodeId::new("?"))
}

/// A node's connection factory to a [`MemoryServer`], with fault switches
/// that act on every session it opened.
#[derive(Clone)]
pub struct MemoryDriver {
    pub(crate) server: MemoryServer,
    id: u64,
    /// The node's network: `Health::Up`, `Severed` (connects refused) or
    /// `Partitioned` (connects hang), shared by clones.
    network: Arc<Mutex<Health>>,
}

impl MemoryDriver {
    /// The server this driver talks to.
    pub fn server(&self) -> &MemoryServer {
        &self.server
    }

    /// The process died: every session of this driver is dead, the server
    /// frees its locks at once, and their loss signals fire.
    pub fn kill(&self) {
        let inner = &self.server.inner;
        let signals: Vec<SessionSignals> = {
            let mut state = inner.lock();
            let mut signals = Vec::new();
            for id in self.session_ids(&state) {
                if let Some(r) = state.sessions.get_mut(&id) {
                    r.health = Health::Dead;
                    signals.push(r.signals.clone());
                }
                inner.free_session(&mut state, id, LockEventKind::Freed);
            }
            signals
        };
        for s in signals {
            s.fire_lost("the node's process was killed");
        }
    }

    /// The node's network breaks (connection reset): calls fail at once on
    /// this node, the sessions' loss signals fire at once, and new
    /// connections are refused until [`heal`](Self::heal), while the server
    /// keeps the locks for its release window, then frees them.
    pub fn sever(&self) {
        for s in self.cut(Health::Severed) {
            s.fire_lost("connection reset: the node's network is severed");
        }
    }

    /// The network is cut: calls on this node's sessions, and new
    /// connections, hang until [`heal`](Self::heal); the server frees the
    /// locks after its release window. The loss signals do **not** fire: a
    /// cut network is silent, and the coordinator's deadlines must notice.
    pub fn partition(&self) {
        let _ = self.cut(Health::Partitioned);
    }

    /// Restores the network: hanging calls resume and fail (the server has,
    /// or soon will have, ended those sessions) and the partitioned
    /// sessions' loss signals fire (the node now sees the connections reset);
    /// new sessions work normally.
    pub fn heal(&self) {
        *self.network.lock().unwrap_or_else(|p| p.into_inner()) = Health::Up;
        let signals: Vec<SessionSignals> = {
            let mut state = self.server.inner.lock();
            let mut signals = Vec::new();
            for id in self.session_ids(&state) {
                if let Some(r) = state.sessions.get_mut(&id) {
                    if r.health == Health::Partitioned {
                        r.health = Health::Severed;
                        signals.push(r.signals.clone());
                    }
                }
            }
            signals
        };
        for s in signals {
            s.fire_lost("connection reset after the network partition healed");
        }
        self.server.inner.health.send_modify(|v| *v += 1);
    }

    fn session_ids(&self, state: &State) -> Vec<SessionId> {
        state
            .sessions
            .iter()
            .filter(|(_, r)| r.driver == self.id && r.health != Health::Dead)
            .map(|(id, _)| *id)
            .collect()
    }

    /// Cuts the node's sessions; answers their signals (not fired).
    fn cut(&self, health: Health) -> Vec<SessionSignals> {
        *self.network.lock().unwrap_or_else(|p| p.into_inner()) = health;
        let (ids, signals) = {
            let mut state = self.server.inner.lock();
            let ids = self.session_ids(&state);
            let mut signals = Vec::with_capacity(ids.len());
            for id in &ids {
                if let Some(r) = state.sessions.get_mut(id) {
                    r.health = health;
                    signals.push(r.signals.clone());
                }
            }
            (ids, signals)
        };
        let server = self.server.clone();
        let window = server.inner.release_window;
        let expire = move || {
            let mut state = server.inner.lock();
            for id in &ids {
                if let Some(r) = state.sessions.get_mut(id) {
                    r.health = Health::Dead;
                }
                server
                    .inner
                    .free_session(&mut state, *id, LockEventKind::Freed);
            }
            debug!(sessions = ids.len(), "memory server freed cut-off sessions");
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(async move {
                    tokio::time::sleep(window).await;
                    expire();
                });
            }
            Err(_) => expire(),
        }
        signals
    }
}

fn refused(database: &DatabaseId) -> Error {
    Error::connect(database, MemoryError::Refused)
}

impl fmt::Debug for MemoryDriver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryDriver")
            .field("id", &self.id)
            .finish()
    }
}

impl Driver for MemoryDriver {
    type Session = MemorySession;

    fn name(&self) -> &'static str {
        "memory"
    }

    async fn connect(&self, database: &DatabaseId, node: &NodeId) -> Result<MemorySession> {
        let mut heals = self.server.inner.health.subscribe();
        loop {
            let network = *self.network.lock().unwrap_or_else(|p| p.into_inner());
            match network {
                Health::Up => break,
                Health::Partitioned => {
                    if heals.changed().await.is_err() {
                        return Err(refused(database));
                    }
                }
                Health::Severed | Health::Dead => return Err(refused(database)),
            }
        }
        let signals = SessionSignals::new().with_release_hints(ReleaseHints::new());
        let id = self
            .server
            .inner
            .open_session(node, self.id, database, signals.clone());
        Ok(MemorySession::new(
            self.server.clone(),
            id,
            database.clone(),
            signals,
        ))
    }

    fn lock_release_window(&self) -> Option<Duration> {
        Some(self.server.inner.release_window)
    }

    /// A native loss signal (the server fires it when it ends a session),
    /// within [`LOSS_DETECTION_BOUND`], and native release hints (the server
    /// tells the other sessions while it applies an announced release).
    fn capabilities(&self) -> Capabilities {
        Capabilities::none()
            .with_loss_signal(Support::Native, LOSS_DETECTION_BOUND)
            .with_release_hint(Support::Native)
            .with_probe(Support::Native)
    }
}
