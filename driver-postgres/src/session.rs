//! A PostgreSQL session: one dedicated connection holding session-level
//! advisory locks
//! (<https://www.postgresql.org/docs/current/explicit-locking.html#ADVISORY-LOCKS>),
//! read between calls for its loss signal and release hints (see
//! `idle.rs`).
//!
//! # Invariants
//!
//! 1. The session's bookkeeping is core's [`Holds`]: the held keys (exactly
//!    those this backend holds, each **once**: PostgreSQL stacks session
//!    locks, so the session never asks for a key it holds), poisoning (a
//!    round trip whose future was dropped between `begin` and `end`, a lost
//!    connection, a failed verify) and the loss signal it shares with the
//!    idle reader. A poisoned or lost session fails every later call with
//!    `Error::SessionLost`, and the coordinator replaces it.
//! 2. Every call of the [`Session`] trait takes the connection back from
//!    the idle reader first (`ready`) and parks it again when done (`park`);
//!    a broken session keeps it until it is closed or dropped.
//! 3. A blocking `acquire` lends the connection to a task (see `wait.rs`);
//!    the next call takes it back first.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use shardlock_core::lent::{ConnectionLoss, Lent};
use shardlock_core::{
    CancellationToken, DatabaseId, Error, Holds, LockKey, Result, Session, SessionSignals,
};
use sqlx::postgres::{PgConnection, PgListener};
use sqlx::{Acquire, Executor};
use tokio::runtime::Handle;
use tracing::{debug, warn};

use crate::connection::SideConnect;
use crate::error::PgError;
use crate::fenced::PgTransaction;
use crate::idle::Idle;
use crate::sql;
use crate::wait::{AdvisoryWait, Wait};

/// How long a dropped session's background close may take before the
/// connection is simply dropped.
const DROP_CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// One dedicated connection to one database, holding session-level advisory
/// locks keyed by [`LockKey::id`]. Between calls a task reads it, which
/// fires the session's loss signal ([`Session::signals`]) the moment the
/// server ends its backend and records the release hints other sessions
/// announce.
///
/// # Drop
///
/// Dropping never blocks and works on any Tokio runtime flavour: the idle
/// reader is stopped; then, if a runtime is at hand, a task runs
/// `pg_advisory_unlock_all()` and closes the connection gracefully;
/// otherwise the connection is closed at once, and the server ends the
/// session and frees its locks. Either way the locks are
/// gone within milliseconds. After an abandoned
/// [`acquire`](Session::acquire) the wait's task owns the connection and
/// closes it when done.
pub struct PgSession {
    /// The connection while the session has it (in a call, or broken);
    /// between calls it is parked in `idle`.
    conn: Option<PgListener>,
    waiting: Option<Arc<Wait>>,
    side: Arc<SideConnect>,
    pid: i32,
    version_num: u32,
    holds: Holds,
    idle: Idle,
    round_trips: Arc<AtomicU64>,
    /// How often verify reads the lock table, and when it last did.
    lock_check_interval: Duration,
    last_lock_check: Option<Instant>,
}

