//! SQL Server driver of [shardlock](https://docs.rs/shardlock): session-owned
//! application locks (`sp_getapplock … @LockOwner = 'Session'`) on one
//! dedicated TDS connection per database, over
//! [tiberius](https://docs.rs/tiberius). Use it through `shardlock` with
//! feature `sqlserver`; this crate is its implementation.
//!
//! ```no_run
//! use shardlock_core::{DatabaseId, Driver, LockKey, NodeId, Session};
//! use shardlock_sqlserver::{MssqlDriver, MssqlOptions};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let options: MssqlOptions =
//!     "Server=tcp:db.internal,1433;User Id=app;Password=secret;TrustServerCertificate=true"
//!         .parse()?;
//! let driver = MssqlDriver::new(options);
//! let mut session = driver
//!     .connect(&DatabaseId::new("orders"), &NodeId::generate())
//!     .await?;
//! let keys = [LockKey::new("orders:public:projection")?, LockKey::new("orders:public:mailer")?];
//! let granted = session.try_acquire(&keys).await?; // one round trip
//! println!("granted: {granted:?}");
//! session.verify().await?; // one round trip: APPLOCK_MODE of every held key
//! session.close().await?; // releases everything, closes the connection
//! # Ok(())
//! # }
//! ```
//!
//! # Connection strings
//!
//! [`MssqlOptions`] parses three forms (also through [`str::parse`]); a bad
//! string is a typed [`MssqlError::InvalidConnectionString`], never a panic,
//! and the message never repeats the password.
//!
//! | form | example |
//! |---|---|
//! | ADO.NET | `Server=tcp:db.internal,1433;User Id=app;Password=secret;Encrypt=true;TrustServerCertificate=false` |
//! | JDBC | `jdbc:sqlserver://db.internal:1433;user=app;password=secret` |
//! | URL | `sqlserver://app:secret@db.internal:1433/orders?trustServerCertificate=true` (or `mssql://`) |
//!
//! ADO.NET and JDBC keys are tiberius' (see [`tiberius::Config::from_ado_string`]):
//! `Server` (`tcp:host,port` or `host\instance`), `User Id`, `Password`,
//! `Database`, `Encrypt` (`true`, `false`, `strict`, `DANGER_PLAINTEXT`;
//! default: required), `TrustServerCertificate`, `TrustServerCertificateCA`,
//! `HostNameInCertificate`, `MultiSubnetFailover`. In URLs, user and password
//! are percent-decoded, the path is the database, and the query takes
//! `encrypt`, `trustServerCertificate`, `trustServerCertificateCA`,
//! `hostNameInCertificate` and `instance`; other parameters are an error. A
//! named instance without a port is resolved through SQL Server Browser
//! (UDP 1434). Only SQL Server authentication (user and password) and Azure AD
//! tokens (through [`MssqlOptions::map_config`]) are supported; Windows
//! authentication is not built in.
//!
//! The driver always sets the login's application name to
//! `shardlock:<node-id>` (cut to 128 characters), so
//! `sys.dm_exec_sessions.program_name` shows which node holds what.
//!
//! | option | default | meaning |
//! |---|---|---|
//! | [`database_mapping`](MssqlOptions::database_mapping) | [`DatabaseMapping::SameServer`] | the `DatabaseId` is the database name (overrides the string's `Database`) |
//! | [`acquire_slice`](MssqlOptions::acquire_slice) | 1 s | one server-side wait of a blocking `acquire` |
//! | [`server_keepalive`](MssqlOptions::server_keepalive) | 30 s | the server's TCP `KeepAlive`; the [`lock_release_window`](shardlock_core::Driver::lock_release_window) |
//! | [`connect_timeout`](MssqlOptions::connect_timeout) | 8 s | TCP, TLS, login and checks; below the coordinator's 10 s connect deadline so the typed [`MssqlError::ConnectTimeout`] is the one reported |
//! | [`loss_signal_bound`](MssqlOptions::loss_signal_bound) | 50 ms | the loss detection bound stated in [`capabilities`](shardlock_core::Driver::capabilities) (see "Loss signal") |
//!
//! TLS uses the platform library (`native-tls`: OpenSSL on Linux, which must
//! be installed to build: `pkg-config` and `libssl-dev` on Debian).
//!
//! # How keys map to application locks
//!
//! - **Resource names.** A key named `N` is the resource `shardlock:v1:N`
//!   ([`resource_name`]). `@Resource` is `nvarchar(255)`, so a longer name
//!   keeps its first characters and ends with `~` and the 16 hex digits of
//!   the key's id: [`LockKey::bounded_resource_name`](shardlock_core::LockKey::bounded_resource_name)`(255)`,
//!   cut again by UTF-16 code units when the name has characters outside the
//!   Basic Multilingual Plane (the server counts UTF-16 units, not
//!   characters).
//! - **Case.** Resource names are compared **binary**, so case-sensitively,
//!   whatever the database collation: `Orders` and `orders` are two locks
//!   (unlike, say, table names in a case-insensitive database).
//! - **Scope.** A lock lives in the database the session is in (the
//!   database id qualifies the resource) and belongs to the `public`
//!   principal (`@DbPrincipal` left at its default). Sessions exclude each
//!   other only in the same database.
//! - **Identity on the server.** The lock manager keeps the first 32
//!   characters of a resource name in plain text and a hash of the rest, so
//!   `sys.dm_tran_locks` shows `shardlock:v1:` and the first 19 characters of
//!   the key name. Two names that share those 32 characters could hash alike
//!   and then exclude each other: harmless for safety (never two holders),
//!   at worst two keys always end up on the same node.
//!
//! # Differences from the Postgres driver
//!
//! | | Postgres | SQL Server |
//! |---|---|---|
//! | lock | `pg_try_advisory_lock(bigint)` on the key's 64-bit id | `sp_getapplock` on the key's name |
//! | stacking | a second lock on a held key stacks | also stacks: the session tracks holds and never asks twice |
//! | batch | `unnest($1::bigint[])`, one round trip | one JSON array parameter read with `OPENJSON`, one round trip (SQL Server 2016+, compatibility level ≥ 130); otherwise one parameter per name, at most 2000 per batch, so `ceil(n / 2000)` round trips |
//! | blocking wait | `pg_advisory_lock`, cancelled by the server | `sp_getapplock` with `@LockTimeout` = the acquire slice (1 s), repeated; a cancel is seen within one slice |
//! | release not held | returns false | raises error 1223: the driver answers `false` without calling it |
//! | verify | `pg_locks` | `APPLOCK_MODE('public', name, 'Session')` = `Exclusive` for every held key, plus `@@SPID` unchanged |
//! | vanished node | server keepalives set per session | only the server's endpoint `KeepAlive` (default 30 s, set by the DBA) |
//! | loss signal | see that driver | the socket, read continuously beneath tiberius (see "Loss signal") |
//!
//! # When a node vanishes
//!
//! A process that dies (even `kill -9`) has its socket closed by its kernel:
//! the server ends the session and frees its locks at once. A host that
//! vanishes, or a network cut, is noticed by the server only through TCP
//! keepalive on its endpoint: `KeepAlive` is 30 000 ms by default, with probes
//! every 1 000 ms, so about 35 s on Windows. SQL Server has no per-session
//! keepalive settings a client could set (unlike Postgres'
//! `tcp_keepalives_*`), and keepalive on the client's socket does not make
//! the server notice sooner, so the driver sets none. It reports
//! [`MssqlOptions::server_keepalive`] (default 30 s, the least time the server
//! keeps a vanished session) as its
//! [`lock_release_window`](shardlock_core::Driver::lock_release_window): the
//! coordinator refuses timings (poll interval + lock-loss timeout + stop
//! timeout, 15 s by default) that would let a cut-off node run past it. If
//! your DBA lowered `KeepAlive`, set the option to match.
//!
//! # Loss signal
//!
//! A server that ends a session (`KILL`, a restart, an availability-group
//! failover, an idle timeout) frees its application locks at once, and
//! another node may take them at its next poll. tiberius reads the socket
//! only during a request, so the driver slips its own stream beneath it:
//! a pump task reads the socket continuously into a bounded in-memory pipe
//! that tiberius reads, and fires the session's
//! [`signals`](shardlock_core::Session::signals)' `lost` token the moment
//! the socket reports end-of-file or an error, with no statement and no
//! polling. Bytes that arrive while the session is idle (the server's
//! message before it closes) stay in the pipe for tiberius; TLS runs inside
//! tiberius, above the pump. Named instances resolved through SQL Server
//! Browser and routed (Azure redirect) connections are watched the same way.
//!
//! | | |
//! |---|---|
//! | support | [`Support::Emulated`](shardlock_core::Support::Emulated) (the driver watches; the server sends nothing special) |
//! | bound | the time for the server's FIN or RST to arrive, stated as [`DEFAULT_LOSS_SIGNAL_BOUND`] (50 ms, by construction; configurable) |
//! | not a loss | [`close`](shardlock_core::Session::close) and dropping the session (the driver's own close) |
//! | not covered | a silent end: a network cut or a host that vanishes without a FIN sends nothing to read; the coordinator's verify deadline fences the node, within the server's `KeepAlive` window (below) |
//!
//! Also signalled: a request that fails in a way that leaves the connection
//! or its locks unknown (the connection task then drops the connection), and
//! the connection task stopping because its runtime shut down.
//!
//! # Dropped futures and the connection task
//!
//! Each session's connection is owned by a task that finishes every request
//! it started (a half-read TDS response cannot be resumed). A dropped
//! `try_acquire` or `acquire` future therefore never leaves a lock behind:
//! the task releases whatever the abandoned request was granted before it
//! runs the session's next request. A `try_acquire` dropped mid-flight
//! still poisons the session (its next call answers `SessionLost` and the
//! loss signal fires), as the driver contract wants of every driver; a
//! dropped `acquire`, `release` or `verify` leaves it usable. A dropped session closes its connection
//! from the task, without blocking, on any runtime. The task runs on the
//! tokio runtime that opened the session: keep that runtime running while the
//! session is in use (if it shuts down, the connection closes and the session
//! reports itself lost).

