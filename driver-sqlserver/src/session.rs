//! A lock session: one dedicated TDS connection to one database, holding
//! session-owned application locks.

use std::collections::HashSet;
use std::fmt;
use std::pin::pin;

use shardlock_core::{CancellationToken, DatabaseId, Error, Holds, LockKey, Result, Session};
use tracing::debug;

use crate::connection::{Connection, Op, Reply};
use crate::error::{map_get_code, map_release_code, MssqlError, ReleaseOutcome};
use crate::fenced::MssqlTransaction;
use crate::sql::resource_name;

/// A session on SQL Server: one dedicated connection in one database, whose
/// application locks are owned by the server session
/// (`sp_getapplock … @LockOwner = 'Session'`).
///
/// Opened by [`MssqlDriver`](crate::MssqlDriver) (through
/// [`Driver::connect`](shardlock_core::Driver::connect)). SQL Server stacks
/// application locks (a lock taken twice needs two releases), so the session
/// tracks what it holds (in core's [`Holds`]) and never asks the server for a
/// key it already holds.
///
/// Its [`signals`](Session::signals) fire as soon as the connection ends,
/// between requests too (see the crate docs, "Loss signal"); from then on
/// every call answers [`Error::SessionLost`].
///
/// # Cancel safety and poisoning
///
/// Every request is finished by the connection's task even when the
/// session's future is dropped, and the grants of an abandoned request are
/// released before the next request runs (see the crate docs, "Dropped
/// futures and the connection task"), so no lock is ever left behind.
/// `try_acquire` still follows the contract of
/// [`Session::try_acquire`]: a future dropped mid-round-trip poisons the
/// session ([`Holds::begin`]/[`Holds::end`]), which fires its loss signal;
/// the coordinator then replaces it. `acquire`, `release` and `verify` are
/// cancel-safe and leave the session usable ([`Holds::ready`] only refuses
/// a lost or poisoned session).
///
/// # Drop
///
/// Dropping the session never blocks and needs no particular runtime: it
/// tells the connection's task to close the connection (abandoning any request
/// in flight), and the server frees every lock of the session when its
/// connection closes. If the runtime that opened the session is gone, the
/// connection was already closed with it. The locks are free once the server
/// has processed the disconnect, not at the moment `drop` returns; use
/// [`close`](Session::close) for an acknowledged release. Neither a drop nor
/// a `close` fires the loss signal.
pub struct MssqlSession {
    conn: Connection,
    holds: Holds,
    slice_ms: i32,
}

impl MssqlSession {
    pub(crate) fn new(conn: Connection, database: DatabaseId, slice_ms: i32) -> Self {
        let holds = Holds::with_signals(database, conn.signals());
        Self {
            conn,
            holds,
            slice_ms,
        }
    }

    /// The server's id of this session (`@@SPID`, read at connect), e.g. for
    /// `KILL` or `sys.dm_tran_locks.request_session_id`.
    pub fn spid(&self) -> i32 {
        self.conn.info().spid
    }

    /// The server's product version (`SERVERPROPERTY('ProductVersion')`).
    pub fn server_version(&self) -> &str {
        &self.conn.info().product_version
    }

    /// The database the session is in on the server (`DB_NAME()`), where its
    /// application locks live.
    pub fn database_name(&self) -> &str {
        &self.conn.info().database
    }

    /// The resource name under which `key` is locked on the server (see
    /// [`resource_name`](crate::resource_name)).
    pub fn resource_name(key: &LockKey) -> String {
        resource_name(key)
    }

