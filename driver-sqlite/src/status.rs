//! Who holds what in a lock directory, for `shardlock status`.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::params;
use shardlock_core::DatabaseId;

use crate::error::SqliteError;
use crate::layout;
use crate::worker::{open_registry, session_alive};

/// One held lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    /// The database (folder) it lives in.
    pub database: String,
    /// The key's id.
    pub key_id: i64,
    /// The key's name.
    pub name: String,
    /// The holding node.
    pub node: String,
    /// The holding process.
    pub pid: u32,
    /// The holding session.
    pub session: String,
    /// Since when.
    pub since: SystemTime,
}

/// Lists the locks held in the lock directory `dir`, checking that each
/// holder's session is alive (rows of dead sessions are removed).
///
/// Blocking (file I/O): call it from `spawn_blocking` in async code.
///
/// # Errors
///
/// [`SqliteError::NotALockDirectory`] if `dir` is not a lock directory;
/// SQLite errors reading the registry.
pub fn status(dir: &Path) -> Result<Vec<Holder>, SqliteError> {
    if !dir.join(layout::MARKER).is_file() {
        return Err(SqliteError::NotALockDirectory {
            path: dir.to_path_buf(),
            marker: layout::MARKER,
        });
    }
    let path = layout::registry(dir);
    let conn = open_registry(dir)?;
    let sql_err = |e| SqliteError::sqlite(&path, e);
    let mut sessions: HashMap<String, (String, String, u32)> = HashMap::new();
    {
        let mut stmt = conn
            .prepare("SELECT session, database, node, pid FROM sessions")
            .map_err(sql_err)?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, u32>(3)?,
                ))
            })
            .map_err(sql_err)?;
        for row in rows {
            let (session, database, node, pid) = row.map_err(sql_err)?;
            sessions.insert(session, (database, node, pid));
        }
    }
    let mut dead = Vec::new();
    for (session, (database, _, _)) in &sessions {
        if !session_alive(dir, &DatabaseId::new(database), session) {
            dead.push(session.clone());
        }
    }
    for session in &dead {
        sessions.remove(session);
        let _ = conn.execute("DELETE FROM holders WHERE session = ?1", params![session]);
        let _ = conn.execute("DELETE FROM sessions WHERE session = ?1", params![session]);
    }
    let mut stmt = conn
        .prepare("SELECT database, key_id, name, session, since FROM holders ORDER BY name")
        .map_err(sql_err)?;
    let rows = stmt
        .query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, i64>(4)?,
            ))
        })
        .map_err(sql_err)?;
    let mut out = Vec::new();
    for row in rows {
        let (database, key_id, name, session, since) = row.map_err(sql_err)?;
        let Some((_, node, pid)) = sessions.get(&session) else {
            continue;
        };
        out.push(Holder {
            database,
            key_id,
            name,
            node: node.clone(),
            pid: *pid,
            session,
            since: UNIX_EPOCH + Duration::from_secs(u64::try_from(since).unwrap_or(0)),
        });
    }
    Ok(out)
}
