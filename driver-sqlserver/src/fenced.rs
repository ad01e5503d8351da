//! Session-fenced transactions: a transaction on the connection that holds
//! the session's application locks (see [`MssqlSession::transaction`]).
//!
//! # Why it fences
//!
//! The session's locks are taken with `sp_getapplock … @LockOwner =
//! 'Session'`: "locks associated with the session are released when the
//! session is logged out" (and when the server shuts down), never by a
//! commit or a rollback
//! (<https://learn.microsoft.com/sql/relational-databases/system-stored-procedures/sp-getapplock-transact-sql>).
//! A transaction on that same connection can therefore only commit while
//! the server session lives, i.e. while it still holds every lock of the
//! shardlock session:
//!
//! - `KILL <spid>` "terminates a user process", which "internally
//!   terminates the transactions that are associated with the specified
//!   session ID": the open transaction is **rolled back** (`KILL … WITH
//!   STATUSONLY` reports that rollback's progress while the session is still
//!   there), and only then does the session end and log out, releasing its
//!   session-owned application locks
//!   (<https://learn.microsoft.com/sql/t-sql/language-elements/kill-transact-sql>).
//!   So no follower can take the lock, and claim the subscription, before
//!   the killed leader's writes are undone.
//! - The killed session's connection is closed by the server: the leader's
//!   `COMMIT` is never run (it fails as a lost connection; the driver's
//!   loss signal usually fires before it is even sent, and then it is not
//!   sent). A `COMMIT` the server did run ran while the session, and so its
//!   locks, were alive, before any follower could have claimed.
//! - The same holds for every other way a session ends (a restart, an
//!   availability-group failover, a dropped connection): an uncommitted
//!   transaction is rolled back, and session locks die with the session.
//!
//! The transaction runs with `SET XACT_ABORT ON`: a run-time error in any
//! statement rolls the whole transaction back
//! (<https://learn.microsoft.com/sql/t-sql/statements/set-xact-abort-transact-sql>),
//! and the driver then refuses to commit, so a half-applied batch is never
//! committed with its checkpoint.
//!
//! [`MssqlSession::transaction`]: crate::MssqlSession::transaction

use std::borrow::Cow;
use std::fmt;
use std::future::Future;

use shardlock_core::fenced;
use shardlock_core::{BoxError, FencedError, Holds, Result};
use tiberius::{ColumnData, Row, ToSql};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::compat::Compat;
use tracing::{debug, warn};

use crate::checkpoints::MssqlCheckpoints;
use crate::connection::{Connection, Op, Reply, Statement};
use crate::error::MssqlError;

/// Runs a parameterized T-SQL statement and answers the rows of its first
/// result set: what [`MssqlCheckpoints::save_in`] writes through. It is
/// implemented by [`MssqlTransaction`] (the session-fenced transaction) and
/// by a tiberius [`Client`](tiberius::Client) of your own on a tokio stream
/// (e.g. [`TdsClient`](crate::TdsClient), inside your own `BEGIN
/// TRANSACTION`, so the checkpoint commits with your rows).
pub trait MssqlExecutor: Send {
    /// Runs `sql` with `params` bound as `@P1`, `@P2`, … and answers the
    /// rows of its first result set.
    fn fetch_rows(
        &mut self,
        sql: &str,
        params: &[&dyn ToSql],
    ) -> impl Future<Output = std::result::Result<Vec<Row>, BoxError>> + Send;
}

impl<S> MssqlExecutor for tiberius::Client<Compat<S>>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    async fn fetch_rows(
        &mut self,
        sql: &str,
        params: &[&dyn ToSql],
    ) -> std::result::Result<Vec<Row>, BoxError> {
        Ok(self.query(sql, params).await?.into_first_result().await?)
    }
}

