//! A PostgreSQL session: one dedicated connection holding session-level
//! advisory locks
//! (<https://www.postgresql.org/docs/current/explicit-locking.html#ADVISORY-LOCKS>).
//!
//! # Invariants
//!
//! 1. `held` is exactly the keys this backend holds, each **once**:
//!    PostgreSQL stacks session locks (two `pg_try_advisory_lock` calls need
//!    two unlocks), so the session never asks for a key it holds.
//! 2. When that cannot be known (a round trip whose future was dropped
//!    mid-flight, a lost connection, a failed verify) the session is
//!    *broken*: every later call fails with `Error::SessionLost`, and the
//!    coordinator replaces it.
//! 3. A blocking `acquire` lends the connection to a task (see `wait.rs`);
//!    the next call takes it back first.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use shardlock_core::{CancellationToken, DatabaseId, Error, LockKey, Result, Session};
use sqlx::postgres::PgConnection;
use sqlx::{Connection, Executor};
use tokio::runtime::Handle;
use tracing::{debug, warn};

use crate::connection::{Established, SideConnect};
use crate::error::PgError;
use crate::sql;
use crate::wait::{Outcome, Returned, Wait};

/// How long a dropped session's background close may take before the
/// connection is simply dropped.
const DROP_CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// One dedicated connection to one database, holding session-level advisory
/// locks keyed by [`LockKey::id`].
///
/// # Drop
///
/// Dropping never blocks and works on any Tokio runtime flavour: if a
/// runtime is at hand, a task runs `pg_advisory_unlock_all()` and closes the
/// connection gracefully; otherwise the connection is dropped, its socket
/// closes, and the server ends the session and frees its locks at once.
/// Either way the locks are gone within milliseconds. After an abandoned
/// [`acquire`](Session::acquire) the wait's task owns the connection and
/// closes it when done.
pub struct PgSession {
    database: DatabaseId,
    conn: Option<PgConnection>,
    waiting: Option<Arc<Wait>>,
    side: Arc<SideConnect>,
    pid: i32,
    version_num: u32,
    held: HashMap<i64, LockKey>,
    broken: Option<String>,
    in_flight: Option<&'static str>,
}

impl PgSession {
    pub(crate) fn new(database: DatabaseId, established: Established) -> Self {
        Self {
            database,
            conn: Some(established.conn),
            waiting: None,
            side: established.side,
            pid: established.pid,
            version_num: established.version_num,
            held: HashMap::new(),
            broken: None,
            in_flight: None,
        }
    }

    /// The server process (`pg_backend_pid()`) behind this session, as
    /// `pg_stat_activity.pid` and `pg_locks.pid` show it; e.g. for
    /// `pg_terminate_backend`.
    pub fn backend_pid(&self) -> i32 {
        self.pid
    }

    /// The server's `server_version_num`, e.g. `150008`.
    pub fn server_version_num(&self) -> u32 {
        self.version_num
    }

    /// Why the session can no longer be used, if it cannot.
    pub fn broken_reason(&self) -> Option<&str> {
        self.broken.as_deref()
    }

    fn lost(&self, reason: &str) -> Error {
        Error::session_lost(&self.database, reason)
    }

    fn mark_broken(&mut self, reason: impl Into<String>) {
        let reason = reason.into();
        warn!(database = %self.database, pid = self.pid, %reason, "postgres session broken");
        self.broken.get_or_insert(reason);
    }

    /// Takes the connection back from a finished or abandoned wait.
    async fn reclaim(&mut self) {
        let Some(wait) = self.waiting.clone() else {
            return;
        };
        let returned = wait.returned().await;
        self.waiting = None;
        let key = wait.key().clone();
        if let Err(err) = self.absorb(&key, returned) {
            debug!(error = %err, "an abandoned wait ended with an error");
        }
    }

    /// Applies the end of a wait for `key` to the session.
    fn absorb(&mut self, key: &LockKey, returned: Returned) -> Result<bool> {
        self.conn = returned.conn;
        match returned.outcome {
            Outcome::Granted => {
                let _ = self.held.insert(key.id(), key.clone());
                Ok(true)
            }
            Outcome::NotGranted => Ok(false),
            Outcome::Failed(err) => {
                if self.conn.is_none() || err.is_connection_lost() {
                    self.conn = None;
                    self.mark_broken(err.to_string());
                }
                Err(err.into_session_error(&self.database))
            }
        }
    }