//!
//! # Projections: checkpoints and session-fenced transactions
//!
//! [`MssqlCheckpoints`] is the SQL Server checkpoint store, opened like
//! every other store: `MssqlCheckpoints::connect(&options, &database)` (the
//! driver's options and the id whose locks the projection uses), answering
//! `Result<_, CheckpointError>`. It keeps the table `subscriptions
//! (subscription_name nvarchar(450) primary key, compared binary,
//! last_position bigint, epoch bigint, updated_at datetime2)`, created when
//! missing, with the semantics of every store: a claim bumps the epoch
//! (`MERGE … WITH (HOLDLOCK) … OUTPUT`, so two claimants never get the same
//! epoch and a missing row is inserted once); a save is conditional on the
//! epoch (`UPDATE … WHERE epoch = @P2`) and never moves backwards; a refused
//! save writes nothing and answers `NotClaimed` or `FencedOff`. It holds one
//! connection (tiberius has no pool) behind an async mutex, reopened when it
//! breaks.
//!
//! To commit a projection's rows with its checkpoint, use the leader's
//! **session-fenced transaction**: [`MssqlSession::transaction`] opens
//! `SET XACT_ABORT ON; BEGIN TRANSACTION` on the very connection whose
//! server session owns the leadership lock; write through
//! [`MssqlTransaction::execute`], then
//! [`commit_checkpoint`](MssqlTransaction::commit_checkpoint) (or
//! [`MssqlCheckpoints::save_in`] and [`commit`](MssqlTransaction::commit)).
//! A leader whose session was `KILL`ed cannot commit: `KILL` rolls the open
//! transaction back before the session ends, and session-owned application
//! locks are freed only when the session ends, so no follower can claim
//! before the rollback; the commit runs on that session and is refused as
//! soon as the loss signal fired (see [`MssqlTransaction`]).
//! [`MssqlCheckpoints::save_in`] also takes a tiberius client of your own
//! inside your own transaction ([`MssqlExecutor`]).
//!
//! ```no_run
//! use shardlock_core::{acquire_leadership, projection_leadership_key, CheckpointStore, DatabaseId, NodeId};
//! use shardlock_sqlserver::{MssqlCheckpoints, MssqlDriver, MssqlOptions};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! let options = MssqlOptions::parse("Server=tcp:db.internal,1433;User Id=app;Password=secret")?;
//! let database = DatabaseId::new("orders");
//! let store = MssqlCheckpoints::connect(&options, &database).await?;
//! let key = projection_leadership_key("orders-view")?;
//! let mut guard =
//!     acquire_leadership(&MssqlDriver::new(options), &database, &NodeId::generate(), key).await?;
//! let claimed = store.claim("orders-view").await?;
//! let mut tx = guard.leader_session()?.transaction().await?;
//! tx.execute("UPDATE totals SET amount = amount + @P1 WHERE id = 1", &[&42i64]).await?;
//! tx.commit_checkpoint("orders-view", claimed.epoch, 1).await?;
//! # Ok(())
//! # }
//! ```
//!
//! # `shardlock status`
//!
//! `shardlock status --url "server=tcp:host,1433;…"` (or `--driver
//! sqlserver`) lists the session-owned application locks of the database
//! from `sys.dm_tran_locks` (holder = the session's `program_name`,
//! `shardlock:<node>`), mapping the 32 characters the view shows of each
//! resource name ([`tran_locks_name`], [`applock_description_name`]) back to
//! the names the nodes' distributors build. Reading the view needs `VIEW
//! SERVER STATE` (`VIEW SERVER PERFORMANCE STATE` on SQL Server 2022, `VIEW
//! DATABASE STATE` on Azure SQL Database); without it, or on a server
//! without the view, status falls back to `APPLOCK_TEST(N'public', name,
//! N'Exclusive', N'Session')` over those names, which tells which are held
//! but not by whom, and says which source it used (also in `--json`).