/// A transaction on a [`MssqlSession`](crate::MssqlSession)'s own
/// connection, the one whose server session owns its application locks:
/// the projection's writes ([`execute`](Self::execute),
/// [`query`](Self::query)) and its checkpoint
/// ([`MssqlCheckpoints::save_in`], or
/// [`commit_checkpoint`](Self::commit_checkpoint)) commit there, so a
/// leader whose session was killed cannot commit them (see
/// [`MssqlSession::transaction`](crate::MssqlSession::transaction) and the
/// module docs).
///
/// Statements take tiberius parameters as tiberius' own
/// `Client::execute` does: `tx.execute("INSERT … VALUES (@P1, @P2)",
/// &[&position, &name]).await?`.
///
/// # Errors inside
///
/// A statement that fails (a constraint, a conversion, …) has rolled the
/// whole transaction back (`XACT_ABORT ON`): every later statement and
/// [`commit`](Self::commit) answer an error without reaching the server;
/// [`rollback`](Self::rollback) or drop it.
///
/// # Drop
///
/// Dropped without [`commit`](Self::commit) or [`rollback`](Self::rollback),
/// it is rolled back: the rollback is queued on the session's connection
/// and runs before the session's next request. A rollback never frees the
/// session's locks (they belong to the session, not the transaction).
///
/// # Do not
///
/// Run `COMMIT`, `ROLLBACK`, `BEGIN TRANSACTION`, `sp_getapplock` or
/// `sp_releaseapplock` through it: the transaction and the session's lock
/// bookkeeping would no longer match the server (the commit refuses a
/// nested or already ended transaction; the next
/// [`verify`](shardlock_core::Session::verify) notices a missing lock).
pub struct MssqlTransaction<'s> {
    conn: &'s Connection,
    holds: &'s mut Holds,
    spid: i32,
    /// Why the transaction can no longer commit (a statement failed, or one
    /// was abandoned while running).
    failed: Option<String>,
    /// Committed or rolled back (or being): nothing to undo on drop.
    finished: bool,
}

impl<'s> MssqlTransaction<'s> {
    pub(crate) fn new(conn: &'s Connection, holds: &'s mut Holds, spid: i32) -> Self {
        Self {
            conn,
            holds,
            spid,
            failed: None,
            finished: false,
        }
    }

    /// The server session (`@@SPID`) running this transaction: the one
    /// owning the session's locks.
    pub fn spid(&self) -> i32 {
        self.spid
    }

    /// Runs a statement that returns no rows (`INSERT`, `UPDATE`, `MERGE`,
    /// …) with `params` bound as `@P1`, `@P2`, …, and answers the rows it
    /// affected.
    ///
    /// # Errors
    ///
    /// [`Error::SessionLost`](shardlock_core::Error::SessionLost) when the
    /// session is lost (nothing can commit any more);
    /// [`Error::Driver`](shardlock_core::Error::Driver) with the server's
    /// error when the statement failed (the transaction is rolled back and
    /// can no longer commit), or when an earlier statement failed.
    ///
    /// # Cancel safety
    ///
    /// Dropped while running, the statement still finishes on the server,
    /// but the transaction can no longer commit (its outcome is unknown to
    /// the caller).
    pub async fn execute(&mut self, sql: &str, params: &[&dyn ToSql]) -> Result<u64> {
        self.run(sql, params, false).await.map(|s| s.affected)
    }

    /// Runs a query with `params` bound as `@P1`, `@P2`, … and answers the
    /// rows of its first result set.
    ///
    /// # Errors
    ///
    /// As [`execute`](Self::execute).
    ///
    /// # Cancel safety
    ///
    /// As [`execute`](Self::execute).
    pub async fn query(&mut self, sql: &str, params: &[&dyn ToSql]) -> Result<Vec<Row>> {
        self.run(sql, params, true).await.map(|s| s.rows)
    }

    async fn run(&mut self, sql: &str, params: &[&dyn ToSql], rows: bool) -> Result<Statement> {
        self.holds.ready()?;
        if let Some(reason) = &self.failed {
            return Err(self.holds.fail(MssqlError::TransactionAborted {
                reason: reason.clone(),
            }));
        }
        let params = params.iter().map(|p| owned(p.to_sql())).collect();
        // Cleared once the answer is in; left set if this future is dropped.
        self.failed = Some("a statement was abandoned while it ran".to_string());
        let answer = self
            .conn
            .call(Op::Statement {
                sql: sql.to_string(),
                params,
                rows,
            })
            .await;
        match answer {
            Ok(Reply::Statement(statement)) => {
                self.failed = None;
                Ok(statement)
            }
            Ok(other) => Err(self.holds.fail(MssqlError::UnexpectedResult {
                operation: "a statement of a fenced transaction",
                detail: format!("answered {other:?}"),
            })),
            Err(e) => {
                self.failed = Some(format!("a statement failed: {e}"));
                Err(self.holds.fail(e))
            }
        }
    }

