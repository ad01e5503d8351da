//! The decisions of a session-fenced transaction, written once: a
//! transaction on the connection that holds a session's locks commits only
//! while the session is sound, and a failure tells a lost session apart
//! from a refused checkpoint.
//!
//! A server-side driver (Postgres, MySQL) opens the transaction on its
//! session's own connection and wraps it in a [`FencedTransaction`]; its
//! transaction type implements [`FencedTx`] with the two statements
//! (`COMMIT`, `ROLLBACK`), and keeps its own SQL, docs and accessors. The
//! commit itself is the fence: it runs on the lock-holding connection, so
//! it only succeeds while that connection, and so every lock of the
//! session, is alive. What is decided here:
//!
//! 1. A commit is sent only if [`Holds::ready`] passes (the loss signal
//!    has not fired and no earlier round trip was interrupted); otherwise
//!    the transaction is dropped unsent (the driver rolls back) and the
//!    answer is [`Error::SessionLost`](crate::Error::SessionLost).
//! 2. `COMMIT` and `ROLLBACK` are tracked round trips
//!    ([`Holds::begin`]/[`Holds::end`], counted in the session's round
//!    trips): dropped in flight, the session is poisoned at its next call;
//!    a session-fatal failure poisons it at once ([`Holds::fail`]).
//! 3. A checkpoint save that failed inside the transaction
//!    ([`refused_save`]): when the session is lost by then, the save failed
//!    because the connection is gone, so the answer is
//!    [`FencedError::SessionLost`]; otherwise the transaction is rolled back
//!    and the answer is [`FencedError::Checkpoint`] (or `SessionLost` if the
//!    rollback finds the connection gone).

use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};

use tracing::{debug, warn};

use crate::error::{DriverError, Result};
use crate::holds::Holds;
use crate::projection::{CheckpointError, FencedError};

/// The name of the commit round trip, for [`Holds::begin`] and errors.
pub const COMMIT: &str = "commit a fenced transaction";

/// The name of the rollback round trip, for [`Holds::begin`] and errors.
pub const ROLLBACK: &str = "roll back a fenced transaction";

/// A driver's open transaction on its session's lock-holding connection:
/// the two statements that end it, the decisions stay in
/// [`FencedTransaction`].
pub trait FencedTx: Send + Sized {
    /// The driver's error.
    type Error: DriverError;

    /// Sends `COMMIT`; `op` ([`COMMIT`]) names it in the driver's error.
    fn commit(
        self,
        op: &'static str,
    ) -> impl Future<Output = std::result::Result<(), Self::Error>> + Send;

    /// Sends `ROLLBACK`; `op` ([`ROLLBACK`]) names it in the driver's error.
    fn rollback(
        self,
        op: &'static str,
    ) -> impl Future<Output = std::result::Result<(), Self::Error>> + Send;

    /// Saves the subscription's checkpoint inside the transaction, fenced
    /// by `epoch` (the driver's checkpoint store's `save_in`).
    fn save_checkpoint(
        &mut self,
        subscription: &str,
        epoch: i64,
        position: i64,
    ) -> impl Future<Output = std::result::Result<(), CheckpointError>> + Send;
}

/// A transaction on a session's lock-holding connection, with the session's
/// bookkeeping: a driver's fenced transaction type wraps one and forwards
/// [`commit`](Self::commit) and [`rollback`](Self::rollback) to it.
///
/// Dropped unfinished, the inner transaction is dropped, and the driver
/// rolls it back.
pub struct FencedTransaction<'s, T> {
    tx: T,
    holds: &'s mut Holds,
    round_trips: &'s AtomicU64,
    connection: u64,
}

impl<'s, T: FencedTx> FencedTransaction<'s, T> {
    /// Wraps `tx`, opened on the connection of the session whose
    /// bookkeeping is `holds`; `round_trips` is the session's counter and
    /// `connection` the server's id of the connection (for logs).
    pub fn new(tx: T, holds: &'s mut Holds, round_trips: &'s AtomicU64, connection: u64) -> Self {
        Self {
            tx,
            holds,
            round_trips,
            connection,
        }
    }

    /// The driver's transaction, to run statements on.
    pub fn tx(&self) -> &T {
        &self.tx
    }

