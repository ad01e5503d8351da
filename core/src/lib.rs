//! Core of [shardlock](https://docs.rs/shardlock): lock keys, the driver and
//! distributor traits, agents, leader election and the coordinator loop.
//!
//! This crate has no database code. Applications use it through the
//! `shardlock` facade crate; driver authors implement [`Driver`] and
//! [`Session`] and run the contract suite in `shardlock-contract-tests`.
//! Until 1.0 its API may change in any release.
//!
//! ```
//! use shardlock_core::{LockKey, LockSet, DatabaseId, ShardId};
//!
//! let key = LockKey::for_shard("main", "public", "orders:all")?;
//! let set = LockSet::new(key, DatabaseId::new("main"), vec![ShardId::new("orders:all")]);
//! assert_eq!(set.key.name(), "main:public:orders:all");
//! # Ok::<(), shardlock_core::Error>(())
//! ```
#![doc(test(attr(deny(warnings))))]

mod agent;
mod balancing;
mod coordinator;
mod distributor;
mod driver;
mod error;
pub mod fenced;
mod health;
mod hints;
mod holds;
mod ids;
mod key;
mod leadership;
pub mod lent;
mod lock_set;
mod mapping;
pub mod metrics;
mod projection;
mod signals;
pub mod wait;
pub mod watch;

pub use agent::{Agent, AgentContext, AgentError};
pub use balancing::{fair_share, Balancing};
pub use coordinator::{
    Assignment, Coordinator, CoordinatorBuilder, CoordinatorConfig, CoordinatorHandle, OwnedSet,
};
pub use distributor::{Distributor, ListCache, SharedTenants, TenantSource};
pub use driver::{Capabilities, Driver, Session, Support};
pub use error::{BoxError, DriverError, Error, ErrorKind, InvalidName, Result};
pub use health::Health;
pub use hints::{clean_ids, ReleaseHints, CLEAN_MARK_TTL};
pub use holds::{Holds, IdHash, IdHasher};
pub use ids::{DatabaseId, NodeId, ShardId};
pub use key::{LockKey, KEY_SCHEME, MAX_NAME_LEN};
pub use leadership::{
    acquire_leadership, wait_for_leadership, DriverLeadership, LeadershipGuard,
    DROPPED_GUARD_RELEASE_WAIT,
};
pub use lock_set::{Guard, LockSet};
pub use mapping::DatabaseMapping;
pub use projection::{
    projection_leadership_key, run_projection, Checkpoint, CheckpointError, CheckpointStore,
    CoordinatorLed, DeadLetter, EventReader, FencedError, NoDeadLetter, Positioned,
    ProjectionAgent, ProjectionBackend, ProjectionError, ProjectionOptions, ProjectionRunner,
    Projector, ProjectorCoordinator, DEFAULT_LEAD_POLL,
};
pub use signals::{SessionSignals, WatchGuard};

/// Re-exported so agents and drivers name the same token type.
pub use tokio_util::sync::CancellationToken;
