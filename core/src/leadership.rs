//! Leader election: one key, one holder, standbys waiting in the database.

use std::fmt;

use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use crate::driver::{Driver, Session};
use crate::error::{Error, Result};
use crate::ids::{DatabaseId, NodeId};
use crate::key::LockKey;
use crate::signals::SessionSignals;

/// Proof of leadership: holds the session that holds the key.
///
/// Dropping the guard drops the session, which frees the key without
/// blocking (the driver spawns the unlock or the database ends the session);
/// [`release`](LeadershipGuard::release) frees it at once and is the graceful
/// way to hand over.
pub struct LeadershipGuard<S: Session> {
    session: Option<S>,
    signals: SessionSignals,
    database: DatabaseId,
    key: LockKey,
}

impl<S: Session> LeadershipGuard<S> {
    fn new(session: S, key: LockKey) -> Self {
        Self {
            signals: session.signals(),
            database: session.database().clone(),
            session: Some(session),
            key,
        }
    }

    /// The key this guard holds.
    pub fn key(&self) -> &LockKey {
        &self.key
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

    /// Releases leadership and closes the session; a standby waiting in
    /// [`wait_for_leadership`] takes over at once.
    pub async fn release(mut self) -> Result<()> {
        let Some(mut session) = self.session.take() else {
            return Ok(());
        };
        let released = session.release(&self.key).await;
        let closed = session.close().await;
        info!(key = %self.key, "leadership released");
        released.and(closed)
    }
}

impl<S: Session> fmt::Debug for LeadershipGuard<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LeadershipGuard")
            .field("key", &self.key)
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
/// `cancel` fires (`None`). Standbys use no CPU while waiting and take over
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

/// Leader election for projectors through a driver: the projector named `n`
/// leads while holding the key `projector:<n>` in `database`.
#[derive(Debug, Clone)]
pub struct DriverLeadership<D> {
    driver: D,
    database: DatabaseId,
    node: NodeId,
}

impl<D: Driver> DriverLeadership<D> {
    /// Leadership keys live in `database`; sessions are labelled `node`.
    pub fn new(driver: D, database: DatabaseId, node: NodeId) -> Self {
        Self {
            driver,
            database,
            node,
        }
    }
}

impl<D: Driver> crate::projection::ProjectorCoordinator for DriverLeadership<D> {
    type Guard = LeadershipGuard<D::Session>;

    fn lost(guard: &Self::Guard) -> Option<CancellationToken> {
        Some(guard.lost())
    }

    async fn try_lead(&self, projector: &str) -> Result<Option<Self::Guard>, crate::BoxError> {
        let key = LockKey::new(format!("projector:{projector}"))?;
        match acquire_leadership(&self.driver, &self.database, &self.node, key).await {
            Ok(guard) => Ok(Some(guard)),
            Err(Error::LockNotAcquired { .. }) => Ok(None),
            Err(e) => Err(Box::new(e)),
        }
    }
}
