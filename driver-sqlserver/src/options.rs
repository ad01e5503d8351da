//! Connection options: the server, the database mapping and the driver's
//! timing settings. A builder; also parsed from an ADO.NET connection string,
//! a JDBC string, or a `sqlserver://` / `mssql://` URL.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use shardlock_core::{DatabaseId, DatabaseMapping};
use tiberius::{AuthMethod, Config, EncryptionLevel};

use crate::error::MssqlError;

/// Default length of one server-side wait slice of
/// [`acquire`](shardlock_core::Session::acquire).
pub const DEFAULT_ACQUIRE_SLICE: Duration = Duration::from_secs(1);

/// SQL Server's default TCP `KeepAlive` on its endpoint (30 000 ms; the
/// probe interval is fixed at 1 s). A vanished client's session, and so its
/// locks, lives at least this long after its last packet.
pub const DEFAULT_SERVER_KEEPALIVE: Duration = Duration::from_secs(30);

/// Default timeout for opening a session (TCP, TLS, login and checks): 8 s.
///
/// Shorter than the coordinator's connect deadline (10 s by default) on
/// purpose: the driver's own timeout then fires first, so a slow or silent
/// server is reported as the typed [`MssqlError::ConnectTimeout`] naming the
/// address, not as the coordinator's generic timeout. (ADO.NET's default of
/// 15 s would never be seen.) Raise both together if a server needs longer.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(8);

/// Default [loss detection bound](shardlock_core::Capabilities::loss_detection_bound):
/// 50 ms.
///
/// The driver watches each session's socket continuously (see
/// [`MssqlOptions::loss_signal_bound`]), so the loss signal fires as soon as
/// the server's FIN or RST arrives: one network delay plus a task wake-up,
/// far below 50 ms between hosts of one data centre. This is a bound by
/// construction, not a measurement (no SQL Server runs where the driver is
/// developed; the contract suite measures it against a real one). It does
/// not cover a silent end (a network cut, a host that vanishes without a
/// FIN): the coordinator's verify deadline and the server's `KeepAlive`
/// window handle that.
pub const DEFAULT_LOSS_SIGNAL_BOUND: Duration = Duration::from_millis(50);

/// Options of a [`MssqlDriver`](crate::MssqlDriver): the server (a tiberius
/// [`Config`]), the database mapping, and the driver's timings.
///
/// Parse one from a connection string (see the crate docs for the formats)
/// and adjust it with the builder methods:
///
/// ```
/// use std::time::Duration;
/// use shardlock_sqlserver::{DatabaseMapping, MssqlOptions};
///
/// let options: MssqlOptions =
///     "Server=tcp:db.internal,1433;User Id=app;Password=secret;TrustServerCertificate=true"
///         .parse()?;
/// let options = options
///     .database_mapping(DatabaseMapping::Fixed("orders".into()))
///     .acquire_slice(Duration::from_millis(500));
/// assert_eq!(options.addr(), "db.internal:1433");
/// assert_eq!(options.lock_release_window(), Some(Duration::from_secs(30)));
///
/// let url: MssqlOptions = "sqlserver://app:s%3Bcret@db.internal/orders?trustServerCertificate=true"
///     .parse()?;
/// assert_eq!(url.addr(), "db.internal:1433");
/// # Ok::<(), shardlock_sqlserver::MssqlError>(())
/// ```
#[derive(Clone)]
pub struct MssqlOptions {
    config: Config,
    addr: String,
    mapping: DatabaseMapping,
    acquire_slice: Duration,
    server_keepalive: Option<Duration>,
    connect_timeout: Duration,
    loss_signal_bound: Duration,
}

impl MssqlOptions {
    /// Options for the server described by a tiberius `config`, with the
    /// default mapping and timings.
    pub fn from_config(config: Config) -> Self {
        let addr = config.get_addr();
        Self {
            config,
            addr,
            mapping: DatabaseMapping::default(),
            acquire_slice: DEFAULT_ACQUIRE_SLICE,
            server_keepalive: Some(DEFAULT_SERVER_KEEPALIVE),
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            loss_signal_bound: DEFAULT_LOSS_SIGNAL_BOUND,
        }
    }

