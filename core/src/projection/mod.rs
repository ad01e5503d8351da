//! The projection runner: poll events, apply them, checkpoint, with
//! leadership and fencing.
//!
//! # Semantics (at-least-once)
//!
//! 1. Take leadership for the projector's name, else
//!    [`ProjectionError::LeadershipError`] (or, with
//!    [`ProjectionOptions::wait_for_leadership`], wait for it).
//! 2. [`CheckpointStore::claim`]: bump the subscription's fencing **epoch**
//!    and load its position.
//! 3. Read a batch of events after the position; apply each in order; save
//!    the checkpoint **after** applying, conditional on the epoch. A node
//!    whose epoch was superseded (it lost its lock but kept running) gets
//!    [`ProjectionError::FencedOff`] and stops; the checkpoint never moves
//!    backwards.
//! 4. No events: wait with backoff. Cancellation stops the runner promptly
//!    and releases leadership.
//!
//! Events after the last saved checkpoint may be applied again after a
//! failover (at-least-once): make `apply` idempotent, or write the
//! projection's rows and the checkpoint in one transaction (SQL stores
//! offer that).
//!
//! A failing event is retried with exponential backoff up to
//! [`ProjectionOptions::max_attempts`]; then, with a [`DeadLetter`] hook the
//! event is recorded and skipped, without one the runner stops with
//! [`ProjectionError::Apply`] and the checkpoint stays before the event.
//!
//! # Leadership
//!
//! The projector named `n` leads while holding the lock key
//! [`projection_leadership_key`]`(n)` (`projector:<n>`): anything that
//! checks or takes a projector's leadership by hand (an operator tool, a
//! test) builds the key with that function.
//! [`DriverLeadership`](crate::DriverLeadership) takes it through any
//! driver: its attempts share one session per database (a follower that
//! polls makes no connection per attempt), a granted attempt hands that
//! session to the guard (one dedicated connection per leader, whose loss
//! signal stops the runner), and [`ProjectorCoordinator::wait_lead`] blocks
//! in the database until the key is free. With
//! [`ProjectionOptions::wait_for_leadership`] the runner waits that way
//! instead of answering [`ProjectionError::LeadershipError`], so a follower
//! is one call and takes over the moment the leader's lock is freed.
//!
//! # Checkpoint stores
//!
//! Every store is opened the same way: `Store::connect(target).await`,
//! answering `Result<Store, CheckpointError>`, where `target` is what that
//! backend's driver is opened from; the `subscriptions` table is created if
//! missing. Where you already hold a handle, `from_*` reuses it.
//!
//! | store | open | reuse a handle |
//! |---|---|---|
//! | memory (`shardlock-memory`) | `MemoryCheckpoints::connect()` (a fresh in-process table; clones share it) | `MemoryCheckpoints::new()` (the same, not async) |
//! | SQLite (`shardlock-sqlite`) | `SqliteCheckpoints::connect(path)` (the database file, e.g. the one holding the projection's tables) | — |
//! | PostgreSQL (`shardlock-postgres`) | `PgCheckpoints::connect(&options, &database)` (the database the driver locks `database` in; a small pool of its own) | `PgCheckpoints::from_pool(pool)` |
//! | MySQL / MariaDB (`shardlock-mysql`) | `MySqlCheckpoints::connect(&options, &database)` (InnoDB; a small pool of its own) | `MySqlCheckpoints::from_pool(pool)` |
//! | SQL Server (`shardlock-sqlserver`) | `MssqlCheckpoints::connect(&options, &database)` (one reconnecting connection) | `MssqlCheckpoints::from_client(client)` |
//!
//! Every store answers the same errors: [`CheckpointError::NotClaimed`] for
//! a save before any [`CheckpointStore::claim`] of the subscription,
//! [`CheckpointError::FencedOff`] for a save with a superseded epoch, and a
//! refused save changes nothing (a later [`CheckpointStore::load`] answers
//! what it answered before, `None` included). The contract suite
//! (`shardlock-contract-tests`) checks each store for all of it.