    /// The driver's transaction, to run statements on.
    pub fn tx_mut(&mut self) -> &mut T {
        &mut self.tx
    }

    /// The server's id of the connection running the transaction.
    pub fn connection(&self) -> u64 {
        self.connection
    }

    /// Whether the session was poisoned or its loss signalled.
    pub fn is_lost(&self) -> bool {
        self.holds.is_broken()
    }

    /// Commits, if the session is still sound (see the
    /// [module docs](self)).
    ///
    /// # Errors
    ///
    /// [`Error::SessionLost`](crate::Error::SessionLost) when the session is
    /// lost (nothing committed; the session is poisoned); the driver's other
    /// errors as [`Error::Driver`](crate::Error::Driver) (nothing committed,
    /// the session stays usable).
    ///
    /// # Cancel safety
    ///
    /// Not cancel-safe: dropped while `COMMIT` is in flight, whether it
    /// committed is unknown, and the session is poisoned at its next call.
    pub async fn commit(self) -> Result<()> {
        let Self {
            tx,
            holds,
            round_trips,
            connection,
        } = self;
        if let Err(lost) = holds.ready() {
            warn!(connection, error = %lost, "the session was lost: the fenced transaction is rolled back");
            // Dropping it rolls back; the connection is gone or going.
            drop(tx);
            return Err(lost);
        }
        holds.begin(COMMIT)?;
        round_trips.fetch_add(1, Ordering::Relaxed);
        let committed = tx.commit(COMMIT).await;
        holds.end();
        match committed {
            Ok(()) => {
                debug!(connection, "fenced transaction committed");
                Ok(())
            }
            Err(e) => {
                let err = holds.fail(e);
                warn!(connection, error = %err, "fenced transaction not committed");
                Err(err)
            }
        }
    }

    /// Rolls back.
    ///
    /// # Errors
    ///
    /// The driver's, e.g. [`Error::SessionLost`](crate::Error::SessionLost)
    /// when the connection is gone (then the server rolled back already).
    pub async fn rollback(self) -> Result<()> {
        let Self {
            tx,
            holds,
            round_trips,
            ..
        } = self;
        holds.begin(ROLLBACK)?;
        round_trips.fetch_add(1, Ordering::Relaxed);
        let rolled = tx.rollback(ROLLBACK).await;
        holds.end();
        rolled.map_err(|e| holds.fail(e))
    }

    /// Saves the checkpoint in this transaction
    /// ([`FencedTx::save_checkpoint`]), then [`commit`](Self::commit)s: the
    /// writes made so far and the checkpoint commit together, or neither
    /// does.
    ///
    /// # Errors
    ///
    /// [`FencedError::Checkpoint`] when the save is refused or fails (the
    /// transaction is rolled back); [`FencedError::SessionLost`] when the
    /// session is lost, before or at the commit; another commit failure as
    /// [`FencedError::Effects`]. Nothing was committed either way.
    pub async fn commit_checkpoint(
        mut self,
        subscription: &str,
        epoch: i64,
        position: i64,
    ) -> std::result::Result<(), FencedError> {
        let saved = self.tx.save_checkpoint(subscription, epoch, position).await;
        if let Err(refused) = saved {
            return Err(self.refused_save(refused).await);
        }
        self.commit().await.map_err(FencedError::from)
    }

    /// What a checkpoint save that failed in this transaction (`refused`)
    /// means, rolling back if the session is still sound: see
    /// [`refused_save`].
    pub async fn refused_save(self, refused: CheckpointError) -> FencedError {
        let ready = self.holds.ready();
        refused_save(refused, ready.map(|()| self.rollback())).await
    }
}

impl<T> fmt::Debug for FencedTransaction<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FencedTransaction")
            .field("connection", &self.connection)
            .field("lost", &self.holds.is_broken())
            .finish()
    }
}

