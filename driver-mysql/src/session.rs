//! A MySQL/MariaDB session: one dedicated connection holding `GET_LOCK`
//! named locks (<https://mariadb.com/kb/en/get_lock/>,
//! <https://dev.mysql.com/doc/refman/8.0/en/locking-functions.html>), plus
//! the watcher connection behind its loss signal (see `watch.rs`).
//!
//! # Invariants
//!
//! 1. The session's bookkeeping is core's [`Holds`]: the held keys (exactly
//!    those this connection holds, each **once**: MySQL counts a name taken
//!    twice as two holds, so the session never asks for a key it holds),
//!    poisoning and the loss signal it shares with the watcher.
//! 2. A blocking `acquire` lends the connection to a task (see `wait.rs`);
//!    the next call takes it back first.
//! 3. No statement of a live session frees the liveness lock: releases name
//!    the held keys; `RELEASE_ALL_LOCKS()` runs only in `close` and drop,
//!    after the watcher was stopped.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use shardlock_core::lent::{ConnectionLoss, Lent};
use shardlock_core::{
    CancellationToken, DatabaseId, Error, Holds, LockKey, Result, Session, SessionSignals,
};
use sqlx::mysql::{MySqlConnection, MySqlRow};
use sqlx::{Connection, Executor, Row};
use tokio::runtime::Handle;
use tracing::{debug, warn};

use crate::connection::SideConnect;
use crate::error::MySqlError;
use crate::sql::{self, lock_name};
use crate::wait::{GetLockWait, Wait};
use crate::watch::Watcher;

/// How long a dropped session's background close may take before the
/// connection is simply dropped.
const DROP_CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// One dedicated connection to one database, holding `GET_LOCK` named locks
/// (see [`lock_name`](crate::lock_name)), and a watcher connection that
/// fires the session's loss signal ([`Session::signals`]) the moment the
/// server ends the main connection.
///
/// # Drop
///
/// Dropping never blocks and works on any Tokio runtime flavour: the
/// watcher is stopped; then, if a runtime is at hand, a task runs
/// `RELEASE_ALL_LOCKS()` and closes the connection gracefully; otherwise
/// the connection is dropped, its socket closes, and the server ends the
/// session and frees its locks at once. After an abandoned
/// [`acquire`](Session::acquire) the wait's task owns the connection and
/// closes it when done.
pub struct MySqlSession {
    conn: Option<MySqlConnection>,
    waiting: Option<Arc<Wait>>,
    side: Arc<SideConnect>,
    id: u64,
    version: String,
    liveness: String,
    holds: Holds,
    watcher: Watcher,
    round_trips: Arc<AtomicU64>,
}

