//! The driver's own error type, its SQLSTATE classification, and its
//! [`DriverError`] kind for the one mapping into shardlock's
//! [`Error`](shardlock_core::Error) ([`Error::from_driver`] and
//! [`Error::connect`], in core).
//!
//! Messages never repeat their source: a [`PgError`] says what the driver was
//! doing, and its source, a [`PgCause`], says what the server or the client
//! library answered, in their own words and once (sqlx's own error repeats
//! the server's text in its source, so the chain stops at the [`PgCause`]).

use std::error::Error as StdError;
use std::fmt;
use std::time::Duration;

use shardlock_core::{DriverError, ErrorKind};
use sqlx::postgres::{PgDatabaseError, PgSeverity};

/// Short name of this driver in errors and logs.
pub(crate) const DRIVER: &str = "postgres";

/// SQLSTATE codes this driver reacts to
/// (<https://www.postgresql.org/docs/current/errcodes-appendix.html>).
pub(crate) mod sqlstate {
    /// `57014 query_canceled`: `pg_cancel_backend`, `statement_timeout`.
    pub(crate) const QUERY_CANCELED: &str = "57014";
    /// `57P01 admin_shutdown`: `pg_terminate_backend`, server shut down.
    pub(crate) const ADMIN_SHUTDOWN: &str = "57P01";
    /// `57P02 crash_shutdown`: another backend crashed, the server restarts.
    pub(crate) const CRASH_SHUTDOWN: &str = "57P02";
    /// `57P03 cannot_connect_now`: the server is starting or in recovery.
    pub(crate) const CANNOT_CONNECT_NOW: &str = "57P03";
    /// `57P05 idle_session_timeout` (PostgreSQL 14+).
    pub(crate) const IDLE_SESSION_TIMEOUT: &str = "57P05";
    /// `25P03 idle_in_transaction_session_timeout`.
    pub(crate) const IDLE_IN_TRANSACTION_TIMEOUT: &str = "25P03";
    /// Class `08`: connection exception.
    pub(crate) const CONNECTION_EXCEPTION_CLASS: &str = "08";
    /// `53200 out_of_shared_memory`: the shared lock table is full.
    pub(crate) const OUT_OF_SHARED_MEMORY: &str = "53200";
    /// `28P01 invalid_password`.
    pub(crate) const INVALID_PASSWORD: &str = "28P01";
    /// `28000 invalid_authorization_specification` (no `pg_hba.conf` entry,
    /// unknown role).
    pub(crate) const INVALID_AUTHORIZATION: &str = "28000";
    /// `3D000 invalid_catalog_name`: the database does not exist.
    pub(crate) const INVALID_CATALOG_NAME: &str = "3D000";
    /// `26000 invalid_sql_statement_name`: a prepared statement vanished,
    /// typical of a transaction-pooling proxy.
    pub(crate) const INVALID_SQL_STATEMENT_NAME: &str = "26000";
}

/// The sizing rule of PostgreSQL's shared lock table, quoted in errors and
/// docs.
pub(crate) const LOCK_TABLE_SIZING: &str = "the server's shared lock table holds about \
max_locks_per_transaction × (max_connections + max_prepared_transactions) locks in total \
(64 × (100 + 0) = 6,400 with the defaults), shared by every session, and must cover the \
advisory locks all nodes hold at once plus the server's ordinary locking; changing \
max_locks_per_transaction needs a server restart";

/// What the server or the client library answered, behind a [`PgError`]:
/// the client library's [`sqlx::Error`], shown in the server's own words.
///
/// sqlx's error repeats its cause in its own text (`error returned from
/// database: X`, whose source is `X` again), so this wrapper shows the
/// innermost text once (the server's message for a server error, the I/O
/// error for a broken socket) and ends the chain. The full sqlx error, and
/// through it the [`PgDatabaseError`] with SQLSTATE, detail and hint, stays
/// available through [`sqlx`](Self::sqlx).
///
/// ```
/// use shardlock_postgres::PgCause;
///
/// let io = std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "connection closed");
/// let cause = PgCause::from(shardlock_postgres::sqlx::Error::Io(io));
/// assert_eq!(cause.to_string(), "connection closed");
/// assert!(std::error::Error::source(&cause).is_none());
/// ```
#[derive(Debug)]
pub struct PgCause(sqlx::Error);

impl PgCause {
    /// The client library's error.
    pub fn sqlx(&self) -> &sqlx::Error {
        &self.0
    }

