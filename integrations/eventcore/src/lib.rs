//! [eventcore](https://docs.rs/eventcore) projections with shardlock's
//! leadership, fencing and loss signal, on any shardlock driver (memory,
//! SQLite, PostgreSQL, MySQL/MariaDB, SQL Server) and checkpoint store. Use it through
//! `shardlock` with feature `eventcore` (`shardlock::eventcore`).
//!
//! - [`ShardlockCoordinator`]: eventcore's `ProjectorCoordinator`;
//!   leadership of projector `name` is the session lock
//!   [`leadership_key`]`(name)`, held by a [`ShardlockGuard`] that releases
//!   it on drop (any runtime) and exposes the session's loss signal.
//! - [`ShardlockCheckpoints`]: eventcore's `CheckpointStore` over a
//!   shardlock [`CheckpointStore`](shardlock_core::CheckpointStore) (epochs,
//!   fencing) and a [`PositionTable`] (eventcore positions are 128-bit
//!   UUIDs, shardlock's are `bigint`s: see [`positions`]).
//! - [`ShardlockBackend`]: both, plus your eventcore `EventReader`, for
//!   `eventcore::run_projection(projector, &backend, config)`: taking
//!   leadership claims the subscription's fencing epoch, every save is
//!   conditional on it, and a lost or fenced-off leadership refuses reads.
//! - [`run_projection`]: eventcore's runner, stopped at the next event when
//!   leadership is lost (eventcore's own runner cannot be told).
//! - [`ShardlockBackend::wait_for_leadership`]: eventcore's `try_acquire`
//!   never waits; a follower that calls this first waits in the database
//!   (no polling, no connection per attempt) and `run_projection` then
//!   takes the lock it got.
//!
//! # What eventcore can and cannot react to
//!
//! eventcore 2.1's runner takes the guard and never looks at it again; it
//! logs a failed checkpoint save and applies the next event anyway; it
//! stops only when a read fails `max_consecutive_poll_failures` + 1 times
//! in a row. So with `eventcore::run_projection` alone, a node that lost its
//! lock finishes the batch it read (up to 1000 events; their checkpoints
//! stop moving as soon as a newer leader claims) and stops after its failed
//! reads (about half a second at eventcore's defaults). With
//! [`run_projection`] it stops at the next checkpoint save, i.e. after at
//! most the event being applied when the loss was seen. Effects a stale
//! leader writes elsewhere are not fenced by either, only its checkpoint
//! is (a session-fenced transaction closes that: see below). Events after
//! the last saved checkpoint are applied again by the next leader
//! (at-least-once; eventcore saves after every event, so a killed leader
//! leaves at most one).
//!
//! # Transactional projections (no stale effect)
//!
//! eventcore 2.1's transactional projections, where the effect and the
//! progress commit in one transaction on the connection holding the
//! leadership lock (eventcore-testing's `leadership_loss_fencing_contract`:
//! "stale effect must not commit"), are eventcore-postgres' own runner
//! (`eventcore::postgres::projections`, feature `postgres`): it owns its
//! pool, its advisory lock and its progress table. eventcore publishes no
//! trait a coordinator or checkpoint store could implement to join it:
//! eventcore-types has only the vocabulary and the event-source side
//! (`ProjectionSource`), and eventcore-testing's transactional contracts
//! take a *fixture* standing for a whole runner (`TransactionalProjectionFixture`:
//! retry policy, after-commit hooks, source and selection identities,
//! reset and replay, commit-acknowledgement loss), so passing them would
//! mean writing a second runner, and eventcore's legacy `Projector::apply`
//! is synchronous, so `run_projection` cannot write inside a transaction.
//!
//! The same guarantee on shardlock, on every driver with session-fenced
//! transactions (PostgreSQL, MySQL/MariaDB, SQL Server; SQLite through
//! `SqliteCheckpoints::fenced`): take leadership with
//! [`ShardlockBackend::acquire`] (the lock and a claimed fencing epoch),
//! read a batch through the backend, then
//! [`leader_session`](BackendGuard::leader_session)`()?.transaction()`,
//! write the effects through it, advance the exact position in it
//! (`PgPositions::advance_in` / `MySqlPositions::advance_in`) and
//! `commit_checkpoint(name, guard.epoch(), position_prefix(last))`. The
//! commit runs on the connection that holds the lock, so a leader whose
//! session ended gets `SessionLost` and commits nothing; a superseded
//! epoch rolls the batch back. `PgPositions::advance_in` shows the whole
//! loop as a compiled example; the tests `fenced_batch_*` in this crate's
//! `tests/postgres.rs` and `tests/mysql.rs` kill the leader's connection
//! mid-batch and assert what `leadership_loss_fencing_contract` asserts:
//! the stale leader fails with a lost leadership, no stale effect and no
//! stale progress committed.
//!
//! # Example
//!
//! ```
//! use std::convert::Infallible;
//! use std::sync::atomic::{AtomicU64, Ordering};
//! use std::sync::Arc;
//!
//! use eventcore::ProjectionConfig;
//! use eventcore_memory::InMemoryEventStore;
//! use eventcore_types::{
//!     Event, EventStore, Projector, StreamId, StreamPosition, StreamVersion, StreamWrites,
//! };
//! use shardlock_core::DatabaseId;
//! use shardlock_eventcore::{
//!     run_projection, MemoryPositions, ShardlockBackend, ShardlockCheckpoints,
//!     ShardlockCoordinator,
//! };
//! use shardlock_memory::{MemoryCheckpoints, MemoryServer};
//!
//! #[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
//! struct Deposited {
//!     account: StreamId,
//!     amount: u64,
//! }
//!
//! impl Event for Deposited {
//!     fn stream_id(&self) -> &StreamId {
//!         &self.account
//!     }
//!     fn event_type_name() -> &'static str {
//!         "Deposited"
//!     }
//! }
//!
//! struct Total(Arc<AtomicU64>);
//!
//! impl Projector for Total {
//!     type Event = Deposited;
//!     type Error = Infallible;
//!     type Context = ();
//!
//!     fn apply(&mut self, e: Deposited, _: StreamPosition, _: &mut ()) -> Result<(), Infallible> {
//!         self.0.fetch_add(e.amount, Ordering::Relaxed);
//!         Ok(())
//!     }
//!     fn name(&self) -> &str {
//!         "total-deposits"
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let events = InMemoryEventStore::new();
//! let account = StreamId::try_new("account-1")?;
//! let writes = StreamWrites::new()
//!     .register_stream(account.clone(), StreamVersion::new(0))?
//!     .append(Deposited { account: account.clone(), amount: 10 })?
//!     .append(Deposited { account, amount: 32 })?;
//! events.append_events(writes).await?;
//!
//! // Any shardlock driver and checkpoint store: SQLite, Postgres, ...
//! let server = MemoryServer::new();
//! let backend = ShardlockBackend::new(
//!     &events,
//!     ShardlockCoordinator::new(server.driver(), DatabaseId::new("main")),
//!     ShardlockCheckpoints::new(MemoryCheckpoints::new(), MemoryPositions::new()),
//! );
//! let total = Arc::new(AtomicU64::new(0));
//! run_projection(Total(total.clone()), &backend, ProjectionConfig::default()).await?;
//! assert_eq!(total.load(Ordering::Relaxed), 42);
//! # Ok(())
//! # }
//! ```
#![doc(test(attr(deny(warnings))))]

mod backend;
mod checkpoints;
mod coordinator;
mod error;
pub mod positions;
mod run;

pub use backend::{BackendGuard, ShardlockBackend};
pub use checkpoints::ShardlockCheckpoints;
pub use coordinator::{leadership_key, ShardlockCoordinator, ShardlockGuard};
pub use error::{CheckpointStoreError, CoordinationError, OpenError, ReadError, RunError};
#[cfg(feature = "mysql")]
pub use positions::MySqlPositions;
#[cfg(feature = "postgres")]
pub use positions::PgPositions;
#[cfg(feature = "sqlite")]
pub use positions::SqlitePositions;
pub use positions::{position_prefix, MemoryPositions, PositionTable};
pub use run::run_projection;
