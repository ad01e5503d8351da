//! The coordinator: acquires lock sets, runs their agents while it holds
//! them, stops them the moment a lock may be gone, and hands over cleanly.
//!
//! # Invariants
//!
//! 1. An exclusive set's agents run only while its key is held by a session
//!    that passed its last `verify` within the poll interval plus the lock-loss
//!    timeout.
//! 2. When a session fails or misses its deadline, its sets' agents are
//!    stopped (cancelled, awaited, then aborted after the stop timeout)
//!    **before** the session is dropped.
//! 3. A set that leaves the distribution, and every set at `stop()`, has its
//!    agents stopped **before** its key is released.
//! 4. Connections per node are one per database, never one per lock.

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
    /// [`Error::AlreadyStarted`] on a second call; [`Error::Config`] outside a
    /// Tokio runtime.
    pub fn start(&self) -> Result<CoordinatorHandle> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            Error::Config("Coordinator::start must be called inside a Tokio runtime".into())
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
        let runner = cycle::Runner::new(
            parts.driver,
            parts.distributor,
            parts.agent,
            Arc::clone(&self.config),
            stop.clone(),
            Arc::clone(&wake),
            tx,
        );
        let task = runtime.spawn(runner.run());
        Ok(CoordinatorHandle::new(
            self.config.node_id.clone(),
            stop,
            wake,
            rx,
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