    /// Commits, if the session is still sound (its loss signal has not
    /// fired, checked right before `COMMIT` is sent) and every statement
    /// succeeded. The commit itself is the fence: it runs on the server
    /// session that owns the locks, so it only succeeds while that session,
    /// and so every lock of the shardlock session, is alive.
    ///
    /// # Errors
    ///
    /// [`SessionLost`](shardlock_core::Error::SessionLost) when the session
    /// is lost (nothing was committed: the server rolled the transaction back
    /// as the session ended, and the shardlock session is poisoned);
    /// [`Driver`](shardlock_core::Error::Driver) when a statement had failed
    /// or the server refused the commit (nothing committed, the transaction
    /// is rolled back, the session stays usable).
    ///
    /// # Cancel safety
    ///
    /// Not cancel-safe: dropped while `COMMIT` is in flight, whether it
    /// committed is unknown, and the session is poisoned at its next call
    /// (leadership is given up).
    pub async fn commit(mut self) -> Result<()> {
        self.finished = true;
        let spid = self.spid;
        if let Err(lost) = self.holds.ready() {
            warn!(spid, error = %lost, "the session was lost: the fenced transaction is not committed");
            // The server rolls back as the session ends; if the connection
            // lives on (a poisoned session), roll back before anything else.
            self.conn.send_detached(Op::Rollback);
            return Err(lost);
        }
        if let Some(reason) = self.failed.take() {
            debug!(spid, %reason, "fenced transaction not committable: rolling back");
            let aborted = MssqlError::TransactionAborted { reason };
            self.finished = false;
            return match self.end(Op::Rollback).await {
                Err(lost) if lost.is_session_fatal() => Err(lost),
                _ => Err(self.holds.fail(aborted)),
            };
        }
        match self.end(Op::Commit).await {
            Ok(()) => {
                debug!(spid, "fenced transaction committed");
                Ok(())
            }
            Err(err) => {
                if !err.is_session_fatal() {
                    // Refused by the server: whatever is left open is rolled
                    // back and `XACT_ABORT` restored before the next request.
                    self.conn.send_detached(Op::Rollback);
                }
                warn!(spid, error = %err, "fenced transaction not committed");
                Err(err)
            }
        }
    }

    /// Saves the checkpoint in this transaction
    /// ([`MssqlCheckpoints::save_in`], with its fencing epoch), then
    /// [`commit`](Self::commit)s: the projection's writes made so far and
    /// the checkpoint commit together, or neither does.
    ///
    /// # Errors
    ///
    /// [`FencedError::Checkpoint`] when the save is refused
    /// ([`FencedOff`](shardlock_core::CheckpointError::FencedOff),
    /// [`NotClaimed`](shardlock_core::CheckpointError::NotClaimed)) or
    /// fails: the transaction is rolled back. [`FencedError::SessionLost`]
    /// when the session is lost, before or at the commit.
    /// [`FencedError::Effects`] when an earlier statement had failed or the
    /// server refused the commit. Nothing was committed either way.
    pub async fn commit_checkpoint(
        mut self,
        subscription: &str,
        epoch: i64,
        position: i64,
    ) -> std::result::Result<(), FencedError> {
        if let Err(refused) =
            MssqlCheckpoints::save_in(&mut self, subscription, epoch, position).await
        {
            let ready = self.holds.ready();
            return Err(fenced::refused_save(refused, ready.map(|()| self.rollback())).await);
        }
        self.commit().await.map_err(FencedError::from)
    }

