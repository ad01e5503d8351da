//! The session's dedicated thread: it owns every SQLite connection of the
//! session, so blocking SQLite calls never run on the async executor.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{params, Connection, ErrorCode, OpenFlags};
use shardlock_core::{CancellationToken, DatabaseId, Error, LockKey, NodeId, Result};
use std::sync::mpsc;

use tokio::sync::oneshot;
use tracing::{debug, warn};

use crate::error::SqliteError;
use crate::layout;

/// How long one blocking-acquire slice waits before checking cancellation.
const SLICE_RETRIES: i32 = 20;
/// How often an idle session checks that its liveness file is still there.
const LIVENESS_CHECK: Duration = Duration::from_millis(250);
/// Sleep between lock attempts while waiting (SQLite's busy handler).
const RETRY_SLEEP: Duration = Duration::from_millis(5);

pub(crate) type Reply<T> = oneshot::Sender<Result<T>>;

pub(crate) enum Command {
    TryAcquire(Vec<LockKey>, Reply<Vec<bool>>),
    Acquire(LockKey, CancellationToken, Reply<bool>),
    Release(LockKey, Reply<bool>),
    ReleaseAll(Reply<()>),
    Verify(Reply<()>),
    Close(Reply<()>),
}

/// A file held by an open write transaction.
struct HeldFile {
    path: PathBuf,
    conn: Connection,
    ino: u64,
}

