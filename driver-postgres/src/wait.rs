//! The blocking wait of [`PgSession::acquire`](crate::PgSession):
//! `pg_advisory_lock` in core's [`BlockingWait`], which lends the
//! connection to a task so the wait can be cancelled, or abandoned by a
//! dropped future, without the key ever staying held by accident (its
//! invariants are in [`shardlock_core::wait`]). This file holds only the
//! Postgres statements: the wait, `pg_cancel_backend` from a side
//! connection, and the unlock of a grant that raced the cancel.

use std::sync::Arc;

use shardlock_core::wait::{BlockingLock, BlockingWait, WaitEnd};
use shardlock_core::LockKey;
use sqlx::postgres::PgListener;
use tracing::debug;

use crate::connection::SideConnect;
use crate::error::{classify, is_connection_error, sqlstate_of, Class, PgError};
use crate::sql;

/// A blocking wait on the session's connection.
pub(crate) type Wait = BlockingWait<AdvisoryWait>;

/// `pg_advisory_lock(key)` on backend `pid`, cancelled through `side`.
#[derive(Debug)]
pub(crate) struct AdvisoryWait {
    key: LockKey,
    pid: i32,
    side: Arc<SideConnect>,
}

impl AdvisoryWait {
    /// The wait for `key` on backend `pid`.
    pub(crate) fn new(key: LockKey, pid: i32, side: Arc<SideConnect>) -> Self {
        Self { key, pid, side }
    }
}

impl BlockingLock for AdvisoryWait {
    type Conn = PgListener;
    type Error = PgError;
    const STATEMENT: &'static str = "pg_advisory_lock";

    fn key(&self) -> &LockKey {
        &self.key
    }

    async fn lock(&self, conn: &mut PgListener) -> WaitEnd<PgError> {
        match sqlx::query(sql::LOCK)
            .bind(self.key.id())
            .execute(conn)
            .await
        {
            Ok(_) => WaitEnd::Granted,
            Err(err) if is_connection_error(&err) => {
                WaitEnd::Lost(PgError::from_query("pg_advisory_lock", err))
            }
            Err(err) => {
                let cancelled = sqlstate_of(&err).map(classify) == Some(Class::QueryCanceled);
                let err = PgError::from_query("pg_advisory_lock", err);
                if cancelled {
                    WaitEnd::Interrupted(err)
                } else {
                    WaitEnd::Failed(err)
                }
            }
        }
    }

    async fn cancel(&self) -> Result<(), PgError> {
        let sent = self.side.cancel_backend(self.pid).await?;
        debug!(pid = self.pid, sent, "pg_cancel_backend sent");
        Ok(())
    }

    async fn give_back(&self, conn: &mut PgListener) -> Result<bool, PgError> {
        sqlx::query_scalar::<_, bool>(sql::UNLOCK_IF_HELD)
            .bind(self.key.id())
            .fetch_one(conn)
            .await
            .map_err(|e| PgError::from_query("give back an abandoned lock", e))
    }

    fn is_interrupted(&self, err: &PgError) -> bool {
        err.is_query_canceled()
    }

    fn abandoned(&self, reason: &'static str) -> PgError {
        PgError::WaitAbandoned { reason }
    }
}