#![doc(test(attr(deny(warnings))))]

mod checkpoints;
mod connection;
mod driver;
mod error;
#[cfg(test)]
mod fake;
mod fenced;
mod options;
mod session;
mod sql;
mod watch;

pub use checkpoints::{MssqlCheckpoints, MAX_SUBSCRIPTION_NAME};
pub use connection::TdsClient;
pub use driver::MssqlDriver;
pub use error::{AppLockFailure, MssqlError};
pub use fenced::{MssqlExecutor, MssqlTransaction};
pub use options::{
    MssqlOptions, DEFAULT_ACQUIRE_SLICE, DEFAULT_CONNECT_TIMEOUT, DEFAULT_LOSS_SIGNAL_BOUND,
    DEFAULT_SERVER_KEEPALIVE,
};
pub use session::MssqlSession;
/// Which database a [`DatabaseId`](shardlock_core::DatabaseId) locks in: the
/// one rule every driver shares, re-exported from `shardlock-core`.
pub use shardlock_core::DatabaseMapping;

/// The TDS client this driver is built on, re-exported so users name the same
/// version (e.g. for [`MssqlOptions::map_config`]).
pub use tiberius;

/// The `sp_getapplock` resource name of `key`: `shardlock:v1:<name>`, at most
/// 255 UTF-16 code units (longer names end with `~<16 hex digits of the id>`).
///
/// Useful to find a key in `sys.dm_tran_locks` or to take the same lock from
/// T-SQL.
///
/// ```
/// use shardlock_core::LockKey;
///
/// let key = LockKey::new("orders:public:projection")?;
/// assert_eq!(shardlock_sqlserver::resource_name(&key), "shardlock:v1:orders:public:projection");
/// let long = LockKey::new("x".repeat(300))?;
/// assert!(shardlock_sqlserver::resource_name(&long).ends_with(&format!("~{:016x}", long.id_u64())));
/// # Ok::<(), shardlock_core::Error>(())
/// ```
pub fn resource_name(key: &shardlock_core::LockKey) -> String {
    sql::resource_name(key)
}

