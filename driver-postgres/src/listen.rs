//! Release hints: a third connection per session that `LISTEN`s on
//! [`RELEASE_CHANNEL`] and records the releases other sessions of the
//! database announce in the session's [`ReleaseHints`].
//!
//! A session that releases with
//! [`release_announced`](shardlock_core::Session::release_announced) sends
//! `pg_notify` in the unlocking statement (see [`RELEASE_ANNOUNCED`](crate::sql::RELEASE_ANNOUNCED));
//! PostgreSQL delivers the notification when that statement commits, so a
//! listener that hears it finds the keys free already.
//!
//! # Why a connection of its own
//!
//! PostgreSQL delivers notifications to a backend only while it is idle
//! (between statements), and sqlx reads a connection's socket only during a
//! statement or while a [`PgListener`] waits on it. The session's main
//! connection is busy with its own round trips and idle-unread in between;
//! the watcher connection (see `watch.rs`) never goes idle: it sits inside
//! `pg_advisory_lock` for the session's whole life, so a notification sent
//! to it would wait in the server forever. Hence one more connection per
//! session (`application_name` `shardlock:<node>:hints`), opened in the
//! background after `connect` returned: three per database in all.
//!
//! # Invariants
//!
//! 1. Hints are only hints: nothing this module does fires the session's
//!    loss signal or fails a call of the session. A hints connection that
//!    cannot be opened or breaks is retried with backoff (logged at `warn`
//!    once per outage, `debug` after); meanwhile the coordinator's polling
//!    finds released keys as before.
//! 2. A session never hears itself: notifications whose sending backend is
//!    the session's own main backend are dropped.
//! 3. Notifications sent while the listener was not listening are lost
//!    (between `connect` returning and the first `LISTEN`, and while it
//!    reconnects), so every subscription, the first included, counts as one
//!    wake-up with no clean marks: at worst a needless try, never a missed
//!    one. The wake-up is recorded before [`Listener::pid`] shows the new
//!    backend.
//! 4. The task stops when the session is closed or dropped (dropping the
//!    session's [`Listener`] cancels its token, as for the watcher), and
//!    closes its connection.

use std::fmt;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use shardlock_core::{CancellationToken, DatabaseId, ReleaseHints};
use sqlx::pool::PoolOptions;
use sqlx::postgres::{PgConnectOptions, PgListener, PgNotification};
use sqlx::{Executor, Pool, Postgres};
use tokio::runtime::Handle;
use tracing::{debug, info, warn};

use crate::error::PgCause;
use crate::sql::RELEASE_CHANNEL;

/// First wait before re-opening a failed hints connection.
const BACKOFF_MIN: Duration = Duration::from_millis(200);
/// Longest wait between attempts.
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// How long closing the hints connection may take once stopped.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// The running hints listener of one session. Dropping it stops it.
pub(crate) struct Listener {
    stop: CancellationToken,
    pid: Arc<AtomicI32>,
}

/// What the listener needs.
pub(crate) struct Listen {
    /// Connect options of the hints connection: the session's, with
    /// `application_name` `shardlock:<node>:hints`.
    pub(crate) options: PgConnectOptions,
    /// The session settings statement (keepalives, timeouts) every hints
    /// connection runs first, as the session's connections do.
    pub(crate) setup: String,
    /// Limit for opening the hints connection.
    pub(crate) connect_timeout: Duration,
    /// The session's main backend, whose own notifications are dropped.
    pub(crate) main_pid: i32,
    /// Where announcements are recorded.
    pub(crate) hints: ReleaseHints,
    pub(crate) database: DatabaseId,
}

impl Listener {
    /// Starts the listening task on `handle`; it connects in the
    /// background.
    pub(crate) fn start(handle: &Handle, listen: Listen) -> Self {
        let stop = CancellationToken::new();
        let pid = Arc::new(AtomicI32::new(0));
        let _task = handle.spawn(run(listen, stop.clone(), Arc::clone(&pid)));
        Self { stop, pid }
    }

    /// Stops listening (also done on drop). Never blocks.
    pub(crate) fn stop(&self) {
        self.stop.cancel();
    }

