use std::sync::Arc;

use shardlock_core::{
    DatabaseId, Distributor, ListCache, LockKey, LockSet, Result, ShardId, TenantSource,
};

/// The shard-name part of a tenant's lock key.
pub const TENANT_LOCK_SHARD: &str = "shardlock-tenant";

/// One lock set per tenant database, holding all of that tenant's shards;
/// the lock lives in the tenant's own database. Tenants are re-read from the
/// [`TenantSource`] every cycle, so new tenants are picked up and removed
/// ones are stopped and released.
#[derive(Debug, Clone)]
pub struct MultiTenanted<T> {
    tenants: T,
    schema: String,
    shards: Vec<ShardId>,
    /// The sets of the tenants last listed: rebuilt only when they change.
    cache: ListCache<Vec<DatabaseId>>,
}

impl<T: TenantSource> MultiTenanted<T> {
    /// Runs `shards` of `schema` in every tenant `tenants` lists.
    pub fn new(
        tenants: T,
        schema: impl Into<String>,
        shards: impl IntoIterator<Item = ShardId>,
    ) -> Self {
        Self {
            tenants,
            schema: schema.into(),
            shards: shards.into_iter().collect(),
            cache: ListCache::new(),
        }
    }

    fn sets(&self, tenants: &[DatabaseId]) -> Result<Vec<LockSet>> {
        tenants
            .iter()
            .map(|db| {
                let key = LockKey::for_shard(db.as_str(), &self.schema, TENANT_LOCK_SHARD)?;
                Ok(LockSet::new(key, db.clone(), self.shards.clone()))
            })
            .collect()
    }
}

impl<T: TenantSource> Distributor for MultiTenanted<T> {
    async fn lock_sets(&self) -> Result<Vec<LockSet>> {
        let tenants = self.tenants.tenants().await?;
        self.sets(&tenants)
    }

    async fn shared_lock_sets(&self) -> Result<Arc<[LockSet]>> {
        let tenants = self.tenants.tenants().await?;
        self.cache.get_or_build(tenants, |t| self.sets(t))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shardlock_core::{DatabaseId, SharedTenants};

    #[tokio::test]
    async fn tenants_are_reread_every_call() {
        let tenants = SharedTenants::new([DatabaseId::new("t1")]);
        let d = MultiTenanted::new(tenants.clone(), "app", ["a", "b"].map(ShardId::new));
        let sets = d.lock_sets().await.unwrap();
        assert_eq!(sets.len(), 1);
        assert_eq!(sets[0].key.name(), "t1:app:shardlock-tenant");
        assert_eq!(sets[0].shards.len(), 2);
        tenants.add(DatabaseId::new("t2"));
        assert_eq!(d.lock_sets().await.unwrap().len(), 2);
        tenants.remove(&DatabaseId::new("t1"));
        let sets = d.lock_sets().await.unwrap();
        assert_eq!(sets.len(), 1);
        assert_eq!(sets[0].database.as_str(), "t2");
    }
}
