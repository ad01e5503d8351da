//! Connection options: where the server is, how shardlock's database ids map
//! to databases, and the session settings that bound how long a vanished
//! node's locks stay held.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use shardlock_core::{DatabaseId, DatabaseMapping};
use sqlx::postgres::PgConnectOptions;

use crate::error::PgError;

/// Default [`PgOptions::connect_timeout`].
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Default [`PgOptions::lock_check_interval`].
pub const DEFAULT_LOCK_CHECK_INTERVAL: Duration = Duration::from_secs(60);

/// Default [`PgOptions::client_connection_check_interval`].
pub const DEFAULT_CLIENT_CONNECTION_CHECK_INTERVAL: Duration = Duration::from_secs(2);

/// Longest `application_name` PostgreSQL keeps (`NAMEDATALEN - 1`).
pub(crate) const MAX_APPLICATION_NAME: usize = 63;

/// Server-side TCP keepalive settings applied to every session
/// (`tcp_keepalives_idle`, `tcp_keepalives_interval`, `tcp_keepalives_count`,
/// and `tcp_user_timeout` set to the resulting window).
///
/// They decide how long the server keeps a vanished node's locks: after
/// `idle` without traffic it sends `count` probes `interval` apart, then ends
/// the session and frees its locks. That
/// [`release_window`](Keepalives::release_window) must be longer than the
/// coordinator's worst-case loss detection (the sum of poll interval,
/// lock-loss timeout and stop timeout: 15 s with the coordinator's
/// defaults), so a cut-off node stops its work before another node can take
/// its locks; the coordinator checks this when it is built.
///
/// PostgreSQL takes whole seconds: durations are rounded up to the next
/// second (at least 1 s).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keepalives {
    /// Silence before the first probe (`tcp_keepalives_idle`). Default 10 s.
    pub idle: Duration,
    /// Time between probes (`tcp_keepalives_interval`). Default 5 s.
    pub interval: Duration,
    /// Unanswered probes before the server gives up
    /// (`tcp_keepalives_count`). Default 3.
    pub count: u32,
}

impl Keepalives {
    /// Idle 10 s, interval 5 s, count 3: a 25 s release window.
    pub const DEFAULT: Self = Self {
        idle: Duration::from_secs(10),
        interval: Duration::from_secs(5),
        count: 3,
    };

    /// Keepalives with the given settings.
    pub fn new(idle: Duration, interval: Duration, count: u32) -> Self {
        Self {
            idle,
            interval,
            count,
        }
    }

    /// `idle + interval × count` (after rounding to whole seconds, with
    /// `count` at least 1): how long the server keeps a silent session's
    /// locks at least.
    pub fn release_window(&self) -> Duration {
        let idle = whole_seconds(self.idle);
        let interval = whole_seconds(self.interval);
        Duration::from_secs(idle + interval * u64::from(self.count.max(1)))
    }

    pub(crate) fn idle_secs(&self) -> u64 {
        whole_seconds(self.idle)
    }

    pub(crate) fn interval_secs(&self) -> u64 {
        whole_seconds(self.interval)
    }

    pub(crate) fn count_clamped(&self) -> u32 {
        self.count.max(1)
    }
}

impl Default for Keepalives {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// A duration in whole seconds, rounded up, at least 1.
fn whole_seconds(d: Duration) -> u64 {
    let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    secs.max(1)
}

/// Options of a [`PgDriver`](crate::PgDriver): the server, the database
/// mapping and the session settings. A builder; also parsed from a URL.
///
/// See the crate docs for the table of options and defaults.
///
/// ```
/// use std::time::Duration;
/// use shardlock_postgres::{DatabaseMapping, Keepalives, PgOptions};
///
/// let options: PgOptions = "postgres://app:secret@db.internal:5432/orders".parse()?;
/// let options = options
///     .database_mapping(DatabaseMapping::Fixed("orders".into()))
///     .keepalives(Some(Keepalives::new(Duration::from_secs(20), Duration::from_secs(5), 4)));
/// assert_eq!(options.lock_release_window(), Some(Duration::from_secs(40)));
/// # Ok::<(), shardlock_postgres::PgError>(())
/// ```
#[derive(Clone)]
pub struct PgOptions {
    connect: PgConnectOptions,
    mapping: DatabaseMapping,
    /// Whether `mapping` was chosen with
    /// [`database_mapping`](PgOptions::database_mapping); if not, it follows
    /// the connect options (see [`default_mapping`]).
    mapping_set: bool,
    keepalives: Option<Keepalives>,
    check_interval: Option<Duration>,
    connect_timeout: Duration,
    lock_check_interval: Duration,
}

impl PgOptions {
    /// Options from the libpq-style environment (`PGHOST`, `PGPORT`,
    /// `PGUSER`, `PGPASSWORD`, `PGDATABASE`, `~/.pgpass`, ...) as sqlx reads
    /// it, with shardlock's defaults for everything else.
    pub fn new() -> Self {
        Self::from_connect_options(PgConnectOptions::new())
    }

