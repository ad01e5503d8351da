use std::sync::Arc;

use shardlock_core::{DatabaseId, Distributor, ListCache, LockKey, LockSet, Result, ShardId};

/// The shard name of the solo sentinel key.
pub const SOLO_SENTINEL_SHARD: &str = "shardlock-solo-sentinel";

/// For a node known to be alone: one set per database holding all shards,
/// always run. No lock guards the work; a sentinel key is still tried every
/// cycle, and if another node holds it the coordinator logs an error (two
/// nodes declared alone are running the same work).
#[derive(Debug, Clone)]
pub struct Solo {
    databases: Vec<DatabaseId>,
    schema: String,
    shards: Vec<ShardId>,
    /// The sets, built once (the list never changes).
    cache: ListCache<()>,
}

impl Solo {
    /// Runs `shards` of `schema` in every database of `databases`.
    pub fn new(
        databases: impl IntoIterator<Item = DatabaseId>,
        schema: impl Into<String>,
        shards: impl IntoIterator<Item = ShardId>,
    ) -> Self {
        Self {
            databases: databases.into_iter().collect(),
            schema: schema.into(),
            shards: shards.into_iter().collect(),
            cache: ListCache::new(),
        }
    }

    fn sets(&self) -> Result<Vec<LockSet>> {
        self.databases
            .iter()
            .map(|db| {
                let key = LockKey::for_shard(db.as_str(), &self.schema, SOLO_SENTINEL_SHARD)?;
                Ok(LockSet::new(key, db.clone(), self.shards.clone()).sentinel())
            })
            .collect()
    }
}

impl Distributor for Solo {
    async fn lock_sets(&self) -> Result<Vec<LockSet>> {
        self.sets()
    }

    async fn shared_lock_sets(&self) -> Result<Arc<[LockSet]>> {
        self.cache.get_or_build((), |()| self.sets())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shardlock_core::Guard;

    #[tokio::test]
    async fn one_sentinel_set_per_database() {
        let d = Solo::new(
            ["a", "b"].map(DatabaseId::new),
            "s",
            ["x", "y"].map(ShardId::new),
        );
        let sets = d.lock_sets().await.unwrap();
        assert_eq!(sets.len(), 2);
        for set in &sets {
            assert_eq!(set.guard, Guard::Sentinel);
            assert_eq!(set.shards.len(), 2);
            assert!(set.key.name().ends_with(SOLO_SENTINEL_SHARD));
        }
    }
}
