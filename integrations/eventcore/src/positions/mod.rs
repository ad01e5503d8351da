//! Exact eventcore positions beside shardlock's checkpoint rows.
//!
//! An eventcore [`StreamPosition`] is a UUID (128 bits, UUIDv7 in eventcore's
//! stores); a shardlock checkpoint row holds a `bigint` position. No order-
//! preserving map fits 128 bits into 63, so the position a projector
//! resumes from is kept here, one row per subscription, and the shardlock
//! row keeps the fencing epoch and the position's top 63 bits
//! ([`position_prefix`], monotone, for operators and for the "never
//! backwards" rule).
//!
//! Tables only ever move forward ([`PositionTable::advance`] ignores an
//! older position), so a stale writer's late write cannot undo a newer one.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};

use eventcore_types::StreamPosition;
use shardlock_core::BoxError;

#[cfg(feature = "mysql")]
mod mysql;
#[cfg(feature = "postgres")]
mod postgres;
#[cfg(feature = "sqlite")]
mod sqlite;

#[cfg(feature = "mysql")]
pub use mysql::MySqlPositions;
#[cfg(feature = "postgres")]
pub use postgres::PgPositions;
#[cfg(feature = "sqlite")]
pub use sqlite::SqlitePositions;

/// The `bigint` a shardlock checkpoint row stores for `position`: its top
/// 63 bits, so the order of positions is kept (never negative).
///
/// ```
/// use eventcore_types::StreamPosition;
/// use shardlock_eventcore::position_prefix;
/// use uuid::Uuid;
///
/// let a = StreamPosition::new(Uuid::from_u128(1 << 65));
/// let b = StreamPosition::new(Uuid::from_u128(u128::MAX));
/// assert_eq!(position_prefix(a), 1);
/// assert_eq!(position_prefix(b), i64::MAX);
/// ```
pub fn position_prefix(position: StreamPosition) -> i64 {
    let bits: uuid::Uuid = position.into_inner();
    // 128 - 65 = 63 bits: always fits a non-negative i64.
    i64::try_from(bits.as_u128() >> 65).unwrap_or(i64::MAX)
}

/// Where the exact eventcore position of each subscription lives: one row
/// per subscription name, moved forward only.
///
/// Implemented by [`MemoryPositions`], and by `PgPositions` (feature
/// `postgres`), `SqlitePositions` (feature `sqlite`) and `MySqlPositions`
/// (feature `mysql`), which keep the table `eventcore_positions(subscription_name, position, updated_at)`
/// beside shardlock's `subscriptions`.
pub trait PositionTable: Send + Sync {
    /// The stored position, if any.
    fn load(
        &self,
        subscription: &str,
    ) -> impl Future<Output = Result<Option<StreamPosition>, BoxError>> + Send;

    /// Stores `position` unless the stored one is newer (greater).
    fn advance(
        &self,
        subscription: &str,
        position: StreamPosition,
    ) -> impl Future<Output = Result<(), BoxError>> + Send;
}

impl<T: PositionTable> PositionTable for &T {
    fn load(
        &self,
        subscription: &str,
    ) -> impl Future<Output = Result<Option<StreamPosition>, BoxError>> + Send {
        (**self).load(subscription)
    }

    fn advance(
        &self,
        subscription: &str,
        position: StreamPosition,
    ) -> impl Future<Output = Result<(), BoxError>> + Send {
        (**self).advance(subscription, position)
    }
}

/// Positions in memory, for tests and single-process use. Clones share the
/// table.
#[derive(Debug, Clone, Default)]
pub struct MemoryPositions {
    rows: Arc<Mutex<HashMap<String, StreamPosition>>>,
}

impl MemoryPositions {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// The same as [`new`](Self::new), in the shape of every store's
    /// `connect`.
    ///
    /// # Errors
    ///
    /// None; the `Result` is the shape every table answers.
    pub async fn connect() -> Result<Self, crate::OpenError> {
        Ok(Self::new())
    }
}

impl PositionTable for MemoryPositions {
    async fn load(&self, subscription: &str) -> Result<Option<StreamPosition>, BoxError> {
        Ok(self
            .rows
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(subscription)
            .copied())
    }

    async fn advance(&self, subscription: &str, position: StreamPosition) -> Result<(), BoxError> {
        let mut rows = self.rows.lock().unwrap_or_else(|p| p.into_inner());
        let row = rows.entry(subscription.to_string()).or_insert(position);
        *row = (*row).max(position);
        Ok(())
    }
}