    /// The client library's error, by value.
    pub fn into_sqlx(self) -> sqlx::Error {
        self.0
    }

    /// The SQLSTATE, for an error the server sent.
    pub fn sqlstate(&self) -> Option<&str> {
        sqlstate_of(&self.0)
    }
}

impl From<sqlx::Error> for PgCause {
    fn from(err: sqlx::Error) -> Self {
        Self(err)
    }
}

impl fmt::Display for PgCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            sqlx::Error::Database(db) => f.write_str(db.message()),
            sqlx::Error::Io(io) => fmt::Display::fmt(io, f),
            other => fmt::Display::fmt(other, f),
        }
    }
}

impl StdError for PgCause {
    /// None: the text above already says everything the chain below would.
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        None
    }
}

/// What went wrong in the PostgreSQL driver.
///
/// Mapped into shardlock's [`Error`](shardlock_core::Error) by core's one
/// mapping, through this type's [`DriverError::kind`]: a lost connection is
/// session-fatal ([`Error::SessionLost`](shardlock_core::Error::SessionLost)),
/// a failure to open a session is
/// [`Error::Connect`](shardlock_core::Error::Connect), anything else
/// [`Error::Driver`](shardlock_core::Error::Driver); this error always stays
/// the source. Each message says what the driver was doing; the server's
/// words are in the [`PgCause`] source, never repeated.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PgError {
    /// The connection URL or an option is invalid.
    #[error("invalid PostgreSQL connection options: {reason}")]
    Config {
        /// What is wrong.
        reason: String,
        /// The client library's parse error, when there is one.
        #[source]
        source: Option<PgCause>,
    },

    /// The server could not be reached: refused, unknown host, TLS failure.
    #[error("cannot reach the PostgreSQL server at {target}")]
    Unreachable {
        /// `host:port` (or socket path), without credentials.
        target: String,
        /// The client library's error.
        #[source]
        source: PgCause,
    },

    /// Opening the connection took longer than the connect timeout.
    #[error("connecting to the PostgreSQL server at {target} did not finish within {after:?}")]
    ConnectTimeout {
        /// `host:port` (or socket path), without credentials.
        target: String,
        /// The connect timeout.
        after: Duration,
    },

    /// The server refused the credentials (SQLSTATE `28P01`/`28000`).
    #[error(
        "the PostgreSQL server at {target} refused user {user:?} (SQLSTATE {code}; check the \
         user name, the password and the server's pg_hba.conf)"
    )]
    Authentication {
        /// `host:port` (or socket path).
        target: String,
        /// The user name tried.
        user: String,
        /// The SQLSTATE.
        code: String,
        /// The server's error.
        #[source]
        source: PgCause,
    },

    /// The database does not exist on the server (SQLSTATE `3D000`).
    #[error(
        "database {database:?} does not exist on the PostgreSQL server at {target} \
         (SQLSTATE 3D000; create it, or map shardlock's database ids to existing \
         databases with PgOptions::database_mapping)"
    )]
    UnknownDatabase {
        /// `host:port` (or socket path).
        target: String,
        /// The database name tried.
        database: String,
        /// The server's error.
        #[source]
        source: PgCause,
    },

    /// The server speaks the PostgreSQL protocol but is not PostgreSQL (e.g.
    /// CockroachDB, whose advisory-lock functions do not lock).
    #[error(
        "the server is not PostgreSQL ({version:?}): shardlock needs PostgreSQL's \
         session-level advisory locks"
    )]
    NotPostgres {
        /// What `version()` answered.
        version: String,
    },

    /// The server is older than the oldest supported version.
    #[error("PostgreSQL {version:?} ({version_num}) is too old: shardlock needs {min} or newer")]
    UnsupportedVersion {
        /// What `version()` answered.
        version: String,
        /// `server_version_num`, e.g. `110022`.
        version_num: u32,
        /// The oldest supported `server_version_num`.
        min: u32,
    },

    /// Two statements on one connection ran in different server processes:
    /// the connection goes through a transaction-pooling proxy.
    #[error(
        "transaction pooling detected: two statements on one connection ran in different \
         server processes (backend pid {first} then {second}). Session-level advisory locks \
         belong to one server process and cannot work through a transaction-pooling proxy \
         (e.g. PgBouncer with pool_mode = transaction): connect to PostgreSQL directly, or \
         through a pool in session mode"
    )]
    TransactionPooling {
        /// Backend pid of the first statement.
        first: i32,
        /// Backend pid of the second statement.
        second: i32,
    },

    /// The server's shared lock table is full (SQLSTATE `53200`
    /// `out_of_shared_memory`).
    #[error(
        "PostgreSQL is out of shared memory for locks (SQLSTATE 53200) during {operation}: \
         raise max_locks_per_transaction on the server ({sizing})",
        sizing = LOCK_TABLE_SIZING
    )]
    LockTableFull {
        /// What was attempted.
        operation: &'static str,
        /// The server's error.
        #[source]
        source: PgCause,
    },

    /// The connection broke or the server ended the session; every lock of
    /// the session must be treated as lost.
    #[error("the connection to PostgreSQL was lost during {operation}")]
    ConnectionLost {
        /// What was attempted.
        operation: &'static str,
        /// The client library's or server's error.
        #[source]
        source: PgCause,
    },

    /// A blocking wait was abandoned (cancelled or its future dropped) and
    /// its connection had to be closed to be sure the key is not held; the
    /// session is over.
    #[error("the session was closed after an abandoned wait: {reason}")]
    WaitAbandoned {
        /// What happened.
        reason: &'static str,
    },

    /// Any other failure of a statement.
    #[error("{operation} failed")]
    Query {
        /// What was attempted.
        operation: &'static str,
        /// The client library's or server's error.
        #[source]
        source: PgCause,
    },
}

