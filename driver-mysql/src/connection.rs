//! The driver, and opening a session: its dedicated connection (server
//! checks, session settings, liveness lock), the watcher connection behind
//! its loss signal, and the side connection that cancels a blocking wait.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use shardlock_core::{
    Capabilities, DatabaseId, Driver, Error, NodeId, Result, SessionSignals, Support,
};
use sqlx::mysql::{MySqlConnectOptions, MySqlConnection};
use sqlx::{ConnectOptions, Connection, Executor, Row};
use tokio::runtime::Handle;
use tracing::debug;

use crate::error::{connect_error, MySqlError, DRIVER};
use crate::options::{whole_seconds, MySqlOptions};
use crate::session::MySqlSession;
use crate::sql;
use crate::watch::{self, liveness_name, Watched};

/// The oldest MySQL that keeps several named locks per session: 5.7.
pub const MIN_MYSQL_VERSION: (u32, u32, u32) = (5, 7, 0);

/// The oldest MariaDB that keeps several named locks per session: 10.0.2.
pub const MIN_MARIADB_VERSION: (u32, u32, u32) = (10, 0, 2);

/// The longest time from the server ending a session to its
/// [`SessionSignals::lost`] firing, on a healthy network:
/// [`Driver::capabilities`] states it and the coordinator's default
/// takeover delay equals it. The watcher's wait is woken by the server the
/// moment the session's connection ends (measured by the contract suite's
/// clause 8: a few milliseconds against a local MariaDB 10.11); the bound
/// leaves a margin for loaded machines and remote servers.
pub const LOSS_DETECTION_BOUND: Duration = Duration::from_millis(100);

/// A [`Driver`] for MySQL and MariaDB: each session is one dedicated
/// [`MySqlConnection`] (never a pooled one) holding `GET_LOCK` named locks,
/// plus a watcher connection behind its loss signal.
///
/// Cloning is cheap: the options are shared.
///
/// ```no_run
/// use shardlock_core::{DatabaseId, Driver, NodeId, Session};
/// use shardlock_mysql::{MySqlDriver, MySqlOptions};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let driver = MySqlDriver::new(MySqlOptions::parse("mysql://app:secret@db:3306/app")?);
/// let session = driver.connect(&DatabaseId::new("app"), &NodeId::generate()).await?;
/// println!("connection {}, watched by {}", session.connection_id(), session.watcher_id());
/// assert!(!session.signals().is_lost());
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct MySqlDriver {
    options: Arc<MySqlOptions>,
}

impl MySqlDriver {
    /// A driver with these options.
    pub fn new(options: MySqlOptions) -> Self {
        Self {
            options: Arc::new(options),
        }
    }

    /// The driver's options.
    pub fn options(&self) -> &MySqlOptions {
        &self.options
    }
}

impl fmt::Debug for MySqlDriver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MySqlDriver")
            .field("options", &self.options)
            .finish()
    }
}

impl Driver for MySqlDriver {
    type Session = MySqlSession;

    fn name(&self) -> &'static str {
        DRIVER
    }

    /// Opens the session's dedicated connection to the database `database`
    /// maps to (see [`MySqlOptions::database_for`]) and its watcher
    /// connection, both at once; checks the server (MySQL ≥ 5.7, MariaDB ≥
    /// 10.0.2); sets `wait_timeout`, `net_read_timeout`, `net_write_timeout`
    /// and turns off statement time limits (`max_statement_time` /
    /// `max_execution_time`) on both; then the main connection takes its
    /// liveness lock and the watcher starts waiting for it (see the crate
    /// docs, "Failure and takeover").
    ///
    /// # Errors
    ///
    /// [`Error::Connect`] with a [`MySqlError`] source: unreachable,
    /// authentication, unknown database, not MySQL, too old, timeout.
    /// [`Error::NotInRuntime`] outside a Tokio runtime (the watcher is a
    /// task).
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: a dropped connect closes its half-open connections.
    async fn connect(&self, database: &DatabaseId, node: &NodeId) -> Result<MySqlSession> {
        let Ok(handle) = Handle::try_current() else {
            return Err(Error::NotInRuntime {
                what: "MySqlDriver::connect",
            });
        };
        let name = self.options.database_for(database);
        let established = establish(&self.options, &name, node)
            .await
            .map_err(|e| Error::connect(database, e))?;
        debug!(
            database = %database,
            connection_id = established.main.id,
            watcher_id = established.watch.id,
            version = %established.main.version,
            "session opened"
        );
        let signals = SessionSignals::new();
        let watcher = watch::start(
            &handle,
            Watched {
                conn: established.watch.conn,
                connection_id: established.watch.id,
                main_id: established.main.id,
                liveness: established.liveness.clone(),
                node: node.to_string(),
            },
            signals.clone(),
        );
        let side = Arc::new(SideConnect {
            options: connect_options(&self.options, &name),
            timeout: self.options.get_connect_timeout(),
        });
        Ok(MySqlSession::new(
            database.clone(),
            established.main.conn,
            established.main.id,
            established.main.version,
            established.liveness,
            side,
            watcher,
            signals,
        ))
    }

    /// The session's `wait_timeout` ([`MySqlOptions::lock_release_window`]).
    fn lock_release_window(&self) -> Option<Duration> {
        Some(self.options.lock_release_window())
    }

    fn connect_timeout(&self) -> Option<Duration> {
        Some(self.options.get_connect_timeout())
    }

    /// Loss signal emulated (the watcher connection) within
    /// [`LOSS_DETECTION_BOUND`]; probe native (`IS_USED_LOCK` takes
    /// nothing); no release hints (MySQL has no `NOTIFY`: other nodes find
    /// released keys at their next poll).
    fn capabilities(&self) -> Capabilities {
        Capabilities::none()
            .with_loss_signal(Support::Emulated, LOSS_DETECTION_BOUND)
            .with_probe(Support::Native)
    }
}