    /// Parses an ADO.NET connection string, a `jdbc:sqlserver://` string, or
    /// a `sqlserver://` / `mssql://` URL. Same as [`str::parse`].
    ///
    /// # Errors
    ///
    /// [`MssqlError::InvalidConnectionString`] naming what is wrong; never a
    /// panic, and the message never repeats the password.
    pub fn parse(s: &str) -> Result<Self, MssqlError> {
        let trimmed = s.trim();
        if trimmed.is_empty() {
            return Err(invalid("the connection string is empty", None));
        }
        let lower = trimmed.to_ascii_lowercase();
        let config = if lower.starts_with("sqlserver://") || lower.starts_with("mssql://") {
            config_from_url(trimmed)?
        } else if lower.starts_with("jdbc:sqlserver://") {
            Config::from_jdbc_string(trimmed)
                .map_err(|e| invalid("cannot parse the JDBC connection string", Some(e)))?
        } else if lower.contains("://") {
            return Err(invalid(
                "unknown URL scheme: use sqlserver://, mssql://, jdbc:sqlserver:// or an ADO.NET string",
                None,
            ));
        } else if !trimmed.contains('=') {
            return Err(invalid(
                "expected an ADO.NET connection string (key=value pairs separated by `;`) or a sqlserver:// URL",
                None,
            ));
        } else {
            Config::from_ado_string(trimmed)
                .map_err(|e| invalid("cannot parse the ADO.NET connection string", Some(e)))?
        };
        let options = Self::from_config(config);
        if options.addr.starts_with(':') {
            return Err(invalid("the connection string names no server", None));
        }
        Ok(options)
    }

    /// Sets the [`DatabaseMapping`] (default [`DatabaseMapping::SameServer`]).
    pub fn database_mapping(mut self, mapping: DatabaseMapping) -> Self {
        self.mapping = mapping;
        self
    }

    /// Maps every [`DatabaseId`] to the database `name`
    /// ([`DatabaseMapping::Fixed`]).
    pub fn fixed_database(self, name: impl Into<String>) -> Self {
        self.database_mapping(DatabaseMapping::Fixed(name.into()))
    }

    /// How long one server-side wait of a blocking
    /// [`acquire`](shardlock_core::Session::acquire) lasts (`sp_getapplock`
    /// with this `@LockTimeout`) before the driver checks for cancellation and
    /// waits again; default [`DEFAULT_ACQUIRE_SLICE`]. A grant ends the wait
    /// at once, so this bounds only how late a cancelled wait ends and how
    /// often a waiting session sends a request (once per slice). Clamped to
    /// 10 ms ..= 1 hour. tiberius' command timeout (30 s by default) is
    /// raised to the slice + 10 s where it is shorter, since the server sends
    /// nothing while it waits.
    pub fn acquire_slice(mut self, slice: Duration) -> Self {
        self.acquire_slice = slice.clamp(Duration::from_millis(10), Duration::from_secs(3600));
        self
    }

    /// The server's TCP keepalive time (`KeepAlive` in SQL Server
    /// Configuration Manager, default [`DEFAULT_SERVER_KEEPALIVE`]): how long
    /// at least the server keeps a vanished client's session, and its locks,
    /// before it notices. Reported as the driver's
    /// [`lock_release_window`](shardlock_core::Driver::lock_release_window);
    /// set it to what your server uses, or `None` if unknown (the coordinator
    /// then cannot check its self-fencing timings).
    pub fn server_keepalive(mut self, keepalive: Option<Duration>) -> Self {
        self.server_keepalive = keepalive;
        self
    }

