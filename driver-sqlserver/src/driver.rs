//! The driver: options shared behind an `Arc`, one connection per session.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use shardlock_core::{Capabilities, DatabaseId, Driver, Error, NodeId, Result, Support};
use tracing::debug;

use crate::connection::{
    application_name, open_client, open_session_client, probe, Connection, TdsClient,
};
use crate::error::{MssqlError, DRIVER};
use crate::options::MssqlOptions;
use crate::session::MssqlSession;

/// The SQL Server driver: opens [`MssqlSession`]s, each on its own dedicated
/// TDS connection. Cloning is cheap (the options sit behind an `Arc`).
///
/// ```no_run
/// use shardlock_core::{DatabaseId, Driver, NodeId};
/// use shardlock_sqlserver::MssqlDriver;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let driver = MssqlDriver::new(
///     "Server=tcp:db.internal,1433;User Id=app;Password=secret;TrustServerCertificate=true"
///         .parse()?,
/// );
/// let session = driver
///     .connect(&DatabaseId::new("orders"), &NodeId::generate())
///     .await?;
/// println!("connected as spid {}", session.spid());
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct MssqlDriver {
    options: Arc<MssqlOptions>,
}

impl MssqlDriver {
    /// A driver for the server and settings of `options`.
    pub fn new(options: MssqlOptions) -> Self {
        Self {
            options: Arc::new(options),
        }
    }

    /// The options.
    pub fn options(&self) -> &MssqlOptions {
        &self.options
    }

    /// Opens a session on `database` labelled `shardlock:<node>`, with the
    /// driver's own error type (what [`Driver::connect`] wraps in
    /// [`Error::Connect`](shardlock_core::Error::Connect)).
    ///
    /// Checks at connect that the peer is a SQL Server with application
    /// locks (`@@VERSION`, `SERVERPROPERTY('EngineEdition')`), reads the
    /// session id (`@@SPID`) and the database's compatibility level (which
    /// decides how batches pass lists of names), and sets
    /// `IMPLICIT_TRANSACTIONS OFF`, `NOCOUNT ON`, `XACT_ABORT OFF` for the
    /// session.
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: a dropped connect leaves only a socket that closes.
    ///
    /// # Errors
    ///
    /// [`MssqlError::Unreachable`], [`MssqlError::ConnectTimeout`],
    /// [`MssqlError::Handshake`], [`MssqlError::LoginFailed`],
    /// [`MssqlError::DatabaseUnavailable`], [`MssqlError::NotSqlServer`].
    pub async fn open_session(
        &self,
        database: &DatabaseId,
        node: &NodeId,
    ) -> Result<MssqlSession, MssqlError> {
        let target = self.options.database_for(database);
        let app = application_name(node.as_str());
        let timeout = self.options.get_connect_timeout();
        let opened = tokio::time::timeout(timeout, async {
            let (mut client, signals) =
                open_session_client(&self.options, target.as_deref(), &app).await?;
            let info = probe(&mut client).await?;
            Ok::<_, MssqlError>((client, signals, info))
        })
        .await;
        let (client, signals, info) = match opened {
            Ok(result) => result?,
            Err(_) => {
                return Err(MssqlError::ConnectTimeout {
                    addr: self.options.addr().to_string(),
                    after: timeout,
                })
            }
        };
        debug!(
            database = %database,
            server_database = %info.database,
            spid = info.spid,
            version = %info.product_version,
            key_list = ?info.key_list,
            "SQL Server session opened"
        );
        let slice_ms =
            i32::try_from(self.options.get_acquire_slice().as_millis()).unwrap_or(i32::MAX);
        Ok(MssqlSession::new(
            Connection::spawn(client, info, signals),
            database.clone(),
            slice_ms,
        ))
    }

    /// Opens a plain tiberius connection to `database` on the driver's server
    /// (mapped like sessions), for administrative queries next to the lock
    /// sessions (e.g. `KILL`, reading `sys.dm_tran_locks`). It is not a lock
    /// session and is not tracked by the driver.
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: a dropped connect leaves only a socket that closes.
    ///
    /// # Errors
    ///
    /// As [`open_session`](Self::open_session), without the server checks.
    pub async fn connect_client(
        &self,
        database: &DatabaseId,
        application_name: &str,
    ) -> Result<TdsClient, MssqlError> {
        let target = self.options.database_for(database);
        let timeout = self.options.get_connect_timeout();
        tokio::time::timeout(
            timeout,
            open_client(
                &self.options,
                target.as_deref(),
                application_name,
                std::convert::identity,
            ),
        )
        .await
        .map_err(|_| MssqlError::ConnectTimeout {
            addr: self.options.addr().to_string(),
            after: timeout,
        })?
    }
}

impl Driver for MssqlDriver {
    type Session = MssqlSession;

    fn name(&self) -> &'static str {
        DRIVER
    }

    async fn connect(&self, database: &DatabaseId, node: &NodeId) -> Result<MssqlSession> {
        self.open_session(database, node)
            .await
            .map_err(|e| Error::connect(database, e))
    }

    /// An emulated loss signal: every session's socket is read continuously
    /// beneath tiberius, and the signal fires when the server's FIN or RST
    /// arrives, within [`MssqlOptions::loss_signal_bound`] (default 50 ms, by
    /// construction; see the crate docs, "Loss signal"). No release hint.
    fn capabilities(&self) -> Capabilities {
        Capabilities::none()
            .with_loss_signal(Support::Emulated, self.options.get_loss_signal_bound())
    }

    /// [`MssqlOptions::connect_timeout`] (8 s by default): the coordinator
    /// keeps its own connect deadline above it, so the typed
    /// `ConnectTimeout` naming the server is what a slow server reports.
    fn connect_timeout(&self) -> Option<Duration> {
        Some(self.options.get_connect_timeout())
    }

    /// The server's TCP keepalive time, by default SQL Server's 30 s
    /// ([`MssqlOptions::server_keepalive`]). See the crate docs, "When a node
    /// vanishes".
    fn lock_release_window(&self) -> Option<Duration> {
        self.options.lock_release_window()
    }
}

impl fmt::Debug for MssqlDriver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MssqlDriver")
            .field("options", &self.options)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use shardlock_core::{Driver, Support};

    use super::*;
    use crate::options::DEFAULT_LOSS_SIGNAL_BOUND;

    fn options() -> MssqlOptions {
        MssqlOptions::parse("Server=tcp:127.0.0.1,1433;User Id=sa;Password=x").expect("valid")
    }

    #[test]
    fn the_loss_signal_is_emulated_with_the_stated_bound() {
        let caps = MssqlDriver::new(options()).capabilities();
        assert_eq!(caps.loss_signal, Support::Emulated);
        assert_eq!(caps.loss_detection_bound, Some(DEFAULT_LOSS_SIGNAL_BOUND));
        assert_eq!(caps.release_hint, Support::Unsupported);
        let far = options().loss_signal_bound(Duration::from_millis(250));
        assert_eq!(
            MssqlDriver::new(far).capabilities().loss_detection_bound,
            Some(Duration::from_millis(250))
        );
    }
}