    /// Options around sqlx's connect options (host, credentials, TLS, ...),
    /// with shardlock's defaults for everything else. Their
    /// `application_name` is replaced by `shardlock:<node-id>`.
    pub fn from_connect_options(connect: PgConnectOptions) -> Self {
        Self {
            mapping: default_mapping(&connect),
            mapping_set: false,
            connect,
            keepalives: Some(Keepalives::DEFAULT),
            check_interval: Some(DEFAULT_CLIENT_CONNECTION_CHECK_INTERVAL),
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            lock_check_interval: DEFAULT_LOCK_CHECK_INTERVAL,
        }
    }

    /// Parses a URL such as `postgres://user:password@host:5432/database`
    /// (also `postgresql://`), with sqlx's query parameters (`sslmode`,
    /// `host`, `port`, `options`, ...). Same as [`str::parse`].
    ///
    /// # Errors
    ///
    /// [`PgError::Config`] for a malformed URL or another scheme.
    pub fn parse(url: &str) -> Result<Self, PgError> {
        url.parse()
    }

    /// Sets the server's host name or address.
    pub fn host(self, host: &str) -> Self {
        self.map_connect_options(|o| o.host(host))
    }

    /// Sets the server's port.
    pub fn port(self, port: u16) -> Self {
        self.map_connect_options(|o| o.port(port))
    }

    /// Sets the user name.
    pub fn username(self, username: &str) -> Self {
        self.map_connect_options(|o| o.username(username))
    }

    /// Sets the password.
    pub fn password(self, password: &str) -> Self {
        self.map_connect_options(|o| o.password(password))
    }

    /// Changes sqlx's connect options (TLS, socket path, statement cache,
    /// ...) in place.
    ///
    /// ```
    /// use shardlock_postgres::{PgOptions, sqlx::postgres::PgSslMode};
    ///
    /// let options = PgOptions::parse("postgres://app@db/app")?
    ///     .map_connect_options(|o| o.ssl_mode(PgSslMode::Disable));
    /// assert!(matches!(options.get_connect_options().get_ssl_mode(), PgSslMode::Disable));
    /// # Ok::<(), shardlock_postgres::PgError>(())
    /// ```
    pub fn map_connect_options(
        mut self,
        f: impl FnOnce(PgConnectOptions) -> PgConnectOptions,
    ) -> Self {
        self.connect = f(self.connect);
        if !self.mapping_set {
            // The default follows the database the options name now.
            self.mapping = default_mapping(&self.connect);
        }
        self
    }

    /// Sets how database ids map to databases. The default follows the
    /// URL: **the database the URL names, for every id**
    /// ([`DatabaseMapping::ConnectionString`]); when the URL (or `PGDATABASE`)
    /// names none, the database named like the id on this server
    /// ([`DatabaseMapping::SameServer`]: one database per tenant). A
    /// multi-tenant service whose URL names a database (e.g. to log in)
    /// sets [`DatabaseMapping::SameServer`] here.
    ///
    /// ```
    /// use shardlock_core::DatabaseId;
    /// use shardlock_postgres::{DatabaseMapping, PgOptions};
    ///
    /// let id = DatabaseId::new("main");
    /// let options = PgOptions::parse("postgres://app@db/orders")?;
    /// assert_eq!(options.database_for(&id), "orders", "by default the URL's database");
    /// let options = options.database_mapping(DatabaseMapping::SameServer);
    /// assert_eq!(options.database_for(&id), "main", "SameServer: the id, not the URL's");
    /// let bare = PgOptions::parse("postgres://app@db")?;
    /// assert_eq!(bare.database_for(&id), "main", "no database in the URL: the id");
    /// # Ok::<(), shardlock_postgres::PgError>(())
    /// ```
    pub fn database_mapping(mut self, mapping: DatabaseMapping) -> Self {
        self.mapping = mapping;
        self.mapping_set = true;
        self
    }