    /// Rolls back (and restores the session's `XACT_ABORT OFF`). Dropping
    /// the transaction does the same without waiting.
    ///
    /// # Errors
    ///
    /// The driver's, e.g. [`SessionLost`](shardlock_core::Error::SessionLost)
    /// when the connection is gone (then the server rolled back already).
    pub async fn rollback(mut self) -> Result<()> {
        self.end(Op::Rollback).await
    }

    /// Sends `COMMIT` or `ROLLBACK` as one tracked round trip: dropped in
    /// flight, the session is poisoned at its next call.
    async fn end(&mut self, op: Op) -> Result<()> {
        self.finished = true;
        let name = match op {
            Op::Commit => fenced::COMMIT,
            _ => fenced::ROLLBACK,
        };
        self.holds.begin(name)?;
        let answer = self.conn.call(op).await;
        self.holds.end();
        match answer {
            Ok(Reply::Done) => Ok(()),
            Ok(other) => Err(self.holds.fail(MssqlError::UnexpectedResult {
                operation: name,
                detail: format!("answered {other:?}"),
            })),
            Err(e) => Err(self.holds.fail(e)),
        }
    }
}

impl MssqlExecutor for MssqlTransaction<'_> {
    async fn fetch_rows(
        &mut self,
        sql: &str,
        params: &[&dyn ToSql],
    ) -> std::result::Result<Vec<Row>, BoxError> {
        Ok(self.query(sql, params).await?)
    }
}

impl Drop for MssqlTransaction<'_> {
    fn drop(&mut self) {
        if !self.finished {
            debug!(
                spid = self.spid,
                "fenced transaction dropped unfinished: rolling back"
            );
            self.conn.send_detached(Op::Rollback);
        }
    }
}

impl fmt::Debug for MssqlTransaction<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MssqlTransaction")
            .field("spid", &self.spid)
            .field("failed", &self.failed)
            .field("lost", &self.holds.is_broken())
            .finish()
    }
}

/// `value` with its borrowed text, bytes or XML copied, so it can travel to
/// the connection's task.
fn owned(value: ColumnData<'_>) -> ColumnData<'static> {
    match value {
        ColumnData::U8(v) => ColumnData::U8(v),
        ColumnData::I16(v) => ColumnData::I16(v),
        ColumnData::I32(v) => ColumnData::I32(v),
        ColumnData::I64(v) => ColumnData::I64(v),
        ColumnData::F32(v) => ColumnData::F32(v),
        ColumnData::F64(v) => ColumnData::F64(v),
        ColumnData::Bit(v) => ColumnData::Bit(v),
        ColumnData::String(v) => ColumnData::String(v.map(|s| Cow::Owned(s.into_owned()))),
        ColumnData::Guid(v) => ColumnData::Guid(v),
        ColumnData::Binary(v) => ColumnData::Binary(v.map(|b| Cow::Owned(b.into_owned()))),
        ColumnData::Numeric(v) => ColumnData::Numeric(v),
        ColumnData::Xml(v) => ColumnData::Xml(v.map(|x| Cow::Owned(x.into_owned()))),
        ColumnData::DateTime(v) => ColumnData::DateTime(v),
        ColumnData::SmallDateTime(v) => ColumnData::SmallDateTime(v),
        ColumnData::Time(v) => ColumnData::Time(v),
        ColumnData::Date(v) => ColumnData::Date(v),
        ColumnData::DateTime2(v) => ColumnData::DateTime2(v),
        ColumnData::DateTimeOffset(v) => ColumnData::DateTimeOffset(v),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn borrowed_parameters_are_copied() {
        let text = String::from("orders-view");
        let bytes = vec![1u8, 2, 3];
        let copied = {
            let borrowed: [&dyn ToSql; 3] = [&text.as_str(), &bytes.as_slice(), &42i64];
            borrowed
                .iter()
                .map(|p| owned(p.to_sql()))
                .collect::<Vec<_>>()
        };
        drop((text, bytes));
        assert_eq!(
            copied,
            vec![
                ColumnData::String(Some("orders-view".into())),
                ColumnData::Binary(Some(vec![1u8, 2, 3].into())),
                ColumnData::I64(Some(42)),
            ]
        );
    }
}
