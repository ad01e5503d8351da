//! The session's dedicated thread: it owns every SQLite connection of the
//! session, so blocking SQLite calls never run on the async executor.
//!
//! The worker keeps the open lock files (they *are* the locks); what the
//! session holds and whether it can be trusted is core's `Holds`, on the
//! async side. The worker only reports what the file system shows: when the
//! session's liveness file is removed or replaced it fires the session's
//! loss signal (a clone of the `Holds`' signals) and frees every lock, as a
//! server does when it ends a session.
//!
//! The worker also carries the session's release hints both ways (see the
//! crate docs): an announced release writes a row to the registry's
//! `announcements` table in the same registry transaction that records the
//! release, and at every liveness check the worker reads the rows newer
//! than the last one it saw and calls [`ReleaseHints::announce`] for those
//! of other sessions of its database.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
#[cfg(unix)]
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Condvar, LazyLock, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rusqlite::{params, Connection, ErrorCode, OpenFlags};
use shardlock_core::{
    CancellationToken, DatabaseId, LockKey, NodeId, ReleaseHints, SessionSignals,
};
use tokio::sync::oneshot;
use tracing::{debug, info, warn};

use crate::error::{is_too_many_open_files, SqliteError};
use crate::layout;
use crate::waiting::Waiters;

/// How many busy-handler retries one blocking-acquire slice makes (about
/// 50 ms) before checking cancellation and the liveness file.
const SLICE_RETRIES: i32 = 10;
/// How often the worker checks that its liveness file is still there (one
/// `stat`), idle or busy.
pub(crate) const LIVENESS_CHECK: Duration = Duration::from_millis(50);
/// Sleep between lock attempts while waiting (SQLite's busy handler).
const RETRY_SLEEP: Duration = Duration::from_millis(5);
/// Announcements kept in the registry: the newest this many...
const ANNOUNCEMENTS_KEPT: i64 = 256;
/// ...and none older than this many seconds (a hint that old is useless: a
/// poll has found the keys since, and clean marks expire after 30 s).
const ANNOUNCEMENT_TTL_SECS: i64 = 30;

/// The longest a worker waits, before trying a key, for the release of that
/// key by a session of this process that was dropped while holding it (its
/// worker frees it right after the drop returns; see [`ReleaseTicket`]).
/// Such a release takes well under a millisecond once its worker runs; the
/// bound only matters when that worker is itself busy (a blocking-acquire
/// slice ends within about 50 ms) or the machine is badly overloaded, and
/// then the attempt goes ahead and may be refused, as it would have been
/// without waiting.
pub(crate) const DROPPED_RELEASE_WAIT: Duration = Duration::from_secs(1);

pub(crate) type Reply<T> = oneshot::Sender<Result<T, SqliteError>>;

/// Releases in flight of dropped sessions in this process, counted per lock
/// file: dropping a session never blocks, so its worker frees the keys
/// after `drop` returned, and a session of the same process asking for one
/// of them at once would be refused. Workers wait here (on their own
/// thread, never on the async executor) before trying such a key.
struct DroppedReleases {
    pending: Mutex<HashMap<PathBuf, usize>>,
    freed: Condvar,
}

static DROPPED_RELEASES: LazyLock<DroppedReleases> = LazyLock::new(|| DroppedReleases {
    pending: Mutex::new(HashMap::new()),
    freed: Condvar::new(),
});

/// Waits until no dropped session of this process is still releasing the
/// lock file `path`, at most `limit`; answers whether none is.
fn wait_for_dropped_release(path: &Path, limit: Duration) -> bool {
    let releases = &*DROPPED_RELEASES;
    let deadline = Instant::now() + limit;
    let mut pending = releases
        .pending
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    while pending.contains_key(path) {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            warn!(path = %path.display(), ?limit, "a dropped session's release of this key is still in flight; trying anyway");
            return false;
        }
        pending = releases
            .freed
            .wait_timeout(pending, left)
            .unwrap_or_else(PoisonError::into_inner)
            .0;
    }
    true
}

/// The release of a dropped session's keys, in flight: created by the
/// session's `drop` (so it counts before `drop` returns) and dropped by the
/// worker once the locks are free, or at once if the worker is gone (its
/// connections, and so its locks, went with it).
pub(crate) struct ReleaseTicket {
    paths: Vec<PathBuf>,
}

impl ReleaseTicket {
    /// Counts a release in flight for each lock file in `paths`.
    pub(crate) fn new(paths: Vec<PathBuf>) -> Self {
        let mut pending = DROPPED_RELEASES
            .pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for path in &paths {
            *pending.entry(path.clone()).or_insert(0) += 1;
        }
        Self { paths }
    }
}

