//! Errors of the SQLite driver.

use std::path::PathBuf;

use shardlock_core::Error;

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

impl From<SqliteError> for Error {
    fn from(e: SqliteError) -> Self {
        match e {
            SqliteError::WorkerGone => Error::SessionLost {
                database: String::new(),
                reason: "the session's worker thread is gone".into(),
                source: Some(Box::new(e)),
            },
            other => Error::driver("sqlite", other),
        }
    }
}
