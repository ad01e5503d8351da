//! The async face of a session: commands to its worker thread.

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use shardlock_core::{
    CancellationToken, DatabaseId, Holds, LockKey, Result, Session, SessionSignals,
};
use tokio::sync::oneshot;

use crate::error::SqliteError;
use crate::fenced::Fence;
use crate::layout;
use crate::worker::{Command, ReleaseTicket, Reply};

/// A session on a lock directory: a worker thread holding one SQLite write
/// transaction per key.
///
/// Its bookkeeping (held keys, trust, loss signal) is core's [`Holds`]; the
/// worker thread keeps the open lock files and fires the same loss signal
/// when the session's liveness file disappears (see the crate docs for the
/// detection bound).
///
/// Dropping it never blocks: the worker sees its channel close, rolls every
/// transaction back (freeing the locks) and exits. If the process dies, the
/// operating system frees the file locks.
///
/// # Drop, then take the key again at once
///
/// The worker frees a dropped session's keys just after `drop` returns.
/// So that another session **of this process** asking for one of them at
/// once is not refused, `drop` records the keys as being released
/// (before it returns) and a worker about to try such a key first waits,
/// on its own thread, until that release is done (microseconds; at most
/// one second when the dropped session's worker is busy, after which the
/// attempt goes ahead). Sessions of other processes are not told: for
/// them a dropped session's keys come free within the same microseconds,
/// but an attempt in between is refused, as with any holder. `close` and
/// `release` answer only once the keys are free.
pub struct SqliteSession {
    commands: mpsc::Sender<Command>,
    name: String,
    liveness: PathBuf,
    holds: Holds,
    /// Commands sent to the worker that expect an answer.
    round_trips: u64,
}

impl SqliteSession {
    pub(crate) fn new(
        commands: mpsc::Sender<Command>,
        database: DatabaseId,
        name: String,
        liveness: PathBuf,
        signals: SessionSignals,
    ) -> Self {
        Self {
            commands,
            name,
            liveness,
            holds: Holds::with_signals(database, signals),
            round_trips: 0,
        }
    }

    /// The session's liveness file. Deleting it ends the session as an
    /// operator would: its loss signal fires and its locks are freed within
    /// the detection bound, and its next call fails (Unix only: see the
    /// crate docs).
    pub fn liveness_file(&self) -> &Path {
        &self.liveness
    }

    /// The session's name in the lock directory (its liveness file is
    /// `<database>/sessions/<name>.lock`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// How many round trips this session made: calls that reached its
    /// worker thread (one per batch, `acquire`, release, verify or close;
    /// none for keys already known held). For tests and metrics.
    pub fn round_trips(&self) -> u64 {
        self.round_trips
    }

    /// The handle a session-fenced commit pins the worker with (see
    /// `fenced.rs`), once the session is sound and holds `key`.
    pub(crate) fn fence(&mut self, key: &LockKey) -> Result<Fence> {
        self.holds.ready()?;
        if !self.holds.contains(key) {
            return Err(shardlock_core::Error::session_lost(
                self.holds.database(),
                format!("the session does not hold {key}: a fenced commit needs the lock held"),
            ));
        }
        self.round_trips += 1;
        Ok(Fence::new(
            self.commands.clone(),
            key.clone(),
            self.holds.signals(),
        ))
    }

    /// Maps a worker's error through [`Holds::fail`] (a session-fatal one
    /// poisons the session).
    pub(crate) fn fail(&mut self, err: SqliteError) -> shardlock_core::Error {
        self.holds.fail(err)
    }

    /// Sends one command to the worker and waits for its answer. Errors are
    /// mapped once, through [`Holds::fail`] (a session-fatal one poisons the
    /// session).
    async fn call<T>(&mut self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T> {
        let (tx, rx) = oneshot::channel();
        if self.commands.send(make(tx)).is_err() {
            return Err(self.holds.fail(SqliteError::WorkerGone));
        }
        self.round_trips += 1;
        match rx.await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(e)) => Err(self.holds.fail(e)),
            Err(_) => Err(self.holds.fail(SqliteError::WorkerGone)),
        }
    }

    /// One round trip named `op` through [`Holds::begin`]/[`Holds::end`]: a
    /// future dropped in between poisons the session at its next call.
    async fn round_trip<T>(
        &mut self,
        op: &'static str,
        make: impl FnOnce(Reply<T>) -> Command,
    ) -> Result<T> {
        self.holds.begin(op)?;
        let result = self.call(make).await;
        self.holds.end();
        result
    }
}