//!
//! # Session-fenced transactions
//!
//! The epoch stops a stale checkpoint once a newer leader has claimed; it
//! cannot stop a leader whose session was ended from committing its
//! projection's rows **before** anyone claimed. A session-fenced
//! transaction can: the rows and the checkpoint commit only while the
//! leader's session holds its lock ([`FencedError`] otherwise, nothing
//! committed). Reach the session with
//! [`LeadershipGuard::leader_session`](crate::LeadershipGuard::leader_session).
//!
//! | driver | how |
//! |---|---|
//! | PostgreSQL | `PgSession::transaction()`: a transaction on the very connection holding the advisory lock; a terminated backend cannot commit |
//! | SQLite | `SqliteCheckpoints::fenced(session, key, work)`: the store's transaction commits while the session's worker, the only thing that frees its locks, is pinned after proving them held |
//! | MySQL / MariaDB | `MySqlSession::transaction()`: on the connection holding the `GET_LOCK` locks; a killed connection's transaction is rolled back before its locks are freed (InnoDB tables) |
//! | SQL Server | `MssqlSession::transaction()`: on the session that owns the `sp_getapplock` session locks; `KILL` rolls it back, and the locks go only when the session ends |
//!
//! The coordinator's per-set context ([`ProjectionAgent`]) does not offer
//! one: every agent of a database shares its node's one session, so a
//! transaction on it would serialize them all. Agents keep epoch fencing
//! (and `save_in` on the store's own connections).

mod agent;
mod fencing;
mod runner;

pub use agent::{CoordinatorLed, ProjectionAgent};
pub use runner::run_projection;

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::error::{BoxError, Error, Result};
use crate::key::LockKey;

/// The lock key a projector named `projector` leads with: `projector:<name>`.
///
/// [`DriverLeadership`](crate::DriverLeadership) takes this key; build it
/// with this function wherever a projector's leadership is checked or taken
/// by hand, so every place agrees on the name.
///
/// ```
/// let key = shardlock_core::projection_leadership_key("orders-view")?;
/// assert_eq!(key.name(), "projector:orders-view");
/// # Ok::<(), shardlock_core::Error>(())
/// ```
///
/// # Errors
///
/// [`Error::InvalidLockName`](crate::Error::InvalidLockName) when the key
/// name would be invalid (the projector's name contains NUL or is too long).
pub fn projection_leadership_key(projector: &str) -> Result<LockKey> {
    LockKey::new(format!("projector:{projector}"))
}

/// An event and its position in the stream (positions strictly increase).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Positioned<E> {
    /// Position of the event; the checkpoint stores the last one applied.
    pub position: i64,
    /// The event.
    pub event: E,
}

/// Reads events in order.
pub trait EventReader: Send + Sync {
    /// The event type.
    type Event: Send + Sync;

    /// Up to `limit` events with a position greater than `after`, in order.
    fn read_after(
        &self,
        after: i64,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<Positioned<Self::Event>>, BoxError>> + Send;
}

/// A subscription's checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checkpoint {
    /// The last position applied (0 before any event).
    pub position: i64,
    /// The fencing epoch of the current leader.
    pub epoch: i64,
}

/// Why a checkpoint could not be saved.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CheckpointError {
    /// A save for a subscription that was never claimed, or with an epoch no
    /// claim answers (below 1): the caller skipped
    /// [`CheckpointStore::claim`], which gives the epoch every save must
    /// carry. Nothing was written.
    #[error("save to subscription {subscription:?} without a claim: call claim() first (the runner does it when it takes leadership)")]
    NotClaimed {
        /// The subscription.
        subscription: String,
    },
    /// Another leader claimed the subscription since this one did: the
    /// caller is stale and must stop.
    #[error("subscription {subscription:?} was claimed by a newer leader (epoch {current}, ours {ours})")]
    FencedOff {
        /// The subscription.
        subscription: String,
        /// Our epoch.
        ours: i64,
        /// The stored epoch.
        current: i64,
    },
    /// The store failed.
    #[error("checkpoint store failed")]
    Store(#[source] BoxError),
}