    /// Makes the connection ready for a round trip, or says why it cannot be.
    async fn ready(&mut self) -> Result<()> {
        self.reclaim().await;
        if let Some(op) = self.in_flight.take() {
            self.mark_broken(format!(
                "an earlier {op} was interrupted mid-round-trip (its future was dropped), so \
                 the locks this session holds are unknown"
            ));
        }
        if self.conn.is_none() && self.broken.is_none() {
            self.mark_broken("the connection is closed");
        }
        match &self.broken {
            Some(reason) => Err(self.lost(reason)),
            None => Ok(()),
        }
    }

    /// The connection; only after [`ready`](Self::ready) succeeded.
    fn conn(&mut self) -> Result<&mut PgConnection> {
        let database = &self.database;
        self.conn
            .as_mut()
            .ok_or_else(|| Error::session_lost(database, "the connection is closed"))
    }

    /// Maps a failed statement; a lost connection breaks the session.
    fn fail(&mut self, operation: &'static str, err: sqlx::Error) -> Error {
        let err = PgError::from_query(operation, err);
        if err.is_connection_lost() {
            self.conn = None;
            self.mark_broken(err.to_string());
        }
        err.into_session_error(&self.database)
    }

    /// After a failed try-acquire: a batch stops at its failing key but the
    /// keys before it stay locked, so release those of `attempted` the
    /// backend holds. Breaks the session if that is not possible.
    async fn undo_partial(&mut self, attempted: &[i64]) {
        let Some(conn) = self.conn.as_mut() else {
            return;
        };
        let undo = sqlx::query_scalar::<_, i64>(sql::UNLOCK_HELD_OF)
            .bind(attempted)
            .fetch_one(conn)
            .await;
        match undo {
            Ok(released) => debug!(released, "released the keys a failed batch had taken"),
            Err(err) => self.mark_broken(format!(
                "a failed try-acquire may have left keys locked and releasing them failed: {err}"
            )),
        }
    }
}

impl Session for PgSession {
    fn database(&self) -> &DatabaseId {
        &self.database
    }

    fn held(&self) -> Vec<LockKey> {
        self.held.values().cloned().collect()
    }

    /// `pg_try_advisory_lock` for every key not held yet, deduplicated, in
    /// one statement (`unnest($1::bigint[]) WITH ORDINALITY`); held keys
    /// answer `true` without a round trip, and a batch of only held keys
    /// sends nothing.
    ///
    /// # Errors
    ///
    /// A full shared lock table is a [`PgError::LockTableFull`] (inside
    /// [`Error::Driver`]): the keys the failed batch took are released
    /// again before the error returns.
    ///
    /// # Cancel safety
    ///
    /// Not cancel-safe: dropped mid-round-trip, the session no longer knows
    /// which keys it holds and is broken (the next call, e.g.
    /// [`verify`](Session::verify), fails).
    async fn try_acquire(&mut self, keys: &[LockKey]) -> Result<Vec<bool>> {
        self.ready().await?;
        let mut seen = HashSet::with_capacity(keys.len());
        let wanted: Vec<i64> = keys
            .iter()
            .map(LockKey::id)
            .filter(|id| !self.held.contains_key(id) && seen.insert(*id))
            .collect();
        if !wanted.is_empty() {
            self.in_flight = Some("try_acquire");
            let conn = self.conn()?;
            let result = if let [id] = wanted[..] {
                sqlx::query_scalar::<_, bool>(sql::TRY_ONE)
                    .bind(id)
                    .fetch_one(conn)
                    .await
                    .map(|granted| vec![(id, granted)])
            } else {
                sqlx::query_scalar::<_, Vec<bool>>(sql::TRY_MANY)
                    .bind(&wanted)
                    .fetch_one(conn)
                    .await
                    .map(|granted| wanted.iter().copied().zip(granted).collect::<Vec<_>>())
            };
            self.in_flight = None;
            let rows = match result {
                Ok(rows) => rows,
                Err(err) => {
                    let err = self.fail("try_acquire", err);
                    self.undo_partial(&wanted).await;
                    return Err(err);
                }
            };
            if rows.len() != wanted.len() {
                let reason = format!(
                    "the server answered {} of {} keys of a batch",
                    rows.len(),
                    wanted.len()
                );
                self.mark_broken(reason.clone());
                return Err(self.lost(&reason));
            }
            // `rows` follows `wanted`, which follows the first occurrence of
            // each id in `keys`.
            let mut first = HashSet::with_capacity(wanted.len());
            let newly = keys
                .iter()
                .filter(|k| !self.held.contains_key(&k.id()) && first.insert(k.id()));
            let granted: Vec<&LockKey> = newly
                .zip(rows)
                .filter(|(_, (_, granted))| *granted)
                .map(|(key, _)| key)
                .collect();
            self.held.reserve(granted.len());
            for key in granted {
                let _ = self.held.insert(key.id(), key.clone());
            }
        }
        Ok(keys
            .iter()
            .map(|k| self.held.contains_key(&k.id()))
            .collect())
    }

