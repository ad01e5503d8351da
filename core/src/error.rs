//! The one error type of shardlock, and how driver errors map onto it.
//!
//! Drivers keep their own error enum (the server's detail, SQLSTATEs, return
//! codes) and implement [`DriverError`] on it: a [`kind`](DriverError::kind)
//! says whether the session can still be trusted. [`Error::from_driver`] is
//! then the **one** mapping into [`Error`], the same for every driver:
//! session-fatal errors become [`Error::SessionLost`], the rest
//! [`Error::Driver`], and the driver's error always stays the source.
//!
//! Messages never repeat their source: a variant with a source says what
//! shardlock was doing, the source says what the database answered, and
//! [`Error::report`] joins the chain.

use std::time::Duration;

use crate::ids::DatabaseId;

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

/// What an error means for the session that produced it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The connection is gone or its locks are unknown: every lock of the
    /// session must be treated as lost and the session dropped.
    SessionFatal,
    /// A setting, URL, credential or server is wrong: retrying the same way
    /// will fail the same way until someone changes something.
    Config,
    /// Anything else; the session, if any, is still usable.
    Other,
}

/// A driver's own error type, classified once for the coordinator.
///
/// ```
/// use shardlock_core::{DatabaseId, DriverError, Error, ErrorKind};
///
/// #[derive(Debug, thiserror::Error)]
/// #[error("connection reset by peer")]
/// struct Reset;
///
/// impl DriverError for Reset {
///     fn driver(&self) -> &'static str { "example" }
///     fn kind(&self) -> ErrorKind { ErrorKind::SessionFatal }
/// }
///
/// let err = Error::from_driver(&DatabaseId::new("app"), Reset);
/// assert!(err.is_session_fatal());
/// assert_eq!(err.report(), "session to database \"app\" lost its locks: connection reset by peer");
/// ```
pub trait DriverError: std::error::Error + Send + Sync + 'static {
    /// The driver's short name, e.g. `postgres`.
    fn driver(&self) -> &'static str;

    /// What this error means for the session.
    fn kind(&self) -> ErrorKind;
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
    #[error("invalid lock name {name:?}")]
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
    #[error("session to database {:?} lost its locks{}", database.as_str(), reason_suffix(reason))]
    SessionLost {
        /// The database of the session.
        database: DatabaseId,
        /// What showed the loss, when no source says it (empty otherwise).
        reason: String,
        /// The driver's error, when there is one.
        #[source]
        source: Option<BoxError>,
    },

    /// A database round trip did not finish within its deadline.
    #[error("{operation} on database {:?} did not finish within {after:?}", database.as_str())]
    Timeout {
        /// What was attempted (e.g. `verify`).
        operation: &'static str,
        /// The database.
        database: DatabaseId,
        /// The deadline that passed.
        after: Duration,
    },

    /// Opening a session failed.
    #[error("cannot connect to database {:?}", database.as_str())]
    Connect {
        /// The database.
        database: DatabaseId,
        /// What the failure means (a wrong password is
        /// [`ErrorKind::Config`], a refused connection
        /// [`ErrorKind::SessionFatal`]).
        kind: ErrorKind,
        /// The driver's error.
        #[source]
        source: BoxError,
    },

    /// A driver-specific failure; the source is the driver's own error type.
    #[error("{driver} driver error")]
    Driver {
        /// The driver's name, e.g. `postgres`.
        driver: &'static str,
        /// What the failure means.
        kind: ErrorKind,
        /// The driver's error.
        #[source]
        source: BoxError,
    },

    /// [`Coordinator::start`](crate::Coordinator::start) was called twice.
    #[error("the coordinator was already started")]
    AlreadyStarted,

    /// Something that needs a Tokio runtime was called outside one.
    #[error("{what} must be called inside a Tokio runtime")]
    NotInRuntime {
        /// What was called.
        what: &'static str,
    },

    /// A task of the coordinator or a driver panicked or was cancelled.
    #[error("the {task} task failed: {detail}")]
    TaskFailed {
        /// Which task (e.g. `verify`).
        task: &'static str,
        /// The panic message, or why it was cancelled.
        detail: String,
    },

    /// A configuration is inconsistent.
    #[error("invalid configuration: {0}")]
    Config(String),

    /// The distributor or tenant source failed to list lock sets.
    #[error("the distributor failed")]
    Distributor(#[source] BoxError),
}

