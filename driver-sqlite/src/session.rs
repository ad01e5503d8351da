//! The async face of a session: commands to its worker thread.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use shardlock_core::{CancellationToken, DatabaseId, Error, LockKey, Result, Session};
use std::sync::mpsc;

use tokio::sync::oneshot;

use crate::error::SqliteError;
use crate::worker::{Command, Reply};

/// A session on a lock directory: a worker thread holding one SQLite write
/// transaction per key.
///
/// Dropping it never blocks: the worker sees its channel close, rolls every
/// transaction back (freeing the locks) and exits. If the process dies, the
/// operating system frees the file locks.
pub struct SqliteSession {
    commands: mpsc::Sender<Command>,
    database: DatabaseId,
    name: String,
    liveness: PathBuf,
    held: BTreeMap<i64, LockKey>,
}

impl SqliteSession {
    pub(crate) fn new(
        commands: mpsc::Sender<Command>,
        database: DatabaseId,
        name: String,
        liveness: PathBuf,
    ) -> Self {
        Self {
            commands,
            database,
            name,
            liveness,
            held: BTreeMap::new(),
        }
    }

    /// The session's liveness file. Deleting it ends the session as an
    /// operator would: its next call fails and its locks are freed.
    pub fn liveness_file(&self) -> &Path {
        &self.liveness
    }

    /// The session's name in the lock directory (its liveness file is
    /// `<database>/sessions/<name>.lock`).
    pub fn name(&self) -> &str {
        &self.name
    }

    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T> {
        let (tx, rx) = oneshot::channel();
        if self.commands.send(make(tx)).is_err() {
            return Err(self.gone());
        }
        rx.await.map_err(|_| self.gone())?
    }

    fn gone(&self) -> Error {
        Error::SessionLost {
            database: self.database.to_string(),
            reason: "the session's worker thread stopped".into(),
            source: Some(Box::new(SqliteError::WorkerGone)),
        }
    }

    fn forget_on_loss<T>(&mut self, result: Result<T>) -> Result<T> {
        if let Err(e) = &result {
            if e.is_session_fatal() {
                self.held.clear();
            }
        }
        result
    }
}

impl Session for SqliteSession {
    fn database(&self) -> &DatabaseId {
        &self.database
    }

    fn held(&self) -> Vec<LockKey> {
        self.held.values().cloned().collect()
    }

    /// Takes each free key's file lock; one worker call for the whole batch.
    ///
    /// # Cancel safety
    ///
    /// If the future is dropped, the worker still finishes the batch and the
    /// keys it took stay held by the session without it knowing; the next
    /// `verify` still passes, so prefer not to drop it. `release_all` and
    /// `close` free them.
    async fn try_acquire(&mut self, keys: &[LockKey]) -> Result<Vec<bool>> {
        let batch = keys.to_vec();
        let result = self.call(|r| Command::TryAcquire(batch, r)).await;
        let granted = self.forget_on_loss(result)?;
        for (key, ok) in keys.iter().zip(&granted) {
            if *ok {
                self.held.insert(key.id(), key.clone());
            }
        }
        Ok(granted)
    }

    /// Waits (SQLite's busy handler, retrying every 5 ms in the worker) until
    /// the key is free or `cancel` fires.
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: between short slices the worker checks both `cancel` and
    /// whether this future still exists; a lock granted to a waiter that is
    /// gone is released at once.
    async fn acquire(&mut self, key: &LockKey, cancel: &CancellationToken) -> Result<bool> {
        let (k, c) = (key.clone(), cancel.clone());
        let result = self.call(|r| Command::Acquire(k, c, r)).await;
        let got = self.forget_on_loss(result)?;
        if got {
            self.held.insert(key.id(), key.clone());
        }
        Ok(got)
    }

    async fn release(&mut self, key: &LockKey) -> Result<bool> {
        let k = key.clone();
        let result = self.call(|r| Command::Release(k, r)).await;
        self.held.remove(&key.id());
        self.forget_on_loss(result)
    }

    async fn release_all(&mut self) -> Result<()> {
        let result = self.call(Command::ReleaseAll).await;
        self.held.clear();
        result
    }

    async fn verify(&mut self) -> Result<()> {
        let result = self.call(Command::Verify).await;
        self.forget_on_loss(result)
    }

    async fn close(self) -> Result<()> {
        self.call(Command::Close).await
    }
}

impl fmt::Debug for SqliteSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteSession")
            .field("database", &self.database)
            .field("name", &self.name)
            .field("held", &self.held.len())
            .finish()
    }
}