/// The answer to a checkpoint save that failed inside a fenced transaction:
/// `rollback` is the rollback to run, or the
/// [`Error::SessionLost`](crate::Error::SessionLost) that
/// [`Holds::ready`] answered after the failed save. A save that failed
/// because the connection is gone is a lost session, not a checkpoint
/// problem; otherwise the transaction is rolled back and the refusal
/// reported (a rollback that finds the connection gone is a lost session
/// too; another failing rollback is only logged).
pub async fn refused_save<F>(refused: CheckpointError, rollback: Result<F>) -> FencedError
where
    F: Future<Output = Result<()>>,
{
    let rollback = match rollback {
        Ok(rollback) => rollback,
        Err(lost) => return FencedError::SessionLost(lost),
    };
    match rollback.await {
        Err(lost) if lost.is_session_fatal() => FencedError::SessionLost(lost),
        Err(e) => {
            debug!(error = %e, "rolling back after a refused checkpoint failed");
            FencedError::Checkpoint(refused)
        }
        Ok(()) => FencedError::Checkpoint(refused),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::error::{Error, ErrorKind};
    use crate::ids::DatabaseId;

    #[derive(Debug, thiserror::Error)]
    #[error("fake {op}: {kind:?}")]
    struct FakeError {
        op: &'static str,
        kind: ErrorKind,
    }

    impl DriverError for FakeError {
        fn driver(&self) -> &'static str {
            "fake"
        }

        fn kind(&self) -> ErrorKind {
            self.kind
        }
    }

    /// Records which statements were sent; each answers `fail` if set.
    struct FakeTx {
        sent: Arc<Mutex<Vec<&'static str>>>,
        fail: Option<ErrorKind>,
        refuse: bool,
    }

    impl FakeTx {
        fn send(self, op: &'static str) -> std::result::Result<(), FakeError> {
            self.sent
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(op);
            match self.fail {
                Some(kind) => Err(FakeError { op, kind }),
                None => Ok(()),
            }
        }
    }

    impl FencedTx for FakeTx {
        type Error = FakeError;

        async fn commit(self, op: &'static str) -> std::result::Result<(), FakeError> {
            self.send(op)
        }

        async fn rollback(self, op: &'static str) -> std::result::Result<(), FakeError> {
            self.send(op)
        }

        async fn save_checkpoint(
            &mut self,
            subscription: &str,
            _: i64,
            _: i64,
        ) -> std::result::Result<(), CheckpointError> {
            if self.refuse {
                return Err(CheckpointError::NotClaimed {
                    subscription: subscription.into(),
                });
            }
            Ok(())
        }
    }

    struct Fixture {
        holds: Holds,
        round_trips: AtomicU64,
        sent: Arc<Mutex<Vec<&'static str>>>,
    }

    impl Fixture {
        fn new() -> Self {
            Self {
                holds: Holds::new(DatabaseId::new("app")),
                round_trips: AtomicU64::new(0),
                sent: Arc::default(),
            }
        }

        fn tx(&mut self, fail: Option<ErrorKind>) -> FencedTransaction<'_, FakeTx> {
            let tx = FakeTx {
                sent: Arc::clone(&self.sent),
                fail,
                refuse: false,
            };
            FencedTransaction::new(tx, &mut self.holds, &self.round_trips, 7)
        }

        fn sent(&self) -> Vec<&'static str> {
            self.sent
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone()
        }
    }

    fn refused() -> CheckpointError {
        CheckpointError::NotClaimed {
            subscription: "orders".into(),
        }
    }

    #[tokio::test]
    async fn a_sound_session_commits_in_one_counted_round_trip() {
        let mut f = Fixture::new();
        f.tx(None).commit().await.expect("commit");
        assert_eq!(f.sent(), [COMMIT]);
        assert_eq!(f.round_trips.load(Ordering::Relaxed), 1);
        assert!(f.holds.ready().is_ok(), "the session stays usable");
    }

    #[tokio::test]
    async fn a_lost_session_sends_no_commit() {
        let mut f = Fixture::new();
        f.holds.signals().fire_lost("killed");
        let err = f.tx(None).commit().await.expect_err("lost");
        assert!(matches!(err, Error::SessionLost { .. }), "{err:?}");
        assert!(f.sent().is_empty(), "nothing sent: {:?}", f.sent());
        assert_eq!(f.round_trips.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn a_fatal_commit_failure_poisons_and_another_does_not() {
        let mut f = Fixture::new();
        let err = f
            .tx(Some(ErrorKind::Other))
            .commit()
            .await
            .expect_err("fails");
        assert!(!err.is_session_fatal(), "{err:?}");
        assert!(
            f.holds.ready().is_ok(),
            "a refused commit keeps the session"
        );

        let err = f
            .tx(Some(ErrorKind::SessionFatal))
            .commit()
            .await
            .expect_err("fails");
        assert!(err.is_session_fatal(), "{err:?}");
        assert!(f.holds.is_broken(), "a lost connection poisons");
        assert_eq!(f.round_trips.load(Ordering::Relaxed), 2);
    }

    #[tokio::test]
    async fn a_commit_dropped_in_flight_poisons_the_next_call() {
        struct Pending;
        impl FencedTx for Pending {
            type Error = FakeError;
            async fn commit(self, _: &'static str) -> std::result::Result<(), FakeError> {
                std::future::pending().await
            }
            async fn rollback(self, _: &'static str) -> std::result::Result<(), FakeError> {
                Ok(())
            }
            async fn save_checkpoint(
                &mut self,
                _: &str,
                _: i64,
                _: i64,
            ) -> std::result::Result<(), CheckpointError> {
                Ok(())
            }
        }
        let mut holds = Holds::new(DatabaseId::new("app"));
        let round_trips = AtomicU64::new(0);
        {
            let commit = FencedTransaction::new(Pending, &mut holds, &round_trips, 7).commit();
            let mut commit = std::pin::pin!(commit);
            let polled = futures_poll_once(commit.as_mut()).await;
            assert!(polled.is_none(), "the commit is still in flight");
        }
        let err = holds.ready().expect_err("poisoned");
        assert!(err.to_string().contains(COMMIT), "{err}");
    }

    /// Polls `fut` once, answering its output if it was ready.
    async fn futures_poll_once<F: Future + Unpin>(mut fut: F) -> Option<F::Output> {
        std::future::poll_fn(|cx| {
            std::task::Poll::Ready(match std::pin::Pin::new(&mut fut).poll(cx) {
                std::task::Poll::Ready(out) => Some(out),
                std::task::Poll::Pending => None,
            })
        })
        .await
    }

    #[tokio::test]
    async fn commit_checkpoint_commits_a_saved_checkpoint_and_rolls_back_a_refused_one() {
        let mut f = Fixture::new();
        f.tx(None)
            .commit_checkpoint("orders", 1, 3)
            .await
            .expect("committed");
        assert_eq!(f.sent(), [COMMIT]);

        let mut f = Fixture::new();
        let mut tx = f.tx(None);
        tx.tx_mut().refuse = true;
        let err = tx
            .commit_checkpoint("orders", 1, 3)
            .await
            .expect_err("refused");
        assert!(matches!(err, FencedError::Checkpoint(_)), "{err:?}");
        assert_eq!(f.sent(), [ROLLBACK], "rolled back, never committed");
    }

    #[tokio::test]
    async fn a_refused_save_on_a_sound_session_rolls_back() {
        let mut f = Fixture::new();
        let err = f.tx(None).refused_save(refused()).await;
        assert!(matches!(err, FencedError::Checkpoint(_)), "{err:?}");
        assert_eq!(f.sent(), [ROLLBACK]);
        assert!(f.holds.ready().is_ok());
    }

    #[tokio::test]
    async fn a_refused_save_on_a_lost_session_is_a_lost_session() {
        let mut f = Fixture::new();
        f.holds.signals().fire_lost("killed");
        let err = f.tx(None).refused_save(refused()).await;
        assert!(matches!(err, FencedError::SessionLost(_)), "{err:?}");
        assert!(f.sent().is_empty(), "no rollback sent: {:?}", f.sent());
    }

    #[tokio::test]
    async fn a_rollback_that_finds_the_connection_gone_is_a_lost_session() {
        let mut f = Fixture::new();
        let err = f
            .tx(Some(ErrorKind::SessionFatal))
            .refused_save(refused())
            .await;
        assert!(matches!(err, FencedError::SessionLost(_)), "{err:?}");

        let mut f = Fixture::new();
        let err = f.tx(Some(ErrorKind::Other)).refused_save(refused()).await;
        assert!(
            matches!(err, FencedError::Checkpoint(_)),
            "a failing rollback keeps the refusal: {err:?}"
        );
    }
}
