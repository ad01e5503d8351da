//! Positions in a MySQL/MariaDB table.

use std::fmt;

use eventcore_types::StreamPosition;
use shardlock_core::BoxError;
use shardlock_mysql::sqlx::{
    self,
    mysql::{MySqlConnection, MySqlPool},
};

use super::PositionTable;
use crate::error::OpenError;

/// Names compare exactly (`utf8mb4_bin`), like `MySqlCheckpoints`'
/// `subscriptions`; InnoDB, so the table can join a fenced transaction.
const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS eventcore_positions (
    subscription_name VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL PRIMARY KEY,
    position BINARY(16) NOT NULL,
    updated_at TIMESTAMP(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6)) ENGINE = InnoDB";

// The UUID's 16 bytes, big-endian: `BINARY` compares bytewise, which is the
// order of eventcore's positions. `updated_at` is assigned first, so it
// still sees the old position (MySQL assigns left to right).
const ADVANCE: &str = "INSERT INTO eventcore_positions (subscription_name, position)
    VALUES (?, ?)
    ON DUPLICATE KEY UPDATE
    updated_at = IF(position < ?, CURRENT_TIMESTAMP(6), updated_at),
    position = GREATEST(position, ?)";

const LOAD: &str = "SELECT position FROM eventcore_positions WHERE subscription_name = ?";

/// Exact eventcore positions in the InnoDB table `eventcore_positions
/// (subscription_name varchar(255) primary key, position binary(16),
/// updated_at timestamp(6))`, created idempotently by
/// [`MySqlPositions::from_pool`]; use the pool of the `MySqlCheckpoints` it
/// goes with (`MySqlCheckpoints::pool()`).
#[derive(Clone)]
pub struct MySqlPositions {
    pool: MySqlPool,
}

impl fmt::Debug for MySqlPositions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MySqlPositions").finish_non_exhaustive()
    }
}

impl MySqlPositions {
    /// Uses `pool` (e.g. `MySqlCheckpoints::pool()`'s) and creates the table
    /// if it is missing.
    ///
    /// # Errors
    ///
    /// The database's error if the table cannot be created.
    pub async fn from_pool(pool: MySqlPool) -> Result<Self, OpenError> {
        sqlx::query(SCHEMA)
            .execute(&pool)
            .await
            .map_err(|e| OpenError::new("mysql", e))?;
        Ok(Self { pool })
    }
}

impl MySqlPositions {
    /// Advances the position of `subscription` on `conn`, typically inside
    /// the session-fenced transaction that writes the projection's rows and
    /// saves its checkpoint (`MySqlTransaction::commit_checkpoint` with
    /// [`position_prefix`](crate::position_prefix)`(position)`), so the
    /// exact position commits with them or not at all. Like
    /// [`PositionTable::advance`], never moves backwards. The table must
    /// exist ([`from_pool`](Self::from_pool) creates it: it is DDL, which
    /// would commit a transaction implicitly).
    ///
    /// # Errors
    ///
    /// The database's error; roll the transaction back.
    pub async fn advance_in(
        conn: &mut MySqlConnection,
        subscription: &str,
        position: StreamPosition,
    ) -> Result<(), BoxError> {
        advance(conn, subscription, position).await
    }
}

/// The one upsert of [`ADVANCE`], on any executor.
async fn advance<'e>(
    executor: impl sqlx::Executor<'e, Database = sqlx::MySql>,
    subscription: &str,
    position: StreamPosition,
) -> Result<(), BoxError> {
    let bits: uuid::Uuid = position.into_inner();
    let bytes = bits.as_bytes().as_slice();
    sqlx::query(ADVANCE)
        .bind(subscription)
        .bind(bytes)
        .bind(bytes)
        .bind(bytes)
        .execute(executor)
        .await?;
    Ok(())
}

impl PositionTable for MySqlPositions {
    async fn load(&self, subscription: &str) -> Result<Option<StreamPosition>, BoxError> {
        let bytes: Option<Vec<u8>> = sqlx::query_scalar(LOAD)
            .bind(subscription)
            .fetch_optional(&self.pool)
            .await?;
        bytes
            .map(|b| Ok(StreamPosition::new(uuid::Uuid::from_slice(&b)?)))
            .transpose()
    }

    async fn advance(&self, subscription: &str, position: StreamPosition) -> Result<(), BoxError> {
        advance(&self.pool, subscription, position).await
    }
}
