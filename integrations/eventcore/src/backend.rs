//! The backend `eventcore::run_projection` takes: the user's events,
//! shardlock leadership, fenced checkpoints.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

use eventcore_types::{Event, EventFilter, EventPage, EventReader, StreamPosition};
use shardlock_core::{CancellationToken, CheckpointStore, Driver, Session};
use tokio::sync::Notify;
use tracing::{info, warn};

use crate::checkpoints::ShardlockCheckpoints;
use crate::coordinator::{ShardlockCoordinator, ShardlockGuard};
use crate::error::{CheckpointStoreError, CoordinationError, ReadError};
use crate::positions::PositionTable;

/// Why a lease stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stop {
    /// The leadership session was lost.
    Lost,
    /// A newer leader claimed the subscription (its epoch).
    Fenced(i64),
}

/// One leadership taken through the backend: its epoch and stop signal.
#[derive(Debug, Clone)]
struct Lease {
    id: u64,
    epoch: i64,
    /// Fires on the session's loss (it is a child of the guard's `lost`)
    /// or when a save was fenced off.
    stop: CancellationToken,
    /// The leadership session's loss signal (the root cause when both it
    /// and a fenced save stopped the lease).
    lost: CancellationToken,
    /// The newer leader's epoch once a save was fenced off (0 before).
    fenced_by: Arc<AtomicI64>,
}

impl Lease {
    fn stopped(&self) -> Option<Stop> {
        if !self.stop.is_cancelled() {
            return None;
        }
        if self.lost.is_cancelled() {
            return Some(Stop::Lost);
        }
        match self.fenced_by.load(Ordering::Acquire) {
            0 => Some(Stop::Lost),
            current => Some(Stop::Fenced(current)),
        }
    }
}

#[derive(Debug, Default)]
struct Registry {
    next_id: u64,
    leases: HashMap<String, Lease>,
}

/// The leases of one backend, shared with its guards.
#[derive(Debug, Default)]
struct Leases {
    registry: Mutex<Registry>,
    /// Woken when a lease is registered.
    registered: Notify,
}

impl Leases {
    fn lock(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn get(&self, name: &str) -> Option<Lease> {
        self.lock().leases.get(name).cloned()
    }
}

/// Removes its lease from the registry when dropped (before the guard's
/// lock is released: fields drop in order).
struct LeaseHandle {
    leases: Arc<Leases>,
    name: String,
    lease: Lease,
}

impl Drop for LeaseHandle {
    fn drop(&mut self) {
        let mut registry = self.leases.lock();
        if registry
            .leases
            .get(&self.name)
            .is_some_and(|l| l.id == self.lease.id)
        {
            registry.leases.remove(&self.name);
        }
    }
}

/// Leadership of one projector through a [`ShardlockBackend`]: the lock
/// (a [`ShardlockGuard`]) and the fencing epoch claimed with it. Dropping
/// it ends the lease and releases the lock.
pub struct BackendGuard<S: Session> {
    lease: LeaseHandle,
    guard: ShardlockGuard<S>,
}

impl<S: Session> BackendGuard<S> {
    /// The fencing epoch claimed when leadership was taken; every save of
    /// this leadership is conditional on it.
    pub fn epoch(&self) -> i64 {
        self.lease.lease.epoch
    }

    /// Fires when the leadership session is lost or a save was fenced off:
    /// stop applying.
    pub fn stopped(&self) -> CancellationToken {
        self.lease.lease.stop.clone()
    }

    /// Fires when the leadership session is lost (see
    /// [`ShardlockGuard::lost`]).
    pub fn lost(&self) -> CancellationToken {
        self.guard.lost()
    }

    /// The lock guard.
    pub fn leadership(&self) -> &ShardlockGuard<S> {
        &self.guard
    }

    /// The session holding the lock, for a session-fenced transaction
    /// (see [`ShardlockGuard::leader_session`]); save the checkpoint in it
    /// with [`epoch`](Self::epoch).
    ///
    /// # Errors
    ///
    /// [`Error::SessionLost`](shardlock_core::Error::SessionLost) when the
    /// session was lost: stop leading.
    pub fn leader_session(&mut self) -> Result<&mut S, shardlock_core::Error> {
        self.guard.leader_session()
    }
}

impl<S: Session> fmt::Debug for BackendGuard<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BackendGuard")
            .field("projector", &self.lease.name)
            .field("epoch", &self.lease.lease.epoch)
            .field("stopped", &self.lease.lease.stopped())
            .field("leadership", &self.guard)
            .finish()
    }
}

