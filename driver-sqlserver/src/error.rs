//! The driver's error type, `sp_getapplock` return codes and server error
//! numbers, and the mapping into shardlock's [`Error`].

use std::time::Duration;

use shardlock_core::{DriverError, ErrorKind};

#[cfg(doc)]
use shardlock_core::Error;

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
/// Classified once through [`DriverError::kind`] (see the table on that
/// impl) and converted into shardlock's [`Error`] by the one core mapping:
/// [`Error::from_driver`] for a session (session-fatal failures become
/// [`Error::SessionLost`], others [`Error::Driver`]) and [`Error::connect`]
/// for a failed connect ([`Error::Connect`]). The `MssqlError` always stays
/// reachable as the source, and its message never repeats its own source's.
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

    /// A session-fenced transaction can no longer commit: one of its
    /// statements failed (the server rolled the whole transaction back,
    /// `XACT_ABORT ON`) or was abandoned while running. Nothing was
    /// committed; the session and its locks are unaffected.
    #[error("the fenced transaction cannot commit: {reason}")]
    TransactionAborted {
        /// What happened.
        reason: String,
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
            | Self::TransactionAborted { .. }
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
}

/// How each failure maps onto shardlock's [`Error`] (through
/// [`Error::from_driver`] for sessions and [`Error::connect`] for connects):
///
/// | error | kind | why |
/// |---|---|---|
/// | [`ConnectionLost`](MssqlError::ConnectionLost) | session-fatal | the socket failed, hit EOF, or the server ended the session (fatal class ≥ 20, 596 killed, 6005 shutdown): its locks are freed |
/// | [`Unreachable`](MssqlError::Unreachable), [`ConnectTimeout`](MssqlError::ConnectTimeout) | session-fatal | the connection could not be had (refused, unresolvable, silent): a connection-level failure a later attempt may overcome, as core classifies a refused connection |
/// | [`LockStateUnknown`](MssqlError::LockStateUnknown), [`Release`](MssqlError::Release), [`UnexpectedResult`](MssqlError::UnexpectedResult) | session-fatal | which locks the session holds is unknown; the driver drops the connection |
/// | [`InvalidConnectionString`](MssqlError::InvalidConnectionString), [`LoginFailed`](MssqlError::LoginFailed) (18456, 18452), [`DatabaseUnavailable`](MssqlError::DatabaseUnavailable) (4060, 911), [`NotSqlServer`](MssqlError::NotSqlServer) | configuration | retrying fails the same way until someone changes a setting |
/// | [`Handshake`](MssqlError::Handshake) | configuration, or session-fatal when the socket failed during it | TLS settings or a peer that is not SQL Server are configuration; a reset is a connection failure |
/// | [`LockRequest`](MssqlError::LockRequest) (-2 cancelled, -3 deadlock victim, -999) | other | the key was not granted and nothing else changed: a session-owned application lock taken outside a transaction has no transaction to roll back, so the session keeps every lock it held |
/// | [`Query`](MssqlError::Query) | other | a read-only query (or a statement of a fenced transaction) failed; `verify` reports it as a loss itself |
/// | [`TransactionAborted`](MssqlError::TransactionAborted) | other | a fenced transaction cannot commit; the session and its locks are untouched |
impl DriverError for MssqlError {
    fn driver(&self) -> &'static str {
        DRIVER
    }

    fn kind(&self) -> ErrorKind {
        match self {
            Self::ConnectionLost { .. }
            | Self::Unreachable { .. }
            | Self::ConnectTimeout { .. }
            | Self::LockStateUnknown { .. }
            | Self::UnexpectedResult { .. }
            | Self::Release { .. } => ErrorKind::SessionFatal,
            Self::InvalidConnectionString { .. }
            | Self::LoginFailed { .. }
            | Self::DatabaseUnavailable { .. }
            | Self::NotSqlServer { .. } => ErrorKind::Config,
            Self::Handshake { source, .. } => {
                if matches!(source, tiberius::error::Error::Io { .. }) {
                    ErrorKind::SessionFatal
                } else {
                    ErrorKind::Config
                }
            }
            Self::LockRequest { .. } | Self::Query { .. } | Self::TransactionAborted { .. } => {
                ErrorKind::Other
            }
        }
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
    use shardlock_core::{DatabaseId, Error};

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
        assert!(lost.is_connection_lost());
        assert_eq!(lost.kind(), ErrorKind::SessionFatal);
        let err = Error::from_driver(&db, lost);
        assert!(matches!(err, Error::SessionLost { .. }), "{err:?}");
        assert!(err.is_session_fatal());
        // The driver error stays reachable as the source, and the printed
        // chain says each thing once.
        let source = std::error::Error::source(&err).expect("source");
        assert!(source.downcast_ref::<MssqlError>().is_some());
        let report = err.report();
        assert!(
            report.starts_with(
                "session to database \"main\" lost its locks: connection lost during verify: "
            ) && report.ends_with("reset")
                && report.matches("connection lost").count() == 1,
            "{report}"
        );

        let unknown = MssqlError::from_lock_batch(
            "try_acquire",
            tiberius::error::Error::Conversion("x".into()),
        );
        assert!(!unknown.is_connection_lost());
        assert_eq!(unknown.kind(), ErrorKind::SessionFatal);
        assert!(Error::from_driver(&db, unknown).is_session_fatal());

        let query = MssqlError::from_query("verify", tiberius::error::Error::Utf8);
        assert!(matches!(query, MssqlError::Query { .. }));
        assert_eq!(query.kind(), ErrorKind::Other);
    }

    #[test]
    fn lock_failures_are_driver_errors_not_session_loss() {
        let db = DatabaseId::new("main");
        let e = MssqlError::LockRequest {
            resource: "shardlock:v1:x".into(),
            failure: AppLockFailure::DeadlockVictim,
        };
        assert!(e.is_deadlock());
        // A deadlock victim was not granted the key; the session-owned locks
        // it holds are untouched (no transaction to roll back).
        assert_eq!(e.kind(), ErrorKind::Other);
        let err = Error::from_driver(&db, e);
        assert!(
            matches!(
                err,
                Error::Driver {
                    driver: "sqlserver",
                    kind: ErrorKind::Other,
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
        assert!(Error::from_driver(&db, e).is_session_fatal());
    }

    #[test]
    fn connect_errors_keep_their_source_and_kind() {
        let db = DatabaseId::new("tenant_7");
        let e = MssqlError::ConnectTimeout {
            addr: "db:1433".into(),
            after: Duration::from_secs(3),
        };
        let err = Error::connect(&db, e);
        assert!(
            matches!(&err, Error::Connect { database, kind: ErrorKind::SessionFatal, .. } if database.as_str() == "tenant_7")
        );
        let source = std::error::Error::source(&err).expect("source");
        assert!(source.to_string().contains("db:1433"));

        let login = MssqlError::LoginFailed {
            source: tiberius::error::Error::Conversion("login failed".into()),
        };
        assert_eq!(Error::connect(&db, login).kind(), ErrorKind::Config);
        let bad = MssqlError::InvalidConnectionString {
            reason: "the connection string is empty".into(),
            source: None,
        };
        assert_eq!(bad.kind(), ErrorKind::Config);
        let not = MssqlError::NotSqlServer {
            detail: "Babelfish".into(),
            source: None,
        };
        assert_eq!(not.kind(), ErrorKind::Config);
        let unreachable = MssqlError::Unreachable {
            addr: "db:1433".into(),
            source: io_error(),
        };
        assert_eq!(unreachable.kind(), ErrorKind::SessionFatal);
        let reset = classify_login_error("db:1433", None, io_error());
        assert_eq!(
            reset.kind(),
            ErrorKind::SessionFatal,
            "a reset handshake is a connection failure"
        );
        let tls = classify_login_error(
            "db:1433",
            None,
            tiberius::error::Error::Tls("bad certificate".into()),
        );
        assert_eq!(
            tls.kind(),
            ErrorKind::Config,
            "TLS settings are configuration"
        );
    }

    #[test]
    fn login_errors_are_classified_by_number() {
        let other = classify_login_error("db:1433", Some("main"), io_error());
        assert!(matches!(other, MssqlError::Handshake { .. }));
        assert!(other.to_string().contains("db:1433"));
    }
}