/// Tells the worker to give a key back if the `acquire` waiting for it is
/// dropped before it read its answer (the grant may be on its way).
struct AbandonOnDrop<'a> {
    commands: &'a mpsc::Sender<Command>,
    key: Option<LockKey>,
}

impl Drop for AbandonOnDrop<'_> {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            // Never blocks: an unbounded channel. Commands are served in
            // order, so this follows the acquire it abandons.
            let _ = self.commands.send(Command::Abandon(key));
        }
    }
}

impl Session for SqliteSession {
    fn holds(&self) -> &Holds {
        &self.holds
    }

    /// Takes each free key's file lock; one worker call for the keys not
    /// held yet (none when all are held). A failure part-way (e.g.
    /// [`SqliteError::TooManyOpenFiles`]) gives back what the batch took.
    ///
    /// # Cancel safety
    ///
    /// Not cancel-safe: if the future is dropped, the worker still finishes
    /// the batch, so keys may be held without the session knowing. The
    /// session is then poisoned: its next call (e.g. `verify`) fails with
    /// `SessionLost` and its loss signal fires. Dropping or closing it frees
    /// every key.
    async fn try_acquire(&mut self, keys: &[LockKey]) -> Result<Vec<bool>> {
        let ask = self.holds.pending(keys)?;
        if ask.is_empty() {
            return Ok(self.holds.answer(keys));
        }
        let batch = ask.clone();
        let granted = self
            .round_trip("try_acquire", |r| Command::TryAcquire(batch, r))
            .await?;
        self.holds.finish_acquire(keys, &ask, &granted)
    }

    /// Waits (SQLite's busy handler, retrying every 5 ms in the worker) until
    /// the key is free or `cancel` fires.
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe, through `cancel` and by dropping the future, and a
    /// dropped wait does not poison the session: between short slices the
    /// worker checks both `cancel` and whether this future still exists; a
    /// lock granted to a waiter that is gone is released at once, and a
    /// grant whose answer was on its way when the future was dropped is
    /// given back by the next command the worker serves.
    async fn acquire(&mut self, key: &LockKey, cancel: &CancellationToken) -> Result<bool> {
        if self.holds.holding(key)? {
            return Ok(true);
        }
        let (tx, rx) = oneshot::channel();
        if self
            .commands
            .send(Command::Acquire(key.clone(), cancel.clone(), tx))
            .is_err()
        {
            return Err(self.holds.fail(SqliteError::WorkerGone));
        }
        self.round_trips += 1;
        let mut abandon = AbandonOnDrop {
            commands: &self.commands,
            key: Some(key.clone()),
        };
        let answer = rx.await;
        abandon.key = None;
        drop(abandon);
        match answer {
            Ok(Ok(true)) => {
                self.holds.insert(key.clone());
                Ok(true)
            }
            Ok(Ok(false)) => Ok(false),
            Ok(Err(e)) => Err(self.holds.fail(e)),
            Err(_) => Err(self.holds.fail(SqliteError::WorkerGone)),
        }
    }

    /// One worker call for the held keys among `keys` (none when none is
    /// held).
    async fn release_many(&mut self, keys: &[LockKey]) -> Result<Vec<bool>> {
        let ask = self.holds.pending_release(keys)?;
        if ask.is_empty() {
            return Ok(vec![false; keys.len()]);
        }
        let batch = ask.clone();
        let released = self
            .round_trip("release", |r| Command::Release(batch, r))
            .await?;
        Ok(self.holds.record_released(keys, &ask, &released))
    }

