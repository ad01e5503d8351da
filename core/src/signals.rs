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

/// Held by a driver's watching task: fires the loss signal if the task ends
/// (e.g. its runtime shuts down) before it was stopped or had fired, so an
/// unwatched session never passes for a healthy one.
#[derive(Debug)]
pub struct WatchGuard {
    signals: SessionSignals,
    stop: CancellationToken,
    vanished: String,
    armed: bool,
}

impl WatchGuard {
    /// Guards `signals` until `stop` fires; `vanished` is the reason given
    /// if the watching task ends unstopped.
    pub fn new(signals: SessionSignals, stop: CancellationToken, vanished: String) -> Self {
        Self {
            signals,
            stop,
            vanished,
            armed: true,
        }
    }

    /// Fires the loss signal with `reason`, unless the watch was stopped;
    /// disarms the guard either way.
    pub fn fire(&mut self, reason: String) {
        self.armed = false;
        if !self.stop.is_cancelled() {
            self.signals.fire_lost(reason);
        }
    }

    /// Ends the watch without firing (the watcher was stopped on purpose).
    pub fn disarm(&mut self) {
        self.armed = false;
    }
}

impl Drop for WatchGuard {
    fn drop(&mut self) {
        if self.armed && !self.stop.is_cancelled() {
            self.signals.fire_lost(std::mem::take(&mut self.vanished));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unstopped_watch_that_vanishes_fires() {
        let signals = SessionSignals::new();
        let stop = CancellationToken::new();
        drop(WatchGuard::new(
            signals.clone(),
            stop.clone(),
            "watcher of 42 gone".into(),
        ));
        assert!(signals.is_lost());
        assert!(signals.reason().unwrap_or_default().contains("42"));

        let quiet = SessionSignals::new();
        stop.cancel();
        let mut guard = WatchGuard::new(quiet.clone(), stop, "gone".into());
        guard.fire("granted".into());
        drop(guard);
        assert!(!quiet.is_lost(), "a stopped watch never fires");
    }

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
