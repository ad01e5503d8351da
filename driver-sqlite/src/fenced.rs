//! Session-fenced commits: the projection's writes and its checkpoint
//! commit in the application's SQLite database only while the session's
//! worker provably holds the leadership lock (see
//! [`SqliteCheckpoints::fenced`](crate::SqliteCheckpoints::fenced)).
//!
//! # Why not a transaction on the lock's own connection
//!
//! A key's lock *is* an open write transaction (`BEGIN IMMEDIATE`, no
//! journal) on the key's own file, owned by the session's worker thread.
//! Committing anything on that connection would end that transaction and
//! so free the lock; and a transaction spanning the key file and the
//! application's database (`ATTACH`) cannot commit without ending it either.
//! Reading the registry inside the application's transaction proves
//! nothing: it is in WAL mode, where a reader never blocks the writer that
//! records a release, and the registry is only bookkeeping anyway.
//!
//! # The pin
//!
//! Only the worker thread ever frees the session's locks (a release, its
//! liveness check finding the liveness file removed, close or drop), or
//! the process dying, which ends a commit in progress too (SQLite rolls a
//! half-done commit back). So the committing thread, already inside its
//! write transaction on the application's database, asks the worker to
//! **pin**: the worker checks that the liveness file is still the one it
//! locked and the key's lock file is held, answers, and then serves nothing
//! (no liveness check, no release) until the commit is over. The commit
//! therefore runs while the lock is held, and a session ended before the
//! pin (its liveness file removed, even if the worker has not noticed yet)
//! cannot commit. A liveness file removed *during* the commit is the same
//! as `pg_terminate_backend` during a PostgreSQL commit: the commit
//! completes with the lock still held, and the lock is freed right after;
//! a follower can take the lock (and claim the subscription) only after
//! that commit, and resumes from the checkpoint it saved.

use std::sync::mpsc;

use shardlock_core::{LockKey, SessionSignals};

use crate::error::SqliteError;
use crate::worker::Command;

/// What a fenced commit pins the session's worker with.
pub(crate) struct Fence {
    commands: mpsc::Sender<Command>,
    key: LockKey,
    signals: SessionSignals,
}

/// The worker is pinned while this lives; dropping it lets the worker go
/// on.
pub(crate) struct Pinned {
    _done: mpsc::Sender<()>,
}

impl Fence {
    pub(crate) fn new(
        commands: mpsc::Sender<Command>,
        key: LockKey,
        signals: SessionSignals,
    ) -> Self {
        Self {
            commands,
            key,
            signals,
        }
    }

    /// Blocking (call it on a blocking thread): pins the worker once it has
    /// proved the session alive and the key held.
    ///
    /// # Errors
    ///
    /// [`SqliteError::SessionEnded`] when the loss signal fired, the
    /// liveness file is gone or replaced, or the key's lock file is not
    /// held; [`SqliteError::WorkerGone`] when the worker is gone.
    pub(crate) fn pin(&self) -> Result<Pinned, SqliteError> {
        if self.signals.is_lost() {
            return Err(SqliteError::SessionEnded {
                reason: self
                    .signals
                    .reason()
                    .unwrap_or_else(|| "the session was lost".to_string()),
            });
        }
        let (ready_tx, ready_rx) = mpsc::sync_channel(1);
        let (done_tx, done_rx) = mpsc::channel();
        self.commands
            .send(Command::Pin(self.key.clone(), ready_tx, done_rx))
            .map_err(|_| SqliteError::WorkerGone)?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(Pinned { _done: done_tx }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(SqliteError::WorkerGone),
        }
    }
}