/// sqlx's options for a connection to `database` (empty: the URL's),
/// without sqlx's statement logging: blocking waits (the watcher's for the
/// session's whole life) would be logged as slow statements.
fn connect_options(options: &MySqlOptions, database: &str) -> MySqlConnectOptions {
    let connect = options
        .get_connect_options()
        .clone()
        .disable_statement_logging();
    if database.is_empty() {
        connect
    } else {
        connect.database(database)
    }
}

/// One opened, checked and configured connection.
pub(crate) struct Opened {
    pub(crate) conn: MySqlConnection,
    pub(crate) id: u64,
    pub(crate) version: String,
}

struct Established {
    main: Opened,
    watch: Opened,
    liveness: String,
}

async fn establish(
    options: &MySqlOptions,
    database: &str,
    node: &NodeId,
) -> Result<Established, MySqlError> {
    let (main, watch) = tokio::try_join!(
        open(options, database, node, "main"),
        open(options, database, node, "watch")
    )?;
    let mut main = main;
    let liveness = liveness_name();
    let taken = main
        .conn
        .fetch_one(sqlx::raw_sql(&sql::try_many(std::slice::from_ref(
            &liveness,
        ))))
        .await
        .and_then(|row| row.try_get::<Option<i64>, _>(0))
        .map_err(|e| MySqlError::from_query("take the liveness lock", e))?;
    if taken != Some(1) {
        return Err(MySqlError::Query {
            operation: "take the liveness lock",
            source: sqlx::Error::Protocol(format!(
                "GET_LOCK of the fresh liveness lock {liveness} answered {taken:?}"
            ))
            .into(),
        });
    }
    Ok(Established {
        main,
        watch,
        liveness,
    })
}

/// Opens one connection within the connect timeout, checks the server and
/// applies the session settings.
pub(crate) async fn open(
    options: &MySqlOptions,
    database: &str,
    node: &NodeId,
    role: &str,
) -> Result<Opened, MySqlError> {
    let target = options.target();
    let connect = connect_options(options, database);
    let user = connect.get_username().to_string();
    let db = connect.get_database().unwrap_or_default().to_string();
    let timeout = options.get_connect_timeout();
    let opening = async {
        let mut conn = MySqlConnection::connect_with(&connect)
            .await
            .map_err(|e| connect_error(&target, &user, &db, e))?;
        let row = conn
            .fetch_one(sqlx::raw_sql(sql::IDENTIFY))
            .await
            .map_err(|e| MySqlError::from_query("identify the server", e))?;
        let version: String = row
            .try_get(0)
            .map_err(|e| MySqlError::from_query("identify the server", e))?;
        let id: u64 = row
            .try_get(1)
            .map_err(|e| MySqlError::from_query("identify the server", e))?;
        let flavor = check_version(&target, &version)?;
        let settings = session_settings(options, flavor, node, role);
        conn.execute(sqlx::raw_sql(&settings))
            .await
            .map_err(|e| MySqlError::from_query("apply the session settings", e))?;
        Ok::<_, MySqlError>(Opened { conn, id, version })
    };
    match tokio::time::timeout(timeout, opening).await {
        Ok(opened) => opened,
        Err(_) => Err(MySqlError::ConnectTimeout {
            target,
            after: timeout,
        }),
    }
}

/// Which server answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Flavor {
    MySql,
    MariaDb,
}

