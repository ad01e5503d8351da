//! Session-fenced transactions: a transaction on the connection that holds
//! the session's `GET_LOCK` locks (see [`MySqlSession::transaction`]).

use std::fmt;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::AtomicU64;

use shardlock_core::fenced::{FencedTransaction, FencedTx};
use shardlock_core::{CheckpointError, FencedError, Holds, Result};
use sqlx::mysql::{MySql, MySqlConnection};

use crate::checkpoints::MySqlCheckpoints;
use crate::error::MySqlError;

/// A transaction on a [`MySqlSession`](crate::MySqlSession)'s own
/// connection, the one holding its `GET_LOCK` locks: the projection's
/// writes and its checkpoint ([`MySqlCheckpoints::save_in`], or
/// [`commit_checkpoint`](Self::commit_checkpoint)) commit there, so a
/// leader whose connection was killed cannot commit them (see below).
/// InnoDB tables only: writes to a non-transactional table (MyISAM) are
/// not fenced.
///
/// Dereferences to the [`MySqlConnection`]: run statements with
/// `.execute(&mut *tx)`.
///
/// # Drop
///
/// Dropped without [`commit`](Self::commit) or [`rollback`](Self::rollback),
/// it is rolled back: sqlx queues a `ROLLBACK` that the session's next round
/// trip sends first. Named locks are not transactional, so a rollback never
/// frees them.
///
/// # Do not
///
/// Take or release named locks inside (`GET_LOCK`, `RELEASE_LOCK`,
/// `RELEASE_ALL_LOCKS()`): the session's bookkeeping would no longer match
/// the server; `RELEASE_ALL_LOCKS()` also frees the liveness lock, so the
/// loss signal fires. Nor run statements that commit implicitly (DDL) if
/// they should be fenced.
///
/// # Why it fences
///
/// Named locks belong to the connection that took them: they are freed by
/// `RELEASE_LOCK` or when that connection ends, never by `COMMIT` or
/// `ROLLBACK` ("Locks obtained with `GET_LOCK()` do not interact with
/// transactions", <https://mariadb.com/kb/en/get_lock/>; MySQL: "released
/// implicitly when your session terminates (either normally or
/// abnormally)", <https://dev.mysql.com/doc/refman/8.0/en/locking-functions.html>).
/// A transaction on that same connection can therefore only commit while
/// the connection lives, i.e. while it still holds every lock of the
/// session: once the connection was ended (`KILL <id>`, `wait_timeout`, a
/// restart) its `COMMIT` cannot be sent, and the server rolls the open
/// transaction back **before** it frees the connection's named locks.
///
/// That order is the server's, checked in its source, `THD::cleanup()` in
/// `sql/sql_class.cc`, which a connection's thread runs when it ends: it
/// calls `trans_rollback(this)` first and `mysql_ull_cleanup(this)` (which
/// frees the user-level locks, i.e. `GET_LOCK`'s) only afterwards. Read in
/// MariaDB/server (10.x/11.x, commit `bf2bdd1a1a11`) and in MySQL
/// 8.0-based trees (the same two calls in the same order); MySQL 5.0
/// already had `ha_rollback` before `item_user_lock_release`. The test
/// `driver-mysql/tests/fenced.rs` kills leaders mid-batch and counts 0
/// stale effects.
/// Both run on the killed connection's own thread, after the statement it
/// was executing (a `COMMIT` in flight included) has finished. So a commit
/// the server did process happened while the locks were held, and a
/// follower's `GET_LOCK` (and its claim of the subscription) is granted
/// only after the stale transaction was rolled back: no stale effect can
/// commit after a handover.
///
/// # What it does not fence
///
/// - **Non-transactional tables** (MyISAM, Aria, MEMORY...): their writes
///   take effect at once and are never rolled back, so they are neither
///   atomic with the checkpoint nor undone when the connection is killed
///   (they still happen before the locks are freed, but the next leader
///   applies the same events again). Keep projection tables **InnoDB**, as
///   the checkpoint table is.
/// - **Statements that commit implicitly** (DDL such as `CREATE TABLE`,
///   `LOCK TABLES`, `START TRANSACTION` inside the transaction, ...) commit
///   what was written so far on the spot; only what follows stays fenced.
pub struct MySqlTransaction<'s> {
    inner: FencedTransaction<'s, MySqlTx<'s>>,
}