impl Drop for ReleaseTicket {
    fn drop(&mut self) {
        let releases = &*DROPPED_RELEASES;
        let mut pending = releases
            .pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for path in &self.paths {
            if let Some(count) = pending.get_mut(path) {
                *count -= 1;
                if *count == 0 {
                    let _ = pending.remove(path);
                }
            }
        }
        drop(pending);
        releases.freed.notify_all();
    }
}

pub(crate) enum Command {
    /// Lock each key not held yet; one answer per key.
    TryAcquire(Vec<LockKey>, Reply<Vec<bool>>),
    /// Wait for one key.
    Acquire(LockKey, CancellationToken, Reply<bool>),
    /// The `acquire` of this key was dropped before it read its answer:
    /// give the key back if it was granted.
    Abandon(LockKey),
    /// Release each key; one answer per key.
    Release(Vec<LockKey>, Reply<Vec<bool>>),
    /// Release each key like `Release` and, if any was held, announce it to
    /// the database's other sessions, marking clean the released keys whose
    /// ids are in the set.
    ReleaseAnnounced(Vec<LockKey>, HashSet<i64>, Reply<Vec<bool>>),
    /// Whether another live session holds each key (taking nothing).
    Probe(Vec<LockKey>, Reply<Vec<bool>>),
    ReleaseAll(Reply<()>),
    /// Check the session and its lock files; the number is how many keys
    /// the session believes it holds.
    Verify(usize, Reply<()>),
    Close(Reply<()>),
    /// A session-fenced commit (see `fenced.rs`): check that the session is
    /// alive and still holds the key's lock file, answer on the first
    /// channel, and if it does, serve nothing else (no liveness check, no
    /// release) until the committer signals (or drops) the second: the
    /// lock stays held for the whole commit.
    Pin(
        LockKey,
        mpsc::SyncSender<Result<(), SqliteError>>,
        mpsc::Receiver<()>,
    ),
    /// The session was dropped holding keys: shut down, then drop the
    /// ticket, which tells waiting workers the keys are free.
    Dropped(ReleaseTicket),
}

/// A file held by an open write transaction.
struct HeldFile {
    path: PathBuf,
    conn: Connection,
    id: Option<FileId>,
}

/// What tells a file apart from another one later created at the same path.
///
/// Unix: device and inode. Elsewhere no such number is read, so a file is
/// only checked to still exist (a weaker check: a file deleted and created
/// again is not noticed; on Windows a held file cannot be deleted anyway).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(not(unix), allow(dead_code))] // only built on Unix
struct FileId(u64, u64);

#[cfg(unix)]
fn file_id(meta: &fs::Metadata) -> Option<FileId> {
    Some(FileId(meta.dev(), meta.ino()))
}

#[cfg(not(unix))]
fn file_id(_meta: &fs::Metadata) -> Option<FileId> {
    None
}

pub(crate) struct Worker {
    root: PathBuf,
    db_dir: PathBuf,
    database: DatabaseId,
    node: NodeId,
    name: String,
    session: HeldFile,
    /// The lock files held, by key id: the locks themselves.
    files: BTreeMap<i64, (LockKey, HeldFile)>,
    registry: Option<Connection>,
    signals: SessionSignals,
    /// The driver's count of sessions waiting in `acquire`.
    waiters: Waiters,
    /// Where other sessions' announced releases are recorded.
    hints: ReleaseHints,
    /// The newest announcement seen (`seq`); `None` until the registry was
    /// first read, so a new session does not hear releases made before it.
    hints_seen: Option<i64>,
    /// Whether the last read of announcements failed (logged once per run
    /// of failures).
    hints_failing: bool,
}

/// Busy handler for blocking acquires: sleep a little, give up after a
/// slice so the caller can check cancellation.
fn wait_a_little(attempts: i32) -> bool {
    if attempts >= SLICE_RETRIES {
        return false;
    }
    std::thread::sleep(RETRY_SLEEP);
    true
}

/// Maps a failure to open or lock `path`, telling a full file-descriptor
/// table apart (SQLite only says "unable to open").
fn open_failed(path: &Path, source: rusqlite::Error, held: usize) -> SqliteError {
    if source.sqlite_error_code() == Some(ErrorCode::CannotOpen) {
        // Ask the operating system the same question to learn why.
        if let Err(io) = fs::File::open(path) {
            if is_too_many_open_files(&io) {
                return SqliteError::TooManyOpenFiles {
                    path: path.to_path_buf(),
                    held,
                    limit: crate::error::open_file_limit(),
                    source: io,
                };
            }
        }
    }
    SqliteError::sqlite(path, source)
}

