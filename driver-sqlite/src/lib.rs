//! Embedded, cross-process lock driver of
//! [shardlock](https://docs.rs/shardlock) for processes on **one host**: no
//! server, just a lock directory. Use it through `shardlock` with feature
//! `sqlite` (on by default).
//!
//! Each key is an SQLite file; a session holds a key by keeping a write
//! transaction (`BEGIN IMMEDIATE`) open on it, on a connection owned by the
//! session's dedicated worker thread. SQLite's write lock is an operating
//! system file lock, so when a process dies, even by `kill -9`, the kernel
//! frees its locks at once: no lease, no clock, no heartbeat.
//!
//! | property | value |
//! |---|---|
//! | scope | processes sharing a local file system (not NFS) |
//! | try-acquire batch | one call to the session's worker for any number of keys |
//! | blocking acquire | SQLite's busy handler, retrying every 5 ms; cancel, a dropped waiter and the liveness file checked every 50 ms |
//! | crash release | immediate (the kernel drops the file locks) |
//! | files | one per key ever used, one per live session; each held key keeps one file open (no journal), so the open-file limit bounds the keys one process can hold; [`SqliteDriver::open`] raises the soft limit (`ulimit -n`, often 1,024) to the hard one, so 10,000 keys per process work wherever the hard limit allows |
//! | status | `registry.db` records holder node, pid and since; `status()` checks liveness |
//! | ending a session from outside | delete its liveness file `<database>/sessions/<name>.lock` (Unix): within 50 ms its worker fires the session's loss signal and frees every lock; later calls fail with `SessionLost` |
//! | loss signal | emulated: the worker `stat`s its liveness file every 50 ms, idle or waiting in `acquire`; bound stated in [`capabilities`]: [`LOSS_DETECTION_BOUND`] (100 ms); also fires if the worker thread dies |
//! | probe | native (takes nothing): one worker call, one indexed query on `registry.db`'s holders, each holder session found checked alive (its liveness file still locked, tens of µs each); takes no key lock (see below) |
//! | release hints | emulated: an announced release writes a row to `registry.db` in the transaction that records the release; every worker reads newer rows at its 50 ms check, idle or waiting in `acquire`: at most 50 ms (25 ms on average) when idle, [`RELEASE_HINT_BOUND`] (100 ms) stated |
//! | too many keys | [`SqliteError::TooManyOpenFiles`] names the limit and what to raise (`ulimit -Hn`, systemd `LimitNOFILE=`); the batch that hit the limit is rolled back |
//! | checkpoints | [`SqliteCheckpoints`]: table `subscriptions` with fencing epochs, opened like every checkpoint store with [`SqliteCheckpoints::connect`]`(path).await` (the database file, e.g. your application's); [`SqliteCheckpoints::save_in`] writes inside your own transaction |
//! | session-fenced transactions | [`SqliteCheckpoints::fenced`]: the projection's writes and the checkpoint commit in the store's database while the session's worker is *pinned* (it has just proved the liveness file and the key's lock file held, and frees nothing until the `COMMIT` is over); a session ended before the pin cannot commit. Not on the lock's own connection: committing there would free the lock |
//!
//! A process that hangs without dying (stopped, swapped out) keeps its
//! locks: there is no server to notice, so [`lock_release_window`] is
//! `None`.
//!
//! # Probe
//!
//! [`Session::probe`](shardlock_core::Session::probe) asks the registry, not
//! the lock files: a lock file can only be tested by taking it, which would
//! deny a real `try_acquire` meanwhile. Every session records the keys it
//! holds in `registry.db` right after locking them and removes them right
//! after releasing them, so one query (`holders` by primary key, the ids
//! passed as one JSON array) answers any number of keys. A row only counts
//! if its session is alive, decided as `status` does: its liveness file is
//! still locked (a process killed with `kill -9` leaves its rows behind;
//! its file lock is gone, so its rows answer `false` and are removed). A
//! key taken or released at the very moment of the probe may be answered
//! either way, as with any probe; a session whose registry writes fail
//! (logged) is not seen.
//!
//! # Release hints
//!
//! [`Session::release_announced`](shardlock_core::Session::release_announced)
//! closes the lock files (the keys are free from then on), then, in the one
//! registry transaction that records the release, inserts a row in
//! `announcements` (a sequence number that only grows, the database, the
//! releasing session, the ids of the keys handed over cleanly) and prunes
//! rows beyond the newest 256 or older than 30 s. Each session's worker
//! already wakes every 50 ms to check its liveness file; at that check it
//! runs one primary-key query for rows newer than the last it saw (a local
//! WAL read: microseconds, no row when nothing changed) and calls
//! [`ReleaseHints::announce`] for each one made by another session of its
//! database, in this process or any other. A session only hears releases
//! announced after it opened, and never its own.
//!
//! Why a table and not an operating-system signal: sessions are threads of
//! any number of processes that come and go, possibly under different users
//! and on any platform SQLite runs on. Signals need the receivers' pids and
//! permission; named pipes and sockets need a rendezvous and clean-up after
//! `kill -9`; file-change notification (inotify, kqueue,
//! `ReadDirectoryChangesW`) is per platform and fires for every registry
//! write, not only releases. The 50 ms check exists anyway, costs one query
//! per tick, survives crashes (a lost row only costs a poll) and works
//! wherever the locks do. The price is latency: a hint arrives up to 50 ms
//! after the release (25 ms on average), plus whatever command the
//! receiving worker is serving (a blocking-acquire slice ends within about
//! 50 ms; a batch of thousands of keys delays it until done). Hints are
//! hints: a missed one costs a poll interval, never correctness.
//!
//! # Platforms
//!
//! The locks themselves are SQLite's and work wherever SQLite does (Unix
//! `fcntl` locks, Windows `LockFileEx`); the operating system frees them
//! when a process dies on every platform. Two checks are **Unix-only**:
//!
//! - *File identity*: on Unix a held file is checked to be the very file
//!   that was locked (device and inode), so a liveness or lock file deleted
//!   and created again is noticed. Elsewhere only the file's existence and
//!   the open transaction are checked, a weaker test.
//! - *Ending a session by deleting its liveness file*: Unix allows deleting
//!   an open file; Windows refuses while the session holds it, so there a
//!   session is ended by ending its process.
//!
//! [`lock_release_window`]: shardlock_core::Driver::lock_release_window
//! [`capabilities`]: shardlock_core::Driver::capabilities
//! [`ReleaseHints::announce`]: shardlock_core::ReleaseHints::announce
//!
//! ```
//! use shardlock_core::{DatabaseId, Driver, LockKey, NodeId, Session};
//! use shardlock_sqlite::SqliteDriver;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = std::env::temp_dir().join(format!("shardlock-doc-{}", std::process::id()));
//! let driver = SqliteDriver::open(&dir)?;
//! let db = DatabaseId::new("main");
//! let mut a = driver.connect(&db, &NodeId::new("a")).await?;
//! let mut b = driver.connect(&db, &NodeId::new("b")).await?;
//! let key = LockKey::new("orders")?;
//! assert_eq!(a.try_acquire(&[key.clone()]).await?, vec![true]);
//! assert_eq!(b.try_acquire(&[key.clone()]).await?, vec![false]);
//! a.close().await?;
//! assert_eq!(b.try_acquire(&[key]).await?, vec![true]);
//! # b.close().await?;
//! # std::fs::remove_dir_all(&dir)?;
//! # Ok(())
//! # }
//! ```
#![doc(test(attr(deny(warnings))))]

