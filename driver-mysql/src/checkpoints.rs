//! A checkpoint store in MySQL/MariaDB, with fencing epochs.

use std::fmt;

use shardlock_core::{Checkpoint, CheckpointError, CheckpointStore, DatabaseId};
use sqlx::mysql::{MySqlConnection, MySqlPool, MySqlPoolOptions};
use sqlx::{Connection, Row};

use crate::options::MySqlOptions;

/// Connections of the pool [`MySqlCheckpoints::connect`] opens.
const POOL_SIZE: u32 = 4;

/// Names are compared exactly (`utf8mb4_bin`), like every other store.
const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS subscriptions (
    subscription_name VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL PRIMARY KEY,
    last_position BIGINT NOT NULL,
    epoch BIGINT NOT NULL,
    updated_at TIMESTAMP(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6)) ENGINE = InnoDB";

/// MySQL has no `RETURNING`: the claim is an upsert and a read in one
/// transaction.
const CLAIM: &str = "INSERT INTO subscriptions (subscription_name, last_position, epoch)
    VALUES (?, 0, 1)
    ON DUPLICATE KEY UPDATE epoch = epoch + 1, updated_at = CURRENT_TIMESTAMP(6)";

const SAVE: &str = "UPDATE subscriptions
    SET last_position = GREATEST(last_position, ?), updated_at = CURRENT_TIMESTAMP(6)
    WHERE subscription_name = ? AND epoch = ?";

const EPOCH: &str = "SELECT epoch FROM subscriptions WHERE subscription_name = ?";

const LOAD: &str = "SELECT last_position, epoch FROM subscriptions WHERE subscription_name = ?";

/// Checkpoints in the table `subscriptions(subscription_name varchar(255)
/// primary key, last_position bigint, epoch bigint, updated_at
/// timestamp(6))` (InnoDB), created idempotently when the store is opened.
///
/// Opened like every checkpoint store: [`MySqlCheckpoints::connect`] from
/// the driver's [`MySqlOptions`] and the [`DatabaseId`] (the table lives in
/// the database the id maps to), or [`MySqlCheckpoints::from_pool`] with a
/// pool you already have. To write a projection's own rows and its
/// checkpoint in **one transaction**, call [`MySqlCheckpoints::save_in`]
/// with that transaction.
///
/// ```no_run
/// use shardlock_core::{CheckpointStore, DatabaseId};
/// use shardlock_mysql::{MySqlCheckpoints, MySqlOptions};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
/// let options = MySqlOptions::parse("mysql://app:secret@localhost:3306/app")?;
/// let store = MySqlCheckpoints::connect(&options, &DatabaseId::new("main")).await?;
/// let claimed = store.claim("orders-view").await?;
/// store.save("orders-view", claimed.epoch, 42).await?;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct MySqlCheckpoints {
    pool: MySqlPool,
}

impl fmt::Debug for MySqlCheckpoints {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MySqlCheckpoints").finish_non_exhaustive()
    }
}

impl MySqlCheckpoints {
    /// Opens a small pool of its own (up to 4 connections) to the database
    /// `database` maps to under `options` ([`MySqlOptions::database_for`])
    /// and creates the table if it is missing.
    ///
    /// # Errors
    ///
    /// [`CheckpointError::Store`] with the database's error when it cannot
    /// connect (within the connect timeout) or create the table.
    pub async fn connect(
        options: &MySqlOptions,
        database: &DatabaseId,
    ) -> Result<Self, CheckpointError> {
        let name = options.database_for(database);
        let mut connect = options.get_connect_options().clone();
        if !name.is_empty() {
            connect = connect.database(&name);
        }
        let pool = MySqlPoolOptions::new()
            .max_connections(POOL_SIZE)
            .acquire_timeout(options.get_connect_timeout())
            .connect_with(connect)
            .await
            .map_err(CheckpointError::store)?;
        Self::from_pool(pool).await
    }

    /// Uses `pool` (e.g. the application's own, so
    /// [`save_in`](Self::save_in) can join its transactions) and creates
    /// the table if it is missing.
    ///
    /// # Errors
    ///
    /// [`CheckpointError::Store`] if the table cannot be created.
    pub async fn from_pool(pool: MySqlPool) -> Result<Self, CheckpointError> {
        sqlx::query(SCHEMA)
            .execute(&pool)
            .await
            .map_err(CheckpointError::store)?;
        Ok(Self { pool })
    }

    /// The pool the store uses.
    pub fn pool(&self) -> &MySqlPool {
        &self.pool
    }

    /// Saves a checkpoint on `conn` (typically inside the transaction that
    /// wrote the projection's rows), with the same fencing as
    /// [`CheckpointStore::save`]: if it answers
    /// [`CheckpointError::FencedOff`], roll the transaction back and the
    /// stale writes vanish with it.
    ///
    /// # Errors
    ///
    /// [`CheckpointError::NotClaimed`] when the subscription was never
    /// claimed (or `epoch` is below 1); [`CheckpointError::FencedOff`] when
    /// `epoch` is not the stored one. Nothing is written either way.
    pub async fn save_in(
        conn: &mut MySqlConnection,
        subscription: &str,
        epoch: i64,
        position: i64,
    ) -> Result<(), CheckpointError> {
        CheckpointError::check_save_epoch(subscription, epoch)?;
        let done = sqlx::query(SAVE)
            .bind(position)
            .bind(subscription)
            .bind(epoch)
            .execute(&mut *conn)
            .await
            .map_err(CheckpointError::store)?;
        if done.rows_affected() == 1 {
            return Ok(());
        }
        // MySQL counts changed rows, not matched ones: a row whose epoch
        // matches but that did not change is a success too.
        let current: Option<i64> = sqlx::query_scalar(EPOCH)
            .bind(subscription)
            .fetch_optional(&mut *conn)
            .await
            .map_err(CheckpointError::store)?;
        CheckpointError::unchanged_save(subscription, epoch, current)
    }
}

impl CheckpointStore for MySqlCheckpoints {
    async fn claim(&self, subscription: &str) -> Result<Checkpoint, CheckpointError> {
        let mut conn = self.pool.acquire().await.map_err(CheckpointError::store)?;
        let mut tx = conn.begin().await.map_err(CheckpointError::store)?;
        sqlx::query(CLAIM)
            .bind(subscription)
            .execute(&mut *tx)
            .await
            .map_err(CheckpointError::store)?;
        let row = sqlx::query(LOAD)
            .bind(subscription)
            .fetch_one(&mut *tx)
            .await
            .map_err(CheckpointError::store)?;
        let checkpoint = Checkpoint {
            position: row.try_get(0).map_err(CheckpointError::store)?,
            epoch: row.try_get(1).map_err(CheckpointError::store)?,
        };
        tx.commit().await.map_err(CheckpointError::store)?;
        Ok(checkpoint)
    }

    async fn load(&self, subscription: &str) -> Result<Option<Checkpoint>, CheckpointError> {
        let row = sqlx::query(LOAD)
            .bind(subscription)
            .fetch_optional(&self.pool)
            .await
            .map_err(CheckpointError::store)?;
        row.map(|r| {
            Ok(Checkpoint {
                position: r.try_get(0).map_err(CheckpointError::store)?,
                epoch: r.try_get(1).map_err(CheckpointError::store)?,
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
        let mut conn = self.pool.acquire().await.map_err(CheckpointError::store)?;
        Self::save_in(&mut conn, subscription, epoch, position).await
    }
}
