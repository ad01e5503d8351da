#![doc = include_str!("../../README.md")]
#![doc(test(attr(deny(warnings))))]
#![cfg_attr(docsrs, feature(doc_cfg))]

// The enum needs at least one variant; keep this list in step with the
// driver features.
#[cfg(any(
    feature = "memory",
    feature = "sqlite",
    feature = "postgres",
    feature = "sqlserver",
    feature = "mysql"
))]
mod any;
#[cfg(any(
    feature = "memory",
    feature = "sqlite",
    feature = "postgres",
    feature = "sqlserver",
    feature = "mysql"
))]
mod url;

#[cfg(any(
    feature = "memory",
    feature = "sqlite",
    feature = "postgres",
    feature = "sqlserver",
    feature = "mysql"
))]
pub use any::{AnyDriver, AnySession};
pub use shardlock_core::*;
pub use shardlock_distributors::{
    Balanced, MultiTenanted, SingleTenant, Solo, SOLO_SENTINEL_SHARD, TENANT_LOCK_SHARD,
};
#[cfg(any(
    feature = "memory",
    feature = "sqlite",
    feature = "postgres",
    feature = "sqlserver",
    feature = "mysql"
))]
pub use url::UrlError;

/// The in-process driver (feature `memory`).
#[cfg(feature = "memory")]
#[cfg_attr(docsrs, doc(cfg(feature = "memory")))]
pub use shardlock_memory as memory;

/// The embedded cross-process driver (feature `sqlite`).
#[cfg(feature = "sqlite")]
#[cfg_attr(docsrs, doc(cfg(feature = "sqlite")))]
pub use shardlock_sqlite as sqlite;

/// The PostgreSQL advisory-lock driver (feature `postgres`).
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub use shardlock_postgres as postgres;

/// The SQL Server application-lock driver (feature `sqlserver`).
#[cfg(feature = "sqlserver")]
#[cfg_attr(docsrs, doc(cfg(feature = "sqlserver")))]
pub use shardlock_sqlserver as sqlserver;

/// The MySQL/MariaDB `GET_LOCK` driver (feature `mysql`).
#[cfg(feature = "mysql")]
#[cfg_attr(docsrs, doc(cfg(feature = "mysql")))]
pub use shardlock_mysql as mysql;

/// eventcore projections with shardlock's leadership, fencing and loss
/// signal (feature `eventcore`).
#[cfg(feature = "eventcore")]
#[cfg_attr(docsrs, doc(cfg(feature = "eventcore")))]
pub use shardlock_eventcore as eventcore;