impl PgSession {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        database: DatabaseId,
        conn: PgListener,
        pid: i32,
        version_num: u32,
        side: Arc<SideConnect>,
        idle: Idle,
        signals: SessionSignals,
        lock_check_interval: Duration,
    ) -> Self {
        idle.park(conn);
        Self {
            conn: None,
            waiting: None,
            side,
            pid,
            version_num,
            holds: Holds::with_signals(database, signals),
            idle,
            round_trips: Arc::new(AtomicU64::new(0)),
            lock_check_interval,
            last_lock_check: None,
        }
    }

    /// Fails (poisoned) when the round trip reached another server process
    /// than the session's.
    fn same_process(&mut self, pid: i32) -> Result<()> {
        if pid == self.pid {
            return Ok(());
        }
        Err(self.holds.poison(format!(
            "the connection now reaches server process {pid} instead of {}: a proxy moved \
             it (transaction pooling?), and session locks stay with the old process",
            self.pid
        )))
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

    /// Statements sent on the main connection since
    /// [`connect`](shardlock_core::Driver::connect) returned (its own setup
    /// statements are not counted), one per round trip; statements of the
    /// side connections are not counted. For tests and
    /// metrics: e.g. a batched [`try_acquire`](Session::try_acquire) adds
    /// exactly one, a batch of keys all held already none.
    pub fn round_trips(&self) -> u64 {
        self.round_trips.load(Ordering::Relaxed)
    }

    /// Why the session can no longer be used, if it cannot: poisoned, or its
    /// loss signalled (e.g. the server ended it).
    pub fn broken_reason(&self) -> Option<String> {
        self.holds
            .broken_reason()
            .map(str::to_string)
            .or_else(|| self.holds.signals().reason())
    }

    /// Opens a **session-fenced transaction** (`BEGIN`, one round trip) on
    /// the session's own connection, the one holding its advisory locks:
    /// write the projection's rows through it (`.execute(&mut *tx)`), save
    /// the checkpoint in it ([`PgCheckpoints::save_in`](crate::PgCheckpoints::save_in)`(&mut tx, ..)`),
    /// then [`commit`](PgTransaction::commit) (or both at once with
    /// [`commit_checkpoint`](PgTransaction::commit_checkpoint)). A leader
    /// whose backend was ended cannot commit: the commit runs on that very
    /// backend, and the session's loss signal is checked right before it
    /// (see [`PgTransaction`]). From a leadership guard:
    /// `guard.leader_session()?.transaction().await?`.
    ///
    /// While the transaction is open the session is borrowed, so no lock
    /// call can run on the connection meanwhile (a blocking
    /// [`acquire`](Session::acquire) still waiting is taken back first), and
    /// the connection is not read between the transaction's statements: a
    /// server that ends the session meanwhile is seen at the next statement
    /// or the commit, which fails. The connection is read while idle again
    /// from the session's next call on. The tables live in the database the session locks in (the one
    /// [`PgCheckpoints::connect`](crate::PgCheckpoints::connect) opens for
    /// the same options and id). Keep it short: the server's
    /// `idle_in_transaction_session_timeout`, if set for the role or
    /// database, ends the backend, and with it the session's locks.
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
    pub async fn transaction(&mut self) -> Result<PgTransaction<'_>> {
        self.ready().await?;
        self.holds.begin("begin a fenced transaction")?;
        self.sent();
        let Some(conn) = self.conn.as_mut() else {
            self.holds.end();
            return Err(self.holds.poison("the connection is closed"));
        };
        let begun = conn.begin().await;
        self.holds.end();
        match begun {
            Ok(tx) => Ok(PgTransaction::new(
                tx,
                &mut self.holds,
                self.pid,
                &self.round_trips,
            )),
            // Session-fatal errors poison the session; its next call (or
            // close) drops the connection.
            Err(e) => Err(self
                .holds
                .fail(PgError::from_query("begin a fenced transaction", e))),
        }
    }

    /// Counts one round trip on the main connection.
    fn sent(&self) {
        self.round_trips.fetch_add(1, Ordering::Relaxed);
    }

    /// Per id of `asked`, whether the server listed it (the keys a batch
    /// was granted). A list naming a key not asked, or one twice, poisons
    /// the session: what the backend holds is unknown then.
    fn listed(
        &mut self,
        operation: &str,
        asked: &[i64],
        listed: Option<Vec<i64>>,
    ) -> Result<Vec<bool>> {
        let listed = listed.unwrap_or_default();
        match sql::mark_listed(asked, &listed) {
            Some(marks) => Ok(marks),
            None => Err(self.holds.poison(format!(
                "the server's answer to {operation} ({} keys) does not match the {} keys asked",
                listed.len(),
                asked.len()
            ))),
        }
    }

    /// Per id of `asked`, whether the server did it (granted or released
    /// the key), from the keys a statement lists as **not** done (denied by
    /// a try, kept by an unlock; see [`listed`](Self::listed)).
    fn not_listed(
        &mut self,
        operation: &str,
        asked: &[i64],
        kept: Option<Vec<i64>>,
    ) -> Result<Vec<bool>> {
        let mut marks = self.listed(operation, asked, kept)?;
        marks.iter_mut().for_each(|m| *m = !*m);
        Ok(marks)
    }

    /// The connection, the wait it may be lent to and the bookkeeping, for
    /// core's steps.
    fn lent(&mut self) -> Lent<'_, AdvisoryWait> {
        Lent::new(&mut self.conn, &mut self.waiting, &mut self.holds)
    }

    /// Takes the connection back from a finished or abandoned wait.
    async fn reclaim(&mut self) {
        self.lent().reclaim().await;
    }

    /// Maps a driver error through core; a lost connection is dropped and
    /// poisons the session.
    fn fail(&mut self, err: PgError) -> Error {
        self.lent().fail(err)
    }

    /// Makes the connection ready for a round trip, or says why it cannot
    /// be: takes it back from a wait or from the idle reader.
    async fn ready(&mut self) -> Result<()> {
        if !self.take_back().await {
            // The reader saw the connection end: the loss signal says why.
            self.holds.ready()?;
        }
        self.lent().ready().await
    }

    /// Takes the connection back from a wait or from the idle reader;
    /// answers whether the session has it.
    async fn take_back(&mut self) -> bool {
        self.reclaim().await;
        if self.conn.is_none() && self.waiting.is_none() {
            self.conn = self.idle.unpark().await;
        }
        self.conn.is_some()
    }

    /// Parks the connection with the idle reader after a call, unless the
    /// session is broken (then it stays here until close or drop).
    fn park(&mut self) {
        if self.holds.is_broken() || self.holds.signals().is_lost() {
            return;
        }
        if let Some(conn) = self.conn.take() {
            self.idle.park(conn);
        }
    }

    /// The connection; only after [`ready`](Self::ready) succeeded.
    async fn conn(&mut self) -> Result<&mut PgConnection> {
        let Some(listener) = self.conn.as_mut() else {
            return Err(self.holds.poison("the connection is closed"));
        };
        // The listener's connection is open (its pool is closed, so it
        // never opens another): this answers at once.
        match listener.acquire().await {
            Ok(conn) => Ok(conn),
            Err(err) => Err(self.holds.poison(format!(
                "the session's connection is gone: {}",
                crate::error::PgCause::from(err)
            ))),
        }
    }

    /// After a failed try-acquire: a batch stops at its failing key but the
    /// keys before it stay locked, so release those of `attempted` the
    /// backend holds. Poisons the session if that is not possible.
    async fn undo_partial(&mut self, attempted: &[i64]) {
        if self.conn.is_none() || self.holds.begin("undo a failed try_acquire").is_err() {
            return;
        }
        self.sent();
        let undo = match self.conn.as_mut() {
            Some(conn) => {
                sqlx::query_scalar::<_, i64>(sql::UNLOCK_HELD_OF)
                    .bind(attempted)
                    .fetch_one(conn)
                    .await
            }
            None => return,
        };
        self.holds.end();
        match undo {
            Ok(released) => debug!(released, "released the keys a failed batch had taken"),
            Err(err) => {
                let _ = self.holds.poison(format!(
                    "a failed try-acquire may have left keys locked and releasing them failed: \
                     {}",
                    crate::error::PgCause::from(err)
                ));
            }
        }
    }

    /// Stops the idle reader and takes the connection for a final
    /// statement, unless the session is broken: then it is just dropped.
    /// Answers the connection and whether anything may be held.
    async fn take_for_close(&mut self) -> Option<(PgListener, bool)> {
        self.idle.stop();
        if self.conn.is_none() {
            self.conn = self.idle.unpark().await;
        }
        let conn = self.conn.take();
        self.close_parts(conn)
    }

    /// The connection to close and whether to unlock first; `None` when the
    /// session is broken.
    fn close_parts(&mut self, conn: Option<PgListener>) -> Option<(PgListener, bool)> {
        let conn = conn?;
        if self.holds.is_broken() {
            return None;
        }
        let unlock = !self.holds.is_empty() || self.holds.in_flight().is_some();
        self.holds.clear();
        Some((conn, unlock))
    }
}