/// Why a **session-fenced transaction** (the projection's writes and its
/// checkpoint committed together, only while the leader's session still
/// holds its lock) did not commit. Nothing it wrote was committed, whatever
/// the variant.
///
/// Drivers offer the transaction on their session type (PostgreSQL:
/// `PgSession::transaction` on the lock-holding connection; SQLite:
/// `SqliteCheckpoints::fenced`, committed while the session's worker holds
/// the lock still); see the driver's docs for exactly what each guarantees.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FencedError {
    /// The session holding the leadership lock is gone (terminated, its
    /// connection lost, poisoned, or the lock is no longer held): stop
    /// leading. Nothing was committed.
    #[error("the leader's session is gone; nothing was committed")]
    SessionLost(#[source] Error),
    /// The checkpoint save inside the transaction was refused
    /// ([`CheckpointError::FencedOff`], [`CheckpointError::NotClaimed`]) or
    /// failed; the transaction was rolled back.
    #[error("the checkpoint was not saved; nothing was committed")]
    Checkpoint(#[from] CheckpointError),
    /// The projection's own writes (or the transaction itself) failed; the
    /// transaction was rolled back.
    #[error("the fenced transaction failed; nothing was committed")]
    Effects(#[source] BoxError),
}

impl FencedError {
    /// Wraps an error of the projection's own writes (e.g. a
    /// `rusqlite::Error`) as [`FencedError::Effects`].
    pub fn effects(error: impl Into<BoxError>) -> Self {
        Self::Effects(error.into())
    }

    /// Whether leadership is gone ([`FencedError::SessionLost`], or a
    /// session-fatal error inside [`FencedError::Effects`]): stop leading.
    pub fn is_session_lost(&self) -> bool {
        match self {
            Self::SessionLost(_) => true,
            Self::Effects(e) => e
                .downcast_ref::<Error>()
                .is_some_and(Error::is_session_fatal),
            Self::Checkpoint(_) => false,
        }
    }
}

impl From<Error> for FencedError {
    /// A session-fatal error is [`FencedError::SessionLost`]; any other is
    /// [`FencedError::Effects`].
    fn from(error: Error) -> Self {
        if error.is_session_fatal() {
            Self::SessionLost(error)
        } else {
            Self::Effects(Box::new(error))
        }
    }
}

/// Stores each subscription's position and fencing epoch.
///
/// SQL stores keep a table `subscriptions(subscription_name primary key,
/// last_position bigint, epoch bigint, updated_at timestamp)`.
pub trait CheckpointStore: Send + Sync {
    /// Creates the subscription at position 0 if missing, bumps its epoch,
    /// and returns the new epoch with the stored position.
    fn claim(
        &self,
        subscription: &str,
    ) -> impl Future<Output = Result<Checkpoint, CheckpointError>> + Send;

    /// The stored checkpoint, if any.
    fn load(
        &self,
        subscription: &str,
    ) -> impl Future<Output = Result<Option<Checkpoint>, CheckpointError>> + Send;

    /// Saves `position` if the stored epoch is still `epoch`; never moves the
    /// position backwards (a lower position is ignored). A refused save
    /// writes nothing: [`load`](Self::load) answers afterwards what it
    /// answered before (`None` for a subscription never claimed).
    ///
    /// # Errors
    ///
    /// [`CheckpointError::NotClaimed`] when the subscription was never
    /// claimed or `epoch` is below 1; [`CheckpointError::FencedOff`] when the
    /// stored epoch differs.
    fn save(
        &self,
        subscription: &str,
        epoch: i64,
        position: i64,
    ) -> impl Future<Output = Result<(), CheckpointError>> + Send;
}

/// How often the default [`ProjectorCoordinator::wait_lead`] tries again
/// while another node leads (a coordinator that can wait in its database
/// overrides `wait_lead` and does not poll).
pub const DEFAULT_LEAD_POLL: Duration = Duration::from_millis(100);

/// Takes leadership for a projector's name.
pub trait ProjectorCoordinator: Send + Sync {
    /// Held while leading; dropping it gives leadership up (without
    /// blocking, on any runtime).
    type Guard: Send;

    /// Leadership if nobody else has it (`None` otherwise), without waiting.
    fn try_lead(
        &self,
        projector: &str,
    ) -> impl Future<Output = Result<Option<Self::Guard>, BoxError>> + Send;

    /// Waits until leadership is granted (`Some`) or `cancel` fires
    /// (`None`). The runner calls it with
    /// [`ProjectionOptions::wait_for_leadership`].
    ///
    /// The default polls [`try_lead`](Self::try_lead) every
    /// [`DEFAULT_LEAD_POLL`]; a coordinator that can wait in its database
    /// (as [`DriverLeadership`](crate::DriverLeadership) does, through
    /// [`Session::acquire`](crate::Session::acquire)) overrides it.
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: cancelling through `cancel` or dropping the future
    /// leaves leadership not held.
    fn wait_lead(
        &self,
        projector: &str,
        cancel: &CancellationToken,
    ) -> impl Future<Output = Result<Option<Self::Guard>, BoxError>> + Send {
        async move {
            loop {
                if cancel.is_cancelled() {
                    return Ok(None);
                }
                if let Some(guard) = self.try_lead(projector).await? {
                    return Ok(Some(guard));
                }
                tokio::select! {
                    _ = cancel.cancelled() => return Ok(None),
                    _ = tokio::time::sleep(DEFAULT_LEAD_POLL) => {}
                }
            }
        }
    }

    /// Gives leadership up gracefully, so a follower waiting in the
    /// database takes over at once; the runner calls it when it stops. The
    /// default drops the guard (which also gives leadership up, without
    /// waiting for the database to confirm).
    fn step_down(&self, guard: Self::Guard) -> impl Future<Output = ()> + Send {
        drop(guard);
        std::future::ready(())
    }

    /// A token that fires when the leadership `guard` stands for is lost
    /// (its session ended), so the runner stops applying at once; `None`
    /// (the default) when the guard cannot tell.
    fn lost(guard: &Self::Guard) -> Option<CancellationToken> {
        let _ = guard;
        None
    }
}

/// A read model built from events.
pub trait Projector: Send + Sync {
    /// The event type it reads.
    type Event: Send + Sync;

    /// The subscription name: the checkpoint's key and the leadership name.
    fn name(&self) -> &str;

    /// Applies one event. Called again for the same event after a failover
    /// or a retry: make it idempotent.
    fn apply(
        &self,
        event: &Positioned<Self::Event>,
    ) -> impl Future<Output = Result<(), BoxError>> + Send;
}

/// Records an event the projector could not apply, so the runner can move on.
pub trait DeadLetter<E>: Send + Sync {
    /// Stores the event and its error; an error here stops the runner.
    fn record(
        &self,
        projector: &str,
        event: &Positioned<E>,
        error: &BoxError,
    ) -> impl Future<Output = Result<(), BoxError>> + Send;
}

/// Tuning of [`run_projection`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ProjectionOptions {
    /// Events read per batch (default 100).
    pub batch_size: usize,
    /// Attempts per event before it counts as failed (default 5).
    pub max_attempts: u32,
    /// First retry delay of a failing event, doubled per attempt (default 100 ms).
    pub retry_backoff: Duration,
    /// First wait when there are no events, doubled up to `max_idle` (default 50 ms).
    pub idle_backoff: Duration,
    /// Longest wait when there are no events (default 1 s).
    pub max_idle: Duration,
    /// When another node leads: `false` (the default) stops the runner at
    /// once with [`ProjectionError::LeadershipError`] (the caller retries
    /// when it likes); `true` waits for leadership through
    /// [`ProjectorCoordinator::wait_lead`] (in the database, for
    /// [`DriverLeadership`](crate::DriverLeadership)) until `cancel` fires,
    /// so a follower is one call and takes over as soon as the leader's
    /// lock is freed.
    pub wait_for_leadership: bool,
}

impl Default for ProjectionOptions {
    fn default() -> Self {
        Self {
            batch_size: 100,
            max_attempts: 5,
            retry_backoff: Duration::from_millis(100),
            idle_backoff: Duration::from_millis(50),
            max_idle: Duration::from_secs(1),
            wait_for_leadership: false,
        }
    }
}

impl ProjectionOptions {
    /// Sets [`batch_size`](Self::batch_size).
    pub fn batch_size(mut self, n: usize) -> Self {
        self.batch_size = n.max(1);
        self
    }

    /// Sets [`max_attempts`](Self::max_attempts) and the first retry delay.
    pub fn retries(mut self, max_attempts: u32, backoff: Duration) -> Self {
        self.max_attempts = max_attempts.max(1);
        self.retry_backoff = backoff;
        self
    }

    /// Sets the idle backoff range.
    pub fn idle(mut self, first: Duration, max: Duration) -> Self {
        self.idle_backoff = first;
        self.max_idle = max;
        self
    }

    /// Sets [`wait_for_leadership`](Self::wait_for_leadership): a follower
    /// waits for leadership instead of stopping.
    pub fn wait_for_leadership(mut self, wait: bool) -> Self {
        self.wait_for_leadership = wait;
        self
    }
}

/// Why [`run_projection`] stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProjectionError {
    /// Another node leads this projector: not a failure, try again later
    /// (or set [`ProjectionOptions::wait_for_leadership`] and let the
    /// runner wait).
    #[error("projector {name:?} is led by another node")]
    LeadershipError {
        /// The projector's name.
        name: String,
    },
    /// Leadership was lost while leading (the session ended): the runner
    /// stopped applying at once; the next leader resumes from the checkpoint.
    #[error("projector {name:?} lost its leadership")]
    LeadershipLost {
        /// The projector's name.
        name: String,
    },
    /// A newer leader claimed the subscription; this runner stopped without
    /// moving the checkpoint.
    #[error("projector {name:?} was fenced off by a newer leader")]
    FencedOff {
        /// The projector's name.
        name: String,
        /// The store's answer.
        #[source]
        source: CheckpointError,
    },
    /// An event kept failing and there is no dead-letter hook; the
    /// checkpoint stays before it.
    #[error("projector {name:?} failed to apply the event at position {position} after {attempts} attempts")]
    Apply {
        /// The projector's name.
        name: String,
        /// The failing event's position.
        position: i64,
        /// Attempts made.
        attempts: u32,
        /// The last error.
        #[source]
        source: BoxError,
    },
    /// Reading events, the checkpoint store, leadership or the dead-letter
    /// hook failed.
    #[error("projector {name:?}: {what} failed")]
    Store {
        /// The projector's name.
        name: String,
        /// What failed.
        what: &'static str,
        /// The error.
        #[source]
        source: BoxError,
    },
}

