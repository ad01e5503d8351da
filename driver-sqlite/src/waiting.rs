//! Which keys this process's sessions wait for in `acquire`, behind
//! [`SqliteDriver::waiting`](crate::SqliteDriver::waiting).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use shardlock_core::{DatabaseId, LockKey};

/// Waiters per database and key id, shared by a driver, its clones and
/// their sessions' workers.
#[derive(Debug, Clone, Default)]
pub(crate) struct Waiters(Arc<Mutex<HashMap<(DatabaseId, i64), usize>>>);

impl Waiters {
    /// Counts one waiter for `key` in `database` until the guard is dropped.
    pub(crate) fn enter(&self, database: &DatabaseId, key: &LockKey) -> Waiting {
        let slot = (database.clone(), key.id());
        *self.lock().entry(slot.clone()).or_insert(0) += 1;
        Waiting {
            waiters: self.clone(),
            slot,
        }
    }

    /// How many wait for `key` in `database` now.
    pub(crate) fn count(&self, database: &DatabaseId, key: &LockKey) -> usize {
        self.lock()
            .get(&(database.clone(), key.id()))
            .copied()
            .unwrap_or(0)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(DatabaseId, i64), usize>> {
        // The map stays consistent even if a holder of the lock panicked.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One waiter, counted while it lives.
pub(crate) struct Waiting {
    waiters: Waiters,
    slot: (DatabaseId, i64),
}

impl Drop for Waiting {
    fn drop(&mut self) {
        let mut map = self.waiters.lock();
        if let Some(n) = map.get_mut(&self.slot) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.slot);
            }
        }
    }
}
