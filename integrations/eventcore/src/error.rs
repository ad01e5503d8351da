//! The errors of the integration, one enum per eventcore trait.

use shardlock_core::BoxError;

/// Why leadership was not taken (eventcore's
/// [`ProjectorCoordinator::Error`](eventcore_types::ProjectorCoordinator::Error)).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CoordinationError {
    /// Another session leads the projector: eventcore's "not acquired"
    /// answer, which `run_projection` reports as a leadership error. Try
    /// again later, or exit and let a supervisor restart the process.
    #[error("projector {name:?} is led elsewhere (lock {key:?} is held by another session)")]
    HeldElsewhere {
        /// The projector (subscription) name.
        name: String,
        /// The lock key's name.
        key: String,
    },
    /// The projector's name cannot be a lock key (empty, NUL, too long).
    #[error("projector name {name:?} cannot be a lock key")]
    InvalidName {
        /// The projector (subscription) name.
        name: String,
        /// shardlock's answer.
        #[source]
        source: shardlock_core::Error,
    },
    /// The driver failed (connect, lock round trip).
    #[error("taking leadership of projector {name:?} failed")]
    Driver {
        /// The projector (subscription) name.
        name: String,
        /// The driver's error (a [`shardlock_core::Error`]).
        #[source]
        source: BoxError,
    },
    /// Leadership was taken but bumping the subscription's fencing epoch
    /// failed; leadership was given back.
    #[error("claiming the checkpoint of projector {name:?} failed")]
    Claim {
        /// The projector (subscription) name.
        name: String,
        /// The checkpoint store's error.
        #[source]
        source: shardlock_core::CheckpointError,
    },
}

impl CoordinationError {
    /// True when another session leads (not a failure).
    pub fn is_held_elsewhere(&self) -> bool {
        matches!(self, Self::HeldElsewhere { .. })
    }
}

/// Why a checkpoint was not loaded or saved (eventcore's
/// [`CheckpointStore::Error`](eventcore_types::CheckpointStore::Error)).
///
/// eventcore's runner logs a failed save and goes on with the next event;
/// the [`ShardlockBackend`](crate::ShardlockBackend) therefore also refuses
/// the reads after [`FencedOff`](Self::FencedOff) (and after a loss of the
/// leadership session), which eventcore does stop on.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CheckpointStoreError {
    /// A newer leader claimed the subscription: this writer is stale and
    /// its checkpoint did not move.
    #[error("subscription {name:?} was claimed by a newer leader (epoch {current}, ours {ours}): this writer is fenced off")]
    FencedOff {
        /// The subscription.
        name: String,
        /// This writer's epoch.
        ours: i64,
        /// The stored epoch.
        current: i64,
    },
    /// The backend does not lead this subscription (no live guard from its
    /// `try_acquire`): saves are refused.
    #[error("subscription {name:?} is not led through this backend: take leadership first")]
    NotLeading {
        /// The subscription.
        name: String,
    },
    /// The shardlock checkpoint store (epochs, fencing) failed.
    #[error("the checkpoint store failed for subscription {name:?}")]
    Store {
        /// The subscription.
        name: String,
        /// The store's error.
        #[source]
        source: BoxError,
    },
    /// The position table (exact eventcore positions) failed.
    #[error("the position table failed for subscription {name:?}")]
    Positions {
        /// The subscription.
        name: String,
        /// The table's error.
        #[source]
        source: BoxError,
    },
}

impl CheckpointStoreError {
    pub(crate) fn from_store(name: &str, e: shardlock_core::CheckpointError) -> Self {
        match e {
            shardlock_core::CheckpointError::FencedOff { ours, current, .. } => Self::FencedOff {
                name: name.to_string(),
                ours,
                current,
            },
            shardlock_core::CheckpointError::Store(source) => Self::Store {
                name: name.to_string(),
                source,
            },
            other => Self::Store {
                name: name.to_string(),
                source: Box::new(other),
            },
        }
    }
}

/// Why the [`ShardlockBackend`](crate::ShardlockBackend) read no events
/// (its [`EventReader::Error`](eventcore_types::EventReader::Error)).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReadError<E> {
    /// A leadership held through this backend was lost: reads are refused
    /// so eventcore's runner stops (after its
    /// `max_consecutive_poll_failures`).
    #[error("leadership of projector {name:?} was lost: reads are refused")]
    LeadershipLost {
        /// The projector (subscription) name.
        name: String,
    },
    /// A newer leader fenced this backend's projector off: reads are
    /// refused so eventcore's runner stops.
    #[error("projector {name:?} was fenced off by a newer leader: reads are refused")]
    FencedOff {
        /// The projector (subscription) name.
        name: String,
    },
    /// The user's event reader failed.
    #[error("reading events failed")]
    Reader(#[source] E),
}

/// Why [`run_projection`](crate::run_projection) stopped with an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RunError {
    /// eventcore's runner failed (including "led elsewhere":
    /// `eventcore::ProjectionError::LeadershipError`).
    #[error(transparent)]
    Projection(#[from] eventcore::ProjectionError),
    /// The leadership session was lost while leading: the run was stopped
    /// at its next await point (every checkpoint save is one); the next
    /// leader resumes from the last saved checkpoint.
    #[error("projector {name:?} lost its leadership and was stopped")]
    LeadershipLost {
        /// The projector's name.
        name: String,
    },
    /// A newer leader claimed the subscription (this node's lock was lost
    /// without it noticing): the run was stopped without moving the
    /// checkpoint.
    #[error("projector {name:?} was fenced off by a newer leader and was stopped")]
    FencedOff {
        /// The projector's name.
        name: String,
    },
}

/// A position table could not be opened or created.
#[derive(Debug, thiserror::Error)]
#[error("cannot open the position table in {place}")]
pub struct OpenError {
    place: String,
    #[source]
    source: BoxError,
}

impl OpenError {
    #[cfg_attr(
        not(any(feature = "postgres", feature = "sqlite", feature = "mysql")),
        allow(dead_code)
    )]
    pub(crate) fn new(place: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Self {
            place: place.into(),
            source: source.into(),
        }
    }

    /// Where: the database file, or `postgres` / `mysql`.
    pub fn place(&self) -> &str {
        &self.place
    }
}
