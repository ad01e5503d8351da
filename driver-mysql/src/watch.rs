//! The loss signal of a session: a second connection that waits **in the
//! server** for the session's end, so the session learns of it without
//! sending a statement.
//!
//! sqlx's `MySqlConnection` reads its socket only during a statement, so an
//! idle session cannot see the server close it. Instead, at connect the
//! session's main connection takes a *liveness lock*
//! (`GET_LOCK('shardlock:live:<random>', 0)`) that nobody else ever asks
//! for, and a watcher connection waits for that same lock in a blocking
//! `GET_LOCK`. The server frees a connection's named locks the moment the
//! connection ends, whatever ends it (`KILL`, `wait_timeout`, a restart, a
//! vanished client noticed by the server), and wakes the waiter: the
//! watcher is granted within milliseconds and fires
//! [`SessionSignals::lost`]. No polling: both connections sleep in the
//! server until then.
//!
//! # Invariants
//!
//! 1. The liveness lock's name starts with `shardlock:live:`, never a key's
//!    prefix (`shardlock:v1:`), and no statement of the driver that works
//!    on keys touches it; its 64-bit suffix is random per session.
//! 2. Only a stopped watcher may see the liveness lock freed by its own
//!    session: [`Watcher::stop`] (called by `close` and `Drop` before
//!    anything else) makes the task exit without firing, and no statement
//!    of a live session frees the liveness lock (`release_all` releases the
//!    held keys by name; `RELEASE_ALL_LOCKS()` runs only in close and drop).
//! 3. Otherwise the task always ends by firing `lost`: granted (the main
//!    connection ended), its own connection failed, or the task was dropped
//!    unstopped (its runtime shut down).

use std::fmt;
use std::time::Duration;

use shardlock_core::{CancellationToken, SessionSignals, WatchGuard};
use sqlx::mysql::MySqlConnection;
use sqlx::{Connection, Executor, Row};
use tokio::runtime::Handle;
use tracing::{debug, warn};

use crate::error::MySqlCause;
use crate::sql;

/// How long the watcher's graceful close may take after it fired.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// A fresh liveness lock name.
pub(crate) fn liveness_name() -> String {
    format!("shardlock:live:{:016x}", fastrand::u64(..))
}

/// The running watcher of one session. Dropping it stops it.
pub(crate) struct Watcher {
    stop: CancellationToken,
    connection_id: u64,
}

/// What the watcher watches.
pub(crate) struct Watched {
    /// The watcher's own connection, configured.
    pub(crate) conn: MySqlConnection,
    /// The watcher's connection id.
    pub(crate) connection_id: u64,
    /// The main connection's id.
    pub(crate) main_id: u64,
    /// The liveness lock the main connection holds.
    pub(crate) liveness: String,
    /// The node's name, for the statement's label.
    pub(crate) node: String,
}

impl Watcher {
    /// Starts the watching task on `handle`.
    pub(crate) fn start(handle: &Handle, watched: Watched, signals: SessionSignals) -> Self {
        let stop = CancellationToken::new();
        let connection_id = watched.connection_id;
        let _task = handle.spawn(watch(watched, signals, stop.clone()));
        Self {
            stop,
            connection_id,
        }
    }

    /// Stops watching without firing. Never blocks.
    pub(crate) fn stop(&self) {
        self.stop.cancel();
    }

    /// The watcher's connection id.
    pub(crate) fn connection_id(&self) -> u64 {
        self.connection_id
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.stop();
    }
}

impl fmt::Debug for Watcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Watcher")
            .field("connection_id", &self.connection_id)
            .field("stopped", &self.stop.is_cancelled())
            .finish()
    }
}

/// The watching task: waits in `GET_LOCK(liveness)` until the main
/// connection ends (granted), the watcher's connection fails, or `stop`.
async fn watch(watched: Watched, signals: SessionSignals, stop: CancellationToken) {
    let Watched {
        mut conn,
        connection_id,
        main_id,
        liveness,
        node,
    } = watched;
    let mut armed = WatchGuard::new(
        signals,
        stop.clone(),
        format!("the task watching connection {main_id} stopped (its runtime shut down), so the end of the session can no longer be seen"),
    );
    let statement = sql::watch(&node, main_id, &liveness);
    loop {
        let result = {
            let wait = conn.fetch_one(sqlx::raw_sql(&statement));
            tokio::select! {
                biased;
                () = stop.cancelled() => None,
                result = wait => Some(result),
            }
        };
        let Some(result) = result else {
            // Stopped: the session closes; dropping the connection ends the
            // watcher's server thread once the liveness lock is freed.
            armed.disarm();
            debug!(main_id, connection_id, "watcher stopped");
            return;
        };
        match result.and_then(|row| row.try_get::<Option<i64>, _>(0)) {
            Ok(Some(1)) => {
                armed.fire(format!(
                    "the server ended the session (connection {main_id}): its liveness lock \
                     was freed"
                ));
                break;
            }
            // A year without an answer: wait again.
            Ok(Some(0)) => continue,
            Ok(_) => {
                armed.fire(format!(
                    "the watcher's wait for connection {main_id} was killed (connection \
                     {connection_id}), so the end of the session can no longer be seen"
                ));
                break;
            }
            Err(err) => {
                let cause = MySqlCause::from(err);
                if !stop.is_cancelled() {
                    warn!(main_id, connection_id, error = %cause, "the watcher's connection failed");
                }
                armed.fire(format!(
                    "the connection watching the session (connection {connection_id}) failed, \
                     so the end of the session can no longer be seen: {cause}"
                ));
                return;
            }
        }
    }
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, conn.close()).await;
}