impl MySqlSession {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        database: DatabaseId,
        conn: MySqlConnection,
        id: u64,
        version: String,
        liveness: String,
        side: Arc<SideConnect>,
        watcher: Watcher,
        signals: SessionSignals,
    ) -> Self {
        Self {
            conn: Some(conn),
            waiting: None,
            side,
            id,
            version,
            liveness,
            holds: Holds::with_signals(database, signals),
            watcher,
            round_trips: Arc::new(AtomicU64::new(0)),
        }
    }

    /// The server's id of this session's connection (`CONNECTION_ID()`, the
    /// `Id` of `SHOW PROCESSLIST`); e.g. for `KILL`.
    pub fn connection_id(&self) -> u64 {
        self.id
    }

    /// The connection id of the session's watcher, which waits in
    /// `GET_LOCK` for the session's liveness lock.
    pub fn watcher_id(&self) -> u64 {
        self.watcher.id()
    }

    /// The name of the session's liveness lock (`shardlock:live:<hex>`),
    /// held for as long as the connection lives; never a shardlock key.
    pub fn liveness_lock(&self) -> &str {
        &self.liveness
    }

    /// The server's `VERSION()`, e.g. `10.11.6-MariaDB-0+deb12u1`.
    pub fn server_version(&self) -> &str {
        &self.version
    }

    /// Statements sent on the main connection since
    /// [`connect`](shardlock_core::Driver::connect) returned, one per round
    /// trip (a batch of any size is one command); statements of the
    /// watcher and of side connections are not counted. For tests and
    /// metrics.
    pub fn round_trips(&self) -> u64 {
        self.round_trips.load(Ordering::Relaxed)
    }

    /// Why the session can no longer be used, if it cannot.
    pub fn broken_reason(&self) -> Option<String> {
        self.holds
            .broken_reason()
            .map(str::to_string)
            .or_else(|| self.holds.signals().reason())
    }

    /// The connection, the wait it may be lent to and the bookkeeping, for
    /// core's steps.
    fn lent(&mut self) -> Lent<'_, GetLockWait> {
        Lent::new(&mut self.conn, &mut self.waiting, &mut self.holds)
    }

    /// Takes the connection back from a finished or abandoned wait.
    async fn reclaim(&mut self) {
        self.lent().reclaim().await;
    }

    /// Maps a driver error through core; a lost connection is dropped and
    /// poisons the session.
    fn fail(&mut self, err: MySqlError) -> Error {
        self.lent().fail(err)
    }

    /// Makes the connection ready for a round trip, or says why it cannot.
    async fn ready(&mut self) -> Result<()> {
        self.lent().ready().await
    }

    /// Sends `statement` as one round trip named `op` and answers every
    /// column of every row it returned, in order.
    async fn run(&mut self, op: &'static str, statement: &str) -> Result<Vec<MySqlRow>> {
        self.holds.begin(op)?;
        self.round_trips.fetch_add(1, Ordering::Relaxed);
        let result = match self.conn.as_mut() {
            Some(conn) => conn.fetch_all(sqlx::raw_sql(statement)).await,
            None => {
                self.holds.end();
                return Err(self.holds.poison("the connection is closed"));
            }
        };
        self.holds.end();
        result.map_err(|e| self.fail(MySqlError::from_query(op, e)))
    }

    /// [`run`](Self::run), then the integer columns flattened, checked to
    /// be `expected` many.
    async fn run_ints(
        &mut self,
        op: &'static str,
        statement: &str,
        expected: usize,
    ) -> Result<Vec<Option<i64>>> {
        let rows = self.run(op, statement).await?;
        let values = ints(&rows).map_err(|e| self.fail(MySqlError::from_query(op, e)))?;
        if values.len() != expected {
            return Err(self.holds.poison(format!(
                "the server answered {} of {expected} values of {op}",
                values.len()
            )));
        }
        Ok(values)
    }

    /// After a failed batch: keys of an earlier chunk, or granted before a
    /// `NULL`, may be held; give back those of `names` this connection
    /// holds. Poisons the session if that is not possible.
    async fn undo_partial(&mut self, names: &[String]) {
        if self.conn.is_none() {
            return;
        }
        let statement = sql::batch(names, |n| {
            format!("IF(IS_USED_LOCK({n}) <=> CONNECTION_ID(), RELEASE_LOCK({n}), 0)")
        });
        if let Err(err) = self.run("undo a failed try_acquire", &statement).await {
            let _ = self.holds.poison(format!(
                "a failed try-acquire may have left keys locked and releasing them failed: {err}"
            ));
        }
    }

    /// Stops the watcher (so the session's own release cannot look like a
    /// loss) and takes the connection for a final statement, unless the
    /// session is broken: then the connection is just dropped.
    fn take_for_close(&mut self) -> Option<MySqlConnection> {
        self.watcher.stop();
        let conn = self.conn.take()?;
        if self.holds.is_broken() {
            return None;
        }
        self.holds.clear();
        Some(conn)
    }

    /// Opens a **session-fenced transaction** (`BEGIN`, one round trip) on
    /// the session's own connection, the one holding its `GET_LOCK` locks:
    /// write the projection's rows through it (`.execute(&mut *tx)`, InnoDB
    /// tables), save the checkpoint in it
    /// ([`MySqlCheckpoints::save_in`](crate::MySqlCheckpoints::save_in)`(&mut tx, ..)`),
    /// then [`commit`](crate::MySqlTransaction::commit) (or both at once with
    /// [`commit_checkpoint`](crate::MySqlTransaction::commit_checkpoint)). A
    /// leader whose connection was killed cannot commit: the commit runs on
    /// that very connection, the server rolls a killed connection's
    /// transaction back before it frees its named locks, and the session's
    /// loss signal is checked right before the commit (see
    /// [`MySqlTransaction`](crate::MySqlTransaction)). From a leadership guard:
    /// `guard.leader_session()?.transaction().await?`.
    ///
    /// While the transaction is open the session is borrowed, so no lock
    /// call can run on the connection meanwhile (a blocking
    /// [`acquire`](Session::acquire) still waiting is taken back first).
    /// The tables live in the database the session connects to (the one
    /// [`MySqlCheckpoints::connect`](crate::MySqlCheckpoints::connect)
    /// opens for the same options and id). Keep it short: the session's
    /// `wait_timeout` ([`idle_timeout`](crate::MySqlOptions::idle_timeout))
    /// ends a connection idle that long inside a transaction too, and with
    /// it the session's locks.
    ///
    /// # Errors
    ///
    /// [`Error::SessionLost`] when the session is lost or poisoned (nothing
    /// is sent) or the connection fails at `BEGIN` (then it is poisoned).
    ///
    /// # Cancel safety
    ///
    /// Not cancel-safe: dropped while `BEGIN` is in flight, the session is
    /// poisoned at its next call.
    pub async fn transaction(&mut self) -> Result<crate::MySqlTransaction<'_>> {
        self.ready().await?;
        self.holds.begin("begin a fenced transaction")?;
        self.round_trips.fetch_add(1, Ordering::Relaxed);
        let Some(conn) = self.conn.as_mut() else {
            self.holds.end();
            return Err(self.holds.poison("the connection is closed"));
        };
        let begun = conn.begin().await;
        self.holds.end();
        match begun {
            Ok(tx) => Ok(crate::MySqlTransaction::new(
                tx,
                &mut self.holds,
                self.id,
                &self.round_trips,
            )),
            // Session-fatal errors poison the session; its next call (or
            // close) drops the connection.
            Err(e) => Err(self
                .holds
                .fail(MySqlError::from_query("begin a fenced transaction", e))),
        }
    }
}

