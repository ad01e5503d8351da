//! Which real database a [`DatabaseId`] locks in: one rule for every driver.

use std::fmt;
use std::sync::Arc;

use crate::ids::DatabaseId;

/// How a driver turns a shardlock [`DatabaseId`] into the name of the
/// database it connects to.
///
/// Each driver's options pick their default: `DatabaseMapping::default()`
/// is [`SameServer`](Self::SameServer) (SQL Server's options use it), while
/// the Postgres driver's options default to
/// [`ConnectionString`](Self::ConnectionString) when the URL names a
/// database (a URL naming a database is read as "lock here"), and to
/// `SameServer` when it names none.
///
/// ```
/// use shardlock_core::{DatabaseId, DatabaseMapping};
///
/// let tenant = DatabaseId::new("tenant_7");
/// assert_eq!(DatabaseMapping::SameServer.database_for(&tenant).as_deref(), Some("tenant_7"));
/// assert_eq!(DatabaseMapping::Fixed("app".into()).database_for(&tenant).as_deref(), Some("app"));
/// assert_eq!(DatabaseMapping::ConnectionString.database_for(&tenant), None);
/// let prefixed = DatabaseMapping::custom(|id| format!("svc_{id}"));
/// assert_eq!(prefixed.database_for(&tenant).as_deref(), Some("svc_tenant_7"));
/// ```
#[derive(Clone, Default)]
#[non_exhaustive]
pub enum DatabaseMapping {
    /// The id is the database name on the server of the options
    /// (`DatabaseMapping::default()`). Multi-tenant services with one
    /// database per tenant use this; a database named in the URL is
    /// overridden.
    #[default]
    SameServer,
    /// Every id maps to this one database: single-tenant use where the
    /// `DatabaseId` is a logical name (e.g. `main`). Keys of different ids
    /// then share one lock space, which is safe because lock names include
    /// the database id.
    Fixed(String),
    /// The database named in the URL or connection string (or the login's
    /// default database when it names none), for every id.
    ConnectionString,
    /// A function of the id.
    Custom(Arc<dyn Fn(&DatabaseId) -> String + Send + Sync>),
}

impl DatabaseMapping {
    /// A mapping computed by `f`.
    pub fn custom(f: impl Fn(&DatabaseId) -> String + Send + Sync + 'static) -> Self {
        Self::Custom(Arc::new(f))
    }

    /// The database name for `id`, or `None` to keep the one the connection
    /// options name.
    pub fn database_for(&self, id: &DatabaseId) -> Option<String> {
        match self {
            Self::SameServer => Some(id.as_str().to_string()),
            Self::Fixed(name) => Some(name.clone()),
            Self::ConnectionString => None,
            Self::Custom(f) => Some(f(id)),
        }
    }
}

impl fmt::Debug for DatabaseMapping {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::SameServer => f.write_str("SameServer"),
            Self::Fixed(name) => f.debug_tuple("Fixed").field(name).finish(),
            Self::ConnectionString => f.write_str("ConnectionString"),
            Self::Custom(_) => f.write_str("Custom(..)"),
        }
    }
}
