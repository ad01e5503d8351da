//! The blocking wait of [`MySqlSession::acquire`](crate::MySqlSession):
//! `GET_LOCK(name, <a year>)` in core's [`BlockingWait`], which lends the
//! connection to a task so the wait can be cancelled, or abandoned by a
//! dropped future, without the key ever staying held by accident (its
//! invariants are in [`shardlock_core::wait`]). This file holds only the
//! MySQL statements: the wait (started again when its year runs out),
//! `KILL QUERY <connection id>` from a side connection, and the release of
//! a grant that raced the kill.

use std::sync::Arc;

use shardlock_core::wait::{BlockingLock, BlockingWait, WaitEnd};
use shardlock_core::LockKey;
use sqlx::mysql::MySqlConnection;
use sqlx::{Executor, Row};

use crate::connection::SideConnect;
use crate::error::{is_connection_error, MySqlCause, MySqlError};
use crate::sql;

/// A blocking wait on the session's connection.
pub(crate) type Wait = BlockingWait<GetLockWait>;

/// `GET_LOCK(name, <a year>)` on connection `id`, killed through `side`.
#[derive(Debug)]
pub(crate) struct GetLockWait {
    key: LockKey,
    name: String,
    wait: String,
    give_back: String,
    id: u64,
    side: Arc<SideConnect>,
}

impl GetLockWait {
    /// The wait for `key` (server lock `name`) on connection `id`.
    pub(crate) fn new(key: LockKey, name: String, id: u64, side: Arc<SideConnect>) -> Self {
        Self {
            key,
            wait: sql::wait(&name),
            give_back: sql::give_back(&name),
            name,
            id,
            side,
        }
    }

    fn killed(&self, source: Option<MySqlCause>) -> MySqlError {
        MySqlError::LockWaitKilled {
            name: self.name.clone(),
            source,
        }
    }
}

impl BlockingLock for GetLockWait {
    type Conn = MySqlConnection;
    type Error = MySqlError;
    const STATEMENT: &'static str = "GET_LOCK";

    fn key(&self) -> &LockKey {
        &self.key
    }

    async fn lock(&self, conn: &mut MySqlConnection) -> WaitEnd<MySqlError> {
        let answer = conn
            .fetch_one(sqlx::raw_sql(&self.wait))
            .await
            .and_then(|row| row.try_get::<Option<i64>, _>(0));
        match answer {
            Ok(Some(1)) => WaitEnd::Granted,
            // The year-long timeout ran out.
            Ok(Some(0)) => WaitEnd::TimedOut,
            // Killed: MariaDB answers NULL.
            Ok(_) => WaitEnd::Interrupted(self.killed(None)),
            Err(err) if is_connection_error(&err) => {
                WaitEnd::Lost(MySqlError::from_query("GET_LOCK wait", err))
            }
            Err(err) => {
                let err = MySqlError::from_query("GET_LOCK wait", err);
                if !err.is_query_interrupted() {
                    return WaitEnd::Failed(err);
                }
                // Killed: error 1317.
                WaitEnd::Interrupted(self.killed(match err {
                    MySqlError::Query { source, .. } => Some(source),
                    _ => None,
                }))
            }
        }
    }

    async fn cancel(&self) -> Result<(), MySqlError> {
        self.side.kill_query(self.id).await
    }

    async fn give_back(&self, conn: &mut MySqlConnection) -> Result<bool, MySqlError> {
        conn.fetch_one(sqlx::raw_sql(&self.give_back))
            .await
            .and_then(|row| row.try_get::<Option<i64>, _>(0))
            .map(|released| released == Some(1))
            .map_err(|e| MySqlError::from_query("give back an abandoned lock", e))
    }

    fn is_interrupted(&self, err: &MySqlError) -> bool {
        err.is_query_interrupted()
    }

    fn abandoned(&self, reason: &'static str) -> MySqlError {
        MySqlError::WaitAbandoned { reason }
    }
}