mod checkpoints;
mod error;
mod fenced;
mod layout;
mod session;
mod status;
mod waiting;
mod worker;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use shardlock_core::{
    Capabilities, DatabaseId, Driver, Error, LockKey, NodeId, ReleaseHints, Result, SessionSignals,
    Support,
};
use tokio::sync::oneshot;

pub use checkpoints::SqliteCheckpoints;
pub use error::SqliteError;
pub use session::SqliteSession;
pub use status::{status, Holder};

use waiting::Waiters;

/// Re-exported so users name the same rusqlite version.
pub use rusqlite;

/// The longest time from a session being ended from outside (its liveness
/// file removed or replaced) or its worker thread dying to its loss signal
/// firing: the worker's check interval (50 ms) plus a margin for one lock
/// attempt and scheduling.
pub const LOSS_DETECTION_BOUND: Duration = Duration::from_millis(100);

/// The longest time from a
/// [`release_announced`](shardlock_core::Session::release_announced)
/// returning to the announcement reaching another session's
/// [`ReleaseHints`], on an idle or waiting worker: the worker reads the
/// announcements at its 50 ms check (50 ms at most, 25 ms on average),
/// plus a margin for the command it may be serving meanwhile (a
/// blocking-acquire slice ends within about 50 ms) and scheduling. A worker
/// busy with a long command (a batch of thousands of keys) reads them once
/// that command is done.
pub const RELEASE_HINT_BOUND: Duration = Duration::from_millis(100);