    /// Timeout for opening a session: TCP connect, TLS, login and the
    /// connect-time checks (default [`DEFAULT_CONNECT_TIMEOUT`], 8 s). Keep
    /// it below the coordinator's connect deadline (10 s by default), or
    /// the coordinator's timeout hides the driver's typed
    /// [`MssqlError::ConnectTimeout`].
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// The longest time from the server ending a session (`KILL`, a restart,
    /// a failover) to the session's loss signal firing, that the driver
    /// states in [`Driver::capabilities`](shardlock_core::Driver::capabilities)
    /// (default [`DEFAULT_LOSS_SIGNAL_BOUND`], 50 ms). The coordinator's
    /// default takeover delay is this bound.
    ///
    /// The driver reads every session's socket all the time (a pump task
    /// beneath tiberius), so it sees the server's FIN or RST the moment it
    /// arrives, without a statement and without polling. The bound is thus
    /// the network's one-way delay plus a wake-up: raise it where the client
    /// is far from the server (another region) or its runtime is heavily
    /// loaded. A silent end (network cut) is not covered: see the crate
    /// docs, "When a node vanishes".
    pub fn loss_signal_bound(mut self, bound: Duration) -> Self {
        self.loss_signal_bound = bound;
        self
    }

    /// Changes the tiberius [`Config`] in place, e.g. to set a certificate
    /// authority or an Azure AD token. The application name and the database
    /// are set per session by the driver.
    pub fn map_config(mut self, f: impl FnOnce(&mut Config)) -> Self {
        f(&mut self.config);
        self.addr = self.config.get_addr();
        self
    }

    /// The tiberius configuration sessions start from.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// `host:port` of the server.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The database mapping.
    pub fn get_database_mapping(&self) -> &DatabaseMapping {
        &self.mapping
    }

    /// The database for `id`, or `None` to keep the connection string's.
    pub fn database_for(&self, id: &DatabaseId) -> Option<String> {
        self.mapping.database_for(id)
    }

    /// The length of one server-side wait slice.
    pub fn get_acquire_slice(&self) -> Duration {
        self.acquire_slice
    }

    /// The server keepalive time assumed (see
    /// [`server_keepalive`](Self::server_keepalive)).
    pub fn get_server_keepalive(&self) -> Option<Duration> {
        self.server_keepalive
    }

    /// The connect timeout.
    pub fn get_connect_timeout(&self) -> Duration {
        self.connect_timeout
    }

    /// The loss detection bound stated (see
    /// [`loss_signal_bound`](Self::loss_signal_bound)).
    pub fn get_loss_signal_bound(&self) -> Duration {
        self.loss_signal_bound
    }

    /// How long the server may keep a vanished node's locks, at least: the
    /// server keepalive time. See the crate docs, "When a node vanishes".
    pub fn lock_release_window(&self) -> Option<Duration> {
        self.server_keepalive
    }
}

impl FromStr for MssqlOptions {
    type Err = MssqlError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Debug for MssqlOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Not the tiberius config: no credentials in logs.
        f.debug_struct("MssqlOptions")
            .field("addr", &self.addr)
            .field("mapping", &self.mapping)
            .field("acquire_slice", &self.acquire_slice)
            .field("server_keepalive", &self.server_keepalive)
            .field("connect_timeout", &self.connect_timeout)
            .field("loss_signal_bound", &self.loss_signal_bound)
            .finish()
    }
}

fn invalid(reason: impl Into<String>, source: Option<tiberius::error::Error>) -> MssqlError {
    MssqlError::InvalidConnectionString {
        reason: reason.into(),
        source,
    }
}

