//! Session-fenced transactions: a transaction on the connection that holds
//! the session's advisory locks (see [`PgSession::transaction`]).
//!
//! # Why it fences
//!
//! Session-level advisory locks live as long as the backend that took them.
//! A transaction on that same backend can therefore only commit while the
//! backend lives, i.e. while it still holds every lock of the session: once
//! the backend was ended (`pg_terminate_backend`, a restart, a failover) its
//! `COMMIT` fails, and PostgreSQL rolls the open transaction back as the
//! backend exits, **before** its locks are freed. A commit that the server
//! did process happened while the locks were held (a terminating backend
//! finishes a commit already in progress and frees its locks only on exit),
//! so no follower can have taken the lock (and claimed the subscription)
//! before that commit.
//!
//! [`PgSession::transaction`]: crate::PgSession::transaction

use std::fmt;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::AtomicU64;

use shardlock_core::fenced::{FencedTransaction, FencedTx};
use shardlock_core::{CheckpointError, FencedError, Holds, Result};
use sqlx::postgres::{PgConnection, Postgres};

use crate::checkpoints::PgCheckpoints;
use crate::error::PgError;

/// A transaction on a [`PgSession`](crate::PgSession)'s own connection, the
/// one holding its advisory locks: the projection's writes and its
/// checkpoint ([`PgCheckpoints::save_in`], or
/// [`commit_checkpoint`](Self::commit_checkpoint)) commit there, so a leader
/// whose backend was ended cannot commit them (see the module docs of
/// [`PgSession::transaction`](crate::PgSession::transaction)).
///
/// Dereferences to the [`PgConnection`]: run statements with
/// `.execute(&mut *tx)`.
///
/// # Drop
///
/// Dropped without [`commit`](Self::commit) or [`rollback`](Self::rollback),
/// it is rolled back: sqlx queues a `ROLLBACK` that the session's next round
/// trip sends first. Advisory locks are not transactional, so a rollback
/// never frees them.
///
/// # Do not
///
/// Take or release advisory locks inside (`pg_advisory_lock`,
/// `pg_advisory_unlock_all`, ...): the session's bookkeeping would no longer
/// match the server; the next [`verify`](shardlock_core::Session::verify)
/// notices a missing key or liveness lock and poisons the session.
pub struct PgTransaction<'s> {
    inner: FencedTransaction<'s, PgTx<'s>>,
    pid: i32,
}

/// The sqlx transaction, ended by core's fenced decisions.
struct PgTx<'s>(sqlx::Transaction<'s, Postgres>);

impl FencedTx for PgTx<'_> {
    type Error = PgError;

    async fn commit(self, op: &'static str) -> std::result::Result<(), PgError> {
        self.0
            .commit()
            .await
            .map_err(|e| PgError::from_query(op, e))
    }

    async fn rollback(self, op: &'static str) -> std::result::Result<(), PgError> {
        self.0
            .rollback()
            .await
            .map_err(|e| PgError::from_query(op, e))
    }

    async fn save_checkpoint(
        &mut self,
        subscription: &str,
        epoch: i64,
        position: i64,
    ) -> std::result::Result<(), CheckpointError> {
        PgCheckpoints::save_in(&mut self.0, subscription, epoch, position).await
    }
}

impl<'s> PgTransaction<'s> {
    pub(crate) fn new(
        tx: sqlx::Transaction<'s, Postgres>,
        holds: &'s mut Holds,
        pid: i32,
        round_trips: &'s AtomicU64,
    ) -> Self {
        let connection = u64::from(pid.unsigned_abs());
        Self {
            inner: FencedTransaction::new(PgTx(tx), holds, round_trips, connection),
            pid,
        }
    }

    /// The server process of the session (its `pg_backend_pid()`), which
    /// runs this transaction.
    pub fn backend_pid(&self) -> i32 {
        self.pid
    }

    /// Commits, if the session is still sound: its loss signal has not
    /// fired (checked right before `COMMIT` is sent) and no earlier round
    /// trip was interrupted. The commit itself is the fence: it runs on the
    /// lock-holding backend, so it only succeeds while that backend, and so
    /// every lock of the session, is alive.
    ///
    /// # Errors
    ///
    /// [`SessionLost`](shardlock_core::Error::SessionLost) when the session is lost (then nothing was
    /// committed: the transaction is rolled back, or died with its
    /// backend, and the session is poisoned); the driver's other errors as
    /// [`Driver`](shardlock_core::Error::Driver) (e.g. a deferred constraint; nothing committed,
    /// the session stays usable).
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
    /// ([`PgCheckpoints::save_in`], with its fencing epoch), then
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
    /// The driver's, e.g. [`SessionLost`](shardlock_core::Error::SessionLost) when the connection is
    /// gone (then the server rolled back already).
    pub async fn rollback(self) -> Result<()> {
        self.inner.rollback().await
    }
}

impl Deref for PgTransaction<'_> {
    type Target = PgConnection;

    fn deref(&self) -> &PgConnection {
        &self.inner.tx().0
    }
}

impl DerefMut for PgTransaction<'_> {
    fn deref_mut(&mut self) -> &mut PgConnection {
        &mut self.inner.tx_mut().0
    }
}

impl fmt::Debug for PgTransaction<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgTransaction")
            .field("backend_pid", &self.pid)
            .field("lost", &self.inner.is_lost())
            .finish()
    }
}