pub use runner::{NoDeadLetter, ProjectionRunner};

// ===== blanket impls: `&Backend` works wherever a backend does =====

impl<T: EventReader> EventReader for &T {
    type Event = T::Event;

    fn read_after(
        &self,
        after: i64,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<Positioned<Self::Event>>, BoxError>> + Send {
        (**self).read_after(after, limit)
    }
}

impl<T: CheckpointStore> CheckpointStore for &T {
    fn claim(
        &self,
        subscription: &str,
    ) -> impl Future<Output = Result<Checkpoint, CheckpointError>> + Send {
        (**self).claim(subscription)
    }

    fn load(
        &self,
        subscription: &str,
    ) -> impl Future<Output = Result<Option<Checkpoint>, CheckpointError>> + Send {
        (**self).load(subscription)
    }

    fn save(
        &self,
        subscription: &str,
        epoch: i64,
        position: i64,
    ) -> impl Future<Output = Result<(), CheckpointError>> + Send {
        (**self).save(subscription, epoch, position)
    }
}

impl<T: ProjectorCoordinator> ProjectorCoordinator for &T {
    type Guard = T::Guard;

    fn lost(guard: &Self::Guard) -> Option<CancellationToken> {
        T::lost(guard)
    }

    fn try_lead(
        &self,
        projector: &str,
    ) -> impl Future<Output = Result<Option<Self::Guard>, BoxError>> + Send {
        (**self).try_lead(projector)
    }

