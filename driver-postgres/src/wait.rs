//! The blocking wait of [`PgSession::acquire`](crate::PgSession): a task
//! owns the connection while `pg_advisory_lock` waits, so the wait can be
//! cancelled, or abandoned by a dropped future, without the key ever staying
//! held by accident.
//!
//! # Invariants
//!
//! 1. While a wait runs, the task owns the connection; the session gets it
//!    back only through [`Wait::returned`].
//! 2. Once the wait is *abandoned* (cancel token fired or acquire future
//!    dropped), the task never reports `Granted`: it cancels the backend's
//!    wait from a side connection (`pg_cancel_backend`), then releases the
//!    key if the backend holds it (a grant can race the cancel), and only
//!    then hands the connection back.
//! 3. A grant reported just before the acquire future was dropped (nobody
//!    saw it) is given back by a task the drop spawns.
//! 4. If the key cannot be given back, the connection is dropped: the server
//!    ends the session, which frees every lock it held.
//!
//! The state lives under one mutex; no lock is held across an `.await`.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use shardlock_core::{CancellationToken, LockKey};
use sqlx::postgres::PgConnection;
use tokio::runtime::Handle;
use tokio::sync::Notify;
use tracing::{debug, warn};

use crate::connection::SideConnect;
use crate::error::{classify, is_connection_error, sqlstate_of, Class, PgError};
use crate::sql;

/// Pause before cancelling a still-waiting statement again (a cancel that
/// reaches the backend before the statement started is ignored).
const RECANCEL_AFTER: Duration = Duration::from_millis(200);

/// Give up cancelling after this long and drop the connection instead.
pub(crate) const GIVE_UP_CANCEL_AFTER: Duration = Duration::from_secs(30);

/// How a wait ended.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// The key is held by the session.
    Granted,
    /// The wait was abandoned; the key is not held.
    NotGranted,
    /// The wait failed; the key is not held (it was given back, or the
    /// connection was dropped).
    Failed(PgError),
}

/// The connection coming back from a wait.
#[derive(Debug)]
pub(crate) struct Returned {
    /// `None` when the connection was dropped (lost, or to free the key).
    pub(crate) conn: Option<PgConnection>,
    pub(crate) outcome: Outcome,
}

#[derive(Debug, Default)]
struct State {
    abandoned: bool,
    returned: Option<Returned>,
}

/// One blocking wait, shared by the waiting task, the acquire future and the
/// session.
#[derive(Debug)]
pub(crate) struct Wait {
    key: LockKey,
    /// The session's round-trip counter (statements on its connection).
    round_trips: Arc<AtomicU64>,
    state: Mutex<State>,
    ready: Notify,
    abandon: CancellationToken,
}

impl Wait {
    /// Starts waiting for `key` on `conn` in a task. Gives the connection
    /// back when there is no Tokio runtime to run the task.
    pub(crate) fn start(
        conn: PgConnection,
        key: LockKey,
        pid: i32,
        side: Arc<SideConnect>,
        round_trips: Arc<AtomicU64>,
    ) -> Result<Arc<Self>, PgConnection> {
        let Ok(handle) = Handle::try_current() else {
            return Err(conn);
        };
        let wait = Arc::new(Self {
            key,
            round_trips,
            state: Mutex::new(State::default()),
            ready: Notify::new(),
            abandon: CancellationToken::new(),
        });
        let delivery = Delivery {
            wait: Some(Arc::clone(&wait)),
        };
        let _task = handle.spawn(run(conn, pid, side, delivery));
        Ok(wait)
    }

