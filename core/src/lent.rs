//! The session's side of a [`BlockingWait`]: a server-side driver's session
//! keeps its connection in an `Option` that is empty while a blocking
//! [`acquire`](crate::Session::acquire) has lent it to the waiting task,
//! and takes it back before its next call. Written once here; a driver's
//! session borrows its three fields as a [`Lent`] for each step.
//!
//! # Invariants
//!
//! 1. Before any round trip the connection is taken back from a finished or
//!    abandoned wait ([`Lent::ready`]); a missing connection poisons the
//!    session.
//! 2. A wait's end is applied to the bookkeeping at once: a grant records
//!    the key, a failure that dropped the connection (other than a lost
//!    one) poisons the session, a lost connection is dropped and poisons it
//!    through [`Holds::fail`].

use std::fmt;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::error::{DriverError, Error, Result};
use crate::holds::Holds;
use crate::key::LockKey;
use crate::wait::{BlockingLock, BlockingWait, Outcome, ReturnedOf};

/// A driver error that can say its connection is gone (then the session
/// drops the connection).
pub trait ConnectionLoss {
    /// Whether the connection is gone.
    fn is_connection_lost(&self) -> bool;
}

/// A session's connection, the wait it may be lent to, and its
/// bookkeeping, borrowed for one step.
pub struct Lent<'a, O: BlockingLock> {
    conn: &'a mut Option<O::Conn>,
    waiting: &'a mut Option<Arc<BlockingWait<O>>>,
    holds: &'a mut Holds,
}

impl<'a, O> Lent<'a, O>
where
    O: BlockingLock,
    O::Error: DriverError + ConnectionLoss,
{
    /// Borrows a session's fields.
    pub fn new(
        conn: &'a mut Option<O::Conn>,
        waiting: &'a mut Option<Arc<BlockingWait<O>>>,
        holds: &'a mut Holds,
    ) -> Self {
        Self {
            conn,
            waiting,
            holds,
        }
    }

    /// Takes the connection back from a finished or abandoned wait (if
    /// any), applying its end; an error it ended with is only logged.
    pub async fn reclaim(&mut self) {
        let Some(wait) = self.waiting.clone() else {
            return;
        };
        let returned = wait.returned().await;
        *self.waiting = None;
        if let Err(err) = self.absorb(wait.lock().key(), returned) {
            debug!(error = %err, "an abandoned wait ended with an error");
        }
    }

    /// [`reclaim`](Self::reclaim), then checks the connection is there and
    /// the session sound ([`Holds::ready`]).
    ///
    /// # Errors
    ///
    /// [`Error::SessionLost`] when it is not (the session is poisoned).
    pub async fn ready(&mut self) -> Result<()> {
        self.reclaim().await;
        if self.conn.is_none() {
            return Err(self.holds.poison("the connection is closed"));
        }
        self.holds.ready()
    }

    /// Applies the end of a wait for `key`: puts the connection back and
    /// answers whether the key is now held.
    ///
    /// # Errors
    ///
    /// The wait's failure, through [`fail`](Self::fail); a connection the
    /// wait closed for another reason poisons the session.
    pub fn absorb(&mut self, key: &LockKey, returned: ReturnedOf<O>) -> Result<bool> {
        *self.conn = returned.conn;
        match returned.outcome {
            Outcome::Granted => {
                self.holds.insert(key.clone());
                Ok(true)
            }
            Outcome::NotGranted => Ok(false),
            Outcome::Failed(err) => {
                if self.conn.is_none() && !err.is_connection_lost() {
                    let reason = format!("the wait's connection was closed: {err}");
                    return Err(self.holds.poison(reason));
                }
                Err(self.fail(err))
            }
        }
    }

    /// Maps a driver error through [`Holds::fail`]; a lost connection is
    /// dropped first.
    pub fn fail(&mut self, err: O::Error) -> Error {
        if err.is_connection_lost() {
            *self.conn = None;
        }
        self.holds.fail(err)
    }

    /// A blocking acquire of `key`: after [`ready`](Self::ready), a held key
    /// answers `true` and a fired `cancel` `false` at once; otherwise the
    /// connection is lent to the wait `lock` makes (its statements counted
    /// in `round_trips`) until it ends or `cancel` fires, and its end is
    /// applied. `what` names the call for [`Error::NotInRuntime`].
    ///
    /// # Errors
    ///
    /// As [`ready`](Self::ready) and [`absorb`](Self::absorb);
    /// [`Error::NotInRuntime`] without a Tokio runtime.
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: see [`BlockingWait::finish`]; the next
    /// [`ready`](Self::ready) takes the connection back.
    pub async fn acquire(
        mut self,
        key: &LockKey,
        lock: impl FnOnce() -> O,
        round_trips: &Arc<AtomicU64>,
        cancel: &CancellationToken,
        what: &'static str,
    ) -> Result<bool> {
        self.ready().await?;
        if self.holds.contains(key) {
            return Ok(true);
        }
        if cancel.is_cancelled() {
            return Ok(false);
        }
        let Some(conn) = self.conn.take() else {
            return Err(self.holds.poison("the connection is closed"));
        };
        let wait = match BlockingWait::start(conn, lock(), Arc::clone(round_trips)) {
            Ok(wait) => wait,
            Err(conn) => {
                *self.conn = Some(conn);
                return Err(Error::NotInRuntime { what });
            }
        };
        *self.waiting = Some(Arc::clone(&wait));
        let returned = wait.finish(cancel).await;
        *self.waiting = None;
        self.absorb(key, returned)
    }
}

impl<O: BlockingLock> fmt::Debug for Lent<'_, O> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lent")
            .field("connected", &self.conn.is_some())
            .field("waiting", &self.waiting.is_some())
            .field("holds", &self.holds)
            .finish()
    }
}