    /// Sets the server-side keepalives of every session; `None` leaves the
    /// server's settings alone, and then the driver reports no
    /// [`lock_release_window`](Self::lock_release_window). Default
    /// [`Keepalives::DEFAULT`].
    pub fn keepalives(mut self, keepalives: Option<Keepalives>) -> Self {
        self.keepalives = keepalives;
        self
    }

    /// Sets `client_connection_check_interval` on every session (PostgreSQL
    /// 14+; ignored on older servers): how often a backend that is busy,
    /// e.g. waiting in `pg_advisory_lock`, checks that its client is still
    /// connected, so a crashed waiter does not take a lock it can no longer
    /// use. `None` leaves the server's setting alone. Default 2 s.
    pub fn client_connection_check_interval(mut self, interval: Option<Duration>) -> Self {
        self.check_interval = interval;
        self
    }

    /// How often `verify` reads the server's lock table (`pg_locks`) to see
    /// every held key, rather than only proving the session's server
    /// process is the same and alive (`SELECT pg_backend_pid()`). Default
    /// 60 s; `Duration::ZERO` reads it on every verify.
    ///
    /// Why the light verify is enough in between: a session-level advisory
    /// lock is freed only by the process holding it (its own unlock, which
    /// the session tracks, or its end, which fails the round trip and fires
    /// the loss signal). What only the lock table shows is a key unlocked
    /// behind the session's back (a statement such as
    /// `pg_advisory_unlock_all()` sent through its fenced transaction, which
    /// its docs forbid): found at the next full check. The full check
    /// costs the server a scan of the whole lock table, so a node verifying
    /// 100 tenant databases holding 100,000 locks every poll would keep a
    /// server core busy.
    pub fn lock_check_interval(mut self, interval: Duration) -> Self {
        self.lock_check_interval = interval;
        self
    }

    /// Sets how long opening a session may take. Default 10 s.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// sqlx's connect options.
    pub fn get_connect_options(&self) -> &PgConnectOptions {
        &self.connect
    }

    /// The database mapping.
    pub fn get_database_mapping(&self) -> &DatabaseMapping {
        &self.mapping
    }

    /// The keepalive settings, if the driver sets them.
    pub fn get_keepalives(&self) -> Option<Keepalives> {
        self.keepalives
    }

    /// The `client_connection_check_interval`, if the driver sets it.
    pub fn get_client_connection_check_interval(&self) -> Option<Duration> {
        self.check_interval
    }

    /// The connect timeout.
    pub fn get_connect_timeout(&self) -> Duration {
        self.connect_timeout
    }

    /// How often `verify` reads the whole lock table (see
    /// [`lock_check_interval`](Self::lock_check_interval)).
    pub fn get_lock_check_interval(&self) -> Duration {
        self.lock_check_interval
    }

    /// How long the server keeps a vanished session's locks at least: the
    /// keepalives' [`release_window`](Keepalives::release_window), or `None`
    /// when the driver does not set keepalives.
    pub fn lock_release_window(&self) -> Option<Duration> {
        self.keepalives.map(|k| k.release_window())
    }

    /// The database name `id` maps to: the mapping's answer, or for
    /// [`DatabaseMapping::ConnectionString`] the URL's database (PostgreSQL's
    /// default when the URL names none: the user name).
    pub fn database_for(&self, id: &DatabaseId) -> String {
        self.mapping.database_for(id).unwrap_or_else(|| {
            self.connect
                .get_database()
                .unwrap_or_else(|| self.connect.get_username())
                .to_string()
        })
    }

