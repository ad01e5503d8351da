//! The driver's error type, `sp_getapplock` return codes and server error
//! numbers, and the mapping into shardlock's [`Error`].

use std::time::Duration;

use shardlock_core::{DatabaseId, Error};

/// The driver name used in errors and logs.
pub(crate) const DRIVER: &str = "sqlserver";

/// Return codes of `sp_getapplock` and `sp_releaseapplock`, as documented at
/// <https://learn.microsoft.com/sql/relational-databases/system-stored-procedures/sp-getapplock-transact-sql>.
pub(crate) mod return_codes {
    /// The lock was granted synchronously.
    pub(crate) const GRANTED: i32 = 0;
    /// The lock was granted after waiting for incompatible locks to be
    /// released.
    pub(crate) const GRANTED_AFTER_WAIT: i32 = 1;
    /// The request timed out: not granted (with `@LockTimeout = 0`: not
    /// grantable at once).
    pub(crate) const TIMEOUT: i32 = -1;
    /// The request was cancelled.
    pub(crate) const CANCELLED: i32 = -2;
    /// The request was chosen as a deadlock victim.
    pub(crate) const DEADLOCK_VICTIM: i32 = -3;
    /// Parameter validation or other call error (both procedures).
    pub(crate) const CALL_ERROR: i32 = -999;
    /// `sp_releaseapplock`: the lock was released.
    pub(crate) const RELEASED: i32 = 0;
}

/// SQL Server error numbers the driver classifies.
pub(crate) mod server_errors {
    /// Login failed for user.
    pub(crate) const LOGIN_FAILED: u32 = 18456;
    /// Login from an untrusted domain (integrated authentication).
    pub(crate) const UNTRUSTED_DOMAIN: u32 = 18452;
    /// Cannot open the database requested by the login.
    pub(crate) const CANNOT_OPEN_DATABASE: u32 = 4060;
    /// The database does not exist or is not accessible (`USE`, Azure).
    pub(crate) const DATABASE_NOT_ACCESSIBLE: u32 = 911;
    /// The session is in the kill state (ended with `KILL`).
    pub(crate) const SESSION_KILLED: u32 = 596;
    /// The server is shutting down.
    pub(crate) const SHUTDOWN_IN_PROGRESS: u32 = 6005;
    /// Errors of this severity (class) or higher end the connection.
    pub(crate) const FATAL_CLASS: u8 = 20;
}

/// Engine editions (`SERVERPROPERTY('EngineEdition')`) on which
/// `sp_getapplock` is not available: Azure Synapse dedicated SQL pools (6) and
/// serverless SQL pools (11).
pub(crate) const UNSUPPORTED_EDITIONS: &[i32] = &[6, 11];

/// Why `sp_getapplock` or `sp_releaseapplock` failed (a return code that is
/// neither "granted" nor "not granted").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum AppLockFailure {
    /// `-2`: the lock request was cancelled.
    Cancelled,
    /// `-3`: the lock request was chosen as a deadlock victim (the session
    /// waited for a key while another session waited for one of its keys).
    DeadlockVictim,
    /// `-999`: parameter validation or another call error.
    CallError,
    /// A negative code the documentation does not list.
    Unknown(i32),
}

impl AppLockFailure {
    /// The return code.
    pub fn code(self) -> i32 {
        match self {
            Self::Cancelled => return_codes::CANCELLED,
            Self::DeadlockVictim => return_codes::DEADLOCK_VICTIM,
            Self::CallError => return_codes::CALL_ERROR,
            Self::Unknown(code) => code,
        }
    }
}

impl std::fmt::Display for AppLockFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Cancelled => f.write_str("the lock request was cancelled (-2)"),
            Self::DeadlockVictim => {
                f.write_str("the lock request was chosen as a deadlock victim (-3)")
            }
            Self::CallError => f.write_str("parameter validation or other call error (-999)"),
            Self::Unknown(code) => write!(f, "undocumented return code {code}"),
        }
    }
}

