//! What a node owns, published on a `watch` channel after every cycle.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::ids::{DatabaseId, NodeId, ShardId};
use crate::key::LockKey;
use crate::lock_set::Guard;

/// One lock set this node runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnedSet {
    /// The set's key.
    pub key: LockKey,
    /// Its database.
    pub database: DatabaseId,
    /// Its shards.
    pub shards: Vec<ShardId>,
    /// How the key guards the shards.
    pub guard: Guard,
    /// Whether this node holds the key (always true for exclusive sets).
    pub held: bool,
    /// This node's acquisition count for the key.
    pub epoch: u64,
    /// When this node started running the set.
    pub since: SystemTime,
}

/// A node's current assignment.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Assignment {
    /// The node.
    pub node: NodeId,
    /// The sets it runs, sorted by key name. Shared from publish to publish
    /// and rebuilt only when the sets change, so a cycle that changes
    /// nothing (the steady state, with 10,000 sets too) copies nothing, and
    /// a clone of the assignment is cheap.
    pub owned: Arc<[OwnedSet]>,
    /// Sets it competed for in the last cycle and did not get.
    pub denied: usize,
    /// Agents waiting for a restart after a failure.
    pub failing_agents: usize,
    /// Completed cycles.
    pub cycles: u64,
    /// How long the last cycle took: verify, releases, acquisition round
    /// trips and recording what changed. The agents of sets it won are
    /// spawned right after it is published (see `ownerless` in
    /// [`metrics`](crate::metrics) for their start).
    pub last_cycle: Duration,
    /// When the last cycle ended.
    pub last_cycle_at: Option<SystemTime>,
    /// Sessions lost since start.
    pub sessions_lost: u64,
    /// True once the coordinator has stopped and released everything.
    pub stopped: bool,
    /// With balancing: the live member slots seen in the last cycle (the
    /// total weight of the live nodes, this one included); 0 without.
    pub members: usize,
    /// With balancing: this node's fair share of the sets in the last
    /// cycle; `None` without balancing.
    pub share: Option<usize>,
    /// Sets this node released to rebalance (surplus, and sets taken
    /// beyond its share and given back at once), since start.
    pub moves: u64,
    /// Release announcements from other nodes that woke this node, since
    /// start.
    pub wakeups: u64,
}

impl Assignment {
    pub(crate) fn new(node: NodeId) -> Self {
        Self {
            node,
            owned: Arc::from([]),
            denied: 0,
            failing_agents: 0,
            cycles: 0,
            last_cycle: Duration::ZERO,
            last_cycle_at: None,
            sessions_lost: 0,
            stopped: false,
            members: 0,
            share: None,
            moves: 0,
            wakeups: 0,
        }
    }

    /// Whether this node runs `shard` of `database`.
    pub fn runs(&self, database: &DatabaseId, shard: &ShardId) -> bool {
        self.owned
            .iter()
            .any(|set| &set.database == database && set.shards.contains(shard))
    }

    /// Number of shards this node runs.
    pub fn shard_count(&self) -> usize {
        self.owned.iter().map(|set| set.shards.len()).sum()
    }
}