/// What `eventcore::run_projection(projector, &backend, config)` needs: the
/// user's eventcore [`EventReader`] `R`, shardlock leadership over driver
/// `D`, and fenced checkpoints in a shardlock [`CheckpointStore`] `S` with a
/// [`PositionTable`] `P`.
///
/// - **Leadership**: `try_acquire(name)` takes the session lock
///   [`leadership_key`](crate::leadership_key)`(name)` (never waiting;
///   [`CoordinationError::HeldElsewhere`] when another node leads), then
///   **claims** the subscription in `S` (bumps its fencing epoch).
/// - **Fencing**: every save is conditional on that epoch; a save after a
///   newer leader claimed is refused ([`CheckpointStoreError::FencedOff`]),
///   and so is a save without leadership through this backend.
/// - **Loss**: when the leadership session is lost (the guard's
///   [`lost`](ShardlockGuard::lost) token fires) or a save was fenced off,
///   reads are refused. A save after the loss is still tried, fenced as
///   ever: its event was applied, and until a newer leader claims, keeping
///   its checkpoint spares that leader applying it again. eventcore's
///   runner ignores failed saves (it logs them and applies the next event
///   of the batch) but stops after `max_consecutive_poll_failures` failed
///   reads; use this crate's [`run_projection`](crate::run_projection) to
///   stop at the next event instead.
///
/// One backend may lead several projectors; a lost or fenced leadership
/// makes reads fail for all of them until its run ends, so give each
/// concurrently running projector its own backend.
pub struct ShardlockBackend<R, D: Driver, S, P> {
    events: R,
    coordinator: ShardlockCoordinator<D>,
    checkpoints: ShardlockCheckpoints<S, P>,
    leases: Arc<Leases>,
}

impl<R, D: Driver, S, P: fmt::Debug> fmt::Debug for ShardlockBackend<R, D, S, P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShardlockBackend")
            .field("coordinator", &self.coordinator)
            .field("checkpoints", &self.checkpoints)
            .field("leases", &self.leases.lock().leases.len())
            .finish_non_exhaustive()
    }
}

impl<R, D, S, P> ShardlockBackend<R, D, S, P>
where
    D: Driver,
    S: CheckpointStore,
    P: PositionTable,
{
    /// A backend reading events from `events`, leading through
    /// `coordinator` and checkpointing in `checkpoints` (whose standalone
    /// claims are not used: the backend claims on leadership).
    pub fn new(
        events: R,
        coordinator: ShardlockCoordinator<D>,
        checkpoints: ShardlockCheckpoints<S, P>,
    ) -> Self {
        Self {
            events,
            coordinator,
            checkpoints,
            leases: Arc::default(),
        }
    }

    /// The event reader.
    pub fn events(&self) -> &R {
        &self.events
    }

    /// The coordinator.
    pub fn coordinator(&self) -> &ShardlockCoordinator<D> {
        &self.coordinator
    }

    /// The checkpoints.
    pub fn checkpoints(&self) -> &ShardlockCheckpoints<S, P> {
        &self.checkpoints
    }

    /// Takes leadership of `name` and claims its subscription (see the type
    /// docs); eventcore's `try_acquire`.
    ///
    /// # Errors
    ///
    /// As [`ShardlockCoordinator::acquire`], and
    /// [`CoordinationError::Claim`] when the claim fails (leadership is then
    /// given back).
    pub async fn acquire(&self, name: &str) -> Result<BackendGuard<D::Session>, CoordinationError> {
        let guard = self.coordinator.acquire(name).await?;
        let epoch = match self.checkpoints.claim(name).await {
            Ok(epoch) => epoch,
            Err(source) => {
                return Err(CoordinationError::Claim {
                    name: name.to_string(),
                    source,
                })
            }
        };
        let lease = {
            let mut registry = self.leases.lock();
            registry.next_id += 1;
            let lease = Lease {
                id: registry.next_id,
                epoch,
                stop: guard.lost().child_token(),
                lost: guard.lost(),
                fenced_by: Arc::default(),
            };
            registry.leases.insert(name.to_string(), lease.clone());
            lease
        };
        self.leases.registered.notify_waiters();
        info!(
            projector = name,
            epoch, "eventcore projector leading (epoch claimed)"
        );
        Ok(BackendGuard {
            lease: LeaseHandle {
                leases: Arc::clone(&self.leases),
                name: name.to_string(),
                lease,
            },
            guard,
        })
    }

    /// Waits in the database until this backend holds the lock of `name`
    /// (`true`) or `cancel` fires (`false`); see
    /// [`ShardlockCoordinator::wait`]. Call it before `run_projection`, so
    /// a follower takes over as soon as the leader's lock is freed, without
    /// polling.
    ///
    /// # Errors
    ///
    /// As [`ShardlockCoordinator::wait`].
    pub async fn wait_for_leadership(
        &self,
        name: &str,
        cancel: &CancellationToken,
    ) -> Result<bool, CoordinationError> {
        self.coordinator.wait(name, cancel).await
    }

    /// The id the next lease will get: leases registered from now on have
    /// an id at least this.
    pub(crate) fn next_lease_id(&self) -> u64 {
        self.leases.lock().next_id + 1
    }

    /// Resolves when a lease of `name` with an id of at least `from` exists
    /// and stops; pending forever otherwise.
    pub(crate) async fn stopped(&self, name: &str, from: u64) -> Stop {
        loop {
            let registered = self.leases.registered.notified();
            tokio::pin!(registered);
            registered.as_mut().enable();
            if let Some(lease) = self.leases.get(name).filter(|l| l.id >= from) {
                lease.stop.cancelled().await;
                return lease.stopped().unwrap_or(Stop::Lost);
            }
            registered.await;
        }
    }

    /// The first stopped lease, if any.
    fn any_stopped(&self) -> Option<(String, Stop)> {
        self.leases
            .lock()
            .leases
            .iter()
            .find_map(|(name, lease)| lease.stopped().map(|s| (name.clone(), s)))
    }
}

