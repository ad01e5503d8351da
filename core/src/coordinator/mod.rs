//! The coordinator: acquires lock sets, runs their agents while it holds
//! them, stops them the moment a lock may be gone, and hands over cleanly.
//!
//! # Invariants
//!
//! 1. An exclusive set's agents run only while its key is held by a session
//!    that passed its last `verify` within the poll interval plus the lock-loss
//!    timeout **and** whose loss signal has not fired: every agent's
//!    cancellation token is a child of its session's
//!    [`lost`](crate::SessionSignals::lost) token, so the driver's loss
//!    signal cancels the agents directly, and the coordinator wakes at once
//!    to await them and replace the session.
//! 2. When a session fails, misses its deadline, signals its loss, or a task
//!    running one of its round trips panics, its sets' agents are stopped
//!    (cancelled, awaited, then aborted after the stop timeout) **before** the
//!    session is dropped.
//! 3. A set that leaves the distribution, and every set at `stop()`, has its
//!    agents stopped **before** its key is released.
//! 4. Connections per node are one per database, never one per lock.
//!
//! # Wake-ups and balancing
//!
//! Every release the coordinator makes (graceful stop, a set leaving the
//! distribution, a balancing move) is announced where the driver can
//! ([`Capabilities::release_hint`](crate::Capabilities)); a node whose
//! session receives an announcement cycles at once instead of at its next
//! poll, so a coordinator-level handover takes milliseconds. Polling stays
//! the fallback, and the path after a crash.
//!
//! With a distributor that balances ([`Distributor::balancing`]), each
//! cycle also probes the member slots, computes this node's fair share,
//! releases a lasting surplus (agents stopped first) and takes free sets
//! only up to its share; sets won beyond it are given back at once,
//! announced, without their agents ever starting. See
//! [`Balancing`](crate::Balancing).
//!
//! # No overlap when the server ends a session
//!
//! When the server ends a session (terminate, restart, failover, `KILL`) it
//! frees the locks at once, and another node may take them on its next
//! cycle. Two rules keep the old and the new holder from running together
//! (the lock-delay of Chubby):
//!
//! - the old holder's agents are cancelled when the driver's loss signal
//!   fires, at most the driver's detection bound `B` after the server ended
//!   the session ([`Capabilities::loss_detection_bound`](crate::Capabilities));
//! - a set taken with `try_acquire` starts its agents only `takeover_delay`
//!   after the grant, and the builder refuses `takeover_delay < B`.
//!
//! So, with `t_lost` the moment the server freed the locks:
//!
//! ```text
//! old agents cancelled ≤ t_lost + B ≤ t_lost + takeover_delay ≤ new agents start
//! ```
//!
//! since the new holder's grant comes after `t_lost`.
//!
//! The one exception is a **clean handover**: a holder that stops a set's
//! agents and then releases the key (graceful stop, a balancing move)
//! announces the release as clean through the driver's release hints
//! ([`Session::release_announced`](crate::Session::release_announced)). Its
//! agents stopped before the release, so the next holder may start at once.
//! A release is announced clean only if the set's own agents were allowed
//! to start (its takeover delay had passed): a set taken from a crashed
//! node and handed on before that stays under the delay. A clean mark is
//! used by the first `try_acquire` of the key after the announcement, and
//! forgotten if that one is denied, so a mark never outlives the handover
//! it describes. What remains is a window of a few milliseconds: a third
//! node that takes the key between the announcement and that first try, and
//! loses its session to the server inside the same window, could overlap
//! for up to `B`; checkpoint fencing covers it.
//!
//! With the defaults that
//! is `B = 100 ms` on Postgres (measured in milliseconds; see the driver's
//! docs) and `takeover_delay = B`. A driver without a loss signal falls back
//! to `B = poll_interval + lock_loss_timeout` (the next verify).
//!
//! A node cut off by the network sees no loss at all: its round trips hang.
//! Self-fencing covers it: a verify that misses `lock_loss_timeout` stops the
//! agents, and the builder checks that
//! `poll_interval + lock_loss_timeout + stop_timeout` is below the driver's
//! [`lock_release_window`](crate::Driver::lock_release_window), the time the
//! server keeps a vanished node's locks (5 + 5 + 5 = 15 s < 25 s on
//! Postgres by default). Checkpoint fencing covers whatever slips through.
//!
//! # Many databases
//!
//! A node with hundreds of tenant databases must not run at the pace of the
//! worst one. Each database's deadlines are its own:
//!
//! - **Connects run in the background**, at most
//!   [`connect_concurrency`](CoordinatorBuilder::connect_concurrency) at
//!   once (default 64), each under `connect_timeout`. A cycle never waits
//!   for one: a database without a session is skipped until its connect
//!   answers, which wakes the loop, and the next cycle acquires its sets.
//!   An unreachable database (a host that drops packets, a listener that
//!   never answers) costs the others nothing; a refused one is retried with
//!   backoff, capped at the poll interval.
//! - **A straggling verify is left running.** Verifies go out to every
//!   database at once and are taken as they answer; once the others are in,
//!   one still out after four times the slowest answer (at least 25 ms) is
//!   not waited for. Its session stays inside the task; the database is
//!   skipped (no try, no release: releases are queued and sent when the
//!   session comes back) until it answers, and then at once: a verify that
//!   misses its `lock_loss_timeout` stops that database's agents at its own
//!   deadline, exactly as if the cycle had waited.
//! - Try-acquire and probe rounds are still awaited in full. They go only to
//!   databases that passed their verify moments before, so a database that
//!   stops answering is caught by the verify first.
//!
//! Sessions are one per database, never one per lock (a driver may keep
//! side connections for each session: MySQL keeps a loss watcher, see its
//! docs; a Postgres session is one connection).

