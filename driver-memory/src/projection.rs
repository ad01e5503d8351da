//! In-memory event log and checkpoint store, for tests and examples.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};

use shardlock_core::{
    BoxError, Checkpoint, CheckpointError, CheckpointStore, EventReader, Positioned,
};

/// An append-only event log; positions start at 1. Clones share the log.
#[derive(Debug)]
pub struct MemoryEventLog<E> {
    events: Arc<RwLock<Vec<Positioned<E>>>>,
}

impl<E> Clone for MemoryEventLog<E> {
    fn clone(&self) -> Self {
        Self {
            events: Arc::clone(&self.events),
        }
    }
}

impl<E> Default for MemoryEventLog<E> {
    fn default() -> Self {
        Self {
            events: Arc::new(RwLock::new(Vec::new())),
        }
    }
}

impl<E: Clone + Send + Sync> MemoryEventLog<E> {
    /// An empty log.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends an event and returns its position.
    pub fn append(&self, event: E) -> i64 {
        let mut events = self.events.write().unwrap_or_else(|p| p.into_inner());
        let position = events.len() as i64 + 1;
        events.push(Positioned { position, event });
        position
    }

    /// Number of events.
    pub fn len(&self) -> usize {
        self.events.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Whether the log is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<E: Clone + Send + Sync> EventReader for MemoryEventLog<E> {
    type Event = E;

    async fn read_after(&self, after: i64, limit: usize) -> Result<Vec<Positioned<E>>, BoxError> {
        let events = self.events.read().unwrap_or_else(|p| p.into_inner());
        let start = usize::try_from(after.max(0))
            .unwrap_or(usize::MAX)
            .min(events.len());
        Ok(events[start..].iter().take(limit).cloned().collect())
    }
}

/// Checkpoints with fencing epochs, in this process. Clones share the
/// store.
///
/// Opened like every checkpoint store, with `connect` (see
/// [`shardlock_core`'s projection docs](shardlock_core::CheckpointStore)):
///
/// ```
/// use shardlock_core::CheckpointStore;
/// use shardlock_memory::MemoryCheckpoints;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), shardlock_core::CheckpointError> {
/// let store = MemoryCheckpoints::connect().await?;
/// let claimed = store.claim("orders-view").await?;
/// store.save("orders-view", claimed.epoch, 42).await?;
/// assert_eq!(store.load("orders-view").await?.map(|c| c.position), Some(42));
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, Default)]
pub struct MemoryCheckpoints {
    rows: Arc<Mutex<HashMap<String, Checkpoint>>>,
}

impl MemoryCheckpoints {
    /// A fresh, empty in-process table: the memory form of every store's
    /// `connect(target)` (there is nothing to reach, so it never fails).
    /// Share one store between nodes by cloning it.
    ///
    /// # Errors
    ///
    /// None; the `Result` is the shape every checkpoint store answers.
    pub async fn connect() -> Result<Self, CheckpointError> {
        Ok(Self::new())
    }

    /// The same as [`connect`](Self::connect), for code that is not async.
    pub fn new() -> Self {
        Self::default()
    }
}

impl CheckpointStore for MemoryCheckpoints {
    async fn claim(&self, subscription: &str) -> Result<Checkpoint, CheckpointError> {
        let mut rows = self.rows.lock().unwrap_or_else(|p| p.into_inner());
        let row = rows.entry(subscription.to_string()).or_insert(Checkpoint {
            position: 0,
            epoch: 0,
        });
        row.epoch += 1;
        Ok(*row)
    }

    async fn load(&self, subscription: &str) -> Result<Option<Checkpoint>, CheckpointError> {
        Ok(self
            .rows
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(subscription)
            .copied())
    }

    /// Refused saves change nothing: a subscription never claimed stays
    /// absent ([`CheckpointError::NotClaimed`]).
    async fn save(
        &self,
        subscription: &str,
        epoch: i64,
        position: i64,
    ) -> Result<(), CheckpointError> {
        let mut rows = self.rows.lock().unwrap_or_else(|p| p.into_inner());
        let row = match rows.get_mut(subscription) {
            Some(row) if epoch >= 1 => row,
            _ => {
                return Err(CheckpointError::NotClaimed {
                    subscription: subscription.to_string(),
                })
            }
        };
        if row.epoch != epoch {
            return Err(CheckpointError::FencedOff {
                subscription: subscription.to_string(),
                ours: epoch,
                current: row.epoch,
            });
        }
        row.position = row.position.max(position);
        Ok(())
    }
}
