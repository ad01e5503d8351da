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

use shardlock_core::watch::{LivenessWait, Seen};
use shardlock_core::SessionSignals;
use sqlx::mysql::MySqlConnection;
use sqlx::{Connection, Executor, Row};
use tokio::runtime::Handle;

use crate::error::MySqlCause;
use crate::sql;

/// A fresh liveness lock name.
pub(crate) fn liveness_name() -> String {
    format!("shardlock:live:{:016x}", fastrand::u64(..))
}

/// The running watcher of one session (core's task, with the watcher's
/// connection id). Dropping it stops it.
pub(crate) type Watcher = shardlock_core::watch::Watcher<u64>;

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

/// Starts the watcher of `watched` on `handle`.
pub(crate) fn start(handle: &Handle, watched: Watched, signals: SessionSignals) -> Watcher {
    let Watched {
        conn,
        connection_id,
        main_id,
        liveness,
        node,
    } = watched;
    let vanished = format!(
        "the task watching connection {main_id} stopped (its runtime shut down), so the end of \
         the session can no longer be seen"
    );
    let wait = Wait {
        statement: sql::watch(&node, main_id, &liveness),
        conn,
        connection_id,
        main_id,
    };
    Watcher::start(handle, connection_id, wait, signals, vanished)
}

/// The watcher's `GET_LOCK(liveness)`: granted once the main connection
/// ended.
struct Wait {
    conn: MySqlConnection,
    statement: String,
    connection_id: u64,
    main_id: u64,
}

impl LivenessWait for Wait {
    async fn wait(&mut self) -> Seen {
        let Self {
            conn,
            statement,
            connection_id,
            main_id,
        } = self;
        let answer = conn.fetch_one(sqlx::raw_sql(statement)).await;
        match answer.and_then(|row| row.try_get::<Option<i64>, _>(0)) {
            Ok(Some(1)) => Seen::Ended(format!(
                "the server ended the session (connection {main_id}): its liveness lock was freed"
            )),
            // A year without an answer: wait again.
            Ok(Some(0)) => Seen::Again,
            Ok(_) => Seen::Ended(format!(
                "the watcher's wait for connection {main_id} was killed (connection \
                 {connection_id}), so the end of the session can no longer be seen"
            )),
            Err(err) => Seen::Failed(format!(
                "the connection watching the session (connection {connection_id}) failed, so \
                 the end of the session can no longer be seen: {}",
                MySqlCause::from(err)
            )),
        }
    }

    async fn close(self) {
        let _ = self.conn.close().await;
    }
}
