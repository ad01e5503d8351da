//! A checkpoint store in an SQLite database file.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rusqlite::{params, Connection, OptionalExtension, Transaction};
use shardlock_core::{Checkpoint, CheckpointError, CheckpointStore};

use crate::error::SqliteError;

const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS subscriptions(
    subscription_name TEXT PRIMARY KEY,
    last_position INTEGER NOT NULL,
    epoch INTEGER NOT NULL,
    updated_at TEXT NOT NULL)";

/// Checkpoints in the table `subscriptions(subscription_name, last_position,
/// epoch, updated_at)` of an SQLite database (typically the one holding
/// the projection's own tables, so both can be written in one transaction
/// with [`save_in`](SqliteCheckpoints::save_in)).
///
/// Calls run on Tokio's blocking pool.
#[derive(Clone)]
pub struct SqliteCheckpoints {
    path: PathBuf,
    conn: Arc<Mutex<Connection>>,
}

impl fmt::Debug for SqliteCheckpoints {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteCheckpoints")
            .field("path", &self.path)
            .finish()
    }
}

fn store_err(e: impl Into<shardlock_core::BoxError>) -> CheckpointError {
    CheckpointError::Store(e.into())
}

impl SqliteCheckpoints {
    /// Opens (creating if needed) the database at `path` and its table.
    ///
    /// # Errors
    ///
    /// SQLite errors, e.g. a file that is not a database.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, SqliteError> {
        let path = path.as_ref().to_path_buf();
        let conn = Connection::open(&path).map_err(|e| SqliteError::sqlite(&path, e))?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .and_then(|()| conn.execute_batch(SCHEMA))
            .map_err(|e| SqliteError::sqlite(&path, e))?;
        Ok(Self {
            path,
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    /// Saves a checkpoint inside the caller's transaction, so the
    /// projection's own writes and the checkpoint commit (or roll back)
    /// together. Same fencing as [`CheckpointStore::save`].
    ///
    /// # Errors
    ///
    /// [`CheckpointError::FencedOff`] when `epoch` is not the stored one.
    pub fn save_in(
        tx: &Transaction<'_>,
        subscription: &str,
        epoch: i64,
        position: i64,
    ) -> Result<(), CheckpointError> {
        save(tx, subscription, epoch, position)
    }

    async fn with_conn<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, CheckpointError> + Send + 'static,
    ) -> Result<T, CheckpointError> {
        let conn = Arc::clone(&self.conn);
        tokio::task::spawn_blocking(move || {
            let mut conn = conn.lock().unwrap_or_else(|p| p.into_inner());
            f(&mut conn)
        })
        .await
        .map_err(store_err)?
    }
}

fn save(
    conn: &Connection,
    subscription: &str,
    epoch: i64,
    position: i64,
) -> Result<(), CheckpointError> {
    let changed = conn
        .execute(
            "UPDATE subscriptions SET last_position = MAX(last_position, ?3), updated_at = CURRENT_TIMESTAMP
             WHERE subscription_name = ?1 AND epoch = ?2",
            params![subscription, epoch, position],
        )
        .map_err(store_err)?;
    if changed == 1 {
        return Ok(());
    }
    let current: Option<i64> = conn
        .query_row(
            "SELECT epoch FROM subscriptions WHERE subscription_name = ?1",
            params![subscription],
            |r| r.get(0),
        )
        .optional()
        .map_err(store_err)?;
    Err(CheckpointError::FencedOff {
        subscription: subscription.to_string(),
        ours: epoch,
        current: current.unwrap_or(0),
    })
}

impl CheckpointStore for SqliteCheckpoints {
    async fn claim(&self, subscription: &str) -> Result<Checkpoint, CheckpointError> {
        let name = subscription.to_string();
        self.with_conn(move |conn| {
            conn.query_row(
                "INSERT INTO subscriptions(subscription_name, last_position, epoch, updated_at)
                 VALUES (?1, 0, 1, CURRENT_TIMESTAMP)
                 ON CONFLICT(subscription_name) DO UPDATE SET epoch = epoch + 1, updated_at = CURRENT_TIMESTAMP
                 RETURNING last_position, epoch",
                params![name],
                |r| Ok(Checkpoint { position: r.get(0)?, epoch: r.get(1)? }),
            )
            .map_err(store_err)
        })
        .await
    }

    async fn load(&self, subscription: &str) -> Result<Option<Checkpoint>, CheckpointError> {
        let name = subscription.to_string();
        self.with_conn(move |conn| {
            conn.query_row(
                "SELECT last_position, epoch FROM subscriptions WHERE subscription_name = ?1",
                params![name],
                |r| {
                    Ok(Checkpoint {
                        position: r.get(0)?,
                        epoch: r.get(1)?,
                    })
                },
            )
            .optional()
            .map_err(store_err)
        })
        .await
    }

    async fn save(
        &self,
        subscription: &str,
        epoch: i64,
        position: i64,
    ) -> Result<(), CheckpointError> {
        let name = subscription.to_string();
        self.with_conn(move |conn| save(conn, &name, epoch, position))
            .await
    }
}
