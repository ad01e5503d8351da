//! A checkpoint store in PostgreSQL, with fencing epochs.

use std::fmt;

use shardlock_core::{Checkpoint, CheckpointError, CheckpointStore, DatabaseId};
use sqlx::postgres::{PgConnection, PgPool, PgPoolOptions};
use sqlx::Row;

use crate::options::PgOptions;

/// Connections of the pool [`PgCheckpoints::connect`] opens: checkpoint
/// calls are short single statements, so a few serve many projections.
const POOL_SIZE: u32 = 4;

/// `application_name` of the checkpoint pool's connections, so operators
/// tell them apart from lock sessions (`shardlock:<node>`).
const APPLICATION_NAME: &str = "shardlock:checkpoints";

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

/// Checkpoints in the table `subscriptions(subscription_name text primary
/// key, last_position bigint, epoch bigint, updated_at timestamptz)`,
/// created idempotently when the store is opened.
///
/// Opened like every checkpoint store (see `shardlock_core`'s projection
/// docs): [`PgCheckpoints::connect`] from the driver's [`PgOptions`] and the
/// [`DatabaseId`] (the same inputs as the driver's `connect`, so the table
/// lives in the database the id's locks live in), or
/// [`PgCheckpoints::from_pool`] with a pool you already have.
///
/// Checkpoints are plain rows, so unlike locks they may use a pool. To write
/// a projection's own rows and its checkpoint in **one transaction**, call
/// [`PgCheckpoints::save_in`] with that transaction.
///
/// ```no_run
/// use shardlock_core::{CheckpointStore, DatabaseId};
/// use shardlock_postgres::{PgCheckpoints, PgOptions};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
/// let options = PgOptions::parse("postgres://app:secret@localhost:5432/app")?;
/// let store = PgCheckpoints::connect(&options, &DatabaseId::new("main")).await?;
/// let claimed = store.claim("orders-view").await?;
/// store.save("orders-view", claimed.epoch, 42).await?;
/// # Ok(())
/// # }
/// ```
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
    /// Opens a small pool of its own (up to 4 connections, named
    /// `shardlock:checkpoints`) to the database `database` maps to under
    /// `options` ([`PgOptions::database_for`]: by default the URL's
    /// database) and creates the table if it is missing: the Postgres form
    /// of every store's `connect(target)`.
    ///
    /// # Errors
    ///
    /// [`CheckpointError::Store`] with the database's error when it cannot
    /// connect (within [`PgOptions::connect_timeout`]) or create the table.
    pub async fn connect(
        options: &PgOptions,
        database: &DatabaseId,
    ) -> Result<Self, CheckpointError> {
        let connect = options
            .get_connect_options()
            .clone()
            .database(&options.database_for(database))
            .application_name(APPLICATION_NAME)
            // As the lock sessions: no float is read, and PgBouncer refuses
            // this startup parameter by default.
            .extra_float_digits(None);
        let pool = PgPoolOptions::new()
            .max_connections(POOL_SIZE)
            .acquire_timeout(options.get_connect_timeout())
            .connect_with(connect)
            .await
            .map_err(CheckpointError::store)?;
        Self::from_pool(pool).await
    }

    /// Uses `pool` (e.g. the application's own, so [`save_in`](Self::save_in)
    /// can join its transactions) and creates the table if it is missing.
    ///
    /// # Errors
    ///
    /// [`CheckpointError::Store`] with the database's error if the table
    /// cannot be created.
    pub async fn from_pool(pool: PgPool) -> Result<Self, CheckpointError> {
        sqlx::query(SCHEMA)
            .execute(&pool)
            .await
            .map_err(CheckpointError::store)?;
        Ok(Self { pool })
    }

    /// The former name of [`from_pool`](Self::from_pool).
    ///
    /// # Errors
    ///
    /// As [`from_pool`](Self::from_pool).
    #[deprecated(
        note = "use `PgCheckpoints::from_pool(pool)` or `PgCheckpoints::connect(&options, &database)`"
    )]
    pub async fn new(pool: PgPool) -> Result<Self, CheckpointError> {
        Self::from_pool(pool).await
    }

    /// The pool the store uses.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Saves a checkpoint on `conn` (typically inside the transaction that
    /// wrote the projection's rows), with the same fencing as
    /// [`CheckpointStore::save`]: if it answers [`CheckpointError::FencedOff`],
    /// roll the transaction back and the stale writes vanish with it.
    ///
    /// # Errors
    ///
    /// [`CheckpointError::NotClaimed`] when the subscription was never
    /// claimed (or `epoch` is below 1); [`CheckpointError::FencedOff`] when
    /// `epoch` is not the stored one. Nothing is written either way.
    pub async fn save_in(
        conn: &mut PgConnection,
        subscription: &str,
        epoch: i64,
        position: i64,
    ) -> Result<(), CheckpointError> {
        CheckpointError::check_save_epoch(subscription, epoch)?;
        let done = sqlx::query(SAVE)
            .bind(subscription)
            .bind(epoch)
            .bind(position)
            .execute(&mut *conn)
            .await
            .map_err(CheckpointError::store)?;
        if done.rows_affected() == 1 {
            return Ok(());
        }
        let current: Option<i64> = sqlx::query_scalar(EPOCH)
            .bind(subscription)
            .fetch_optional(&mut *conn)
            .await
            .map_err(CheckpointError::store)?;
        CheckpointError::unchanged_save(subscription, epoch, current)
    }
}

impl CheckpointStore for PgCheckpoints {
    async fn claim(&self, subscription: &str) -> Result<Checkpoint, CheckpointError> {
        let row = sqlx::query(CLAIM)
            .bind(subscription)
            .fetch_one(&self.pool)
            .await
            .map_err(CheckpointError::store)?;
        Ok(Checkpoint {
            position: row.try_get(0).map_err(CheckpointError::store)?,
            epoch: row.try_get(1).map_err(CheckpointError::store)?,
        })
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