    /// The backend pid of the hints connection while it listens.
    pub(crate) fn pid(&self) -> Option<i32> {
        match self.pid.load(Ordering::Acquire) {
            0 => None,
            pid => Some(pid),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.stop();
    }
}

impl fmt::Debug for Listener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Listener")
            .field("pid", &self.pid())
            .field("stopped", &self.stop.is_cancelled())
            .finish()
    }
}

/// Why a subscription ended.
enum Ended {
    Stopped,
    Failed(String),
}

/// The task: subscribe, receive until the connection fails, back off,
/// subscribe again; until `stop`.
async fn run(listen: Listen, stop: CancellationToken, pid: Arc<AtomicI32>) {
    let setup: Arc<str> = Arc::from(listen.setup.as_str());
    let pool: Pool<Postgres> = PoolOptions::<Postgres>::new()
        .max_connections(1)
        .min_connections(0)
        .max_lifetime(None)
        .idle_timeout(None)
        .acquire_timeout(listen.connect_timeout)
        .after_connect(move |conn, _meta| {
            let setup = Arc::clone(&setup);
            Box::pin(async move { conn.execute(&*setup).await.map(|_| ()) })
        })
        .connect_lazy_with(listen.options.clone());
    let database = &listen.database;
    let mut backoff = BACKOFF_MIN;
    let mut failing = false;
    loop {
        let subscribed = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            subscribed = subscribe(&pool) => subscribed,
        };
        let ended = match subscribed {
            Ok((mut listener, hints_pid)) => {
                // Releases announced while not listening were missed.
                listen.hints.announce(std::iter::empty());
                pid.store(hints_pid, Ordering::Release);
                if failing {
                    info!(%database, hints_pid, "release hints connection restored");
                } else {
                    debug!(%database, hints_pid, main_pid = listen.main_pid, "listening for release hints");
                }
                failing = false;
                backoff = BACKOFF_MIN;
                let ended = receive(&mut listener, &listen, &stop, &pid).await;
                pid.store(0, Ordering::Release);
                drop(listener);
                ended
            }
            Err(err) => Ended::Failed(format!("cannot listen: {}", PgCause::from(err))),
        };
        let Ended::Failed(why) = ended else { break };
        if failing {
            debug!(%database, error = %why, retry_in = ?backoff, "release hints connection still failing");
        } else {
            warn!(%database, error = %why, retry_in = ?backoff,
                "release hints connection failed; polling covers releases until it is back");
            failing = true;
        }
        tokio::select! {
            biased;
            () = stop.cancelled() => break,
            () = tokio::time::sleep(jittered(backoff)) => {}
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
    pid.store(0, Ordering::Release);
    // The listener was dropped (its connection goes back to the pool after
    // `UNLISTEN *`); close the pool, and with it the connection.
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, pool.close()).await;
    debug!(database = %listen.database, "release hints listener stopped");
}

/// Opens (or takes back) the hints connection, `LISTEN`s, and answers the
/// listener with its backend pid.
async fn subscribe(pool: &Pool<Postgres>) -> Result<(PgListener, i32), sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen(RELEASE_CHANNEL).await?;
    let pid = backend_pid(&mut listener).await?;
    Ok((listener, pid))
}

/// The backend pid of the listener's current connection.
async fn backend_pid(listener: &mut PgListener) -> Result<i32, sqlx::Error> {
    sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(listener)
        .await
}

/// Records every notification of other sessions until `stop` or the
/// connection fails for good (`pid` follows sqlx's own reconnects).
async fn receive(
    listener: &mut PgListener,
    listen: &Listen,
    stop: &CancellationToken,
    pid: &AtomicI32,
) -> Ended {
    loop {
        let next = tokio::select! {
            biased;
            () = stop.cancelled() => return Ended::Stopped,
            next = listener.try_recv() => next,
        };
        match next {
            Ok(Some(notification)) => record(&notification, listen),
            // sqlx saw the connection end and opened another, listening
            // again (it answers `Err` when it cannot): note the new backend,
            // and count the gap as a wake-up.
            Ok(None) => {
                pid.store(0, Ordering::Release);
                let current = tokio::select! {
                    biased;
                    () = stop.cancelled() => return Ended::Stopped,
                    current = backend_pid(listener) => current,
                };
                match current {
                    Ok(hints_pid) => {
                        listen.hints.announce(std::iter::empty());
                        pid.store(hints_pid, Ordering::Release);
                        info!(database = %listen.database, hints_pid,
                            "release hints connection ended and was reopened");
                    }
                    Err(err) => return Ended::Failed(PgCause::from(err).to_string()),
                }
            }
            Err(err) => return Ended::Failed(PgCause::from(err).to_string()),
        }
    }
}

