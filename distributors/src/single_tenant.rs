use std::sync::Arc;

use shardlock_core::{DatabaseId, Distributor, ListCache, LockKey, LockSet, Result, ShardId};

/// One lock set per shard in one database, so shards spread across nodes.
#[derive(Debug, Clone)]
pub struct SingleTenant {
    database: DatabaseId,
    schema: String,
    shards: Vec<ShardId>,
    /// The sets, built once (the list never changes).
    cache: ListCache<()>,
}

impl SingleTenant {
    /// Distributes `shards` of `schema` in `database`.
    pub fn new(
        database: DatabaseId,
        schema: impl Into<String>,
        shards: impl IntoIterator<Item = ShardId>,
    ) -> Self {
        Self {
            database,
            schema: schema.into(),
            shards: shards.into_iter().collect(),
            cache: ListCache::new(),
        }
    }

    /// The lock sets, computed without I/O.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidLockName`](shardlock_core::Error::InvalidLockName) if
    /// a shard's lock name is invalid (e.g. over the maximum length).
    pub fn sets(&self) -> Result<Vec<LockSet>> {
        self.shards
            .iter()
            .map(|shard| {
                let key = LockKey::for_shard(self.database.as_str(), &self.schema, shard.as_str())?;
                Ok(LockSet::new(
                    key,
                    self.database.clone(),
                    vec![shard.clone()],
                ))
            })
            .collect()
    }
}

impl Distributor for SingleTenant {
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
    use shardlock_core::Error;

    #[tokio::test]
    async fn one_set_per_shard_with_namespaced_names() {
        let d = SingleTenant::new(DatabaseId::new("db1"), "app", ["a", "b"].map(ShardId::new));
        let sets = d.lock_sets().await.unwrap();
        let names: Vec<_> = sets.iter().map(|s| s.key.name().to_string()).collect();
        assert_eq!(names, ["db1:app:a", "db1:app:b"]);
        assert!(sets
            .iter()
            .all(|s| s.shards.len() == 1 && s.database.as_str() == "db1"));
    }

    #[tokio::test]
    async fn an_invalid_shard_name_is_a_typed_error() {
        let d = SingleTenant::new(DatabaseId::new("db"), "s", [ShardId::new("x".repeat(5000))]);
        assert!(matches!(
            d.lock_sets().await,
            Err(Error::InvalidLockName { .. })
        ));
        let d = SingleTenant::new(DatabaseId::new("db"), "s", [ShardId::new("a\0b")]);
        assert!(matches!(
            d.lock_sets().await,
            Err(Error::InvalidLockName { .. })
        ));
    }
}
