//! The driver's own error type, its classification of server error numbers,
//! and its [`DriverError`] kind for core's one mapping into shardlock's
//! [`Error`](shardlock_core::Error).
//!
//! Messages never repeat their source: a [`MySqlError`] says what the driver
//! was doing, and its source, a [`MySqlCause`], says what the server or the
//! client library answered, once.

use std::error::Error as StdError;
use std::fmt;
use std::time::Duration;

use shardlock_core::{DriverError, ErrorKind};

/// Short name of this driver in errors and logs.
pub(crate) const DRIVER: &str = "mysql";

/// Server error numbers this driver reacts to
/// (<https://mariadb.com/kb/en/mariadb-error-code-reference/>,
/// <https://dev.mysql.com/doc/mysql-errors/8.0/en/server-error-reference.html>).
pub(crate) mod codes {
    /// `ER_DBACCESS_DENIED_ERROR`: the user may not use the database.
    pub(crate) const DBACCESS_DENIED: u16 = 1044;
    /// `ER_ACCESS_DENIED_ERROR`: wrong user or password.
    pub(crate) const ACCESS_DENIED: u16 = 1045;
    /// `ER_BAD_DB_ERROR`: the database does not exist.
    pub(crate) const BAD_DB: u16 = 1049;
    /// `ER_SERVER_SHUTDOWN`: the server is shutting down.
    pub(crate) const SERVER_SHUTDOWN: u16 = 1053;
    /// `ER_QUERY_INTERRUPTED`: `KILL QUERY` (or a statement time limit).
    pub(crate) const QUERY_INTERRUPTED: u16 = 1317;
    /// `ER_CONNECTION_KILLED` (MariaDB): `KILL` of the connection.
    pub(crate) const CONNECTION_KILLED: u16 = 1927;
    /// `ER_CLIENT_INTERACTION_TIMEOUT` (MySQL 8.0.24+): `wait_timeout`.
    pub(crate) const CLIENT_INTERACTION_TIMEOUT: u16 = 4031;
    /// `ER_ACCESS_DENIED_NO_PASSWORD_ERROR`.
    pub(crate) const ACCESS_DENIED_NO_PASSWORD: u16 = 1698;
}

/// What the server or the client library answered, behind a
/// [`MySqlError`]: the client library's [`sqlx::Error`], shown in the
/// server's own words (sqlx's own text repeats its cause).
///
/// ```
/// use shardlock_mysql::MySqlCause;
///
/// let io = std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "connection closed");
/// let cause = MySqlCause::from(shardlock_mysql::sqlx::Error::Io(io));
/// assert_eq!(cause.to_string(), "connection closed");
/// assert!(std::error::Error::source(&cause).is_none());
/// ```
#[derive(Debug)]
pub struct MySqlCause(sqlx::Error);

impl MySqlCause {
    /// The client library's error.
    pub fn sqlx(&self) -> &sqlx::Error {
        &self.0
    }

    /// The server's error number (e.g. 1045), for an error the server sent.
    pub fn number(&self) -> Option<u16> {
        number_of(&self.0)
    }
}

impl From<sqlx::Error> for MySqlCause {
    fn from(err: sqlx::Error) -> Self {
        Self(err)
    }
}

impl fmt::Display for MySqlCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            sqlx::Error::Database(db) => match number_of(&self.0) {
                Some(n) => write!(f, "{} (error {n})", db.message()),
                None => f.write_str(db.message()),
            },
            sqlx::Error::Io(io) => fmt::Display::fmt(io, f),
            other => fmt::Display::fmt(other, f),
        }
    }
}

impl StdError for MySqlCause {
    /// None: the text above already says everything the chain below would.
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        None
    }
}

