//! Where things live in a lock directory.
//!
//! ```text
//! <dir>/.shardlock-lockdir          marker: this is a lock directory (format v1)
//! <dir>/registry.db                 who holds what (`shardlock status`, probes), announced releases
//! <dir>/<database>/keys/<id>.lock   one SQLite file per key; held = open write transaction
//! <dir>/<database>/sessions/<s>.lock one per live session, held the same way
//! ```
//!
//! `<id>` is the key's 64-bit id in 16 hex digits. `<database>` is the
//! database id when it is plain (`[A-Za-z0-9_-]`, at most 64 bytes), else
//! `x-` and the hex FNV-1a hash of it, so any name maps to a safe folder.

use std::fs;
use std::path::{Path, PathBuf};

use shardlock_core::{DatabaseId, LockKey};

use crate::error::SqliteError;

/// The marker file that makes a folder a lock directory.
pub(crate) const MARKER: &str = ".shardlock-lockdir";
const MARKER_TEXT: &str = "shardlock lock directory, format 1\n";

/// Checks (creating if missing) that `dir` is a lock directory.
pub(crate) fn prepare(dir: &Path) -> Result<(), SqliteError> {
    let unwritable = |source| SqliteError::Unwritable {
        path: dir.to_path_buf(),
        source,
    };
    match fs::metadata(dir) {
        Ok(meta) if !meta.is_dir() => {
            return Err(SqliteError::NotALockDirectory {
                path: dir.to_path_buf(),
                marker: MARKER,
            })
        }
        Ok(_) => {
            if !dir.join(MARKER).is_file() {
                // Only our own start-up artifacts may be there: another
                // process may be creating this directory right now.
                let foreign = fs::read_dir(dir).map_err(unwritable)?.any(|entry| {
                    entry.map_or(true, |e| {
                        let name = e.file_name();
                        let name = name.to_string_lossy();
                        !(name.starts_with(MARKER) || name.starts_with(".probe-"))
                    })
                });
                if foreign {
                    return Err(SqliteError::NotALockDirectory {
                        path: dir.to_path_buf(),
                        marker: MARKER,
                    });
                }
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            fs::create_dir_all(dir).map_err(unwritable)?;
        }
        Err(e) => return Err(unwritable(e)),
    }
    let marker = dir.join(MARKER);
    if !marker.is_file() {
        // Write then rename, so nobody ever sees a half-written marker.
        let tmp = dir.join(format!("{MARKER}.{}.tmp", std::process::id()));
        fs::write(&tmp, MARKER_TEXT).map_err(unwritable)?;
        fs::rename(&tmp, &marker).map_err(unwritable)?;
    }
    // Prove we can create files here, not just read.
    let probe = dir.join(format!(".probe-{}", std::process::id()));
    fs::write(&probe, b"").map_err(unwritable)?;
    let _ = fs::remove_file(&probe);
    Ok(())
}

/// The folder of one database.
pub(crate) fn database_dir(dir: &Path, database: &DatabaseId) -> PathBuf {
    let name = database.as_str();
    let plain = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if plain {
        dir.join(name)
    } else {
        let hash = LockKey::new(name)
            .map(|k| k.id_u64())
            .unwrap_or_else(|_| name.len() as u64);
        dir.join(format!("x-{hash:016x}"))
    }
}

/// The lock file of `key` in a database folder.
pub(crate) fn key_file(db_dir: &Path, key: &LockKey) -> PathBuf {
    db_dir
        .join("keys")
        .join(format!("{:016x}.lock", key.id_u64()))
}

/// The liveness file of a session.
pub(crate) fn session_file(db_dir: &Path, session: &str) -> PathBuf {
    db_dir.join("sessions").join(format!("{session}.lock"))
}

/// The registry database.
pub(crate) fn registry(dir: &Path) -> PathBuf {
    dir.join("registry.db")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_database_names_are_kept_and_others_hashed() {
        let root = Path::new("/locks");
        assert_eq!(
            database_dir(root, &DatabaseId::new("tenant_7")),
            root.join("tenant_7")
        );
        for hostile in ["../etc", "a/b", "", ".hidden", "日本", &"x".repeat(65)] {
            let dir = database_dir(root, &DatabaseId::new(hostile));
            let leaf = dir.file_name().and_then(|f| f.to_str()).unwrap_or_default();
            assert!(
                leaf.starts_with("x-") && leaf.len() == 18,
                "{hostile:?} -> {leaf}"
            );
            assert_eq!(dir.parent(), Some(root));
        }
    }

    #[test]
    fn prepare_refuses_foreign_folders_and_files() {
        let base = std::env::temp_dir().join(format!("shardlock-layout-{}", std::process::id()));
        let _ = fs::remove_dir_all(&base);
        fs::create_dir_all(base.join("foreign")).unwrap();
        fs::write(base.join("foreign/data.txt"), "x").unwrap();
        assert!(matches!(
            prepare(&base.join("foreign")),
            Err(SqliteError::NotALockDirectory { .. })
        ));
        fs::write(base.join("file"), "x").unwrap();
        assert!(matches!(
            prepare(&base.join("file")),
            Err(SqliteError::NotALockDirectory { .. })
        ));
        prepare(&base.join("new/nested")).unwrap();
        prepare(&base.join("new/nested")).unwrap();
        // A directory another process is initialising right now is fine.
        fs::create_dir_all(base.join("racing")).unwrap();
        fs::write(base.join("racing").join(format!("{MARKER}.42.tmp")), "x").unwrap();
        fs::write(base.join("racing/.probe-42"), "").unwrap();
        prepare(&base.join("racing")).unwrap();
        assert!(base.join("new/nested").join(MARKER).is_file());
        let _ = fs::remove_dir_all(&base);
    }
}
