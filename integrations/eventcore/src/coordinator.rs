//! eventcore's `ProjectorCoordinator` over a shardlock driver: leadership is
//! a session lock, held by a guard that releases it on drop.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};

use shardlock_core::{
    projection_leadership_key, CancellationToken, DatabaseId, Driver, DriverLeadership, Error,
    LeadershipGuard, LockKey, NodeId, ProjectorCoordinator as _, Session,
};
use tracing::debug;

use crate::error::CoordinationError;

/// The lock key of the projector (subscription) `name`: `projector:<name>`
/// ([`projection_leadership_key`]), the key shardlock's own projection
/// runner takes, so an eventcore projector and a shardlock one of the same
/// name never run at once.
///
/// # Errors
///
/// [`Error::InvalidLockName`] when `name` contains NUL or is longer than
/// the key limit.
pub fn leadership_key(name: &str) -> Result<LockKey, Error> {
    projection_leadership_key(name)
}

/// eventcore's [`ProjectorCoordinator`](eventcore_types::ProjectorCoordinator)
/// over a shardlock [`Driver`]: leadership of the projector `name` is the
/// session lock [`leadership_key`]`(name)` in one database, held by the
/// [`ShardlockGuard`] `try_acquire` answers.
///
/// - `try_acquire` never waits (eventcore's ADR-028): it tries the key once
///   and answers [`CoordinationError::HeldElsewhere`] when another session
///   holds it.
/// - Attempts share one idle session (shardlock's [`DriverLeadership`]): a
///   refused attempt parks its session for the next one, so a follower
///   that polls opens no connection per attempt; a granted one hands its
///   session to the guard, so every leader holds one dedicated connection.
/// - Leadership ends when the guard is dropped (released at once, on any
///   runtime, current-thread included; this process taking the same key
///   right after waits for that release), when the process dies (the
///   database frees the lock), or when the session is lost (see
///   [`ShardlockGuard::lost`]).
///
/// eventcore's coordinator never waits, so its followers poll. To wait in
/// the database instead, call [`wait`](Self::wait) before
/// `run_projection`: it returns once this coordinator holds the lock, and
/// the next `try_acquire` of that name answers it.
///
/// Leadership alone does not fence checkpoint writes: use
/// [`ShardlockBackend`](crate::ShardlockBackend) for that.
#[derive(Clone)]
pub struct ShardlockCoordinator<D: Driver> {
    leadership: DriverLeadership<D>,
    driver: D,
    database: DatabaseId,
    node: NodeId,
    /// Leadership taken by `wait`, handed out by the next `acquire`.
    ready: Arc<Mutex<HashMap<String, LeadershipGuard<D::Session>>>>,
}

impl<D: Driver> fmt::Debug for ShardlockCoordinator<D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShardlockCoordinator")
            .field("leadership", &self.leadership)
            .finish()
    }
}

impl<D: Driver> ShardlockCoordinator<D> {
    /// Leadership locks live in `database` of `driver`; sessions are
    /// labelled with a generated node id (host, pid, random suffix). Opens
    /// nothing until the first attempt.
    pub fn new(driver: D, database: DatabaseId) -> Self {
        Self::build(driver, database, NodeId::generate())
    }

    fn build(driver: D, database: DatabaseId, node: NodeId) -> Self {
        Self {
            leadership: DriverLeadership::new(driver.clone(), database.clone(), node.clone()),
            driver,
            database,
            node,
            ready: Arc::default(),
        }
    }

    /// Labels this coordinator's sessions `node` (shown to operators where
    /// the database shows connection names).
    pub fn with_node(self, node: NodeId) -> Self {
        Self::build(self.driver, self.database, node)
    }

    /// The driver.
    pub fn driver(&self) -> &D {
        &self.driver
    }

    /// The database holding the leadership locks.
    pub fn database(&self) -> &DatabaseId {
        &self.database
    }

    /// The node id sessions are labelled with.
    pub fn node(&self) -> &NodeId {
        &self.node
    }

    /// Waits in the database until this coordinator holds the lock of
    /// `name` (`true`), or `cancel` fires (`false`); the next
    /// [`acquire`](Self::acquire) (eventcore's `try_acquire`, which
    /// `run_projection` calls first) of `name` answers that leadership at
    /// once. No polling: the wait is the driver's blocking acquire, on the
    /// coordinator's one idle session, and ends within the database's
    /// wake-up time of the leader's lock being freed (its release, its
    /// process dying).
    ///
    /// Leadership waited for and not yet taken stays held by the
    /// coordinator (and its clones) until taken or the coordinator is
    /// dropped.
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: a cancelled or dropped wait leaves the key not held.
    ///
    /// # Errors
    ///
    /// [`CoordinationError::InvalidName`], [`CoordinationError::Driver`].
    pub async fn wait(
        &self,
        name: &str,
        cancel: &CancellationToken,
    ) -> Result<bool, CoordinationError> {
        leadership_key(name).map_err(|source| CoordinationError::InvalidName {
            name: name.to_string(),
            source,
        })?;
        if self
            .take_ready(name)
            .map(|guard| self.keep_ready(name, guard))
            .is_some()
        {
            return Ok(true);
        }
        match self.leadership.wait_lead(name, cancel).await {
            Ok(Some(guard)) => {
                debug!(projector = name, node = %self.node, "eventcore leadership waited for");
                self.keep_ready(name, guard);
                Ok(true)
            }
            Ok(None) => Ok(false),
            Err(source) => Err(CoordinationError::Driver {
                name: name.to_string(),
                source,
            }),
        }
    }

