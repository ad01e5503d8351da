//! Errors of the SQLite driver, and what each means for a session
//! ([`DriverError`]): they reach users as the source of a
//! [`shardlock_core::Error`], mapped once by [`Error::from_driver`] (session
//! calls) or [`Error::connect`] (opening a session).
//!
//! [`Error::from_driver`]: shardlock_core::Error::from_driver
//! [`Error::connect`]: shardlock_core::Error::connect

use std::path::PathBuf;

use shardlock_core::{DriverError, ErrorKind};

/// What went wrong in the SQLite driver.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SqliteError {
    /// The lock directory cannot be created or written.
    #[error("lock directory {path} is not writable: {source}")]
    Unwritable {
        /// The directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The path exists but is not a shardlock lock directory (no marker file
    /// and not empty), so the driver refuses to write into it.
    #[error(
        "{path} is not a shardlock lock directory (it is not empty and has no {marker} file); \
         point the driver at an empty or new directory"
    )]
    NotALockDirectory {
        /// The directory.
        path: PathBuf,
        /// The marker file name.
        marker: &'static str,
    },
    /// A lock file exists but is not an SQLite database.
    #[error("lock file {path} is corrupt or not an SQLite file: {source}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// SQLite's error.
        #[source]
        source: rusqlite::Error,
    },
    /// An SQLite call failed.
    #[error("SQLite error on {path}: {source}")]
    Sqlite {
        /// The file.
        path: PathBuf,
        /// SQLite's error.
        #[source]
        source: rusqlite::Error,
    },
    /// A file-system call failed.
    #[error("I/O error on {path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The session's worker thread is gone (it panicked or was never started).
    #[error("the session's worker thread is gone")]
    WorkerGone,
    /// The session was ended: its liveness file was removed or replaced (an
    /// operator ended it), or its lock files are no longer held. Its locks
    /// are freed.
    #[error("the session was ended: {reason}")]
    SessionEnded {
        /// What showed it.
        reason: String,
    },
    /// The process ran out of file descriptors while locking a key: each
    /// held key keeps one file open, so the open-file limit bounds how many
    /// keys one process can hold. The batch that hit it was rolled back.
    /// [`SqliteDriver::open`](crate::SqliteDriver::open) already raised the
    /// soft limit to the hard one, so it is the hard limit to raise.
    #[error(
        "too many open files while locking {path} (this session held {held} keys; each held key \
         keeps one file open; {}): raise the process's hard open-file limit (`ulimit -Hn` before \
         starting it, `LimitNOFILE=` for a systemd service, `nofile` in limits.conf) above the \
         number of keys a node may hold, plus a margin; the driver raises the soft limit (`ulimit \
         -n`) to the hard one itself",
        limit_text(*.limit)
    )]
    TooManyOpenFiles {
        /// The lock file that could not be opened.
        path: PathBuf,
        /// How many keys the session held at that moment.
        held: usize,
        /// The process's open-file limit then, soft and hard (`None` where
        /// it cannot be read).
        limit: Option<(u64, u64)>,
        /// The operating system's error (`EMFILE` / `ENFILE`).
        #[source]
        source: std::io::Error,
    },
}