/// Every column of every row as an optional integer.
fn ints(rows: &[MySqlRow]) -> Result<Vec<Option<i64>>, sqlx::Error> {
    let mut out = Vec::with_capacity(rows.iter().map(|r| r.columns().len()).sum());
    for row in rows {
        for i in 0..row.columns().len() {
            out.push(row.try_get::<Option<i64>, _>(i)?);
        }
    }
    Ok(out)
}

impl ConnectionLoss for MySqlError {
    fn is_connection_lost(&self) -> bool {
        MySqlError::is_connection_lost(self)
    }
}

impl Session for MySqlSession {
    /// Held keys, trust and the loss signal; `lost` fires when the watcher
    /// sees the main connection end (within
    /// [`LOSS_DETECTION_BOUND`](crate::LOSS_DETECTION_BOUND) on a healthy
    /// network), when the watcher's own connection fails, or when the
    /// session is poisoned.
    fn holds(&self) -> &Holds {
        &self.holds
    }

    /// `GET_LOCK(name, 0)` for every key not held yet, deduplicated, in one
    /// command (one `SELECT` per 1,000 keys); held keys answer `true`
    /// without a round trip.
    ///
    /// # Cancel safety
    ///
    /// Not cancel-safe: dropped mid-round-trip, the session no longer knows
    /// which keys it holds and is poisoned.
    async fn try_acquire(&mut self, keys: &[LockKey]) -> Result<Vec<bool>> {
        self.ready().await?;
        let ask = self.holds.to_acquire(keys);
        if ask.is_empty() {
            return Ok(self.holds.answer(keys));
        }
        let names: Vec<String> = ask.iter().map(lock_name).collect();
        let statement = sql::try_many(&names);
        let values = match self.run_ints("try_acquire", &statement, names.len()).await {
            Ok(values) => values,
            Err(err) => {
                if !err.is_session_fatal() {
                    self.undo_partial(&names).await;
                }
                return Err(err);
            }
        };
        if values.iter().any(Option::is_none) {
            // GET_LOCK answers NULL on an error (e.g. the statement was
            // killed): which keys are held is unsure.
            self.undo_partial(&names).await;
            return Err(self.fail(MySqlError::Query {
                operation: "try_acquire",
                source: sqlx::Error::Protocol(
                    "GET_LOCK answered NULL (an error in the server, e.g. the statement was \
                     killed)"
                        .to_string(),
                )
                .into(),
            }));
        }
        let granted: Vec<bool> = values.iter().map(|v| *v == Some(1)).collect();
        self.holds.finish_acquire(keys, &ask, &granted)
    }

