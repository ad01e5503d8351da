//! A checkpoint store in PostgreSQL, with fencing epochs.

use std::fmt;

use shardlock_core::{BoxError, Checkpoint, CheckpointError, CheckpointStore};
use sqlx::postgres::{PgConnection, PgPool};
use sqlx::Row;

const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS subscriptions (
    subscription_name text PRIMARY KEY,
    last_position bigint NOT NULL,
    epoch bigint NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now())";

const CLAIM: &str =
    "INSERT INTO subscriptions (subscription_name, last_position, epoch, updated_at)
    VALUES ($1, 0, 1, now())
    ON CONFLICT (subscription_name)
    DO UPDATE SET epoch = subscriptions.epoch + 1, updated_at = now()
    RETURNING last_position, epoch";

const SAVE: &str = "UPDATE subscriptions
    SET last_position = GREATEST(last_position, $3), updated_at = now()
    WHERE subscription_name = $1 AND epoch = $2";

const EPOCH: &str = "SELECT epoch FROM subscriptions WHERE subscription_name = $1";

const LOAD: &str = "SELECT last_position, epoch FROM subscriptions WHERE subscription_name = $1";

fn store_err(e: impl Into<BoxError>) -> CheckpointError {
    CheckpointError::Store(e.into())
}

/// Checkpoints in the table `subscriptions(subscription_name text primary
/// key, last_position bigint, epoch bigint, updated_at timestamptz)`,
/// created idempotently by [`PgCheckpoints::new`].
///
/// Checkpoints are plain rows, so unlike locks they may use a pool. To write
/// a projection's own rows and its checkpoint in **one transaction**, call
/// [`PgCheckpoints::save_in`] with that transaction.
#[derive(Clone)]
pub struct PgCheckpoints {
    pool: PgPool,
}

impl fmt::Debug for PgCheckpoints {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgCheckpoints").finish_non_exhaustive()
    }
}

impl PgCheckpoints {
    /// Uses `pool` and creates the table if it is missing.
    ///
    /// # Errors
    ///
    /// The database's error if the table cannot be created.
    pub async fn new(pool: PgPool) -> Result<Self, CheckpointError> {
        sqlx::query(SCHEMA)
            .execute(&pool)
            .await
            .map_err(store_err)?;
        Ok(Self { pool })
    }

    /// Saves a checkpoint on `conn` (typically inside the transaction that
    /// wrote the projection's rows), with the same fencing as
    /// [`CheckpointStore::save`]: if it answers [`CheckpointError::FencedOff`],
    /// roll the transaction back and the stale writes vanish with it.
    ///
    /// # Errors
    ///
    /// [`CheckpointError::FencedOff`] when `epoch` is not the stored one.
    pub async fn save_in(
        conn: &mut PgConnection,
        subscription: &str,
        epoch: i64,
        position: i64,
    ) -> Result<(), CheckpointError> {
        let done = sqlx::query(SAVE)
            .bind(subscription)
            .bind(epoch)
            .bind(position)
            .execute(&mut *conn)
            .await
            .map_err(store_err)?;
        if done.rows_affected() == 1 {
            return Ok(());
        }
        let current: Option<i64> = sqlx::query_scalar(EPOCH)
            .bind(subscription)
            .fetch_optional(&mut *conn)
            .await
            .map_err(store_err)?;
        Err(CheckpointError::FencedOff {
            subscription: subscription.to_string(),
            ours: epoch,
            current: current.unwrap_or(0),
        })
    }
}

impl CheckpointStore for PgCheckpoints {
    async fn claim(&self, subscription: &str) -> Result<Checkpoint, CheckpointError> {
        let row = sqlx::query(CLAIM)
            .bind(subscription)
            .fetch_one(&self.pool)
            .await
            .map_err(store_err)?;
        Ok(Checkpoint {
            position: row.try_get(0).map_err(store_err)?,
            epoch: row.try_get(1).map_err(store_err)?,
        })
    }

    async fn load(&self, subscription: &str) -> Result<Option<Checkpoint>, CheckpointError> {
        let row = sqlx::query(LOAD)
            .bind(subscription)
            .fetch_optional(&self.pool)
            .await
            .map_err(store_err)?;
        row.map(|r| {
            Ok(Checkpoint {
                position: r.try_get(0).map_err(store_err)?,
                epoch: r.try_get(1).map_err(store_err)?,
            })
        })
        .transpose()
    }

    async fn save(
        &self,
        subscription: &str,
        epoch: i64,
        position: i64,
    ) -> Result<(), CheckpointError> {
        let mut conn = self.pool.acquire().await.map_err(store_err)?;
        Self::save_in(&mut conn, subscription, epoch, position).await
    }
}
