//! Names of nodes, databases and shards.

use std::fmt;
use std::sync::Arc;

macro_rules! name_type {
    ($(#[$meta:meta])* $name:ident) => {
        $(#[$meta])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(Arc<str>);

        impl $name {
            /// Wraps a name.
            pub fn new(name: impl AsRef<str>) -> Self {
                Self(Arc::from(name.as_ref()))
            }

            /// The name as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($name), &*self.0)
            }
        }

        impl From<&str> for $name {
            fn from(value: &str) -> Self {
                Self::new(value)
            }
        }

        impl From<String> for $name {
            fn from(value: String) -> Self {
                Self::new(value)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

name_type!(
    /// One process running a coordinator, as shown in logs and in the
    /// database session's `application_name` / program name.
    NodeId
);

name_type!(
    /// The database a lock lives in: the single database of a single-tenant
    /// deployment, or one tenant's database. Drivers map it to a connection.
    DatabaseId
);

name_type!(
    /// One unit of background work, e.g. `orders-projection:all`.
    ShardId
);

impl NodeId {
    /// A fresh id: host name, process id and a random suffix, e.g.
    /// `web-1-4242-k3f9`.
    pub fn generate() -> Self {
        let host = hostname().unwrap_or_else(|| "node".to_string());
        let suffix: String = (0..4).map(|_| fastrand::alphanumeric()).collect();
        Self::new(format!(
            "{host}-{}-{}",
            std::process::id(),
            suffix.to_lowercase()
        ))
    }
}

fn hostname() -> Option<String> {
    let from_env = std::env::var("HOSTNAME").ok();
    let from_file = || std::fs::read_to_string("/etc/hostname").ok();
    from_env
        .or_else(from_file)
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_node_ids_differ_and_name_the_process() {
        let a = NodeId::generate();
        let b = NodeId::generate();
        assert_ne!(a, b);
        assert!(a.as_str().contains(&std::process::id().to_string()), "{a}");
    }
}
