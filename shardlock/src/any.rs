//! Static dispatch over the enabled drivers.

use std::time::Duration;

use shardlock_core::{
    CancellationToken, Capabilities, DatabaseId, Driver, Holds, LockKey, NodeId, Result, Session,
};

/// Defines `AnyDriver`/`AnySession` with one variant per enabled driver and
/// forwards every trait method to it.
macro_rules! any_driver {
    ($( $(#[$meta:meta])* $variant:ident($driver:ty, $session:ty) ),* $(,)?) => {
        /// One of the enabled drivers, chosen at run time.
        #[derive(Debug, Clone)]
        #[non_exhaustive]
        pub enum AnyDriver {
            $( $(#[$meta])* #[doc = concat!("The `", stringify!($variant), "` driver.")] $variant($driver), )*
        }

        /// A session of an [`AnyDriver`].
        #[derive(Debug)]
        #[non_exhaustive]
        pub enum AnySession {
            $( $(#[$meta])* #[doc = concat!("A `", stringify!($variant), "` session.")] $variant($session), )*
        }

        $(
            $(#[$meta])*
            impl From<$driver> for AnyDriver {
                fn from(driver: $driver) -> Self {
                    Self::$variant(driver)
                }
            }
        )*

        impl Driver for AnyDriver {
            type Session = AnySession;

            fn name(&self) -> &'static str {
                match self { $( $(#[$meta])* Self::$variant(d) => d.name(), )* }
            }

            async fn connect(&self, database: &DatabaseId, node: &NodeId) -> Result<AnySession> {
                match self { $( $(#[$meta])* Self::$variant(d) => d.connect(database, node).await.map(AnySession::$variant), )* }
            }

            fn lock_release_window(&self) -> Option<Duration> {
                match self { $( $(#[$meta])* Self::$variant(d) => d.lock_release_window(), )* }
            }

            fn connect_timeout(&self) -> Option<Duration> {
                match self { $( $(#[$meta])* Self::$variant(d) => d.connect_timeout(), )* }
            }

            fn capabilities(&self) -> Capabilities {
                match self { $( $(#[$meta])* Self::$variant(d) => d.capabilities(), )* }
            }
        }

        impl Session for AnySession {
            fn holds(&self) -> &Holds {
                match self { $( $(#[$meta])* Self::$variant(s) => s.holds(), )* }
            }

            async fn try_acquire(&mut self, keys: &[LockKey]) -> Result<Vec<bool>> {
                match self { $( $(#[$meta])* Self::$variant(s) => s.try_acquire(keys).await, )* }
            }

            async fn acquire(&mut self, key: &LockKey, cancel: &CancellationToken) -> Result<bool> {
                match self { $( $(#[$meta])* Self::$variant(s) => s.acquire(key, cancel).await, )* }
            }

            async fn release(&mut self, key: &LockKey) -> Result<bool> {
                match self { $( $(#[$meta])* Self::$variant(s) => s.release(key).await, )* }
            }

            async fn release_many(&mut self, keys: &[LockKey]) -> Result<Vec<bool>> {
                match self { $( $(#[$meta])* Self::$variant(s) => s.release_many(keys).await, )* }
            }

            async fn release_announced(&mut self, keys: &[LockKey], clean: &[bool]) -> Result<Vec<bool>> {
                match self { $( $(#[$meta])* Self::$variant(s) => s.release_announced(keys, clean).await, )* }
            }

            async fn probe(&mut self, keys: &[LockKey]) -> Result<Vec<bool>> {
                match self { $( $(#[$meta])* Self::$variant(s) => s.probe(keys).await, )* }
            }

            async fn release_all(&mut self) -> Result<()> {
                match self { $( $(#[$meta])* Self::$variant(s) => s.release_all().await, )* }
            }

            async fn verify(&mut self) -> Result<()> {
                match self { $( $(#[$meta])* Self::$variant(s) => s.verify().await, )* }
            }

            async fn close(self) -> Result<()> {
                match self { $( $(#[$meta])* Self::$variant(s) => s.close().await, )* }
            }
        }
    };
}

any_driver! {
    #[cfg(feature = "memory")]
    Memory(shardlock_memory::MemoryDriver, shardlock_memory::MemorySession),
    #[cfg(feature = "sqlite")]
    Sqlite(shardlock_sqlite::SqliteDriver, shardlock_sqlite::SqliteSession),
    #[cfg(feature = "postgres")]
    Postgres(shardlock_postgres::PgDriver, shardlock_postgres::PgSession),
    #[cfg(feature = "sqlserver")]
    SqlServer(shardlock_sqlserver::MssqlDriver, shardlock_sqlserver::MssqlSession),
    #[cfg(feature = "mysql")]
    MySql(shardlock_mysql::MySqlDriver, shardlock_mysql::MySqlSession),
}
