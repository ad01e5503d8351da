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
//! 4. A wait the server cannot queue because its shared lock table is full
//!    (`53200`, which a big batch can cause for a moment) is retried after a
//!    pause, not taken for a loss (core's `Seen::Busy`).
//!
//! A cut-off network is not covered: both connections just hang, and the
//! coordinator's verify deadline (self-fencing) stops the work.

use std::collections::hash_map::RandomState;
use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use shardlock_core::watch::{LivenessWait, Seen};
use shardlock_core::{NodeId, SessionSignals};
use sqlx::postgres::PgConnection;
use sqlx::Connection;
use tokio::runtime::Handle;

use crate::error::{classify, sqlstate_of, Class, PgCause};
use crate::sql;

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

/// The running watcher of one session (core's task, with the watcher's
/// backend pid). Dropping it stops it: the task exits without firing and
/// drops its connection (its backend, still waiting, ends when it notices,
/// or is granted and ends once the session closes).
pub(crate) type Watcher = shardlock_core::watch::Watcher<i32>;

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
}

/// Starts the watcher of `watched` on `handle`.
pub(crate) fn start(handle: &Handle, watched: Watched, signals: SessionSignals) -> Watcher {
    let Watched {
        conn,
        pid,
        main_pid,
        liveness,
    } = watched;
    let vanished = format!(
        "the task watching backend {main_pid} stopped (its runtime shut down), so the end of \
         the session can no longer be seen"
    );
    let wait = Wait {
        conn,
        main_pid,
        liveness,
    };
    Watcher::start(handle, pid, wait, signals, vanished)
}

/// The watcher's `pg_advisory_lock(liveness)`: granted once the main
/// backend ended.
struct Wait {
    conn: PgConnection,
    main_pid: i32,
    liveness: Liveness,
}

impl LivenessWait for Wait {
    async fn wait(&mut self) -> Seen {
        let main_pid = self.main_pid;
        let answer = sqlx::query(sql::WATCH_LIVENESS)
            .bind(self.liveness.hi)
            .bind(self.liveness.lo)
            .execute(&mut self.conn)
            .await;
        match answer {
            Ok(_) => Seen::Ended(format!("the server ended the session (backend {main_pid})")),
            // Queuing the wait needs a slot in the shared lock table, which
            // a big batch (this node's or another's) may have filled: the
            // watcher's connection is fine, so wait again later.
            Err(err) if sqlstate_of(&err).map(classify) == Some(Class::LockTableFull) => {
                Seen::Busy(format!(
                    "the lock table is full, so the wait for backend {main_pid}'s end cannot \
                     be queued: {}",
                    PgCause::from(err)
                ))
            }
            Err(err) => Seen::Failed(format!(
                "the connection watching backend {main_pid} failed, so the end of the session \
                 can no longer be seen: {}",
                PgCause::from(err)
            )),
        }
    }

    async fn close(self) {
        let _ = self.conn.close().await;
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