    /// Opens a **session-fenced transaction** (`SET XACT_ABORT ON; BEGIN
    /// TRANSACTION`, one round trip) on the session's own connection, the
    /// one whose server session owns its application locks: write the
    /// projection's rows through it ([`MssqlTransaction::execute`]), save the
    /// checkpoint in it
    /// ([`MssqlCheckpoints::save_in`](crate::MssqlCheckpoints::save_in)`(&mut tx, ..)`),
    /// then [`commit`](MssqlTransaction::commit) (or both at once with
    /// [`commit_checkpoint`](MssqlTransaction::commit_checkpoint)). A leader
    /// whose session was killed cannot commit: `KILL` rolls the open
    /// transaction back before the session ends and frees its locks, and the
    /// commit runs on that very session, after the loss signal is checked
    /// (see the [`fenced`](crate::MssqlTransaction) docs). From a leadership
    /// guard: `guard.leader_session()?.transaction().await?`.
    ///
    /// While the transaction is open the session is borrowed, so no lock
    /// call runs on the connection meanwhile. The tables live in the
    /// database the session locks in (the one
    /// [`MssqlCheckpoints::connect`](crate::MssqlCheckpoints::connect) opens
    /// for the same options and id). Keep it short: its row locks block the
    /// next leader's claim of the same subscription until it ends.
    ///
    /// # Errors
    ///
    /// [`Error::SessionLost`] when the session is lost or poisoned (nothing
    /// is sent) or the connection fails at `BEGIN` (then it is poisoned);
    /// [`Error::Driver`] when the server refused to begin (a transaction was
    /// already open on the connection; it is rolled back).
    ///
    /// # Cancel safety
    ///
    /// Not cancel-safe: dropped while `BEGIN` is in flight, the session is
    /// poisoned at its next call (and dropping it closes the connection,
    /// which rolls back).
    pub async fn transaction(&mut self) -> Result<MssqlTransaction<'_>> {
        self.holds.begin("begin a fenced transaction")?;
        let answer = self.conn.call(Op::Begin).await;
        self.holds.end();
        match answer {
            Ok(Reply::Done) => {
                let spid = self.spid();
                Ok(MssqlTransaction::new(&self.conn, &mut self.holds, spid))
            }
            Ok(other) => Err(self.unexpected("begin a fenced transaction", &other)),
            Err(e) => {
                if !e.is_connection_lost() {
                    // Whatever was open is rolled back before the next call.
                    self.conn.send_detached(Op::Rollback);
                }
                Err(self.fail(e))
            }
        }
    }

    /// How many batches this session has sent to the server since it opened
    /// (the connect-time checks not included), for tests and metrics: each
    /// batch is one round trip, so a `try_acquire` of any number of keys adds
    /// one on SQL Server 2016+ (see the crate docs for the
    /// parameter-per-name fallback). Releases of abandoned grants count too.
    /// The count includes a request once its answer has arrived.
    pub fn round_trips(&self) -> u64 {
        self.conn.round_trips()
    }

    /// Maps a driver error; a session-fatal one poisons the session.
    fn fail(&mut self, e: MssqlError) -> Error {
        self.holds.fail(e)
    }

    /// Poisons the session because of `e`, whatever its kind, and answers
    /// [`Error::SessionLost`] with `e` as the source.
    fn lost_because(&mut self, e: MssqlError) -> Error {
        let _ = self.holds.poison(e.to_string());
        Error::SessionLost {
            database: self.holds.database().clone(),
            reason: String::new(),
            source: Some(Box::new(e)),
        }
    }

    fn unexpected(&mut self, operation: &'static str, reply: &Reply) -> Error {
        self.fail(MssqlError::UnexpectedResult {
            operation,
            detail: format!("answered {reply:?}"),
        })
    }

    /// Releases `resources` (already forgotten by the session) and checks
    /// the answer.
    async fn release_untracked(&mut self, resources: Vec<String>) -> Result<()> {
        match self.conn.call(Op::Release(resources.clone())).await {
            Ok(Reply::Released(codes)) => self.check_released(&resources, &codes),
            Ok(other) => Err(self.unexpected("release", &other)),
            Err(e) => Err(self.fail(e)),
        }
    }

    fn check_released(&mut self, resources: &[String], codes: &[i32]) -> Result<()> {
        if codes.len() != resources.len() {
            return Err(self.fail(MssqlError::UnexpectedResult {
                operation: "release",
                detail: format!("{} codes for {} names", codes.len(), resources.len()),
            }));
        }
        let mut not_held = Vec::new();
        for (resource, code) in resources.iter().zip(codes) {
            match map_release_code(*code) {
                ReleaseOutcome::Released => {}
                ReleaseOutcome::NotHeld => not_held.push(resource.as_str()),
                ReleaseOutcome::Failed(failure) => {
                    return Err(self.fail(MssqlError::Release {
                        resource: resource.clone(),
                        failure,
                    }))
                }
            }
        }
        if not_held.is_empty() {
            Ok(())
        } else {
            let reason = format!(
                "the server no longer showed {} of the session's locks when releasing: {not_held:?}",
                not_held.len()
            );
            Err(self.holds.poison(reason))
        }
    }
}

impl Session for MssqlSession {
    /// Held keys, trust and the loss signal; `lost` fires when the server ends the
    /// connection (within [`MssqlOptions::loss_signal_bound`](crate::MssqlOptions::loss_signal_bound)
    /// of its FIN or RST arriving), when a request leaves the connection or
    /// its locks unknown, or when the session is poisoned. No release hint.
    fn holds(&self) -> &Holds {
        &self.holds
    }

