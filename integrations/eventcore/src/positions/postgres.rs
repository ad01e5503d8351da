//! Positions in a PostgreSQL table.

use std::fmt;
use std::time::Duration;

use eventcore_types::StreamPosition;
use shardlock_core::BoxError;
use shardlock_postgres::sqlx::{
    self,
    postgres::{PgConnection, PgPool},
};

use super::PositionTable;
use crate::error::OpenError;

const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS eventcore_positions (
    subscription_name text PRIMARY KEY,
    position uuid NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now())";

// `uuid` compares bytewise, which is the order of eventcore's positions.
const ADVANCE: &str = "INSERT INTO eventcore_positions (subscription_name, position, updated_at)
    VALUES ($1, $2::uuid, now())
    ON CONFLICT (subscription_name) DO UPDATE
    SET position = EXCLUDED.position, updated_at = now()
    WHERE eventcore_positions.position < EXCLUDED.position";

const LOAD: &str = "SELECT position::text FROM eventcore_positions WHERE subscription_name = $1";

/// Exact eventcore positions in the table `eventcore_positions
/// (subscription_name text primary key, position uuid, updated_at
/// timestamptz)`, created idempotently by [`PgPositions::from_pool`]; use
/// the pool of the `PgCheckpoints` it goes with.
#[derive(Clone)]
pub struct PgPositions {
    pool: PgPool,
}

impl fmt::Debug for PgPositions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgPositions").finish_non_exhaustive()
    }
}

impl PgPositions {
    /// Uses `pool` (e.g. `PgCheckpoints::pool()`'s) and creates the table if
    /// it is missing.
    ///
    /// # Errors
    ///
    /// The database's error if the table cannot be created.
    pub async fn from_pool(pool: PgPool) -> Result<Self, OpenError> {
        // Concurrent `CREATE TABLE IF NOT EXISTS` can collide on the
        // catalog's unique index: the loser's retry finds the table.
        let mut attempt = 0;
        loop {
            match sqlx::query(SCHEMA).execute(&pool).await {
                Ok(_) => return Ok(Self { pool }),
                Err(e) if attempt < 3 => {
                    tracing::debug!(error = %e, "creating eventcore_positions failed; retrying");
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(50 * attempt)).await;
                }
                Err(e) => return Err(OpenError::new("postgres", e)),
            }
        }
    }
}

impl PgPositions {
    /// Advances the position of `subscription` on `conn`, typically inside
    /// the session-fenced transaction that writes the projection's rows and
    /// saves its checkpoint (`PgTransaction::commit_checkpoint` with
    /// [`position_prefix`](crate::position_prefix)`(position)`), so the
    /// exact position commits with them or not at all. Like
    /// [`PositionTable::advance`], never moves backwards. The table must
    /// exist ([`from_pool`](Self::from_pool) creates it).
    ///
    /// A fenced batch, the way an eventcore user gets eventcore-postgres'
    /// transactional guarantee ("stale effect must not commit") with
    /// shardlock: leadership (lock + claimed epoch), then the events read,
    /// applied, and committed with their position on the lock's own
    /// connection. A leader whose backend was terminated gets
    /// `FencedError::SessionLost` at the commit, and nothing of the batch is
    /// committed; the next leader resumes from the last committed position.
    ///
    /// ```no_run
    /// use eventcore_memory::InMemoryEventStore;
    /// use eventcore_types::{
    ///     BatchSize, CheckpointStore as _, Event, EventFilter, EventPage, EventReader as _,
    ///     StreamId,
    /// };
    /// use shardlock_core::DatabaseId;
    /// use shardlock_eventcore::{
    ///     position_prefix, PgPositions, ShardlockBackend, ShardlockCheckpoints,
    ///     ShardlockCoordinator,
    /// };
    /// use shardlock_postgres::{sqlx, PgCheckpoints, PgDriver, PgOptions};
    ///
    /// #[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
    /// struct Deposited {
    ///     account: StreamId,
    ///     amount: i64,
    /// }
    ///
    /// impl Event for Deposited {
    ///     fn stream_id(&self) -> &StreamId {
    ///         &self.account
    ///     }
    ///     fn event_type_name() -> &'static str {
    ///         "Deposited"
    ///     }
    /// }
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    /// let options = PgOptions::parse("postgres://app:secret@localhost/app")?;
    /// let database = DatabaseId::new("app");
    /// let store = PgCheckpoints::connect(&options, &database).await?;
    /// let positions = PgPositions::from_pool(store.pool().clone()).await?;
    /// let events = InMemoryEventStore::new(); // your eventcore EventReader
    /// let backend = ShardlockBackend::new(
    ///     &events,
    ///     ShardlockCoordinator::new(PgDriver::new(options), database),
    ///     ShardlockCheckpoints::new(store, positions),
    /// );
    ///
    /// let name = "account-totals";
    /// let mut lead = backend.acquire(name).await?; // the lock and a claimed epoch
    /// let page = match backend.load(name).await? {
    ///     Some(after) => EventPage::after(after, BatchSize::new(500)),
    ///     None => EventPage::first(BatchSize::new(500)),
    /// };
    /// let batch = backend
    ///     .read_events::<Deposited>(EventFilter::all(), page)
    ///     .await?;
    /// if let Some(&(_, last)) = batch.last() {
    ///     let epoch = lead.epoch();
    ///     let mut tx = lead.leader_session()?.transaction().await?;
    ///     for (deposit, _) in &batch {
    ///         sqlx::query("UPDATE totals SET total = total + $1 WHERE account = $2")
    ///             .bind(deposit.amount)
    ///             .bind(deposit.account.to_string())
    ///             .execute(&mut *tx)
    ///             .await?;
    ///     }
    ///     PgPositions::advance_in(&mut tx, name, last).await?;
    ///     // Effects, position and checkpoint commit together, only while
    ///     // the lock is held; a superseded epoch rolls them all back.
    ///     tx.commit_checkpoint(name, epoch, position_prefix(last))
    ///         .await?;
    /// }
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    ///
    /// The database's error; roll the transaction back.
    pub async fn advance_in(
        conn: &mut PgConnection,
        subscription: &str,
        position: StreamPosition,
    ) -> Result<(), BoxError> {
        advance(conn, subscription, position).await
    }
}

/// The one upsert of [`ADVANCE`], on any executor.
async fn advance<'e>(
    executor: impl sqlx::Executor<'e, Database = sqlx::Postgres>,
    subscription: &str,
    position: StreamPosition,
) -> Result<(), BoxError> {
    let bits: uuid::Uuid = position.into_inner();
    sqlx::query(ADVANCE)
        .bind(subscription)
        .bind(bits.hyphenated().to_string())
        .execute(executor)
        .await?;
    Ok(())
}

impl PositionTable for PgPositions {
    async fn load(&self, subscription: &str) -> Result<Option<StreamPosition>, BoxError> {
        let text: Option<String> = sqlx::query_scalar(LOAD)
            .bind(subscription)
            .fetch_optional(&self.pool)
            .await?;
        text.map(|t| Ok(StreamPosition::new(uuid::Uuid::parse_str(&t)?)))
            .transpose()
    }

    async fn advance(&self, subscription: &str, position: StreamPosition) -> Result<(), BoxError> {
        advance(&self.pool, subscription, position).await
    }
}
