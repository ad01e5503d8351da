//! The statements of the driver, built as text.
//!
//! Every statement goes out through MySQL's **text protocol** (one
//! `COM_QUERY` command, one round trip) rather than as a prepared statement:
//! sqlx prepares each distinct statement text once per connection
//! (`COM_STMT_PREPARE`, an extra round trip) and keeps it in its cache and
//! in the server's `max_prepared_stmt_count`; a batch of N keys is a
//! different text for every N. Lock names are therefore sent as literals,
//! written as `_utf8mb4 X'<hex>'` (a hex literal with a character-set
//! introducer): only hex digits reach the SQL text, so no name can escape
//! its literal, whatever it contains.
//!
//! A batch is one `SELECT f(name1), f(name2), ...` per [`CHUNK`] keys (the
//! stand-in for the prepared-statement placeholder limit: MySQL and MariaDB
//! answer thousands of columns in one row, but the server's
//! `max_allowed_packet`, 16 MiB by default on MariaDB 10.11 and 64 MiB on
//! MySQL 8, bounds the text), and the chunks of one batch are sent together
//! as **one** multi-statement command: one round trip for any batch size.
//!
//! # Lock names
//!
//! A key locks [`lock_name`]: `shardlock:v1:<name>` when that is at most
//! [`MAX_LOCK_NAME_CHARS`] (64) characters and holds no character that
//! case folding could change (MySQL 5.7+ compares `GET_LOCK` names
//! case-insensitively; MariaDB compares them exactly); otherwise core's
//! [`LockKey::hashed_resource_name`]`(64)`: as many leading characters as
//! fit, then `~` and the key's 16-hex-digit id, so distinct keys never share
//! a name on either server.

use std::fmt::Write as _;

use shardlock_core::LockKey;

/// Longest lock name MySQL accepts (`ER_USER_LOCK_WRONG_NAME` beyond it;
/// MariaDB accepts longer ones, but the driver keeps one rule for both).
pub const MAX_LOCK_NAME_CHARS: usize = 64;

/// Keys per `SELECT` of a batch.
pub(crate) const CHUNK: usize = 1000;

/// Seconds a blocking `GET_LOCK` waits before it answers 0 (one year; the
/// wait is then simply started again). MariaDB answers `NULL` to a
/// negative (infinite) timeout, so both servers get this one.
pub(crate) const WAIT_FOREVER_SECS: u32 = 31_536_000;

/// The server-side name of `key`'s lock (see the module docs).
///
/// ```
/// use shardlock_core::LockKey;
/// use shardlock_mysql::lock_name;
///
/// let key = LockKey::new("main:public:orders:all")?;
/// assert_eq!(lock_name(&key), "shardlock:v1:main:public:orders:all");
/// // Case matters to shardlock, not to MySQL: such names carry the id.
/// let upper = LockKey::new("Orders")?;
/// assert_eq!(lock_name(&upper), format!("shardlock:v1:Orders~{:016x}", upper.id_u64()));
/// assert!(lock_name(&LockKey::new("x".repeat(300))?).chars().count() <= 64);
/// # Ok::<(), shardlock_core::Error>(())
/// ```
pub fn lock_name(key: &LockKey) -> String {
    let full = key.resource_name();
    let fold_safe = full
        .chars()
        .all(|c| c.is_ascii() && !c.is_ascii_uppercase());
    if fold_safe && full.len() <= MAX_LOCK_NAME_CHARS {
        full
    } else {
        key.hashed_resource_name(MAX_LOCK_NAME_CHARS)
    }
}

/// `name` as an SQL string literal that cannot be escaped from:
/// `_utf8mb4 X'<hex of its UTF-8 bytes>'`.
pub(crate) fn literal(name: &str) -> String {
    let mut out = String::with_capacity(12 + name.len() * 2);
    out.push_str("_utf8mb4 X'");
    for byte in name.as_bytes() {
        let _ = write!(out, "{byte:02x}");
    }
    out.push('\'');
    out
}

/// One command of `SELECT`s, [`CHUNK`] columns each: `column(literal)` per
/// name, in order.
pub(crate) fn batch(names: &[String], column: impl Fn(&str) -> String) -> String {
    let mut sql = String::with_capacity(names.len() * 200);
    for (i, chunk) in names.chunks(CHUNK).enumerate() {
        if i > 0 {
            sql.push_str(";\n");
        }
        sql.push_str("SELECT ");
        for (j, name) in chunk.iter().enumerate() {
            if j > 0 {
                sql.push_str(", ");
            }
            sql.push_str(&column(&literal(name)));
        }
    }
    sql
}

