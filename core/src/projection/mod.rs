//! The projection runner: poll events, apply them, checkpoint, with
//! leadership and fencing.
//!
//! # Semantics (at-least-once)
//!
//! 1. Take leadership for the projector's name, else
//!    [`ProjectionError::LeadershipError`].
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

mod agent;
mod runner;

pub use agent::{CoordinatorLed, ProjectionAgent};
pub use runner::run_projection;

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::error::BoxError;

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
    /// position backwards (a lower position is ignored).
    ///
    /// # Errors
    ///
    /// [`CheckpointError::FencedOff`] when the stored epoch differs.
    fn save(
        &self,
        subscription: &str,
        epoch: i64,
        position: i64,
    ) -> impl Future<Output = Result<(), CheckpointError>> + Send;
}

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
}

impl Default for ProjectionOptions {
    fn default() -> Self {
        Self {
            batch_size: 100,
            max_attempts: 5,
            retry_backoff: Duration::from_millis(100),
            idle_backoff: Duration::from_millis(50),
            max_idle: Duration::from_secs(1),
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
}

/// Why [`run_projection`] stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProjectionError {
    /// Another node leads this projector: not a failure, try again later.
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
}
