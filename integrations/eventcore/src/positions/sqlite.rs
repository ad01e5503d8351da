//! Positions in an SQLite database file.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use eventcore_types::StreamPosition;
use shardlock_core::BoxError;
use shardlock_sqlite::rusqlite::{params, Connection, OptionalExtension};

use super::PositionTable;
use crate::error::OpenError;

const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS eventcore_positions(
    subscription_name TEXT PRIMARY KEY,
    position TEXT NOT NULL,
    updated_at TEXT NOT NULL)";

// Positions are stored as lowercase hyphenated UUIDs: fixed width, so
// SQLite's default (binary) text order is the positions' order.
const ADVANCE: &str = "INSERT INTO eventcore_positions(subscription_name, position, updated_at)
    VALUES (?1, ?2, CURRENT_TIMESTAMP)
    ON CONFLICT(subscription_name) DO UPDATE
    SET position = excluded.position, updated_at = CURRENT_TIMESTAMP
    WHERE eventcore_positions.position < excluded.position";

/// Exact eventcore positions in the table `eventcore_positions
/// (subscription_name, position, updated_at)` of an SQLite database,
/// typically the file of the `SqliteCheckpoints` it goes with. Calls run on
/// Tokio's blocking pool.
#[derive(Clone)]
pub struct SqlitePositions {
    path: PathBuf,
    conn: Arc<Mutex<Connection>>,
}

impl fmt::Debug for SqlitePositions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqlitePositions")
            .field("path", &self.path)
            .finish()
    }
}

impl SqlitePositions {
    /// Opens (creating if needed) the database file at `path` and its
    /// table, on Tokio's blocking pool: the shape of `SqliteCheckpoints`'
    /// `connect` (give both the same file).
    ///
    /// # Errors
    ///
    /// SQLite's error, e.g. a file that is not a database or a folder that
    /// does not exist.
    pub async fn connect(path: impl AsRef<Path>) -> Result<Self, OpenError> {
        let path = path.as_ref().to_path_buf();
        let place = path.display().to_string();
        tokio::task::spawn_blocking(move || Self::open_blocking(path))
            .await
            .map_err(|e| OpenError::new(place, e))?
    }

    fn open_blocking(path: PathBuf) -> Result<Self, OpenError> {
        let place = || path.display().to_string();
        let conn = Connection::open(&path).map_err(|e| OpenError::new(place(), e))?;
        conn.busy_timeout(Duration::from_secs(5))
            .and_then(|()| conn.execute_batch(SCHEMA))
            .map_err(|e| OpenError::new(place(), e))?;
        Ok(Self {
            path,
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    async fn with_conn<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, BoxError> + Send + 'static,
    ) -> Result<T, BoxError> {
        let conn = Arc::clone(&self.conn);
        tokio::task::spawn_blocking(move || {
            let conn = conn.lock().unwrap_or_else(|p| p.into_inner());
            f(&conn)
        })
        .await?
    }
}

impl PositionTable for SqlitePositions {
    async fn load(&self, subscription: &str) -> Result<Option<StreamPosition>, BoxError> {
        let name = subscription.to_string();
        self.with_conn(move |conn| {
            let text: Option<String> = conn
                .query_row(
                    "SELECT position FROM eventcore_positions WHERE subscription_name = ?1",
                    params![name],
                    |r| r.get(0),
                )
                .optional()?;
            text.map(|t| Ok(StreamPosition::new(uuid::Uuid::parse_str(&t)?)))
                .transpose()
        })
        .await
    }

    async fn advance(&self, subscription: &str, position: StreamPosition) -> Result<(), BoxError> {
        let name = subscription.to_string();
        let bits: uuid::Uuid = position.into_inner();
        let text = bits.hyphenated().to_string();
        self.with_conn(move |conn| {
            conn.execute(ADVANCE, params![name, text])?;
            Ok(())
        })
        .await
    }
}
