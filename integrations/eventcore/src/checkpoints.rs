//! eventcore's `CheckpointStore` over a shardlock checkpoint store and a
//! position table.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};

use eventcore_types::StreamPosition;
use shardlock_core::CheckpointStore;
use tracing::debug;

use crate::error::CheckpointStoreError;
use crate::positions::{position_prefix, PositionTable};

/// eventcore checkpoints kept by a shardlock [`CheckpointStore`] `S`
/// (fencing epoch, position prefix) and a [`PositionTable`] `P` (the exact
/// position).
///
/// # Saving
///
/// A save is **fenced**: it first saves [`position_prefix`] in `S`,
/// conditional on this writer's epoch, then advances the exact position in
/// `P`. A writer whose epoch was superseded gets
/// [`CheckpointStoreError::FencedOff`] and moves nothing. Positions never
/// move backwards (eventcore's runner only saves increasing positions).
///
/// This standalone store is one writer: its first save of a subscription
/// claims it (bumps the epoch, fencing off any earlier writer), later saves
/// are conditional on that epoch. Clones share the claims. Projections run
/// through [`ShardlockBackend`](crate::ShardlockBackend) instead, whose
/// saves are conditional on the epoch claimed when leadership was taken,
/// and refused without leadership.
///
/// # Loading
///
/// [`load`](eventcore_types::CheckpointStore::load) answers the exact
/// position from `P`, `None` before the first save.
#[derive(Clone)]
pub struct ShardlockCheckpoints<S, P> {
    store: S,
    positions: P,
    claimed: Arc<Mutex<HashMap<String, i64>>>,
}

impl<S, P: fmt::Debug> fmt::Debug for ShardlockCheckpoints<S, P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShardlockCheckpoints")
            .field("positions", &self.positions)
            .finish_non_exhaustive()
    }
}

impl<S: CheckpointStore, P: PositionTable> ShardlockCheckpoints<S, P> {
    /// Checkpoints in `store` (epochs) and `positions` (exact positions);
    /// keep both in the same database.
    pub fn new(store: S, positions: P) -> Self {
        Self {
            store,
            positions,
            claimed: Arc::default(),
        }
    }

    /// The shardlock checkpoint store.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// The position table.
    pub fn positions(&self) -> &P {
        &self.positions
    }

    /// The exact position of `name`, if saved.
    pub(crate) async fn load_position(
        &self,
        name: &str,
    ) -> Result<Option<StreamPosition>, CheckpointStoreError> {
        self.positions
            .load(name)
            .await
            .map_err(|source| CheckpointStoreError::Positions {
                name: name.to_string(),
                source,
            })
    }

    /// Bumps the epoch of `name` (taking it over) and answers it.
    pub(crate) async fn claim(&self, name: &str) -> Result<i64, shardlock_core::CheckpointError> {
        let claimed = self.store.claim(name).await?;
        debug!(
            subscription = name,
            epoch = claimed.epoch,
            "subscription claimed"
        );
        Ok(claimed.epoch)
    }

    /// Saves `position` for `name` if `epoch` is still the stored one.
    pub(crate) async fn save_fenced(
        &self,
        name: &str,
        epoch: i64,
        position: StreamPosition,
    ) -> Result<(), CheckpointStoreError> {
        self.store
            .save(name, epoch, position_prefix(position))
            .await
            .map_err(|e| CheckpointStoreError::from_store(name, e))?;
        // Only after the fenced save: a position in the table was always
        // saved by the leader of its time. A crash in between leaves the
        // older position (the event is applied again: at-least-once).
        self.positions
            .advance(name, position)
            .await
            .map_err(|source| CheckpointStoreError::Positions {
                name: name.to_string(),
                source,
            })
    }

    fn claimed_epoch(&self, name: &str) -> Option<i64> {
        self.claimed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .copied()
    }
}

impl<S: CheckpointStore, P: PositionTable> eventcore_types::CheckpointStore
    for ShardlockCheckpoints<S, P>
{
    type Error = CheckpointStoreError;

    async fn load(&self, name: &str) -> Result<Option<StreamPosition>, Self::Error> {
        self.load_position(name).await
    }

    async fn save(&self, name: &str, position: StreamPosition) -> Result<(), Self::Error> {
        let epoch = match self.claimed_epoch(name) {
            Some(epoch) => epoch,
            None => {
                let epoch = self
                    .claim(name)
                    .await
                    .map_err(|e| CheckpointStoreError::from_store(name, e))?;
                self.claimed
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(name.to_string(), epoch);
                epoch
            }
        };
        self.save_fenced(name, epoch, position).await
    }
}
