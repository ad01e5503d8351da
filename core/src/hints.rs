//! Release hints: other nodes announce the locks they give back, so a node
//! with room tries at once instead of at its next poll.
//!
//! A node that stops, or gives up surplus sets to balance, releases their
//! keys with [`Session::release_announced`](crate::Session::release_announced).
//! A driver that can tell the database's other sessions (Postgres `NOTIFY`
//! in the same round trip as the unlock, the memory server's channel, a
//! counter SQLite sessions watch) records the announcement in each of those
//! sessions' [`ReleaseHints`] and wakes their coordinators. Hints are only
//! hints: a missed one costs a poll interval, never correctness; polling
//! stays the fallback and the crash path.
//!
//! An announcement also says which keys were handed over **cleanly**: their
//! previous holder stopped their work before releasing them. The next holder
//! may start such a set at once instead of after its takeover delay (see
//! the coordinator's module docs). A clean mark is used by the first
//! `try_acquire` of that key after the announcement, granted or not, and
//! then forgotten, so a stale mark never shortens a later takeover.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::key::LockKey;

/// How long a clean mark is kept when its key is never tried.
pub const CLEAN_MARK_TTL: Duration = Duration::from_secs(30);

/// Announcements other sessions of one database made (see the module docs).
///
/// Clones share the same state: the driver keeps one to record into, the
/// session's [`SessionSignals`](crate::SessionSignals) hands out the others.
#[derive(Clone, Default)]
pub struct ReleaseHints {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    notify: Notify,
    clean: Mutex<HashMap<i64, Instant>>,
    received: AtomicU64,
}

impl ReleaseHints {
    /// Hints with nothing announced yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records that another session released keys; `clean` are the ids
    /// ([`LockKey::id`]) of those it handed over cleanly. Wakes the waiter of
    /// [`released`](Self::released). Drivers call it; it never blocks.
    pub fn announce(&self, clean: impl IntoIterator<Item = i64>) {
        let now = Instant::now();
        {
            let mut marks = self
                .inner
                .clean
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            marks.retain(|_, at| now.duration_since(*at) < CLEAN_MARK_TTL);
            for id in clean {
                marks.insert(id, now);
            }
        }
        self.inner.received.fetch_add(1, Ordering::Relaxed);
        self.inner.notify.notify_one();
    }

    /// Completes at the next announcement (or at once if one arrived since
    /// the last call completed): a single waiter, the session's coordinator.
    pub async fn released(&self) {
        self.inner.notify.notified().await;
    }

    /// Whether `key`'s last release was announced clean (within
    /// [`CLEAN_MARK_TTL`]); the mark is forgotten either way.
    pub fn take_clean(&self, key: &LockKey) -> bool {
        let mut marks = self
            .inner
            .clean
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        marks
            .remove(&key.id())
            .is_some_and(|at| at.elapsed() < CLEAN_MARK_TTL)
    }

    /// [`take_clean`](Self::take_clean) for every key of a batch, in order,
    /// under one lock: a coordinator trying 10,000 keys takes the lock once,
    /// and looks nothing up while no mark is kept (the usual case).
    pub fn take_clean_many<'a>(
        &self,
        keys: impl ExactSizeIterator<Item = &'a LockKey>,
    ) -> Vec<bool> {
        let mut marks = self
            .inner
            .clean
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if marks.is_empty() {
            return vec![false; keys.len()];
        }
        keys.map(|key| {
            marks
                .remove(&key.id())
                .is_some_and(|at| at.elapsed() < CLEAN_MARK_TTL)
        })
        .collect()
    }

    /// How many announcements arrived (for tests and metrics).
    pub fn received(&self) -> u64 {
        self.inner.received.load(Ordering::Relaxed)
    }
}

/// The ids of the keys `clean` marks as handed over cleanly, for drivers
/// implementing [`Session::release_announced`](crate::Session::release_announced):
/// `clean[i]` answers `keys[i]`, a missing entry is not clean, and a key
/// listed more than once is clean only if every entry says so (a mark
/// shortens the next holder's takeover delay, so doubt counts as not clean).
pub fn clean_ids(keys: &[LockKey], clean: &[bool]) -> HashSet<i64> {
    let mut marks: HashMap<i64, bool> = HashMap::with_capacity(keys.len());
    for (i, key) in keys.iter().enumerate() {
        let this = clean.get(i).copied().unwrap_or(false);
        let _ = marks
            .entry(key.id())
            .and_modify(|all| *all &= this)
            .or_insert(this);
    }
    marks
        .into_iter()
        .filter_map(|(id, all)| all.then_some(id))
        .collect()
}

impl fmt::Debug for ReleaseHints {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let marks = self.inner.clean.lock().map(|m| m.len()).unwrap_or_default();
        f.debug_struct("ReleaseHints")
            .field("received", &self.received())
            .field("clean_marks", &marks)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_announcement_wakes_and_marks_clean_keys_once() {
        let hints = ReleaseHints::new();
        let a = LockKey::new("a").unwrap();
        let b = LockKey::new("b").unwrap();
        hints.announce([a.id()]);
        tokio::time::timeout(Duration::from_secs(1), hints.released())
            .await
            .expect("a stored wake-up completes at once");
        assert_eq!(hints.received(), 1);
        assert!(!hints.take_clean(&b), "b was not announced clean");
        assert!(hints.take_clean(&a));
        assert!(!hints.take_clean(&a), "a mark is used once");
    }

    #[test]
    fn a_batch_takes_each_mark_once_in_order() {
        let hints = ReleaseHints::new();
        let k: Vec<LockKey> = (0..3)
            .map(|i| LockKey::new(format!("k{i}")).unwrap())
            .collect();
        assert_eq!(hints.take_clean_many(k.iter()), [false; 3], "no marks");
        hints.announce([k[0].id(), k[2].id()]);
        assert_eq!(hints.take_clean_many(k.iter()), [true, false, true]);
        assert_eq!(hints.take_clean_many(k.iter()), [false; 3], "used once");
    }

    #[test]
    fn a_key_is_clean_only_if_every_entry_says_so() {
        let k: Vec<LockKey> = (0..3)
            .map(|i| LockKey::new(format!("k{i}")).unwrap())
            .collect();
        let keys = [k[0].clone(), k[1].clone(), k[0].clone(), k[2].clone()];
        let ids = clean_ids(&keys, &[true, true, false]);
        assert_eq!(ids, HashSet::from([k[1].id()]), "k0 doubted, k2 unmarked");
    }

    #[tokio::test]
    async fn no_announcement_no_wake() {
        let hints = ReleaseHints::new();
        let waited = tokio::time::timeout(Duration::from_millis(20), hints.released()).await;
        assert!(waited.is_err());
    }
}
