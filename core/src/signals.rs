//! What a session tells without being asked: that its connection ended.
//!
//! A server that ends a session (`pg_terminate_backend`, a restart, a
//! failover, a DBA's `KILL`) frees its locks **at once**. A holder that only
//! learns of it at its next `verify` keeps running work another node may
//! already run. So every session hands out a [`SessionSignals`] when it
//! opens: an owned, cloneable handle whose [`lost`](SessionSignals::lost)
//! token fires as soon as the driver sees the connection end, with no
//! statement needed. The coordinator derives every agent's cancellation
//! token from it, so agents are cancelled the moment the driver notices.
//!
//! # Invariants
//!
//! 1. `lost` only ever goes from not fired to fired; it never resets. A
//!    session whose signal fired is never trusted again (its [`Holds`]
//!    refuse every call).
//! 2. The first reason given wins; later ones are ignored.
//! 3. Firing never blocks and never needs a runtime.
//!
//! [`Holds`]: crate::Holds

use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};

use tokio_util::sync::CancellationToken;

use crate::hints::ReleaseHints;

/// A session's signals: the loss token, and an optional hint that locks were
/// released elsewhere (so a waiting node can try at once instead of at its
/// next poll).
///
/// Taken once with [`Session::signals`](crate::Session::signals) and kept
/// apart from the session, so it can be watched while the session itself is
/// busy in a round trip.
#[derive(Clone, Default)]
pub struct SessionSignals {
    lost: CancellationToken,
    reason: Arc<Mutex<Option<String>>>,
    hints: Option<ReleaseHints>,
}

impl SessionSignals {
    /// Signals that have not fired, without a release hint.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds release hints: the driver records in `hints` the releases other
    /// sessions of the database announce (e.g. Postgres `NOTIFY`).
    pub fn with_release_hints(mut self, hints: ReleaseHints) -> Self {
        self.hints = Some(hints);
        self
    }

    /// Fires when the session's connection ended or the session can no
    /// longer be trusted. Derive child tokens from it (`lost().child_token()`)
    /// to stop work with the session.
    pub fn lost(&self) -> &CancellationToken {
        &self.lost
    }

    /// Whether [`lost`](Self::lost) fired.
    pub fn is_lost(&self) -> bool {
        self.lost.is_cancelled()
    }

    /// Why the session was lost, once it was.
    pub fn reason(&self) -> Option<String> {
        self.reason
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Fires the loss signal with `reason` (only the first reason is kept).
    /// Drivers call it from the task or thread that watches the connection.
    pub fn fire_lost(&self, reason: impl Into<String>) {
        {
            let mut slot = self.reason.lock().unwrap_or_else(PoisonError::into_inner);
            if slot.is_none() {
                *slot = Some(reason.into());
            }
        }
        self.lost.cancel();
    }

    /// The release hints, when the driver offers them.
    pub fn release_hints(&self) -> Option<&ReleaseHints> {
        self.hints.as_ref()
    }
}

impl fmt::Debug for SessionSignals {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionSignals")
            .field("lost", &self.is_lost())
            .field("reason", &self.reason())
            .field("release_hints", &self.hints)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fires_once_and_keeps_the_first_reason() {
        let signals = SessionSignals::new();
        let watcher = signals.clone();
        let child = watcher.lost().child_token();
        assert!(!watcher.is_lost());
        signals.fire_lost("terminated by the server");
        signals.fire_lost("second reason");
        assert!(watcher.is_lost());
        assert!(child.is_cancelled(), "children stop with the session");
        assert_eq!(
            watcher.reason().as_deref(),
            Some("terminated by the server")
        );
    }
}