fn reason_suffix(reason: &str) -> String {
    if reason.is_empty() {
        String::new()
    } else {
        format!(": {reason}")
    }
}

impl Error {
    /// The one mapping of a driver error: [`ErrorKind::SessionFatal`] becomes
    /// [`Error::SessionLost`] in `database`, anything else [`Error::Driver`].
    /// The driver's error is kept as the source either way.
    pub fn from_driver<E: DriverError>(database: &DatabaseId, err: E) -> Self {
        match err.kind() {
            ErrorKind::SessionFatal => Self::SessionLost {
                database: database.clone(),
                reason: String::new(),
                source: Some(Box::new(err)),
            },
            kind => Self::Driver {
                driver: err.driver(),
                kind,
                source: Box::new(err),
            },
        }
    }

    /// A failed connect to `database`, classified by the driver's error.
    pub fn connect<E: DriverError>(database: &DatabaseId, err: E) -> Self {
        Self::Connect {
            database: database.clone(),
            kind: err.kind(),
            source: Box::new(err),
        }
    }

    /// A driver error that is neither session-fatal nor configuration, e.g.
    /// a misuse the driver refuses.
    pub fn driver(driver: &'static str, source: impl Into<BoxError>) -> Self {
        Self::Driver {
            driver,
            kind: ErrorKind::Other,
            source: source.into(),
        }
    }

    /// A [`Error::SessionLost`] without a source.
    pub fn session_lost(database: &DatabaseId, reason: impl Into<String>) -> Self {
        Self::SessionLost {
            database: database.clone(),
            reason: reason.into(),
            source: None,
        }
    }

    /// What this error means for the session that produced it.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::SessionLost { .. } | Self::Timeout { .. } | Self::TaskFailed { .. } => {
                ErrorKind::SessionFatal
            }
            Self::Connect { kind, .. } | Self::Driver { kind, .. } => *kind,
            Self::InvalidLockName { .. } | Self::Config(_) | Self::NotInRuntime { .. } => {
                ErrorKind::Config
            }
            Self::LockNotAcquired { .. } | Self::AlreadyStarted | Self::Distributor(_) => {
                ErrorKind::Other
            }
        }
    }

    /// The message with every source appended (`a: b: c`), for logs that
    /// would otherwise show only the outermost layer. A source whose text the
    /// chain already shows is not repeated.
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
        self.kind() == ErrorKind::SessionFatal
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("password authentication failed for user \"nobody\"")]
    struct Auth;

    impl DriverError for Auth {
        fn driver(&self) -> &'static str {
            "test"
        }
        fn kind(&self) -> ErrorKind {
            ErrorKind::Config
        }
    }

    #[test]
    fn one_mapping_keeps_the_source_and_says_it_once() {
        let db = DatabaseId::new("app");
        let err = Error::connect(&db, Auth);
        assert_eq!(err.kind(), ErrorKind::Config);
        assert!(!err.is_session_fatal());
        assert_eq!(
            err.report(),
            "cannot connect to database \"app\": password authentication failed for user \"nobody\""
        );
        let err = Error::from_driver(&db, Auth);
        assert!(matches!(
            err,
            Error::Driver {
                kind: ErrorKind::Config,
                ..
            }
        ));
    }

    #[test]
    fn session_lost_shows_its_reason_only_without_a_source() {
        let db = DatabaseId::new("app");
        let err = Error::session_lost(&db, "the backend changed");
        assert_eq!(
            err.to_string(),
            "session to database \"app\" lost its locks: the backend changed"
        );
        assert!(err.is_session_fatal());
        let timeout = Error::Timeout {
            operation: "verify",
            database: db,
            after: Duration::from_secs(5),
        };
        assert!(timeout.is_session_fatal());
    }
}
