//! The driver, and opening a session: its one dedicated connection (label,
//! server checks, transaction-pooling detection, session settings, `LISTEN`
//! for release hints), read while idle for its loss signal (see `idle.rs`).

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use shardlock_core::{
    Capabilities, DatabaseId, Driver, Error, NodeId, ReleaseHints, Result, SessionSignals, Support,
};
use sqlx::pool::PoolOptions;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgListener, PgRow};
use sqlx::{Acquire, Connection, Executor, Pool, Postgres, Row};
use tokio::runtime::Handle;
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::error::{connect_error, PgError, DRIVER};
use crate::idle::{Heard, Idle};
use crate::options::{application_name, PgOptions};
use crate::session::PgSession;
use crate::sql::{self, RELEASE_CHANNEL};

/// The oldest supported server: PostgreSQL 12 (`server_version_num`).
pub const MIN_SERVER_VERSION_NUM: u32 = 120_000;

/// The longest time from the server ending a session to its
/// [`SessionSignals::lost`] firing, on a healthy network:
/// [`Driver::capabilities`] states it and the coordinator's default takeover
/// delay equals it.
///
/// Measured on a 2-core machine with the server in a local container
/// (`shardlock-bench --only 7`, 30 rounds of `pg_terminate_backend`): see
/// the crate docs, "Failure and takeover". The bound leaves a wide margin
/// over the measured maximum for a loaded machine and a server across a
/// network link.
pub const LOSS_DETECTION_BOUND: Duration = Duration::from_millis(100);

/// Servers from this version on also get `client_connection_check_interval`
/// and `idle_session_timeout = 0`.
const V14: u32 = 140_000;

/// A [`Driver`] for PostgreSQL: each session is one dedicated connection
/// (never one shared through a pool) holding session-level advisory locks,
/// read while idle for its loss signal and release hints: one connection
/// per database a node locks in.
///
/// Cloning is cheap: the options are shared.
///
/// ```no_run
/// use shardlock_core::{DatabaseId, Driver, NodeId, Session};
/// use shardlock_postgres::{PgDriver, PgOptions};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let driver = PgDriver::new(PgOptions::parse("postgres://app:secret@db:5432/app")?);
/// let session = driver.connect(&DatabaseId::new("app"), &NodeId::generate()).await?;
/// println!("backend {}", session.backend_pid());
/// assert!(!session.signals().is_lost());
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct PgDriver {
    options: Arc<PgOptions>,
}

impl PgDriver {
    /// A driver with these options.
    pub fn new(options: PgOptions) -> Self {
        Self {
            options: Arc::new(options),
        }
    }

    /// The driver's options.
    pub fn options(&self) -> &PgOptions {
        &self.options
    }
}

impl fmt::Debug for PgDriver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgDriver")
            .field("options", &self.options)
            .finish()
    }
}

impl Driver for PgDriver {
    type Session = PgSession;

