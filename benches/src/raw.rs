//! The raw baselines: the same lock operations done directly, without
//! shardlock, over one connection of the same kind.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use shardlock_postgres::sqlx::postgres::{PgConnectOptions, PgConnection};
use shardlock_postgres::sqlx::{self, Connection, Executor};
use shardlock_sqlite::rusqlite::{self, ErrorCode, OpenFlags};

/// The memory baseline: a lock table as a `Mutex<HashMap<key, owner>>`.
#[derive(Debug, Default)]
pub struct RawMemoryLocks {
    table: Mutex<HashMap<i64, u64>>,
}

impl RawMemoryLocks {
    fn table(&self) -> MutexGuard<'_, HashMap<i64, u64>> {
        // One insert or remove per critical section: never left torn.
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes `key` for `owner` if free (or already `owner`'s).
    pub fn try_lock(&self, key: i64, owner: u64) -> bool {
        *self.table().entry(key).or_insert(owner) == owner
    }

    /// Takes each of `keys` that is free, under one lock of the table.
    pub fn try_lock_many(&self, keys: &[i64], owner: u64) -> Vec<bool> {
        let mut table = self.table();
        keys.iter()
            .map(|key| *table.entry(*key).or_insert(owner) == owner)
            .collect()
    }

    /// Frees `key` if `owner` holds it.
    pub fn unlock(&self, key: i64, owner: u64) -> bool {
        let mut table = self.table();
        if table.get(&key) == Some(&owner) {
            table.remove(&key);
            true
        } else {
            false
        }
    }

    /// Frees every key of `owner`.
    pub fn unlock_all(&self, owner: u64) {
        self.table().retain(|_, held_by| *held_by != owner);
    }

    /// Whether `owner` holds every one of `keys` (the raw "verify").
    pub fn holds_all(&self, keys: &[i64], owner: u64) -> bool {
        let table = self.table();
        keys.iter().all(|key| table.get(key) == Some(&owner))
    }
}

/// The SQLite baseline: a write transaction (`BEGIN IMMEDIATE`) on a key
/// file, opened the way the driver opens it, on the caller's thread.
#[derive(Debug)]
pub struct RawSqlite;

impl RawSqlite {
    /// Opens `path` (read-write, create, no mutex) and tries `BEGIN
    /// IMMEDIATE` without waiting: `Some(connection)` holds the lock until it
    /// is dropped (closing rolls back), `None` when another connection
    /// holds it.
    ///
    /// # Errors
    ///
    /// Any other SQLite error.
    pub fn try_lock(path: &Path) -> rusqlite::Result<Option<rusqlite::Connection>> {
        Self::lock(path, None)
    }

    /// Like [`try_lock`](Self::try_lock), but waits up to `timeout` with
    /// SQLite's own busy handler (`sqlite3_busy_timeout`: sleeps of 1, 2, 5,
    /// 10, 15, 20, 25, 25, 25, 50, 50, then 100 ms between attempts).
    ///
    /// # Errors
    ///
    /// Any other SQLite error.
    pub fn lock_waiting(
        path: &Path,
        timeout: Duration,
    ) -> rusqlite::Result<Option<rusqlite::Connection>> {
        Self::lock(path, Some(timeout))
    }

    fn lock(path: &Path, wait: Option<Duration>) -> rusqlite::Result<Option<rusqlite::Connection>> {
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = rusqlite::Connection::open_with_flags(path, flags)?;
        conn.busy_timeout(wait.unwrap_or(Duration::ZERO))?;
        match conn.execute_batch("BEGIN IMMEDIATE") {
            Ok(()) => Ok(Some(conn)),
            Err(e)
                if matches!(
                    e.sqlite_error_code(),
                    Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked)
                ) =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }
}

/// The PostgreSQL baseline: one plain sqlx `PgConnection` sending the
/// advisory-lock statements directly (prepared and cached by sqlx, as the
/// driver's are).
#[derive(Debug)]
pub struct RawPg {
    conn: PgConnection,
}

impl RawPg {
    /// `select pg_try_advisory_lock($1)`.
    pub const TRY_LOCK: &'static str = "select pg_try_advisory_lock($1)";
    /// `select pg_advisory_unlock($1)`.
    pub const UNLOCK: &'static str = "select pg_advisory_unlock($1)";
    /// `select pg_advisory_lock($1)`.
    pub const LOCK: &'static str = "select pg_advisory_lock($1)";
    /// The raw batch: `select pg_try_advisory_lock(k) from unnest($1::bigint[]) k`.
    pub const TRY_LOCK_MANY: &'static str =
        "select pg_try_advisory_lock(k) from unnest($1::bigint[]) k";
    /// `select pg_advisory_unlock_all()`.
    pub const UNLOCK_ALL: &'static str = "select pg_advisory_unlock_all()";
    /// The raw "still held" check: how many advisory locks this backend
    /// holds, in one round trip.
    pub const COUNT_HELD: &'static str = "select count(*) from pg_locks \
         where locktype = 'advisory' and pid = pg_backend_pid() and granted";

