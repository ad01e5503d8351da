//! The session's one connection between calls: read while idle, so the
//! session sees the server end it, and hears release hints, without a
//! second connection.
//!
//! sqlx reads a connection's socket only while a statement runs on it or a
//! [`PgListener`] waits on it, so an idle connection can neither see the
//! server close it nor receive a `NOTIFY`. The session's connection is
//! therefore a [`PgListener`] (`LISTEN`ing on
//! [`RELEASE_CHANNEL`](crate::RELEASE_CHANNEL)): after each call the session
//! parks it here ([`Idle::park`]); once it has stayed parked for
//! [`LINGER`], a reader task takes it and waits in
//! [`PgListener::try_recv`]. A notification is a release hint. The end of
//! the connection (the server ended the backend: `pg_terminate_backend`, a
//! restart, a crash, an idle timeout, keepalives that found the client
//! gone) fires the session's loss signal at once: no polling, and no
//! second connection waiting on a lock in the server. The next call takes the
//! connection back ([`Idle::unpark`]): straight from the slot while it
//! lingers (back-to-back calls cost nothing), or from the reader, one task
//! hop away.
//!
//! # Invariants
//!
//! 1. One owner at a time: the slot (parked), the reader (reading) or the
//!    session (in a call). The reader never keeps the connection from the
//!    session: asked for it ([`Idle::unpark`]) or stopped, it puts it back
//!    in the slot. `try_recv` is cancel-safe (sqlx 0.8.1 and later), so
//!    interrupting the wait loses no message.
//! 2. The reader fires the loss signal only when the connection ended or
//!    failed, never when stopped ([`Idle::stop`], also on drop); a reader
//!    task dropped unstopped (its runtime shut down) fires it too (core's
//!    [`WatchGuard`]), since nobody reads any more.
//! 3. The connection never reconnects behind the session: its pool is
//!    closed as soon as the connection is open, and the listener's eager
//!    reconnect is off, so sqlx cannot replace a lost backend (whose locks
//!    are gone) with a fresh one. After a loss the slot stays empty and
//!    [`Idle::unpark`] answers `None`.
//! 4. Hints are only hints: notifications sent by the session's own backend
//!    are dropped; those received during a call (sqlx buffers them) are
//!    recorded when the connection is parked.
//! 5. While a call runs, or the connection is lent to a blocking wait, or a
//!    fenced transaction holds it, nothing reads it between statements; the
//!    statements themselves see a server that ended the session.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use shardlock_core::{CancellationToken, DatabaseId, ReleaseHints, SessionSignals, WatchGuard};
use sqlx::postgres::{PgListener, PgNotification};
use tokio::runtime::Handle;
use tokio::sync::Notify;
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::error::PgCause;

/// How long a parked connection stays in the slot before the reader takes
/// it: calls closer together than this (a batch and its release, a cycle's
/// verify and acquire) take it back without waking the reader; the end of a
/// session is seen at most this much later than while reading.
pub(crate) const LINGER: Duration = Duration::from_millis(2);

/// The session's side: parks and takes back the connection. Dropping it
/// stops the reader.
pub(crate) struct Idle {
    shared: Arc<Shared>,
    stop: CancellationToken,
}

/// Where release hints go, and whose notifications to drop.
pub(crate) struct Heard {
    /// The session's release hints.
    pub(crate) hints: ReleaseHints,
    /// The session's own backend.
    pub(crate) main_pid: i32,
    /// For logs.
    pub(crate) database: DatabaseId,
}

struct Shared {
    slot: Mutex<Slot>,
    /// Session to reader: a connection was parked.
    parked: Notify,
    /// Session to reader: give the connection back now.
    wanted: Notify,
    /// Reader to session: the connection is back in the slot, or gone.
    returned: Notify,
    heard: Heard,
}

#[derive(Default)]
struct Slot {
    conn: Option<PgListener>,
    /// The reader holds the connection.
    reading: bool,
    /// When the connection was parked (or handed back by the reader);
    /// `None` while the session has it.
    parked_at: Option<Instant>,
    /// The reader waits for the next park: only then does a park wake it
    /// (a park while it sleeps out a linger costs no wake-up).
    reader_waiting: bool,
}

