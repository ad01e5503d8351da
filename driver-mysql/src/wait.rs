//! The blocking wait of [`MySqlSession::acquire`](crate::MySqlSession): a
//! task owns the connection while `GET_LOCK(name, <a year>)` waits, so the
//! wait can be cancelled, or abandoned by a dropped future, without the key
//! ever staying held by accident.
//!
//! # Invariants
//!
//! 1. While a wait runs, the task owns the connection; the session gets it
//!    back only through [`Wait::returned`].
//! 2. Once the wait is *abandoned* (cancel token fired or acquire future
//!    dropped), the task never reports `Granted`: it ends the statement
//!    with `KILL QUERY <connection id>` from a side connection, then
//!    releases the key if the connection holds it (a grant can race the
//!    kill), and only then hands the connection back.
//! 3. A grant delivered just before the acquire future was dropped (nobody
//!    saw it) is given back by a task the drop spawns.
//! 4. If the key cannot be given back, the connection is dropped: the
//!    server ends the session, which frees every lock it held.
//!
//! The state lives under one mutex; no lock is held across an `.await`.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use shardlock_core::CancellationToken;
use sqlx::mysql::MySqlConnection;
use sqlx::{Executor, Row};
use tokio::runtime::Handle;
use tokio::sync::Notify;
use tracing::{debug, warn};

use crate::connection::SideConnect;
use crate::error::{is_connection_error, MySqlError};
use crate::sql;

/// Pause before killing a still-waiting statement again (a kill that
/// reaches the server before the statement started is lost).
const REKILL_AFTER: Duration = Duration::from_millis(200);

/// Give up cancelling after this long and drop the connection instead.
const GIVE_UP_CANCEL_AFTER: Duration = Duration::from_secs(30);

/// How a wait ended.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// The key is held by the session.
    Granted,
    /// The wait was abandoned; the key is not held.
    NotGranted,
    /// The wait failed; the key is not held.
    Failed(MySqlError),
}

/// The connection coming back from a wait.
#[derive(Debug)]
pub(crate) struct Returned {
    /// `None` when the connection was dropped (lost, or to free the key).
    pub(crate) conn: Option<MySqlConnection>,
    pub(crate) outcome: Outcome,
}

#[derive(Debug, Default)]
struct State {
    abandoned: bool,
    returned: Option<Returned>,
}

/// One blocking wait, shared by the waiting task, the acquire future and
/// the session.
#[derive(Debug)]
pub(crate) struct Wait {
    name: String,
    round_trips: Arc<AtomicU64>,
    state: Mutex<State>,
    ready: Notify,
    abandon: CancellationToken,
}