/// Fires the session's loss signal if the worker thread ends without
/// finishing normally (a panic): its connections close as it unwinds, so
/// its locks are gone.
struct FireIfUnwinding(Option<SessionSignals>);

impl Drop for FireIfUnwinding {
    fn drop(&mut self) {
        if let Some(signals) = self.0.take() {
            signals.fire_lost("the session's worker thread stopped unexpectedly");
        }
    }
}

/// Opens sessions on a lock directory. Clones share the configuration.
#[derive(Clone)]
pub struct SqliteDriver {
    inner: Arc<Inner>,
}

struct Inner {
    dir: PathBuf,
    sessions: AtomicU64,
    waiters: Waiters,
}

impl SqliteDriver {
    /// Uses `dir` as the lock directory, creating it if missing. The first
    /// call in a process also raises the soft open-file limit
    /// (`RLIMIT_NOFILE`) to the hard limit: each held key keeps a file open.
    ///
    /// # Errors
    ///
    /// [`SqliteError::Unwritable`] if it cannot be created or written;
    /// [`SqliteError::NotALockDirectory`] if it exists, is not empty and is
    /// not a lock directory (so a wrong path never gets littered).
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, SqliteError> {
        let dir = dir.as_ref().to_path_buf();
        layout::prepare(&dir)?;
        error::raise_open_file_limit();
        Ok(Self {
            inner: Arc::new(Inner {
                dir,
                sessions: AtomicU64::new(0),
                waiters: Waiters::default(),
            }),
        })
    }

    /// The lock directory.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// How many sessions of this driver (and its clones) wait in
    /// [`acquire`](shardlock_core::Session::acquire) for `key` in `database`
    /// right now, counted from when the session's worker starts trying the
    /// key until it answers. For tests and metrics: waiters in other
    /// processes, or of a driver opened separately on the same directory,
    /// are not seen (SQLite keeps no queue to ask).
    pub fn waiting(&self, database: &DatabaseId, key: &LockKey) -> usize {
        self.inner.waiters.count(database, key)
    }
}

impl fmt::Debug for SqliteDriver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteDriver")
            .field("dir", &self.inner.dir)
            .finish()
    }
}

impl Driver for SqliteDriver {
    type Session = SqliteSession;

    fn name(&self) -> &'static str {
        "sqlite"
    }

    async fn connect(&self, database: &DatabaseId, node: &NodeId) -> Result<SqliteSession> {
        let n = self.inner.sessions.fetch_add(1, Ordering::Relaxed);
        let name = format!(
            "{}-{}-{n}-{:04x}",
            sanitize(node.as_str()),
            std::process::id(),
            fastrand_u16()
        );
        let (tx, rx) = std::sync::mpsc::channel();
        let (ready_tx, ready_rx) = oneshot::channel();
        let hints = ReleaseHints::new();
        let signals = SessionSignals::new().with_release_hints(hints.clone());
        let (root, db, node_id, session_name, worker_signals, waiters) = (
            self.inner.dir.clone(),
            database.clone(),
            node.clone(),
            name.clone(),
            signals.clone(),
            self.inner.waiters.clone(),
        );
        let spawned = std::thread::Builder::new()
            .name(format!("shardlock-sqlite-{n}"))
            .spawn(move || {
                let mut guard = FireIfUnwinding(Some(worker_signals.clone()));
                match worker::Worker::open(
                    &root,
                    &db,
                    &node_id,
                    session_name,
                    worker_signals,
                    waiters,
                    hints,
                ) {
                    Ok(worker) => {
                        let _ = ready_tx.send(Ok(()));
                        worker.run(rx);
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
                guard.0 = None;
            });
        spawned.map_err(|e| Error::connect(database, SqliteError::io(&self.inner.dir, e)))?;
        match ready_rx.await {
            Ok(Ok(())) => {
                let liveness =
                    layout::session_file(&layout::database_dir(&self.inner.dir, database), &name);
                Ok(SqliteSession::new(
                    tx,
                    database.clone(),
                    name,
                    liveness,
                    signals,
                ))
            }
            Ok(Err(e)) => Err(Error::connect(database, e)),
            Err(_) => Err(Error::connect(database, SqliteError::WorkerGone)),
        }
    }

    /// An emulated loss signal (the worker polls its liveness file), within
    /// [`LOSS_DETECTION_BOUND`]; emulated release hints (the worker reads
    /// the registry's announcements at the same check), within
    /// [`RELEASE_HINT_BOUND`]; and a native probe: it takes nothing (it
    /// reads the registry's live holders, see the crate docs), so
    /// concurrent probes never see each other.
    fn capabilities(&self) -> Capabilities {
        Capabilities::none()
            .with_loss_signal(Support::Emulated, LOSS_DETECTION_BOUND)
            .with_release_hint(Support::Emulated)
            .with_probe(Support::Native)
    }
}

/// A file-name-safe version of a node id.
fn sanitize(node: &str) -> String {
    let cleaned: String = node
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(40)
        .collect();
    if cleaned.is_empty() {
        "node".to_string()
    } else {
        cleaned
    }
}

/// A little randomness for session names without another dependency: the
/// std hasher is randomly seeded per process.
fn fastrand_u16() -> u16 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(
        std::time::SystemTime::now()
            .elapsed()
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0),
    );
    h.finish() as u16
}