/// `GET_LOCK(name, 0)` per name: 1 granted, 0 held elsewhere.
pub(crate) fn try_many(names: &[String]) -> String {
    batch(names, |n| format!("GET_LOCK({n}, 0)"))
}

/// `RELEASE_LOCK(name)` per name: 1 released, 0 held elsewhere, NULL free.
pub(crate) fn release_many(names: &[String]) -> String {
    batch(names, |n| format!("RELEASE_LOCK({n})"))
}

/// Per name, whether another connection holds it (1) or not (0); takes
/// nothing.
pub(crate) fn probe(names: &[String]) -> String {
    batch(names, |n| {
        format!("COALESCE(IS_USED_LOCK({n}) <> CONNECTION_ID(), 0)")
    })
}

/// Verify: `CONNECTION_ID()`, whether the liveness lock is still this
/// connection's, then per held name whether it is this connection's (1/0).
pub(crate) fn verify(liveness: &str, names: &[String]) -> String {
    let mut sql = format!(
        "SELECT CONNECTION_ID(), IS_USED_LOCK({}) <=> CONNECTION_ID()",
        literal(liveness)
    );
    if !names.is_empty() {
        sql.push_str(";\n");
        sql.push_str(&batch(names, |n| {
            format!("IS_USED_LOCK({n}) <=> CONNECTION_ID()")
        }));
    }
    sql
}

/// A blocking wait for `name`.
pub(crate) fn wait(name: &str) -> String {
    format!("SELECT GET_LOCK({}, {WAIT_FOREVER_SECS})", literal(name))
}

/// The watcher's wait for the liveness lock `name` of connection
/// `session` of `node`, labelled for `SHOW PROCESSLIST` (see the crate
/// docs, "Finding a node's sessions").
pub(crate) fn watch(node: &str, session: u64, name: &str) -> String {
    let node: String = node
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("/* shardlock:{node} session={session} */ {}", wait(name))
}

/// Gives `name` back if this connection holds it (a grant racing a cancel):
/// 1 when released.
pub(crate) fn give_back(name: &str) -> String {
    let n = literal(name);
    format!("SELECT IF(IS_USED_LOCK({n}) <=> CONNECTION_ID(), RELEASE_LOCK({n}), 0)")
}

/// Frees everything, liveness lock included: only in close and drop, after
/// the watcher stopped.
pub(crate) const RELEASE_ALL: &str = "DO RELEASE_ALL_LOCKS()";

/// The server's identity and this connection's id.
pub(crate) const IDENTIFY: &str = "SELECT VERSION(), CONNECTION_ID()";

/// `KILL QUERY <id>`: ends the statement a connection runs.
pub(crate) fn kill_query(connection_id: u64) -> String {
    format!("KILL QUERY {connection_id}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_carry_only_hex() {
        assert_eq!(literal("a'b"), "_utf8mb4 X'612762'");
        assert_eq!(literal("é"), "_utf8mb4 X'c3a9'");
    }

    #[test]
    fn batches_are_chunked_into_one_command() {
        let names: Vec<String> = (0..CHUNK + 1).map(|i| format!("k{i}")).collect();
        let sql = try_many(&names);
        assert_eq!(sql.matches("SELECT ").count(), 2);
        assert_eq!(sql.matches("GET_LOCK(").count(), CHUNK + 1);
    }

    #[test]
    fn names_fit_and_stay_distinct_under_case_folding() {
        let a = LockKey::new("Tenant").unwrap();
        let b = LockKey::new("tenant").unwrap();
        assert_ne!(lock_name(&a).to_lowercase(), lock_name(&b).to_lowercase());
        let long = LockKey::new("é".repeat(400)).unwrap();
        assert_eq!(lock_name(&long).chars().count(), MAX_LOCK_NAME_CHARS);
        let exact = LockKey::new("x".repeat(MAX_LOCK_NAME_CHARS - 13)).unwrap();
        assert_eq!(lock_name(&exact), exact.resource_name());
        let over = LockKey::new("x".repeat(MAX_LOCK_NAME_CHARS - 12)).unwrap();
        assert!(lock_name(&over).ends_with(&format!("~{:016x}", over.id_u64())));
    }
}
