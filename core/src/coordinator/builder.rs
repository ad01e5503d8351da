//! Coordinator configuration and its builder.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tracing::{debug, warn};

use super::{Coordinator, Parts};
use crate::agent::Agent;
use crate::distributor::Distributor;
use crate::driver::Driver;
use crate::error::{Error, Result};
use crate::ids::NodeId;

/// The coordinator's timing and identity. Every field has a default; see
/// [`CoordinatorBuilder`] for what each does.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct CoordinatorConfig {
    /// This node's id.
    pub node_id: NodeId,
    /// Pause between cycles when all is well (default 5 s).
    pub poll_interval: Duration,
    /// Pause between cycles while an agent waits to be restarted or a
    /// connection to be retried (default 1 s).
    pub pause_interval: Duration,
    /// Upper bound of the random delay before the first cycle (default 500 ms).
    pub start_jitter: Duration,
    /// Deadline of every verify, acquire and release round trip; a session
    /// that misses it is treated as lost (default 5 s).
    pub lock_loss_timeout: Duration,
    /// Deadline for opening a session (default 10 s). At build time it is
    /// raised to one second above the driver's own
    /// [`connect_timeout`](Driver::connect_timeout) when that is longer, so
    /// the driver's typed timeout error is seen rather than a bare deadline.
    pub connect_timeout: Duration,
    /// Sessions opened at once (default 64). Connects run in the background,
    /// each under its own `connect_timeout`: a node with hundreds of tenant
    /// databases opens them in waves of this size, and a database that
    /// cannot be reached delays nobody else.
    pub connect_concurrency: usize,
    /// How long stopping agents may take before they are aborted (default 5 s).
    pub stop_timeout: Duration,
    /// First restart delay of a failed agent; doubles per failure (default 500 ms).
    pub restart_backoff: Duration,
    /// Longest restart or reconnect delay (default 30 s).
    pub max_backoff: Duration,
    /// How long a set taken with `try_acquire` waits before its agents start,
    /// so a previous holder whose session the server ended has stopped
    /// (default: the driver's loss detection bound; see the module docs of
    /// the coordinator).
    pub takeover_delay: Duration,
}

impl CoordinatorConfig {
    /// The defaults, for `node_id`.
    pub fn new(node_id: NodeId) -> Self {
        Self {
            node_id,
            poll_interval: Duration::from_secs(5),
            pause_interval: Duration::from_secs(1),
            start_jitter: Duration::from_millis(500),
            lock_loss_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(10),
            connect_concurrency: 64,
            stop_timeout: Duration::from_secs(5),
            restart_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(30),
            takeover_delay: Duration::ZERO,
        }
    }

    /// The longest time from the server ending a session to this node's
    /// agents being cancelled with `driver`: its loss detection bound, or,
    /// for a driver without a loss signal, the next verify (poll interval +
    /// lock-loss timeout).
    pub fn loss_detection_bound<D: Driver>(&self, driver: &D) -> Duration {
        driver
            .capabilities()
            .loss_detection_bound
            .unwrap_or(self.poll_interval + self.lock_loss_timeout)
    }

    /// The longest time a cut-off node may keep running work after its last
    /// good verify: the poll interval, then a verify that hangs until its
    /// deadline, then the agents' stop timeout.
    pub fn self_fencing_bound(&self) -> Duration {
        self.poll_interval + self.lock_loss_timeout + self.stop_timeout
    }

    pub(crate) fn backoff(&self, base: Duration, failures: u32) -> Duration {
        let factor = 1u32.checked_shl(failures.min(16)).unwrap_or(u32::MAX);
        base.saturating_mul(factor).min(self.max_backoff)
    }
}

/// Builds a [`Coordinator`]; see the setters for the defaults.
#[derive(Debug)]
pub struct CoordinatorBuilder<D, S, A> {
    driver: D,
    distributor: S,
    agent: A,
    config: CoordinatorConfig,
    takeover_delay: Option<Duration>,
    unsafe_timing: bool,
}

impl<D: Driver, S: Distributor, A: Agent> CoordinatorBuilder<D, S, A> {
    pub(super) fn new(driver: D, distributor: S, agent: A) -> Self {
        Self {
            driver,
            distributor,
            agent,
            config: CoordinatorConfig::new(NodeId::generate()),
            takeover_delay: None,
            unsafe_timing: false,
        }
    }

    /// This node's id (default: [`NodeId::generate`]).
    pub fn node_id(mut self, node_id: impl Into<NodeId>) -> Self {
        self.config.node_id = node_id.into();
        self
    }