    /// Waits in `GET_LOCK(name, <one year>)` (the server wakes the waiter on
    /// release: no polling; MariaDB takes no infinite timeout, and a wait
    /// that runs out simply starts again) until the key is granted or
    /// `cancel` fires. A key already held answers `true` at once.
    ///
    /// The wait runs in a task that owns the connection. When `cancel`
    /// fires, the statement is ended with `KILL QUERY <connection id>` from
    /// a side connection, a grant that raced the kill is released, and the
    /// answer is `false`. A wait ended by someone else's `KILL QUERY` is
    /// [`MySqlError::LockWaitKilled`].
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe, through `cancel` and by dropping the future: a dropped
    /// wait is cancelled the same way in the background, and if the key was
    /// granted meanwhile it is released at once. The next call on the
    /// session waits for that clean-up to finish.
    async fn acquire(&mut self, key: &LockKey, cancel: &CancellationToken) -> Result<bool> {
        let (id, side) = (self.id, Arc::clone(&self.side));
        let lock = || GetLockWait::new(key.clone(), lock_name(key), id, side);
        Lent::new(&mut self.conn, &mut self.waiting, &mut self.holds)
            .acquire(
                key,
                lock,
                &self.round_trips,
                cancel,
                "MySqlSession::acquire",
            )
            .await
    }

    /// `RELEASE_LOCK(name)` for every held key of `keys`, in one command;
    /// keys not held answer `false` without being sent.
    ///
    /// # Cancel safety
    ///
    /// Not cancel-safe: dropped mid-round-trip, the session is poisoned.
    async fn release_many(&mut self, keys: &[LockKey]) -> Result<Vec<bool>> {
        self.reclaim().await;
        let ask = self.holds.to_release(keys);
        if ask.is_empty() {
            return Ok(vec![false; keys.len()]);
        }
        self.ready().await?;
        let names: Vec<String> = ask.iter().map(lock_name).collect();
        let statement = sql::release_many(&names);
        let values = self
            .run_ints("release_many", &statement, names.len())
            .await?;
        let released: Vec<bool> = values.iter().map(|v| *v == Some(1)).collect();
        if released.iter().any(|r| !r) {
            warn!(
                connection_id = self.id,
                "the server did not show every released key held by this session"
            );
        }
        Ok(self.holds.record_released(keys, &ask, &released))
    }

    /// One command of `IS_USED_LOCK(name) <> CONNECTION_ID()` per key not
    /// held here, taking nothing; keys this session holds answer `false`
    /// and are not sent.
    ///
    /// # Cancel safety
    ///
    /// Nothing is locked, but dropped mid-round-trip the session is
    /// poisoned like after any interrupted round trip.
    async fn probe(&mut self, keys: &[LockKey]) -> Result<Vec<bool>> {
        self.ready().await?;
        let ask = self.holds.to_acquire(keys);
        if ask.is_empty() {
            return Ok(vec![false; keys.len()]);
        }
        let names: Vec<String> = ask.iter().map(lock_name).collect();
        let statement = sql::probe(&names);
        let values = self.run_ints("probe", &statement, names.len()).await?;
        let by_id: HashMap<i64, bool> = ask
            .iter()
            .zip(values)
            .map(|(key, v)| (key.id(), v == Some(1)))
            .collect();
        Ok(keys
            .iter()
            .map(|key| by_id.get(&key.id()).copied().unwrap_or(false))
            .collect())
    }

    /// Releases every held key by name in one command (the `release_many`
    /// statement), or sends nothing when none is held. Not
    /// `RELEASE_ALL_LOCKS()`, which would also free the session's liveness
    /// lock and make the watcher report a loss.
    ///
    /// # Cancel safety
    ///
    /// Not cancel-safe: dropped mid-round-trip, the session is poisoned.
    async fn release_all(&mut self) -> Result<()> {
        let held = self.holds.held();
        let _ = self.release_many(&held).await?;
        Ok(())
    }