    /// The key waited for.
    pub(crate) fn key(&self) -> &LockKey {
        &self.key
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // Every update is a single assignment: a panic cannot leave it torn.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits until the connection comes back.
    ///
    /// Cancel-safe: the result is taken only in the poll that returns it.
    pub(crate) async fn returned(&self) -> Returned {
        loop {
            let notified = self.ready.notified();
            if let Some(returned) = self.state().returned.take() {
                return returned;
            }
            notified.await;
        }
    }

    /// The caller's cancel token fired: abandon the wait. Answers the result
    /// if the task had already delivered it (a grant that won the race).
    pub(crate) fn abandon(&self) -> Option<Returned> {
        let mut state = self.state();
        state.abandoned = true;
        self.abandon.cancel();
        state.returned.take()
    }

    /// The acquire future was dropped: abandon the wait, and give back a
    /// grant that was delivered but never seen.
    pub(crate) fn abandon_on_drop(self: &Arc<Self>) {
        let mut state = self.state();
        state.abandoned = true;
        self.abandon.cancel();
        let unseen = match state.returned.take() {
            Some(Returned {
                conn: Some(conn),
                outcome: Outcome::Granted,
            }) => conn,
            other => {
                state.returned = other;
                return;
            }
        };
        drop(state);
        match Handle::try_current() {
            Ok(handle) => {
                debug!(key = %self.key, "acquire dropped right after a grant: giving the key back");
                let delivery = Delivery {
                    wait: Some(Arc::clone(self)),
                };
                let counter = Arc::clone(&self.round_trips);
                let _task = handle.spawn(async move {
                    let (conn, outcome) =
                        give_back(unseen, delivery.key_id(), None, &counter).await;
                    delivery.deliver(conn, outcome);
                });
            }
            Err(_) => {
                // No runtime to unlock: ending the connection frees the key.
                drop(unseen);
                self.put(Returned {
                    conn: None,
                    outcome: Outcome::Failed(PgError::WaitAbandoned {
                        reason: "the acquire future was dropped outside a Tokio runtime right \
                                 after a grant; the connection was closed to free the key",
                    }),
                });
            }
        }
    }

    fn put(&self, returned: Returned) {
        self.state().returned = Some(returned);
        self.ready.notify_one();
    }
}

/// The task's handle to deliver the result exactly once; if the task is
/// dropped first (its runtime shut down), the wait ends as failed, and the
/// connection, dropped with the task, closes.
struct Delivery {
    wait: Option<Arc<Wait>>,
}

impl Delivery {
    fn key_id(&self) -> i64 {
        self.wait.as_ref().map_or(0, |w| w.key.id())
    }

    fn abandoned(&self) -> bool {
        self.wait.as_ref().is_some_and(|w| w.state().abandoned)
    }

    /// Delivers a grant unless the wait was abandoned meanwhile; then the
    /// connection comes back to the caller to give the key back.
    fn deliver_granted(&mut self, conn: PgConnection) -> Result<(), PgConnection> {
        let Some(wait) = self.wait.take() else {
            return Err(conn);
        };
        let mut state = wait.state();
        if state.abandoned {
            drop(state);
            self.wait = Some(wait);
            return Err(conn);
        }
        state.returned = Some(Returned {
            conn: Some(conn),
            outcome: Outcome::Granted,
        });
        drop(state);
        wait.ready.notify_one();
        Ok(())
    }