/// `sqlserver://user:password@host:port/database?param=value`.
///
/// Parameters (names case-insensitive): `encrypt` (`true`, `false`,
/// `strict`, `DANGER_PLAINTEXT`), `trustServerCertificate` (`true`/`false`),
/// `trustServerCertificateCA` (a path), `hostNameInCertificate`, `instance`
/// (a named instance, resolved through SQL Server Browser when no port is
/// given). Unknown parameters are an error, so a typo is not silently ignored.
fn config_from_url(s: &str) -> Result<Config, MssqlError> {
    // The url crate's error never contains the input.
    let url =
        url::Url::parse(s).map_err(|e| invalid(format!("cannot parse the URL: {e}"), None))?;
    let host = match url.host() {
        Some(url::Host::Domain(d)) if !d.is_empty() => d.to_string(),
        Some(url::Host::Ipv4(ip)) => ip.to_string(),
        // Bracketed, so that `host:port` stays parseable.
        Some(url::Host::Ipv6(ip)) => format!("[{ip}]"),
        _ => return Err(invalid("the URL names no host", None)),
    };
    let mut config = Config::new();
    config.host(host);
    if let Some(port) = url.port() {
        config.port(port);
    }
    let user = decode(url.username(), "user name")?;
    if user.is_empty() {
        return Err(invalid(
            "the URL names no user (SQL Server authentication needs user and password)",
            None,
        ));
    }
    let password = decode(url.password().unwrap_or_default(), "password")?;
    config.authentication(AuthMethod::sql_server(user, password));
    let path = url.path().trim_start_matches('/');
    if path.contains('/') {
        return Err(invalid(
            "the URL path must be just the database name (`/database`)",
            None,
        ));
    }
    let database = decode(path, "database name")?;
    if !database.is_empty() {
        config.database(database);
    }
    let mut trust_cert = false;
    let mut trust_ca = None;
    for (name, value) in url.query_pairs() {
        let value = value.into_owned();
        match name.to_ascii_lowercase().as_str() {
            "encrypt" => config.encryption(parse_encrypt(&value)?),
            "trustservercertificate" => trust_cert = parse_bool(&name, &value)?,
            "trustservercertificateca" => trust_ca = Some(value),
            "hostnameincertificate" => config.hostname_in_certificate(value),
            "instance" => config.instance_name(value),
            other => {
                return Err(invalid(
                    format!("unknown URL parameter {other:?} (known: encrypt, trustServerCertificate, trustServerCertificateCA, hostNameInCertificate, instance)"),
                    None,
                ))
            }
        }
    }
    match (trust_cert, trust_ca) {
        (true, Some(_)) => {
            return Err(invalid(
                "trustServerCertificate and trustServerCertificateCA are mutually exclusive",
                None,
            ))
        }
        (true, None) => config.trust_cert(),
        (false, Some(ca)) => config.trust_cert_ca(ca),
        (false, None) => {}
    }
    Ok(config)
}

fn decode(s: &str, what: &str) -> Result<String, MssqlError> {
    percent_encoding::percent_decode_str(s)
        .decode_utf8()
        .map(|v| v.into_owned())
        .map_err(|_| {
            invalid(
                format!("the {what} is not valid UTF-8 once percent-decoded"),
                None,
            )
        })
}

fn parse_bool(name: &str, value: &str) -> Result<bool, MssqlError> {
    match value.to_ascii_lowercase().as_str() {
        "true" | "yes" | "1" => Ok(true),
        "false" | "no" | "0" => Ok(false),
        _ => Err(invalid(
            format!("URL parameter {name} must be true or false, not {value:?}"),
            None,
        )),
    }
}