    /// Pause between cycles when all is well (default 5 s).
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.config.poll_interval = interval;
        self
    }

    /// Pause while agents wait for a restart (default 1 s).
    pub fn pause_interval(mut self, interval: Duration) -> Self {
        self.config.pause_interval = interval;
        self
    }

    /// Upper bound of the random delay before the first cycle (default 500 ms).
    pub fn start_jitter(mut self, jitter: Duration) -> Self {
        self.config.start_jitter = jitter;
        self
    }

    /// Deadline of every lock round trip (default 5 s).
    pub fn lock_loss_timeout(mut self, timeout: Duration) -> Self {
        self.config.lock_loss_timeout = timeout;
        self
    }

    /// Deadline for opening a session (default 10 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.config.connect_timeout = timeout;
        self
    }

    /// Sessions opened at once (default 64; 0 counts as 1). See
    /// [`CoordinatorConfig::connect_concurrency`].
    pub fn connect_concurrency(mut self, connects: usize) -> Self {
        self.config.connect_concurrency = connects.max(1);
        self
    }

    /// How long agents get to stop before they are aborted (default 5 s).
    pub fn stop_timeout(mut self, timeout: Duration) -> Self {
        self.config.stop_timeout = timeout;
        self
    }

    /// First restart delay of a failed agent, doubled per failure up to
    /// `max` (defaults 500 ms and 30 s; `max` also caps reconnect delays).
    pub fn restart_backoff(mut self, first: Duration, max: Duration) -> Self {
        self.config.restart_backoff = first;
        self.config.max_backoff = max;
        self
    }

    /// How long a set taken with `try_acquire` waits before its agents start
    /// (default: the driver's loss detection bound, see
    /// [`CoordinatorConfig::loss_detection_bound`]). Shorter than that bound,
    /// a node whose session the server just ended may still be running the
    /// set's work, and [`build`](Self::build) refuses it.
    pub fn takeover_delay(mut self, delay: Duration) -> Self {
        self.takeover_delay = Some(delay);
        self
    }

    /// Accepts timings under which a cut-off node may still run work after
    /// the database has freed its locks (see [`build`](Self::build)); the
    /// conflict is logged as a warning instead of failing the build.
    pub fn allow_unsafe_timing(mut self) -> Self {
        self.unsafe_timing = true;
        self
    }

    /// Checks the configuration and builds the coordinator.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] when the distributor's [`Balancing`](crate::Balancing)
    /// settings are invalid, when an interval is zero, or when
    /// [`self_fencing_bound`](CoordinatorConfig::self_fencing_bound) (poll
    /// interval + lock-loss timeout + stop timeout) is not below the driver's
    /// [`lock_release_window`](Driver::lock_release_window): a node cut off
    /// from its database would then still be running work when the database
    /// frees its locks for another node. [`allow_unsafe_timing`](Self::allow_unsafe_timing)
    /// turns that second check into a warning.
    ///
    /// Also [`Error::Config`] when the takeover delay is shorter than the
    /// driver's loss detection bound (see the coordinator's module docs for
    /// the inequality); [`allow_unsafe_timing`](Self::allow_unsafe_timing)
    /// turns that into a warning too.
    pub fn build(mut self) -> Result<Coordinator<D, S, A>> {
        if let Some(balancing) = self.distributor.balancing() {
            balancing.validate()?;
        }
        if let Some(own) = self.driver.connect_timeout() {
            let outer = own + Duration::from_secs(1);
            if self.config.connect_timeout < outer {
                debug!(
                    driver = self.driver.name(),
                    driver_timeout = ?own,
                    "connect deadline raised above the driver's own connect timeout"
                );
                self.config.connect_timeout = outer;
            }
        }
        let bound = self.config.loss_detection_bound(&self.driver);
        self.config.takeover_delay = self.takeover_delay.unwrap_or(bound);
        if self.config.takeover_delay < bound {
            let message = format!(
                "takeover_delay ({:?}) must be at least the {} driver's loss detection bound \
                 ({bound:?}); otherwise a node whose session the server just ended may still run a \
                 set's work when another node starts it",
                self.config.takeover_delay,
                self.driver.name(),
            );
            if self.unsafe_timing {
                warn!("{message}");
            } else {
                return Err(Error::Config(message));
            }
        }
        let c = &self.config;
        for (name, value) in [
            ("poll_interval", c.poll_interval),
            ("pause_interval", c.pause_interval),
            ("lock_loss_timeout", c.lock_loss_timeout),
            ("connect_timeout", c.connect_timeout),
            ("restart_backoff", c.restart_backoff),
        ] {
            if value.is_zero() {
                return Err(Error::Config(format!("{name} must be greater than zero")));
            }
        }
        if let Some(window) = self.driver.lock_release_window() {
            let bound = c.self_fencing_bound();
            if bound >= window {
                let message = format!(
                    "poll_interval ({:?}) + lock_loss_timeout ({:?}) + stop_timeout ({:?}) = {bound:?} \
                     must be below the {} driver's lock release window ({window:?}); otherwise a node \
                     cut off from its database may still run work after the database gives its locks \
                     to another node. Shorten the intervals or lengthen the driver's keepalive window",
                    c.poll_interval,
                    c.lock_loss_timeout,
                    c.stop_timeout,
                    self.driver.name(),
                );
                if self.unsafe_timing {
                    warn!("{message}");
                } else {
                    return Err(Error::Config(message));
                }
            }
        }
        Ok(Coordinator {
            parts: Mutex::new(Some(Parts {
                driver: self.driver,
                distributor: self.distributor,
                agent: Arc::new(self.agent),
            })),
            config: Arc::new(self.config),
        })
    }
}