    fn deliver(mut self, conn: Option<PgConnection>, outcome: Outcome) {
        if let Some(wait) = self.wait.take() {
            wait.put(Returned { conn, outcome });
        }
    }
}

impl Drop for Delivery {
    fn drop(&mut self) {
        if let Some(wait) = self.wait.take() {
            wait.put(Returned {
                conn: None,
                outcome: Outcome::Failed(PgError::WaitAbandoned {
                    reason: "the task waiting for the lock was stopped (its runtime shut down); \
                             the connection was closed",
                }),
            });
        }
    }
}

/// The waiting task.
async fn run(mut conn: PgConnection, pid: i32, side: Arc<SideConnect>, mut delivery: Delivery) {
    let Some(wait) = delivery.wait.clone() else {
        return;
    };
    let key = wait.key.id();
    let counter = Arc::clone(&wait.round_trips);
    counter.fetch_add(1, Ordering::Relaxed);
    let result = {
        let lock = sqlx::query(sql::LOCK).bind(key).execute(&mut conn);
        tokio::pin!(lock);
        tokio::select! {
            biased;
            result = lock.as_mut() => Some(result),
            () = wait.abandon.cancelled() => cancel_until_done(&side, pid, lock.as_mut()).await,
        }
    };
    drop(wait);
    match result {
        Some(Ok(_)) => match delivery.deliver_granted(conn) {
            Ok(()) => {}
            Err(conn) => {
                // Abandoned after the grant: give it back.
                let (conn, outcome) = give_back(conn, key, None, &counter).await;
                delivery.deliver(conn, outcome);
            }
        },
        Some(Err(err)) if is_connection_error(&err) => {
            drop(conn);
            delivery.deliver(
                None,
                Outcome::Failed(PgError::from_query("pg_advisory_lock", err)),
            );
        }
        Some(Err(err)) => {
            // Cancelled (by us or someone else) or failed: a grant may have
            // raced the error, so give the key back if the backend holds it.
            let cancelled = sqlstate_of(&err).map(classify) == Some(Class::QueryCanceled);
            let failure = if delivery.abandoned() && cancelled {
                None
            } else {
                Some(PgError::from_query("pg_advisory_lock", err))
            };
            let (conn, outcome) = give_back(conn, key, failure, &counter).await;
            delivery.deliver(conn, outcome);
        }
        None => {
            warn!(
                pid,
                after = ?GIVE_UP_CANCEL_AFTER,
                "could not cancel a waiting pg_advisory_lock: closing the connection"
            );
            drop(conn);
            delivery.deliver(
                None,
                Outcome::Failed(PgError::WaitAbandoned {
                    reason: "the abandoned wait could not be cancelled in time; the connection \
                             was closed",
                }),
            );
        }
    }
}

/// Cancels the backend's statement from side connections until `lock`
/// ends; answers its result, or `None` after [`GIVE_UP_CANCEL_AFTER`].
///
/// A cancel already sent is always awaited, so no late signal hits a later
/// statement of the session unawares (one that does is retried by
/// [`give_back`]).
async fn cancel_until_done<F, T>(side: &SideConnect, pid: i32, mut lock: Pin<&mut F>) -> Option<T>
where
    F: std::future::Future<Output = T>,
{
    let started = Instant::now();
    while started.elapsed() < GIVE_UP_CANCEL_AFTER {
        let cancel = side.cancel_backend(pid);
        tokio::pin!(cancel);
        let done = tokio::select! {
            biased;
            result = lock.as_mut() => Some(result),
            sent = cancel.as_mut() => {
                match sent {
                    Ok(sent) => debug!(pid, sent, "cancelled a waiting pg_advisory_lock"),
                    Err(err) => warn!(pid, error = %err, "cannot cancel a waiting pg_advisory_lock"),
                }
                None
            }
        };
        if let Some(result) = done {
            let _ = cancel.await;
            return Some(result);
        }
        tokio::select! {
            biased;
            result = lock.as_mut() => return Some(result),
            () = tokio::time::sleep(RECANCEL_AFTER) => {}
        }
    }
    None
}

/// Releases `key` if this backend holds it, retrying if a late cancel hits
/// the statement; drops the connection if that fails. The outcome is
/// `failure` (or `NotGranted`) when the connection survives.
async fn give_back(
    mut conn: PgConnection,
    key: i64,
    failure: Option<PgError>,
    round_trips: &AtomicU64,
) -> (Option<PgConnection>, Outcome) {
    const ATTEMPTS: usize = 3;
    let mut last = None;
    for _ in 0..ATTEMPTS {
        round_trips.fetch_add(1, Ordering::Relaxed);
        match sqlx::query_scalar::<_, bool>(sql::UNLOCK_IF_HELD)
            .bind(key)
            .fetch_one(&mut conn)
            .await
        {
            Ok(released) => {
                if released {
                    debug!(key, "gave back a key granted to an abandoned wait");
                }
                let outcome = failure.map_or(Outcome::NotGranted, Outcome::Failed);
                return (Some(conn), outcome);
            }
            Err(err) => {
                let err = PgError::from_query("give back an abandoned lock", err);
                let retry = err.is_query_canceled();
                last = Some(err);
                if !retry {
                    break;
                }
            }
        }
    }
    // Unsure whether the key is held: ending the session frees it for sure.
    warn!(key, error = ?last, "cannot give back an abandoned lock: closing the connection");
    drop(conn);
    let err = PgError::WaitAbandoned {
        reason: "a key granted to an abandoned wait could not be released; the connection \
                 was closed to free it",
    };
    (None, Outcome::Failed(err))
}