/// Maps an `sp_getapplock` return code: `Ok(true)` granted (0, 1 and any
/// other non-negative code, which the documentation calls success),
/// `Ok(false)` not granted (-1, timeout), `Err` for the failures.
pub(crate) fn map_get_code(code: i32) -> Result<bool, AppLockFailure> {
    match code {
        return_codes::GRANTED | return_codes::GRANTED_AFTER_WAIT => Ok(true),
        return_codes::TIMEOUT => Ok(false),
        return_codes::CANCELLED => Err(AppLockFailure::Cancelled),
        return_codes::DEADLOCK_VICTIM => Err(AppLockFailure::DeadlockVictim),
        return_codes::CALL_ERROR => Err(AppLockFailure::CallError),
        code if code >= 0 => Ok(true),
        code => Err(AppLockFailure::Unknown(code)),
    }
}

/// What a release batch reported for one resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReleaseOutcome {
    /// `sp_releaseapplock` returned 0.
    Released,
    /// The server did not show the lock as held by this session, so
    /// `sp_releaseapplock` was not called.
    NotHeld,
    /// `sp_releaseapplock` failed.
    Failed(AppLockFailure),
}

/// Maps a code from a release batch (see `sql::release`).
pub(crate) fn map_release_code(code: i32) -> ReleaseOutcome {
    match code {
        return_codes::RELEASED => ReleaseOutcome::Released,
        crate::sql::NOT_HELD => ReleaseOutcome::NotHeld,
        return_codes::CALL_ERROR => ReleaseOutcome::Failed(AppLockFailure::CallError),
        code if code > 0 => ReleaseOutcome::Released,
        code => ReleaseOutcome::Failed(AppLockFailure::Unknown(code)),
    }
}

/// Everything that can go wrong in the SQL Server driver.
///
/// Converted into shardlock's [`Error`] by
/// [`into_session_error`](Self::into_session_error) (session-fatal failures
/// become [`Error::SessionLost`]) and
/// [`into_connect_error`](Self::into_connect_error) ([`Error::Connect`]); the
/// `MssqlError` stays reachable as the source.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MssqlError {
    /// The connection string or URL could not be parsed.
    #[error("invalid SQL Server connection string: {reason}")]
    InvalidConnectionString {
        /// What is wrong (never contains the password).
        reason: String,
        /// tiberius' parse error, when it reported one.
        #[source]
        source: Option<tiberius::error::Error>,
    },

    /// The server's address could not be resolved or did not accept a TCP
    /// connection.
    #[error("SQL Server at {addr} is unreachable")]
    Unreachable {
        /// `host:port` (or `host\instance`).
        addr: String,
        /// The I/O error.
        #[source]
        source: tiberius::error::Error,
    },

    /// Connecting did not finish within the connect timeout.
    #[error("connecting to SQL Server at {addr} did not finish within {after:?}")]
    ConnectTimeout {
        /// `host:port`.
        addr: String,
        /// The timeout.
        after: Duration,
    },

    /// The TDS handshake (pre-login, TLS, login) failed for a reason other
    /// than the credentials; e.g. the peer does not speak TDS, or TLS failed.
    #[error(
        "TDS handshake with {addr} failed (is it a SQL Server, and do the TLS settings match?)"
    )]
    Handshake {
        /// `host:port`.
        addr: String,
        /// tiberius' error.
        #[source]
        source: tiberius::error::Error,
    },

    /// The server rejected the login (wrong user or password, error 18456).
    #[error("SQL Server rejected the login")]
    LoginFailed {
        /// The server's error.
        #[source]
        source: tiberius::error::Error,
    },

    /// The login succeeded but the database cannot be opened (it does not
    /// exist, or the login has no access: error 4060).
    #[error(
        "cannot open database {database:?}: it does not exist or the login has no access to it"
    )]
    DatabaseUnavailable {
        /// The database name.
        database: String,
        /// The server's error.
        #[source]
        source: tiberius::error::Error,
    },

    /// The peer speaks TDS but is not a SQL Server edition with application
    /// locks (e.g. Azure Synapse, Babelfish, Sybase).
    #[error("the server is not a supported SQL Server ({detail})")]
    NotSqlServer {
        /// What the server reported (`@@VERSION`, engine edition).
        detail: String,
        /// The error of the check query, when it failed.
        #[source]
        source: Option<tiberius::error::Error>,
    },

    /// The connection to the server is gone (I/O error, fatal server error,
    /// session killed); every lock of the session is lost.
    #[error("connection lost during {operation}")]
    ConnectionLost {
        /// What was running.
        operation: &'static str,
        /// tiberius' error, when there is one.
        #[source]
        source: Option<tiberius::error::Error>,
    },

    /// A batch that takes or releases locks failed with a server error, so
    /// which of its locks are held is unknown. The driver closes the
    /// connection (which frees every lock of the session) and the session is
    /// lost.
    #[error("{operation} failed on the server; the session's locks are in an unknown state and it was closed")]
    LockStateUnknown {
        /// What was running.
        operation: &'static str,
        /// The server's error.
        #[source]
        source: tiberius::error::Error,
    },

    /// A query failed without affecting locks (e.g. `verify`).
    #[error("{operation} failed")]
    Query {
        /// What was running.
        operation: &'static str,
        /// tiberius' error.
        #[source]
        source: tiberius::error::Error,
    },

    /// `sp_getapplock` answered a failure code for `resource`.
    #[error("sp_getapplock on {resource:?} failed: {failure}")]
    LockRequest {
        /// The resource name.
        resource: String,
        /// The failure.
        failure: AppLockFailure,
    },

    /// `sp_releaseapplock` answered a failure code for `resource`.
    #[error("sp_releaseapplock on {resource:?} failed: {failure}")]
    Release {
        /// The resource name.
        resource: String,
        /// The failure.
        failure: AppLockFailure,
    },

    /// A result did not have the expected shape (row count, order, types).
    #[error("unexpected result from {operation}: {detail}")]
    UnexpectedResult {
        /// What was running.
        operation: &'static str,
        /// What was wrong.
        detail: String,
    },
}