    /// `host:port` or the socket path, without credentials, for messages.
    pub(crate) fn target(&self) -> String {
        match self.connect.get_socket() {
            Some(path) => path.display().to_string(),
            None => format!("{}:{}", self.connect.get_host(), self.connect.get_port()),
        }
    }
}

impl Default for PgOptions {
    fn default() -> Self {
        Self::new()
    }
}

impl FromStr for PgOptions {
    type Err = PgError;

    fn from_str(url: &str) -> Result<Self, PgError> {
        let scheme = url.split_once("://").map(|(scheme, _)| scheme);
        match scheme {
            Some("postgres" | "postgresql") => {}
            Some(other) => {
                return Err(PgError::Config {
                    reason: format!("URL scheme {other:?} is not postgres:// or postgresql://"),
                    source: None,
                })
            }
            None => {
                return Err(PgError::Config {
                    reason: "expected a URL like postgres://user:password@host:5432/database"
                        .to_string(),
                    source: None,
                })
            }
        }
        let connect = PgConnectOptions::from_str(url).map_err(|source| PgError::Config {
            reason: "cannot parse the URL".to_string(),
            source: Some(source.into()),
        })?;
        Ok(Self::from_connect_options(connect))
    }
}

impl fmt::Debug for PgOptions {
    /// Shows where and how the driver connects; never the password.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgOptions")
            .field("target", &self.target())
            .field("username", &self.connect.get_username())
            .field("database", &self.connect.get_database())
            .field("mapping", &self.mapping)
            .field("keepalives", &self.keepalives)
            .field("client_connection_check_interval", &self.check_interval)
            .field("connect_timeout", &self.connect_timeout)
            .field("lock_check_interval", &self.lock_check_interval)
            .finish()
    }
}

/// The mapping of options whose user did not choose one: the database the
/// connect options name (the URL's, or `PGDATABASE`) for every id, else the
/// id itself (one database per id).
fn default_mapping(connect: &PgConnectOptions) -> DatabaseMapping {
    if connect.get_database().is_some() {
        DatabaseMapping::ConnectionString
    } else {
        DatabaseMapping::SameServer
    }
}

/// `shardlock:<node>`, cut to PostgreSQL's 63 bytes at a character boundary.
pub(crate) fn application_name(node: &str, suffix: &str) -> String {
    let mut name = format!("shardlock:{node}");
    let keep = MAX_APPLICATION_NAME.saturating_sub(suffix.len());
    truncate_at_char(&mut name, keep);
    name.push_str(suffix);
    truncate_at_char(&mut name, MAX_APPLICATION_NAME);
    name
}

