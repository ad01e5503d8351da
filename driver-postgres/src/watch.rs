//! The loss signal of a session: a second connection that waits **in the
//! server** for the session's end, so the session learns of it without
//! sending a statement.
//!
//! sqlx's `PgConnection` reads its socket only during a statement, so an idle
//! session cannot see the server close it. Instead, at connect the session's
//! main connection takes a *liveness lock* that nobody else ever asks for,
//! and a watcher connection (`application_name` `shardlock:<node>:watch`)
//! waits for that same lock in `pg_advisory_lock`. PostgreSQL frees a
//! backend's session locks the moment the backend exits, whatever ends it
//! (`pg_terminate_backend`, a crash, a restart, an idle timeout, a vanished
//! client noticed by keepalives), and wakes the waiter: the watcher is
//! granted within milliseconds and fires [`SessionSignals::lost`]. No polling:
//! both backends sleep in the server until then.
//!
//! # Invariants
//!
//! 1. The liveness lock uses the two-`int4` form of the advisory-lock
//!    functions (`pg_locks.objsubid = 2`): it can never collide with a
//!    shardlock key (`bigint` form, `objsubid = 1`), and no statement of the
//!    driver that works on keys touches it. Its two halves are random and
//!    non-negative (62 random bits), drawn afresh per session.
//! 2. Only a stopped watcher may see the liveness lock freed by its own
//!    session: [`Watcher::stop`] (called by `close` and `Drop` before anything
//!    else) makes the task exit without firing, and no statement of a live
//!    session frees the liveness lock (`release_all` unlocks the held keys,
//!    never `pg_advisory_unlock_all()`).
//! 3. Otherwise the task always ends by firing `lost`: granted (the main
//!    backend ended), its own connection failed (a server restart ends both;
//!    a terminated watcher costs a needless reconnect, never an overlap), or
//!    the task itself was dropped unstopped (its runtime shut down).
//!
//! A cut-off network is not covered: both connections just hang, and the
//! coordinator's verify deadline (self-fencing) stops the work.

use std::collections::hash_map::RandomState;
use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use shardlock_core::{CancellationToken, DatabaseId, NodeId, SessionSignals, WatchGuard};
use sqlx::postgres::PgConnection;
use sqlx::Connection;
use tokio::runtime::Handle;
use tracing::{debug, warn};

use crate::error::PgCause;
use crate::sql;

/// How long the watcher's graceful close may take after it fired.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// The key of a session's liveness lock: `pg_advisory_lock(hi, lo)`, the
/// two-`int4` form (`pg_locks`: `classid = hi`, `objid = lo`,
/// `objsubid = 2`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Liveness {
    pub(crate) hi: i32,
    pub(crate) lo: i32,
}

impl Liveness {
    /// A fresh random key for a session of `node`.
    pub(crate) fn generate(node: &NodeId) -> Self {
        let bits = random_u64(node.as_str());
        Self {
            hi: ((bits >> 32) as u32 & 0x7fff_ffff) as i32,
            lo: (bits as u32 & 0x7fff_ffff) as i32,
        }
    }
}

impl fmt::Display for Liveness {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "({}, {})", self.hi, self.lo)
    }
}

/// 64 random bits without a dependency: std's randomly keyed SipHash (fresh
/// keys per `RandomState`) over the time, the process, a counter and `salt`.
pub(crate) fn random_u64(salt: &str) -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut hasher = RandomState::new().build_hasher();
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    hasher.write_u128(nanos);
    hasher.write_u32(std::process::id());
    hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    hasher.write(salt.as_bytes());
    hasher.finish()
}

/// The running watcher of one session. Dropping it stops it.
pub(crate) struct Watcher {
    stop: CancellationToken,
    pid: i32,
}

/// What the watcher watches.
pub(crate) struct Watched {
    /// The watcher's own connection, configured.
    pub(crate) conn: PgConnection,
    /// The watcher's backend.
    pub(crate) pid: i32,
    /// The main connection's backend.
    pub(crate) main_pid: i32,
    /// The liveness lock the main backend holds.
    pub(crate) liveness: Liveness,
    pub(crate) database: DatabaseId,
}

impl Watcher {
    /// Starts the watching task on `handle`.
    pub(crate) fn start(handle: &Handle, watched: Watched, signals: SessionSignals) -> Self {
        let stop = CancellationToken::new();
        let pid = watched.pid;
        let _task = handle.spawn(watch(watched, signals, stop.clone()));
        Self { stop, pid }
    }

    /// Stops watching: the task exits without firing and drops its
    /// connection (its backend, still waiting, ends when it notices, or is
    /// granted and ends once the session closes). Never blocks.
    pub(crate) fn stop(&self) {
        self.stop.cancel();
    }

    /// The watcher's backend pid.
    pub(crate) fn pid(&self) -> i32 {
        self.pid
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
            .field("pid", &self.pid)
            .field("stopped", &self.stop.is_cancelled())
            .finish()
    }
}

/// The watching task: waits in `pg_advisory_lock(liveness)` until the main
/// backend ends (granted), the watcher's connection fails, or `stop`.
async fn watch(watched: Watched, signals: SessionSignals, stop: CancellationToken) {
    let Watched {
        mut conn,
        pid,
        main_pid,
        liveness,
        database,
    } = watched;
    let mut armed = WatchGuard::new(
        signals,
        stop.clone(),
        format!("the task watching backend {main_pid} stopped (its runtime shut down), so the end of the session can no longer be seen"),
    );
    let result = {
        let wait = sqlx::query(sql::WATCH_LIVENESS)
            .bind(liveness.hi)
            .bind(liveness.lo)
            .execute(&mut conn);
        tokio::select! {
            biased;
            () = stop.cancelled() => None,
            result = wait => Some(result),
        }
    };
    let Some(result) = result else {
        armed.disarm();
        debug!(%database, main_pid, watcher_pid = pid, "session watcher stopped");
        return;
    };
    if stop.is_cancelled() {
        // The session is closing and freed the lock itself.
        armed.disarm();
        return;
    }
    match result {
        Ok(_) => {
            warn!(%database, main_pid, "the server ended the session: its locks are gone");
            armed.fire(format!("the server ended the session (backend {main_pid})"));
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, conn.close()).await;
        }
        Err(err) => {
            warn!(%database, main_pid, watcher_pid = pid, error = %err,
                "the connection watching the session failed: treating the session as lost");
            let cause = PgCause::from(err);
            armed.fire(format!(
                "the connection watching backend {main_pid} failed, so the end of the session \
                 can no longer be seen: {cause}"
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn liveness_keys_are_random_and_non_negative() {
        let node = NodeId::new("n");
        let keys: Vec<Liveness> = (0..1000).map(|_| Liveness::generate(&node)).collect();
        assert!(keys.iter().all(|k| k.hi >= 0 && k.lo >= 0));
        let distinct: std::collections::HashSet<_> = keys.iter().map(|k| (k.hi, k.lo)).collect();
        assert_eq!(distinct.len(), keys.len(), "no repeats in 1,000 draws");
        let his: std::collections::HashSet<_> = keys.iter().map(|k| k.hi).collect();
        assert!(his.len() > 900, "both halves vary: {}", his.len());
    }
}
