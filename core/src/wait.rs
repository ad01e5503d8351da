//! The cancellable blocking wait behind a server-side driver's
//! [`Session::acquire`](crate::Session::acquire): a task owns the session's
//! connection while a blocking lock statement waits in the server, so the
//! wait can be cancelled, or abandoned by a dropped future, without the key
//! ever staying held by accident.
//!
//! Drivers whose server wakes a waiter on release (Postgres'
//! `pg_advisory_lock`, MySQL's `GET_LOCK`) share this state machine; each
//! implements [`BlockingLock`] with its own SQL: run the blocking statement,
//! cancel it from a side connection, release a grant that raced the cancel.
//!
//! # Invariants
//!
//! 1. While a wait runs, the task owns the connection; the session gets it
//!    back only through [`BlockingWait::returned`] or
//!    [`BlockingWait::finish`].
//! 2. Once the wait is *abandoned* (cancel token fired or the future
//!    dropped), the task never reports [`Outcome::Granted`]: it ends the
//!    statement with [`BlockingLock::cancel`] (again every 200 ms until the
//!    statement ends), then releases the key if the connection holds it (a
//!    grant can race the cancel), and only then hands the connection back.
//! 3. A grant delivered just before the future was dropped (nobody saw it)
//!    is given back by a task the drop spawns.
//! 4. If the key cannot be given back, or the statement cannot be cancelled
//!    within 30 s, the connection is dropped: the server ends the session,
//!    which frees every lock it held.
//!
//! The state lives under one mutex; no lock is held across an `.await`.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::runtime::Handle;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::LockKey;

/// Pause before cancelling a still-waiting statement again (a cancel that
/// reaches the server before the statement started is lost).
const RECANCEL_AFTER: Duration = Duration::from_millis(200);

/// Give up cancelling after this long and drop the connection instead.
const GIVE_UP_CANCEL_AFTER: Duration = Duration::from_secs(30);

/// How often a give-back is tried when a late cancel interrupts it.
const GIVE_BACK_ATTEMPTS: usize = 3;

/// A driver's blocking lock statement for one key, with what it takes to
/// end it from outside: the SQL stays in the driver, the state machine in
/// [`BlockingWait`].
pub trait BlockingLock: Send + Sync + 'static {
    /// The session's connection, lent to the waiting task.
    type Conn: Send + 'static;
    /// The driver's error.
    type Error: std::error::Error + Send + 'static;

    /// The statement's name for logs (`"pg_advisory_lock"`, `"GET_LOCK"`).
    const STATEMENT: &'static str;

    /// The key waited for.
    fn key(&self) -> &LockKey;

    /// Runs the blocking statement once on `conn` and says how it ended.
    /// Dropped unfinished while [`cancel`](Self::cancel) runs: it must
    /// leave `conn` usable for [`give_back`](Self::give_back).
    fn lock<'a>(
        &'a self,
        conn: &'a mut Self::Conn,
    ) -> impl Future<Output = WaitEnd<Self::Error>> + Send + 'a;

    /// Asks the server, from another connection, to end the waiting
    /// statement (`pg_cancel_backend`, `KILL QUERY`).
    fn cancel(&self) -> impl Future<Output = Result<(), Self::Error>> + Send + '_;

    /// Releases the key if `conn` holds it (a grant that raced the cancel);
    /// answers whether it did.
    fn give_back<'a>(
        &'a self,
        conn: &'a mut Self::Conn,
    ) -> impl Future<Output = Result<bool, Self::Error>> + Send + 'a;

    /// Whether `err` (from [`give_back`](Self::give_back)) is a late
    /// cancel that hit the give-back statement, which is then tried again.
    fn is_interrupted(&self, err: &Self::Error) -> bool;

    /// The driver's error for a wait that could not end cleanly and whose
    /// connection was closed (`reason` says why).
    fn abandoned(&self, reason: &'static str) -> Self::Error;
}