impl Wait {
    /// Starts waiting for the lock `name` on `conn` (connection `id`) in a
    /// task. Gives the connection back when there is no Tokio runtime.
    pub(crate) fn start(
        conn: MySqlConnection,
        name: String,
        id: u64,
        side: Arc<SideConnect>,
        round_trips: Arc<AtomicU64>,
    ) -> Result<Arc<Self>, MySqlConnection> {
        let Ok(handle) = Handle::try_current() else {
            return Err(conn);
        };
        let wait = Arc::new(Self {
            name,
            round_trips,
            state: Mutex::new(State::default()),
            ready: Notify::new(),
            abandon: CancellationToken::new(),
        });
        let delivery = Delivery {
            wait: Some(Arc::clone(&wait)),
        };
        let _task = handle.spawn(run(conn, id, side, delivery));
        Ok(wait)
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // Every update is a single assignment: a panic cannot leave it torn.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits until the connection comes back. Cancel-safe.
    pub(crate) async fn returned(&self) -> Returned {
        loop {
            let notified = self.ready.notified();
            if let Some(returned) = self.state().returned.take() {
                return returned;
            }
            notified.await;
        }
    }

    /// The caller's cancel token fired: abandon the wait. Answers the
    /// result if the task had already delivered it (a grant that won).
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
                debug!(name = %self.name, "acquire dropped right after a grant: giving the key back");
                let delivery = Delivery {
                    wait: Some(Arc::clone(self)),
                };
                let _task = handle.spawn(async move {
                    let wait = delivery.wait.clone();
                    if let Some(wait) = wait {
                        let (conn, outcome) =
                            give_back(unseen, &wait.name, None, &wait.round_trips).await;
                        delivery.deliver(conn, outcome);
                    }
                });
            }
            Err(_) => {
                drop(unseen);
                self.put(Returned {
                    conn: None,
                    outcome: Outcome::Failed(MySqlError::WaitAbandoned {
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
/// dropped first (its runtime shut down), the wait ends as failed and the
/// connection, dropped with the task, closes.
struct Delivery {
    wait: Option<Arc<Wait>>,
}

impl Delivery {
    fn abandoned(&self) -> bool {
        self.wait.as_ref().is_some_and(|w| w.state().abandoned)
    }

    /// Delivers a grant unless the wait was abandoned meanwhile; then the
    /// connection comes back to the caller to give the key back.
    fn deliver_granted(&mut self, conn: MySqlConnection) -> Result<(), MySqlConnection> {
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

    fn deliver(mut self, conn: Option<MySqlConnection>, outcome: Outcome) {
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
                outcome: Outcome::Failed(MySqlError::WaitAbandoned {
                    reason: "the task waiting for the lock was stopped (its runtime shut down); \
                             the connection was closed",
                }),
            });
        }
    }
}

/// The waiting task.
async fn run(mut conn: MySqlConnection, id: u64, side: Arc<SideConnect>, mut delivery: Delivery) {
    let Some(wait) = delivery.wait.clone() else {
        return;
    };
    let counter = Arc::clone(&wait.round_trips);
    let statement = sql::wait(&wait.name);
    loop {
        counter.fetch_add(1, Ordering::Relaxed);
        let result = {
            let lock = conn.fetch_one(sqlx::raw_sql(&statement));
            tokio::pin!(lock);
            tokio::select! {
                biased;
                result = lock.as_mut() => Some(result),
                () = wait.abandon.cancelled() => kill_until_done(&side, id, lock.as_mut()).await,
            }
        };
        let answer = match result {
            Some(result) => result.and_then(|row| row.try_get::<Option<i64>, _>(0)),
            None => {
                warn!(
                    id,
                    after = ?GIVE_UP_CANCEL_AFTER,
                    "could not kill a waiting GET_LOCK: closing the connection"
                );
                drop(conn);
                delivery.deliver(
                    None,
                    Outcome::Failed(MySqlError::WaitAbandoned {
                        reason: "the abandoned wait could not be cancelled in time; the \
                                 connection was closed",
                    }),
                );
                return;
            }
        };
        match answer {
            Ok(Some(1)) => {
                if let Err(conn) = delivery.deliver_granted(conn) {
                    // Abandoned after the grant: give it back.
                    let (conn, outcome) = give_back(conn, &wait.name, None, &counter).await;
                    delivery.deliver(conn, outcome);
                }
                return;
            }
            // The year-long timeout ran out: wait again, unless abandoned.
            Ok(Some(0)) if !delivery.abandoned() => continue,
            Err(err) if is_connection_error(&err) => {
                drop(conn);
                delivery.deliver(
                    None,
                    Outcome::Failed(MySqlError::from_query("GET_LOCK wait", err)),
                );
                return;
            }
            other => {
                // Killed (NULL, or error 1317), timed out after abandon, or
                // failed: a grant may have raced, so give the key back.
                let failure = if delivery.abandoned() {
                    None
                } else {
                    Some(match other {
                        Err(err) => {
                            let err = MySqlError::from_query("GET_LOCK wait", err);
                            if err.is_query_interrupted() {
                                MySqlError::LockWaitKilled {
                                    name: wait.name.clone(),
                                    source: match err {
                                        MySqlError::Query { source, .. } => Some(source),
                                        _ => None,
                                    },
                                }
                            } else {
                                err
                            }
                        }
                        Ok(_) => MySqlError::LockWaitKilled {
                            name: wait.name.clone(),
                            source: None,
                        },
                    })
                };
                let (conn, outcome) = give_back(conn, &wait.name, failure, &counter).await;
                delivery.deliver(conn, outcome);
                return;
            }
        }
    }
}

/// Kills the connection's statement from side connections until `lock`
/// ends; answers its result, or `None` after [`GIVE_UP_CANCEL_AFTER`]. A
/// kill already sent is always awaited, so no late kill lands on a later
/// statement unawares (one that does is retried by [`give_back`]).
async fn kill_until_done<F, T>(side: &SideConnect, id: u64, mut lock: Pin<&mut F>) -> Option<T>
where
    F: Future<Output = T>,
{
    let started = Instant::now();
    while started.elapsed() < GIVE_UP_CANCEL_AFTER {
        let kill = side.kill_query(id);
        tokio::pin!(kill);
        let done = tokio::select! {
            biased;
            result = lock.as_mut() => Some(result),
            sent = kill.as_mut() => {
                match sent {
                    Ok(()) => debug!(id, "killed a waiting GET_LOCK"),
                    Err(err) => warn!(id, error = %err, "cannot kill a waiting GET_LOCK"),
                }
                None
            }
        };
        if let Some(result) = done {
            let _ = kill.await;
            return Some(result);
        }
        tokio::select! {
            biased;
            result = lock.as_mut() => return Some(result),
            () = tokio::time::sleep(REKILL_AFTER) => {}
        }
    }
    None
}

/// Releases `name` if this connection holds it, retrying if a late kill
/// hits the statement; drops the connection if that fails. The outcome is
/// `failure` (or `NotGranted`) when the connection survives.
async fn give_back(
    mut conn: MySqlConnection,
    name: &str,
    failure: Option<MySqlError>,
    round_trips: &AtomicU64,
) -> (Option<MySqlConnection>, Outcome) {
    const ATTEMPTS: usize = 3;
    let statement = sql::give_back(name);
    let mut last = None;
    for _ in 0..ATTEMPTS {
        round_trips.fetch_add(1, Ordering::Relaxed);
        match conn
            .fetch_one(sqlx::raw_sql(&statement))
            .await
            .and_then(|row| row.try_get::<Option<i64>, _>(0))
        {
            Ok(released) => {
                if released == Some(1) {
                    debug!(name, "gave back a key granted to an abandoned wait");
                }
                let outcome = failure.map_or(Outcome::NotGranted, Outcome::Failed);
                return (Some(conn), outcome);
            }
            Err(err) => {
                let err = MySqlError::from_query("give back an abandoned lock", err);
                let retry = err.is_query_interrupted();
                last = Some(err);
                if !retry {
                    break;
                }
            }
        }
    }
    warn!(name, error = ?last, "cannot give back an abandoned lock: closing the connection");
    drop(conn);
    let err = MySqlError::WaitAbandoned {
        reason: "a key granted to an abandoned wait could not be released; the connection was \
                 closed to free it",
    };
    (None, Outcome::Failed(err))
}
