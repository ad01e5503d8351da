//! Leader election: one key, one holder, standbys waiting in the database.

use std::any::TypeId;
use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, LazyLock, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::driver::{Driver, Session};
use crate::error::{Error, Result};
use crate::ids::{DatabaseId, NodeId};
use crate::key::LockKey;
use crate::projection::projection_leadership_key;
use crate::signals::SessionSignals;

/// How long an attempt to take a leadership key waits for the release of the
/// same key by a [`LeadershipGuard`] this process dropped (see "Drop" on
/// the guard) before it tries anyway. The release is one round trip; the
/// bound only matters when the dropped guard's runtime is busy or stopped.
pub const DROPPED_GUARD_RELEASE_WAIT: Duration = Duration::from_secs(1);

/// A leadership key in this process: the session type (so two drivers never
/// share entries), the database and the key's id.
type KeySlot = (TypeId, DatabaseId, i64);

/// Releases of dropped guards in flight in this process, per key.
struct DroppedReleases {
    pending: Mutex<HashMap<KeySlot, usize>>,
    done: Notify,
}

static DROPPED_RELEASES: LazyLock<DroppedReleases> = LazyLock::new(|| DroppedReleases {
    pending: Mutex::new(HashMap::new()),
    done: Notify::new(),
});

impl DroppedReleases {
    fn is_pending(&self, slot: &KeySlot) -> bool {
        self.pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains_key(slot)
    }
}

/// One dropped guard's release in flight: counted from the guard's `drop`
/// until the key is released (or the release is given up).
struct InFlight(Option<KeySlot>);

impl InFlight {
    fn new(slot: KeySlot) -> Self {
        *DROPPED_RELEASES
            .pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(slot.clone())
            .or_insert(0) += 1;
        Self(Some(slot))
    }

    /// Ends the count now (dropping does it too).
    fn done(mut self) {
        self.finish();
    }

    fn finish(&mut self) {
        let Some(slot) = self.0.take() else { return };
        let releases = &*DROPPED_RELEASES;
        {
            let mut pending = releases
                .pending
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if let Some(count) = pending.get_mut(&slot) {
                *count -= 1;
                if *count == 0 {
                    let _ = pending.remove(&slot);
                }
            }
        }
        releases.done.notify_waiters();
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.finish();
    }
}

fn key_slot<S: Session>(database: &DatabaseId, key: &LockKey) -> KeySlot {
    (TypeId::of::<S>(), database.clone(), key.id())
}

/// Waits until no guard this process dropped is still releasing `key` in
/// `database`, at most [`DROPPED_GUARD_RELEASE_WAIT`].
async fn settle_dropped_release<S: Session>(database: &DatabaseId, key: &LockKey) {
    let slot = key_slot::<S>(database, key);
    let releases = &*DROPPED_RELEASES;
    if !releases.is_pending(&slot) {
        return;
    }
    let waited = tokio::time::timeout(DROPPED_GUARD_RELEASE_WAIT, async {
        loop {
            let notified = releases.done.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if !releases.is_pending(&slot) {
                return;
            }
            notified.await;
        }
    })
    .await;
    if waited.is_err() {
        warn!(key = %key, wait = ?DROPPED_GUARD_RELEASE_WAIT, "a dropped leadership guard is still releasing this key; trying anyway");
    }
}

/// Proof of leadership: holds the session that holds the key, one
/// dedicated connection (never shared with another guard).
///
/// [`release`](LeadershipGuard::release) frees the key at once and is the
/// graceful way to hand over.
///
/// # Drop
///
/// Dropping the guard never blocks and works on any runtime: inside a Tokio
/// runtime it spawns the release of the key (one round trip, given up after
/// [`DROPPED_GUARD_RELEASE_WAIT`]) and the close of the session; without a
/// runtime (or if that task never runs: its runtime stopped, or the release
/// was given up) the session is dropped, which frees the key as the driver
/// does (driver contract clause 6). Until that release is done, an attempt of
/// **this process** to take the same key ([`acquire_leadership`],
/// [`wait_for_leadership`], [`DriverLeadership`]) waits for it, at most
/// [`DROPPED_GUARD_RELEASE_WAIT`], so dropping a guard and taking the key
/// again at once succeeds. Another process that asks in between is
/// refused, as it would be while the guard was held.
pub struct LeadershipGuard<S: Session> {
    /// `Some` while the guard exists; `release` and `drop` take it.
    session: Option<S>,
    signals: SessionSignals,
    database: DatabaseId,
    key: LockKey,
    /// Where [`release`](Self::release) parks the session for the next
    /// attempt ([`DriverLeadership`]'s), instead of closing it.
    spare: Option<Arc<Spare<S>>>,
}