impl Shared {
    fn slot(&self) -> MutexGuard<'_, Slot> {
        self.slot.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Idle {
    /// Starts the reader of the session whose signals are `signals`, on
    /// `handle`; nothing is parked yet.
    pub(crate) fn start(handle: &Handle, heard: Heard, signals: SessionSignals) -> Self {
        let main_pid = heard.main_pid;
        let shared = Arc::new(Shared {
            slot: Mutex::new(Slot::default()),
            parked: Notify::new(),
            wanted: Notify::new(),
            returned: Notify::new(),
            heard,
        });
        let stop = CancellationToken::new();
        let armed = WatchGuard::new(
            signals,
            stop.clone(),
            format!(
                "the task reading backend {main_pid}'s connection while idle stopped (its \
                 runtime shut down), so the end of the session can no longer be seen"
            ),
        );
        let _task = handle.spawn(read_while_idle(Arc::clone(&shared), stop.clone(), armed));
        Self { shared, stop }
    }

    /// Parks the connection after a call; hints it buffered meanwhile are
    /// recorded now.
    pub(crate) fn park(&self, mut conn: PgListener) {
        while let Some(notification) = conn.next_buffered() {
            self.shared.heard.record(&notification);
        }
        let wake = {
            let mut slot = self.shared.slot();
            slot.conn = Some(conn);
            slot.parked_at = Some(Instant::now());
            std::mem::take(&mut slot.reader_waiting)
        };
        if wake {
            self.shared.parked.notify_one();
        }
    }

    /// Takes the connection back for a call: at once while it is parked,
    /// else from the reader. `None` once it is gone: the reader saw it end
    /// (the loss signal says why), or was stopped after a loss.
    ///
    /// Cancel-safe: dropped while waiting, the connection stays in the slot.
    pub(crate) async fn unpark(&self) -> Option<PgListener> {
        loop {
            // Parked (the common case): one lock, nothing registered.
            if let Some(taken) = self.take_now() {
                return taken;
            }
            let returned = self.shared.returned.notified();
            tokio::pin!(returned);
            returned.as_mut().enable();
            // Looked again now that a hand-back cannot be missed.
            if let Some(taken) = self.take_now() {
                return taken;
            }
            self.shared.wanted.notify_one();
            returned.await;
        }
    }

    /// The connection if it is parked (`Some(Some)`), or `Some(None)` if it
    /// is gone; `None` while the reader holds it.
    fn take_now(&self) -> Option<Option<PgListener>> {
        let mut slot = self.shared.slot();
        if let Some(conn) = slot.conn.take() {
            slot.parked_at = None;
            return Some(Some(conn));
        }
        (!slot.reading).then_some(None)
    }

    /// The connection if it is parked, without waiting (for drop).
    pub(crate) fn take_parked(&self) -> Option<PgListener> {
        self.shared.slot().conn.take()
    }

    /// Stops the reader without firing the loss signal; a connection it
    /// reads goes back to the slot. Never blocks.
    pub(crate) fn stop(&self) {
        self.stop.cancel();
    }

    /// Whether the reader holds the connection right now (for `Debug`).
    fn reading(&self) -> bool {
        self.shared.slot().reading
    }
}

impl Drop for Idle {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl std::fmt::Debug for Idle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Idle")
            .field("reading", &self.reading())
            .field("stopped", &self.stop.is_cancelled())
            .finish()
    }
}

impl Heard {
    /// Records one notification in the session's hints, unless the
    /// session's own backend sent it.
    fn record(&self, notification: &PgNotification) {
        let sender = i64::from(notification.process_id());
        if sender == i64::from(self.main_pid) {
            return;
        }
        match parse_payload(notification.payload()) {
            Ok(clean) => {
                debug!(database = %self.database, sender, clean = clean.len(), "release announced");
                self.hints.announce(clean);
            }
            Err(bad) => {
                debug!(database = %self.database, sender, token = bad, channel = notification.channel(),
                    "malformed release hint payload: counted as a wake-up without clean marks");
                self.hints.announce(std::iter::empty());
            }
        }
    }
}

/// How one stretch of reading ended.
enum Read {
    /// The session wants the connection.
    Wanted,
    /// The session is closing or dropped.
    Stopped,
    /// The connection ended or failed: why.
    Ended(String),
}

/// The reader: takes the connection once it lingered, reads until the
/// session wants it back, the session stops it, or the connection ends.
async fn read_while_idle(shared: Arc<Shared>, stop: CancellationToken, mut armed: WatchGuard) {
    let main_pid = shared.heard.main_pid;
    loop {
        let conn = tokio::select! {
            biased;
            () = stop.cancelled() => None,
            conn = lingered(&shared) => Some(conn),
        };
        let Some(mut conn) = conn else {
            armed.disarm();
            return;
        };
        let end = loop {
            let wanted = shared.wanted.notified();
            let next = tokio::select! {
                biased;
                () = stop.cancelled() => break Read::Stopped,
                () = wanted => break Read::Wanted,
                next = conn.try_recv() => next,
            };
            match next {
                Ok(Some(notification)) => shared.heard.record(&notification),
                Ok(None) => {
                    break Read::Ended(format!("the server ended the session (backend {main_pid})"))
                }
                Err(err) => {
                    break Read::Ended(format!(
                        "the session's connection (backend {main_pid}) failed: {}",
                        PgCause::from(err)
                    ))
                }
            }
        };
        match end {
            Read::Wanted | Read::Stopped => {
                {
                    let mut slot = shared.slot();
                    slot.conn = Some(conn);
                    slot.reading = false;
                    // Lingers again: a session that wanted it and went
                    // away (its call dropped) leaves it to be read again.
                    slot.parked_at = Some(Instant::now());
                }
                shared.returned.notify_waiters();
                if matches!(end, Read::Stopped) {
                    armed.disarm();
                    debug!(pid = main_pid, "idle reader stopped");
                    return;
                }
            }
            Read::Ended(reason) => {
                warn!(pid = main_pid, database = %shared.heard.database, %reason, "session lost");
                armed.fire(reason);
                shared.slot().reading = false;
                shared.returned.notify_waiters();
                // Its connection is gone (sqlx dropped it) or broken.
                drop(conn);
                return;
            }
        }
    }
}

/// Waits until a parked connection has stayed parked for [`LINGER`], then
/// takes it (marking the slot as read).
async fn lingered(shared: &Shared) -> PgListener {
    loop {
        let parked = shared.parked.notified();
        let due = {
            let mut slot = shared.slot();
            match slot.parked_at {
                Some(at) if slot.conn.is_some() => {
                    let due = at + LINGER;
                    if Instant::now() >= due {
                        if let Some(conn) = slot.conn.take() {
                            slot.reading = true;
                            return conn;
                        }
                    }
                    Some(due)
                }
                _ => {
                    slot.reader_waiting = true;
                    None
                }
            }
        };
        match due {
            Some(due) => tokio::time::sleep_until(due).await,
            None => parked.await,
        }
    }
}

/// The clean ids of a payload (see [`RELEASE_CHANNEL`](crate::RELEASE_CHANNEL)):
/// comma-separated decimal key ids, `c`-prefixed when clean. An empty
/// payload is a bare wake-up. A payload with any token that does not parse
/// yields its first bad token, and no clean mark is trusted.
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
}