impl SqliteError {
    pub(crate) fn sqlite(path: impl Into<PathBuf>, source: rusqlite::Error) -> Self {
        let path = path.into();
        match source.sqlite_error_code() {
            Some(rusqlite::ErrorCode::NotADatabase | rusqlite::ErrorCode::DatabaseCorrupt) => {
                Self::Corrupt { path, source }
            }
            _ => Self::Sqlite { path, source },
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}

impl DriverError for SqliteError {
    fn driver(&self) -> &'static str {
        "sqlite"
    }

    fn kind(&self) -> ErrorKind {
        match self {
            // The session's locks are gone or unknown.
            Self::WorkerGone | Self::SessionEnded { .. } => ErrorKind::SessionFatal,
            // Retrying fails the same way until someone changes something:
            // a path, a file, a limit.
            Self::Unwritable { .. }
            | Self::NotALockDirectory { .. }
            | Self::Corrupt { .. }
            | Self::TooManyOpenFiles { .. } => ErrorKind::Config,
            Self::Sqlite { .. } | Self::Io { .. } => ErrorKind::Other,
        }
    }
}

/// The open-file limit as the error message shows it.
fn limit_text(limit: Option<(u64, u64)>) -> String {
    match limit {
        Some((soft, hard)) if soft == hard => format!("the open-file limit is {soft}"),
        Some((soft, hard)) => format!("the open-file limit is {soft} (hard limit {hard})"),
        None => "the open-file limit is unknown".to_string(),
    }
}

/// The process's open-file limit (`RLIMIT_NOFILE`): soft and hard; `None`
/// where there is no such limit or it cannot be read.
pub(crate) fn open_file_limit() -> Option<(u64, u64)> {
    #[cfg(unix)]
    {
        rlimit::Resource::NOFILE.get().ok()
    }
    #[cfg(not(unix))]
    {
        None
    }
}

/// Raises the soft open-file limit to the hard one, once per process: each
/// held key keeps a file open, and a soft limit of 1,024 (a common default)
/// would cap a node at about a thousand keys although the hard limit allows
/// far more. Answers the limit in force, soft and hard.
pub(crate) fn raise_open_file_limit() -> Option<(u64, u64)> {
    static RAISED: std::sync::Once = std::sync::Once::new();
    RAISED.call_once(|| {
        let before = open_file_limit();
        match rlimit::increase_nofile_limit(u64::MAX) {
            Ok(now) => {
                if before.is_some_and(|(soft, _)| soft < now) {
                    tracing::debug!(
                        from = before.map(|(soft, _)| soft),
                        to = now,
                        "raised the soft open-file limit to the hard limit"
                    );
                }
            }
            Err(e) => tracing::warn!(
                error = %e,
                limit = ?before,
                "cannot raise the soft open-file limit; each held key keeps a file open"
            ),
        }
    });
    open_file_limit()
}

/// Whether an I/O error says the process (`EMFILE`) or the system
/// (`ENFILE`) ran out of file descriptors.
pub(crate) fn is_too_many_open_files(e: &std::io::Error) -> bool {
    // Not in `std::io::ErrorKind` (stable), so by raw code, per platform.
    #[cfg(unix)]
    const CODES: &[i32] = &[23 /* ENFILE */, 24 /* EMFILE */];
    #[cfg(windows)]
    const CODES: &[i32] = &[4 /* ERROR_TOO_MANY_OPEN_FILES */];
    #[cfg(not(any(unix, windows)))]
    const CODES: &[i32] = &[];
    e.raw_os_error().is_some_and(|code| CODES.contains(&code))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn too_many_open_files_names_the_limit_and_is_not_session_fatal() {
        let err = SqliteError::TooManyOpenFiles {
            path: PathBuf::from("/locks/main/keys/00.lock"),
            held: 1021,
            limit: Some((1024, 4096)),
            source: std::io::Error::from_raw_os_error(24),
        };
        let text = err.to_string();
        assert!(text.contains("ulimit -Hn"), "{text}");
        assert!(text.contains("LimitNOFILE="), "{text}");
        assert!(
            text.contains("the open-file limit is 1024 (hard limit 4096)"),
            "{text}"
        );
        assert!(limit_text(Some((7, 7))).ends_with("is 7"));
        assert_eq!(err.kind(), ErrorKind::Config);
        let mapped = shardlock_core::Error::from_driver(&shardlock_core::DatabaseId::new("m"), err);
        assert!(!mapped.is_session_fatal());
        #[cfg(unix)]
        assert!(is_too_many_open_files(&std::io::Error::from_raw_os_error(
            24
        )));
        assert!(!is_too_many_open_files(&std::io::Error::other("x")));
    }

    #[test]
    fn a_dead_worker_is_session_fatal() {
        let db = shardlock_core::DatabaseId::new("m");
        let err = shardlock_core::Error::from_driver(&db, SqliteError::WorkerGone);
        assert!(err.is_session_fatal());
        assert!(
            matches!(err, shardlock_core::Error::SessionLost { database, .. } if database == db)
        );
    }
}
