//! PostgreSQL driver of [shardlock](https://docs.rs/shardlock): each session
//! is **one dedicated connection** (never one shared through a pool)
//! holding session-level advisory locks, keyed by
//! [`LockKey::id`](shardlock_core::LockKey::id) as a `bigint`. Between
//! calls a task reads that connection, so the session signals the moment
//! the server ends it and hears the releases other nodes announce
//! (`LISTEN`/`NOTIFY`): **one connection per database a node locks in**.
//! Use it through `shardlock` with feature `postgres`.
//!
//! ```no_run
//! use shardlock_core::{CancellationToken, DatabaseId, Driver, LockKey, NodeId, Session};
//! use shardlock_postgres::{PgDriver, PgOptions};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // Locks in the database the URL names ("app"), whatever the id is called
//! // (the default mapping; see "Options" for one database per tenant).
//! let options = PgOptions::parse("postgres://app:secret@localhost:5432/app")?;
//! let driver = PgDriver::new(options);
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
//! | operation | statement | round trips |
//! |---|---|---|
//! | `connect` | one connection: server identity, session settings (+ pid again, for the pooling check), `LISTEN shardlock_release` | 3 |
//! | `try_acquire(keys)` | `array_agg(t.k)` over `unnest($1::bigint[]) AS t(k)` `WHERE NOT pg_try_advisory_lock(t.k)`: the keys denied (NULL when all were granted), only for keys not held yet (one key: `pg_try_advisory_lock($1)`) | 1 (0 if all held) |
//! | `acquire(key, cancel)` | `pg_advisory_lock($1)`; on cancel or drop, `pg_cancel_backend(pid)` from a side connection, then release a grant that raced it | 1 + cancel |
//! | `release(key)` | `pg_advisory_unlock($1)` for a held key | 1 (0 if not held) |
//! | `release_announced(keys, clean)` | the `release_many` unlock of the held keys and, in the same statement, `pg_notify('shardlock_release', payload)` per chunk of the keys actually released (see "Release hints") | 1 (0 if none held) |
//! | `probe(keys)` | one read of `pg_locks` (advisory, this database, granted, `objsubid = 1`, `pid IS DISTINCT FROM pg_backend_pid()`), `LEFT JOIN`ed to `unnest($1::bigint[]) WITH ORDINALITY`, for keys not held here; takes no lock | 1 (0 if all held here) |
//! | `release_many(keys)` / `release_all` | `array_agg(t.k)` over `unnest($1::bigint[]) AS t(k)` `WHERE NOT pg_advisory_unlock(t.k)`: the keys not released (NULL when all were), for the held keys only | 1 (0 if none held) |
//! | `verify` | `SELECT pg_backend_pid()` (the same live process), and at most every [`lock_check_interval`](PgOptions::lock_check_interval) (60 s; the first verify too) one read of `pg_locks` too: the held keys it no longer shows | 1 |
//! | `close` / drop | stop the idle reader, then `pg_advisory_unlock_all()` (if anything is held) and close | 1 |
//!
//! [`PgSession::round_trips`] counts the statements of the session,
//! for tests and metrics. PostgreSQL stacks session locks (taking a key
//! twice needs two unlocks), so the session tracks what it holds (core's
//! [`Holds`](shardlock_core::Holds)) and never asks for a key twice.
//!
//! The `bigint` a key locks is its [`LockKey::id`](shardlock_core::LockKey::id),
//! the same in every process and version, so an operator can find a lock in
//! `pg_locks` (`classid` holds the high 32 bits, `objid` the low 32 bits,
//! `objsubid` is 1) or take it by hand with `pg_advisory_lock`:
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
//! Tools that list a node's keys from `pg_locks` should filter
//! `objsubid = 1` (the `bigint` form).
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
//! | [`database_mapping`](PgOptions::database_mapping) | the URL's database ([`DatabaseMapping::ConnectionString`]); [`DatabaseMapping::SameServer`] when the URL names none | which database a shardlock `DatabaseId` locks in. **By default the database named in the URL (or `PGDATABASE`), for every id**; a URL without a database maps id `tenant_7` to database `tenant_7` on the URL's server. For one database per tenant with a URL that names one, set [`DatabaseMapping::SameServer`]; [`DatabaseMapping::Fixed`] names one database, [`DatabaseMapping::custom`] computes it. [`PgOptions::database_for`] tells where an id goes |
//! | `application_name` | `shardlock:<node-id>` (cancel side connection `…:cancel`), cut to 63 bytes | shows the node in `pg_stat_activity` (set at connect, replaces the URL's) |
//! | [`keepalives`](PgOptions::keepalives) | idle 10 s, interval 5 s, count 3 | server-side `tcp_keepalives_idle/interval/count` of the session's connection, plus `tcp_user_timeout` = the window below; `None` leaves the server's settings |
//! | lock release window | idle + interval × count = **25 s** | [`Driver::lock_release_window`](shardlock_core::Driver::lock_release_window): how long the server keeps a vanished node's locks at least; must exceed the coordinator's poll + lock-loss timeout + stop timeout (5 + 5 + 5 = 15 s by default), which the coordinator checks at build time |
//! | [`client_connection_check_interval`](PgOptions::client_connection_check_interval) | 2 s | PostgreSQL 14+: a backend waiting in `pg_advisory_lock` (a blocking acquire) notices within this time that its client died, instead of taking the lock for nobody |
//! | [`connect_timeout`](PgOptions::connect_timeout) | 10 s | limit for opening a session (a refused connection is retried until then: a server starting up refuses for a moment) and a side connection that cancels a wait |
//! | `statement_timeout`, `lock_timeout`, `idle_session_timeout` | set to 0 on the session's connection | role or database defaults would cancel a blocking wait or end an idle lock holder |
//!
//! At connect the driver also checks that the server is PostgreSQL (not a
//! look-alike such as CockroachDB, whose advisory-lock functions do not
//! lock) of version 12 or newer ([`MIN_SERVER_VERSION_NUM`]), and that two
//! statements run in the same server process: a transaction-pooling proxy
//! (PgBouncer with `pool_mode = transaction`) is refused with
//! [`PgError::TransactionPooling`], because session locks belong to one
//! server process. A pooler may hand back the same process by chance, so
//! [`verify`](shardlock_core::Session::verify) also compares the backend pid
//! every time. Session-mode pools work (each session takes one server
//! connection from the pool).
//!
//! # Sizing the lock table and connections
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
//! load.
//!
//! Connections are O(databases) per node, never O(keys): **one per
//! database** (the session, `shardlock:<node>`), plus a transient side
//! connection while a blocking wait is being cancelled. Size
//! `max_connections` for `nodes × databases` plus the application's own.
//! Through a session-mode PgBouncer each session takes one server
//! connection from the pool.
//!
//! # Release hints
//!
//! A node that gives sets back (it stops, or hands surplus to others when
//! balancing) releases with
//! [`release_announced`](shardlock_core::Session::release_announced): the
//! unlocking statement also runs `pg_notify` on [`RELEASE_CHANNEL`]
//! (`shardlock_release`), so the coordinators of the database's other
//! sessions wake at once instead of at their next poll
//! ([`Driver::capabilities`](shardlock_core::Driver::capabilities): release
//! hint native).
//!
//! - **Payload**: the released keys' ids in decimal, comma-separated,
//!   `c`-prefixed when handed over cleanly (the holder stopped the work
//!   first, so the next holder may skip its takeover delay), e.g.
//!   `c6378800868661604260,-6004255738539311188`. Numbers, not names: a
//!   name can be 255 bytes, an id at most 20, and the listener matches ids
//!   ([`ReleaseHints::take_clean`](shardlock_core::ReleaseHints::take_clean)).
//!   A payload must stay under PostgreSQL's 8000 bytes, so a release of
//!   many keys sends one notification per [`KEYS_PER_NOTIFICATION`] keys,
//!   all from the same statement. Only keys the server actually released
//!   are named; a release of nothing sends nothing.
//! - **Timing**: the unlocks take effect at once, the notifications are
//!   delivered when the statement's implicit transaction commits, so a
//!   listener that hears one finds the keys free.
//! - **Listening**: the session's own connection `LISTEN`s on the channel
//!   from `connect` on, and records what other sessions announce in its
//!   [`SessionSignals::release_hints`](shardlock_core::SessionSignals::release_hints)
//!   (its own announcements are recognised by the sender's backend pid and
//!   skipped). PostgreSQL delivers notifications to an idle backend: the
//!   idle reader (below) receives them between calls, and those that
//!   arrive during a call are recorded when it ends. Hints are only hints:
//!   a missed one costs one poll interval, and polling stays the fallback.
//!
//! # Failure and takeover
//!
//! - **The server ends the session** (`pg_terminate_backend`, a restart, a
//!   failover, an idle timeout, a crashed backend): PostgreSQL frees the
//!   session's locks at once, and the session's
//!   [`signals().lost()`](shardlock_core::Session::signals) fires within
//!   milliseconds, without a statement: between calls the session parks
//!   its connection with a task that reads it (sqlx's `PgListener`
//!   receive), so the server's goodbye and the closed socket arrive at
//!   once, and the task fires `lost` (`the server ended the session
//!   (backend <pid>)`). No polling, and no second connection: calls closer
//!   together than 2 ms take the connection straight back; after that the
//!   reader hands it back within one task hop. The coordinator cancels the session's agents on that signal,
//!   and takes sets over only after a takeover delay equal to the stated
//!   bound, [`LOSS_DETECTION_BOUND`] = **100 ms**
//!   ([`Driver::capabilities`](shardlock_core::Driver::capabilities):
//!   loss signal emulated).
//!
//!   Measured (PostgreSQL 15 in a local container on the host network,
//!   2-core machine, server and benchmark pinned to separate CPUs, 30
//!   rounds; `scripts/bench.sh`, or `shardlock-bench --only 7` against
//!   `SHARDLOCK_PG_URL`): from sending `pg_terminate_backend` to `lost`
//!   firing, p50 3.2 ms, max 5.1 ms; to the last of a coordinator's 100
//!   agents observing its cancel, p50 4.0 ms, max 11 ms. The raw floor, a
//!   second connection blocked on a key the terminated backend held, is
//!   p50 1.9 ms, max 3.1 ms in the same runs: the server frees the locks
//!   before its process exits and closes the socket, which is what the
//!   reader sees. The bound leaves a wide margin for loaded machines and
//!   servers across a network.
//! - **The connection fails** while idle (a reset, an error the server
//!   sends): `lost` fires too. A graceful `close` or drop stops the reader
//!   first and never fires `lost`. The connection never reconnects behind
//!   the session (a new backend would hold none of its locks): the session
//!   is lost, and the coordinator opens a new one.
//! - A node that crashes (kill -9) closes its sockets: the server ends its
//!   sessions and another node can take the keys within milliseconds.
//! - A node cut off by the network sees nothing (the connection hangs):
//!   the server frees its locks after the release window (25 s by
//!   default); the node's coordinator stops the work earlier, when `verify`
//!   cannot succeed within its lock-loss timeout.
//! - [`PgSession::backend_pid`] lets an operator end a session with
//!   `pg_terminate_backend`: the loss signal fires, and every later call
//!   reports [`Error::SessionLost`](shardlock_core::Error::SessionLost).
//!
//! # Errors
//!
//! [`PgError`] implements [`DriverError`](shardlock_core::DriverError) and
//! goes through core's one mapping: a lost connection is session-fatal;
//! credentials, an unknown database, a server that is not PostgreSQL or too
//! old, transaction pooling and bad options are configuration errors. Each
//! message says what the driver was doing; the server's words come once,
//! in the [`PgCause`] source.
//!
//! # Features
//!
//! - `tls` (off): TLS to the server through rustls (ring, webpki roots);
//!   choose it with `sslmode` in the URL.
//!
//! # Checkpoints
//!
//! [`PgCheckpoints`] keeps projection checkpoints (table `subscriptions`,
//! with fencing epochs). It opens like every checkpoint store:
//! [`PgCheckpoints::connect`]`(&options, &database).await` from the same
//! inputs as the driver (the table lives where the id's locks live), or
//! [`PgCheckpoints::from_pool`] with the application's pool;
//! [`PgCheckpoints::save_in`] saves inside the application's own
//! transaction.
//!
//! The crate re-exports [`sqlx`], so users name the same version.
#![doc(test(attr(deny(warnings))))]

mod checkpoints;
mod connection;
mod error;
mod fenced;
mod idle;
mod options;
mod session;
mod sql;
mod wait;

pub use checkpoints::PgCheckpoints;
pub use connection::{PgDriver, LOSS_DETECTION_BOUND, MIN_SERVER_VERSION_NUM};
pub use error::{PgCause, PgError};
pub use fenced::PgTransaction;
pub use options::{
    Keepalives, PgOptions, DEFAULT_CLIENT_CONNECTION_CHECK_INTERVAL, DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_LOCK_CHECK_INTERVAL,
};
pub use session::PgSession;
/// Core's mapping from shardlock database ids to PostgreSQL databases, used
/// by [`PgOptions::database_mapping`].
pub use shardlock_core::DatabaseMapping;
pub use sql::{KEYS_PER_NOTIFICATION, RELEASE_CHANNEL};

/// The sqlx this driver is built on, for its connect options and errors.
pub use sqlx;