    /// Takes every key that is free, in one round trip (one batch of
    /// `sp_getapplock … @LockTimeout = 0`; see the crate docs for the
    /// parameter-per-name fallback, which takes `ceil(n / 2000)` round trips).
    ///
    /// Keys already held, and repeated keys, are not sent to the server twice.
    ///
    /// # Cancel safety
    ///
    /// No lock is left behind: if the future is dropped, the connection's
    /// task still finishes the batch and releases whatever it granted before
    /// running anything else. But, as the contract wants, a future dropped
    /// while its batch is in flight poisons the session: the next call
    /// answers [`Error::SessionLost`] and the loss signal fires.
    ///
    /// # Errors
    ///
    /// [`Error::SessionLost`] when the connection is gone or the batch failed
    /// on the server (the driver then closes the connection: the lock state is
    /// unknown). [`Error::Driver`] with [`MssqlError::LockRequest`] when
    /// `sp_getapplock` answered a failure code for a key; the keys granted in
    /// the same batch stay held and are tracked.
    async fn try_acquire(&mut self, keys: &[LockKey]) -> Result<Vec<bool>> {
        let ask = self.holds.pending(keys)?;
        if !ask.is_empty() {
            let resources: Vec<String> = ask.iter().map(resource_name).collect();
            self.holds.begin("try_acquire")?;
            let answer = self.conn.call(Op::TryAcquire(resources.clone())).await;
            self.holds.end();
            let (codes, grants) = match answer {
                Ok(Reply::Acquired { codes, grants }) => (codes, grants),
                Ok(other) => return Err(self.unexpected("try_acquire", &other)),
                Err(e) => return Err(self.fail(e)),
            };
            // From here on no await: the grants are recorded or undone.
            let granted: HashSet<String> = grants.accept().into_iter().collect();
            let answers: Vec<bool> = resources.iter().map(|r| granted.contains(r)).collect();
            self.holds.record_acquired(&ask, &answers)?;
            let failure = resources
                .into_iter()
                .zip(codes)
                .find_map(|(resource, code)| {
                    map_get_code(code)
                        .err()
                        .map(|failure| MssqlError::LockRequest { resource, failure })
                });
            if let Some(e) = failure {
                return Err(self.fail(e));
            }
        }
        Ok(self.holds.answer(keys))
    }

    /// Waits for `key` server-side: `sp_getapplock` with `@LockTimeout` set
    /// to the acquire slice (default 1 s), repeated until granted or
    /// cancelled. A release by the holder grants the lock to the waiting
    /// request at once; the slices only bound how late a cancellation is
    /// seen (one request per slice while waiting).
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe. When `cancel` fires during a slice, the slice cannot be
    /// interrupted (tiberius offers no request cancel the driver relies on),
    /// so `acquire` waits for it to end (at most one slice); if it granted the
    /// lock, the lock is released before `acquire` answers `false`. If the
    /// future is dropped instead, the connection's task finishes the slice
    /// and releases a grant before running anything else.
    ///
    /// # Errors
    ///
    /// As [`try_acquire`](Self::try_acquire); a deadlock victim (-3) is
    /// [`MssqlError::LockRequest`] with
    /// [`AppLockFailure::DeadlockVictim`](crate::AppLockFailure::DeadlockVictim).
    async fn acquire(&mut self, key: &LockKey, cancel: &CancellationToken) -> Result<bool> {
        if self.holds.holding(key)? {
            return Ok(true);
        }
        let resource = resource_name(key);
        loop {
            if cancel.is_cancelled() {
                return Ok(false);
            }
            self.holds.ready()?;
            let (answer, cancelled) = {
                let mut call = pin!(self.conn.call(Op::AcquireSlice {
                    resource: resource.clone(),
                    timeout_ms: self.slice_ms,
                }));
                let first = tokio::select! {
                    biased;
                    answer = call.as_mut() => Some(answer),
                    () = cancel.cancelled() => None,
                };
                match first {
                    Some(answer) => (answer, false),
                    // The slice runs to its end on the server.
                    None => (call.await, true),
                }
            };
            let (codes, grants) = match answer {
                Ok(Reply::Acquired { codes, grants }) => (codes, grants),
                Ok(other) => return Err(self.unexpected("acquire", &other)),
                Err(e) => return Err(self.fail(e)),
            };
            let granted = grants.accept();
            let Some(code) = codes.first().copied() else {
                return Err(self.fail(MssqlError::UnexpectedResult {
                    operation: "acquire",
                    detail: "no return code".to_string(),
                }));
            };
            match map_get_code(code) {
                Ok(true) if cancelled => {
                    debug!(key = %key, "granted as the wait was cancelled: releasing");
                    self.release_untracked(granted).await?;
                    return Ok(false);
                }
                Ok(true) => {
                    self.holds.insert(key.clone());
                    return Ok(true);
                }
                Ok(false) if cancelled => return Ok(false),
                Ok(false) => {}
                Err(failure) => {
                    return Err(self.fail(MssqlError::LockRequest { resource, failure }));
                }
            }
        }
    }