/// What went wrong in the MySQL/MariaDB driver.
///
/// Mapped into shardlock's [`Error`](shardlock_core::Error) by core's one
/// mapping through [`DriverError::kind`]: a lost connection is
/// session-fatal, a failure to open a session is
/// [`Error::Connect`](shardlock_core::Error::Connect), anything else
/// [`Error::Driver`](shardlock_core::Error::Driver); this error stays the
/// source.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MySqlError {
    /// The connection URL or an option is invalid.
    #[error("invalid MySQL connection options: {reason}")]
    Config {
        /// What is wrong.
        reason: String,
        /// The client library's parse error, when there is one.
        #[source]
        source: Option<MySqlCause>,
    },

    /// The server could not be reached: refused, unknown host, TLS failure.
    #[error("cannot reach the MySQL server at {target}")]
    Unreachable {
        /// `host:port` (or socket path), without credentials.
        target: String,
        /// The client library's error.
        #[source]
        source: MySqlCause,
    },

    /// Opening the connection took longer than the connect timeout.
    #[error("connecting to the MySQL server at {target} did not finish within {after:?}")]
    ConnectTimeout {
        /// `host:port` (or socket path), without credentials.
        target: String,
        /// The connect timeout.
        after: Duration,
    },

    /// The server refused the credentials (error 1045/1698) or the user may
    /// not use the database (1044).
    #[error(
        "the MySQL server at {target} refused user {user:?} (error {number}; check the user \
         name, the password and the user's host and database grants)"
    )]
    Authentication {
        /// `host:port`.
        target: String,
        /// The user name tried.
        user: String,
        /// The server's error number.
        number: u16,
        /// The server's error.
        #[source]
        source: MySqlCause,
    },

    /// The database does not exist on the server (error 1049).
    #[error(
        "database {database:?} does not exist on the MySQL server at {target} (error 1049; \
         create it, or map shardlock's database ids to existing databases with \
         MySqlOptions::database_mapping)"
    )]
    UnknownDatabase {
        /// `host:port`.
        target: String,
        /// The database name tried.
        database: String,
        /// The server's error.
        #[source]
        source: MySqlCause,
    },

    /// The server speaks the MySQL protocol but is not MySQL or MariaDB
    /// (e.g. TiDB, whose `GET_LOCK` differs), or does not speak it at all.
    #[error(
        "the server at {target} is not MySQL or MariaDB ({version}): shardlock needs their \
         GET_LOCK named locks"
    )]
    NotMySql {
        /// `host:port`.
        target: String,
        /// What the server said it is.
        version: String,
    },

    /// The server is too old for several named locks per session
    /// (MySQL < 5.7, MariaDB < 10.0.2).
    #[error(
        "the server at {target} runs {version}, but shardlock needs {minimum} or newer \
         (several GET_LOCK locks per session)"
    )]
    TooOld {
        /// `host:port`.
        target: String,
        /// The server's `VERSION()`.
        version: String,
        /// The oldest version of that server that works.
        minimum: &'static str,
    },

    /// A blocking `GET_LOCK` wait was ended by the server, not by the
    /// caller's cancel: someone ran `KILL QUERY` on the session's
    /// connection, or the server saw a deadlock.
    #[error("the server ended the wait for lock {name:?}")]
    LockWaitKilled {
        /// The lock's name on the server.
        name: String,
        /// The server's error, when it sent one (`GET_LOCK` may also just
        /// answer `NULL`).
        #[source]
        source: Option<MySqlCause>,
    },

    /// The connection to the server was lost (killed, timed out, closed).
    #[error("the connection to the MySQL server was lost during {operation}")]
    ConnectionLost {
        /// What the driver was doing.
        operation: &'static str,
        /// The client library's error.
        #[source]
        source: MySqlCause,
    },

    /// A statement failed.
    #[error("MySQL {operation} failed")]
    Query {
        /// What the driver was doing.
        operation: &'static str,
        /// The client library's error.
        #[source]
        source: MySqlCause,
    },

    /// An abandoned blocking wait could not be ended cleanly; its
    /// connection was closed so the key cannot stay held.
    #[error("{reason}")]
    WaitAbandoned {
        /// What happened.
        reason: &'static str,
    },
}

impl MySqlError {
    /// Maps a failed statement: a lost connection is
    /// [`ConnectionLost`](Self::ConnectionLost), anything else
    /// [`Query`](Self::Query).
    pub(crate) fn from_query(operation: &'static str, err: sqlx::Error) -> Self {
        if is_connection_error(&err) {
            Self::ConnectionLost {
                operation,
                source: err.into(),
            }
        } else {
            Self::Query {
                operation,
                source: err.into(),
            }
        }
    }