/// Records one notification in the session's hints, unless the session's
/// own backend sent it.
fn record(notification: &PgNotification, listen: &Listen) {
    let sender = i64::from(notification.process_id());
    if sender == i64::from(listen.main_pid) {
        return;
    }
    match parse_payload(notification.payload()) {
        Ok(clean) => {
            debug!(database = %listen.database, sender, clean = clean.len(), "release announced");
            listen.hints.announce(clean);
        }
        Err(bad) => {
            debug!(database = %listen.database, sender, token = bad, channel = notification.channel(),
                "malformed release hint payload: counted as a wake-up without clean marks");
            listen.hints.announce(std::iter::empty());
        }
    }
}

/// The clean ids of a payload (see [`RELEASE_CHANNEL`]): comma-separated
/// decimal key ids, `c`-prefixed when clean. An empty payload is a bare
/// wake-up. A payload with any token that does not parse yields its first
/// bad token, and no clean mark is trusted.
pub(crate) fn parse_payload(payload: &str) -> Result<Vec<i64>, &str> {
    let mut clean = Vec::new();
    if payload.is_empty() {
        return Ok(clean);
    }
    for token in payload.split(',') {
        let (is_clean, digits) = match token.strip_prefix('c') {
            Some(rest) => (true, rest),
            None => (false, token),
        };
        let id: i64 = digits.parse().map_err(|_| token)?;
        if is_clean {
            clean.push(id);
        }
    }
    Ok(clean)
}

/// The payloads `RELEASE_ANNOUNCED` builds for released `(id, clean)`
/// pairs: the Rust mirror, for tests.
#[cfg(test)]
pub(crate) fn payloads(released: &[(i64, bool)]) -> Vec<String> {
    released
        .chunks(crate::sql::KEYS_PER_NOTIFICATION)
        .map(|chunk| {
            chunk
                .iter()
                .map(|(id, clean)| format!("{}{id}", if *clean { "c" } else { "" }))
                .collect::<Vec<_>>()
                .join(",")
        })
        .collect()
}

/// `base` plus up to a quarter, so nodes that lost the server together do
/// not reconnect in step.
fn jittered(base: Duration) -> Duration {
    let spread = crate::watch::random_u64("hints") % 1000;
    base + base.mul_f64(spread as f64 / 4000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_round_trip_and_stay_under_the_limit() {
        let released: Vec<(i64, bool)> = (0..1000_i64)
            .map(|i| (i64::MIN + i * 7_919, i % 3 == 0))
            .chain([(i64::MAX, true), (-1, false), (0, true)])
            .collect();
        let payloads = payloads(&released);
        assert_eq!(
            payloads.len(),
            released.len().div_ceil(crate::sql::KEYS_PER_NOTIFICATION)
        );
        let mut clean = Vec::new();
        for payload in &payloads {
            assert!(payload.len() < 8000, "{} bytes", payload.len());
            clean.extend(parse_payload(payload).expect("well-formed"));
        }
        let expected: Vec<i64> = released
            .iter()
            .filter(|(_, c)| *c)
            .map(|(id, _)| *id)
            .collect();
        assert_eq!(clean, expected);
    }

    #[test]
    fn malformed_payloads_mark_nothing() {
        assert_eq!(parse_payload(""), Ok(vec![]), "a bare NOTIFY wakes");
        assert_eq!(parse_payload("c1,2,c-3"), Ok(vec![1, -3]));
        assert_eq!(parse_payload("c1,hello"), Err("hello"));
        assert_eq!(parse_payload("c1,,c2"), Err(""));
        assert_eq!(parse_payload("cc1"), Err("cc1"));
        assert_eq!(
            parse_payload("c99999999999999999999"),
            Err("c99999999999999999999")
        );
        assert_eq!(parse_payload(" 1"), Err(" 1"));
    }

    #[test]
    fn backoff_jitter_stays_within_a_quarter() {
        for _ in 0..100 {
            let d = jittered(Duration::from_secs(1));
            assert!(
                d >= Duration::from_secs(1) && d <= Duration::from_millis(1250),
                "{d:?}"
            );
        }
    }
}
