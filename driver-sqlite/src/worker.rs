//! The session's dedicated thread: it owns every SQLite connection of the
//! session, so blocking SQLite calls never run on the async executor.
//!
//! The worker keeps the open lock files (they *are* the locks); what the
//! session holds and whether it can be trusted is core's `Holds`, on the
//! async side. The worker only reports what the file system shows: when the
//! session's liveness file is removed or replaced it fires the session's
//! loss signal (a clone of the `Holds`' signals) and frees every lock, as a
//! server does when it ends a session.

use std::collections::BTreeMap;
use std::fs;
#[cfg(unix)]
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rusqlite::{params, Connection, ErrorCode, OpenFlags};
use shardlock_core::{CancellationToken, DatabaseId, LockKey, NodeId, SessionSignals};
use tokio::sync::oneshot;
use tracing::{debug, warn};

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

pub(crate) type Reply<T> = oneshot::Sender<Result<T, SqliteError>>;

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
    ReleaseAll(Reply<()>),
    /// Check the session and its lock files; the number is how many keys
    /// the session believes it holds.
    Verify(usize, Reply<()>),
    Close(Reply<()>),
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
        };
        worker.register_session();
        Ok(worker)
    }

    pub(crate) fn run(mut self, commands: mpsc::Receiver<Command>) {
        let mut next_check = Instant::now() + LIVENESS_CHECK;
        loop {
            let wait = next_check.saturating_duration_since(Instant::now());
            match commands.recv_timeout(wait) {
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
                let _ = self.alive();
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
            Command::ReleaseAll(reply) => {
                let _ = reply.send(self.alive().map(|()| self.free_all()));
            }
            Command::Verify(expected, reply) => {
                let _ = reply.send(self.verify(expected));
            }
            Command::Close(reply) => return Some(reply),
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
        self.unregister(&released);
        out
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

    // ===== registry (best effort: it feeds `status`, never decides locks) =====

    fn registry(&mut self) -> Option<&Connection> {
        if self.registry.is_none() {
            match open_registry(&self.root) {
                Ok(conn) => self.registry = Some(conn),
                Err(e) => {
                    warn!(error = %e, "cannot open the lock registry; status will not show this session");
                    return None;
                }
            }
        }
        self.registry.as_ref()
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
             PRIMARY KEY(database, key_id));",
    )
    .map_err(|e| SqliteError::sqlite(&path, e))?;
    Ok(conn)
}

/// Whether a session's liveness file is still held (by a live process).
pub(crate) fn session_alive(root: &Path, database: &DatabaseId, session: &str) -> bool {
    let path = layout::session_file(&layout::database_dir(root, database), session);
    if !path.exists() {
        return false;
    }
    // Taking it succeeds only if its holder is gone; dropping the connection
    // gives it straight back.
    !matches!(lock_file(&path, false, 0), Ok(Some(_)))
}
