//! MySQL and MariaDB driver of [shardlock](https://docs.rs/shardlock): each
//! session is **one dedicated
//! [`MySqlConnection`](sqlx::mysql::MySqlConnection)** (never a pooled one)
//! holding `GET_LOCK` named locks, plus a watcher connection that signals
//! the moment the server ends the session. Use it through `shardlock` with
//! feature `mysql`.
//!
//! ```no_run
//! use shardlock_core::{CancellationToken, DatabaseId, Driver, LockKey, NodeId, Session};
//! use shardlock_mysql::{MySqlDriver, MySqlOptions};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let options = MySqlOptions::parse("mysql://app:secret@localhost:3306/app")?;
//! let driver = MySqlDriver::new(options);
//! let mut session = driver.connect(&DatabaseId::new("main"), &NodeId::generate()).await?;
//! let lost = session.signals().lost().clone(); // fires if the server ends the session
//! let key = LockKey::for_shard("main", "public", "orders:all")?;
//! if session.try_acquire(&[key.clone()]).await?[0] {
//!     // ... run the shard until `lost` fires; call `verify` every cycle ...
//!     session.verify().await?;
//!     session.release(&key).await?;
//! }
//! // Leader election: wait in the database until the key is free.
//! let granted = session.acquire(&key, &CancellationToken::new()).await?;
//! assert!(granted && !lost.is_cancelled());
//! session.close().await?;
//! # Ok(())
//! # }
//! ```
//!
//! # How it locks
//!
//! Every statement is one `COM_QUERY` (text protocol, see [`lock_name`] for
//! how names are written): one round trip each, for any batch size.
//!
//! | operation | statement | round trips |
//! |---|---|---|
//! | `connect` | main and watcher connections opened at once; on each: `VERSION()`, `CONNECTION_ID()`, then the session settings; on the main one `GET_LOCK` of a random *liveness lock*; on the watcher a blocking `GET_LOCK` of it, left waiting | 3 + 2, handshakes overlapped |
//! | `try_acquire(keys)` | `SELECT GET_LOCK(name, 0), ...` for the keys not held yet, one `SELECT` per 1,000 keys, all in one command | 1 (0 if all held) |
//! | `acquire(key, cancel)` | `SELECT GET_LOCK(name, 31536000)`; on cancel or drop, `KILL QUERY <connection id>` from a side connection, then release a grant that raced it | 1 + cancel |
//! | `release` / `release_many` / `release_all` | `SELECT RELEASE_LOCK(name), ...` for the held keys only — never `RELEASE_ALL_LOCKS()`, which would free the liveness lock and signal a false loss | 1 (0 if none held) |
//! | `release_announced` | the default: `release_many`, no announcement (MySQL has no `NOTIFY`; other nodes find the keys free at their next poll) | 1 |
//! | `probe(keys)` | `SELECT COALESCE(IS_USED_LOCK(name) <> CONNECTION_ID(), 0), ...` for keys not held here; takes nothing | 1 (0 if all held here) |
//! | `verify` | `SELECT CONNECTION_ID(), IS_USED_LOCK(liveness) <=> CONNECTION_ID()` and `IS_USED_LOCK(name) <=> CONNECTION_ID()` per held key | 1 |
//! | `close` / drop | stop the watcher, then `DO RELEASE_ALL_LOCKS()` and close | 1 |
//!
//! [`MySqlSession::round_trips`] counts the commands of the main
//! connection. MySQL counts a name taken twice as two holds, so the session
//! tracks what it holds (core's [`Holds`](shardlock_core::Holds)) and never
//! asks for a key twice.
//!
//! # Options
//!
//! [`MySqlOptions`] is built from a URL (`mysql://user:password@host:3306/db`
//! or `mariadb://...`, with sqlx's query parameters such as `ssl-mode`) or
//! with its builder methods:
//!
//! | setting | default | what it does |
//! |---|---|---|
//! | host, port, user, password, TLS | from the URL | where and as whom to connect ([`MySqlOptions::map_connect_options`] for the rest of sqlx's options) |
//! | [`database_mapping`](MySqlOptions::database_mapping) | the URL's database; the id itself when the URL names none | which database a shardlock `DatabaseId` connects to. Named locks are server-wide, so two ids on one server share one lock space; key names include the database id, so they never collide |
//! | [`idle_timeout`](MySqlOptions::idle_timeout) | 60 s | the session's `wait_timeout`: the server ends a session idle that long (a node cut off by the network), freeing its locks |
//! | lock release window | = idle timeout | [`Driver::lock_release_window`](shardlock_core::Driver::lock_release_window): how long the server keeps a vanished node's locks, counted from its last statement; must exceed the coordinator's poll + lock-loss timeout + stop timeout (15 s by default), which the coordinator checks at build time. **A session held outside a coordinator must send a statement (e.g. `verify`) more often than this**, or the server ends it (the loss signal then fires) |
//! | [`net_timeout`](MySqlOptions::net_timeout) | 30 s | `net_read_timeout` and `net_write_timeout`: a client that stops reading or writing mid-command |
//! | [`connect_timeout`](MySqlOptions::connect_timeout) | 10 s | limit for opening a session (both connections) and a side connection that cancels a wait |
//! | statement time limits | `max_statement_time = 0` (MariaDB), `max_execution_time = 0` (MySQL) | role or global limits would end a blocking wait (the watcher's included) |
//!
//! Each connection also sets `@shardlock_node` to `shardlock:<node>`
//! (watcher: `shardlock:<node>:watch`); MySQL has no `application_name`.
//!
//! At connect the driver checks that the server is MySQL ≥ 5.7 or
//! MariaDB ≥ 10.0.2 (older ones keep one named lock per session) and not a
//! look-alike (TiDB, Vitess), else [`MySqlError::TooOld`] /
//! [`MySqlError::NotMySql`].
//!
//! Connections are O(databases) per node: **two per session** (the session
//! and its watcher), plus a transient side connection while a blocking
//! wait is being cancelled.
//!
//! # Failure and takeover
//!
//! - **The server ends the session** (`KILL`, `wait_timeout`, a restart):
//!   the server frees the session's locks at once, and the session's
//!   [`signals().lost()`](shardlock_core::Session::signals) fires without
//!   a statement: the watcher connection waits in `GET_LOCK` for the
//!   session's liveness lock, which the server grants it the moment the
//!   main connection ends. The stated bound is [`LOSS_DETECTION_BOUND`]
//!   (100 ms, loss signal emulated); the contract suite's clause 8
//!   measures it.
//! - **The watcher's own connection fails**: `lost` fires too
//!   (conservative: a killed watcher costs a needless reconnect, never an
//!   overlap). A graceful `close` or drop stops the watcher first.
//! - A node that crashes (kill -9) closes its sockets: the server ends its
//!   sessions and another node can take the keys within milliseconds.
//! - A node cut off by the network sees nothing: the server frees its locks
//!   after `wait_timeout`; the node's coordinator stops its work earlier,
//!   when `verify` cannot succeed within its lock-loss timeout.
//!
//! # Errors
//!
//! [`MySqlError`] implements [`DriverError`](shardlock_core::DriverError)
//! and goes through core's one mapping: a lost connection is
//! session-fatal; credentials, an unknown database, a server that is not
//! MySQL or too old, and bad options are configuration errors.
//!
//! # Features
//!
//! - `tls` (off): TLS to the server through rustls (ring, webpki roots).
//!
//! # Checkpoints
//!
//! [`MySqlCheckpoints`] keeps projection checkpoints (InnoDB table
//! `subscriptions`, with fencing epochs). It opens like every checkpoint
//! store: [`MySqlCheckpoints::connect`]`(&options, &database).await` from
//! the same inputs as the driver, or [`MySqlCheckpoints::from_pool`] with
//! the application's pool; [`MySqlCheckpoints::save_in`] saves inside the
//! application's own transaction.
//!
//! # Session-fenced transactions
//!
//! [`MySqlSession::transaction`] opens a [`MySqlTransaction`] on the
//! session's own connection, the one holding its locks: a projection
//! leader writes its rows and its checkpoint there and commits both at
//! once ([`MySqlTransaction::commit_checkpoint`]). A leader whose
//! connection was killed cannot commit a stale effect: the commit can only
//! run on that connection, and the server rolls a killed connection's
//! transaction back before it frees its named locks (`THD::cleanup` in
//! MariaDB's and MySQL's source; see [`MySqlTransaction`], "Why it
//! fences"), so a follower takes over only after the rollback. From a
//! leadership guard: `guard.leader_session()?.transaction().await?`.
//! **InnoDB tables only**: writes to a non-transactional table (MyISAM)
//! are neither atomic with the checkpoint nor rolled back.
//!
//! # Finding a node's sessions
//!
//! The watcher's waiting statement starts with a comment naming the node
//! and the session's connection, `/* shardlock:<node> session=<id> */`
//! (node characters other than `A-Z a-z 0-9 . _ : -` shown as `_`), so
//! `SHOW PROCESSLIST` tells which node holds which connection; `KILL <id>`
//! of the session ends it (the loss signal fires).
//!
//! The crate re-exports [`sqlx`], so users name the same version.
#![doc(test(attr(deny(warnings))))]

mod checkpoints;
mod connection;
mod error;
mod fenced;
mod options;
mod session;
mod sql;
mod wait;
mod watch;

pub use checkpoints::MySqlCheckpoints;
pub use connection::{MySqlDriver, LOSS_DETECTION_BOUND, MIN_MARIADB_VERSION, MIN_MYSQL_VERSION};
pub use error::{MySqlCause, MySqlError};
pub use fenced::MySqlTransaction;
pub use options::{
    MySqlOptions, DEFAULT_CONNECT_TIMEOUT, DEFAULT_IDLE_TIMEOUT, DEFAULT_NET_TIMEOUT,
};
pub use session::MySqlSession;
/// Core's mapping from shardlock database ids to databases, used by
/// [`MySqlOptions::database_mapping`].
pub use shardlock_core::DatabaseMapping;
pub use sql::{lock_name, MAX_LOCK_NAME_CHARS};

/// The sqlx this driver is built on, for its connect options and errors.
pub use sqlx;