impl MssqlError {
    /// Classifies a tiberius error of a query: a lost connection, or a query
    /// failure.
    pub(crate) fn from_query(operation: &'static str, source: tiberius::error::Error) -> Self {
        if tiberius_connection_lost(&source) {
            Self::ConnectionLost {
                operation,
                source: Some(source),
            }
        } else {
            Self::Query { operation, source }
        }
    }

    /// Classifies a tiberius error of a batch that changes locks: a lost
    /// connection, or an unknown lock state (both session-fatal).
    pub(crate) fn from_lock_batch(operation: &'static str, source: tiberius::error::Error) -> Self {
        if tiberius_connection_lost(&source) {
            Self::ConnectionLost {
                operation,
                source: Some(source),
            }
        } else {
            Self::LockStateUnknown { operation, source }
        }
    }

    /// The server's error number, if the server reported the error.
    pub fn server_error_code(&self) -> Option<u32> {
        self.tiberius_error().and_then(tiberius::error::Error::code)
    }

    /// The underlying tiberius error, if there is one.
    pub fn tiberius_error(&self) -> Option<&tiberius::error::Error> {
        match self {
            Self::InvalidConnectionString { source, .. }
            | Self::NotSqlServer { source, .. }
            | Self::ConnectionLost { source, .. } => source.as_ref(),
            Self::Unreachable { source, .. }
            | Self::Handshake { source, .. }
            | Self::LoginFailed { source }
            | Self::DatabaseUnavailable { source, .. }
            | Self::LockStateUnknown { source, .. }
            | Self::Query { source, .. } => Some(source),
            Self::ConnectTimeout { .. }
            | Self::LockRequest { .. }
            | Self::Release { .. }
            | Self::UnexpectedResult { .. } => None,
        }
    }

    /// True when the connection is gone: the server has ended (or will end)
    /// the session and freed its locks.
    pub fn is_connection_lost(&self) -> bool {
        matches!(self, Self::ConnectionLost { .. })
    }

