//! The handle of a started coordinator.

use std::sync::Arc;

use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::Assignment;
use crate::error::{Error, Result};
use crate::health::Health;
use crate::ids::NodeId;

/// Controls a running coordinator.
///
/// Dropping the handle without [`stop`](CoordinatorHandle::stop) also stops the
/// coordinator (agents first, then locks, then sessions), in the background.
#[derive(Debug)]
pub struct CoordinatorHandle {
    node: NodeId,
    stop: CancellationToken,
    wake: Arc<Notify>,
    assignment: watch::Receiver<Assignment>,
    health: watch::Receiver<Health>,
    task: Option<JoinHandle<()>>,
}

impl CoordinatorHandle {
    pub(super) fn new(
        node: NodeId,
        stop: CancellationToken,
        wake: Arc<Notify>,
        assignment: watch::Receiver<Assignment>,
        health: watch::Receiver<Health>,
        task: JoinHandle<()>,
    ) -> Self {
        Self {
            node,
            stop,
            wake,
            assignment,
            health,
            task: Some(task),
        }
    }

    /// The node's id.
    pub fn node_id(&self) -> &NodeId {
        &self.node
    }

    /// A receiver of the node's assignment, updated after every cycle.
    pub fn assignment(&self) -> watch::Receiver<Assignment> {
        self.assignment.clone()
    }

    /// The coordinator's health, for liveness and readiness probes: updated
    /// after every cycle and at once when a session is lost, so it turns
    /// within one poll interval of a database going away or coming back
    /// (reconnects are tried at least once per poll). `Degraded` until the
    /// first cycle has run; `Stopped` once the loop has ended.
    pub fn health(&self) -> Health {
        if self.is_finished() {
            let health = self.health.borrow().clone();
            if let Health::Stopped { .. } = health {
                return health;
            }
            return Health::Stopped {
                reason: "the coordinator task ended".to_string(),
            };
        }
        self.health.borrow().clone()
    }

    /// A receiver of [`health`](Self::health) changes (it never reports the
    /// loop's task ending without a `Stopped` value; check
    /// [`is_finished`](Self::is_finished) too).
    pub fn health_changes(&self) -> watch::Receiver<Health> {
        self.health.clone()
    }

    /// Runs the next cycle now instead of after the current pause.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Whether the coordinator loop has ended.
    pub fn is_finished(&self) -> bool {
        self.task.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// Stops gracefully: cancels every agent and awaits it (aborting any that
    /// outlive the stop timeout), **then** releases the locks, then closes
    /// the sessions. Another node can take the work over as soon as this
    /// returns.
    ///
    /// # Errors
    ///
    /// [`Error::TaskFailed`] if the coordinator task panicked (a bug).
    ///
    /// # Cancel safety
    ///
    /// Dropping the future leaves the shutdown running in the background.
    pub async fn stop(mut self) -> Result<()> {
        self.stop.cancel();
        match self.task.take() {
            Some(task) => task.await.map_err(|e| Error::TaskFailed {
                task: "coordinator",
                detail: format!("BUG: {e}"),
            }),
            None => Ok(()),
        }
    }
}

impl CoordinatorHandle {
    /// Ends the coordinator at once, as a crash would: the loop task is
    /// aborted, its agents aborted and its sessions dropped, with no graceful
    /// release and no announcement (the database frees the locks, and other
    /// nodes find them at their next poll, after their takeover delay).
    /// For tests and fault drills; use [`stop`](Self::stop) otherwise.
    pub async fn abort(mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            // Cancelled or finished: either way the loop and its sessions
            // are gone once this returns.
            let _ = task.await;
        }
    }
}

impl Drop for CoordinatorHandle {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