/// Checks `VERSION()`: MySQL ≥ 5.7 or MariaDB ≥ 10.0.2, nothing else.
pub(crate) fn check_version(target: &str, version: &str) -> Result<Flavor, MySqlError> {
    let lower = version.to_ascii_lowercase();
    if ["tidb", "vitess", "singlestore", "memsql"]
        .iter()
        .any(|other| lower.contains(other))
    {
        return Err(MySqlError::NotMySql {
            target: target.to_string(),
            version: version.to_string(),
        });
    }
    let numbers = parse_version(version).ok_or_else(|| MySqlError::NotMySql {
        target: target.to_string(),
        version: version.to_string(),
    })?;
    let (flavor, minimum, label) = if lower.contains("mariadb") {
        (Flavor::MariaDb, MIN_MARIADB_VERSION, "MariaDB 10.0.2")
    } else {
        (Flavor::MySql, MIN_MYSQL_VERSION, "MySQL 5.7")
    };
    if numbers < minimum {
        return Err(MySqlError::TooOld {
            target: target.to_string(),
            version: version.to_string(),
            minimum: label,
        });
    }
    Ok(flavor)
}

/// `major.minor.patch` at the start of `version` (MariaDB's old
/// `5.5.5-10.x` replication prefix skipped).
fn parse_version(version: &str) -> Option<(u32, u32, u32)> {
    let version = version.strip_prefix("5.5.5-").unwrap_or(version);
    let head: String = version
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    let mut parts = head.split('.').map(|p| p.parse::<u32>().ok());
    let major = parts.next()??;
    let minor = parts.next().flatten().unwrap_or(0);
    let patch = parts.next().flatten().unwrap_or(0);
    Some((major, minor, patch))
}

/// The session settings of one connection: timeouts, statement time
/// limits off, and the node's name in a user variable
/// (`@shardlock_node`, shown by MySQL 8's
/// `performance_schema.user_variables_by_thread`).
fn session_settings(options: &MySqlOptions, flavor: Flavor, node: &NodeId, role: &str) -> String {
    let idle = whole_seconds(options.get_idle_timeout());
    let net = whole_seconds(options.get_net_timeout());
    let limit = match flavor {
        Flavor::MariaDb => "max_statement_time = 0",
        Flavor::MySql => "max_execution_time = 0",
    };
    let label = if role == "main" {
        format!("shardlock:{node}")
    } else {
        format!("shardlock:{node}:{role}")
    };
    format!(
        "SET SESSION wait_timeout = {idle}, SESSION net_read_timeout = {net}, \
         SESSION net_write_timeout = {net}, SESSION {limit}, @shardlock_node = {}",
        sql::literal(&label)
    )
}

/// Opens side connections to `KILL QUERY` a waiting statement.
#[derive(Debug)]
pub(crate) struct SideConnect {
    options: MySqlConnectOptions,
    timeout: Duration,
}

impl SideConnect {
    /// `KILL QUERY <id>` from a fresh connection.
    pub(crate) async fn kill_query(&self, connection_id: u64) -> Result<(), MySqlError> {
        let killing = async {
            let mut conn = MySqlConnection::connect_with(&self.options)
                .await
                .map_err(|e| MySqlError::from_query("connect to cancel a wait", e))?;
            conn.execute(sqlx::raw_sql(&sql::kill_query(connection_id)))
                .await
                .map_err(|e| MySqlError::from_query("KILL QUERY", e))?;
            let _ = conn.close().await;
            Ok(())
        };
        match tokio::time::timeout(self.timeout, killing).await {
            Ok(done) => done,
            Err(_) => Err(MySqlError::ConnectTimeout {
                target: format!("{}:{}", self.options.get_host(), self.options.get_port()),
                after: self.timeout,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions() {
        let ok = |v| check_version("db:3306", v);
        assert_eq!(ok("10.11.6-MariaDB-0+deb12u1").unwrap(), Flavor::MariaDb);
        assert_eq!(ok("5.5.5-10.4.2-MariaDB").unwrap(), Flavor::MariaDb);
        assert_eq!(ok("8.0.36").unwrap(), Flavor::MySql);
        assert_eq!(ok("5.7.44-log").unwrap(), Flavor::MySql);
        assert!(matches!(ok("5.6.51"), Err(MySqlError::TooOld { .. })));
        assert!(matches!(
            ok("10.0.1-MariaDB"),
            Err(MySqlError::TooOld { .. })
        ));
        assert!(matches!(
            ok("8.0.11-TiDB-v7.5.0"),
            Err(MySqlError::NotMySql { .. })
        ));
        assert!(matches!(ok("banana"), Err(MySqlError::NotMySql { .. })));
    }
}