    /// One command: the connection id, whether the liveness lock is still
    /// this connection's, and `IS_USED_LOCK(name) <=> CONNECTION_ID()` for
    /// every held key.
    ///
    /// # Errors
    ///
    /// [`Error::SessionLost`] when the loss signal fired, the connection is
    /// gone or changed, or a key or the liveness lock is missing; the
    /// session is then poisoned.
    ///
    /// # Cancel safety
    ///
    /// Not cancel-safe: dropped mid-round-trip, the session is poisoned.
    async fn verify(&mut self) -> Result<()> {
        self.ready().await?;
        let held: Vec<LockKey> = self.holds.held();
        let names: Vec<String> = held.iter().map(lock_name).collect();
        let statement = sql::verify(&self.liveness, &names);
        let rows = self.run("verify", &statement).await?;
        let first = rows
            .first()
            .map(|row| (row.try_get::<u64, _>(0), row.try_get::<Option<i64>, _>(1)));
        let (id, alive) = match first {
            Some((Ok(id), Ok(alive))) => (id, alive == Some(1)),
            Some((Err(e), _)) | Some((_, Err(e))) => {
                return Err(self.fail(MySqlError::from_query("verify", e)))
            }
            None => return Err(self.holds.poison("verify answered no row")),
        };
        if id != self.id {
            return Err(self.holds.poison(format!(
                "the connection now reaches server connection {id} instead of {}: a proxy \
                 moved it, and named locks stay with the old connection",
                self.id
            )));
        }
        if !alive {
            return Err(self.holds.poison(format!(
                "connection {id} no longer holds the session's liveness lock {} (someone ran \
                 RELEASE_ALL_LOCKS on it?), so its end could go unseen",
                self.liveness
            )));
        }
        let owned = ints(&rows[1..]).map_err(|e| self.fail(MySqlError::from_query("verify", e)))?;
        if owned.len() != held.len() {
            return Err(self.holds.poison(format!(
                "verify answered {} of {} held keys",
                owned.len(),
                held.len()
            )));
        }
        let missing: Vec<&str> = held
            .iter()
            .zip(&owned)
            .filter(|(_, v)| **v != Some(1))
            .map(|(k, _)| k.name())
            .collect();
        if !missing.is_empty() {
            let reason = format!(
                "the server no longer shows {} of the session's {} locks: {missing:?}",
                missing.len(),
                held.len()
            );
            return Err(self.holds.poison(reason));
        }
        Ok(())
    }

    /// Stops the watcher first (a graceful close never fires the loss
    /// signal), then `RELEASE_ALL_LOCKS()` and a graceful close. A broken
    /// session's connection is just dropped: the server frees its locks
    /// when the connection ends.
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: dropped midway, the connection is dropped and the
    /// server ends the session, freeing its locks.
    async fn close(mut self) -> Result<()> {
        self.reclaim().await;
        let Some(mut conn) = self.take_for_close() else {
            return Ok(());
        };
        self.round_trips.fetch_add(1, Ordering::Relaxed);
        if let Err(err) = conn.execute(sql::RELEASE_ALL).await {
            return Err(Error::from_driver(
                self.holds.database(),
                MySqlError::from_query("close", err),
            ));
        }
        if let Err(err) = conn.close().await {
            debug!(error = %err, "closing the connection failed after releasing its locks");
        }
        Ok(())
    }
}

impl Drop for MySqlSession {
    fn drop(&mut self) {
        let Some(conn) = self.take_for_close() else {
            return;
        };
        match Handle::try_current() {
            Ok(handle) => {
                let database = self.holds.database().clone();
                let _task = handle.spawn(close_in_background(conn, database));
            }
            // No runtime: dropping the connection closes its socket and the
            // server frees the session's locks.
            Err(_) => drop(conn),
        }
    }
}

async fn close_in_background(mut conn: MySqlConnection, database: DatabaseId) {
    let closing = async move {
        if let Err(err) = conn.execute(sql::RELEASE_ALL).await {
            debug!(%database, error = %err, "release on drop failed; dropping the connection");
            return;
        }
        let _ = conn.close().await;
    };
    let _ = tokio::time::timeout(DROP_CLOSE_TIMEOUT, closing).await;
}

impl fmt::Debug for MySqlSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MySqlSession")
            .field("connection_id", &self.id)
            .field("watcher", &self.watcher)
            .field("holds", &self.holds)
            .field("waiting", &self.waiting.is_some())
            .field("round_trips", &self.round_trips())
            .finish()
    }
}