pub(crate) struct Worker {
    root: PathBuf,
    db_dir: PathBuf,
    database: DatabaseId,
    node: NodeId,
    name: String,
    session: HeldFile,
    held: BTreeMap<i64, (LockKey, HeldFile)>,
    registry: Option<Connection>,
    dead: Option<String>,
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

/// Tries to take the write lock of `path`; `None` when another connection
/// holds it.
fn lock_file(path: &Path, blocking: bool) -> Result<Option<HeldFile>, SqliteError> {
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
        | OpenFlags::SQLITE_OPEN_CREATE
        | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let mut conn =
        Connection::open_with_flags(path, flags).map_err(|e| SqliteError::sqlite(path, e))?;
    let handler: Option<fn(i32) -> bool> = if blocking { Some(wait_a_little) } else { None };
    conn.busy_handler(handler)
        .map_err(|e| SqliteError::sqlite(path, e))?;
    // Lock files are never written: no rollback journal (and so one open
    // file per held key, not two).
    conn.query_row("PRAGMA journal_mode = OFF", [], |_| Ok(()))
        .map_err(|e| SqliteError::sqlite(path, e))?;
    match conn.execute_batch("BEGIN IMMEDIATE") {
        Ok(()) => {
            let ino = fs::metadata(path)
                .map_err(|e| SqliteError::io(path, e))?
                .ino();
            Ok(Some(HeldFile {
                path: path.to_path_buf(),
                conn,
                ino,
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
        Err(e) => Err(SqliteError::sqlite(path, e)),
    }
}

impl HeldFile {
    /// Whether the file is still the one we locked and the lock is held.
    fn intact(&self) -> bool {
        !self.conn.is_autocommit()
            && fs::metadata(&self.path)
                .map(|m| m.ino() == self.ino)
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
    ) -> Result<Self, SqliteError> {
        let db_dir = layout::database_dir(root, database);
        for sub in ["keys", "sessions"] {
            let dir = db_dir.join(sub);
            fs::create_dir_all(&dir)
                .map_err(|source| SqliteError::Unwritable { path: dir, source })?;
        }
        let path = layout::session_file(&db_dir, &name);
        let session = lock_file(&path, false)?.ok_or_else(|| {
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
            held: BTreeMap::new(),
            registry: None,
            dead: None,
        };
        worker.register_session();
        Ok(worker)
    }

    pub(crate) fn run(mut self, commands: mpsc::Receiver<Command>) {
        loop {
            let command = match commands.recv_timeout(LIVENESS_CHECK) {
                Ok(command) => command,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    // Like a server ending a session: once the liveness file
                    // is gone, free the locks without waiting for a call.
                    let _ = self.alive();
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            };
            match command {
                Command::TryAcquire(keys, reply) => {
                    let _ = reply.send(self.try_acquire(&keys));
                }
                Command::Acquire(key, cancel, reply) => self.acquire(key, &cancel, reply),
                Command::Release(key, reply) => {
                    let _ = reply.send(self.release(&key));
                }
                Command::ReleaseAll(reply) => {
                    let _ = reply.send(self.release_all());
                }
                Command::Verify(reply) => {
                    let _ = reply.send(self.verify());
                }
                Command::Close(reply) => {
                    self.shutdown();
                    let _ = reply.send(Ok(()));
                    return;
                }
            }
        }
        // The session was dropped: free everything.
        self.shutdown();
    }

    fn lost(&self, reason: &str) -> Error {
        Error::session_lost(&self.database, reason.to_string())
    }

    /// Fails (and frees everything) once the session's liveness file was
    /// removed or replaced: an operator ended the session.
    fn alive(&mut self) -> Result<()> {
        if let Some(reason) = &self.dead {
            return Err(self.lost(reason));
        }
        if !self.session.intact() {
            let reason =
                "the session's file was removed: the session was ended from outside".to_string();
            warn!(database = %self.database, session = %self.name, "{reason}");
            self.held.clear();
            self.dead = Some(reason.clone());
            return Err(self.lost(&reason));
        }
        Ok(())
    }

    fn try_acquire(&mut self, keys: &[LockKey]) -> Result<Vec<bool>> {
        self.alive()?;
        let mut out = Vec::with_capacity(keys.len());
        let mut fresh = Vec::new();
        for key in keys {
            if self.held.contains_key(&key.id()) {
                out.push(true);
                continue;
            }
            let path = layout::key_file(&self.db_dir, key);
            match lock_file(&path, false)? {
                Some(file) => {
                    self.held.insert(key.id(), (key.clone(), file));
                    fresh.push(key.clone());
                    out.push(true);
                }
                None => out.push(false),
            }
        }
        self.register(&fresh);
        Ok(out)
    }

    fn acquire(&mut self, key: LockKey, cancel: &CancellationToken, reply: Reply<bool>) {
        if let Err(e) = self.alive() {
            let _ = reply.send(Err(e));
            return;
        }
        if self.held.contains_key(&key.id()) {
            let _ = reply.send(Ok(true));
            return;
        }
        let path = layout::key_file(&self.db_dir, &key);
        loop {
            if cancel.is_cancelled() || reply.is_closed() {
                let _ = reply.send(Ok(false));
                return;
            }
            match lock_file(&path, true) {
                Ok(Some(file)) => {
                    self.held.insert(key.id(), (key.clone(), file));
                    self.register(std::slice::from_ref(&key));
                    // The waiter may have gone (future dropped) or been
                    // cancelled while we took the lock: then give it back.
                    if cancel.is_cancelled() || reply.send(Ok(true)).is_err() {
                        debug!(%key, "acquire abandoned after the grant; releasing");
                        let _ = self.release(&key);
                    }
                    return;
                }
                Ok(None) => continue,
                Err(e) => {
                    let _ = reply.send(Err(e.into()));
                    return;
                }
            }
        }
    }

    fn release(&mut self, key: &LockKey) -> Result<bool> {
        self.alive()?;
        match self.held.remove(&key.id()) {
            Some((key, file)) => {
                drop(file.conn); // closing rolls back and frees the lock
                self.unregister(std::slice::from_ref(&key));
                Ok(true)
            }
            None => Ok(false),
        }
    }

    fn release_all(&mut self) -> Result<()> {
        self.alive()?;
        let keys: Vec<LockKey> = std::mem::take(&mut self.held)
            .into_values()
            .map(|(k, _)| k)
            .collect();
        self.unregister(&keys);
        Ok(())
    }

    fn verify(&mut self) -> Result<()> {
        self.alive()?;
        let broken: Vec<String> = self
            .held
            .values()
            .filter(|(_, file)| !file.intact())
            .map(|(key, _)| key.name().to_string())
            .collect();
        if broken.is_empty() {
            Ok(())
        } else {
            let reason = format!("lock files no longer held: {broken:?}");
            self.held.clear();
            self.dead = Some(reason.clone());
            Err(self.lost(&reason))
        }
    }

    fn shutdown(&mut self) {
        let keys: Vec<LockKey> = std::mem::take(&mut self.held)
            .into_values()
            .map(|(k, _)| k)
            .collect();
        self.unregister(&keys);
        self.unregister_session();
        let _ = fs::remove_file(&self.session.path);
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
    !matches!(lock_file(&path, false), Ok(Some(_)))
}