    /// Like [`release_many`](Session::release_many), in the same single
    /// worker call: the worker closes the lock files, then records the
    /// release and one announcement (the ids of the released keys marked
    /// clean) in one registry transaction. Every other session of the
    /// database, in any process, reads it at its next 50 ms check (see the
    /// crate docs and [`RELEASE_HINT_BOUND`](crate::RELEASE_HINT_BOUND)).
    /// Nothing is announced (and nothing sent) when none of `keys` is held;
    /// the releasing session never hears its own announcement.
    async fn release_announced(&mut self, keys: &[LockKey], clean: &[bool]) -> Result<Vec<bool>> {
        let ask = self.holds.pending_release(keys)?;
        if ask.is_empty() {
            return Ok(vec![false; keys.len()]);
        }
        let (batch, clean) = (ask.clone(), shardlock_core::clean_ids(keys, clean));
        let released = self
            .round_trip("release_announced", |r| {
                Command::ReleaseAnnounced(batch, clean, r)
            })
            .await?;
        Ok(self.holds.record_released(keys, &ask, &released))
    }

    /// One worker call for the keys this session does not hold (none when
    /// it holds them all): one indexed query on the registry's `holders`
    /// table, whose holder sessions are each checked alive like `status`
    /// does (their liveness file still locked); a killed holder's leftover
    /// row answers `false`. Takes no key lock.
    ///
    /// The registry is written right after a lock is taken and right after
    /// it is released, so a key taken or released at the same instant may
    /// be answered either way, as with any probe.
    async fn probe(&mut self, keys: &[LockKey]) -> Result<Vec<bool>> {
        let ask = self.holds.pending(keys)?;
        if ask.is_empty() {
            return Ok(vec![false; keys.len()]);
        }
        let batch = ask.clone();
        // The worker answers one bool per key of the batch, in order.
        let answers = self
            .round_trip("probe", |r| Command::Probe(batch, r))
            .await?;
        let elsewhere: HashSet<i64> = ask
            .iter()
            .zip(&answers)
            .filter(|(_, held)| **held)
            .map(|(key, _)| key.id())
            .collect();
        Ok(keys
            .iter()
            .map(|key| !self.holds.contains(key) && elsewhere.contains(&key.id()))
            .collect())
    }

    async fn release_all(&mut self) -> Result<()> {
        self.holds.ready()?;
        if self.holds.is_empty() {
            return Ok(());
        }
        self.round_trip("release_all", Command::ReleaseAll).await?;
        self.holds.clear();
        Ok(())
    }

    /// Checks the liveness file, every held lock file and that the worker
    /// holds exactly the keys the session knows of.
    async fn verify(&mut self) -> Result<()> {
        let expected = self.holds.len();
        self.round_trip("verify", |r| Command::Verify(expected, r))
            .await
    }

    /// Frees every key and ends the worker (even for a session that was
    /// lost or poisoned: closing frees what it holds); the error says when
    /// the session was lost.
    async fn close(mut self) -> Result<()> {
        let lost = self.holds.ready();
        let closed: Result<()> = self.call(Command::Close).await;
        // The worker freed everything before answering (or is gone):
        // nothing is left for `drop` to announce.
        self.holds.clear();
        lost.and(closed)
    }
}

impl Drop for SqliteSession {
    /// Never blocks: hands the worker a ticket naming the held keys' lock
    /// files (see "Drop, then take the key again at once"); the channel
    /// closing then ends the worker.
    fn drop(&mut self) {
        if self.holds.is_empty() {
            return;
        }
        // `<database dir>/sessions/<name>.lock`: the keys live beside it.
        let Some(db_dir) = self.liveness.parent().and_then(Path::parent) else {
            return;
        };
        let paths = self
            .holds
            .keys()
            .map(|key| layout::key_file(db_dir, key))
            .collect();
        // Counted before `drop` returns; if the worker is gone the ticket
        // comes straight back and is dropped here (its locks went with it).
        let _ = self
            .commands
            .send(Command::Dropped(ReleaseTicket::new(paths)));
    }
}

