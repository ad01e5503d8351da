//! Distributors build the lock sets a node competes for, every cycle.

use std::future::Future;
use std::sync::{Arc, RwLock};

use crate::balancing::Balancing;
use crate::error::Result;
use crate::ids::DatabaseId;
use crate::lock_set::LockSet;

/// Builds the current list of lock sets. Called once per coordinator cycle,
/// so the list may change (tenants appear and disappear).
pub trait Distributor: Send + Sync + 'static {
    /// The lock sets this node should compete for now.
    fn lock_sets(&self) -> impl Future<Output = Result<Vec<LockSet>>> + Send;

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

    fn balancing(&self) -> Option<&Balancing> {
        (**self).balancing()
    }
}

impl<T: TenantSource> TenantSource for Arc<T> {
    fn tenants(&self) -> impl Future<Output = Result<Vec<DatabaseId>>> + Send {
        (**self).tenants()
    }
}