/// How one run of [`BlockingLock::lock`] ended.
#[derive(Debug)]
pub enum WaitEnd<E> {
    /// The key is granted to the connection.
    Granted,
    /// The statement's own timeout ran out (MySQL's year-long `GET_LOCK`):
    /// the wait starts again unless abandoned.
    TimedOut,
    /// The statement was cancelled, by this wait or by someone else; the
    /// error is reported only if this wait was not abandoned.
    Interrupted(E),
    /// The connection is gone; it is dropped.
    Lost(E),
    /// Any other failure, reported as is.
    Failed(E),
}

/// How a wait ended.
#[derive(Debug)]
pub enum Outcome<E> {
    /// The key is held by the session.
    Granted,
    /// The wait was abandoned; the key is not held.
    NotGranted,
    /// The wait failed; the key is not held (it was given back, or the
    /// connection was dropped).
    Failed(E),
}

/// The connection coming back from a wait.
#[derive(Debug)]
pub struct Returned<C, E> {
    /// `None` when the connection was dropped (lost, or to free the key).
    pub conn: Option<C>,
    /// How the wait ended.
    pub outcome: Outcome<E>,
}

/// What the waiting task hands back for lock `O`.
pub type ReturnedOf<O> = Returned<<O as BlockingLock>::Conn, <O as BlockingLock>::Error>;

struct State<O: BlockingLock> {
    abandoned: bool,
    returned: Option<ReturnedOf<O>>,
}

/// One blocking wait, shared by the waiting task, the acquire future and
/// the session (which takes the connection back before its next call).
pub struct BlockingWait<O: BlockingLock> {
    lock: O,
    /// The session's round-trip counter (statements on its connection).
    round_trips: Arc<AtomicU64>,
    state: Mutex<State<O>>,
    ready: Notify,
    abandon: CancellationToken,
}

impl<O: BlockingLock> fmt::Debug for BlockingWait<O> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.state();
        f.debug_struct("BlockingWait")
            .field("key", self.lock.key())
            .field("abandoned", &state.abandoned)
            .field("returned", &state.returned.is_some())
            .finish_non_exhaustive()
    }
}

impl<O: BlockingLock> BlockingWait<O> {
    /// Starts `lock`'s wait on `conn` in a task; each statement it sends
    /// counts one in `round_trips`. Gives the connection back when there is
    /// no Tokio runtime to run the task.
    pub fn start(
        conn: O::Conn,
        lock: O,
        round_trips: Arc<AtomicU64>,
    ) -> Result<Arc<Self>, O::Conn> {
        let Ok(handle) = Handle::try_current() else {
            return Err(conn);
        };
        let wait = Arc::new(Self {
            lock,
            round_trips,
            state: Mutex::new(State {
                abandoned: false,
                returned: None,
            }),
            ready: Notify::new(),
            abandon: CancellationToken::new(),
        });
        let delivery = Delivery {
            wait: Some(Arc::clone(&wait)),
        };
        let _task = handle.spawn(run(conn, delivery));
        Ok(wait)
    }

    /// The driver's lock statement (and the key it waits for).
    pub fn lock(&self) -> &O {
        &self.lock
    }

    fn state(&self) -> MutexGuard<'_, State<O>> {
        // Every update is a single assignment: a panic cannot leave it torn.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits until the wait ends or `cancel` fires; then abandons it and
    /// waits for the connection to come back (the key given back if a
    /// grant raced the cancel).
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: dropped, it abandons the wait in the background, and a
    /// grant delivered meanwhile is released at once;
    /// [`returned`](Self::returned) then answers when that is done.
    pub async fn finish(self: &Arc<Self>, cancel: &CancellationToken) -> ReturnedOf<O> {
        let mut guard = AbandonOnDrop(Some(Arc::clone(self)));
        let returned = tokio::select! {
            biased;
            returned = self.returned() => returned,
            () = cancel.cancelled() => match self.abandon() {
                Some(returned) => returned,
                None => self.returned().await,
            },
        };
        guard.0 = None;
        returned
    }

