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
/// Opened like every checkpoint store, with
/// [`connect`](SqliteCheckpoints::connect) (see `shardlock_core`'s
/// projection docs). Calls run on Tokio's blocking pool.
///
/// ```
/// use shardlock_core::CheckpointStore;
/// use shardlock_sqlite::SqliteCheckpoints;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
/// # let dir = std::env::temp_dir().join(format!("shardlock-cp-doc-{}", std::process::id()));
/// # std::fs::create_dir_all(&dir)?;
/// let store = SqliteCheckpoints::connect(dir.join("app.db")).await?;
/// let claimed = store.claim("orders-view").await?;
/// store.save("orders-view", claimed.epoch, 42).await?;
/// assert_eq!(store.load("orders-view").await?.map(|c| c.position), Some(42));
/// # std::fs::remove_dir_all(&dir)?;
/// # Ok(())
/// # }
/// ```
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
    /// Opens (creating if needed) the SQLite database file at `path` and its
    /// `subscriptions` table, on Tokio's blocking pool: the SQLite form of
    /// every store's `connect(target)`.
    ///
    /// # Errors
    ///
    /// [`CheckpointError::Store`] with the [`SqliteError`], e.g. a file that
    /// is not a database or a folder that does not exist.
    pub async fn connect(path: impl AsRef<Path>) -> Result<Self, CheckpointError> {
        let path = path.as_ref().to_path_buf();
        tokio::task::spawn_blocking(move || Self::open_blocking(path))
            .await
            .map_err(store_err)?
            .map_err(store_err)
    }

    /// The synchronous form of [`connect`](Self::connect), kept for
    /// existing callers.
    ///
    /// # Errors
    ///
    /// SQLite errors, e.g. a file that is not a database.
    #[deprecated(
        note = "use `SqliteCheckpoints::connect(path).await`, the shape every checkpoint store has"
    )]
    pub fn open(path: impl AsRef<Path>) -> Result<Self, SqliteError> {
        Self::open_blocking(path.as_ref().to_path_buf())
    }

    fn open_blocking(path: PathBuf) -> Result<Self, SqliteError> {
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
    /// [`CheckpointError::NotClaimed`] when the subscription was never
    /// claimed (or `epoch` is below 1); [`CheckpointError::FencedOff`] when
    /// `epoch` is not the stored one. Nothing is written either way.
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
    if epoch < 1 {
        return Err(CheckpointError::NotClaimed {
            subscription: subscription.to_string(),
        });
    }
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
    Err(match current {
        Some(current) => CheckpointError::FencedOff {
            subscription: subscription.to_string(),
            ours: epoch,
            current,
        },
        None => CheckpointError::NotClaimed {
            subscription: subscription.to_string(),
        },
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