    fn wait_lead(
        &self,
        projector: &str,
        cancel: &CancellationToken,
    ) -> impl Future<Output = Result<Option<Self::Guard>, BoxError>> + Send {
        (**self).wait_lead(projector, cancel)
    }

    fn step_down(&self, guard: Self::Guard) -> impl Future<Output = ()> + Send {
        (**self).step_down(guard)
    }
}

/// A projection backend made of parts: an event reader, a checkpoint store
/// and a leadership source, each used for its own trait.
#[derive(Debug, Clone)]
pub struct ProjectionBackend<R, C, L> {
    /// Where events come from.
    pub events: R,
    /// Where checkpoints go.
    pub checkpoints: C,
    /// Who may lead.
    pub leadership: L,
}

impl<R: EventReader, C: Send + Sync, L: Send + Sync> EventReader for ProjectionBackend<R, C, L> {
    type Event = R::Event;

    fn read_after(
        &self,
        after: i64,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<Positioned<Self::Event>>, BoxError>> + Send {
        self.events.read_after(after, limit)
    }
}

impl<R: Send + Sync, C: CheckpointStore, L: Send + Sync> CheckpointStore
    for ProjectionBackend<R, C, L>
{
    fn claim(
        &self,
        subscription: &str,
    ) -> impl Future<Output = Result<Checkpoint, CheckpointError>> + Send {
        self.checkpoints.claim(subscription)
    }

    fn load(
        &self,
        subscription: &str,
    ) -> impl Future<Output = Result<Option<Checkpoint>, CheckpointError>> + Send {
        self.checkpoints.load(subscription)
    }

    fn save(
        &self,
        subscription: &str,
        epoch: i64,
        position: i64,
    ) -> impl Future<Output = Result<(), CheckpointError>> + Send {
        self.checkpoints.save(subscription, epoch, position)
    }
}

impl<R: Send + Sync, C: Send + Sync, L: ProjectorCoordinator> ProjectorCoordinator
    for ProjectionBackend<R, C, L>
{
    type Guard = L::Guard;

    fn lost(guard: &Self::Guard) -> Option<CancellationToken> {
        L::lost(guard)
    }

    fn try_lead(
        &self,
        projector: &str,
    ) -> impl Future<Output = Result<Option<Self::Guard>, BoxError>> + Send {
        self.leadership.try_lead(projector)
    }

    fn wait_lead(
        &self,
        projector: &str,
        cancel: &CancellationToken,
    ) -> impl Future<Output = Result<Option<Self::Guard>, BoxError>> + Send {
        self.leadership.wait_lead(projector, cancel)
    }

    fn step_down(&self, guard: Self::Guard) -> impl Future<Output = ()> + Send {
        self.leadership.step_down(guard)
    }
}