    /// Waits until the connection comes back.
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: the result is taken only in the poll that returns it.
    pub async fn returned(&self) -> ReturnedOf<O> {
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
    fn abandon(&self) -> Option<ReturnedOf<O>> {
        let mut state = self.state();
        state.abandoned = true;
        self.abandon.cancel();
        state.returned.take()
    }

    /// The wait's future was dropped: abandon the wait, and give back a
    /// grant that was delivered but never seen.
    fn abandon_on_drop(self: &Arc<Self>) {
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
                debug!(key = %self.lock.key(), "wait dropped right after a grant: giving the key back");
                let delivery = Delivery {
                    wait: Some(Arc::clone(self)),
                };
                let wait = Arc::clone(self);
                let _task = handle.spawn(async move {
                    let (conn, outcome) = give_back(&wait, unseen, None).await;
                    delivery.deliver(conn, outcome);
                });
            }
            Err(_) => {
                // No runtime to unlock: ending the connection frees the key.
                drop(unseen);
                self.put(Returned {
                    conn: None,
                    outcome: Outcome::Failed(self.lock.abandoned(
                        "the acquire future was dropped outside a Tokio runtime right after a \
                         grant; the connection was closed to free the key",
                    )),
                });
            }
        }
    }

    fn put(&self, returned: ReturnedOf<O>) {
        self.state().returned = Some(returned);
        self.ready.notify_one();
    }
}

/// Abandons a wait when the future waiting for it is dropped before it
/// ended.
struct AbandonOnDrop<O: BlockingLock>(Option<Arc<BlockingWait<O>>>);

impl<O: BlockingLock> Drop for AbandonOnDrop<O> {
    fn drop(&mut self) {
        if let Some(wait) = self.0.take() {
            wait.abandon_on_drop();
        }
    }
}

/// The task's handle to deliver the result exactly once; if the task is
/// dropped first (its runtime shut down), the wait ends as failed, and the
/// connection, dropped with the task, closes.
struct Delivery<O: BlockingLock> {
    wait: Option<Arc<BlockingWait<O>>>,
}

impl<O: BlockingLock> Delivery<O> {
    fn abandoned(&self) -> bool {
        self.wait.as_ref().is_some_and(|w| w.state().abandoned)
    }

