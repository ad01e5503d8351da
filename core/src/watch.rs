//! The task behind an emulated loss signal, for drivers that learn of a
//! session's end by waiting **in the server** on a second connection (the
//! watcher): the MySQL driver waits for its session's liveness `GET_LOCK`.
//! The server frees the lock the moment the session's connection ends and
//! wakes the watcher, which fires
//! [`SessionSignals::lost`](crate::SessionSignals::lost). (The Postgres
//! driver needs no watcher: it reads its session's own connection between
//! calls.)
//!
//! Each driver implements [`LivenessWait`] with its statement and what its
//! answers mean; the task, its stop and its guarantees are here.
//!
//! # Invariants
//!
//! 1. A stopped watcher ([`Watcher::stop`], also on drop) never fires: the
//!    task exits without firing, whether the stop came before or after the
//!    server answered (a closing session frees its liveness lock itself).
//! 2. Otherwise the task always ends by firing `lost`: the wait saw the
//!    session end ([`Seen::Ended`]), the watcher's own connection failed
//!    ([`Seen::Failed`]), or the task was dropped unstopped (its runtime
//!    shut down; [`WatchGuard`] fires then).
//! 3. No polling: a [`Seen::Again`] (the server's own timeout of the wait)
//!    waits again at once.

use std::fmt;
use std::future::Future;
use std::time::Duration;

use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::signals::{SessionSignals, WatchGuard};

/// How long the watcher's graceful close may take after it fired.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// What one wait of the watcher saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    /// The session is gone (or can no longer be watched, its connection
    /// still usable): fire with this reason, then close the connection.
    Ended(String),
    /// The wait's own server-side timeout ran out: wait again.
    Again,
    /// The watcher's connection failed: fire with this reason and drop it.
    Failed(String),
}

/// A driver's wait in the server for its session's end, on the watcher's
/// own connection.
pub trait LivenessWait: Send + 'static {
    /// Waits once; dropped unfinished when the watcher is stopped.
    fn wait(&mut self) -> impl Future<Output = Seen> + Send;

    /// Closes the watcher's connection gracefully (after [`Seen::Ended`]).
    fn close(self) -> impl Future<Output = ()> + Send;
}

/// The running watcher of one session: `I` is the server's id of the
/// watcher's connection. Dropping it stops it.
pub struct Watcher<I> {
    stop: CancellationToken,
    id: I,
}

impl<I: Copy + fmt::Debug + Send + 'static> Watcher<I> {
    /// Starts `wait`ing on `handle` for the end of the session whose signals
    /// are `signals`; `id` is the watcher connection's id, `vanished` the
    /// reason fired if the task ends unstopped (its runtime shut down).
    pub fn start<W: LivenessWait>(
        handle: &Handle,
        id: I,
        wait: W,
        signals: SessionSignals,
        vanished: String,
    ) -> Self {
        let stop = CancellationToken::new();
        let armed = WatchGuard::new(signals, stop.clone(), vanished);
        let _task = handle.spawn(watch(wait, armed, stop.clone(), id));
        Self { stop, id }
    }

    /// Stops watching without firing: the task exits and drops its
    /// connection. Never blocks.
    pub fn stop(&self) {
        self.stop.cancel();
    }

    /// The server's id of the watcher's connection.
    pub fn id(&self) -> I {
        self.id
    }
}

impl<I> Drop for Watcher<I> {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl<I: fmt::Debug> fmt::Debug for Watcher<I> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Watcher")
            .field("id", &self.id)
            .field("stopped", &self.stop.is_cancelled())
            .finish()
    }
}

/// The watching task: waits until the session ends, the watcher's
/// connection fails, or `stop`.
async fn watch<W: LivenessWait, I: fmt::Debug>(
    mut wait: W,
    mut armed: WatchGuard,
    stop: CancellationToken,
    id: I,
) {
    loop {
        let seen = {
            let seen = wait.wait();
            tokio::select! {
                biased;
                () = stop.cancelled() => None,
                seen = seen => Some(seen),
            }
        };
        let Some(seen) = seen.filter(|_| !stop.is_cancelled()) else {
            // Stopped: the session closes (and frees its liveness lock
            // itself); dropping the connection ends the watcher's wait.
            armed.disarm();
            debug!(watcher = ?id, "session watcher stopped");
            return;
        };
        match seen {
            Seen::Again => continue,
            Seen::Ended(reason) => {
                warn!(watcher = ?id, %reason, "session lost");
                armed.fire(reason);
                break;
            }
            Seen::Failed(reason) => {
                warn!(watcher = ?id, %reason, "the connection watching the session failed: treating the session as lost");
                armed.fire(reason);
                return;
            }
        }
    }
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, wait.close()).await;
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    use super::*;

    /// Answers `script` one wait at a time, then waits forever.
    struct Scripted {
        script: VecDeque<Seen>,
        closed: Arc<AtomicBool>,
    }

    impl LivenessWait for Scripted {
        async fn wait(&mut self) -> Seen {
            match self.script.pop_front() {
                Some(seen) => seen,
                None => std::future::pending().await,
            }
        }

        async fn close(self) {
            self.closed.store(true, Ordering::SeqCst);
        }
    }

    fn start(script: Vec<Seen>) -> (Watcher<u64>, SessionSignals, Arc<AtomicBool>) {
        let signals = SessionSignals::new();
        let closed = Arc::new(AtomicBool::new(false));
        let wait = Scripted {
            script: script.into(),
            closed: Arc::clone(&closed),
        };
        let watcher = Watcher::start(
            &Handle::current(),
            7,
            wait,
            signals.clone(),
            "vanished".into(),
        );
        (watcher, signals, closed)
    }

    async fn lost(signals: &SessionSignals) -> String {
        tokio::time::timeout(Duration::from_secs(5), signals.lost().cancelled())
            .await
            .expect("the loss signal fires");
        signals.reason().unwrap_or_default()
    }

    #[tokio::test]
    async fn an_ended_session_fires_after_timeouts_and_closes_the_connection() {
        let (watcher, signals, closed) = start(vec![
            Seen::Again,
            Seen::Again,
            Seen::Ended("the server ended it".into()),
        ]);
        assert_eq!(lost(&signals).await, "the server ended it");
        tokio::time::timeout(Duration::from_secs(5), async {
            while !closed.load(Ordering::SeqCst) {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("closed gracefully");
        assert_eq!(watcher.id(), 7);
    }

    #[tokio::test]
    async fn a_failed_watcher_fires_without_closing() {
        let (_watcher, signals, closed) = start(vec![Seen::Failed("reset".into())]);
        assert_eq!(lost(&signals).await, "reset");
        tokio::task::yield_now().await;
        assert!(
            !closed.load(Ordering::SeqCst),
            "a broken connection is dropped"
        );
    }

    #[tokio::test]
    async fn a_stopped_watcher_never_fires() {
        let (watcher, signals, _) = start(vec![]);
        tokio::task::yield_now().await;
        drop(watcher);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!signals.is_lost(), "{:?}", signals.reason());
    }

    #[test]
    fn a_watcher_whose_runtime_ends_fires() {
        let signals = SessionSignals::new();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let wait = Scripted {
            script: VecDeque::new(),
            closed: Arc::default(),
        };
        let watcher = Watcher::start(
            runtime.handle(),
            1u64,
            wait,
            signals.clone(),
            "vanished".into(),
        );
        runtime.block_on(tokio::task::yield_now());
        drop(runtime);
        assert!(signals.is_lost());
        assert_eq!(signals.reason().as_deref(), Some("vanished"));
        drop(watcher);
    }
}