/// The sqlx transaction, ended by core's fenced decisions.
struct MySqlTx<'s>(sqlx::Transaction<'s, MySql>);

impl FencedTx for MySqlTx<'_> {
    type Error = MySqlError;

    async fn commit(self, op: &'static str) -> std::result::Result<(), MySqlError> {
        self.0
            .commit()
            .await
            .map_err(|e| MySqlError::from_query(op, e))
    }

    async fn rollback(self, op: &'static str) -> std::result::Result<(), MySqlError> {
        self.0
            .rollback()
            .await
            .map_err(|e| MySqlError::from_query(op, e))
    }

    async fn save_checkpoint(
        &mut self,
        subscription: &str,
        epoch: i64,
        position: i64,
    ) -> std::result::Result<(), CheckpointError> {
        MySqlCheckpoints::save_in(&mut self.0, subscription, epoch, position).await
    }
}

impl<'s> MySqlTransaction<'s> {
    pub(crate) fn new(
        tx: sqlx::Transaction<'s, MySql>,
        holds: &'s mut Holds,
        id: u64,
        round_trips: &'s AtomicU64,
    ) -> Self {
        Self {
            inner: FencedTransaction::new(MySqlTx(tx), holds, round_trips, id),
        }
    }

    /// The server's id of the session's connection (`CONNECTION_ID()`),
    /// which runs this transaction.
    pub fn connection_id(&self) -> u64 {
        self.inner.connection()
    }

    /// Commits, if the session is still sound: its loss signal has not
    /// fired (checked right before `COMMIT` is sent) and no earlier round
    /// trip was interrupted. The commit itself is the fence: it runs on the
    /// lock-holding connection, so it only succeeds while that connection,
    /// and so every lock of the session, is alive.
    ///
    /// # Errors
    ///
    /// [`SessionLost`](shardlock_core::Error::SessionLost) when the session
    /// is lost (then nothing was committed: the transaction is rolled back,
    /// or died with its connection, and the session is poisoned); the
    /// driver's other errors as [`Driver`](shardlock_core::Error::Driver)
    /// (e.g. a deadlock reported at commit; nothing committed, the session
    /// stays usable).
    ///
    /// # Cancel safety
    ///
    /// Not cancel-safe: dropped while `COMMIT` is in flight, whether it
    /// committed is unknown, and the session is poisoned at its next call
    /// (leadership is given up).
    pub async fn commit(self) -> Result<()> {
        self.inner.commit().await
    }

    /// Saves the checkpoint in this transaction
    /// ([`MySqlCheckpoints::save_in`], with its fencing epoch), then
    /// [`commit`](Self::commit)s: the projection's writes made so far and
    /// the checkpoint commit together, or neither does.
    ///
    /// # Errors
    ///
    /// [`FencedError::Checkpoint`] when the save is refused
    /// ([`FencedOff`](shardlock_core::CheckpointError::FencedOff),
    /// [`NotClaimed`](shardlock_core::CheckpointError::NotClaimed)) or
    /// fails: the transaction is rolled back. [`FencedError::SessionLost`]
    /// when the session is lost, before or at the commit. Nothing was
    /// committed either way.
    pub async fn commit_checkpoint(
        self,
        subscription: &str,
        epoch: i64,
        position: i64,
    ) -> std::result::Result<(), FencedError> {
        self.inner
            .commit_checkpoint(subscription, epoch, position)
            .await
    }

    /// Rolls back. Dropping the transaction does the same without waiting.
    ///
    /// # Errors
    ///
    /// The driver's, e.g. [`SessionLost`](shardlock_core::Error::SessionLost)
    /// when the connection is gone (then the server rolled back already).
    pub async fn rollback(self) -> Result<()> {
        self.inner.rollback().await
    }
}

impl Deref for MySqlTransaction<'_> {
    type Target = MySqlConnection;

    fn deref(&self) -> &MySqlConnection {
        &self.inner.tx().0
    }
}

impl DerefMut for MySqlTransaction<'_> {
    fn deref_mut(&mut self) -> &mut MySqlConnection {
        &mut self.inner.tx_mut().0
    }
}

impl fmt::Debug for MySqlTransaction<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MySqlTransaction")
            .field("connection_id", &self.inner.connection())
            .field("lost", &self.inner.is_lost())
            .finish()
    }
}