    /// Waits in `pg_advisory_lock` (the server wakes the waiter on release:
    /// no polling) until the key is granted or `cancel` fires. A key already
    /// held answers `true` at once.
    ///
    /// The wait runs in a task that owns the connection. When `cancel`
    /// fires, the backend's wait is cancelled from a side connection
    /// (`pg_cancel_backend`), a grant that raced the cancel is released, and
    /// the answer is `false`.
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe, through `cancel` and by dropping the future: a dropped
    /// wait is cancelled the same way in the background, and if the key was
    /// granted meanwhile it is released at once, so the key never stays
    /// held by this session. The next call on the session waits for that
    /// clean-up to finish.
    ///
    /// Needs a Tokio runtime with timers.
    async fn acquire(&mut self, key: &LockKey, cancel: &CancellationToken) -> Result<bool> {
        self.ready().await?;
        if self.held.contains_key(&key.id()) {
            return Ok(true);
        }
        if cancel.is_cancelled() {
            return Ok(false);
        }
        let Some(conn) = self.conn.take() else {
            return Err(self.lost("the connection is closed"));
        };
        let wait = match Wait::start(conn, key.clone(), self.pid, Arc::clone(&self.side)) {
            Ok(wait) => wait,
            Err(conn) => {
                self.conn = Some(conn);
                return Err(Error::driver(
                    crate::error::DRIVER,
                    "a blocking acquire needs a Tokio runtime",
                ));
            }
        };
        self.waiting = Some(Arc::clone(&wait));
        let mut guard = AbandonOnDrop(Some(Arc::clone(&wait)));
        let returned = tokio::select! {
            biased;
            returned = wait.returned() => returned,
            () = cancel.cancelled() => match wait.abandon() {
                Some(returned) => returned,
                None => wait.returned().await,
            },
        };
        guard.0 = None;
        self.waiting = None;
        self.absorb(key, returned)
    }

    /// `pg_advisory_unlock` for a held key; a key not held answers `false`
    /// without a round trip (never an error).
    ///
    /// # Cancel safety
    ///
    /// Not cancel-safe: dropped mid-round-trip, the session is broken.
    async fn release(&mut self, key: &LockKey) -> Result<bool> {
        self.reclaim().await;
        if !self.held.contains_key(&key.id()) {
            return Ok(false);
        }
        self.ready().await?;
        self.in_flight = Some("release");
        let conn = self.conn()?;
        let result = sqlx::query_scalar::<_, bool>(sql::UNLOCK)
            .bind(key.id())
            .fetch_one(conn)
            .await;
        self.in_flight = None;
        let released = result.map_err(|e| self.fail("release", e))?;
        let _ = self.held.remove(&key.id());
        if !released {
            warn!(key = %key, pid = self.pid, "the server did not show a key this session held");
        }
        Ok(released)
    }

    /// One statement for every held key of `keys` (`unnest` +
    /// `pg_advisory_unlock`); keys not held answer `false` without being sent.
    ///
    /// # Cancel safety
    ///
    /// Not cancel-safe: dropped mid-round-trip, the session is broken.
    async fn release_many(&mut self, keys: &[LockKey]) -> Result<Vec<bool>> {
        self.reclaim().await;
        let mut seen = HashSet::with_capacity(keys.len());
        let held: Vec<i64> = keys
            .iter()
            .map(LockKey::id)
            .filter(|id| self.held.contains_key(id) && seen.insert(*id))
            .collect();
        if held.is_empty() {
            return Ok(vec![false; keys.len()]);
        }
        self.ready().await?;
        self.in_flight = Some("release_many");
        let conn = self.conn()?;
        let result = sqlx::query_scalar::<_, Vec<bool>>(sql::UNLOCK_MANY)
            .bind(&held)
            .fetch_one(conn)
            .await;
        self.in_flight = None;
        let answers = result.map_err(|e| self.fail("release_many", e))?;
        let released: HashMap<i64, bool> = held.iter().copied().zip(answers).collect();
        for id in &held {
            let _ = self.held.remove(id);
        }
        let mut first = HashSet::with_capacity(keys.len());
        Ok(keys
            .iter()
            .map(|k| first.insert(k.id()) && released.get(&k.id()).copied().unwrap_or(false))
            .collect())
    }