/// Runs one unit test again in a child process of this test binary,
/// through `sh -c "<shell>; exec ..."` (e.g. `ulimit -n 64`: a lowered
/// open-file limit without `unsafe`), with `env` set to `dir`; answers the
/// child's exit status. `test` is the test's full path.
#[cfg(all(test, unix))]
pub(crate) fn rerun_in_child(
    shell: &str,
    test: &str,
    env: &str,
    dir: &std::path::Path,
) -> std::process::ExitStatus {
    let exe = std::env::current_exe().unwrap();
    std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("{shell} && exec \"$0\" \"$@\""))
        .arg(exe)
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(env, dir)
        .status()
        .unwrap()
}

/// The open-file limit, in child processes whose soft limit is lowered with
/// the shell's `ulimit -S -n` (no `unsafe` needed here).
#[cfg(all(test, unix))]
mod open_file_limit_tests {
    use shardlock_core::{DatabaseId, Driver, LockKey, NodeId, Session};

    use crate::SqliteDriver;

    const CHILD: &str = "SHARDLOCK_SQLITE_SOFT_LIMIT_CHILD";

    #[test]
    fn opening_the_driver_raises_the_soft_limit_to_the_hard_one() {
        if let Some(dir) = std::env::var_os(CHILD) {
            return child(dir.into());
        }
        let dir =
            std::env::temp_dir().join(format!("shardlock-unit-nofile-{}", std::process::id()));
        // A soft limit of 64 under a hard limit of at least 300; where the
        // hard limit is lower the child cannot show anything.
        let status = crate::rerun_in_child(
            "[ \"$(ulimit -Hn)\" = unlimited ] || [ \"$(ulimit -Hn)\" -ge 300 ] || exit 3; ulimit -S -n 64",
            "open_file_limit_tests::opening_the_driver_raises_the_soft_limit_to_the_hard_one",
            CHILD,
            &dir,
        );
        let _ = std::fs::remove_dir_all(&dir);
        if status.code() == Some(3) {
            eprintln!("SKIPPED: the hard open-file limit is below 300 here, so a raised soft limit cannot be shown");
            return;
        }
        assert!(status.success(), "child: {status:?}");
    }

    fn child(dir: std::path::PathBuf) {
        let (soft, hard) = crate::error::open_file_limit().expect("a limit");
        assert_eq!(soft, 64, "the shell lowered the soft limit");
        assert!(hard >= 300, "hard limit {hard}");
        let driver = SqliteDriver::open(&dir).unwrap();
        let (soft, hard_now) = crate::error::open_file_limit().expect("a limit");
        assert_eq!((soft, hard_now), (hard, hard), "soft raised to hard");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let db = DatabaseId::new("nofile");
            let mut s = driver.connect(&db, &NodeId::new("n")).await.unwrap();
            // More keys than the soft limit the process started with.
            let keys: Vec<LockKey> = (0..200)
                .map(|i| LockKey::new(format!("nofile-{i}")).unwrap())
                .collect();
            let granted = s.try_acquire(&keys).await.unwrap();
            assert_eq!(granted, vec![true; 200]);
            s.close().await.unwrap();
        });
    }
}
