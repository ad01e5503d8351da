//! PostgreSQL driver of [shardlock](https://docs.rs/shardlock): each session
//! is **one dedicated [`PgConnection`](sqlx::postgres::PgConnection)** (never
//! a pooled one) holding session-level advisory locks, keyed by
//! [`LockKey::id`](shardlock_core::LockKey::id) as a `bigint`. Use it
//! through `shardlock` with feature `postgres`.
//!
//! ```no_run
//! use shardlock_core::{CancellationToken, DatabaseId, Driver, LockKey, NodeId, Session};
//! use shardlock_postgres::{PgDriver, PgOptions};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> shardlock_core::Result<()> {
//! let driver = PgDriver::new(PgOptions::parse("postgres://app:secret@localhost:5432/app")?);
//! let mut session = driver.connect(&DatabaseId::new("app"), &NodeId::generate()).await?;
//! let key = LockKey::for_shard("app", "public", "orders:all")?;
//! if session.try_acquire(&[key.clone()]).await?[0] {
//!     // ... run the shard; call `verify` every cycle to prove the lock is still held ...
//!     session.verify().await?;
//!     session.release(&key).await?;
//! }
//! // Leader election: wait in the database until the key is free.
//! let granted = session.acquire(&key, &CancellationToken::new()).await?;
//! assert!(granted);
//! session.close().await?;
//! # Ok(())
//! # }
//! ```
//!
//! # How it locks
//!
//! | operation | statement | round trips |
//! |---|---|---|
//! | `try_acquire(keys)` | `array_agg(pg_try_advisory_lock(k) ORDER BY i)` over `unnest($1::bigint[]) WITH ORDINALITY AS t(k, i)`, only for keys not held yet (one key: `pg_try_advisory_lock($1)`) | 1 (0 if all held) |
//! | `acquire(key, cancel)` | `pg_advisory_lock($1)`; on cancel or drop, `pg_cancel_backend(pid)` from a side connection, then release a grant that raced it | 1 + cancel |
//! | `release(key)` | `pg_advisory_unlock($1)` for a held key | 1 (0 if not held) |
//! | `release_all` / `close` | `pg_advisory_unlock_all()` | 1 |
//! | `verify` | backend pid + held keys missing from `pg_locks` | 1 |
//!
//! PostgreSQL stacks session locks (taking a key twice needs two unlocks), so
//! the session tracks what it holds and never asks for a key twice.
//!
//! The `bigint` a key locks is its [`LockKey::id`](shardlock_core::LockKey::id),
//! the same in every process and version, so an operator can find a lock in
//! `pg_locks` (`classid` holds the high 32 bits, `objid` the low 32 bits) or
//! take it by hand with `pg_advisory_lock`:
//!
//! ```
//! use shardlock_core::LockKey;
//!
//! let key = LockKey::new("orders-projection")?;
//! assert_eq!(key.id(), 0x5886_0d97_fd87_2fa4); // pg_advisory_lock(6378800868661604260)
//! assert_eq!(key.id(), 6_378_800_868_661_604_260);
//! # Ok::<(), shardlock_core::Error>(())
//! ```
//!
//! # Options
//!
//! [`PgOptions`] is built from a URL (`postgres://user:password@host:5432/db`,
//! with sqlx's query parameters such as `sslmode`) or with its builder
//! methods:
//!
//! | parameter | default | what it does |
//! |---|---|---|
//! | host, port, user, password, TLS | from the URL, else `PGHOST`, `PGPORT`, `PGUSER`, ... | where and as whom to connect ([`PgOptions::map_connect_options`] for the rest of sqlx's options) |
//! | [`database_mapping`](PgOptions::database_mapping) | [`DatabaseMapping::SameServer`] | which database a shardlock `DatabaseId` locks in: the database of that name on the same server; [`DatabaseMapping::Fixed`] puts every id in one database (single tenant), [`DatabaseMapping::custom`] computes it. The URL's own database is used only by `Fixed` if you pass it there |
//! | `application_name` | `shardlock:<node-id>`, cut to 63 bytes | shows the node in `pg_stat_activity` (set at connect, replaces the URL's) |
//! | [`keepalives`](PgOptions::keepalives) | idle 10 s, interval 5 s, count 3 | server-side `tcp_keepalives_idle/interval/count` of each session, plus `tcp_user_timeout` = the window below; `None` leaves the server's settings |
//! | lock release window | idle + interval × count = **25 s** | [`Driver::lock_release_window`](shardlock_core::Driver::lock_release_window): how long the server keeps a vanished node's locks at least; must exceed the coordinator's poll + lock-loss timeout + stop timeout (5 + 5 + 5 = 15 s by default), which the coordinator checks at build time |
//! | [`client_connection_check_interval`](PgOptions::client_connection_check_interval) | 2 s | PostgreSQL 14+: a backend waiting in `pg_advisory_lock` notices within this time that its client died, instead of taking the lock for nobody |
//! | [`connect_timeout`](PgOptions::connect_timeout) | 10 s | limit for opening a session (and a side connection that cancels a wait) |
//! | `statement_timeout`, `lock_timeout`, `idle_session_timeout` | set to 0 on each session | role or database defaults would cancel a blocking wait or end an idle lock holder |
//!
//! At connect the driver also checks that the server is PostgreSQL (not a
//! look-alike such as CockroachDB, whose advisory-lock functions do not
//! lock) of version 12 or newer ([`MIN_SERVER_VERSION_NUM`]), and that two
//! statements run in the same server process: a transaction-pooling proxy
//! (PgBouncer with `pool_mode = transaction`) is refused with
//! [`PgError::TransactionPooling`], because session locks belong to one
//! server process. A pooler may hand back the same process by chance, so
//! [`verify`](shardlock_core::Session::verify) also compares the backend pid
//! every time. Session-mode pools work.
//!
//! # Sizing the lock table
//!
//! Advisory locks live in PostgreSQL's shared lock table, which holds about
//! `max_locks_per_transaction × (max_connections + max_prepared_transactions)`
//! locks for the whole server: 64 × (100 + 0) = 6,400 with the defaults,
//! shared with the ordinary locks of every query. Nodes that together hold
//! thousands of keys can fill it; PostgreSQL then fails with `53200
//! out_of_shared_memory`, which this driver reports as
//! [`PgError::LockTableFull`] (naming the setting) after releasing what the
//! failed batch took. Raise `max_locks_per_transaction` (a restart is needed)
//! so the table covers the keys all nodes hold at once plus the ordinary
//! load. Connections are O(databases) per node, never O(keys).
//!
//! # Failure and takeover
//!
//! - A node that crashes (kill -9) closes its sockets: the server ends its
//!   sessions and another node can take the keys within milliseconds.
//! - A node cut off by the network: the server frees its locks after the
//!   release window (25 s by default); the node's coordinator stops the work
//!   earlier, when `verify` cannot succeed within its lock-loss timeout.
//! - [`PgSession::backend_pid`] lets an operator end a session with
//!   `pg_terminate_backend`; the next `verify` reports
//!   [`Error::SessionLost`](shardlock_core::Error::SessionLost).
//!
//! # Features
//!
//! - `tls` (off): TLS to the server through rustls (ring, webpki roots);
//!   choose it with `sslmode` in the URL.
//!
//! The crate re-exports [`sqlx`], so users name the same version.
#![doc(test(attr(deny(warnings))))]

mod checkpoints;
mod connection;
mod error;
mod options;
mod session;
mod sql;
mod wait;

pub use checkpoints::PgCheckpoints;
pub use connection::{PgDriver, MIN_SERVER_VERSION_NUM};
pub use error::PgError;
pub use options::{
    DatabaseMapping, Keepalives, PgOptions, DEFAULT_CLIENT_CONNECTION_CHECK_INTERVAL,
    DEFAULT_CONNECT_TIMEOUT,
};
pub use session::PgSession;

/// The sqlx this driver is built on, for its connect options and errors.
pub use sqlx;