    /// Releases `key` with `sp_releaseapplock … @LockOwner = 'Session'`, or
    /// answers `false` without a round trip when this session does not hold
    /// it (the procedure raises an error for a lock not held).
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: the session forgets the key before the request is sent,
    /// and the connection's task finishes the release even if the future is
    /// dropped.
    ///
    /// # Errors
    ///
    /// [`Error::SessionLost`] when the connection is gone, or when the server
    /// no longer showed the lock as held by this session.
    async fn release(&mut self, key: &LockKey) -> Result<bool> {
        self.holds.ready()?;
        if !self.holds.remove(key) {
            return Ok(false);
        }
        self.release_untracked(vec![resource_name(key)]).await?;
        Ok(true)
    }

    /// Releases the held keys among `keys` in one batch (keys not held, and
    /// repeats, answer `false` without being sent).
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe, as [`release`](Self::release).
    ///
    /// # Errors
    ///
    /// As [`release`](Self::release).
    async fn release_many(&mut self, keys: &[LockKey]) -> Result<Vec<bool>> {
        self.holds.ready()?;
        let asked = self.holds.to_release(keys);
        // Forgotten before the request is sent (cancel safety); a key the
        // server turns out not to hold makes the whole call an error.
        let answers = self
            .holds
            .record_released(keys, &asked, &vec![true; asked.len()]);
        if !asked.is_empty() {
            self.release_untracked(asked.iter().map(resource_name).collect())
                .await?;
        }
        Ok(answers)
    }

    /// Releases every held key in one batch.
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe, as [`release`](Self::release).
    async fn release_all(&mut self) -> Result<()> {
        self.holds.ready()?;
        if self.holds.is_empty() {
            return Ok(());
        }
        let resources: Vec<String> = self.holds.keys().map(resource_name).collect();
        self.holds.clear();
        self.release_untracked(resources).await
    }

    /// One batch: `APPLOCK_MODE('public', @Resource, 'Session')` of every
    /// held key must be `Exclusive`, and `@@SPID` must still be the session's
    /// (a proxy that swaps server sessions would break session locks). A
    /// session that holds nothing sends `SELECT @@SPID`.
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: it changes nothing. A coordinator that gives up waiting
    /// (self-fencing) should drop the session, which closes the connection.
    ///
    /// # Errors
    ///
    /// [`Error::SessionLost`] for any failure: the loss was signalled, the
    /// connection is gone, the query failed, a key is no longer held, or the
    /// server session changed.
    async fn verify(&mut self) -> Result<()> {
        self.holds.ready()?;
        let keys = self.holds.held();
        let resources: Vec<String> = keys.iter().map(resource_name).collect();
        let (spid, modes) = match self.conn.call(Op::Verify(resources)).await {
            Ok(Reply::Verified { spid, modes }) => (spid, modes),
            Ok(other) => return Err(self.unexpected("verify", &other)),
            Err(e) => return Err(self.lost_because(e)),
        };
        if spid != self.spid() {
            let reason = format!(
                "the server session changed from spid {} to {spid}: is a proxy or pooler between the driver and SQL Server?",
                self.spid()
            );
            return Err(self.holds.poison(reason));
        }
        let missing: Vec<&str> = keys
            .iter()
            .zip(&modes)
            .filter(|(_, mode)| mode.as_str() != "Exclusive")
            .map(|(key, _)| key.name())
            .collect();
        if modes.len() != keys.len() || !missing.is_empty() {
            let reason = format!(
                "the server no longer shows {} of the session's {} locks: {missing:?}",
                missing.len().max(keys.len().abs_diff(modes.len())),
                keys.len()
            );
            return Err(self.holds.poison(reason));
        }
        Ok(())
    }

    /// Releases every held key (one batch), then closes the connection. A
    /// session already lost closes without error: the server has freed, or
    /// will free, its locks. Closing does not fire the loss signal.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future drops the session: the connection closes and the
    /// server frees its locks (see [Drop](MssqlSession#drop)).
    async fn close(mut self) -> Result<()> {
        if self.holds.ready().is_err() {
            return Ok(());
        }
        let resources: Vec<String> = self.holds.keys().map(resource_name).collect();
        self.holds.clear();
        match self.conn.call(Op::Close(resources)).await {
            Ok(Reply::Closed) => Ok(()),
            Ok(other) => Err(self.unexpected("close", &other)),
            // The connection is gone: its locks are freed with it.
            Err(e) if e.is_connection_lost() => Ok(()),
            Err(e) => Err(self.fail(e)),
        }
    }
}

impl fmt::Debug for MssqlSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MssqlSession")
            .field("spid", &self.spid())
            .field("holds", &self.holds)
            .field("round_trips", &self.round_trips())
            .finish()
    }
}
