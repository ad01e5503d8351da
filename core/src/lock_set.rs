//! Lock sets: the unit a node owns.

use crate::ids::{DatabaseId, ShardId};
use crate::key::LockKey;

/// How a lock set's key guards its shards.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Guard {
    /// The shards run only while this node holds the key.
    Exclusive,
    /// The shards always run (the node is declared alone, as with `Solo`); the
    /// key is only a sentinel that detects a second node, which is logged as
    /// an error.
    Sentinel,
}

/// One lock key, the shards it guards and the database it lives in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockSet {
    /// The key that guards the shards.
    pub key: LockKey,
    /// The database whose session takes the key.
    pub database: DatabaseId,
    /// The shards run while the key is held.
    pub shards: Vec<ShardId>,
    /// How the key guards them.
    pub guard: Guard,
}

impl LockSet {
    /// An exclusive lock set.
    pub fn new(key: LockKey, database: DatabaseId, shards: Vec<ShardId>) -> Self {
        Self {
            key,
            database,
            shards,
            guard: Guard::Exclusive,
        }
    }

    /// The same set, guarded by a sentinel key instead.
    pub fn sentinel(mut self) -> Self {
        self.guard = Guard::Sentinel;
        self
    }
}