impl<R, D, S, P> EventReader for ShardlockBackend<R, D, S, P>
where
    R: EventReader + Send + Sync,
    R::Error: std::error::Error + Send + Sync + 'static,
    D: Driver,
    S: CheckpointStore,
    P: PositionTable,
{
    type Error = ReadError<R::Error>;

    async fn read_events<E: Event>(
        &self,
        filter: EventFilter,
        page: EventPage,
    ) -> Result<Vec<(E, StreamPosition)>, Self::Error> {
        if let Some((name, stop)) = self.any_stopped() {
            return Err(match stop {
                Stop::Lost => ReadError::LeadershipLost { name },
                Stop::Fenced(_) => ReadError::FencedOff { name },
            });
        }
        self.events
            .read_events(filter, page)
            .await
            .map_err(ReadError::Reader)
    }
}

impl<R, D, S, P> eventcore_types::CheckpointStore for ShardlockBackend<R, D, S, P>
where
    R: Send + Sync,
    D: Driver,
    S: CheckpointStore,
    P: PositionTable,
{
    type Error = CheckpointStoreError;

    async fn load(&self, name: &str) -> Result<Option<StreamPosition>, Self::Error> {
        self.checkpoints.load_position(name).await
    }

    async fn save(&self, name: &str, position: StreamPosition) -> Result<(), Self::Error> {
        let Some(lease) = self.leases.get(name) else {
            return Err(CheckpointStoreError::NotLeading {
                name: name.to_string(),
            });
        };
        let saved = self
            .checkpoints
            .save_fenced(name, lease.epoch, position)
            .await;
        if let Err(CheckpointStoreError::FencedOff { current, .. }) = &saved {
            warn!(
                projector = name,
                epoch = lease.epoch,
                current,
                "fenced off by a newer leader: stopping"
            );
            // A store that cannot tell the newer epoch still marks the
            // lease fenced (a stored epoch is never below 1).
            lease.fenced_by.store((*current).max(1), Ordering::Release);
            lease.stop.cancel();
        }
        if lease.stop.is_cancelled() {
            // Give a loss-aware caller (`run_projection`) its chance to
            // stop before eventcore applies the next event.
            tokio::task::yield_now().await;
        }
        saved
    }
}

impl<R, D, S, P> eventcore_types::ProjectorCoordinator for ShardlockBackend<R, D, S, P>
where
    R: Send + Sync,
    D: Driver,
    S: CheckpointStore,
    P: PositionTable,
{
    type Error = CoordinationError;
    type Guard = BackendGuard<D::Session>;

    fn try_acquire(
        &self,
        subscription_name: &str,
    ) -> impl std::future::Future<Output = Result<Self::Guard, Self::Error>> + Send {
        self.acquire(subscription_name)
    }
}
