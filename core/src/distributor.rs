//! Distributors build the lock sets a node competes for, every cycle.

use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex, RwLock};

use crate::balancing::Balancing;
use crate::error::Result;
use crate::ids::DatabaseId;
use crate::lock_set::LockSet;

/// Builds the current list of lock sets. Called once per coordinator cycle,
/// so the list may change (tenants appear and disappear).
pub trait Distributor: Send + Sync + 'static {
    /// The lock sets this node should compete for now.
    fn lock_sets(&self) -> impl Future<Output = Result<Vec<LockSet>>> + Send;

    /// The lock sets as a shared list: what the coordinator calls every
    /// cycle. The default wraps [`lock_sets`](Self::lock_sets). Override it
    /// to hand back the same `Arc` while nothing changed (a [`ListCache`]
    /// does the bookkeeping): the coordinator then knows the list is
    /// unchanged without comparing it, and a node holding thousands of sets
    /// neither builds nor compares them on a steady cycle.
    fn shared_lock_sets(&self) -> impl Future<Output = Result<Arc<[LockSet]>>> + Send {
        async { self.lock_sets().await.map(Arc::from) }
    }

    /// How this node shares the sets with its peers. `None` (the default):
    /// every node takes every free set it can, so the first node to cycle
    /// runs everything and the others stand by. `Some`: fair share by member
    /// slots (see [`Balancing`]); the `Balanced` distributor wraps any
    /// distributor this way.
    fn balancing(&self) -> Option<&Balancing> {
        None
    }
}

/// Lists tenant databases at run time, for multi-tenant distribution.
pub trait TenantSource: Send + Sync + 'static {
    /// The tenant databases that exist now.
    fn tenants(&self) -> impl Future<Output = Result<Vec<DatabaseId>>> + Send;
}

impl TenantSource for Vec<DatabaseId> {
    async fn tenants(&self) -> Result<Vec<DatabaseId>> {
        Ok(self.clone())
    }
}

/// A tenant list that can be changed while coordinators read it (handy for
/// tests and for services that learn tenants from elsewhere).
///
/// Clones share the list.
#[derive(Debug, Clone, Default)]
pub struct SharedTenants(Arc<RwLock<Vec<DatabaseId>>>);

impl SharedTenants {
    /// A list with the given tenants.
    pub fn new(tenants: impl IntoIterator<Item = DatabaseId>) -> Self {
        Self(Arc::new(RwLock::new(tenants.into_iter().collect())))
    }

    /// Adds a tenant (no-op if present).
    pub fn add(&self, tenant: DatabaseId) {
        let mut list = self.0.write().unwrap_or_else(|p| p.into_inner());
        if !list.contains(&tenant) {
            list.push(tenant);
        }
    }

    /// Removes a tenant (no-op if absent).
    pub fn remove(&self, tenant: &DatabaseId) {
        let mut list = self.0.write().unwrap_or_else(|p| p.into_inner());
        list.retain(|t| t != tenant);
    }

    /// The current tenants.
    pub fn snapshot(&self) -> Vec<DatabaseId> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl TenantSource for SharedTenants {
    async fn tenants(&self) -> Result<Vec<DatabaseId>> {
        Ok(self.snapshot())
    }
}

impl<D: Distributor> Distributor for Arc<D> {
    fn lock_sets(&self) -> impl Future<Output = Result<Vec<LockSet>>> + Send {
        (**self).lock_sets()
    }

    fn shared_lock_sets(&self) -> impl Future<Output = Result<Arc<[LockSet]>>> + Send {
        (**self).shared_lock_sets()
    }

    fn balancing(&self) -> Option<&Balancing> {
        (**self).balancing()
    }
}

impl<T: TenantSource> TenantSource for Arc<T> {
    fn tenants(&self) -> impl Future<Output = Result<Vec<DatabaseId>>> + Send {
        (**self).tenants()
    }
}

/// The last list a distributor built and the input it was built from: while
/// the input is unchanged (the same tenants, or `()` for a fixed list) the
/// same `Arc` is handed back, which is what
/// [`Distributor::shared_lock_sets`] wants. Clones share the cache.
pub struct ListCache<I> {
    last: Arc<Mutex<Option<Cached<I>>>>,
}

/// An input and the list built from it.
type Cached<I> = (I, Arc<[LockSet]>);

impl<I: PartialEq> ListCache<I> {
    /// An empty cache.
    pub fn new() -> Self {
        Self {
            last: Arc::new(Mutex::new(None)),
        }
    }

    /// The list for `input`: the cached one if `input` equals the last
    /// input, else `build(&input)` (cached on success; an error is returned
    /// and nothing is cached).
    ///
    /// # Errors
    ///
    /// Whatever `build` returns.
    pub fn get_or_build(
        &self,
        input: I,
        build: impl FnOnce(&I) -> Result<Vec<LockSet>>,
    ) -> Result<Arc<[LockSet]>> {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((cached_input, list)) = last.as_ref() {
            if *cached_input == input {
                return Ok(Arc::clone(list));
            }
        }
        let list: Arc<[LockSet]> = build(&input)?.into();
        *last = Some((input, Arc::clone(&list)));
        Ok(list)
    }
}

impl<I: PartialEq> Default for ListCache<I> {
    fn default() -> Self {
        Self::new()
    }
}

impl<I> Clone for ListCache<I> {
    fn clone(&self) -> Self {
        Self {
            last: Arc::clone(&self.last),
        }
    }
}

impl<I> fmt::Debug for ListCache<I> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let len = self
            .last
            .lock()
            .map_or(0, |last| last.as_ref().map_or(0, |(_, list)| list.len()));
        f.debug_struct("ListCache").field("sets", &len).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{LockKey, ShardId};

    fn list(names: &[&str]) -> Result<Vec<LockSet>> {
        names
            .iter()
            .map(|n| {
                let db = DatabaseId::new("db");
                let key = LockKey::for_shard(db.as_str(), "s", n)?;
                Ok(LockSet::new(key, db, vec![ShardId::new(*n)]))
            })
            .collect()
    }

    #[test]
    fn the_same_input_hands_back_the_same_list() {
        let cache = ListCache::new();
        let a = cache.get_or_build(vec!["x"], |i| list(i)).unwrap();
        let b = cache
            .get_or_build(vec!["x"], |_| panic!("rebuilt"))
            .unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        let c = cache.get_or_build(vec!["x", "y"], |i| list(i)).unwrap();
        assert_eq!(c.len(), 2);
        assert!(!Arc::ptr_eq(&a, &c));
    }

    #[test]
    fn a_failed_build_caches_nothing() {
        let cache = ListCache::new();
        let long = "x".repeat(5000);
        assert!(cache
            .get_or_build(vec![long.as_str()], |i| list(i))
            .is_err());
        let ok = cache.get_or_build(vec!["a"], |i| list(i)).unwrap();
        assert_eq!(ok.len(), 1);
    }
}