impl PgError {
    /// Classifies a failure of a statement on an open session.
    pub(crate) fn from_query(operation: &'static str, source: sqlx::Error) -> Self {
        if is_connection_error(&source) {
            return Self::ConnectionLost {
                operation,
                source: source.into(),
            };
        }
        match sqlstate_of(&source).map(classify) {
            Some(Class::LockTableFull) => Self::LockTableFull {
                operation,
                source: source.into(),
            },
            _ => Self::Query {
                operation,
                source: source.into(),
            },
        }
    }

    /// The SQLSTATE of the server error behind this one, if any.
    pub fn sqlstate(&self) -> Option<&str> {
        self.sqlx_error().and_then(sqlstate_of)
    }

    /// The client library's error behind this one, if any (downcast its
    /// [`as_database_error`](sqlx::Error::as_database_error) to
    /// [`PgDatabaseError`] for the server's detail and hint).
    pub fn sqlx_error(&self) -> Option<&sqlx::Error> {
        match self {
            Self::Config { source, .. } => source.as_ref().map(PgCause::sqlx),
            Self::Unreachable { source, .. }
            | Self::Authentication { source, .. }
            | Self::UnknownDatabase { source, .. }
            | Self::LockTableFull { source, .. }
            | Self::ConnectionLost { source, .. }
            | Self::Query { source, .. } => Some(source.sqlx()),
            Self::ConnectTimeout { .. }
            | Self::NotPostgres { .. }
            | Self::UnsupportedVersion { .. }
            | Self::TransactionPooling { .. }
            | Self::WaitAbandoned { .. } => None,
        }
    }

    /// True when the session's connection is gone: its locks are lost.
    pub fn is_connection_lost(&self) -> bool {
        matches!(
            self,
            Self::ConnectionLost { .. } | Self::WaitAbandoned { .. }
        )
    }

    /// True when the server's shared lock table is full: see
    /// [`PgError::LockTableFull`] and the crate docs for the sizing rule.
    pub fn is_lock_table_full(&self) -> bool {
        matches!(self, Self::LockTableFull { .. })
    }

    /// True for a statement cancelled by `pg_cancel_backend` or a timeout
    /// (SQLSTATE `57014`).
    pub fn is_query_canceled(&self) -> bool {
        self.sqlstate().map(classify) == Some(Class::QueryCanceled)
    }
}

impl DriverError for PgError {
    fn driver(&self) -> &'static str {
        DRIVER
    }

    /// - [`ErrorKind::SessionFatal`]: the connection is gone (reset, EOF,
    ///   `pg_terminate_backend`, shutdown, `57P0x`, class `08`), an abandoned
    ///   wait closed it, or the server could not be reached or answered too
    ///   slowly at connect (worth retrying).
    /// - [`ErrorKind::Config`]: credentials, unknown database, a server that
    ///   is not PostgreSQL or too old, transaction pooling, invalid options:
    ///   retrying fails the same way until someone changes something.
    /// - [`ErrorKind::Other`]: the rest (e.g. a full lock table); the
    ///   session is still usable.
    fn kind(&self) -> ErrorKind {
        match self {
            Self::ConnectionLost { .. }
            | Self::WaitAbandoned { .. }
            | Self::Unreachable { .. }
            | Self::ConnectTimeout { .. } => ErrorKind::SessionFatal,
            Self::Config { .. }
            | Self::Authentication { .. }
            | Self::UnknownDatabase { .. }
            | Self::NotPostgres { .. }
            | Self::UnsupportedVersion { .. }
            | Self::TransactionPooling { .. } => ErrorKind::Config,
            Self::LockTableFull { .. } | Self::Query { .. } => ErrorKind::Other,
        }
    }
}