/// How many characters of a resource name the lock manager keeps in plain
/// text: `sys.dm_tran_locks.resource_description` shows an application lock
/// as `<principal id>:<up to 32 characters of the name>:(<hash>)`
/// (<https://learn.microsoft.com/sql/relational-databases/system-dynamic-management-views/sys-dm-tran-locks-transact-sql>,
/// "Resource description format").
pub const TRAN_LOCKS_NAME_CHARS: usize = 32;

/// The part of `key`'s resource name that `sys.dm_tran_locks` shows: its
/// first [`TRAN_LOCKS_NAME_CHARS`] characters. Keys whose resource names
/// share those characters look alike there.
///
/// ```
/// use shardlock_core::LockKey;
///
/// let key = LockKey::new("main:app:orders:00")?;
/// assert_eq!(shardlock_sqlserver::tran_locks_name(&key), "shardlock:v1:main:app:orders:00");
/// let long = LockKey::new("main:app:a-rather-long-lock-set-name")?;
/// assert_eq!(shardlock_sqlserver::tran_locks_name(&long), "shardlock:v1:main:app:a-rather-l");
/// # Ok::<(), shardlock_core::Error>(())
/// ```
pub fn tran_locks_name(key: &shardlock_core::LockKey) -> String {
    resource_name(key)
        .chars()
        .take(TRAN_LOCKS_NAME_CHARS)
        .collect()
}

/// The resource-name part of an application lock's
/// `sys.dm_tran_locks.resource_description`
/// (`<principal id>:<name>:(<hash>)`, the name possibly in brackets), or
/// `None` when `description` does not have that shape. Compare it with
/// [`tran_locks_name`].
///
/// ```
/// assert_eq!(
///     shardlock_sqlserver::applock_description_name("0:[shardlock:v1:main:app:orders:00]:(8d4e2f0a)"),
///     Some("shardlock:v1:main:app:orders:00")
/// );
/// assert_eq!(shardlock_sqlserver::applock_description_name("5:form1:(1f2e3d4c)"), Some("form1"));
/// assert_eq!(shardlock_sqlserver::applock_description_name("1:1234:5"), None);
/// ```
pub fn applock_description_name(description: &str) -> Option<&str> {
    let description = description.trim();
    let (principal, rest) = description.split_once(':')?;
    if principal.is_empty() || !principal.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let (name, hash) = rest.rsplit_once(':')?;
    if !(hash.starts_with('(') && hash.ends_with(')')) {
        return None;
    }
    let name = name.trim_end();
    Some(
        name.strip_prefix('[')
            .and_then(|n| n.strip_suffix(']'))
            .unwrap_or(name),
    )
}