impl<S: Session> LeadershipGuard<S> {
    fn new(session: S, key: LockKey) -> Self {
        Self {
            signals: session.signals(),
            database: session.database().clone(),
            session: Some(session),
            key,
            spare: None,
        }
    }

    /// The key this guard holds.
    pub fn key(&self) -> &LockKey {
        &self.key
    }

    /// The session holding the key: the leader's one dedicated connection,
    /// e.g. to end it from outside in a test, or to reach its connection
    /// through the driver's own session type. Always `Some` while you hold
    /// the guard (only [`release`](Self::release) and `drop` take the
    /// session out).
    pub fn session(&self) -> Option<&S> {
        self.session.as_ref()
    }

    /// The session holding the key, mutably; see
    /// [`session`](Self::session). A call on it that releases the key gives
    /// leadership up while the guard still exists.
    pub fn session_mut(&mut self) -> Option<&mut S> {
        self.session.as_mut()
    }

    /// The session holding the key, for a **session-fenced transaction**:
    /// the projection's writes and its checkpoint committed on (or, where
    /// the driver cannot lend its lock connection, fenced by) the
    /// connection that holds the lock, so a leader whose session was ended
    /// cannot commit (PostgreSQL: `PgSession::transaction`; SQLite:
    /// `SqliteCheckpoints::fenced`; see the projection module docs).
    ///
    /// ```text
    /// let mut tx = guard.leader_session()?.transaction().await?;
    /// sqlx::query("INSERT INTO totals ...").execute(&mut *tx).await?;
    /// tx.commit_checkpoint("orders-view", epoch, position).await?;
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::SessionLost`] when the guard no longer has its session
    /// (released) or the session was lost (its loss signal fired): stop
    /// leading.
    pub fn leader_session(&mut self) -> Result<&mut S> {
        if self.signals.is_lost() {
            let reason = self
                .signals
                .reason()
                .unwrap_or_else(|| "the leader's session ended".to_string());
            return Err(Error::session_lost(&self.database, reason));
        }
        match self.session.as_mut() {
            Some(session) => Ok(session),
            None => Err(Error::session_lost(
                &self.database,
                "leadership was released",
            )),
        }
    }

    /// Fires as soon as the driver sees the session end (the server
    /// terminated it, restarted, failed over): leadership is gone, stop
    /// leading at once. Derive the leader's work token from it
    /// (`guard.lost().child_token()`).
    pub fn lost(&self) -> CancellationToken {
        self.signals.lost().clone()
    }

    /// Proves the lock is still held (one round trip).
    ///
    /// # Errors
    ///
    /// [`Error::SessionLost`] when leadership is gone: stop leading at once.
    pub async fn verify(&mut self) -> Result<()> {
        match self.session.as_mut() {
            Some(session) => session.verify().await,
            None => Err(Error::session_lost(
                &self.database,
                "leadership was released",
            )),
        }
    }

    /// Releases leadership and closes the session (a guard from
    /// [`DriverLeadership`] keeps it instead for that coordinator's next
    /// attempt); a standby waiting in [`wait_for_leadership`] or
    /// [`ProjectorCoordinator::wait_lead`](crate::ProjectorCoordinator::wait_lead)
    /// takes over at once.
    ///
    /// # Errors
    ///
    /// The driver's, when the release or the close fails (the session is
    /// then closed or dropped, which frees the key anyway).
    pub async fn release(mut self) -> Result<()> {
        let Some(mut session) = self.session.take() else {
            return Ok(());
        };
        let released = session.release(&self.key).await;
        info!(key = %self.key, "leadership released");
        if released.is_ok() {
            if let Some(spare) = self.spare.take() {
                let Some(session) = spare.park(session) else {
                    return Ok(());
                };
                return session.close().await;
            }
        }
        let closed = session.close().await;
        released.map(drop).and(closed)
    }
}

impl<S: Session> Drop for LeadershipGuard<S> {
    fn drop(&mut self) {
        let Some(mut session) = self.session.take() else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            // No runtime to release on: the driver's drop frees the key.
            return;
        };
        let in_flight = InFlight::new(key_slot::<S>(&self.database, &self.key));
        let key = self.key.clone();
        let spare = self.spare.take();
        // If the task never runs (its runtime stops first), dropping it
        // drops the session (the driver frees the key) and ends the count.
        let _task = runtime.spawn(async move {
            // Bounded: a connection that hangs (a network cut) must not keep
            // the session, and so the key, longer than the driver's own drop
            // would; a release cut short poisons the session, whose drop
            // then frees the key the driver's way.
            let released =
                tokio::time::timeout(DROPPED_GUARD_RELEASE_WAIT, session.release(&key)).await;
            in_flight.done();
            match released {
                Ok(Ok(_)) => {
                    debug!(key = %key, "dropped leadership guard released its key");
                    let leftover = match spare {
                        Some(spare) => spare.park(session),
                        None => Some(session),
                    };
                    if let Some(session) = leftover {
                        let _ = tokio::time::timeout(DROPPED_GUARD_RELEASE_WAIT, session.close())
                            .await;
                    }
                }
                Ok(Err(e)) => {
                    debug!(key = %key, error = %e, "dropped leadership guard could not release its key; dropping its session");
                }
                Err(_) => {
                    debug!(key = %key, wait = ?DROPPED_GUARD_RELEASE_WAIT, "dropped leadership guard's release did not answer; dropping its session");
                }
            }
        });
    }
}

impl<S: Session> fmt::Debug for LeadershipGuard<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LeadershipGuard")
            .field("key", &self.key)
            .field("database", &self.database)
            .field("released", &self.session.is_none())
            .field("lost", &self.signals.is_lost())
            .finish()
    }
}

/// Takes leadership for `key` in `database` if nobody holds it, without
/// waiting.
///
/// # Errors
///
/// [`Error::LockNotAcquired`] when another session holds the key; connection
/// errors as the driver reports them.
pub async fn acquire_leadership<D: Driver>(
    driver: &D,
    database: &DatabaseId,
    node: &NodeId,
    key: LockKey,
) -> Result<LeadershipGuard<D::Session>> {
    let mut session = driver.connect(database, node).await?;
    settle_dropped_release::<D::Session>(database, &key).await;
    let granted = session.try_acquire(std::slice::from_ref(&key)).await?;
    if granted.first().copied().unwrap_or(false) {
        info!(key = %key, %node, "leadership acquired");
        Ok(LeadershipGuard::new(session, key))
    } else {
        debug!(key = %key, "leadership held elsewhere");
        // Nothing is held: closing only ends the connection.
        let _ = session.close().await;
        Err(Error::LockNotAcquired {
            name: key.name().to_string(),
        })
    }
}

/// Waits in the database until leadership for `key` is granted (`Some`) or
/// `cancel` fires (`None`), on a session of its own. Standbys use no CPU while waiting and take over
/// within the database's wake-up time of a graceful release.
///
/// # Cancel safety
///
/// Cancel-safe: cancelling (or dropping the future) leaves the key not held.
pub async fn wait_for_leadership<D: Driver>(
    driver: &D,
    database: &DatabaseId,
    node: &NodeId,
    key: LockKey,
    cancel: &CancellationToken,
) -> Result<Option<LeadershipGuard<D::Session>>> {
    let mut session = tokio::select! {
        session = driver.connect(database, node) => session?,
        _ = cancel.cancelled() => return Ok(None),
    };
    if session.acquire(&key, cancel).await? {
        info!(key = %key, %node, "leadership acquired");
        Ok(Some(LeadershipGuard::new(session, key)))
    } else {
        let _ = session.close().await;
        Ok(None)
    }
}

/// The one idle session a [`DriverLeadership`] keeps between attempts, so a
/// follower that tries again and again reuses one connection.
struct Spare<S> {
    slot: Mutex<Option<S>>,
}

impl<S: Session> Spare<S> {
    fn new() -> Self {
        Self {
            slot: Mutex::new(None),
        }
    }

    /// The parked session if it is still sound; a lost or poisoned one is
    /// dropped (outside the lock).
    fn take(&self) -> Option<S> {
        let parked = self
            .slot
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        match parked {
            Some(session) if sound(&session) => Some(session),
            Some(broken) => {
                debug!(database = %broken.database(), "parked leadership session is gone; reconnecting");
                drop(broken);
                None
            }
            None => None,
        }
    }

    /// Parks `session` for the next attempt when it is sound, holds nothing
    /// and the slot is free; otherwise hands it back to be closed.
    fn park(&self, session: S) -> Option<S> {
        if !sound(&session) || !session.holds().is_empty() {
            return Some(session);
        }
        let mut slot = self.slot.lock().unwrap_or_else(PoisonError::into_inner);
        if slot.is_some() {
            return Some(session);
        }
        *slot = Some(session);
        None
    }

    /// Parks `session`, or drops it when it cannot be parked (dropping frees
    /// whatever it holds without blocking).
    fn park_or_drop(&self, session: S) {
        drop(self.park(session));
    }
}

/// Whether a session can serve another attempt: not lost, not poisoned, no
/// round trip left half-done.
fn sound<S: Session>(session: &S) -> bool {
    let holds = session.holds();
    !holds.is_broken() && holds.in_flight().is_none()
}

/// Leader election for projectors through a driver: the projector named `n`
/// leads while holding the key [`projection_leadership_key`]`(n)`
/// (`projector:<n>`) in `database`.
///
/// # Sessions
///
/// Attempts share **one session per `DriverLeadership`** (one database):
/// a [`try_lead`](crate::ProjectorCoordinator::try_lead) that is refused
/// parks its session for the next one, so a follower that polls makes no
/// connection per attempt. A granted attempt hands its session to the
/// [`LeadershipGuard`]: every leader holds **one dedicated connection**,
/// whose loss signal is the guard's ([`ProjectorCoordinator::lost`]), and
/// dropping the guard frees the key on any runtime (the driver's drop). The
/// next attempt then opens a new session; a guard given up with
/// [`step_down`](crate::ProjectorCoordinator::step_down) (or
/// [`LeadershipGuard::release`]) parks its session again instead. Clones
/// share the parked session.
///
/// [`wait_lead`](crate::ProjectorCoordinator::wait_lead) waits **in the
/// database** ([`Session::acquire`]) on that session: no polling, and the
/// follower takes over as soon as the leader's lock is freed.
///
/// [`ProjectorCoordinator::lost`]: crate::ProjectorCoordinator::lost
pub struct DriverLeadership<D: Driver> {
    driver: D,
    database: DatabaseId,
    node: NodeId,
    spare: Arc<Spare<D::Session>>,
}

impl<D: Driver> Clone for DriverLeadership<D> {
    fn clone(&self) -> Self {
        Self {
            driver: self.driver.clone(),
            database: self.database.clone(),
            node: self.node.clone(),
            spare: Arc::clone(&self.spare),
        }
    }
}

impl<D: Driver> fmt::Debug for DriverLeadership<D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parked = self
            .spare
            .slot
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some();
        f.debug_struct("DriverLeadership")
            .field("driver", &self.driver.name())
            .field("database", &self.database)
            .field("node", &self.node)
            .field("parked_session", &parked)
            .finish()
    }
}

impl<D: Driver> DriverLeadership<D> {
    /// Leadership keys live in `database`; sessions are labelled `node`.
    /// Opens nothing until the first attempt.
    pub fn new(driver: D, database: DatabaseId, node: NodeId) -> Self {
        Self {
            driver,
            database,
            node,
            spare: Arc::new(Spare::new()),
        }
    }

    /// The parked session (`true`) or a new one (`false`), connecting unless
    /// `cancel` fires first (`None`).
    async fn session(
        &self,
        cancel: Option<&CancellationToken>,
    ) -> Result<Option<(D::Session, bool)>> {
        if let Some(session) = self.spare.take() {
            return Ok(Some((session, true)));
        }
        let connect = self.driver.connect(&self.database, &self.node);
        let session = match cancel {
            Some(cancel) => tokio::select! {
                session = connect => session?,
                _ = cancel.cancelled() => return Ok(None),
            },
            None => connect.await?,
        };
        Ok(Some((session, false)))
    }

    fn guard(&self, session: D::Session, key: LockKey) -> LeadershipGuard<D::Session> {
        info!(key = %key, node = %self.node, "leadership acquired");
        let mut guard = LeadershipGuard::new(session, key);
        guard.spare = Some(Arc::clone(&self.spare));
        guard
    }

    /// One non-waiting attempt on the parked session, or on a new one when
    /// the parked session turns out to be dead (its connection may have
    /// ended unnoticed while it was idle).
    async fn try_key(&self, key: LockKey) -> Result<Option<LeadershipGuard<D::Session>>> {
        loop {
            let Some((mut session, reused)) = self.session(None).await? else {
                return Ok(None);
            };
            settle_dropped_release::<D::Session>(&self.database, &key).await;
            match session.try_acquire(std::slice::from_ref(&key)).await {
                Ok(granted) if granted.first().copied().unwrap_or(false) => {
                    return Ok(Some(self.guard(session, key)));
                }
                Ok(_) => {
                    debug!(key = %key, "leadership held elsewhere");
                    self.spare.park_or_drop(session);
                    return Ok(None);
                }
                Err(e) if reused => {
                    warn!(key = %key, error = %e, "parked leadership session failed; retrying on a new one");
                    drop(session);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Waits in the database for `key` on the parked session (or a new
    /// one), like [`try_key`](Self::try_key) retrying once on a new session
    /// when the parked one turns out to be dead.
    async fn wait_key(
        &self,
        key: LockKey,
        cancel: &CancellationToken,
    ) -> Result<Option<LeadershipGuard<D::Session>>> {
        loop {
            let Some((mut session, reused)) = self.session(Some(cancel)).await? else {
                return Ok(None);
            };
            // Dropping this future drops the session mid-wait: cancel-safe
            // (clause 4), and the drop frees whatever it held (clause 6).
            match session.acquire(&key, cancel).await {
                Ok(true) => return Ok(Some(self.guard(session, key))),
                Ok(false) => {
                    self.spare.park_or_drop(session);
                    return Ok(None);
                }
                Err(e) if reused => {
                    warn!(key = %key, error = %e, "parked leadership session failed; retrying on a new one");
                    drop(session);
                }
                Err(e) => return Err(e),
            }
        }
    }
}

impl<D: Driver> crate::projection::ProjectorCoordinator for DriverLeadership<D> {
    type Guard = LeadershipGuard<D::Session>;

    fn lost(guard: &Self::Guard) -> Option<CancellationToken> {
        Some(guard.lost())
    }

    /// One `try_acquire` round trip on the parked session (a connection is
    /// opened only when none is parked).
    async fn try_lead(&self, projector: &str) -> Result<Option<Self::Guard>, crate::BoxError> {
        let key = projection_leadership_key(projector)?;
        Ok(self.try_key(key).await?)
    }

    /// Waits in the database ([`Session::acquire`]) until the key is free.
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: through `cancel` the session is parked with nothing
    /// held; a dropped future drops its session, which frees anything it
    /// held.
    async fn wait_lead(
        &self,
        projector: &str,
        cancel: &CancellationToken,
    ) -> Result<Option<Self::Guard>, crate::BoxError> {
        let key = projection_leadership_key(projector)?;
        Ok(self.wait_key(key, cancel).await?)
    }

    /// [`LeadershipGuard::release`]: releases the key at once (a waiting
    /// follower takes over) and parks the session for the next attempt.
    async fn step_down(&self, guard: Self::Guard) {
        let key = guard.key().clone();
        if let Err(e) = guard.release().await {
            debug!(key = %key, error = %e, "leadership release failed; the session was dropped, which frees the key");
        }
    }
}
