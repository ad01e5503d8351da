//! The driver, and opening a session: its dedicated connection (label,
//! server checks, transaction-pooling detection, session settings, liveness
//! lock), the watcher connection behind its loss signal, and the hints
//! connection behind its release hints (started in the background).

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use shardlock_core::{
    Capabilities, DatabaseId, Driver, Error, NodeId, ReleaseHints, Result, SessionSignals, Support,
};
use sqlx::postgres::{PgConnectOptions, PgConnection, PgRow};
use sqlx::{Connection, Executor, Row};
use tokio::runtime::Handle;
use tracing::{debug, warn};

use crate::error::{connect_error, PgError, DRIVER};
use crate::listen::{Listen, Listener};
use crate::options::{application_name, PgOptions};
use crate::session::PgSession;
use crate::sql;
use crate::watch::{self, Liveness, Watched};

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

/// A [`Driver`] for PostgreSQL: each session is one dedicated
/// [`PgConnection`] (never a pooled one) holding session-level advisory
/// locks, plus a watcher connection behind its loss signal.
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
/// println!("backend {}, watched by {}", session.backend_pid(), session.watcher_pid());
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
    /// `application_name = shardlock:<node>`, and its watcher connection
    /// (`shardlock:<node>:watch`), both at once. The hints connection
    /// (`shardlock:<node>:hints`, see
    /// [`RELEASE_CHANNEL`](crate::RELEASE_CHANNEL)) is opened in the
    /// background once the session is returned: its connect time is not
    /// part of this call, and its failure never fails the session.
    ///
    /// Refuses servers that are not PostgreSQL or older than
    /// [`MIN_SERVER_VERSION_NUM`], and connections whose statements land in
    /// different server processes (transaction pooling). Sets the
    /// keepalives and `client_connection_check_interval` of both
    /// connections, and turns off `statement_timeout`, `lock_timeout` and
    /// `idle_session_timeout`, which would otherwise break a blocking wait
    /// or end an idle lock holder. Then the main connection takes its
    /// liveness lock and the watcher starts waiting for it (see the crate
    /// docs, "Failure and takeover").
    ///
    /// # Errors
    ///
    /// [`Error::Connect`] with a [`PgError`] source: unreachable,
    /// authentication, unknown database, not PostgreSQL, too old,
    /// transaction pooling, timeout; its kind says whether retrying can
    /// help. [`Error::NotInRuntime`] outside a Tokio runtime (the watcher is
    /// a task).
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: a dropped connect closes its half-open connections.
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
            watcher_pid = established.watch_pid,
            server_version_num = established.version_num,
            "postgres session opened"
        );
        let hints = ReleaseHints::new();
        let signals = SessionSignals::new().with_release_hints(hints.clone());
        let listener = Listener::start(
            &handle,
            Listen {
                options: established.hints,
                setup: sql::session_setup(&session_settings(
                    &self.options,
                    established.version_num,
                )),
                connect_timeout: self.options.get_connect_timeout(),
                main_pid: established.pid,
                hints,
                database: database.clone(),
            },
        );
        let watcher = watch::start(
            &handle,
            Watched {
                conn: established.watch,
                pid: established.watch_pid,
                main_pid: established.pid,
                liveness: established.liveness,
            },
            signals.clone(),
        );
        Ok(PgSession::new(
            database.clone(),
            established.conn,
            established.pid,
            established.version_num,
            established.side,
            established.liveness,
            watcher,
            listener,
            signals,
            self.options.get_lock_check_interval(),
        ))
    }

    /// A loss signal, emulated with a watcher connection (native to no
    /// PostgreSQL version), firing within [`LOSS_DETECTION_BOUND`]; release
    /// hints native (`NOTIFY` in the unlocking statement, `LISTEN` on a
    /// hints connection: see [`RELEASE_CHANNEL`](crate::RELEASE_CHANNEL)).
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

/// A freshly opened, checked and configured session: the main connection
/// holding its liveness lock, the watcher connection, configured but not
/// waiting yet, and the options of the hints connection, not opened yet.
pub(crate) struct Established {
    pub(crate) conn: PgConnection,
    pub(crate) pid: i32,
    pub(crate) version_num: u32,
    pub(crate) side: Arc<SideConnect>,
    pub(crate) liveness: Liveness,
    pub(crate) watch: PgConnection,
    pub(crate) watch_pid: i32,
    pub(crate) hints: PgConnectOptions,
}

/// Opens and prepares the session's connections to database `name`.
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
    let watch = base
        .clone()
        .application_name(&application_name(node.as_str(), ":watch"));
    let hints = base
        .clone()
        .application_name(&application_name(node.as_str(), ":hints"));
    let side = Arc::new(SideConnect {
        options: base.application_name(&application_name(node.as_str(), ":cancel")),
        timeout: options.get_connect_timeout(),
    });
    let target = options.target();
    let timeout = options.get_connect_timeout();
    let opening = async {
        // Both connections at once: the handshakes overlap.
        let (main, watcher) = tokio::join!(
            PgConnection::connect_with(&connect),
            PgConnection::connect_with(&watch)
        );
        let mut conn = main.map_err(|e| connect_error(&target, connect.get_username(), name, e))?;
        let mut watcher =
            watcher.map_err(|e| connect_error(&target, connect.get_username(), name, e))?;
        let (pid, version_num) = prepare(&mut conn, options).await?;
        let liveness = take_liveness(&mut conn, node).await?;
        let watch_pid = configure(&mut watcher, options, version_num).await?;
        Ok::<_, PgError>(Established {
            conn,
            pid,
            version_num,
            side,
            liveness,
            watch: watcher,
            watch_pid,
            hints,
        })
    };
    tokio::time::timeout(timeout, opening)
        .await
        .map_err(|_| PgError::ConnectTimeout {
            target: target.clone(),
            after: timeout,
        })?
}

/// Takes a fresh random liveness lock on the main connection (a second draw
/// in the astronomically unlikely case that the first is taken).
async fn take_liveness(conn: &mut PgConnection, node: &NodeId) -> Result<Liveness, PgError> {
    const DRAWS: usize = 3;
    for _ in 0..DRAWS {
        let liveness = Liveness::generate(node);
        let taken: bool = sqlx::query_scalar(sql::TAKE_LIVENESS)
            .bind(liveness.hi)
            .bind(liveness.lo)
            .fetch_one(&mut *conn)
            .await
            .map_err(|e| PgError::from_query("take the session's liveness lock", e))?;
        if taken {
            return Ok(liveness);
        }
        warn!(%liveness, "a random liveness lock was held elsewhere: drawing another");
    }
    Err(PgError::Query {
        operation: "take the session's liveness lock",
        source: sqlx::Error::Protocol(format!(
            "{DRAWS} random liveness locks in a row were held by other sessions"
        ))
        .into(),
    })
}

/// Applies the session settings on the watcher connection; answers its
/// backend pid.
async fn configure(
    conn: &mut PgConnection,
    options: &PgOptions,
    version_num: u32,
) -> Result<i32, PgError> {
    let setup = sql::session_setup(&session_settings(options, version_num));
    let row: PgRow = conn
        .fetch_one(setup.as_str())
        .await
        .map_err(|e| PgError::from_query("apply the watcher's session settings", e))?;
    get(&row, 0, "pg_backend_pid()")
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
