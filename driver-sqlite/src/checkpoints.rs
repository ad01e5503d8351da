//! A checkpoint store in an SQLite database file.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rusqlite::{params, Connection, OptionalExtension, Transaction, TransactionBehavior};
use shardlock_core::{Checkpoint, CheckpointError, CheckpointStore, FencedError, LockKey};
use tracing::warn;

use crate::error::SqliteError;
use crate::session::SqliteSession;

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
            .map_err(CheckpointError::store)?
            .map_err(CheckpointError::store)
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

    /// Runs `work` in a write transaction (`BEGIN IMMEDIATE`) on this
    /// store's database, then commits it **only while `session` holds
    /// `key`** (a **session-fenced transaction**): the projection's rows
    /// written by `work` and the checkpoint it saves with
    /// [`save_in`](Self::save_in) commit together, and a leader whose
    /// session was ended (its liveness file removed, its process killed)
    /// cannot commit them.
    ///
    /// How: after `work`, still inside the transaction, the session's
    /// worker thread (the only thing that frees the session's locks) checks
    /// that the session's liveness file and the key's lock file are still
    /// held, and then does nothing else until the `COMMIT` is over; see the
    /// driver's docs on fenced commits. A session ended before that check
    /// gets [`FencedError::SessionLost`] and nothing is committed; one ended
    /// during the `COMMIT` still held its lock while committing, and its
    /// successor, which must take the lock and then claim the subscription,
    /// comes after that commit. A PostgreSQL session ended during its
    /// `COMMIT` behaves the same.
    ///
    /// From a leadership guard:
    ///
    /// ```
    /// use shardlock_core::{
    ///     acquire_leadership, projection_leadership_key, CheckpointStore, DatabaseId,
    ///     FencedError, NodeId,
    /// };
    /// use shardlock_sqlite::{SqliteCheckpoints, SqliteDriver};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    /// # let dir = std::env::temp_dir().join(format!("shardlock-fenced-doc-{}", std::process::id()));
    /// # std::fs::create_dir_all(&dir)?;
    /// let driver = SqliteDriver::open(dir.join("locks"))?;
    /// let store = SqliteCheckpoints::connect(dir.join("app.db")).await?;
    /// let key = projection_leadership_key("totals")?;
    /// let mut guard =
    ///     acquire_leadership(&driver, &DatabaseId::new("app"), &NodeId::new("a"), key.clone())
    ///         .await?;
    /// let epoch = store.claim("totals").await?.epoch;
    /// store
    ///     .fenced(guard.leader_session()?, &key, move |tx| {
    ///         tx.execute_batch("CREATE TABLE IF NOT EXISTS totals(n INTEGER)")
    ///             .and_then(|()| tx.execute("INSERT INTO totals VALUES (1)", []))
    ///             .map_err(FencedError::effects)?;
    ///         SqliteCheckpoints::save_in(tx, "totals", epoch, 1)?;
    ///         Ok(())
    ///     })
    ///     .await?;
    /// guard.release().await?;
    /// # std::fs::remove_dir_all(&dir)?;
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// `work` runs on Tokio's blocking pool, holding this store's
    /// connection (its other calls wait) and the database's write lock.
    /// While the commit runs the session's worker checks nothing, so its
    /// loss signal and release hints are late by the commit's duration
    /// (bounded by the store's 5 s busy timeout when readers hold the
    /// database in rollback-journal mode).
    ///
    /// # Errors
    ///
    /// [`FencedError::SessionLost`] when `session` is lost, poisoned or
    /// does not hold `key` (the session is poisoned when its worker found
    /// it ended); `work`'s own error; [`FencedError::Effects`] when SQLite
    /// fails to begin or commit. Nothing is committed on any error.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future does not stop `work`: the transaction still
    /// commits (fenced as above) or rolls back on the blocking pool.
    pub async fn fenced<T, F>(
        &self,
        session: &mut SqliteSession,
        key: &LockKey,
        work: F,
    ) -> Result<T, FencedError>
    where
        T: Send + 'static,
        F: FnOnce(&Transaction<'_>) -> Result<T, FencedError> + Send + 'static,
    {
        let fence = session.fence(key).map_err(FencedError::from)?;
        let conn = Arc::clone(&self.conn);
        let path = self.path.clone();
        let done = tokio::task::spawn_blocking(move || -> Result<T, Refused> {
            let mut conn = conn.lock().unwrap_or_else(|p| p.into_inner());
            let sqlite = |e| Refused::Fenced(FencedError::effects(SqliteError::sqlite(&path, e)));
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(sqlite)?;
            let out = work(&tx).map_err(Refused::Fenced)?;
            // Dropping `tx` on an error below rolls it back.
            let pinned = fence.pin().map_err(Refused::Session)?;
            let committed = tx.commit().map_err(sqlite);
            drop(pinned);
            committed.map(|()| out)
        })
        .await;
        match done {
            Ok(Ok(out)) => Ok(out),
            Ok(Err(Refused::Fenced(e))) => Err(e),
            Ok(Err(Refused::Session(e))) => {
                let lost = session.fail(e);
                warn!(key = %key, error = %lost, "fenced commit refused: the session no longer holds the lock");
                Err(FencedError::from(lost))
            }
            Err(join) => Err(FencedError::effects(join)),
        }
    }

    /// [`fenced`](Self::fenced) with the checkpoint saved for you: runs
    /// `effects`, then [`save_in`](Self::save_in)`(tx, subscription, epoch,
    /// position)`, then the fenced commit.
    ///
    /// # Errors
    ///
    /// As [`fenced`](Self::fenced); [`FencedError::Checkpoint`] when the
    /// save is refused (a newer epoch, no claim).
    pub async fn fenced_checkpoint<T, F>(
        &self,
        session: &mut SqliteSession,
        key: &LockKey,
        subscription: &str,
        epoch: i64,
        position: i64,
        effects: F,
    ) -> Result<T, FencedError>
    where
        T: Send + 'static,
        F: FnOnce(&Transaction<'_>) -> Result<T, FencedError> + Send + 'static,
    {
        let subscription = subscription.to_string();
        self.fenced(session, key, move |tx| {
            let out = effects(tx)?;
            save(tx, &subscription, epoch, position)?;
            Ok(out)
        })
        .await
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
        .map_err(CheckpointError::store)?
    }
}

/// Why a fenced transaction's blocking part did not commit.
enum Refused {
    /// The work, the checkpoint or SQLite failed.
    Fenced(FencedError),
    /// The session's worker refused the pin: mapped through the session.
    Session(SqliteError),
}

fn save(
    conn: &Connection,
    subscription: &str,
    epoch: i64,
    position: i64,
) -> Result<(), CheckpointError> {
    CheckpointError::check_save_epoch(subscription, epoch)?;
    let changed = conn
        .execute(
            "UPDATE subscriptions SET last_position = MAX(last_position, ?3), updated_at = CURRENT_TIMESTAMP
             WHERE subscription_name = ?1 AND epoch = ?2",
            params![subscription, epoch, position],
        )
        .map_err(CheckpointError::store)?;
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
        .map_err(CheckpointError::store)?;
    CheckpointError::unchanged_save(subscription, epoch, current)
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
            .map_err(CheckpointError::store)
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
            .map_err(CheckpointError::store)
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