/// Tries to take the write lock of `path`; `None` when another connection
/// holds it. `held` (keys held now) only feeds the error message.
fn lock_file(path: &Path, blocking: bool, held: usize) -> Result<Option<HeldFile>, SqliteError> {
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
        | OpenFlags::SQLITE_OPEN_CREATE
        | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let failed = |e| open_failed(path, e, held);
    let mut conn = Connection::open_with_flags(path, flags).map_err(failed)?;
    let handler: Option<fn(i32) -> bool> = if blocking { Some(wait_a_little) } else { None };
    conn.busy_handler(handler).map_err(failed)?;
    // Lock files are never written: no rollback journal (and so one open
    // file per held key, not two).
    conn.query_row("PRAGMA journal_mode = OFF", [], |_| Ok(()))
        .map_err(failed)?;
    match conn.execute_batch("BEGIN IMMEDIATE") {
        Ok(()) => {
            let meta = fs::metadata(path).map_err(|e| SqliteError::io(path, e))?;
            Ok(Some(HeldFile {
                path: path.to_path_buf(),
                conn,
                id: file_id(&meta),
            }))
        }
        Err(e)
            if matches!(
                e.sqlite_error_code(),
                Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked)
            ) =>
        {
            Ok(None)
        }
        Err(e) => Err(failed(e)),
    }
}