/// The SQLSTATE of a server error.
pub(crate) fn sqlstate_of(err: &sqlx::Error) -> Option<&str> {
    err.as_database_error()
        .and_then(|db| db.try_downcast_ref::<PgDatabaseError>())
        .map(PgDatabaseError::code)
}

/// True when `err` means the connection can no longer be used: an I/O or
/// protocol failure, a connection-class SQLSTATE, a server-side end of the
/// session, or any `FATAL`/`PANIC` error (the server closes the connection
/// after those).
pub(crate) fn is_connection_error(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::PoolClosed => true,
        sqlx::Error::Database(db) => {
            let fatal = db
                .try_downcast_ref::<PgDatabaseError>()
                .is_some_and(|pg| matches!(pg.severity(), PgSeverity::Fatal | PgSeverity::Panic));
            fatal
                || db
                    .code()
                    .is_some_and(|code| classify(&code) == Class::ConnectionLost)
        }
        _ => false,
    }
}

/// What a SQLSTATE means to this driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Class {
    /// The session is over (connection class `08`, terminated, shut down,
    /// timed out).
    ConnectionLost,
    /// `53200`: the shared lock table is full.
    LockTableFull,
    /// `57014`: the statement was cancelled.
    QueryCanceled,
    /// `28P01`/`28000`: credentials refused.
    Authentication,
    /// `3D000`: no such database.
    UnknownDatabase,
    /// `26000`: a prepared statement vanished (transaction pooling).
    StatementVanished,
    /// Anything else.
    Other,
}

/// Classifies a SQLSTATE.
pub(crate) fn classify(code: &str) -> Class {
    use sqlstate::*;
    match code {
        ADMIN_SHUTDOWN
        | CRASH_SHUTDOWN
        | CANNOT_CONNECT_NOW
        | IDLE_SESSION_TIMEOUT
        | IDLE_IN_TRANSACTION_TIMEOUT => Class::ConnectionLost,
        c if c.starts_with(CONNECTION_EXCEPTION_CLASS) => Class::ConnectionLost,
        OUT_OF_SHARED_MEMORY => Class::LockTableFull,
        QUERY_CANCELED => Class::QueryCanceled,
        INVALID_PASSWORD | INVALID_AUTHORIZATION => Class::Authentication,
        INVALID_CATALOG_NAME => Class::UnknownDatabase,
        INVALID_SQL_STATEMENT_NAME => Class::StatementVanished,
        _ => Class::Other,
    }
}

/// Classifies a failure to open a connection.
pub(crate) fn connect_error(target: &str, user: &str, database: &str, err: sqlx::Error) -> PgError {
    let code = sqlstate_of(&err).map(str::to_string);
    match code.as_deref().map(classify) {
        Some(Class::Authentication) => PgError::Authentication {
            target: target.to_string(),
            user: user.to_string(),
            code: code.unwrap_or_default(),
            source: err.into(),
        },
        Some(Class::UnknownDatabase) => PgError::UnknownDatabase {
            target: target.to_string(),
            database: database.to_string(),
            source: err.into(),
        },
        _ => match err {
            sqlx::Error::Configuration(_) => PgError::Config {
                reason: "the client library refused the connect options".to_string(),
                source: Some(err.into()),
            },
            err => PgError::Unreachable {
                target: target.to_string(),
                source: err.into(),
            },
        },
    }
}

#[cfg(test)]
mod tests {
    use shardlock_core::{DatabaseId, Error};

    use super::*;
    use crate::PgOptions;

    fn io(kind: std::io::ErrorKind) -> sqlx::Error {
        sqlx::Error::Io(std::io::Error::new(kind, "test"))
    }