impl ConnectionLoss for PgError {
    fn is_connection_lost(&self) -> bool {
        PgError::is_connection_lost(self)
    }
}

/// The calls of [`Session`], run between taking the connection back and
/// parking it again.
impl PgSession {
    /// [`Session::try_acquire`], with the connection taken back and not parked yet.
    async fn try_acquire_now(&mut self, keys: &[LockKey]) -> Result<Vec<bool>> {
        self.ready().await?;
        let ask = self.holds.to_acquire(keys);
        if ask.is_empty() {
            return Ok(self.holds.answer(keys));
        }
        let ids: Vec<i64> = ask.iter().map(LockKey::id).collect();
        self.holds.begin("try_acquire")?;
        self.sent();
        let conn = self.conn().await?;
        // Both answer the keys denied.
        let result = if let [id] = ids[..] {
            sqlx::query_scalar::<_, bool>(sql::TRY_ONE)
                .bind(id)
                .fetch_one(conn)
                .await
                .map(|granted| (!granted).then(|| vec![id]))
        } else {
            sqlx::query_scalar::<_, Option<Vec<i64>>>(sql::TRY_MANY)
                .bind(&ids)
                .fetch_one(conn)
                .await
        };
        self.holds.end();
        let denied = match result {
            Ok(denied) => denied,
            Err(err) => {
                let err = PgError::from_query("try_acquire", err);
                let fatal = err.is_connection_lost();
                let err = self.fail(err);
                if !fatal {
                    self.undo_partial(&ids).await;
                }
                return Err(err);
            }
        };
        let granted = self.not_listed("try_acquire", &ids, denied)?;
        self.holds.finish_acquire(keys, &ask, &granted)
    }