impl HeldFile {
    /// Whether the file is still the one we locked and the lock is held.
    fn intact(&self) -> bool {
        !self.conn.is_autocommit()
            && fs::metadata(&self.path)
                .map(|m| file_id(&m) == self.id)
                .unwrap_or(false)
    }
}

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl Worker {
    /// Creates the session's folders and takes its liveness file.
    pub(crate) fn open(
        root: &Path,
        database: &DatabaseId,
        node: &NodeId,
        name: String,
        signals: SessionSignals,
        waiters: Waiters,
        hints: ReleaseHints,
    ) -> Result<Self, SqliteError> {
        let db_dir = layout::database_dir(root, database);
        for sub in ["keys", "sessions"] {
            let dir = db_dir.join(sub);
            fs::create_dir_all(&dir)
                .map_err(|source| SqliteError::Unwritable { path: dir, source })?;
        }
        let path = layout::session_file(&db_dir, &name);
        let session = lock_file(&path, false, 0)?.ok_or_else(|| {
            SqliteError::io(
                &path,
                std::io::Error::other("session file is locked by someone else"),
            )
        })?;
        let mut worker = Self {
            root: root.to_path_buf(),
            db_dir,
            database: database.clone(),
            node: node.clone(),
            name,
            session,
            files: BTreeMap::new(),
            registry: None,
            signals,
            waiters,
            hints,
            hints_seen: None,
            hints_failing: false,
        };
        worker.register_session();
        // Sets the starting point: releases announced before now are not
        // this session's news.
        worker.poll_hints();
        Ok(worker)
    }

    pub(crate) fn run(mut self, commands: mpsc::Receiver<Command>) {
        let mut next_check = Instant::now() + LIVENESS_CHECK;
        loop {
            let wait = next_check.saturating_duration_since(Instant::now());
            match commands.recv_timeout(wait) {
                Ok(Command::Dropped(ticket)) => {
                    self.shutdown();
                    drop(ticket);
                    return;
                }
                Ok(command) => {
                    if let Some(reply) = self.handle(command) {
                        self.shutdown();
                        let _ = reply.send(Ok(()));
                        return;
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                // The session was dropped: free everything.
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
            if Instant::now() >= next_check {
                // Like a server ending a session: once the liveness file is
                // gone, fire the loss signal and free the locks without
                // waiting for a call.
                if self.alive().is_ok() {
                    self.poll_hints();
                }
                next_check = Instant::now() + LIVENESS_CHECK;
            }
        }
        self.shutdown();
    }

    /// Serves one command; answers the reply of a `Close`, which the caller
    /// sends once the session is shut down.
    fn handle(&mut self, command: Command) -> Option<Reply<()>> {
        match command {
            Command::TryAcquire(keys, reply) => {
                let _ = reply.send(self.try_acquire(&keys));
            }
            Command::Acquire(key, cancel, reply) => self.acquire(key, &cancel, reply),
            Command::Abandon(key) => {
                if self.give_back(std::slice::from_ref(&key)).contains(&true) {
                    debug!(%key, "acquire dropped after the grant; released");
                }
            }
            Command::Release(keys, reply) => {
                let _ = reply.send(self.alive().map(|()| self.give_back(&keys)));
            }
            Command::ReleaseAnnounced(keys, clean, reply) => {
                let _ = reply.send(
                    self.alive()
                        .map(|()| self.give_back_announced(&keys, &clean)),
                );
            }
            Command::Probe(keys, reply) => {
                let _ = reply.send(self.probe(&keys));
            }
            Command::ReleaseAll(reply) => {
                let _ = reply.send(self.alive().map(|()| self.free_all()));
            }
            Command::Verify(expected, reply) => {
                let _ = reply.send(self.verify(expected));
            }
            Command::Pin(key, ready, done) => self.pin(&key, &ready, &done),
            Command::Close(reply) => return Some(reply),
            // Served by `run` before it gets here.
            Command::Dropped(ticket) => drop(ticket),
        }
        None
    }

    /// Fails once the session's liveness file was removed or replaced (an
    /// operator ended the session): then frees every lock and fires the
    /// loss signal. Answers from the file system each time, so there is no
    /// "dead" flag to keep.
    fn alive(&mut self) -> Result<(), SqliteError> {
        if self.session.intact() {
            return Ok(());
        }
        let reason =
            "the session's file was removed or replaced: the session was ended from outside";
        if !self.signals.is_lost() || !self.files.is_empty() {
            warn!(database = %self.database, session = %self.name, held = self.files.len(), "{reason}");
        }
        // Locks first, as a server frees an ended session's locks before
        // its client can notice: once `lost` fired, the keys are free.
        self.free_all();
        self.signals.fire_lost(reason);
        Err(SqliteError::SessionEnded {
            reason: reason.to_string(),
        })
    }

    /// Serves a [`Command::Pin`]: proves the session alive and `key`'s lock
    /// file held (and still the file that was locked), answers on `ready`,
    /// then, if it is held, blocks this thread until the committer is done
    /// (`done` signalled or dropped). Only this thread ever frees the
    /// session's locks (besides the process dying, which ends the commit
    /// too), so the lock is held from the check until the commit ends.
    fn pin(
        &mut self,
        key: &LockKey,
        ready: &mpsc::SyncSender<Result<(), SqliteError>>,
        done: &mpsc::Receiver<()>,
    ) {
        let held = self.alive().and_then(|()| match self.files.get(&key.id()) {
            Some((_, file)) if file.intact() => Ok(()),
            Some(_) => {
                let reason = format!("the lock file of {key} is no longer held");
                self.signals.fire_lost(reason.clone());
                self.free_all();
                Err(SqliteError::SessionEnded { reason })
            }
            None => Err(SqliteError::SessionEnded {
                reason: format!("the session does not hold {key}"),
            }),
        });
        let pinned = held.is_ok();
        if ready.send(held).is_err() || !pinned {
            return;
        }
        let started = Instant::now();
        // Either a signal or the sender dropped: the commit is over.
        let _ = done.recv();
        debug!(%key, held_for = ?started.elapsed(), "fenced commit done; the worker resumes");
    }

    fn try_acquire(&mut self, keys: &[LockKey]) -> Result<Vec<bool>, SqliteError> {
        self.alive()?;
        let mut out = Vec::with_capacity(keys.len());
        let mut fresh = Vec::new();
        for key in keys {
            if self.files.contains_key(&key.id()) {
                out.push(true);
                continue;
            }
            let path = layout::key_file(&self.db_dir, key);
            wait_for_dropped_release(&path, DROPPED_RELEASE_WAIT);
            match lock_file(&path, false, self.files.len()) {
                Ok(Some(file)) => {
                    self.files.insert(key.id(), (key.clone(), file));
                    fresh.push(key.clone());
                    out.push(true);
                }
                Ok(None) => out.push(false),
                Err(e) => {
                    // All or nothing: give back what this batch took, so the
                    // session's bookkeeping stays exact.
                    for key in &fresh {
                        let _ = self.files.remove(&key.id());
                    }
                    return Err(e);
                }
            }
        }
        self.register(&fresh);
        Ok(out)
    }

    fn acquire(&mut self, key: LockKey, cancel: &CancellationToken, reply: Reply<bool>) {
        if self.files.contains_key(&key.id()) {
            let _ = reply.send(self.alive().map(|()| true));
            return;
        }
        let path = layout::key_file(&self.db_dir, &key);
        wait_for_dropped_release(&path, DROPPED_RELEASE_WAIT);
        // Seen by `SqliteDriver::waiting` until this returns.
        let _waiting = self.waiters.enter(&self.database, &key);
        loop {
            // One slice (about 50 ms) at a time: between slices, check the
            // liveness file (so a session ended while waiting fails within
            // the detection bound), cancellation and the waiter.
            if let Err(e) = self.alive() {
                let _ = reply.send(Err(e));
                return;
            }
            // A session waiting here still hears other sessions' releases
            // within a slice.
            self.poll_hints();
            if cancel.is_cancelled() || reply.is_closed() {
                let _ = reply.send(Ok(false));
                return;
            }
            match lock_file(&path, true, self.files.len()) {
                Ok(Some(file)) => {
                    self.files.insert(key.id(), (key.clone(), file));
                    self.register(std::slice::from_ref(&key));
                    // The waiter may have been cancelled or gone (future
                    // dropped) while we took the lock: then give it back.
                    if cancel.is_cancelled() {
                        debug!(%key, "acquire cancelled after the grant; releasing");
                        let _ = self.give_back(std::slice::from_ref(&key));
                        let _ = reply.send(Ok(false));
                    } else if reply.send(Ok(true)).is_err() {
                        debug!(%key, "acquire abandoned after the grant; releasing");
                        let _ = self.give_back(std::slice::from_ref(&key));
                    }
                    return;
                }
                Ok(None) => continue,
                Err(e) => {
                    let _ = reply.send(Err(e));
                    return;
                }
            }
        }
    }

    /// Releases each key held; one answer per key.
    fn give_back(&mut self, keys: &[LockKey]) -> Vec<bool> {
        let (out, released) = self.close_files(keys);
        self.unregister(&released);
        out
    }

    /// Releases each key held like [`give_back`](Self::give_back) and, if
    /// any was, announces it in the same registry transaction that records
    /// the release, after the locks are free (so a session woken by the
    /// announcement finds the keys free).
    fn give_back_announced(&mut self, keys: &[LockKey], clean: &HashSet<i64>) -> Vec<bool> {
        let (out, released) = self.close_files(keys);
        self.unregister_announced(&released, clean);
        out
    }

    /// Closes the lock files of the held keys among `keys` (which frees
    /// their locks); answers one `bool` per key and the keys released.
    fn close_files(&mut self, keys: &[LockKey]) -> (Vec<bool>, Vec<LockKey>) {
        let mut released = Vec::new();
        let out = keys
            .iter()
            .map(|key| match self.files.remove(&key.id()) {
                Some((key, file)) => {
                    drop(file.conn); // closing rolls back and frees the lock
                    released.push(key);
                    true
                }
                None => false,
            })
            .collect();
        (out, released)
    }

    /// Whether a **live** session other than this one holds each key: one
    /// indexed query on the registry's `holders` table, then each holder
    /// session found checked alive the way `status` does (its liveness
    /// file is still locked). A dead holder's row (its process was killed)
    /// answers `false` and is removed. Takes no key lock.
    fn probe(&mut self, keys: &[LockKey]) -> Result<Vec<bool>, SqliteError> {
        self.alive()?;
        let (db, name) = (self.database.to_string(), self.name.clone());
        let ids: Vec<String> = keys
            .iter()
            .filter(|k| !self.files.contains_key(&k.id()))
            .map(|k| k.id().to_string())
            .collect();
        let path = layout::registry(&self.root);
        let sql_err = |e| SqliteError::sqlite(&path, e);
        let conn = self.registry_checked()?;
        let mut holders: HashMap<i64, String> = HashMap::with_capacity(ids.len());
        {
            // One statement for any number of keys: the ids travel as one
            // JSON array, not as one bound parameter each.
            let mut stmt = conn
                .prepare(
                    "SELECT key_id, session FROM holders \
                     WHERE database = ?1 AND key_id IN (SELECT value FROM json_each(?2))",
                )
                .map_err(sql_err)?;
            let rows = stmt
                .query_map(params![db, format!("[{}]", ids.join(","))], |r| {
                    Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?))
                })
                .map_err(sql_err)?;
            for row in rows {
                let (id, session) = row.map_err(sql_err)?;
                if session != name {
                    let _ = holders.insert(id, session);
                }
            }
        }
        let mut alive: HashMap<&str, bool> = HashMap::new();
        for session in holders.values() {
            if !alive.contains_key(session.as_str()) {
                let live = session_alive(&self.root, &self.database, session);
                let _ = alive.insert(session, live);
            }
        }
        let answers = keys
            .iter()
            .map(|k| {
                holders
                    .get(&k.id())
                    .is_some_and(|s| alive.get(s.as_str()).copied().unwrap_or(false))
            })
            .collect();
        let dead: Vec<String> = alive
            .into_iter()
            .filter(|(_, live)| !live)
            .map(|(s, _)| s.to_string())
            .collect();
        self.forget_dead_sessions(&dead);
        Ok(answers)
    }

    /// Removes the registry rows of sessions found dead (best effort, as
    /// `status` does), so later probes do not check them again.
    fn forget_dead_sessions(&mut self, dead: &[String]) {
        if dead.is_empty() {
            return;
        }
        debug!(database = %self.database, sessions = ?dead, "forgetting dead holders' registry rows");
        let Some(conn) = self.registry() else { return };
        let result = (|| -> rusqlite::Result<()> {
            let tx = conn.unchecked_transaction()?;
            for session in dead {
                tx.execute("DELETE FROM holders WHERE session = ?1", params![session])?;
                tx.execute("DELETE FROM sessions WHERE session = ?1", params![session])?;
            }
            tx.commit()
        })();
        if let Err(e) = result {
            warn!(error = %e, "cannot remove dead sessions' rows from the registry");
        }
    }

    /// Reads the announcements newer than the last one seen and records
    /// those of other sessions of this database in the session's hints
    /// (one indexed query; nothing when the table did not move). The first
    /// call only notes where the table stands.
    fn poll_hints(&mut self) {
        if self.signals.is_lost() {
            return;
        }
        let (db, name, seen) = (
            self.database.to_string(),
            self.name.clone(),
            self.hints_seen,
        );
        let path = layout::registry(&self.root);
        // Not `registry()`: its warning would repeat at every check.
        let read = self.registry_checked().and_then(|conn| {
            read_announcements(conn, seen, &db, &name).map_err(|e| SqliteError::sqlite(&path, e))
        });
        match read {
            Ok((last, news)) => {
                self.hints_seen = Some(last);
                if self.hints_failing {
                    info!(database = %self.database, "reading release announcements works again");
                    self.hints_failing = false;
                }
                for clean in news {
                    debug!(database = %self.database, clean = clean.len(), "release announced by another session");
                    self.hints.announce(clean);
                }
            }
            Err(e) => {
                if !self.hints_failing {
                    warn!(database = %self.database, error = %e, "cannot read release announcements; nodes will find released keys at their next poll");
                    self.hints_failing = true;
                }
            }
        }
    }

    /// Releases every key.
    fn free_all(&mut self) {
        if self.files.is_empty() {
            return;
        }
        let keys: Vec<LockKey> = std::mem::take(&mut self.files)
            .into_values()
            .map(|(k, _)| k)
            .collect();
        self.unregister(&keys);
    }

    fn verify(&mut self, expected: usize) -> Result<(), SqliteError> {
        self.alive()?;
        let broken: Vec<String> = self
            .files
            .values()
            .filter(|(_, file)| !file.intact())
            .map(|(key, _)| key.name().to_string())
            .collect();
        if !broken.is_empty() {
            // Another process may lock a new file at the same path: these
            // locks mean nothing any more.
            let reason = format!("lock files no longer held: {broken:?}");
            self.signals.fire_lost(reason.clone());
            self.free_all();
            return Err(SqliteError::SessionEnded { reason });
        }
        if self.files.len() != expected {
            return Err(SqliteError::SessionEnded {
                reason: format!(
                    "the session holds {} lock files but believes it holds {expected} keys",
                    self.files.len()
                ),
            });
        }
        Ok(())
    }

    /// Frees everything and removes the liveness file.
    fn shutdown(mut self) {
        self.free_all();
        self.unregister_session();
        let HeldFile { path, conn, .. } = self.session;
        // Closed first: some systems (Windows) refuse to delete an open file.
        drop(conn);
        let _ = fs::remove_file(&path);
    }

    // ===== registry (best effort: it feeds `status`, `probe` and release
    // hints, never decides locks) =====

    /// The registry connection, opened on first use; `None` (logged) when
    /// it cannot be opened.
    fn registry(&mut self) -> Option<&Connection> {
        match self.registry_checked() {
            Ok(conn) => Some(conn),
            Err(e) => {
                warn!(error = %e, "cannot open the lock registry; status, probes and release hints will not show this session");
                None
            }
        }
    }

    /// The registry connection, opened on first use.
    fn registry_checked(&mut self) -> Result<&Connection, SqliteError> {
        let conn = match self.registry.take() {
            Some(conn) => conn,
            None => open_registry(&self.root)?,
        };
        Ok(self.registry.insert(conn))
    }

    fn register_session(&mut self) {
        let (db, node, name) = (
            self.database.to_string(),
            self.node.to_string(),
            self.name.clone(),
        );
        if let Some(conn) = self.registry() {
            let result = conn.execute(
                "INSERT OR REPLACE INTO sessions(session, database, node, pid, since) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![name, db, node, std::process::id(), now_secs()],
            );
            if let Err(e) = result {
                warn!(error = %e, "cannot record the session in the registry");
            }
        }
    }

    fn unregister_session(&mut self) {
        let name = self.name.clone();
        if let Some(conn) = self.registry() {
            let _ = conn.execute("DELETE FROM sessions WHERE session = ?1", params![name]);
        }
    }

    fn register(&mut self, keys: &[LockKey]) {
        let since = now_secs();
        self.registry_batch(
            keys,
            "INSERT OR REPLACE INTO holders(database, key_id, name, session, since) VALUES (?1, ?2, ?3, ?4, ?5)",
            "cannot record held locks in the registry",
            |stmt, db, key, session| stmt.execute(params![db, key.id(), key.name(), session, since]),
        );
    }

    /// [`unregister`](Self::unregister) and, in the same registry
    /// transaction, one announcement of the release (the ids of the
    /// released keys in `clean`), pruning old announcements. Nothing when
    /// nothing was released.
    fn unregister_announced(&mut self, released: &[LockKey], clean: &HashSet<i64>) {
        if released.is_empty() {
            return;
        }
        let (db, name, now) = (self.database.to_string(), self.name.clone(), now_secs());
        let marked: Vec<i64> = released
            .iter()
            .map(LockKey::id)
            .filter(|id| clean.contains(id))
            .collect();
        let Some(conn) = self.registry() else { return };
        let result = (|| -> rusqlite::Result<i64> {
            let tx = conn.unchecked_transaction()?;
            {
                let mut stmt = tx.prepare(
                    "DELETE FROM holders WHERE database = ?1 AND key_id = ?2 AND session = ?3",
                )?;
                for key in released {
                    stmt.execute(params![db, key.id(), name])?;
                }
            }
            tx.execute(
                "INSERT INTO announcements(database, session, clean, at) VALUES (?1, ?2, ?3, ?4)",
                params![db, name, encode_ids(&marked), now],
            )?;
            let seq = tx.last_insert_rowid();
            tx.execute(
                "DELETE FROM announcements WHERE seq <= ?1 OR at < ?2",
                params![seq - ANNOUNCEMENTS_KEPT, now - ANNOUNCEMENT_TTL_SECS],
            )?;
            tx.commit()?;
            Ok(seq)
        })();
        match result {
            Ok(seq) => {
                debug!(database = %self.database, released = released.len(), clean = marked.len(), seq, "release announced");
            }
            Err(e) => {
                warn!(error = %e, "cannot record the release in the registry; other nodes will find the keys at their next poll");
            }
        }
    }

    fn unregister(&mut self, keys: &[LockKey]) {
        self.registry_batch(
            keys,
            "DELETE FROM holders WHERE database = ?1 AND key_id = ?2 AND session = ?3",
            "cannot remove released locks from the registry",
            |stmt, db, key, session| stmt.execute(params![db, key.id(), session]),
        );
    }

    /// Runs `sql` once per key in one registry transaction; failures are
    /// logged, never returned (the registry only feeds `status`).
    fn registry_batch(
        &mut self,
        keys: &[LockKey],
        sql: &str,
        failure: &str,
        run: impl Fn(&mut rusqlite::Statement<'_>, &str, &LockKey, &str) -> rusqlite::Result<usize>,
    ) {
        if keys.is_empty() {
            return;
        }
        let (db, name) = (self.database.to_string(), self.name.clone());
        let Some(conn) = self.registry() else { return };
        let result = (|| -> rusqlite::Result<()> {
            let tx = conn.unchecked_transaction()?;
            {
                let mut stmt = tx.prepare(sql)?;
                for key in keys {
                    run(&mut stmt, &db, key, &name)?;
                }
            }
            tx.commit()
        })();
        if let Err(e) = result {
            warn!(error = %e, "{failure}");
        }
    }
}

/// Opens (creating if needed) the registry database.
pub(crate) fn open_registry(root: &Path) -> Result<Connection, SqliteError> {
    let path = layout::registry(root);
    let conn = Connection::open(&path).map_err(|e| SqliteError::sqlite(&path, e))?;
    conn.busy_timeout(Duration::from_secs(2))
        .map_err(|e| SqliteError::sqlite(&path, e))?;
    conn.execute_batch(
        "PRAGMA journal_mode = WAL;
         -- The registry only feeds `status`: no fsync per lock change.
         PRAGMA synchronous = NORMAL;
         CREATE TABLE IF NOT EXISTS sessions(
             session TEXT PRIMARY KEY, database TEXT NOT NULL, node TEXT NOT NULL,
             pid INTEGER NOT NULL, since INTEGER NOT NULL);
         CREATE TABLE IF NOT EXISTS holders(
             database TEXT NOT NULL, key_id INTEGER NOT NULL, name TEXT NOT NULL,
             session TEXT NOT NULL, since INTEGER NOT NULL,
             PRIMARY KEY(database, key_id));
         -- Announced releases (release hints): `seq` only grows (AUTOINCREMENT
         -- never reuses one, even after pruning); `clean` holds the ids of
         -- the keys handed over cleanly, 8 bytes little-endian each.
         CREATE TABLE IF NOT EXISTS announcements(
             seq INTEGER PRIMARY KEY AUTOINCREMENT, database TEXT NOT NULL,
             session TEXT NOT NULL, clean BLOB NOT NULL, at INTEGER NOT NULL);",
    )
    .map_err(|e| SqliteError::sqlite(&path, e))?;
    Ok(conn)
}

/// The announcements after `seen` (`None`: only where the table stands):
/// the newest `seq` read, and the clean ids of each announcement made by
/// another session (`name` is this one) of `database`. One statement on the
/// primary key: with nothing new it reads no row.
fn read_announcements(
    conn: &Connection,
    seen: Option<i64>,
    database: &str,
    name: &str,
) -> rusqlite::Result<(i64, Vec<Vec<i64>>)> {
    let Some(seen) = seen else {
        let latest =
            conn.query_row("SELECT COALESCE(MAX(seq), 0) FROM announcements", [], |r| {
                r.get(0)
            })?;
        return Ok((latest, Vec::new()));
    };
    let mut stmt = conn.prepare(
        "SELECT seq, database, session, clean FROM announcements WHERE seq > ?1 ORDER BY seq",
    )?;
    let mut rows = stmt.query(params![seen])?;
    let (mut last, mut news) = (seen, Vec::new());
    while let Some(row) = rows.next()? {
        last = row.get(0)?;
        if row.get_ref(1)?.as_str()? == database && row.get_ref(2)?.as_str()? != name {
            news.push(decode_ids(row.get_ref(3)?.as_blob()?));
        }
    }
    Ok((last, news))
}

/// Key ids as a blob: 8 bytes little-endian each.
fn encode_ids(ids: &[i64]) -> Vec<u8> {
    ids.iter().flat_map(|id| id.to_le_bytes()).collect()
}

/// The ids of [`encode_ids`]; a trailing partial id is ignored.
fn decode_ids(blob: &[u8]) -> Vec<i64> {
    blob.chunks_exact(8)
        .map(|c| {
            let mut bytes = [0u8; 8];
            bytes.copy_from_slice(c);
            i64::from_le_bytes(bytes)
        })
        .collect()
}

/// Whether a session's liveness file is still held (by a live process).
///
/// The file is opened without creating it, so a session that shuts down
/// meanwhile leaves no empty file behind. An unexpected error counts as
/// alive: a holder is never declared dead (and its rows removed) on doubt.
pub(crate) fn session_alive(root: &Path, database: &DatabaseId, session: &str) -> bool {
    let path = layout::session_file(&layout::database_dir(root, database), session);
    let conn = match Connection::open_with_flags(
        &path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    ) {
        Ok(conn) => conn,
        // Gone: the session ended (or never finished opening).
        Err(_) if !path.exists() => return false,
        Err(e) => {
            debug!(path = %path.display(), error = %e, "cannot open a session file; counted alive");
            return true;
        }
    };
    // No waiting: a held file answers busy at once (rusqlite's default
    // would retry for 5 s).
    if conn.busy_timeout(Duration::ZERO).is_err()
        || conn
            .query_row("PRAGMA journal_mode = OFF", [], |_| Ok(()))
            .is_err()
    {
        return true;
    }
    // Taking it succeeds only if its holder is gone; dropping the connection
    // gives it straight back.
    conn.execute_batch("BEGIN IMMEDIATE").is_err()
}
