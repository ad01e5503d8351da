//! Distributors for [shardlock](https://docs.rs/shardlock): how shards are
//! grouped into lock sets. Use them through the `shardlock` crate.
//!
//! | distributor | lock sets | lock lives in |
//! |---|---|---|
//! | [`Solo`] | one per database, always run; a sentinel key detects a second solo node | each database |
//! | [`SingleTenant`] | one per shard, so shards spread across nodes | the one database |
//! | [`MultiTenanted`] | one per tenant database, holding all of its shards | that tenant's database |
//! | [`Balanced`] | those of the distributor it wraps, spread evenly over the live nodes (fair share, no leader) | as the wrapped one, plus member slots |
//!
//! Without [`Balanced`], every node takes every free set it can: the first
//! node to cycle runs everything and the others stand by. Wrap the
//! distributor in [`Balanced`] to spread the work.
//!
//! Lock names are `<database>:<schema>:<shard>` (see
//! [`LockKey::for_shard`](shardlock_core::LockKey::for_shard)), so the same
//! shard in two databases or schemas never shares a key.
//!
//! ```
//! use shardlock_core::{DatabaseId, Distributor, ShardId};
//! use shardlock_distributors::SingleTenant;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> shardlock_core::Result<()> {
//! let shards = (0..4).map(|i| ShardId::new(format!("orders:{i}")));
//! let distributor = SingleTenant::new(DatabaseId::new("main"), "public", shards);
//! let sets = distributor.lock_sets().await?;
//! assert_eq!(sets.len(), 4);
//! assert_eq!(sets[0].key.name(), "main:public:orders:0");
//! # Ok(())
//! # }
//! ```
#![doc(test(attr(deny(warnings))))]

mod balanced;
mod multi_tenanted;
mod single_tenant;
mod solo;

pub use balanced::Balanced;
pub use multi_tenanted::{MultiTenanted, TENANT_LOCK_SHARD};
pub use single_tenant::SingleTenant;
pub use solo::{Solo, SOLO_SENTINEL_SHARD};