    /// Connects with `options`.
    ///
    /// # Errors
    ///
    /// sqlx's connect error.
    pub async fn connect(options: &PgConnectOptions) -> sqlx::Result<Self> {
        Ok(Self {
            conn: PgConnection::connect_with(options).await?,
        })
    }

    /// The connection itself.
    pub fn conn(&mut self) -> &mut PgConnection {
        &mut self.conn
    }

    /// `pg_try_advisory_lock(key)`.
    ///
    /// # Errors
    ///
    /// sqlx's error.
    pub async fn try_lock(&mut self, key: i64) -> sqlx::Result<bool> {
        sqlx::query_scalar(Self::TRY_LOCK)
            .bind(key)
            .fetch_one(&mut self.conn)
            .await
    }

    /// `pg_advisory_unlock(key)`.
    ///
    /// # Errors
    ///
    /// sqlx's error.
    pub async fn unlock(&mut self, key: i64) -> sqlx::Result<bool> {
        sqlx::query_scalar(Self::UNLOCK)
            .bind(key)
            .fetch_one(&mut self.conn)
            .await
    }

    /// `pg_advisory_lock(key)`: waits until granted.
    ///
    /// # Errors
    ///
    /// sqlx's error.
    pub async fn lock(&mut self, key: i64) -> sqlx::Result<()> {
        sqlx::query(Self::LOCK)
            .bind(key)
            .execute(&mut self.conn)
            .await
            .map(drop)
    }

    /// The raw batch over `unnest`, one round trip.
    ///
    /// # Errors
    ///
    /// sqlx's error.
    pub async fn try_lock_many(&mut self, keys: &[i64]) -> sqlx::Result<Vec<bool>> {
        sqlx::query_scalar(Self::TRY_LOCK_MANY)
            .bind(keys)
            .fetch_all(&mut self.conn)
            .await
    }

    /// `pg_advisory_unlock_all()`.
    ///
    /// # Errors
    ///
    /// sqlx's error.
    pub async fn unlock_all(&mut self) -> sqlx::Result<()> {
        sqlx::query(Self::UNLOCK_ALL)
            .execute(&mut self.conn)
            .await
            .map(drop)
    }

    /// How many advisory locks this backend holds ([`COUNT_HELD`](Self::COUNT_HELD)).
    ///
    /// # Errors
    ///
    /// sqlx's error.
    pub async fn count_held(&mut self) -> sqlx::Result<i64> {
        sqlx::query_scalar(Self::COUNT_HELD)
            .fetch_one(&mut self.conn)
            .await
    }

    /// `pg_backend_pid()`.
    ///
    /// # Errors
    ///
    /// sqlx's error.
    pub async fn backend_pid(&mut self) -> sqlx::Result<i32> {
        sqlx::query_scalar("select pg_backend_pid()")
            .fetch_one(&mut self.conn)
            .await
    }

    /// Closes the connection gracefully.
    ///
    /// # Errors
    ///
    /// sqlx's error.
    pub async fn close(self) -> sqlx::Result<()> {
        let mut conn = self.conn;
        conn.execute(Self::UNLOCK_ALL).await?;
        conn.close().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_baseline_excludes_other_owners() {
        let locks = RawMemoryLocks::default();
        assert!(locks.try_lock(1, 10));
        assert!(locks.try_lock(1, 10), "idempotent for the holder");
        assert!(!locks.try_lock(1, 11));
        assert_eq!(locks.try_lock_many(&[1, 2], 11), vec![false, true]);
        assert!(locks.holds_all(&[2], 11));
        assert!(!locks.holds_all(&[1, 2], 11));
        assert!(!locks.unlock(1, 11));
        locks.unlock_all(10);
        assert!(locks.try_lock(1, 11));
    }

    #[test]
    fn sqlite_baseline_excludes_a_second_connection() {
        let dir = std::env::temp_dir().join(format!("shardlock-raw-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("k.lock");
        let held = RawSqlite::try_lock(&path).unwrap();
        assert!(held.is_some());
        assert!(RawSqlite::try_lock(&path).unwrap().is_none());
        drop(held);
        assert!(RawSqlite::try_lock(&path).unwrap().is_some());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
