//! Connection options: where the server is, how shardlock's database ids map
//! to databases, and the session settings that bound how long a vanished
//! node's locks stay held.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use shardlock_core::{DatabaseId, DatabaseMapping};
use sqlx::mysql::MySqlConnectOptions;

use crate::error::MySqlError;

/// Default [`MySqlOptions::connect_timeout`].
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Default [`MySqlOptions::idle_timeout`] (the session's `wait_timeout`).
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Default [`MySqlOptions::net_timeout`] (`net_read_timeout` and
/// `net_write_timeout`).
pub const DEFAULT_NET_TIMEOUT: Duration = Duration::from_secs(30);

/// How to reach a MySQL or MariaDB server and what to set on each session.
///
/// Built from a URL (`mysql://user:password@host:3306/db` or
/// `mariadb://...`, with sqlx's query parameters such as `ssl-mode`) or with
/// the builder methods. See the crate docs, "Options", for the table of
/// settings and defaults.
#[derive(Clone)]
pub struct MySqlOptions {
    connect: MySqlConnectOptions,
    mapping: DatabaseMapping,
    connect_timeout: Duration,
    idle_timeout: Duration,
    net_timeout: Duration,
}

impl MySqlOptions {
    /// Options from sqlx's connect options; the database mapping is
    /// [`DatabaseMapping::ConnectionString`] when they name a database,
    /// [`DatabaseMapping::SameServer`] otherwise.
    pub fn from_connect_options(connect: MySqlConnectOptions) -> Self {
        let mapping = if connect.get_database().is_some() {
            DatabaseMapping::ConnectionString
        } else {
            DatabaseMapping::SameServer
        };
        Self {
            connect,
            mapping,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            net_timeout: DEFAULT_NET_TIMEOUT,
        }
    }

    /// Parses a `mysql://` or `mariadb://` URL.
    ///
    /// # Errors
    ///
    /// [`MySqlError::Config`] for another scheme or a URL sqlx refuses.
    pub fn parse(url: &str) -> Result<Self, MySqlError> {
        let rest = if let Some(rest) = url.strip_prefix("mysql://") {
            rest
        } else if let Some(rest) = url.strip_prefix("mariadb://") {
            rest
        } else {
            return Err(MySqlError::Config {
                reason: "the URL must start with mysql:// or mariadb://".to_string(),
                source: None,
            });
        };
        let connect = MySqlConnectOptions::from_str(&format!("mysql://{rest}")).map_err(|e| {
            MySqlError::Config {
                reason: "the URL cannot be parsed".to_string(),
                source: Some(e.into()),
            }
        })?;
        Ok(Self::from_connect_options(connect))
    }

    /// Sets the host.
    pub fn host(mut self, host: &str) -> Self {
        self.connect = self.connect.host(host);
        self
    }

    /// Sets the port.
    pub fn port(mut self, port: u16) -> Self {
        self.connect = self.connect.port(port);
        self
    }

    /// Sets the user.
    pub fn username(mut self, username: &str) -> Self {
        self.connect = self.connect.username(username);
        self
    }

    /// Sets the password.
    pub fn password(mut self, password: &str) -> Self {
        self.connect = self.connect.password(password);
        self
    }

    /// Changes sqlx's connect options (TLS, socket, charset...).
    pub fn map_connect_options(
        mut self,
        f: impl FnOnce(MySqlConnectOptions) -> MySqlConnectOptions,
    ) -> Self {
        self.connect = f(self.connect);
        self
    }

    /// Which database a shardlock [`DatabaseId`] locks in (see
    /// [`DatabaseMapping`]); named locks are server-wide in MySQL, but the
    /// session still connects to that database (checkpoints live there).
    pub fn database_mapping(mut self, mapping: DatabaseMapping) -> Self {
        self.mapping = mapping;
        self
    }

    /// Limit for opening a session (main and watcher connections) and a
    /// side connection that cancels a wait. Default 10 s.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// The session's `wait_timeout`: how long the server keeps an idle
    /// session (and its locks) whose client sends nothing, e.g. a node cut
    /// off by the network. Default 60 s; whole seconds, at least 1. See
    /// [`lock_release_window`](Self::lock_release_window).
    pub fn idle_timeout(mut self, timeout: Duration) -> Self {
        self.idle_timeout = timeout;
        self
    }

    /// The session's `net_read_timeout` and `net_write_timeout`: how long
    /// the server waits for a packet from, or to send one to, a client in
    /// the middle of a command. Default 30 s.
    pub fn net_timeout(mut self, timeout: Duration) -> Self {
        self.net_timeout = timeout;
        self
    }

    /// sqlx's connect options.
    pub fn get_connect_options(&self) -> &MySqlConnectOptions {
        &self.connect
    }

    /// The database mapping.
    pub fn get_database_mapping(&self) -> &DatabaseMapping {
        &self.mapping
    }

    /// The connect timeout.
    pub fn get_connect_timeout(&self) -> Duration {
        self.connect_timeout
    }

    /// The idle timeout (`wait_timeout`).
    pub fn get_idle_timeout(&self) -> Duration {
        self.idle_timeout
    }

    /// The net timeout (`net_read_timeout`, `net_write_timeout`).
    pub fn get_net_timeout(&self) -> Duration {
        self.net_timeout
    }

    /// How long the server keeps a vanished node's locks at least: its
    /// [`idle_timeout`](Self::idle_timeout) (`wait_timeout`) counted from
    /// the session's last statement. MySQL sets no server-side TCP
    /// keepalive of its own; an idle session whose client vanished is ended
    /// when `wait_timeout` runs out. A coordinator verifies every session
    /// each poll, so a cut-off node's locks stay held at least this window
    /// minus one poll interval after the cut.
    pub fn lock_release_window(&self) -> Duration {
        Duration::from_secs(whole_seconds(self.idle_timeout))
    }

    /// The database `id` locks in: the mapping's answer, or the URL's
    /// database (empty: none) for [`DatabaseMapping::ConnectionString`].
    pub fn database_for(&self, id: &DatabaseId) -> String {
        self.mapping.database_for(id).unwrap_or_else(|| {
            self.connect
                .get_database()
                .map(str::to_string)
                .unwrap_or_default()
        })
    }

    /// `host:port` (or the socket path), for messages.
    pub(crate) fn target(&self) -> String {
        match self.connect.get_socket() {
            Some(path) => path.display().to_string(),
            None => format!("{}:{}", self.connect.get_host(), self.connect.get_port()),
        }
    }
}

/// A duration in whole seconds, rounded up, at least 1.
pub(crate) fn whole_seconds(d: Duration) -> u64 {
    let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    secs.max(1)
}

impl FromStr for MySqlOptions {
    type Err = MySqlError;

    fn from_str(url: &str) -> Result<Self, MySqlError> {
        Self::parse(url)
    }
}

impl fmt::Debug for MySqlOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MySqlOptions")
            .field("target", &self.target())
            .field("user", &self.connect.get_username())
            .field("database", &self.connect.get_database())
            .field("mapping", &self.mapping)
            .field("connect_timeout", &self.connect_timeout)
            .field("idle_timeout", &self.idle_timeout)
            .field("net_timeout", &self.net_timeout)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_mapping() {
        let o = MySqlOptions::parse("mariadb://u:p@db:3307/app").unwrap();
        assert_eq!(o.target(), "db:3307");
        assert_eq!(o.database_for(&DatabaseId::new("main")), "app");
        let o = MySqlOptions::parse("mysql://u:p@db").unwrap();
        assert_eq!(o.database_for(&DatabaseId::new("tenant_7")), "tenant_7");
        assert!(MySqlOptions::parse("postgres://u@db/x").is_err());
        assert_eq!(o.lock_release_window(), Duration::from_secs(60));
        assert_eq!(whole_seconds(Duration::from_millis(1500)), 2);
    }
}