    /// Whether the connection is gone.
    pub fn is_connection_lost(&self) -> bool {
        matches!(
            self,
            Self::ConnectionLost { .. } | Self::WaitAbandoned { .. }
        )
    }

    /// Whether a statement was interrupted by `KILL QUERY`.
    pub(crate) fn is_query_interrupted(&self) -> bool {
        match self {
            Self::Query { source, .. } => source.number() == Some(codes::QUERY_INTERRUPTED),
            _ => false,
        }
    }
}

impl DriverError for MySqlError {
    fn driver(&self) -> &'static str {
        DRIVER
    }

    fn kind(&self) -> ErrorKind {
        match self {
            Self::ConnectionLost { .. } | Self::WaitAbandoned { .. } => ErrorKind::SessionFatal,
            // Unreachable or slow: it may come back; the session never was.
            Self::Unreachable { .. } | Self::ConnectTimeout { .. } => ErrorKind::SessionFatal,
            Self::Config { .. }
            | Self::Authentication { .. }
            | Self::UnknownDatabase { .. }
            | Self::NotMySql { .. }
            | Self::TooOld { .. } => ErrorKind::Config,
            Self::LockWaitKilled { .. } | Self::Query { .. } => ErrorKind::Other,
        }
    }
}

/// The server's error number of `err`, if the server sent it.
pub(crate) fn number_of(err: &sqlx::Error) -> Option<u16> {
    match err {
        sqlx::Error::Database(db) => db
            .try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>()
            .map(sqlx::mysql::MySqlDatabaseError::number),
        _ => None,
    }
}

/// Whether `err` means the connection is gone.
pub(crate) fn is_connection_error(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Io(_) | sqlx::Error::Tls(_) | sqlx::Error::PoolClosed => true,
        sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(_) => matches!(
            number_of(err),
            Some(
                codes::CONNECTION_KILLED
                    | codes::SERVER_SHUTDOWN
                    | codes::CLIENT_INTERACTION_TIMEOUT
            )
        ),
        _ => false,
    }
}

/// Maps a failure to open a connection to `target` as `user` into `database`.
pub(crate) fn connect_error(
    target: &str,
    user: &str,
    database: &str,
    err: sqlx::Error,
) -> MySqlError {
    match number_of(&err) {
        Some(
            number @ (codes::ACCESS_DENIED
            | codes::DBACCESS_DENIED
            | codes::ACCESS_DENIED_NO_PASSWORD),
        ) => MySqlError::Authentication {
            target: target.to_string(),
            user: user.to_string(),
            number,
            source: err.into(),
        },
        Some(codes::BAD_DB) => MySqlError::UnknownDatabase {
            target: target.to_string(),
            database: database.to_string(),
            source: err.into(),
        },
        _ => match err {
            sqlx::Error::Configuration(_) => MySqlError::Config {
                reason: "the client library refused the connect options".to_string(),
                source: Some(err.into()),
            },
            sqlx::Error::Protocol(text) => MySqlError::NotMySql {
                target: target.to_string(),
                version: format!("its handshake is not MySQL's: {text}"),
            },
            err => MySqlError::Unreachable {
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

    #[test]
    fn connect_errors_are_classified() {
        let refused = connect_error(
            "db:3306",
            "app",
            "main",
            sqlx::Error::Io(std::io::Error::new(
                std::io::ErrorKind::ConnectionRefused,
                "refused",
            )),
        );
        assert!(
            matches!(refused, MySqlError::Unreachable { .. }),
            "{refused:?}"
        );
        assert!(refused.to_string().contains("db:3306"));
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
    }

    #[test]
    fn lost_connections_are_session_fatal() {
        let err = MySqlError::from_query(
            "verify",
            sqlx::Error::Io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "eof",
            )),
        );
        assert!(err.is_connection_lost());
        assert_eq!(err.kind(), ErrorKind::SessionFatal);
        let too_old = MySqlError::TooOld {
            target: "db:3306".into(),
            version: "5.6.51".into(),
            minimum: "MySQL 5.7",
        };
        assert_eq!(too_old.kind(), ErrorKind::Config);
    }
}