    /// True when the session that produced this error can no longer be
    /// trusted: the connection is lost, or its lock state is unknown (a lock
    /// batch failed, a result had the wrong shape, or `sp_releaseapplock`
    /// failed, so the lock may still be held by a session that no longer
    /// tracks it). It maps to [`Error::SessionLost`].
    pub fn is_session_fatal(&self) -> bool {
        matches!(
            self,
            Self::ConnectionLost { .. }
                | Self::LockStateUnknown { .. }
                | Self::UnexpectedResult { .. }
                | Self::Release { .. }
        )
    }

    /// True for a deadlock-victim answer of `sp_getapplock` (return code -3):
    /// the session waited for a key while another waited for one of its keys.
    pub fn is_deadlock(&self) -> bool {
        matches!(
            self,
            Self::LockRequest {
                failure: AppLockFailure::DeadlockVictim,
                ..
            }
        )
    }

    /// Converts into shardlock's error for a session on `database`:
    /// session-fatal errors become [`Error::SessionLost`], others
    /// [`Error::Driver`].
    pub fn into_session_error(self, database: &DatabaseId) -> Error {
        if self.is_session_fatal() {
            Error::SessionLost {
                database: database.to_string(),
                reason: self.to_string(),
                source: Some(Box::new(self)),
            }
        } else {
            Error::driver(DRIVER, self)
        }
    }

    /// Converts a failure to open a session on `database` into
    /// [`Error::Connect`], whatever the cause (a bad connection string too:
    /// [`Error::Config`] would drop this error as the source).
    pub fn into_connect_error(self, database: &DatabaseId) -> Error {
        Error::Connect {
            database: database.to_string(),
            source: Box::new(self),
        }
    }
}

impl From<MssqlError> for Error {
    fn from(e: MssqlError) -> Self {
        Error::driver(DRIVER, e)
    }
}

/// True when a tiberius error means the connection cannot be used any more.
pub(crate) fn tiberius_connection_lost(e: &tiberius::error::Error) -> bool {
    use tiberius::error::Error as T;
    match e {
        // The socket failed or the stream is out of sync with the server.
        T::Io { .. } | T::Protocol(_) | T::Tls(_) => true,
        T::Server(token) => {
            token.class() >= server_errors::FATAL_CLASS
                || matches!(
                    token.code(),
                    server_errors::SESSION_KILLED | server_errors::SHUTDOWN_IN_PROGRESS
                )
        }
        _ => false,
    }
}

