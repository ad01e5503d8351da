//! Positions in a PostgreSQL table.

use std::fmt;
use std::time::Duration;

use eventcore_types::StreamPosition;
use shardlock_core::BoxError;
use shardlock_postgres::sqlx::{self, postgres::PgPool};

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
        let bits: uuid::Uuid = position.into_inner();
        sqlx::query(ADVANCE)
            .bind(subscription)
            .bind(bits.hyphenated().to_string())
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}
