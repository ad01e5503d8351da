//! The one error type of shardlock.

use std::time::Duration;

/// A boxed error from a driver, an agent or a store.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// `Result` with [`Error`] as the default error.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why a lock name was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidName {
    /// The name is empty.
    #[error("the name is empty")]
    Empty,
    /// The name contains a NUL character, which no database accepts in a name.
    #[error("the name contains a NUL character")]
    Nul,
    /// The name is longer than the maximum.
    #[error("the name is {len} bytes, longer than the maximum of {max}")]
    TooLong {
        /// Length of the rejected name in bytes.
        len: usize,
        /// [`MAX_NAME_LEN`](crate::MAX_NAME_LEN).
        max: usize,
    },
}

/// Everything that can go wrong in shardlock.
///
/// A lock that is not granted is not an error: `try_acquire` answers `false`.
/// Only [`acquire_leadership`](crate::acquire_leadership), which promises a
/// guard, reports [`Error::LockNotAcquired`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A lock name is empty, contains NUL or is too long.
    #[error("invalid lock name {name:?}: {reason}")]
    InvalidLockName {
        /// A bounded, escaped preview of the name.
        name: String,
        /// What is wrong with it.
        #[source]
        reason: InvalidName,
    },

    /// Another session holds the lock.
    #[error("lock {name:?} is held by another session")]
    LockNotAcquired {
        /// The lock's name.
        name: String,
    },

    /// The session's connection is gone, or the database no longer shows the
    /// locks it should hold: every lock of the session must be treated as lost.
    #[error("session to database {database:?} lost its locks: {reason}")]
    SessionLost {
        /// The database of the session.
        database: String,
        /// What showed the loss.
        reason: String,
        /// The driver's error, when there is one.
        #[source]
        source: Option<BoxError>,
    },

    /// A database round trip did not finish within its deadline.
    #[error("{operation} on database {database:?} did not finish within {after:?}")]
    Timeout {
        /// What was attempted (e.g. `verify`).
        operation: &'static str,
        /// The database.
        database: String,
        /// The deadline that passed.
        after: Duration,
    },

    /// Opening a session failed.
    #[error("cannot connect to database {database:?}")]
    Connect {
        /// The database.
        database: String,
        /// The driver's error.
        #[source]
        source: BoxError,
    },

    /// A driver-specific failure; the source is the driver's own error type.
    #[error("{driver} driver error")]
    Driver {
        /// The driver's name, e.g. `postgres`.
        driver: &'static str,
        /// The driver's error.
        #[source]
        source: BoxError,
    },

    /// The session was closed and cannot be used again.
    #[error("the session is closed")]
    Closed,

    /// [`Coordinator::start`](crate::Coordinator::start) was called twice.
    #[error("the coordinator was already started")]
    AlreadyStarted,

    /// A configuration is inconsistent.
    #[error("invalid configuration: {0}")]
    Config(String),

    /// The distributor or tenant source failed to list lock sets.
    #[error("the distributor failed")]
    Distributor(#[source] BoxError),
}

impl Error {
    /// Wraps a driver's own error.
    pub fn driver(driver: &'static str, source: impl Into<BoxError>) -> Self {
        Self::Driver {
            driver,
            source: source.into(),
        }
    }

    /// A [`Error::SessionLost`] without a source.
    pub fn session_lost(database: impl std::fmt::Display, reason: impl Into<String>) -> Self {
        Self::SessionLost {
            database: database.to_string(),
            reason: reason.into(),
            source: None,
        }
    }

    /// The message with every source appended (`a: b: c`), for logs that
    /// would otherwise show only the outermost layer.
    pub fn report(&self) -> String {
        let mut out = self.to_string();
        let mut source = std::error::Error::source(self);
        while let Some(e) = source {
            let text = e.to_string();
            if !out.contains(&text) {
                out.push_str(": ");
                out.push_str(&text);
            }
            source = e.source();
        }
        out
    }

    /// True when the session that produced this error can no longer be
    /// trusted and must be dropped (its locks are lost).
    pub fn is_session_fatal(&self) -> bool {
        matches!(
            self,
            Self::SessionLost { .. } | Self::Timeout { .. } | Self::Closed
        )
    }
}