fn parse_encrypt(value: &str) -> Result<EncryptionLevel, MssqlError> {
    match value.to_ascii_lowercase().as_str() {
        "true" | "yes" | "1" | "mandatory" => Ok(EncryptionLevel::Required),
        "false" | "no" | "0" | "optional" => Ok(EncryptionLevel::Off),
        "strict" => Ok(EncryptionLevel::Strict),
        "danger_plaintext" => Ok(EncryptionLevel::NotSupported),
        _ => Err(invalid(
            format!("URL parameter encrypt must be true, false, strict or DANGER_PLAINTEXT, not {value:?}"),
            None,
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(s: &str) -> String {
        match MssqlOptions::parse(s) {
            Err(e @ MssqlError::InvalidConnectionString { .. }) => e.to_string(),
            Err(e) => panic!("{s:?}: wrong error kind {e:?}"),
            Ok(o) => panic!("{s:?} parsed: {o:?}"),
        }
    }

    #[test]
    fn ado_strings_parse() {
        let o: MssqlOptions =
            "Server=tcp:db.internal,1433;User Id=app;Password=secret;TrustServerCertificate=true"
                .parse()
                .unwrap();
        assert_eq!(o.addr(), "db.internal:1433");
        let o = MssqlOptions::parse("server=tcp:10.0.0.5,14330;user=sa;password=x").unwrap();
        assert_eq!(o.addr(), "10.0.0.5:14330");
        let o = MssqlOptions::parse("Server=localhost;User Id=sa;Password=x").unwrap();
        assert_eq!(o.addr(), "localhost:1433");
    }

    #[test]
    fn jdbc_strings_parse() {
        let o =
            MssqlOptions::parse("jdbc:sqlserver://db.internal:1444;user=sa;password=x").unwrap();
        assert_eq!(o.addr(), "db.internal:1444");
    }

    #[test]
    fn urls_parse() {
        let o = MssqlOptions::parse(
            "sqlserver://app:p%40ss%3Bw%2Brd@db.internal:1444/orders?encrypt=true&trustServerCertificate=true",
        )
        .unwrap();
        assert_eq!(o.addr(), "db.internal:1444");
        let o = MssqlOptions::parse("mssql://sa:x@127.0.0.1").unwrap();
        assert_eq!(o.addr(), "127.0.0.1:1433");
        let o = MssqlOptions::parse("MSSQL://sa:x@[::1]:1433/db").unwrap();
        assert_eq!(o.addr(), "[::1]:1433");
        let o =
            MssqlOptions::parse("sqlserver://sa:x@db?instance=SQLEXPRESS&encrypt=strict").unwrap();
        // A named instance without a port is resolved through SQL Browser.
        assert_eq!(o.addr(), "db:1434");
    }

    #[test]
    fn url_credentials_are_percent_decoded() {
        assert_eq!(decode("p%40ss%3Bw%2Brd", "x").unwrap(), "p@ss;w+rd");
        assert_eq!(
            decode("a+b&c=d", "x").unwrap(),
            "a+b&c=d",
            "no form decoding"
        );
        assert!(decode("%FF", "x").is_err());
        assert_eq!(decode("%E6%97%A5", "x").unwrap(), "日");
    }

    #[test]
    fn bad_strings_are_typed_errors_never_panics() {
        assert!(err("").contains("empty"));
        assert!(err("   ").contains("empty"));
        assert!(err("just some words").contains("ADO.NET"));
        assert!(err("postgres://u:p@h/db").contains("scheme"));
        assert!(err("sqlserver://").contains("host") || err("sqlserver://").contains("URL"));
        assert!(err("sqlserver://db.internal/orders").contains("user"));
        assert!(err("sqlserver://sa:x@db/a/b").contains("database"));
        assert!(err("sqlserver://sa:x@db?encrypt=maybe").contains("encrypt"));
        assert!(err("sqlserver://sa:x@db?trustServerCertificate=perhaps").contains("true or false"));
        assert!(
            err("sqlserver://sa:x@db?trustservercertificate=true&trustServerCertificateCA=/x")
                .contains("mutually exclusive")
        );
        assert!(err("sqlserver://sa:x@db?colour=blue").contains("colour"));
        assert!(err("sqlserver://sa:x@db:99999").contains("URL"));
        assert!(err("Server=tcp:db,notaport;User Id=sa;Password=x").contains("ADO.NET"));
        assert!(err("Server=tcp:db,1433;TrustServerCertificate=maybe").contains("ADO.NET"));
        // A broad sweep of junk: typed errors or successful parses, no panic.
        let junk = [
            "=",
            ";",
            ";;;=;;",
            "Server=",
            "Server=;",
            "server=tcp:",
            "server=tcp:,",
            "server=tcp:h,",
            "server=tcp:h\\",
            "server={unclosed",
            "server='unclosed",
            "server=\"x",
            "a=b=c",
            "jdbc:sqlserver://",
            "jdbc:sqlserver://;",
            "jdbc:sqlserver://h:x",
            "sqlserver://@",
            "sqlserver://:@:",
            "sqlserver://u:p@h:0",
            "sqlserver://u:p@h/%ZZ",
            "mssql://u@h?encrypt",
            "server=tcp:h,1433;encrypt=strict",
            "server=tcp:h;IntegratedSecurity=true",
            "\u{0}",
            "server=\u{0}",
            "ü=ö;Server=日本",
        ];
        for s in junk {
            let _ = MssqlOptions::parse(s);
        }
    }

    #[test]
    fn the_password_never_appears_in_errors_or_debug() {
        let secret = "Sup3rS3cret";
        for s in [
            format!("sqlserver://sa:{secret}@db?colour=blue"),
            format!("sqlserver://sa:{secret}@db/a/b"),
            format!("Server=tcp:db,notaport;User Id=sa;Password={secret}"),
        ] {
            let e = MssqlOptions::parse(&s).unwrap_err();
            let mut text = format!("{e} {e:?}");
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                text.push_str(&s.to_string());
                source = s.source();
            }
            assert!(!text.contains(secret), "{text}");
        }
        let o = MssqlOptions::parse(&format!("sqlserver://sa:{secret}@db")).unwrap();
        assert!(!format!("{o:?}").contains(secret));
    }

    #[test]
    fn database_mapping() {
        let o = MssqlOptions::parse("Server=db;User Id=sa;Password=x;Database=orders").unwrap();
        let id = DatabaseId::new("tenant_7");
        assert_eq!(o.database_for(&id).as_deref(), Some("tenant_7"));
        let o = o.fixed_database("main");
        assert_eq!(o.database_for(&id).as_deref(), Some("main"));
        let o = o.database_mapping(DatabaseMapping::ConnectionString);
        assert_eq!(o.database_for(&id), None);
        let o = o.database_mapping(DatabaseMapping::custom(|id| format!("t_{id}")));
        assert_eq!(o.database_for(&id).as_deref(), Some("t_tenant_7"));
        assert_eq!(format!("{:?}", o.get_database_mapping()), "Custom(..)");
    }

    #[test]
    fn timings_and_release_window() {
        let o = MssqlOptions::parse("Server=db;User Id=sa;Password=x").unwrap();
        assert_eq!(o.get_acquire_slice(), DEFAULT_ACQUIRE_SLICE);
        assert_eq!(o.lock_release_window(), Some(Duration::from_secs(30)));
        // Below the coordinator's default connect deadline of 10 s, so the
        // typed ConnectTimeout is the one reported.
        assert!(o.get_connect_timeout() < Duration::from_secs(10));
        assert_eq!(o.get_loss_signal_bound(), DEFAULT_LOSS_SIGNAL_BOUND);
        let o = o
            .acquire_slice(Duration::ZERO)
            .server_keepalive(Some(Duration::from_secs(10)))
            .connect_timeout(Duration::from_secs(3));
        assert_eq!(o.get_acquire_slice(), Duration::from_millis(10), "clamped");
        assert_eq!(o.lock_release_window(), Some(Duration::from_secs(10)));
        assert_eq!(o.get_connect_timeout(), Duration::from_secs(3));
        assert_eq!(o.server_keepalive(None).lock_release_window(), None);
    }

    #[test]
    fn map_config_updates_the_address() {
        let o = MssqlOptions::parse("Server=db;User Id=sa;Password=x").unwrap();
        let o = o.map_config(|c| c.port(1555));
        assert_eq!(o.addr(), "db:1555");
    }
}
