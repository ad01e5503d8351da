//! In-process reference driver of [shardlock](https://docs.rs/shardlock):
//! exactly the driver contract, with no database. Use it through `shardlock`
//! with feature `memory` (on by default).
//!
//! A [`MemoryServer`] plays the database server: a lock table per database
//! shared by every [`MemoryDriver`] made from it. Tests use the driver's
//! fault switches to play a node's failures:
//!
//! - [`MemoryDriver::kill`]: the process died; the server sees the sockets
//!   close and frees its locks at once.
//! - [`MemoryDriver::sever`]: the connections break (errors at once on the
//!   node), but the server notices only after the release window, as a real
//!   server does through TCP keepalives.
//! - [`MemoryDriver::partition`]: the network is cut; the node's calls hang,
//!   and the server frees its locks after the release window.
//! - [`MemoryServer::terminate`] (and [`MemoryServer::terminate_node`]): an
//!   operator ends one session; its locks are freed at once.
//!
//! **Loss signal** ([`Session::signals`](shardlock_core::Session::signals)):
//! native, within [`LOSS_DETECTION_BOUND`] (10 ms, scheduling only). The
//! server keeps each session's signals and fires `lost` synchronously on
//! `terminate`, `terminate_node`, `kill` and `sever` (and on `heal` for
//! sessions a partition cut); never on `partition` itself, which is silent
//! like a real network cut.
//!
//! **Round trips** are simulated: the server applies a request when it
//! arrives and the answer comes back after one task yield, so a
//! `try_acquire` future dropped mid-flight really leaves keys held on the
//! server that the session does not know; the session is then poisoned
//! (core's [`Holds`](shardlock_core::Holds)) and its next `verify` fails.
//! [`MemoryServer::round_trips`] counts them (one per batch), and
//! [`MemoryServer::waiting`] tells how many sessions block in `acquire` on a
//! key.
//!
//! **Probe** (native, [`Session::probe`](shardlock_core::Session::probe)): one round
//! trip (counted like the others) for the keys the session does not hold;
//! the server reads its lock table and takes nothing. Keys the session holds
//! answer `false` without asking.
//!
//! **Release hints** (native): the server keeps each session's
//! [`ReleaseHints`](shardlock_core::ReleaseHints) (in its signals, from
//! connect until the session ends). A
//! [`release_announced`](shardlock_core::Session::release_announced) that
//! frees at least one key calls `announce` on every *other* reachable
//! session of the same database, in the same round trip as the release, with
//! the ids of the released keys marked clean: the hint is there before the
//! releasing call returns. Partitioned, severed and ended sessions hear
//! nothing. [`MemoryServer::announcements`] counts announced releases.
//!
//! **Projections**: [`MemoryEventLog`] is an in-process event stream and
//! [`MemoryCheckpoints`] an in-process checkpoint store with fencing epochs,
//! opened like every checkpoint store with
//! [`MemoryCheckpoints::connect`]`().await` (a fresh table; clones share
//! it).
//!
//! ```
//! use shardlock_core::{DatabaseId, Driver, LockKey, NodeId, Session};
//! use shardlock_memory::MemoryServer;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> shardlock_core::Result<()> {
//! let server = MemoryServer::new();
//! let driver = server.driver();
//! let db = DatabaseId::new("main");
//! let mut a = driver.connect(&db, &NodeId::new("a")).await?;
//! let mut b = driver.connect(&db, &NodeId::new("b")).await?;
//! let key = LockKey::new("orders")?;
//! assert_eq!(a.try_acquire(&[key.clone()]).await?, vec![true]);
//! assert_eq!(b.try_acquire(&[key.clone()]).await?, vec![false]);
//! a.release(&key).await?;
//! assert_eq!(b.try_acquire(&[key]).await?, vec![true]);
//! # Ok(())
//! # }
//! ```
#![doc(test(attr(deny(warnings))))]

mod projection;
mod server;
mod session;

pub use projection::{MemoryCheckpoints, MemoryEventLog};
pub use server::{
    HolderInfo, LockEvent, LockEventKind, MemoryDriver, MemoryError, MemoryServer, SessionId,
    DEFAULT_RELEASE_WINDOW, LOSS_DETECTION_BOUND,
};
pub use session::MemorySession;
