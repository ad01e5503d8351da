//! Lock keys: a human-readable name plus a stable 64-bit id.
//!
//! # Id scheme, version 1
//!
//! The id of a key named `N` is the 64-bit FNV-1a hash of the UTF-8 bytes of
//! `shardlock:v1:N`, read as a signed 64-bit integer (two's complement), so it
//! fits PostgreSQL's `bigint` advisory-lock key. FNV-1a is fixed by its
//! specification (offset basis `0xcbf29ce484222325`, prime `0x100000001b3`), has
//! no seed and no platform dependence: the same name gives the same id in every
//! process, version and platform. The test vectors in this module's tests pin
//! it; changing the scheme means a new version prefix (`v2`), never a silent
//! change, because two nodes on different schemes would not exclude each other.
//!
//! Names built by the distributors have the form
//! `<database>:<schema>:<shard>` (see [`LockKey::for_shard`]).

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use crate::error::{Error, InvalidName};

/// The version prefix hashed in front of every name.
pub const KEY_SCHEME: &str = "shardlock:v1:";

/// Longest lock name accepted, in bytes of UTF-8.
///
/// Long enough for any realistic `<database>:<schema>:<shard>` and short enough
/// that a driver can always store the name next to the id.
pub const MAX_NAME_LEN: usize = 1024;

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

fn fnv1a64(parts: &[&[u8]]) -> u64 {
    let mut hash = FNV_OFFSET;
    for part in parts {
        for byte in *part {
            hash ^= u64::from(*byte);
            hash = hash.wrapping_mul(FNV_PRIME);
        }
    }
    hash
}

/// A lock key: a validated name and its stable 64-bit id.
///
/// Two keys are equal when their names are equal. Cloning is cheap, and so
/// are hashing and comparing for equality: both go through the id first
/// (equal names always have equal ids), so a table of 10,000 keys hashes
/// 8 bytes per key, not its name, and compares names only on a match.
/// Keys order by name.
///
/// ```
/// use shardlock_core::LockKey;
///
/// let key = LockKey::new("orders-projection")?;
/// assert_eq!(key.name(), "orders-projection");
/// // Pinned: this id never changes for this name under scheme v1.
/// assert_eq!(key.id(), LockKey::new("orders-projection")?.id());
/// # Ok::<(), shardlock_core::Error>(())
/// ```
#[derive(Clone)]
pub struct LockKey {
    name: Arc<str>,
    id: i64,
}

impl PartialEq for LockKey {
    fn eq(&self, other: &Self) -> bool {
        // Different ids mean different names; the same `Arc` (a clone) is
        // the same name. Only two ids that collide compare the text.
        self.id == other.id && (Arc::ptr_eq(&self.name, &other.name) || self.name == other.name)
    }
}

impl Eq for LockKey {}

impl std::hash::Hash for LockKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        // Consistent with `eq`: equal keys have equal names, so equal ids.
        state.write_i64(self.id);
    }
}

impl PartialOrd for LockKey {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for LockKey {
    /// By name (then id, which equal names share).
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        if Arc::ptr_eq(&self.name, &other.name) {
            return std::cmp::Ordering::Equal;
        }
        self.name.cmp(&other.name).then(self.id.cmp(&other.id))
    }
}

impl LockKey {
    /// Validates `name` and derives its id.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidLockName`] when the name is empty, contains a NUL
    /// character, or is longer than [`MAX_NAME_LEN`] bytes.
    pub fn new(name: impl Into<String>) -> Result<Self, Error> {
        let name: String = name.into();
        if let Some(reason) = validate(&name) {
            return Err(Error::InvalidLockName {
                name: preview(&name),
                reason,
            });
        }
        let id = fnv1a64(&[KEY_SCHEME.as_bytes(), name.as_bytes()]) as i64;
        Ok(Self {
            name: name.into(),
            id,
        })
    }

    /// The key guarding `shard` of `schema` in `database`, named
    /// `<database>:<schema>:<shard>`.
    ///
    /// # Errors
    ///
    /// As [`LockKey::new`].
    pub fn for_shard(database: &str, schema: &str, shard: &str) -> Result<Self, Error> {
        Self::new(format!("{database}:{schema}:{shard}"))
    }

    /// The human-readable name (without the scheme prefix).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The stable id, as PostgreSQL's `bigint` advisory-lock key.
    pub fn id(&self) -> i64 {
        self.id
    }

    /// The id as unsigned 64 bits, e.g. for file names (`{:016x}`).
    pub fn id_u64(&self) -> u64 {
        self.id as u64
    }

    /// The namespaced name, `shardlock:v1:<name>`, for drivers whose locks are
    /// named resources.
    pub fn resource_name(&self) -> String {
        format!("{KEY_SCHEME}{}", self.name)
    }

    /// The namespaced name cut to at most `max_chars` characters.
    ///
    /// A name that fits is returned whole. A longer one keeps as many leading
    /// characters as fit and ends with `~` and the 16 hex digits of the id, so
    /// two long names that share a prefix still map to different resources.
    /// `max_chars` below 17 is raised to 17.
    pub fn bounded_resource_name(&self, max_chars: usize) -> Cow<'_, str> {
        let full = self.resource_name();
        if full.chars().count() <= max_chars {
            return Cow::Owned(full);
        }
        Cow::Owned(self.hashed_resource_name(max_chars))
    }

    /// The namespaced name cut like
    /// [`bounded_resource_name`](Self::bounded_resource_name), but **always**
    /// ending with `~` and the 16 hex digits of the id, even when it fits:
    /// for databases that fold names (MySQL compares `GET_LOCK` names
    /// case-insensitively), where two names that differ only in case must
    /// still map to different resources. `max_chars` below 17 is raised to
    /// 17.
    ///
    /// ```
    /// use shardlock_core::LockKey;
    ///
    /// let key = LockKey::new("Orders")?;
    /// let name = key.hashed_resource_name(64);
    /// assert_eq!(name, format!("shardlock:v1:Orders~{:016x}", key.id_u64()));
    /// assert_ne!(name.to_lowercase(), LockKey::new("orders")?.hashed_resource_name(64).to_lowercase());
    /// # Ok::<(), shardlock_core::Error>(())
    /// ```
    pub fn hashed_resource_name(&self, max_chars: usize) -> String {
        let full = self.resource_name();
        let suffix = format!("~{:016x}", self.id_u64());
        let keep = max_chars.max(suffix.len()) - suffix.len();
        let mut out: String = full.chars().take(keep).collect();
        out.push_str(&suffix);
        out
    }
}