    /// A server error as sqlx shows it: `error returned from database: X`
    /// with `X` again as its source.
    #[derive(Debug)]
    struct ServerSaid(&'static str);

    impl fmt::Display for ServerSaid {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.0)
        }
    }

    impl StdError for ServerSaid {}

    impl sqlx::error::DatabaseError for ServerSaid {
        fn message(&self) -> &str {
            self.0
        }
        fn as_error(&self) -> &(dyn StdError + Send + Sync + 'static) {
            self
        }
        fn as_error_mut(&mut self) -> &mut (dyn StdError + Send + Sync + 'static) {
            self
        }
        fn into_error(self: Box<Self>) -> Box<dyn StdError + Send + Sync + 'static> {
            self
        }
        fn kind(&self) -> sqlx::error::ErrorKind {
            sqlx::error::ErrorKind::Other
        }
    }

    fn server(text: &'static str) -> sqlx::Error {
        sqlx::Error::Database(Box::new(ServerSaid(text)))
    }

    /// Every text of a chain, `a: b: c`, without the dedupe of
    /// [`Error::report`] (as `anyhow`'s `{:#}` prints it).
    fn chain(err: &dyn StdError) -> String {
        let mut out = err.to_string();
        let mut source = err.source();
        while let Some(e) = source {
            out.push_str(": ");
            out.push_str(&e.to_string());
            source = e.source();
        }
        out
    }

    #[test]
    fn sqlstate_mapping() {
        for code in [
            "08000", "08006", "08003", "08P01", "57P01", "57P02", "57P03", "57P05", "25P03",
        ] {
            assert_eq!(classify(code), Class::ConnectionLost, "{code}");
        }
        assert_eq!(classify("53200"), Class::LockTableFull);
        assert_eq!(classify("57014"), Class::QueryCanceled);
        assert_eq!(classify("28P01"), Class::Authentication);
        assert_eq!(classify("28000"), Class::Authentication);
        assert_eq!(classify("3D000"), Class::UnknownDatabase);
        assert_eq!(classify("26000"), Class::StatementVanished);
        for code in ["40001", "42601", "55P03", "53100", "XX000"] {
            assert_eq!(classify(code), Class::Other, "{code}");
        }
    }

    #[test]
    fn io_errors_are_session_lost() {
        let err = PgError::from_query("verify", io(std::io::ErrorKind::UnexpectedEof));
        assert!(err.is_connection_lost());
        assert_eq!(err.kind(), ErrorKind::SessionFatal);
        let core = Error::from_driver(&DatabaseId::new("app"), err);
        assert!(core.is_session_fatal(), "{core:?}");
        match &core {
            Error::SessionLost {
                database, source, ..
            } => {
                assert_eq!(database.as_str(), "app");
                let source = source.as_ref().expect("keeps the driver error");
                assert!(source.downcast_ref::<PgError>().is_some());
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            chain(&core),
            "session to database \"app\" lost its locks: the connection to PostgreSQL was lost \
             during verify: test"
        );
        let proto = PgError::from_query("try_acquire", sqlx::Error::Protocol("eof".into()));
        assert!(proto.is_connection_lost());
    }

    #[test]
    fn other_errors_are_driver_errors() {
        let err = PgError::from_query("release", sqlx::Error::RowNotFound);
        assert!(!err.is_connection_lost());
        assert_eq!(err.kind(), ErrorKind::Other);
        let core = Error::from_driver(&DatabaseId::new("app"), err);
        assert!(!core.is_session_fatal());
        assert!(
            matches!(
                core,
                Error::Driver {
                    driver: "postgres",
                    kind: ErrorKind::Other,
                    ..
                }
            ),
            "{core:?}"
        );
    }

    #[test]
    fn kinds() {
        let config = [
            PgError::NotPostgres {
                version: "CockroachDB".into(),
            },
            PgError::UnsupportedVersion {
                version: "PostgreSQL 11".into(),
                version_num: 110_000,
                min: 120_000,
            },
            PgError::TransactionPooling {
                first: 1,
                second: 2,
            },
            PgError::Config {
                reason: "x".into(),
                source: None,
            },
            PgError::Authentication {
                target: "db:5432".into(),
                user: "nobody".into(),
                code: "28P01".into(),
                source: server("password authentication failed").into(),
            },
            PgError::UnknownDatabase {
                target: "db:5432".into(),
                database: "nope".into(),
                source: server("database \"nope\" does not exist").into(),
            },
        ];
        for err in config {
            assert_eq!(err.kind(), ErrorKind::Config, "{err:?}");
        }
        let fatal = [
            PgError::WaitAbandoned { reason: "x" },
            PgError::ConnectTimeout {
                target: "db:5432".into(),
                after: Duration::from_secs(1),
            },
            PgError::Unreachable {
                target: "db:5432".into(),
                source: io(std::io::ErrorKind::ConnectionRefused).into(),
            },
            PgError::from_query("verify", server("terminating connection")),
        ];
        for err in &fatal[..3] {
            assert_eq!(err.kind(), ErrorKind::SessionFatal, "{err:?}");
        }
        // Without a SQLSTATE a server error is not a lost connection.
        assert_eq!(fatal[3].kind(), ErrorKind::Other);
        assert_eq!(
            PgError::from_query("try_acquire", io(std::io::ErrorKind::ConnectionReset)).kind(),
            ErrorKind::SessionFatal
        );
    }

    /// The complaint: `shardlock status` with a wrong password printed the
    /// server's text twice. Every layer now says something new.
    #[test]
    fn chains_never_repeat_text() {
        let db = DatabaseId::new("app");
        let auth = PgError::Authentication {
            target: "db:5432".into(),
            user: "nobody".into(),
            code: "28P01".into(),
            source: server("password authentication failed for user \"nobody\"").into(),
        };
        let core = Error::connect(&db, auth);
        let text = chain(&core);
        assert_eq!(
            text.matches("password authentication failed").count(),
            1,
            "{text}"
        );
        assert_eq!(text, core.report(), "nothing for report to dedupe");
        assert!(
            text.starts_with("cannot connect to database \"app\": "),
            "{text}"
        );
        assert!(
            text.ends_with(": password authentication failed for user \"nobody\""),
            "{text}"
        );

        let query = PgError::from_query("verify", server("relation \"x\" does not exist"));
        let text = chain(&Error::from_driver(&db, query));
        assert_eq!(text.matches("does not exist").count(), 1, "{text}");
        assert!(!text.contains("error returned from database"), "{text}");

        let reset = Error::from_driver(
            &db,
            PgError::from_query("release", io(std::io::ErrorKind::ConnectionReset)),
        );
        let text = chain(&reset);
        assert!(!text.contains("error communicating"), "{text}");
        assert_eq!(text.matches("test").count(), 1, "{text}");

        let bad = PgOptions::parse("postgres://app@db:notaport/x").unwrap_err();
        let text = chain(&bad);
        let parts: Vec<&str> = text.split(": ").collect();
        for (i, part) in parts.iter().enumerate() {
            for later in &parts[i + 1..] {
                assert!(later.is_empty() || !part.contains(later), "{text}");
            }
        }
    }

    #[test]
    fn lock_table_full_message_names_the_setting() {
        let err = PgError::LockTableFull {
            operation: "try_acquire",
            source: sqlx::Error::RowNotFound.into(),
        };
        let text = err.to_string();
        assert!(text.contains("max_locks_per_transaction"), "{text}");
        assert!(
            text.contains("max_connections + max_prepared_transactions"),
            "{text}"
        );
        assert!(text.contains("53200"), "{text}");
        assert!(err.is_lock_table_full());
        assert_eq!(err.kind(), ErrorKind::Other);
    }

    #[test]
    fn connect_errors_are_classified() {
        let refused = connect_error(
            "db:5432",
            "app",
            "main",
            io(std::io::ErrorKind::ConnectionRefused),
        );
        assert!(
            matches!(refused, PgError::Unreachable { .. }),
            "{refused:?}"
        );
        assert!(refused.to_string().contains("db:5432"));
        let core = Error::connect(&DatabaseId::new("main"), refused);
        assert!(
            matches!(
                core,
                Error::Connect {
                    kind: ErrorKind::SessionFatal,
                    ..
                }
            ),
            "{core:?}"
        );

        let config = connect_error(
            "db:5432",
            "app",
            "main",
            sqlx::Error::Configuration("x".into()),
        );
        assert!(matches!(config, PgError::Config { .. }), "{config:?}");
        let core = Error::connect(&DatabaseId::new("main"), config);
        assert_eq!(core.kind(), ErrorKind::Config, "{core:?}");
    }

    #[test]
    fn pooling_message_explains() {
        let text = PgError::TransactionPooling {
            first: 1,
            second: 2,
        }
        .to_string();
        assert!(text.contains("transaction"), "{text}");
        assert!(text.contains("session mode"), "{text}");
        assert!(text.contains("PgBouncer"), "{text}");
    }
}
