//! A coordinator's health, for liveness and readiness probes.

use std::fmt;

/// How a coordinator is doing, answered by
/// [`CoordinatorHandle::health`](crate::CoordinatorHandle::health) and
/// updated after every cycle (and at once when a session is lost), so it
/// turns within one poll interval.
///
/// Map it onto probes as: liveness fails only when [`Stopped`](Self::Stopped)
/// ([`is_alive`](Self::is_alive)); readiness fails unless
/// [`Healthy`](Self::Healthy) ([`is_ready`](Self::is_ready)).
///
/// ```
/// use shardlock_core::Health;
///
/// let health = Health::Degraded { reasons: vec!["database main unreachable".into()] };
/// assert!(health.is_alive());
/// assert!(!health.is_ready());
/// assert_eq!(health.to_string(), "degraded: database main unreachable");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// Every database the distributor names has an open session, and no
    /// agent is failing.
    Healthy,
    /// Running, but some work may not run here: a database is unreachable
    /// (its sets are held by nobody on this node), a session was lost and
    /// not yet replaced, or agents are failing and being restarted.
    Degraded {
        /// One line per problem, e.g. `database main unreachable: ...`.
        reasons: Vec<String>,
    },
    /// The coordinator loop has ended; it holds nothing and runs nothing.
    Stopped {
        /// Why: `stopped` after [`stop`](crate::CoordinatorHandle::stop),
        /// else what ended the loop.
        reason: String,
    },
}

impl Health {
    /// The probe word: `healthy`, `degraded` or `stopped`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Healthy => "healthy",
            Self::Degraded { .. } => "degraded",
            Self::Stopped { .. } => "stopped",
        }
    }

    /// Liveness: the coordinator loop is running.
    pub fn is_alive(&self) -> bool {
        !matches!(self, Self::Stopped { .. })
    }

    /// Readiness: running with every database reachable and no agent
    /// failing.
    pub fn is_ready(&self) -> bool {
        matches!(self, Self::Healthy)
    }

    /// The reasons behind a degraded or stopped state (empty when healthy).
    pub fn reasons(&self) -> Vec<String> {
        match self {
            Self::Healthy => Vec::new(),
            Self::Degraded { reasons } => reasons.clone(),
            Self::Stopped { reason } => vec![reason.clone()],
        }
    }

    /// Degraded with `reasons`, or healthy when there are none.
    pub(crate) fn from_reasons(reasons: Vec<String>) -> Self {
        if reasons.is_empty() {
            Self::Healthy
        } else {
            Self::Degraded { reasons }
        }
    }
}

impl fmt::Display for Health {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Healthy => f.write_str("healthy"),
            Self::Degraded { reasons } => write!(f, "degraded: {}", reasons.join("; ")),
            Self::Stopped { reason } => write!(f, "stopped: {reason}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_reasons_is_healthy() {
        assert_eq!(Health::from_reasons(Vec::new()), Health::Healthy);
        let degraded = Health::from_reasons(vec!["a".into(), "b".into()]);
        assert_eq!(degraded.as_str(), "degraded");
        assert_eq!(degraded.to_string(), "degraded: a; b");
        assert_eq!(degraded.reasons(), vec!["a".to_string(), "b".to_string()]);
    }

    #[test]
    fn stopped_is_neither_alive_nor_ready() {
        let stopped = Health::Stopped {
            reason: "stopped".into(),
        };
        assert!(!stopped.is_alive());
        assert!(!stopped.is_ready());
        assert!(Health::Healthy.is_ready());
        assert!(Health::Healthy.is_alive());
    }
}