    fn name(&self) -> &'static str {
        DRIVER
    }

    /// Opens the session's dedicated connection to the database `database`
    /// maps to (see [`PgOptions::database_for`]), labelled
    /// `application_name = shardlock:<node>`: the session's only
    /// connection. It `LISTEN`s on [`RELEASE_CHANNEL`](crate::RELEASE_CHANNEL)
    /// for release hints, and between calls a task reads it, so the session
    /// sees the server end it without sending a statement (see the crate
    /// docs, "Failure and takeover").
    ///
    /// Refuses servers that are not PostgreSQL or older than
    /// [`MIN_SERVER_VERSION_NUM`], and connections whose statements land in
    /// different server processes (transaction pooling). Sets the
    /// keepalives and `client_connection_check_interval`, and turns off
    /// `statement_timeout`, `lock_timeout` and `idle_session_timeout`, which
    /// would otherwise break a blocking wait or end an idle lock holder. A
    /// refused connection (a server starting up) is retried until
    /// [`PgOptions::connect_timeout`].
    ///
    /// # Errors
    ///
    /// [`Error::Connect`] with a [`PgError`] source: unreachable,
    /// authentication, unknown database, not PostgreSQL, too old,
    /// transaction pooling, timeout; its kind says whether retrying can
    /// help. [`Error::NotInRuntime`] outside a Tokio runtime (the idle
    /// reader is a task).
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: a dropped connect closes its half-open connection.
    async fn connect(&self, database: &DatabaseId, node: &NodeId) -> Result<PgSession> {
        let Ok(handle) = Handle::try_current() else {
            return Err(Error::NotInRuntime {
                what: "PgDriver::connect",
            });
        };
        let name = self.options.database_for(database);
        let established = establish(&self.options, &name, node)
            .await
            .map_err(|e| Error::connect(database, e))?;
        debug!(
            database = %database,
            pid = established.pid,
            server_version_num = established.version_num,
            "postgres session opened"
        );
        let hints = ReleaseHints::new();
        let signals = SessionSignals::new().with_release_hints(hints.clone());
        let idle = Idle::start(
            &handle,
            Heard {
                hints,
                main_pid: established.pid,
                database: database.clone(),
            },
            signals.clone(),
        );
        Ok(PgSession::new(
            database.clone(),
            established.conn,
            established.pid,
            established.version_num,
            established.side,
            idle,
            signals,
            self.options.get_lock_check_interval(),
        ))
    }

    /// A loss signal, emulated by reading the session's connection while it
    /// is idle (native to no PostgreSQL version), firing within
    /// [`LOSS_DETECTION_BOUND`]; release hints native (`NOTIFY` in the
    /// unlocking statement, `LISTEN` on the session's connection: see
    /// [`RELEASE_CHANNEL`](crate::RELEASE_CHANNEL)).
    fn capabilities(&self) -> Capabilities {
        Capabilities::none()
            .with_loss_signal(Support::Emulated, LOSS_DETECTION_BOUND)
            .with_release_hint(Support::Native)
            .with_probe(Support::Native)
    }

    /// [`PgOptions::connect_timeout`] (10 s by default): the coordinator
    /// keeps its own connect deadline above it, so a slow server is reported
    /// as [`PgError::ConnectTimeout`] naming the server.
    fn connect_timeout(&self) -> Option<Duration> {
        Some(self.options.get_connect_timeout())
    }

    /// The keepalives' window, `idle + interval × count` (25 s by default),
    /// or `None` when the driver leaves keepalives to the server.
    fn lock_release_window(&self) -> Option<Duration> {
        self.options.lock_release_window()
    }
}

/// How to open a side connection to the same server, to cancel a waiting
/// statement of a session.
#[derive(Debug)]
pub(crate) struct SideConnect {
    pub(crate) options: PgConnectOptions,
    pub(crate) timeout: Duration,
}

impl SideConnect {
    /// Asks the server to cancel the current statement of backend `pid`;
    /// answers whether the signal was sent.
    pub(crate) async fn cancel_backend(&self, pid: i32) -> Result<bool, PgError> {
        let attempt = async {
            let mut conn = PgConnection::connect_with(&self.options)
                .await
                .map_err(|e| PgError::from_query("connect to cancel a wait", e))?;
            let sent: bool = sqlx::query_scalar(sql::CANCEL_BACKEND)
                .bind(pid)
                .fetch_one(&mut conn)
                .await
                .map_err(|e| PgError::from_query("pg_cancel_backend", e))?;
            let _ = conn.close().await;
            Ok(sent)
        };
        match tokio::time::timeout(self.timeout, attempt).await {
            Ok(result) => result,
            Err(_) => Err(PgError::ConnectTimeout {
                target: format!("{}:{}", self.options.get_host(), self.options.get_port()),
                after: self.timeout,
            }),
        }
    }
}

/// A freshly opened, checked and configured session: its connection,
/// listening on [`RELEASE_CHANNEL`](crate::RELEASE_CHANNEL), whose pool is
/// closed so it can never reconnect.
pub(crate) struct Established {
    pub(crate) conn: PgListener,
    pub(crate) pid: i32,
    pub(crate) version_num: u32,
    pub(crate) side: Arc<SideConnect>,
}