mod agents;
mod assignment;
mod builder;
mod cycle;
mod handle;

pub use assignment::{Assignment, OwnedSet};
pub use builder::{CoordinatorBuilder, CoordinatorConfig};
pub use handle::CoordinatorHandle;

use std::fmt;
use std::sync::{Arc, Mutex};

use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

use crate::agent::Agent;
use crate::distributor::Distributor;
use crate::driver::Driver;
use crate::error::{Error, Result};
use crate::health::Health;
use crate::ids::NodeId;

/// A node's coordinator. Build it with [`Coordinator::builder`], then
/// [`start`](Coordinator::start) it once.
///
/// ```
/// # #![allow(dead_code)]
/// use std::time::Duration;
/// use shardlock_core::{Agent, AgentContext, AgentError, Coordinator, ShardId};
/// use shardlock_core::{CancellationToken, Distributor, Driver, Result};
///
/// struct Work;
/// impl Agent for Work {
///     async fn run(&self, _shard: &ShardId, ctx: AgentContext) -> Result<(), AgentError> {
///         ctx.cancel.cancelled().await;
///         Ok(())
///     }
/// }
///
/// /// Runs this node until `shutdown` fires, then hands its work over.
/// pub async fn run_node<D: Driver, S: Distributor>(
///     driver: D,
///     distributor: S,
///     shutdown: CancellationToken,
/// ) -> Result<()> {
///     let coordinator = Coordinator::builder(driver, distributor, Work)
///         .poll_interval(Duration::from_secs(2))
///         .build()?;
///     let handle = coordinator.start()?;
///     shutdown.cancelled().await;
///     handle.stop().await
/// }
/// ```
pub struct Coordinator<D: Driver, S: Distributor, A: Agent> {
    parts: Mutex<Option<Parts<D, S, A>>>,
    config: Arc<CoordinatorConfig>,
}

struct Parts<D, S, A> {
    driver: D,
    distributor: S,
    agent: Arc<A>,
}

impl<D: Driver, S: Distributor, A: Agent> Coordinator<D, S, A> {
    /// Starts building a coordinator over `driver`, for the sets `distributor`
    /// lists, running `agent` for every shard this node owns.
    pub fn builder(driver: D, distributor: S, agent: A) -> CoordinatorBuilder<D, S, A> {
        CoordinatorBuilder::new(driver, distributor, agent)
    }

    /// This node's id.
    pub fn node_id(&self) -> &NodeId {
        &self.config.node_id
    }

    /// The configuration in force.
    pub fn config(&self) -> &CoordinatorConfig {
        &self.config
    }

    /// Spawns the coordinator loop on the current Tokio runtime.
    ///
    /// # Errors
    ///
    /// [`Error::AlreadyStarted`] on a second call; [`Error::NotInRuntime`]
    /// outside a Tokio runtime.
    pub fn start(&self) -> Result<CoordinatorHandle> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| Error::NotInRuntime {
            what: "Coordinator::start",
        })?;
        let parts = self
            .parts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .ok_or(Error::AlreadyStarted)?;
        let stop = CancellationToken::new();
        let wake = Arc::new(Notify::new());
        let (tx, rx) = watch::channel(Assignment::new(self.config.node_id.clone()));
        let (health_tx, health_rx) = watch::channel(Health::Degraded {
            reasons: vec!["starting: no cycle has run yet".to_string()],
        });
        let runner = cycle::Runner::new(
            parts.driver,
            parts.distributor,
            parts.agent,
            Arc::clone(&self.config),
            stop.clone(),
            Arc::clone(&wake),
            (tx, health_tx),
        );
        let task = runtime.spawn(runner.run());
        Ok(CoordinatorHandle::new(
            self.config.node_id.clone(),
            stop,
            wake,
            rx,
            health_rx,
            task,
        ))
    }
}

impl<D: Driver, S: Distributor, A: Agent> fmt::Debug for Coordinator<D, S, A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let started = self.parts.lock().map(|p| p.is_none()).unwrap_or(true);
        f.debug_struct("Coordinator")
            .field("node_id", &self.config.node_id)
            .field("started", &started)
            .finish_non_exhaustive()
    }
}