    /// [`Session::acquire`], with the connection taken back and not parked yet.
    async fn acquire_now(&mut self, key: &LockKey, cancel: &CancellationToken) -> Result<bool> {
        self.take_back().await;
        let (pid, side) = (self.pid, Arc::clone(&self.side));
        let lock = || AdvisoryWait::new(key.clone(), pid, side);
        Lent::new(&mut self.conn, &mut self.waiting, &mut self.holds)
            .acquire(key, lock, &self.round_trips, cancel, "PgSession::acquire")
            .await
    }

    /// [`Session::release`], with the connection taken back and not parked yet.
    async fn release_now(&mut self, key: &LockKey) -> Result<bool> {
        self.reclaim().await;
        if !self.holds.contains(key) {
            return Ok(false);
        }
        self.ready().await?;
        self.holds.begin("release")?;
        self.sent();
        let conn = self.conn().await?;
        let result = sqlx::query_scalar::<_, bool>(sql::UNLOCK)
            .bind(key.id())
            .fetch_one(conn)
            .await;
        self.holds.end();
        let released = result.map_err(|e| self.fail(PgError::from_query("release", e)))?;
        let _ = self.holds.remove(key);
        if !released {
            warn!(key = %key, pid = self.pid, "the server did not show a key this session held");
        }
        Ok(released)
    }

    /// [`Session::release_many`], with the connection taken back and not parked yet.
    async fn release_many_now(&mut self, keys: &[LockKey]) -> Result<Vec<bool>> {
        self.reclaim().await;
        let ask = self.holds.to_release(keys);
        if ask.is_empty() {
            return Ok(vec![false; keys.len()]);
        }
        self.ready().await?;
        let ids: Vec<i64> = ask.iter().map(LockKey::id).collect();
        self.holds.begin("release_many")?;
        self.sent();
        let conn = self.conn().await?;
        let result = sqlx::query_scalar::<_, Option<Vec<i64>>>(sql::UNLOCK_MANY)
            .bind(&ids)
            .fetch_one(conn)
            .await;
        self.holds.end();
        let kept = result.map_err(|e| self.fail(PgError::from_query("release_many", e)))?;
        let released = self.not_listed("release_many", &ids, kept)?;
        Ok(self.holds.record_released(keys, &ask, &released))
    }

    /// [`Session::release_announced`], with the connection taken back and not parked yet.
    async fn release_announced_now(
        &mut self,
        keys: &[LockKey],
        clean: &[bool],
    ) -> Result<Vec<bool>> {
        self.reclaim().await;
        let ask = self.holds.to_release(keys);
        if ask.is_empty() {
            return Ok(vec![false; keys.len()]);
        }
        self.ready().await?;
        let ids: Vec<i64> = ask.iter().map(LockKey::id).collect();
        let marks = clean_marks(keys, clean, &ids);
        self.holds.begin("release_announced")?;
        self.sent();
        let conn = self.conn().await?;
        let result = sqlx::query_as::<_, (Option<Vec<i64>>, i64)>(sql::RELEASE_ANNOUNCED)
            .bind(&ids)
            .bind(&marks)
            .fetch_one(conn)
            .await;
        self.holds.end();
        let (kept, notifications) =
            result.map_err(|e| self.fail(PgError::from_query("release_announced", e)))?;
        let released = self.not_listed("release_announced", &ids, kept)?;
        debug!(
            pid = self.pid,
            keys = ids.len(),
            clean = marks.iter().filter(|c| **c).count(),
            notifications,
            "released and announced"
        );
        Ok(self.holds.record_released(keys, &ask, &released))
    }