/// Opens and prepares the session's connection to database `name`.
///
/// The connection is a [`PgListener`] (so it can be read while idle, see
/// `idle.rs`), which sqlx opens through a pool: a pool of one, closed as
/// soon as the connection is open, so the listener can never replace a
/// lost connection with a new one. A refused connection (a server starting
/// up) is retried by the pool until the connect timeout; then one more
/// direct attempt says why it failed.
async fn establish(options: &PgOptions, name: &str, node: &NodeId) -> Result<Established, PgError> {
    // sqlx sends `extra_float_digits` at startup by default; this driver
    // reads no floats, and PgBouncer refuses that parameter unless its
    // `ignore_startup_parameters` lists it.
    let base = options
        .get_connect_options()
        .clone()
        .database(name)
        .extra_float_digits(None);
    let connect = base
        .clone()
        .application_name(&application_name(node.as_str(), ""));
    let side = Arc::new(SideConnect {
        options: base.application_name(&application_name(node.as_str(), ":cancel")),
        timeout: options.get_connect_timeout(),
    });
    let target = options.target();
    let timeout = options.get_connect_timeout();
    let started = Instant::now();
    let pool: Pool<Postgres> = PoolOptions::new()
        .max_connections(1)
        .min_connections(0)
        .max_lifetime(None)
        .idle_timeout(None)
        .test_before_acquire(false)
        .acquire_timeout(timeout)
        .connect_lazy_with(connect.clone());
    let opened = PgListener::connect_with(&pool).await;
    // Closed now (the returned future only waits for the connection to be
    // given back): the listener can never open another connection.
    drop(pool.close());
    let mut conn = match opened {
        Ok(conn) => conn,
        Err(sqlx::Error::PoolTimedOut) => {
            return Err(why_not_open(&connect, &target, name, timeout).await);
        }
        Err(err) => return Err(connect_error(&target, connect.get_username(), name, err)),
    };
    conn.eager_reconnect(false);
    conn.ignore_pool_close_event(true);
    let left = timeout
        .saturating_sub(started.elapsed())
        .max(MIN_SETUP_TIME);
    let preparing = async {
        let raw = conn
            .acquire()
            .await
            .map_err(|e| PgError::from_query("take the session's connection", e))?;
        let (pid, version_num) = prepare(raw, options).await?;
        conn.listen(RELEASE_CHANNEL)
            .await
            .map_err(|e| PgError::from_query("listen for release hints", e))?;
        Ok::<_, PgError>((pid, version_num))
    };
    let (pid, version_num) =
        tokio::time::timeout(left, preparing)
            .await
            .map_err(|_| PgError::ConnectTimeout {
                target: target.clone(),
                after: timeout,
            })??;
    Ok(Established {
        conn,
        pid,
        version_num,
        side,
    })
}

/// The least time the statements after the connect get, however long the
/// connect took.
const MIN_SETUP_TIME: Duration = Duration::from_secs(1);

/// After the pool gave up (connection refused, or a server not accepting
/// connections yet, until the connect timeout): one direct attempt, to
/// report why.
async fn why_not_open(
    connect: &PgConnectOptions,
    target: &str,
    name: &str,
    timeout: Duration,
) -> PgError {
    let timed_out = PgError::ConnectTimeout {
        target: target.to_string(),
        after: timeout,
    };
    match tokio::time::timeout(MIN_SETUP_TIME, PgConnection::connect_with(connect)).await {
        Ok(Err(err)) => connect_error(target, connect.get_username(), name, err),
        Ok(Ok(conn)) => {
            let _ = conn.close().await;
            timed_out
        }
        Err(_) => timed_out,
    }
}

/// Checks the server and applies the session settings, in two separate
/// statements sent with the simple protocol (no prepared statement, which a
/// transaction-pooling proxy could lose between them). Answers the backend
/// pid and `server_version_num`.
async fn prepare(conn: &mut PgConnection, options: &PgOptions) -> Result<(i32, u32), PgError> {
    let row: PgRow = conn
        .fetch_one(sql::IDENTIFY)
        .await
        .map_err(|e| PgError::from_query("identify the server", e))?;
    let version: String = get(&row, 0, "version()")?;
    let version_num: String = get(&row, 1, "server_version_num")?;
    let first: i32 = get(&row, 2, "pg_backend_pid()")?;
    let version_num = check_server(&version, &version_num)?;

    let setup = sql::session_setup(&session_settings(options, version_num));
    let row: PgRow = conn
        .fetch_one(setup.as_str())
        .await
        .map_err(|e| PgError::from_query("apply the session settings", e))?;
    let second: i32 = get(&row, 0, "pg_backend_pid()")?;
    if let Err(err) = check_same_backend(first, second) {
        warn!(first, second, "refusing a transaction-pooled connection");
        return Err(err);
    }
    Ok((first, version_num))
}

fn get<'r, T>(row: &'r PgRow, index: usize, what: &'static str) -> Result<T, PgError>
where
    T: sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres>,
{
    row.try_get(index).map_err(|e| PgError::from_query(what, e))
}

/// Accepts real PostgreSQL of a supported version; answers its
/// `server_version_num`.
pub(crate) fn check_server(version: &str, version_num: &str) -> Result<u32, PgError> {
    if !version.starts_with("PostgreSQL ") {
        return Err(PgError::NotPostgres {
            version: version.to_string(),
        });
    }
    let num: u32 = version_num
        .trim()
        .parse()
        .map_err(|_| PgError::NotPostgres {
            version: format!("{version} (server_version_num {version_num:?})"),
        })?;
    if num < MIN_SERVER_VERSION_NUM {
        return Err(PgError::UnsupportedVersion {
            version: version.to_string(),
            version_num: num,
            min: MIN_SERVER_VERSION_NUM,
        });
    }
    Ok(num)
}