    /// A leadership `wait` took for `name`, unless its session was lost.
    fn take_ready(&self, name: &str) -> Option<LeadershipGuard<D::Session>> {
        let guard = self
            .ready
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name)?;
        (!guard.lost().is_cancelled()).then_some(guard)
    }

    fn keep_ready(&self, name: &str, guard: LeadershipGuard<D::Session>) {
        let replaced = self
            .ready
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_string(), guard);
        // Dropped outside the lock (the guard's drop spawns its release).
        drop(replaced);
    }

    /// Takes leadership of `name` if nobody holds it, without waiting (or
    /// answers the leadership [`wait`](Self::wait) took).
    ///
    /// # Errors
    ///
    /// [`CoordinationError::HeldElsewhere`] when another session leads;
    /// [`CoordinationError::InvalidName`] for a name that cannot be a key;
    /// [`CoordinationError::Driver`] when the database fails.
    pub async fn acquire(
        &self,
        name: &str,
    ) -> Result<ShardlockGuard<D::Session>, CoordinationError> {
        let key = leadership_key(name).map_err(|source| CoordinationError::InvalidName {
            name: name.to_string(),
            source,
        })?;
        if let Some(guard) = self.take_ready(name) {
            return Ok(ShardlockGuard { inner: guard });
        }
        match self.leadership.try_lead(name).await {
            Ok(Some(guard)) => {
                debug!(projector = name, node = %self.node, "eventcore leadership acquired");
                Ok(ShardlockGuard { inner: guard })
            }
            Ok(None) => Err(CoordinationError::HeldElsewhere {
                name: name.to_string(),
                key: key.name().to_string(),
            }),
            Err(source) => Err(CoordinationError::Driver {
                name: name.to_string(),
                source,
            }),
        }
    }
}

impl<D: Driver> eventcore_types::ProjectorCoordinator for ShardlockCoordinator<D> {
    type Error = CoordinationError;
    type Guard = ShardlockGuard<D::Session>;

    fn try_acquire(
        &self,
        subscription_name: &str,
    ) -> impl std::future::Future<Output = Result<Self::Guard, Self::Error>> + Send {
        self.acquire(subscription_name)
    }
}

/// Leadership of one projector: holds the session that holds the lock.
///
/// Dropping it releases the lock without blocking, on any runtime (see
/// [`LeadershipGuard`]'s "Drop"); [`release`](Self::release) is the
/// awaited, graceful form.
pub struct ShardlockGuard<S: Session> {
    inner: LeadershipGuard<S>,
}

impl<S: Session> ShardlockGuard<S> {
    /// The lock key held.
    pub fn key(&self) -> &LockKey {
        self.inner.key()
    }

    /// Fires as soon as the driver sees the session end (the server
    /// terminated it, restarted, failed over; the process holding it is
    /// gone): leadership is lost, stop applying at once. Each call answers
    /// a handle on the same signal.
    pub fn lost(&self) -> CancellationToken {
        self.inner.lost()
    }

    /// Proves the lock is still held (one round trip).
    ///
    /// # Errors
    ///
    /// [`Error::SessionLost`] when leadership is gone.
    pub async fn verify(&mut self) -> Result<(), Error> {
        self.inner.verify().await
    }

    /// shardlock's guard inside: the session holding the key
    /// ([`LeadershipGuard::session`]), e.g. to reach its connection.
    pub fn leadership(&self) -> &LeadershipGuard<S> {
        &self.inner
    }

    /// The session holding the key, while it is sound: open a
    /// **session-fenced transaction** with it (`PgSession::transaction`,
    /// `MySqlSession::transaction`; on SQLite `SqliteCheckpoints::fenced`)
    /// so the projection's writes and its checkpoint commit together, and
    /// only while the lock is held: a leader whose session ended cannot
    /// commit a stale effect (see the crate docs, "Transactional
    /// projections").
    ///
    /// # Errors
    ///
    /// [`Error::SessionLost`] when the session was lost or released: stop
    /// leading.
    pub fn leader_session(&mut self) -> Result<&mut S, Error> {
        self.inner.leader_session()
    }

    /// Releases leadership, awaiting the release.
    ///
    /// # Errors
    ///
    /// The driver's error; the lock is freed anyway when the session ends.
    pub async fn release(self) -> Result<(), Error> {
        self.inner.release().await
    }
}

impl<S: Session> fmt::Debug for ShardlockGuard<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShardlockGuard")
            .field("leadership", &self.inner)
            .finish()
    }
}