    /// Delivers a grant unless the wait was abandoned meanwhile; then the
    /// connection comes back to the caller to give the key back.
    fn deliver_granted(&mut self, conn: O::Conn) -> Result<(), O::Conn> {
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

    fn deliver(mut self, conn: Option<O::Conn>, outcome: Outcome<O::Error>) {
        if let Some(wait) = self.wait.take() {
            wait.put(Returned { conn, outcome });
        }
    }
}

impl<O: BlockingLock> Drop for Delivery<O> {
    fn drop(&mut self) {
        if let Some(wait) = self.wait.take() {
            let err = wait.lock.abandoned(
                "the task waiting for the lock was stopped (its runtime shut down); the \
                 connection was closed",
            );
            wait.put(Returned {
                conn: None,
                outcome: Outcome::Failed(err),
            });
        }
    }
}

/// The waiting task.
async fn run<O: BlockingLock>(mut conn: O::Conn, mut delivery: Delivery<O>) {
    let Some(wait) = delivery.wait.clone() else {
        return;
    };
    let ops = &wait.lock;
    loop {
        wait.round_trips.fetch_add(1, Ordering::Relaxed);
        let end = {
            let lock = ops.lock(&mut conn);
            tokio::pin!(lock);
            tokio::select! {
                biased;
                end = lock.as_mut() => Some(end),
                () = wait.abandon.cancelled() => cancel_until_done(ops, lock.as_mut()).await,
            }
        };
        let failure = match end {
            Some(WaitEnd::Granted) => match delivery.deliver_granted(conn) {
                Ok(()) => return,
                // Abandoned after the grant: give it back.
                Err(back) => {
                    conn = back;
                    None
                }
            },
            Some(WaitEnd::TimedOut) if !delivery.abandoned() => continue,
            Some(WaitEnd::TimedOut) => None,
            Some(WaitEnd::Lost(err)) => {
                drop(conn);
                delivery.deliver(None, Outcome::Failed(err));
                return;
            }
            // Our own cancel is no failure; someone else's is.
            Some(WaitEnd::Interrupted(err)) => (!delivery.abandoned()).then_some(err),
            Some(WaitEnd::Failed(err)) => Some(err),
            None => {
                warn!(
                    key = %ops.key(),
                    statement = O::STATEMENT,
                    after = ?GIVE_UP_CANCEL_AFTER,
                    "could not cancel a waiting lock statement: closing the connection"
                );
                drop(conn);
                let err = ops.abandoned(
                    "the abandoned wait could not be cancelled in time; the connection was closed",
                );
                delivery.deliver(None, Outcome::Failed(err));
                return;
            }
        };
        // Cancelled, timed out after abandon, or failed: a grant may have
        // raced the end, so give the key back if the connection holds it.
        let (conn, outcome) = give_back(&wait, conn, failure).await;
        delivery.deliver(conn, outcome);
        return;
    }
}

/// Cancels the connection's statement from outside until `lock` ends;
/// answers its result, or `None` after [`GIVE_UP_CANCEL_AFTER`].
///
/// A cancel already sent is always awaited, so no late cancel lands on a
/// later statement of the session unawares (one that does is retried by
/// [`give_back`]).
async fn cancel_until_done<O, F, T>(ops: &O, mut lock: Pin<&mut F>) -> Option<T>
where
    O: BlockingLock,
    F: Future<Output = T>,
{
    let started = Instant::now();
    while started.elapsed() < GIVE_UP_CANCEL_AFTER {
        let cancel = ops.cancel();
        tokio::pin!(cancel);
        let done = tokio::select! {
            biased;
            result = lock.as_mut() => Some(result),
            sent = cancel.as_mut() => {
                match sent {
                    Ok(()) => debug!(key = %ops.key(), statement = O::STATEMENT, "cancelled a waiting lock statement"),
                    Err(err) => warn!(key = %ops.key(), statement = O::STATEMENT, error = %err, "cannot cancel a waiting lock statement"),
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

/// Releases the key if the connection holds it, retrying if a late cancel
/// hits the statement; drops the connection if that fails. The outcome is
/// `failure` (or `NotGranted`) when the connection survives.
async fn give_back<O: BlockingLock>(
    wait: &BlockingWait<O>,
    mut conn: O::Conn,
    failure: Option<O::Error>,
) -> (Option<O::Conn>, Outcome<O::Error>) {
    let ops = &wait.lock;
    let mut last = None;
    for _ in 0..GIVE_BACK_ATTEMPTS {
        wait.round_trips.fetch_add(1, Ordering::Relaxed);
        match ops.give_back(&mut conn).await {
            Ok(released) => {
                if released {
                    debug!(key = %ops.key(), "gave back a key granted to an abandoned wait");
                }
                let outcome = failure.map_or(Outcome::NotGranted, Outcome::Failed);
                return (Some(conn), outcome);
            }
            Err(err) => {
                let retry = ops.is_interrupted(&err);
                last = Some(err);
                if !retry {
                    break;
                }
            }
        }
    }
    // Unsure whether the key is held: ending the session frees it for sure.
    warn!(key = %ops.key(), error = ?last, "cannot give back an abandoned lock: closing the connection");
    drop(conn);
    let err = ops.abandoned(
        "a key granted to an abandoned wait could not be released; the connection was closed \
         to free it",
    );
    (None, Outcome::Failed(err))
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::atomic::AtomicBool;

    use super::*;

    #[derive(Debug, Clone, PartialEq, thiserror::Error)]
    enum FakeError {
        #[error("statement cancelled")]
        Cancelled,
        #[error("connection lost")]
        Lost,
        #[error("server failure")]
        Broken,
        #[error("abandoned: {0}")]
        Abandoned(&'static str),
    }

    /// A connection the fake server can tell apart.
    #[derive(Debug, PartialEq)]
    struct Conn(u32);

    /// What a cancel does to the waiting statement.
    type CancelEffect = fn() -> WaitEnd<FakeError>;

    /// A scripted server: the blocking statement ends when the test (or a
    /// cancel) says how; a grant marks the key held until given back.
    #[derive(Default)]
    struct Server {
        next_end: Mutex<Option<WaitEnd<FakeError>>>,
        wake: Notify,
        /// What a cancel does to the waiting statement (`None`: nothing).
        on_cancel: Mutex<Option<CancelEffect>>,
        /// Answers of the give-back statement, in order (then `Ok`).
        give_back_script: Mutex<VecDeque<FakeError>>,
        held: AtomicBool,
        locks: AtomicU64,
        cancels: AtomicU64,
        give_backs: AtomicU64,
    }

    impl Server {
        fn end(&self, end: WaitEnd<FakeError>) {
            *self.next_end.lock().unwrap() = Some(end);
            self.wake.notify_one();
        }
    }

    struct Fake {
        key: LockKey,
        server: Arc<Server>,
    }

    impl BlockingLock for Fake {
        type Conn = Conn;
        type Error = FakeError;
        const STATEMENT: &'static str = "FAKE_LOCK";

        fn key(&self) -> &LockKey {
            &self.key
        }

        async fn lock(&self, _conn: &mut Conn) -> WaitEnd<FakeError> {
            self.server.locks.fetch_add(1, Ordering::SeqCst);
            loop {
                let woken = self.server.wake.notified();
                if let Some(end) = self.server.next_end.lock().unwrap().take() {
                    if matches!(end, WaitEnd::Granted) {
                        self.server.held.store(true, Ordering::SeqCst);
                    }
                    return end;
                }
                woken.await;
            }
        }

        async fn cancel(&self) -> Result<(), FakeError> {
            self.server.cancels.fetch_add(1, Ordering::SeqCst);
            let effect = *self.server.on_cancel.lock().unwrap();
            if let Some(effect) = effect {
                self.server.end(effect());
            }
            Ok(())
        }

        async fn give_back(&self, _conn: &mut Conn) -> Result<bool, FakeError> {
            self.server.give_backs.fetch_add(1, Ordering::SeqCst);
            if let Some(err) = self.server.give_back_script.lock().unwrap().pop_front() {
                return Err(err);
            }
            Ok(self.server.held.swap(false, Ordering::SeqCst))
        }

        fn is_interrupted(&self, err: &FakeError) -> bool {
            *err == FakeError::Cancelled
        }

        fn abandoned(&self, reason: &'static str) -> FakeError {
            FakeError::Abandoned(reason)
        }
    }

    fn start(server: &Arc<Server>) -> (Arc<BlockingWait<Fake>>, Arc<AtomicU64>) {
        let round_trips = Arc::new(AtomicU64::new(0));
        let fake = Fake {
            key: LockKey::new("db:public:fake").unwrap(),
            server: Arc::clone(server),
        };
        let wait = BlockingWait::start(Conn(7), fake, Arc::clone(&round_trips))
            .unwrap_or_else(|_| panic!("a runtime is running"));
        (wait, round_trips)
    }

    fn interrupted() -> WaitEnd<FakeError> {
        WaitEnd::Interrupted(FakeError::Cancelled)
    }

    fn granted() -> WaitEnd<FakeError> {
        WaitEnd::Granted
    }

    #[tokio::test]
    async fn a_grant_comes_back_with_the_connection() {
        let server = Arc::new(Server::default());
        let (wait, round_trips) = start(&server);
        server.end(WaitEnd::Granted);
        let returned = wait.finish(&CancellationToken::new()).await;
        assert_eq!(returned.conn, Some(Conn(7)));
        assert!(matches!(returned.outcome, Outcome::Granted), "{returned:?}");
        assert!(server.held.load(Ordering::SeqCst));
        assert_eq!(round_trips.load(Ordering::SeqCst), 1);
        assert_eq!(server.cancels.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn a_timeout_starts_the_statement_again() {
        let server = Arc::new(Server::default());
        let (wait, round_trips) = start(&server);
        server.end(WaitEnd::TimedOut);
        while server.locks.load(Ordering::SeqCst) < 2 {
            tokio::task::yield_now().await;
        }
        server.end(WaitEnd::Granted);
        let returned = wait.finish(&CancellationToken::new()).await;
        assert!(matches!(returned.outcome, Outcome::Granted), "{returned:?}");
        assert_eq!(round_trips.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_cancelled_wait_is_not_granted_and_keeps_the_connection() {
        let server = Arc::new(Server::default());
        *server.on_cancel.lock().unwrap() = Some(interrupted);
        let (wait, round_trips) = start(&server);
        let cancel = CancellationToken::new();
        cancel.cancel();
        let returned = wait.finish(&cancel).await;
        assert_eq!(returned.conn, Some(Conn(7)));
        assert!(
            matches!(returned.outcome, Outcome::NotGranted),
            "{returned:?}"
        );
        assert_eq!(server.cancels.load(Ordering::SeqCst), 1);
        // The statement, then the give-back in case a grant raced.
        assert_eq!(server.give_backs.load(Ordering::SeqCst), 1);
        assert_eq!(round_trips.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_grant_racing_the_cancel_is_given_back() {
        let server = Arc::new(Server::default());
        *server.on_cancel.lock().unwrap() = Some(granted);
        let (wait, _) = start(&server);
        let cancel = CancellationToken::new();
        cancel.cancel();
        let returned = wait.finish(&cancel).await;
        assert!(
            matches!(returned.outcome, Outcome::NotGranted),
            "{returned:?}"
        );
        assert_eq!(returned.conn, Some(Conn(7)));
        assert!(
            !server.held.load(Ordering::SeqCst),
            "the raced grant is released"
        );
    }

    #[tokio::test]
    async fn someone_elses_cancel_is_a_failure() {
        let server = Arc::new(Server::default());
        let (wait, _) = start(&server);
        server.end(WaitEnd::Interrupted(FakeError::Cancelled));
        let returned = wait.finish(&CancellationToken::new()).await;
        assert_eq!(returned.conn, Some(Conn(7)));
        assert!(
            matches!(returned.outcome, Outcome::Failed(FakeError::Cancelled)),
            "{returned:?}"
        );
        assert_eq!(server.give_backs.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_lost_connection_is_dropped() {
        let server = Arc::new(Server::default());
        let (wait, _) = start(&server);
        server.end(WaitEnd::Lost(FakeError::Lost));
        let returned = wait.finish(&CancellationToken::new()).await;
        assert_eq!(returned.conn, None);
        assert!(
            matches!(returned.outcome, Outcome::Failed(FakeError::Lost)),
            "{returned:?}"
        );
        assert_eq!(server.give_backs.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn a_give_back_hit_by_a_late_cancel_is_retried() {
        let server = Arc::new(Server::default());
        *server.on_cancel.lock().unwrap() = Some(granted);
        server
            .give_back_script
            .lock()
            .unwrap()
            .push_back(FakeError::Cancelled);
        let (wait, round_trips) = start(&server);
        let cancel = CancellationToken::new();
        cancel.cancel();
        let returned = wait.finish(&cancel).await;
        assert!(
            matches!(returned.outcome, Outcome::NotGranted),
            "{returned:?}"
        );
        assert_eq!(returned.conn, Some(Conn(7)));
        assert_eq!(server.give_backs.load(Ordering::SeqCst), 2);
        assert_eq!(round_trips.load(Ordering::SeqCst), 3);
        assert!(!server.held.load(Ordering::SeqCst));
    }

    #[tokio::test]
    async fn a_failed_give_back_closes_the_connection() {
        let server = Arc::new(Server::default());
        *server.on_cancel.lock().unwrap() = Some(granted);
        server
            .give_back_script
            .lock()
            .unwrap()
            .push_back(FakeError::Broken);
        let (wait, _) = start(&server);
        let cancel = CancellationToken::new();
        cancel.cancel();
        let returned = wait.finish(&cancel).await;
        assert_eq!(returned.conn, None, "closing the connection frees the key");
        assert!(
            matches!(returned.outcome, Outcome::Failed(FakeError::Abandoned(_))),
            "{returned:?}"
        );
        assert_eq!(server.give_backs.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_statement_that_ignores_cancels_loses_its_connection() {
        let server = Arc::new(Server::default());
        let (wait, _) = start(&server);
        let cancel = CancellationToken::new();
        cancel.cancel();
        let returned = wait.finish(&cancel).await;
        assert_eq!(returned.conn, None);
        assert!(
            matches!(returned.outcome, Outcome::Failed(FakeError::Abandoned(_))),
            "{returned:?}"
        );
        // Cancelled again and again until it gave up.
        assert!(server.cancels.load(Ordering::SeqCst) > 1);
    }

    #[tokio::test]
    async fn a_grant_nobody_saw_is_given_back_when_the_future_is_dropped() {
        let server = Arc::new(Server::default());
        let (wait, _) = start(&server);
        let cancel = CancellationToken::new();
        {
            let finishing = wait.finish(&cancel);
            tokio::pin!(finishing);
            // Polled once (still waiting), then the grant is delivered
            // while nobody polls, then the future is dropped.
            assert!(futures_poll_once(finishing.as_mut()).await.is_none());
            server.end(WaitEnd::Granted);
            while wait.state().returned.is_none() {
                tokio::task::yield_now().await;
            }
        }
        let returned = wait.returned().await;
        assert!(
            matches!(returned.outcome, Outcome::NotGranted),
            "{returned:?}"
        );
        assert_eq!(returned.conn, Some(Conn(7)));
        assert!(
            !server.held.load(Ordering::SeqCst),
            "the unseen grant is released"
        );
    }

    #[tokio::test]
    async fn a_dropped_wait_is_cancelled_in_the_background() {
        let server = Arc::new(Server::default());
        *server.on_cancel.lock().unwrap() = Some(interrupted);
        let (wait, _) = start(&server);
        {
            let cancel = CancellationToken::new();
            let finishing = wait.finish(&cancel);
            tokio::pin!(finishing);
            assert!(futures_poll_once(finishing.as_mut()).await.is_none());
        }
        let returned = wait.returned().await;
        assert!(
            matches!(returned.outcome, Outcome::NotGranted),
            "{returned:?}"
        );
        assert_eq!(returned.conn, Some(Conn(7)));
        assert_eq!(server.cancels.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn without_a_runtime_the_connection_comes_back() {
        let fake = Fake {
            key: LockKey::new("db:public:fake").unwrap(),
            server: Arc::new(Server::default()),
        };
        let started = BlockingWait::start(Conn(3), fake, Arc::new(AtomicU64::new(0)));
        assert_eq!(started.err(), Some(Conn(3)));
    }

    #[test]
    fn a_runtime_shut_down_mid_wait_fails_the_wait() {
        let server = Arc::new(Server::default());
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let wait = runtime.block_on(async {
            let (wait, _) = start(&server);
            while server.locks.load(Ordering::SeqCst) == 0 {
                tokio::task::yield_now().await;
            }
            wait
        });
        drop(runtime);
        let returned = wait
            .state()
            .returned
            .take()
            .expect("the stopped task delivered a failure");
        assert_eq!(returned.conn, None);
        assert!(
            matches!(returned.outcome, Outcome::Failed(FakeError::Abandoned(_))),
            "{returned:?}"
        );
    }

    /// Polls `future` once; `None` if it is still pending.
    async fn futures_poll_once<F: Future + Unpin>(mut future: F) -> Option<F::Output> {
        std::future::poll_fn(|cx| match Pin::new(&mut future).poll(cx) {
            std::task::Poll::Ready(out) => std::task::Poll::Ready(Some(out)),
            std::task::Poll::Pending => std::task::Poll::Ready(None),
        })
        .await
    }
}