    /// [`Session::probe`], with the connection taken back and not parked yet.
    async fn probe_now(&mut self, keys: &[LockKey]) -> Result<Vec<bool>> {
        self.ready().await?;
        let ask = self.holds.to_acquire(keys);
        if ask.is_empty() {
            return Ok(vec![false; keys.len()]);
        }
        let ids: Vec<i64> = ask.iter().map(LockKey::id).collect();
        self.holds.begin("probe")?;
        self.sent();
        let conn = self.conn().await?;
        let result = sqlx::query_scalar::<_, Vec<bool>>(sql::PROBE)
            .bind(&ids)
            .fetch_one(conn)
            .await;
        self.holds.end();
        let held = result.map_err(|e| self.fail(PgError::from_query("probe", e)))?;
        if held.len() != ids.len() {
            return Err(self.fail(PgError::Query {
                operation: "probe",
                source: sqlx::Error::Protocol(format!(
                    "the server answered {} of {} probed keys",
                    held.len(),
                    ids.len()
                ))
                .into(),
            }));
        }
        let by_id: HashMap<i64, bool> = ids.into_iter().zip(held).collect();
        Ok(keys
            .iter()
            .map(|key| by_id.get(&key.id()).copied().unwrap_or(false))
            .collect())
    }

    /// [`Session::release_all`], with the connection taken back and not parked yet.
    async fn release_all_now(&mut self) -> Result<()> {
        self.reclaim().await;
        if self.holds.is_empty() && self.holds.in_flight().is_none() {
            return Ok(());
        }
        self.ready().await?;
        // The ids alone: no clone of the held keys.
        let ids: Vec<i64> = self.holds.keys().map(LockKey::id).collect();
        if ids.is_empty() {
            return Ok(());
        }
        self.holds.begin("release_all")?;
        self.sent();
        let conn = self.conn().await?;
        let result = sqlx::query_scalar::<_, Option<Vec<i64>>>(sql::UNLOCK_MANY)
            .bind(&ids)
            .fetch_one(conn)
            .await;
        self.holds.end();
        let kept = result.map_err(|e| self.fail(PgError::from_query("release_all", e)))?;
        if let Some(kept) = kept {
            warn!(
                pid = self.pid,
                keys = kept.len(),
                "the server did not show every key this session held"
            );
        }
        self.holds.clear();
        Ok(())
    }

    /// [`Session::verify`], with the connection taken back and not parked yet.
    async fn verify_now(&mut self) -> Result<()> {
        self.ready().await?;
        let full = self
            .last_lock_check
            .is_none_or(|at| at.elapsed() >= self.lock_check_interval);
        if !full {
            // The same live process still holds every key (see
            // `PgOptions::lock_check_interval`).
            self.holds.begin("verify")?;
            self.sent();
            let conn = self.conn().await?;
            let result = sqlx::query_scalar::<_, i32>(sql::VERIFY_PROCESS)
                .fetch_one(conn)
                .await;
            self.holds.end();
            let pid = result.map_err(|e| self.fail(PgError::from_query("verify", e)))?;
            return self.same_process(pid);
        }
        let started = Instant::now();
        let ids: Vec<i64> = self.holds.keys().map(LockKey::id).collect();
        self.holds.begin("verify")?;
        self.sent();
        let conn = self.conn().await?;
        let result = sqlx::query_as::<_, (i32, Vec<i64>)>(sql::VERIFY)
            .bind(&ids)
            .fetch_one(conn)
            .await;
        self.holds.end();
        let (pid, missing) = result.map_err(|e| self.fail(PgError::from_query("verify", e)))?;
        self.same_process(pid)?;
        if !missing.is_empty() {
            let names: Vec<&str> = missing
                .iter()
                .filter_map(|id| self.holds.get(*id).map(LockKey::name))
                .collect();
            let reason = format!(
                "PostgreSQL no longer shows {} of the session's {} locks: {names:?}",
                missing.len(),
                self.holds.len()
            );
            return Err(self.holds.poison(reason));
        }
        self.last_lock_check = Some(started);
        Ok(())
    }
}

impl Session for PgSession {
    /// Held keys, trust and the loss signal; `lost` fires when the idle
    /// reader sees the connection end (within
    /// [`LOSS_DETECTION_BOUND`](crate::LOSS_DETECTION_BOUND) of
    /// `pg_terminate_backend` on a healthy network) or fail, when a call
    /// finds it gone, or when the session is poisoned.
    fn holds(&self) -> &Holds {
        &self.holds
    }