fn validate(name: &str) -> Option<InvalidName> {
    if name.is_empty() {
        Some(InvalidName::Empty)
    } else if name.contains('\0') {
        Some(InvalidName::Nul)
    } else if name.len() > MAX_NAME_LEN {
        Some(InvalidName::TooLong {
            len: name.len(),
            max: MAX_NAME_LEN,
        })
    } else {
        None
    }
}

/// A printable, bounded preview of a rejected name for error messages.
fn preview(name: &str) -> String {
    const SHOW: usize = 64;
    let mut out: String = name
        .chars()
        .take(SHOW)
        .flat_map(char::escape_default)
        .collect();
    if name.chars().count() > SHOW {
        out.push_str("...");
    }
    out
}

impl fmt::Debug for LockKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LockKey({:?}, {})", &*self.name, self.id)
    }
}

impl fmt::Display for LockKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pinned ids: if one of these changes, nodes on different versions stop
    /// excluding each other. Never edit a vector; add a new scheme instead.
    #[test]
    fn key_hash_test_vectors() {
        // Reference FNV-1a 64 vectors (from the FNV specification) prove the
        // hash function itself.
        assert_eq!(fnv1a64(&[b""]), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(&[b"a"]), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(&[b"foobar"]), 0x8594_4171_f739_67e8);
        // Split input hashes like the joined input.
        assert_eq!(fnv1a64(&[b"foo", b"bar"]), fnv1a64(&[b"foobar"]));

        // Pinned literal ids, computed once from the scheme above.
        let vectors: &[(&str, u64)] = &[
            ("orders-projection", 0x5886_0d97_fd87_2fa4),
            ("main:public:orders:all", 0x305b_ec67_7d66_e349),
            ("tenant_7:app:invoices:tenant-7", 0x97ce_9009_3311_a1ac),
            ("日本語:スキーマ:シャード", 0x996f_a813_f5c9_8401),
        ];
        for (name, id) in vectors {
            let key = LockKey::new(*name).expect("valid name");
            assert_eq!(key.id_u64(), *id, "id of {name:?} changed");
            assert_eq!(key.id(), *id as i64);
        }
        assert_eq!(
            LockKey::for_shard("main", "public", "orders:all").unwrap(),
            LockKey::new("main:public:orders:all").unwrap()
        );
    }

    #[test]
    fn equality_hash_and_order_follow_the_name() {
        use std::hash::BuildHasher;
        let state = std::collections::hash_map::RandomState::new();
        let a = LockKey::new("db:schema:a").unwrap();
        let a_again = LockKey::new("db:schema:a").unwrap();
        let b = LockKey::new("db:schema:b").unwrap();
        // Equal names built apart (no shared `Arc`) are equal and hash alike.
        assert_eq!(a, a_again);
        assert_eq!(state.hash_one(&a), state.hash_one(&a_again));
        assert_eq!(a.cmp(&a_again), std::cmp::Ordering::Equal);
        assert_ne!(a, b);
        assert!(a < b && b > a_again, "ordered by name");
        // Ids that collide (forged here) still tell the names apart.
        let forged = LockKey {
            name: Arc::from("db:schema:other"),
            id: a.id(),
        };
        assert_ne!(a, forged);
        assert_eq!(a.cmp(&forged), "db:schema:a".cmp("db:schema:other"));
    }

    #[test]
    fn invalid_names_are_typed_errors() {
        let cases = [
            (String::new(), "empty"),
            ("a\0b".to_string(), "NUL"),
            ("x".repeat(MAX_NAME_LEN + 1), "longer"),
        ];
        for (name, needle) in cases {
            match LockKey::new(name.clone()) {
                Err(Error::InvalidLockName {
                    reason,
                    name: shown,
                }) => {
                    assert!(reason.to_string().contains(needle), "{reason}");
                    assert!(shown.len() < 80, "preview is bounded: {shown}");
                }
                other => panic!("{name:?} gave {other:?}"),
            }
        }
        // The boundary itself, unicode and hostile text are fine.
        assert!(LockKey::new("x".repeat(MAX_NAME_LEN)).is_ok());
        assert!(LockKey::new("'; DROP TABLE locks; --").is_ok());
        assert!(LockKey::new("ü🦀\u{202e}").is_ok());
    }

    #[test]
    fn bounded_resource_names_keep_the_hash() {
        let short = LockKey::new("a:b:c").unwrap();
        assert_eq!(short.bounded_resource_name(255), "shardlock:v1:a:b:c");
        let long = LockKey::new("é".repeat(400)).unwrap();
        let cut = long.bounded_resource_name(255);
        assert_eq!(cut.chars().count(), 255);
        assert!(cut.ends_with(&format!("~{:016x}", long.id_u64())));
        let other = LockKey::new(format!("{}x", "é".repeat(399))).unwrap();
        assert_ne!(other.bounded_resource_name(255), cut);
        assert_eq!(long.bounded_resource_name(3).chars().count(), 17);
    }
}