/// Two statements that ran in different server processes mean transaction
/// pooling, where session-level locks cannot work.
///
/// A pooler that happens to hand back the same server process passes this
/// check; [`verify`](shardlock_core::Session::verify) compares the backend
/// pid on every call, so a later switch is reported as a lost session.
pub(crate) fn check_same_backend(first: i32, second: i32) -> Result<(), PgError> {
    if first == second {
        Ok(())
    } else {
        Err(PgError::TransactionPooling { first, second })
    }
}

/// The `set_config` calls of a new session, for a server of `version_num`.
pub(crate) fn session_settings(
    options: &PgOptions,
    version_num: u32,
) -> Vec<(&'static str, String)> {
    // A role or database default could otherwise cancel a blocking wait or
    // end an idle session that holds locks.
    let mut settings = vec![
        ("statement_timeout", "0".to_string()),
        ("lock_timeout", "0".to_string()),
    ];
    if version_num >= V14 {
        settings.push(("idle_session_timeout", "0".to_string()));
    }
    if let Some(k) = options.get_keepalives() {
        settings.push(("tcp_keepalives_idle", k.idle_secs().to_string()));
        settings.push(("tcp_keepalives_interval", k.interval_secs().to_string()));
        settings.push(("tcp_keepalives_count", k.count_clamped().to_string()));
        // Bounds the case keepalives do not cover: a reply the server sent
        // that the vanished node never acknowledged (the kernel would retry
        // for ~15 minutes).
        settings.push((
            "tcp_user_timeout",
            k.release_window().as_millis().to_string(),
        ));
    }
    if version_num >= V14 {
        if let Some(every) = options.get_client_connection_check_interval() {
            let ms = every.as_millis().max(1);
            settings.push(("client_connection_check_interval", ms.to_string()));
        }
    }
    settings
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_checks() {
        assert_eq!(
            check_server(
                "PostgreSQL 15.8 (Debian 15.8-0+deb12u1) on x86_64",
                "150008"
            )
            .unwrap(),
            150_008
        );
        assert!(matches!(
            check_server("CockroachDB CCL v23.1.11 (x86_64-pc-linux-gnu)", "130000"),
            Err(PgError::NotPostgres { .. })
        ));
        assert!(matches!(
            check_server("PostgreSQL 15.8", "fifteen"),
            Err(PgError::NotPostgres { .. })
        ));
        match check_server("PostgreSQL 11.22 on x86_64", "110022") {
            Err(e @ PgError::UnsupportedVersion { .. }) => {
                assert!(e.to_string().contains("120000"), "{e}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn transaction_pooling_decision() {
        assert!(check_same_backend(4242, 4242).is_ok());
        match check_same_backend(4242, 4243) {
            Err(PgError::TransactionPooling { first, second }) => {
                assert_eq!((first, second), (4242, 4243));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn settings_follow_options_and_version() {
        let options = PgOptions::parse("postgres://a@b/c").unwrap();
        let s15 = session_settings(&options, 150_000);
        let get =
            |s: &[(&str, String)], k: &str| s.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone());
        assert_eq!(get(&s15, "tcp_keepalives_idle").as_deref(), Some("10"));
        assert_eq!(get(&s15, "tcp_keepalives_interval").as_deref(), Some("5"));
        assert_eq!(get(&s15, "tcp_keepalives_count").as_deref(), Some("3"));
        assert_eq!(get(&s15, "tcp_user_timeout").as_deref(), Some("25000"));
        assert_eq!(
            get(&s15, "client_connection_check_interval").as_deref(),
            Some("2000")
        );
        assert_eq!(get(&s15, "statement_timeout").as_deref(), Some("0"));
        assert_eq!(get(&s15, "idle_session_timeout").as_deref(), Some("0"));
        let s13 = session_settings(&options, 130_000);
        assert_eq!(get(&s13, "client_connection_check_interval"), None);
        assert_eq!(get(&s13, "idle_session_timeout"), None);
        let bare = session_settings(
            &options
                .keepalives(None)
                .client_connection_check_interval(None),
            150_000,
        );
        assert_eq!(bare.len(), 3, "only the timeouts: {bare:?}");
    }
}