    /// `pg_try_advisory_lock` for every key not held yet, deduplicated, in
    /// one statement (`unnest($1::bigint[])`, answering the keys granted, no
    /// sort on the server); held keys
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
    /// which keys it holds and is poisoned (the next call, e.g.
    /// [`verify`](Session::verify), fails, and the loss signal fires).
    async fn try_acquire(&mut self, keys: &[LockKey]) -> Result<Vec<bool>> {
        let answer = self.try_acquire_now(keys).await;
        self.park();
        answer
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
        let answer = self.acquire_now(key, cancel).await;
        self.park();
        answer
    }

    /// `pg_advisory_unlock` for a held key; a key not held answers `false`
    /// without a round trip (never an error, even on a lost session).
    ///
    /// # Cancel safety
    ///
    /// Not cancel-safe: dropped mid-round-trip, the session is poisoned.
    async fn release(&mut self, key: &LockKey) -> Result<bool> {
        let answer = self.release_now(key).await;
        self.park();
        answer
    }

    /// One statement for every held key of `keys` (`unnest` +
    /// `pg_advisory_unlock`); keys not held answer `false` without being sent.
    ///
    /// # Cancel safety
    ///
    /// Not cancel-safe: dropped mid-round-trip, the session is poisoned.
    async fn release_many(&mut self, keys: &[LockKey]) -> Result<Vec<bool>> {
        let answer = self.release_many_now(keys).await;
        self.park();
        answer
    }

    /// Like [`release_many`](Session::release_many) (one statement for the
    /// held keys of `keys`, none when none is held), and in the **same
    /// statement** `pg_notify` on [`RELEASE_CHANNEL`](crate::RELEASE_CHANNEL)
    /// for the keys the server actually released, so every other session of
    /// the database hears of it through its
    /// [`ReleaseHints`](shardlock_core::ReleaseHints) (its connection
    /// listens on the channel). The notifications are delivered
    /// when the statement commits, after the unlocks: a listener that hears
    /// one finds the keys free. A release of nothing sends nothing.
    ///
    /// A key counts as handed over cleanly only when every appearance of it
    /// in `keys` is marked clean in `clean` (a missing mark is not clean).
    ///
    /// # Cancel safety
    ///
    /// Not cancel-safe: dropped mid-round-trip, the session is poisoned.
    async fn release_announced(&mut self, keys: &[LockKey], clean: &[bool]) -> Result<Vec<bool>> {
        let answer = self.release_announced_now(keys, clean).await;
        self.park();
        answer
    }

    /// One statement and one read of `pg_locks`, taking no lock: per key,
    /// whether a backend other than this session's holds its `bigint`
    /// advisory lock in this database. Keys this session holds answer
    /// `false` and are not sent; a probe of only such keys sends nothing.
    ///
    /// # Cancel safety
    ///
    /// Nothing is locked, but dropped mid-round-trip the session is
    /// poisoned like after any interrupted round trip.
    async fn probe(&mut self, keys: &[LockKey]) -> Result<Vec<bool>> {
        let answer = self.probe_now(keys).await;
        self.park();
        answer
    }

    /// Releases every held key in one statement (the `release_many`
    /// statement), or sends nothing when no key is held.
    ///
    /// # Cancel safety
    ///
    /// Not cancel-safe: dropped mid-round-trip, the session is poisoned.
    async fn release_all(&mut self) -> Result<()> {
        let answer = self.release_all_now().await;
        self.park();
        answer
    }

    /// One statement: the backend pid (unchanged, or a proxy moved the
    /// connection). On the first verify, and then at most every
    /// [`PgOptions::lock_check_interval`](crate::PgOptions::lock_check_interval),
    /// the same statement also reads `pg_locks` for the held keys it no
    /// longer shows granted to this backend. A session lock is freed only by
    /// its own backend, so the same live backend still holds every key
    /// unless a statement sent behind the session's back unlocked one.
    ///
    /// # Errors
    ///
    /// [`Error::SessionLost`] when the loss signal fired, the connection is
    /// gone, the backend changed, or a key is missing; the session is then
    /// poisoned.
    ///
    /// # Cancel safety
    ///
    /// Not cancel-safe: dropped mid-round-trip (e.g. by the coordinator's
    /// deadline), the session is poisoned.
    async fn verify(&mut self) -> Result<()> {
        let answer = self.verify_now().await;
        self.park();
        answer
    }