    /// `pg_advisory_unlock_all()`, or nothing when no key is held.
    ///
    /// # Cancel safety
    ///
    /// Not cancel-safe: dropped mid-round-trip, the session is broken.
    async fn release_all(&mut self) -> Result<()> {
        self.reclaim().await;
        if self.held.is_empty() && self.in_flight.is_none() {
            return Ok(());
        }
        self.ready().await?;
        self.in_flight = Some("release_all");
        let conn = self.conn()?;
        let result = conn.execute(sql::UNLOCK_ALL).await;
        self.in_flight = None;
        result.map_err(|e| self.fail("release_all", e))?;
        self.held.clear();
        Ok(())
    }

    /// One statement: the backend pid (unchanged, or a proxy moved the
    /// connection) and the held keys `pg_locks` no longer shows granted to
    /// this backend.
    ///
    /// # Errors
    ///
    /// [`Error::SessionLost`] when the connection is gone, the backend
    /// changed, or a key is missing; the session is then broken.
    ///
    /// # Cancel safety
    ///
    /// Not cancel-safe: dropped mid-round-trip (e.g. by the coordinator's
    /// deadline), the session is broken.
    async fn verify(&mut self) -> Result<()> {
        self.ready().await?;
        let ids: Vec<i64> = self.held.keys().copied().collect();
        self.in_flight = Some("verify");
        let conn = self.conn()?;
        let result = sqlx::query_as::<_, (i32, Vec<i64>)>(sql::VERIFY)
            .bind(&ids)
            .fetch_one(conn)
            .await;
        self.in_flight = None;
        let (pid, missing) = result.map_err(|e| self.fail("verify", e))?;
        if pid != self.pid {
            let reason = format!(
                "the connection now reaches server process {pid} instead of {}: a proxy moved \
                 it (transaction pooling?), and session locks stay with the old process",
                self.pid
            );
            self.mark_broken(reason.clone());
            return Err(self.lost(&reason));
        }
        if !missing.is_empty() {
            let names: Vec<&str> = missing
                .iter()
                .filter_map(|id| self.held.get(id).map(LockKey::name))
                .collect();
            let reason = format!(
                "PostgreSQL no longer shows {} of the session's {} locks: {names:?}",
                missing.len(),
                self.held.len()
            );
            self.mark_broken(reason.clone());
            return Err(self.lost(&reason));
        }
        Ok(())
    }

    /// `pg_advisory_unlock_all()` if anything is held, then a graceful
    /// close. A broken session's connection is just dropped: the server
    /// frees its locks when it notices.
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: dropped midway, the connection is dropped and the server
    /// ends the session, freeing its locks.
    async fn close(mut self) -> Result<()> {
        self.reclaim().await;
        let Some(mut conn) = self.conn.take() else {
            return Ok(());
        };
        if self.broken.is_some() {
            return Ok(());
        }
        let unlock = !self.held.is_empty() || self.in_flight.is_some();
        self.held.clear();
        if unlock {
            if let Err(err) = conn.execute(sql::UNLOCK_ALL).await {
                return Err(PgError::from_query("close", err).into_session_error(&self.database));
            }
        }
        if let Err(err) = conn.close().await {
            debug!(error = %err, "closing the connection failed after releasing its locks");
        }
        Ok(())
    }
}

/// Abandons a wait when the acquire future is dropped before it ended.
struct AbandonOnDrop(Option<Arc<Wait>>);

impl Drop for AbandonOnDrop {
    fn drop(&mut self) {
        if let Some(wait) = self.0.take() {
            wait.abandon_on_drop();
        }
    }
}

impl Drop for PgSession {
    fn drop(&mut self) {
        let Some(conn) = self.conn.take() else {
            return;
        };
        if self.broken.is_some() {
            return;
        }
        let unlock = !self.held.is_empty() || self.in_flight.is_some();
        match Handle::try_current() {
            Ok(handle) => {
                let database = self.database.clone();
                let _task = handle.spawn(close_in_background(conn, unlock, database));
            }
            // No runtime: dropping the connection closes its socket and the
            // server frees the session's locks.
            Err(_) => drop(conn),
        }
    }
}

async fn close_in_background(mut conn: PgConnection, unlock: bool, database: DatabaseId) {
    let closing = async move {
        if unlock {
            if let Err(err) = conn.execute(sql::UNLOCK_ALL).await {
                debug!(%database, error = %err, "unlock on drop failed; dropping the connection");
                return;
            }
        }
        let _ = conn.close().await;
    };
    let _ = tokio::time::timeout(DROP_CLOSE_TIMEOUT, closing).await;
}

impl fmt::Debug for PgSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgSession")
            .field("database", &self.database)
            .field("backend_pid", &self.pid)
            .field("held", &self.held.len())
            .field("waiting", &self.waiting.is_some())
            .field("broken", &self.broken)
            .finish()
    }
}