impl fmt::Debug for SqliteSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteSession")
            .field("name", &self.name)
            .field("holds", &self.holds)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use shardlock_core::{Driver, NodeId};

    use super::*;
    use crate::SqliteDriver;

    fn lock_dir(what: &str) -> PathBuf {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        std::env::temp_dir().join(format!(
            "shardlock-unit-{what}-{}-{nanos:x}",
            std::process::id()
        ))
    }

    fn keys(what: &str, n: usize) -> Vec<LockKey> {
        (0..n)
            .map(|i| LockKey::new(format!("unit-{what}-{i}")).unwrap())
            .collect()
    }

    async fn open(what: &str) -> (PathBuf, SqliteDriver, SqliteSession, SqliteSession) {
        let dir = lock_dir(what);
        let driver = SqliteDriver::open(&dir).unwrap();
        let db = DatabaseId::new("unit");
        let a = driver.connect(&db, &NodeId::new("a")).await.unwrap();
        let b = driver.connect(&db, &NodeId::new("b")).await.unwrap();
        (dir, driver, a, b)
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_try_acquire_dropped_mid_flight_poisons_the_session() {
        let (dir, _driver, mut a, mut b) = open("dropped").await;
        let k = keys("dropped", 3);
        let signals = a.signals();
        // The worker answers on its own thread: if this thread is preempted
        // between sending the batch and polling for the answer, the first
        // poll already completes. Then give the keys back and try again.
        let mut dropped = false;
        for _ in 0..20 {
            {
                let fut = a.try_acquire(&k);
                tokio::pin!(fut);
                tokio::select! {
                    biased;
                    answered = &mut fut => assert_eq!(answered.unwrap(), vec![true; 3]),
                    () = std::future::ready(()) => dropped = true,
                }
            }
            if dropped {
                break;
            }
            assert_eq!(a.release_many(&k).await.unwrap(), vec![true; 3]);
        }
        assert!(
            dropped,
            "the worker answered before the first poll returned, 20 times"
        );
        assert!(a.held().is_empty());
        let err = a.verify().await.unwrap_err();
        assert!(err.is_session_fatal(), "{err}");
        assert!(err.to_string().contains("interrupted"), "{err}");
        assert!(signals.is_lost());
        // The worker still takes the keys (served after the batch, so it
        // sees them held); closing the poisoned session frees them.
        assert!(a.close().await.is_err(), "close says the session was lost");
        assert_eq!(b.try_acquire(&k).await.unwrap(), vec![true; 3]);
        b.close().await.unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[cfg(unix)]
    #[tokio::test(flavor = "current_thread")]
    async fn removing_the_liveness_file_fires_the_signal_within_the_bound() {
        use std::time::Instant;

        let (dir, driver, mut a, mut b) = open("liveness").await;
        let k = keys("liveness", 2);
        assert_eq!(a.try_acquire(&k).await.unwrap(), vec![true; 2]);
        let lost = a.signals();
        let removed = Instant::now();
        std::fs::remove_file(a.liveness_file()).unwrap();
        tokio::time::timeout(Duration::from_secs(5), lost.lost().cancelled())
            .await
            .expect("the loss signal fires without a call");
        let took = removed.elapsed();
        let bound = driver.capabilities().loss_detection_bound.unwrap();
        assert!(took <= bound * 3, "fired after {took:?}, bound {bound:?}");
        assert!(lost.reason().unwrap().contains("ended from outside"));
        // Its locks are free (the worker freed them with the signal, or
        // within a check interval after).
        let deadline = Instant::now() + Duration::from_secs(5);
        while b.try_acquire(&k).await.unwrap() != vec![true; 2] {
            assert!(Instant::now() < deadline, "locks freed");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let err = a.verify().await.unwrap_err();
        assert!(err.is_session_fatal(), "{err}");
        b.close().await.unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_dropped_acquire_leaves_nothing_held_and_does_not_poison() {
        let (dir, _driver, mut a, mut b) = open("acquire").await;
        let k = keys("acquire", 1);
        assert_eq!(a.try_acquire(&k).await.unwrap(), vec![true]);
        let cancel = CancellationToken::new();
        let waited =
            tokio::time::timeout(Duration::from_millis(120), b.acquire(&k[0], &cancel)).await;
        assert!(waited.is_err(), "still waiting");
        assert!(a.release(&k[0]).await.unwrap());
        b.verify().await.expect("a dropped acquire does not poison");
        assert!(b.held().is_empty());
        assert_eq!(
            a.try_acquire(&k).await.unwrap(),
            vec![true],
            "b holds nothing"
        );
        a.close().await.unwrap();
        b.close().await.unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn round_trips_and_waiters_are_counted() {
        use std::time::Instant;

        let (dir, driver, mut a, mut b) = open("counted").await;
        let k = keys("counted", 2);
        let db = DatabaseId::new("unit");
        let before = a.round_trips();
        assert_eq!(a.try_acquire(&k).await.unwrap(), vec![true; 2]);
        assert_eq!(a.round_trips(), before + 1, "one batch, one round trip");
        assert_eq!(a.try_acquire(&k).await.unwrap(), vec![true; 2]);
        assert_eq!(a.round_trips(), before + 1, "held keys cost none");
        assert_eq!(driver.waiting(&db, &k[0]), 0);
        let cancel = CancellationToken::new();
        let counted = |n: usize| {
            let (driver, db, key) = (driver.clone(), db.clone(), k[0].clone());
            async move {
                let deadline = Instant::now() + Duration::from_secs(5);
                while driver.waiting(&db, &key) != n {
                    assert!(Instant::now() < deadline, "never {n} waiting");
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
        };
        let b_before = b.round_trips();
        tokio::select! {
            got = b.acquire(&k[0], &cancel) => panic!("acquire returned: {got:?}"),
            () = counted(1) => {}
        }
        assert_eq!(driver.waiting(&db, &k[1]), 0, "only the key waited for");
        counted(0).await;
        assert_eq!(
            b.round_trips(),
            b_before + 1,
            "an acquire is one round trip"
        );
        a.close().await.unwrap();
        b.close().await.unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn batches_are_deduplicated_and_releases_answer_once() {
        let (dir, _driver, mut a, _b) = open("dedupe").await;
        let k = keys("dedupe", 2);
        let batch = vec![k[0].clone(), k[1].clone(), k[0].clone()];
        assert_eq!(a.try_acquire(&batch).await.unwrap(), vec![true; 3]);
        assert_eq!(a.held().len(), 2);
        a.verify().await.unwrap();
        assert_eq!(
            a.release_many(&batch).await.unwrap(),
            vec![true, true, false]
        );
        assert!(!a.release(&k[0]).await.unwrap());
        a.verify().await.unwrap();
        a.close().await.unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// Runs in a child process whose open-file limit is lowered with the shell's
/// `ulimit -n` (no `unsafe` needed here).
#[cfg(all(test, unix))]
mod open_file_limit {
    use shardlock_core::{Driver, Error, LockKey, NodeId, Session};

    use crate::{SqliteDriver, SqliteError};

    const CHILD: &str = "SHARDLOCK_SQLITE_EMFILE_CHILD";

    #[test]
    fn running_out_of_file_descriptors_is_a_typed_error_naming_ulimit() {
        if let Some(dir) = std::env::var_os(CHILD) {
            return child(dir.into());
        }
        let dir =
            std::env::temp_dir().join(format!("shardlock-unit-emfile-{}", std::process::id()));
        let status = crate::rerun_in_child(
            "ulimit -n 64",
            "session::open_file_limit::running_out_of_file_descriptors_is_a_typed_error_naming_ulimit",
            CHILD,
            &dir,
        );
        let _ = std::fs::remove_dir_all(&dir);
        assert!(status.success(), "child: {status:?}");
    }

    fn child(dir: std::path::PathBuf) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let driver = SqliteDriver::open(&dir).unwrap();
            let db = shardlock_core::DatabaseId::new("emfile");
            let mut s = driver.connect(&db, &NodeId::new("n")).await.unwrap();
            let keys: Vec<LockKey> = (0..200)
                .map(|i| LockKey::new(format!("emfile-{i}")).unwrap())
                .collect();
            let err = s.try_acquire(&keys).await.unwrap_err();
            assert!(!err.is_session_fatal(), "{err}");
            let Error::Driver { source, .. } = &err else {
                panic!("{err:?}")
            };
            let sqlite = source.downcast_ref::<SqliteError>().unwrap();
            assert!(
                matches!(sqlite, SqliteError::TooManyOpenFiles { .. }),
                "{sqlite:?}"
            );
            assert!(err.report().contains("ulimit -n"), "{}", err.report());
            assert!(s.held().is_empty(), "the batch was rolled back");
            s.verify().await.expect("the session is still sound");
            let few = s.try_acquire(&keys[..10]).await.unwrap();
            assert_eq!(few, vec![true; 10]);
            s.close().await.unwrap();
        });
    }
}