    /// Stops the idle reader first (a graceful close never fires the loss
    /// signal), then `pg_advisory_unlock_all()` if anything is held, then a
    /// graceful close (in the background). A broken session's connection
    /// is just dropped: the server frees its locks when it notices.
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: dropped midway, the connection is dropped and the server
    /// ends the session, freeing its locks.
    async fn close(mut self) -> Result<()> {
        self.reclaim().await;
        let Some((mut conn, unlock)) = self.take_for_close().await else {
            return Ok(());
        };
        if unlock {
            self.sent();
            if let Err(err) = conn.execute(sql::UNLOCK_ALL).await {
                return Err(Error::from_driver(
                    self.holds.database(),
                    PgError::from_query("close", err),
                ));
            }
        }
        // Dropped, the listener closes its connection in a task (its pool is
        // closed, so the connection is not kept).
        drop(conn);
        Ok(())
    }
}

/// Per id in `ids`, whether every appearance of its key in `keys` is marked
/// clean (see [`shardlock_core::clean_ids`]).
fn clean_marks(keys: &[LockKey], clean: &[bool], ids: &[i64]) -> Vec<bool> {
    let marked = shardlock_core::clean_ids(keys, clean);
    ids.iter().map(|id| marked.contains(id)).collect()
}

impl Drop for PgSession {
    fn drop(&mut self) {
        // A connection the reader holds right now goes back to the slot
        // and is dropped with it, in the reader's task: its socket closes
        // and the server frees the session's locks.
        self.idle.stop();
        let conn = self.conn.take().or_else(|| self.idle.take_parked());
        match Handle::try_current() {
            Ok(handle) => {
                let Some((conn, unlock)) = self.close_parts(conn) else {
                    return;
                };
                let database = self.holds.database().clone();
                let _task = handle.spawn(close_in_background(conn, unlock, database));
            }
            Err(_) => {
                if let Some(conn) = conn {
                    drop_without_runtime(conn);
                }
            }
        }
    }
}

async fn close_in_background(mut conn: PgListener, unlock: bool, database: DatabaseId) {
    if unlock {
        let unlocking = conn.execute(sql::UNLOCK_ALL);
        match tokio::time::timeout(DROP_CLOSE_TIMEOUT, unlocking).await {
            Ok(Ok(_)) => {}
            Ok(Err(err)) => {
                debug!(%database, error = %err, "unlock on drop failed; dropping the connection");
            }
            Err(_) => debug!(%database, "unlock on drop timed out; dropping the connection"),
        }
    }
    // The listener closes its connection in a task of its own.
    drop(conn);
}

/// Drops the connection where no runtime exists (the session outlived its
/// runtime): sqlx closes a listener's connection in a task, so a
/// current-thread runtime is entered for the drop; its socket closes, and
/// the server frees the session's locks. If not even that runtime can be
/// built, the connection is leaked rather than panicking in `drop`.
fn drop_without_runtime(conn: PgListener) {
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => {
            let entered = runtime.enter();
            drop(conn);
            drop(entered);
            // Dropping the runtime drops the closing task, and with it the
            // connection.
            drop(runtime);
        }
        Err(err) => {
            warn!(error = %err, "no runtime to close a dropped session's connection in: it stays open until the process ends");
            std::mem::forget(conn);
        }
    }
}

impl fmt::Debug for PgSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgSession")
            .field("backend_pid", &self.pid)
            .field("idle", &self.idle)
            .field("holds", &self.holds)
            .field("waiting", &self.waiting.is_some())
            .field("round_trips", &self.round_trips())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_marks_need_every_appearance_clean() {
        let k: Vec<LockKey> = (0..4)
            .map(|i| LockKey::new(format!("marks-{i}")).unwrap())
            .collect();
        let keys = [
            k[0].clone(),
            k[1].clone(),
            k[0].clone(),
            k[2].clone(),
            k[3].clone(),
        ];
        let ids: Vec<i64> = k.iter().map(LockKey::id).collect();
        // k0 clean then not clean; k1 clean; k2 not; k3 has no mark.
        let marks = clean_marks(&keys, &[true, true, false, false], &ids);
        assert_eq!(marks, vec![false, true, false, false]);
        let marks = clean_marks(&keys, &[true, true, true, true, true], &ids);
        assert_eq!(marks, vec![true; 4]);
    }
}