fn truncate_at_char(s: &mut String, max: usize) {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_parsing() {
        let o: PgOptions = "postgres://app:s3cret@db.example:6543/orders"
            .parse()
            .unwrap();
        assert_eq!(o.get_connect_options().get_host(), "db.example");
        assert_eq!(o.get_connect_options().get_port(), 6543);
        assert_eq!(o.get_connect_options().get_username(), "app");
        assert_eq!(o.get_connect_options().get_database(), Some("orders"));
        assert_eq!(o.target(), "db.example:6543");
        let shown = format!("{o:?}");
        assert!(
            !shown.contains("s3cret"),
            "Debug hides the password: {shown}"
        );
        assert!(PgOptions::parse("postgresql://app@localhost/x").is_ok());
    }

    #[test]
    fn url_parsing_errors() {
        for bad in [
            "mysql://app@db/x",
            "db.example:5432",
            "",
            "postgres://app@db:notaport/x",
            "postgres://app@db/x?sslmode=sometimes",
        ] {
            match PgOptions::parse(bad) {
                Err(PgError::Config { reason, .. }) => assert!(!reason.is_empty()),
                other => panic!("{bad:?} gave {other:?}"),
            }
        }
        let err = PgOptions::parse("mysql://app@db/x").unwrap_err();
        assert!(err.to_string().contains("mysql"), "{err}");
        let core = shardlock_core::Error::connect(&DatabaseId::new("x"), err);
        assert_eq!(core.kind(), shardlock_core::ErrorKind::Config, "{core:?}");
    }

    #[test]
    fn defaults_give_a_window_above_the_coordinator_bound() {
        let o = PgOptions::parse("postgres://a@b/c").unwrap();
        assert_eq!(o.get_keepalives(), Some(Keepalives::DEFAULT));
        let window = o.lock_release_window().unwrap();
        assert_eq!(window, Duration::from_secs(25));
        // Coordinator defaults: poll 5 s + loss timeout 5 s + stop 5 s.
        assert!(window > Duration::from_secs(15));
        assert_eq!(o.keepalives(None).lock_release_window(), None);
    }

    #[test]
    fn keepalives_round_up_to_seconds() {
        let k = Keepalives::new(Duration::from_millis(1500), Duration::ZERO, 0);
        assert_eq!(k.idle_secs(), 2);
        assert_eq!(k.interval_secs(), 1);
        assert_eq!(k.count_clamped(), 1);
        assert_eq!(k.release_window(), Duration::from_secs(3));
    }

    #[test]
    fn the_urls_database_is_the_default() {
        let id = DatabaseId::new("tenant_7");
        let o = PgOptions::parse("postgres://app@db/orders").unwrap();
        assert_eq!(o.database_for(&id), "orders", "the URL names a database");
        assert!(matches!(
            o.get_database_mapping(),
            DatabaseMapping::ConnectionString
        ));
        let bare = PgOptions::parse("postgres://app@db").unwrap();
        assert_eq!(bare.database_for(&id), "tenant_7", "no database: the id");
        assert!(matches!(
            bare.get_database_mapping(),
            DatabaseMapping::SameServer
        ));
        // The default follows the connect options as they change...
        let named = bare.map_connect_options(|c| c.database("reports"));
        assert_eq!(named.database_for(&id), "reports");
        // ...but a mapping set explicitly stays.
        let same = PgOptions::parse("postgres://app@db/orders")
            .unwrap()
            .database_mapping(DatabaseMapping::SameServer)
            .map_connect_options(|c| c.database("reports"));
        assert_eq!(same.database_for(&id), "tenant_7");
        let from_options = PgOptions::from_connect_options(
            PgConnectOptions::new_without_pgpass()
                .host("db")
                .database("ledger"),
        );
        assert_eq!(from_options.database_for(&id), "ledger");
    }

    #[test]
    fn database_mapping() {
        let id = DatabaseId::new("tenant_7");
        let o = PgOptions::parse("postgres://app@db/orders")
            .unwrap()
            .database_mapping(DatabaseMapping::SameServer);
        assert_eq!(o.database_for(&id), "tenant_7", "SameServer");
        let fixed = o
            .clone()
            .database_mapping(DatabaseMapping::Fixed("app".into()));
        assert_eq!(fixed.database_for(&id), "app");
        let url = o
            .clone()
            .database_mapping(DatabaseMapping::ConnectionString);
        assert_eq!(url.database_for(&id), "orders");
        let bare = PgOptions::parse("postgres://app@db")
            .unwrap()
            .database_mapping(DatabaseMapping::ConnectionString);
        assert_eq!(bare.database_for(&id), "app", "no database: the user's");
        let custom = o.database_mapping(DatabaseMapping::custom(|id| format!("t_{id}")));
        assert_eq!(custom.database_for(&id), "t_tenant_7");
        assert_eq!(format!("{:?}", custom.get_database_mapping()), "Custom(..)");
    }

    #[test]
    fn application_name_truncation() {
        assert_eq!(application_name("web-1", ""), "shardlock:web-1");
        let long = "n".repeat(100);
        let name = application_name(&long, "");
        assert_eq!(name.len(), MAX_APPLICATION_NAME);
        assert!(name.starts_with("shardlock:nnn"));
        // Multi-byte characters are never cut in half.
        let wide = "é".repeat(40);
        let name = application_name(&wide, "");
        assert!(name.len() <= MAX_APPLICATION_NAME);
        assert_eq!(
            name.len(),
            62,
            "10 + 26 × 2 bytes: the 27th é would not fit"
        );
        // The suffix always survives.
        let name = application_name(&long, ":cancel");
        assert!(name.ends_with(":cancel"), "{name}");
        assert_eq!(name.len(), MAX_APPLICATION_NAME);
    }
}