/// Classifies a failure of `Client::connect` (pre-login, TLS, login).
pub(crate) fn classify_login_error(
    addr: &str,
    database: Option<&str>,
    source: tiberius::error::Error,
) -> MssqlError {
    match source.code() {
        Some(server_errors::LOGIN_FAILED | server_errors::UNTRUSTED_DOMAIN) => {
            MssqlError::LoginFailed { source }
        }
        Some(server_errors::CANNOT_OPEN_DATABASE | server_errors::DATABASE_NOT_ACCESSIBLE) => {
            MssqlError::DatabaseUnavailable {
                database: database.unwrap_or_default().to_string(),
                source,
            }
        }
        _ => MssqlError::Handshake {
            addr: addr.to_string(),
            source,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_documented_get_code_is_mapped() {
        assert_eq!(map_get_code(0), Ok(true), "granted synchronously");
        assert_eq!(map_get_code(1), Ok(true), "granted after waiting");
        assert_eq!(map_get_code(-1), Ok(false), "timed out: not granted");
        assert_eq!(map_get_code(-2), Err(AppLockFailure::Cancelled));
        assert_eq!(map_get_code(-3), Err(AppLockFailure::DeadlockVictim));
        assert_eq!(map_get_code(-999), Err(AppLockFailure::CallError));
        // The documentation says ">= 0 (success)".
        assert_eq!(map_get_code(7), Ok(true));
        assert_eq!(map_get_code(-4), Err(AppLockFailure::Unknown(-4)));
        for failure in [
            AppLockFailure::Cancelled,
            AppLockFailure::DeadlockVictim,
            AppLockFailure::CallError,
            AppLockFailure::Unknown(-42),
        ] {
            assert_eq!(map_get_code(failure.code()), Err(failure));
            assert!(!failure.to_string().is_empty());
        }
    }

    #[test]
    fn every_release_code_is_mapped() {
        assert_eq!(map_release_code(0), ReleaseOutcome::Released);
        assert_eq!(
            map_release_code(crate::sql::NOT_HELD),
            ReleaseOutcome::NotHeld
        );
        assert_eq!(
            map_release_code(-999),
            ReleaseOutcome::Failed(AppLockFailure::CallError)
        );
        assert_eq!(
            map_release_code(-5),
            ReleaseOutcome::Failed(AppLockFailure::Unknown(-5))
        );
    }

    fn io_error() -> tiberius::error::Error {
        std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset").into()
    }

    #[test]
    fn io_and_protocol_errors_are_connection_loss() {
        assert!(tiberius_connection_lost(&io_error()));
        assert!(tiberius_connection_lost(&tiberius::error::Error::Protocol(
            "desync".into()
        )));
        assert!(tiberius_connection_lost(&tiberius::error::Error::Tls(
            "bad record".into()
        )));
        assert!(!tiberius_connection_lost(
            &tiberius::error::Error::Conversion("x".into())
        ));
        assert!(!tiberius_connection_lost(&tiberius::error::Error::Utf16));
    }

    #[test]
    fn session_fatal_errors_become_session_lost() {
        let db = DatabaseId::new("main");
        let lost = MssqlError::from_query("verify", io_error());
        assert!(lost.is_connection_lost() && lost.is_session_fatal());
        let err = lost.into_session_error(&db);
        assert!(matches!(err, Error::SessionLost { .. }), "{err:?}");
        assert!(err.is_session_fatal());
        // The driver error stays reachable as the source.
        let source = std::error::Error::source(&err).expect("source");
        assert!(source.downcast_ref::<MssqlError>().is_some());

        let unknown = MssqlError::from_lock_batch(
            "try_acquire",
            tiberius::error::Error::Conversion("x".into()),
        );
        assert!(!unknown.is_connection_lost());
        assert!(unknown.is_session_fatal());
        assert!(unknown.into_session_error(&db).is_session_fatal());

        let query = MssqlError::from_query("verify", tiberius::error::Error::Utf8);
        assert!(matches!(query, MssqlError::Query { .. }));
    }

    #[test]
    fn lock_failures_are_driver_errors_not_session_loss() {
        let db = DatabaseId::new("main");
        let e = MssqlError::LockRequest {
            resource: "shardlock:v1:x".into(),
            failure: AppLockFailure::DeadlockVictim,
        };
        assert!(e.is_deadlock());
        assert!(!e.is_session_fatal());
        let err = e.into_session_error(&db);
        assert!(
            matches!(
                err,
                Error::Driver {
                    driver: "sqlserver",
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(!err.is_session_fatal());
        // A failed release leaves the lock state unknown: session-fatal.
        let e = MssqlError::Release {
            resource: "shardlock:v1:x".into(),
            failure: AppLockFailure::CallError,
        };
        assert!(e.into_session_error(&db).is_session_fatal());
    }

    #[test]
    fn connect_errors_keep_their_source() {
        let db = DatabaseId::new("tenant_7");
        let e = MssqlError::ConnectTimeout {
            addr: "db:1433".into(),
            after: Duration::from_secs(3),
        };
        let err = e.into_connect_error(&db);
        assert!(matches!(&err, Error::Connect { database, .. } if database == "tenant_7"));
        let source = std::error::Error::source(&err).expect("source");
        assert!(source.to_string().contains("db:1433"));
    }

    #[test]
    fn login_errors_are_classified_by_number() {
        let other = classify_login_error("db:1433", Some("main"), io_error());
        assert!(matches!(other, MssqlError::Handshake { .. }));
        assert!(other.to_string().contains("db:1433"));
    }
}
