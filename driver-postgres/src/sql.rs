//! Every statement the driver sends, and how a `bigint` advisory key appears
//! in `pg_locks`.
//!
//! # Keys in `pg_locks`
//!
//! `pg_advisory_lock(bigint)` stores its key as two `oid` (unsigned 32-bit)
//! columns: `classid` holds the high 32 bits, `objid` the low 32 bits, and
//! `objsubid` is 1 (it is 2 for the two-`int4` form). [`LOCK_KEY_OF`]
//! rebuilds the signed key without overflow: the high half is read as a
//! signed 32-bit number, multiplied by 2³², and the low half added; the Rust
//! mirror is [`join_key`], tested against [`split_key`] for negative keys.

/// The `bigint` key of an advisory-lock row `l` of `pg_locks`.
///
/// `objsubid = 1` must be part of the filter (see [`OWN_ADVISORY`]).
macro_rules! lock_key_of {
    () => {
        "((CASE WHEN l.classid::bigint >= 2147483648 \
           THEN l.classid::bigint - 4294967296 \
           ELSE l.classid::bigint END) * 4294967296 + l.objid::bigint)"
    };
}

/// Advisory-lock rows of `pg_locks l` granted to this backend with a
/// `bigint` key.
macro_rules! own_advisory {
    () => {
        "l.locktype = 'advisory' AND l.pid = pg_backend_pid() AND l.granted AND l.objsubid = 1"
    };
}

/// Advisory-lock rows of `pg_locks l` granted to **another** session of
/// the current database with a `bigint` key: `probe`'s filter. Advisory
/// locks are per database (`l.database`), so a key held in another database
/// of the server does not count. `IS DISTINCT FROM` also counts a prepared
/// transaction holding the key (its `pid` is null).
macro_rules! others_advisory {
    () => {
        "l.locktype = 'advisory' \
         AND l.database = (SELECT d.oid FROM pg_database d WHERE d.datname = current_database()) \
         AND l.pid IS DISTINCT FROM pg_backend_pid() AND l.granted AND l.objsubid = 1"
    };
}

/// See [`lock_key_of!`].
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) const LOCK_KEY_OF: &str = lock_key_of!();

/// See [`own_advisory!`].
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) const OWN_ADVISORY: &str = own_advisory!();

/// See [`others_advisory!`].
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) const OTHERS_ADVISORY: &str = others_advisory!();

/// The channel announced releases are sent on (see [`RELEASE_CHANNEL`]).
macro_rules! release_channel {
    () => {
        "shardlock_release"
    };
}

/// Keys per notification (see [`KEYS_PER_NOTIFICATION`]).
macro_rules! keys_per_notification {
    () => {
        "350"
    };
}

/// The `LISTEN`/`NOTIFY` channel of announced releases: sessions send on it
/// with `pg_notify` in the statement that unlocks
/// ([`Session::release_announced`](shardlock_core::Session::release_announced)),
/// and every session's own connection listens on it. PostgreSQL channels
/// are per database, like advisory locks, so only sessions of the same
/// database hear a release.
///
/// The payload is the released keys' ids ([`LockKey::id`](shardlock_core::LockKey::id))
/// in decimal, comma-separated, each prefixed with `c` when it was handed
/// over cleanly, e.g. `c6378800868661604260,-6004255738539311188`; at most
/// [`KEYS_PER_NOTIFICATION`] ids per notification. A payload that does not
/// parse (e.g. a hand-sent `NOTIFY shardlock_release, 'hello'`) still wakes
/// the listeners, but marks nothing clean.
pub const RELEASE_CHANNEL: &str = release_channel!();

/// The most keys one notification of an announced release names: a payload
/// must stay under PostgreSQL's 8000 bytes, and one key takes at most 22
/// (`c`, a sign, 19 digits, a comma): 350 × 22 = 7,700 bytes. A release of
/// more keys sends several notifications from the same statement.
pub const KEYS_PER_NOTIFICATION: usize = 350;

/// Connect, first statement (simple protocol): what the server is, and its
/// backend pid.
pub(crate) const IDENTIFY: &str =
    "SELECT version(), current_setting('server_version_num'), pg_backend_pid()";

/// Try one key without waiting.
pub(crate) const TRY_ONE: &str = "SELECT pg_try_advisory_lock($1)";

/// Try many keys (distinct) without waiting, in one round trip: the keys
/// of `$1` **denied**, as one `bigint[]` (NULL, when every key was
/// granted), read with [`mark_listed`]. One row decodes faster than one row
/// per key, and listing the denied keys sends and decodes nothing in the
/// usual case of a batch (free keys: 10,000 new sets, measure 2's cycle);
/// no `ORDER BY` means no sort on the server: the filter runs once per row
/// of the `unnest` scan, which keeps the order of `$1` (matched in one
/// pass), and any other order is still answered right.
pub(crate) const TRY_MANY: &str = "SELECT array_agg(t.k) FROM unnest($1::bigint[]) AS t(k) \
     WHERE NOT pg_try_advisory_lock(t.k)";

/// Wait for one key.
pub(crate) const LOCK: &str = "SELECT pg_advisory_lock($1)";

/// Release one key held once.
pub(crate) const UNLOCK: &str = "SELECT pg_advisory_unlock($1)";

/// Releases many keys (distinct, held) in one statement: the keys of `$1`
/// the server did **not** release, as one `bigint[]` (NULL, the usual
/// answer, when it released them all), read with [`mark_listed`]. No sort
/// on the server, and nothing to decode in the usual case.
pub(crate) const UNLOCK_MANY: &str = "SELECT array_agg(t.k) FROM unnest($1::bigint[]) AS t(k) \
     WHERE NOT pg_advisory_unlock(t.k)";

/// Probe: per key of `$1` (keys this session does not hold, deduplicated),
/// whether another session of the database holds it, in one statement and
/// one read of `pg_locks`; takes no lock. One `bool[]` in the order of `$1`.
pub(crate) const PROBE: &str = concat!(
    "SELECT array_agg(o.k IS NOT NULL ORDER BY t.i) \
     FROM unnest($1::bigint[]) WITH ORDINALITY AS t(k, i) \
     LEFT JOIN (SELECT DISTINCT ",
    lock_key_of!(),
    " AS k FROM pg_locks l WHERE ",
    others_advisory!(),
    ") o ON o.k = t.k"
);

/// An announced release, in one statement: unlocks the keys `$1` (held, each
/// once) like [`UNLOCK_MANY`] and, for those the server actually released,
/// `pg_notify`s [`RELEASE_CHANNEL`] with their ids, `c`-prefixed when
/// `$2` marks them clean, comma-separated, [`KEYS_PER_NOTIFICATION`] per
/// notification. Answers the keys **not** released (NULL when all were, as
/// [`UNLOCK_MANY`]) and the number of notifications queued (none when
/// nothing was released). Only a payload is ordered (by position in `$1`,
/// at most [`KEYS_PER_NOTIFICATION`] keys a sort), so it reads the same on
/// every run.
///
/// The unlocks take effect at once; the notifications are delivered when
/// the statement's implicit transaction commits, so a listener that hears
/// one finds the keys already free. `u` is read twice, so PostgreSQL
/// evaluates it once (a CTE with volatile functions is never inlined).
pub(crate) const RELEASE_ANNOUNCED: &str = concat!(
    "WITH u AS (SELECT t.i, t.k, t.c, pg_advisory_unlock(t.k) AS ok \
     FROM unnest($1::bigint[], $2::bool[]) WITH ORDINALITY AS t(k, c, i)) \
     SELECT (SELECT array_agg(u.k) FROM u WHERE NOT u.ok), \
     (SELECT count(pg_notify('",
    release_channel!(),
    "', p.payload)) FROM (SELECT string_agg(CASE WHEN u.c THEN 'c' ELSE '' END || u.k::text, \
     ',' ORDER BY u.i) AS payload FROM u WHERE u.ok GROUP BY (u.i - 1) / ",
    keys_per_notification!(),
    ") p)"
);

/// Release every advisory lock of the session: only as it ends (`close`,
/// drop).
pub(crate) const UNLOCK_ALL: &str = "SELECT pg_advisory_unlock_all()";

/// Release `$1` only if this backend holds it (no server WARNING when it
/// does not): after an abandoned wait whose outcome is unsure.
pub(crate) const UNLOCK_IF_HELD: &str = concat!(
    "SELECT CASE WHEN EXISTS (SELECT 1 FROM pg_locks l WHERE ",
    own_advisory!(),
    " AND ",
    lock_key_of!(),
    " = $1) THEN pg_advisory_unlock($1) ELSE false END"
);

/// Release those of `$1` this backend holds: after a batch that failed
/// half-way (e.g. out of shared memory), whose earlier keys stay locked.
pub(crate) const UNLOCK_HELD_OF: &str = concat!(
    "SELECT count(pg_advisory_unlock(t.k)) FROM unnest($1::bigint[]) AS t(k) WHERE t.k IN (SELECT ",
    lock_key_of!(),
    " FROM pg_locks l WHERE ",
    own_advisory!(),
    ")"
);

/// Verify, in one round trip and one read of `pg_locks`: this backend's
/// pid, and those of the keys `$1` it no longer holds.
pub(crate) const VERIFY: &str = concat!(
    "SELECT pg_backend_pid(), \
     ARRAY(SELECT t.k FROM unnest($1::bigint[]) AS t(k) EXCEPT SELECT ",
    lock_key_of!(),
    " FROM pg_locks l WHERE ",
    own_advisory!(),
    ")"
);

/// The light verify: one round trip that proves the session's server
/// process is the same one and alive, without reading the lock table (see
/// `PgOptions::lock_check_interval`).
pub(crate) const VERIFY_PROCESS: &str = "SELECT pg_backend_pid()";

/// The keys this backend holds (for tests).
#[cfg(test)]
pub(crate) const HELD_KEYS: &str = concat!(
    "SELECT ",
    lock_key_of!(),
    " FROM pg_locks l WHERE ",
    own_advisory!(),
    " ORDER BY 1"
);

/// Cancel the statement of backend `$1` (from a side connection).
pub(crate) const CANCEL_BACKEND: &str = "SELECT pg_cancel_backend($1)";

/// The second connect statement (simple protocol): the backend pid again,
/// then the session settings. Values are numbers this crate formats, never
/// user text.
pub(crate) fn session_setup(settings: &[(&str, String)]) -> String {
    let mut sql = String::from("SELECT pg_backend_pid()");
    for (name, value) in settings {
        sql.push_str(&format!(", set_config('{name}', '{value}', false)"));
    }
    sql
}

/// `(classid, objid)` of a `bigint` key as `pg_locks` shows it.
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) fn split_key(key: i64) -> (u32, u32) {
    let bits = key as u64;
    ((bits >> 32) as u32, bits as u32)
}

/// The `bigint` key of a `pg_locks` row: the arithmetic of [`LOCK_KEY_OF`].
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) fn join_key(classid: u32, objid: u32) -> i64 {
    let high = i64::from(classid as i32);
    high * (1_i64 << 32) + i64::from(objid)
}

/// Per key of `asked` (distinct), whether the server listed it in `listed`
/// (the answer of [`TRY_MANY`], [`UNLOCK_MANY`] or [`RELEASE_ANNOUNCED`]).
/// A list in the order of `asked`, as an unsorted `unnest` scan returns it,
/// is matched in one pass without hashing; any other order through a set.
/// `None` when the list names a key that was not asked or names one twice:
/// the server's answer cannot be trusted then.
pub(crate) fn mark_listed(asked: &[i64], listed: &[i64]) -> Option<Vec<bool>> {
    let mut marks = vec![false; asked.len()];
    if listed.is_empty() {
        return Some(marks);
    }
    if listed.len() > asked.len() {
        return None;
    }
    let mut next = listed.iter().peekable();
    for (mark, key) in marks.iter_mut().zip(asked) {
        if next.peek() == Some(&key) {
            *mark = true;
            next.next();
        }
    }
    if next.peek().is_none() {
        return Some(marks);
    }
    // Another order: match through a set.
    let mut wanted: std::collections::HashSet<i64> = std::collections::HashSet::new();
    if !listed.iter().all(|k| wanted.insert(*k)) {
        return None;
    }
    for (mark, key) in marks.iter_mut().zip(asked) {
        *mark = wanted.remove(key);
    }
    wanted.is_empty().then_some(marks)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listed_keys_are_marked_in_any_order_and_strangers_refused() {
        let asked = [5, -3, 9, 1 << 40, 0];
        assert_eq!(mark_listed(&asked, &[]), Some(vec![false; 5]));
        assert_eq!(
            mark_listed(&asked, &[-3, 1 << 40]),
            Some(vec![false, true, false, true, false]),
            "in order: one pass"
        );
        assert_eq!(
            mark_listed(&asked, &[0, 5, 9]),
            Some(vec![true, false, true, false, true]),
            "out of order: through the set"
        );
        assert_eq!(mark_listed(&asked, &asked), Some(vec![true; 5]));
        assert_eq!(mark_listed(&asked, &[5, 7]), None, "7 was not asked");
        assert_eq!(mark_listed(&asked, &[9, 5, 9]), None, "9 twice");
        assert_eq!(mark_listed(&[1], &[1, 1]), None, "longer than asked");
        assert_eq!(mark_listed(&[], &[]), Some(vec![]));
    }

    #[test]
    fn key_split_and_join_round_trip_including_negative_keys() {
        let keys = [
            0,
            1,
            -1,
            i64::MIN,
            i64::MAX,
            0x0000_0001_0000_0000,
            -0x0000_0001_0000_0000,
            0x7fff_ffff_ffff_ffff,
            -6_004_255_738_539_311_188, // a real negative key id
            0x97ce_9009_3311_a1ac_u64 as i64,
        ];
        for key in keys {
            let (classid, objid) = split_key(key);
            assert_eq!(
                join_key(classid, objid),
                key,
                "key {key} ({classid}, {objid})"
            );
        }
        // Postgres' own layout for -1: both halves all ones.
        assert_eq!(split_key(-1), (u32::MAX, u32::MAX));
        assert_eq!(split_key(i64::MIN), (0x8000_0000, 0));
    }

    /// The SQL reconstruction against a live server, for the edge keys no
    /// lock name reaches. Needs `SHARDLOCK_PG_URL` (the integration tests
    /// cover negative keys through `verify` in every mode).
    #[tokio::test]
    async fn live_key_reconstruction_for_edge_keys() {
        use sqlx::Connection;
        let Ok(url) = std::env::var("SHARDLOCK_PG_URL") else {
            eprintln!("live part not run: set SHARDLOCK_PG_URL");
            return;
        };
        let mut conn = sqlx::PgConnection::connect(&url).await.expect("connect");
        let mut keys = vec![
            i64::MIN,
            -1,
            0,
            1,
            i64::MAX,
            -(1 << 32),
            1 << 32,
            -6_004_255_738,
        ];
        for key in &keys {
            let taken: bool = sqlx::query_scalar(TRY_ONE)
                .bind(key)
                .fetch_one(&mut conn)
                .await
                .expect("lock");
            assert!(taken, "edge key {key} is free");
        }
        keys.sort_unstable();
        let shown: Vec<i64> = sqlx::query_scalar(HELD_KEYS)
            .fetch_all(&mut conn)
            .await
            .expect("held keys");
        assert_eq!(shown, keys, "pg_locks rebuilt to the same keys");
        // A two-`int4` advisory lock (`objsubid = 2`) is never a key.
        let other: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1, $2)")
            .bind(7_i32)
            .bind(i32::MAX)
            .fetch_one(&mut conn)
            .await
            .expect("two-int lock");
        assert!(other);
        let (_, missing): (i32, Vec<i64>) = sqlx::query_as(VERIFY)
            .bind(&keys)
            .fetch_one(&mut conn)
            .await
            .expect("verify");
        assert!(
            missing.is_empty(),
            "verify sees every edge key: {missing:?}"
        );
        let shown: Vec<i64> = sqlx::query_scalar(HELD_KEYS)
            .fetch_all(&mut conn)
            .await
            .expect("held keys");
        assert_eq!(shown, keys, "a two-int lock is not a key");
        let released: bool = sqlx::query_scalar(UNLOCK_IF_HELD)
            .bind(i64::MIN)
            .fetch_one(&mut conn)
            .await
            .expect("unlock if held");
        assert!(released);
        let again: bool = sqlx::query_scalar(UNLOCK_IF_HELD)
            .bind(i64::MIN)
            .fetch_one(&mut conn)
            .await
            .expect("unlock if held");
        assert!(!again, "not held any more: false, no warning");
        let (_, missing): (i32, Vec<i64>) = sqlx::query_as(VERIFY)
            .bind(&keys)
            .fetch_one(&mut conn)
            .await
            .expect("verify");
        assert_eq!(missing, vec![i64::MIN], "verify names the missing key");
        let undone: i64 = sqlx::query_scalar(UNLOCK_HELD_OF)
            .bind(&keys)
            .fetch_one(&mut conn)
            .await
            .expect("undo");
        assert_eq!(undone, keys.len() as i64 - 1);
        conn.close().await.expect("close");
    }

    /// `TRY_MANY` and `UNLOCK_MANY` against a live server: each key is
    /// tried exactly once (a second evaluation would stack the lock, and one
    /// unlock would then leave it held), only denied keys are listed, and
    /// an unlock lists only the keys it could not release. Needs
    /// `SHARDLOCK_PG_URL` (the contract suite covers both through the
    /// session API).
    #[tokio::test]
    async fn live_batches_list_denied_and_unreleased_keys() {
        use sqlx::Connection;
        let Ok(url) = std::env::var("SHARDLOCK_PG_URL") else {
            eprintln!("live part not run: set SHARDLOCK_PG_URL");
            return;
        };
        let mut ours = sqlx::PgConnection::connect(&url).await.expect("connect");
        let mut other = sqlx::PgConnection::connect(&url).await.expect("connect");
        let salt = (fastrand::u64(..) >> 20) as i64;
        let keys: Vec<i64> = (0..500).map(|i| salt + i * 7919 - 250).collect();
        let taken: bool = sqlx::query_scalar(TRY_ONE)
            .bind(keys[123])
            .fetch_one(&mut other)
            .await
            .expect("lock");
        assert!(taken);
        let denied: Option<Vec<i64>> = sqlx::query_scalar(TRY_MANY)
            .bind(&keys)
            .fetch_one(&mut ours)
            .await
            .expect("try many");
        assert_eq!(denied, Some(vec![keys[123]]), "only the other's key denied");
        let marks = mark_listed(&keys, &denied.unwrap_or_default()).expect("only asked keys");
        let expected: Vec<bool> = (0..keys.len()).map(|i| i == 123).collect();
        assert_eq!(marks, expected, "every key but the other's granted");
        let granted: Vec<i64> = keys
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != 123)
            .map(|(_, k)| *k)
            .collect();
        let mut held: Vec<i64> = sqlx::query_scalar(HELD_KEYS)
            .fetch_all(&mut ours)
            .await
            .expect("held keys");
        assert_eq!(held.len(), keys.len() - 1, "each key held once");
        held.dedup();
        assert_eq!(held.len(), keys.len() - 1);
        let denied: Option<Vec<i64>> = sqlx::query_scalar(TRY_MANY)
            .bind(&keys[123..124])
            .fetch_one(&mut ours)
            .await
            .expect("try the other's key");
        assert_eq!(denied, Some(vec![keys[123]]), "the other's key denied");
        let none_denied: Option<Vec<i64>> = sqlx::query_scalar(TRY_MANY)
            .bind(&keys[..0])
            .fetch_one(&mut ours)
            .await
            .expect("try nothing");
        assert_eq!(none_denied, None, "nothing denied: NULL");
        let unreleased: Option<Vec<i64>> = sqlx::query_scalar(UNLOCK_MANY)
            .bind(&granted)
            .fetch_one(&mut ours)
            .await
            .expect("unlock many");
        assert_eq!(unreleased, None, "all released");
        let held: Vec<i64> = sqlx::query_scalar(HELD_KEYS)
            .fetch_all(&mut ours)
            .await
            .expect("held keys");
        assert!(held.is_empty(), "one unlock each was enough: {held:?}");
        let unreleased: Option<Vec<i64>> = sqlx::query_scalar(UNLOCK_MANY)
            .bind(&keys[..3])
            .fetch_one(&mut ours)
            .await
            .expect("unlock of keys not held");
        assert_eq!(unreleased, Some(keys[..3].to_vec()));
        ours.close().await.expect("close");
        other.close().await.expect("close");
    }

    /// `PROBE` and `RELEASE_ANNOUNCED` against a live server, below the
    /// session's bookkeeping: a backend's own keys never count as held by
    /// another, edge keys are matched, and only keys actually released are
    /// named. Needs `SHARDLOCK_PG_URL` (the integration tests cover both
    /// through the session API).
    #[tokio::test]
    async fn live_probe_and_announced_release() {
        use sqlx::postgres::PgListener;
        use sqlx::Connection;
        let Ok(url) = std::env::var("SHARDLOCK_PG_URL") else {
            eprintln!("live part not run: set SHARDLOCK_PG_URL");
            return;
        };
        let mut holder = sqlx::PgConnection::connect(&url).await.expect("connect");
        let mut other = sqlx::PgConnection::connect(&url).await.expect("connect");
        let mut listener = PgListener::connect(&url).await.expect("listener");
        listener.listen(RELEASE_CHANNEL).await.expect("listen");
        // Edge keys offset by a random bit pattern, so parallel runs differ.
        let salt = (fastrand::u64(..) >> 20) as i64;
        let keys = [i64::MIN + salt, -1 - salt, salt, i64::MAX - salt];
        for key in &keys[..3] {
            let taken: bool = sqlx::query_scalar(TRY_ONE)
                .bind(key)
                .fetch_one(&mut holder)
                .await
                .expect("lock");
            assert!(taken);
        }
        let own: Vec<bool> = sqlx::query_scalar(PROBE)
            .bind(&keys[..])
            .fetch_one(&mut holder)
            .await
            .expect("probe");
        assert_eq!(own, [false; 4], "a backend's own keys are not another's");
        let seen: Vec<bool> = sqlx::query_scalar(PROBE)
            .bind(&keys[..])
            .fetch_one(&mut other)
            .await
            .expect("probe");
        assert_eq!(seen, [true, true, true, false]);
        // keys[3] is not held: the server answers false and does not name it.
        let (unreleased, sent): (Option<Vec<i64>>, i64) = sqlx::query_as(RELEASE_ANNOUNCED)
            .bind(&keys[..])
            .bind([true, false, true, true])
            .fetch_one(&mut holder)
            .await
            .expect("release announced");
        assert_eq!(unreleased, Some(vec![keys[3]]), "only keys[3] stays");
        assert_eq!(sent, 1);
        let expected = format!("c{},{},c{}", keys[0], keys[1], keys[2]);
        let heard = tokio::time::timeout(std::time::Duration::from_secs(10), async {
            loop {
                let n = listener.recv().await.expect("recv");
                if n.payload() == expected {
                    break n;
                }
            }
        })
        .await
        .expect("the announcement arrives");
        assert_eq!(heard.channel(), RELEASE_CHANNEL);
        let (unreleased, sent): (Option<Vec<i64>>, i64) = sqlx::query_as(RELEASE_ANNOUNCED)
            .bind(&keys[3..])
            .bind([true])
            .fetch_one(&mut holder)
            .await
            .expect("release of nothing");
        assert_eq!(
            (unreleased, sent),
            (Some(vec![keys[3]]), 0),
            "nothing released, nothing sent"
        );
        let (unreleased, sent): (Option<Vec<i64>>, i64) = sqlx::query_as(RELEASE_ANNOUNCED)
            .bind(&keys[..0])
            .bind([false; 0])
            .fetch_one(&mut holder)
            .await
            .expect("release of no keys");
        assert_eq!((unreleased, sent), (None, 0));
        holder.close().await.expect("close");
        other.close().await.expect("close");
    }

    #[test]
    fn announced_releases_name_the_channel_and_stay_under_the_payload_limit() {
        assert!(RELEASE_ANNOUNCED.contains(&format!("pg_notify('{RELEASE_CHANNEL}'")));
        assert!(RELEASE_ANNOUNCED.contains(&format!("/ {KEYS_PER_NOTIFICATION})")));
        assert_eq!(keys_per_notification!(), KEYS_PER_NOTIFICATION.to_string());
        let widest = format!("c{},", i64::MIN);
        assert_eq!(widest.len(), 22);
        assert!(KEYS_PER_NOTIFICATION * widest.len() < 8000);
        assert!(
            RELEASE_ANNOUNCED.contains("WHERE u.ok"),
            "only released keys"
        );
        assert!(PROBE.contains(OTHERS_ADVISORY));
        assert!(PROBE.contains(LOCK_KEY_OF));
        assert_eq!(PROBE.matches("pg_locks").count(), 1, "one read of pg_locks");
        assert!(!PROBE.contains("pg_try_advisory"), "a probe takes nothing");
        assert!(
            OTHERS_ADVISORY.contains("l.objsubid = 1"),
            "never a two-int lock"
        );
    }

    #[test]
    fn statements_are_well_formed() {
        // Batches sort nothing on the server (issue 17); only an announced
        // release's payloads are ordered.
        assert!(!TRY_MANY.contains("ORDER BY"));
        assert!(!UNLOCK_MANY.contains("ORDER BY"));
        assert_eq!(RELEASE_ANNOUNCED.matches("ORDER BY").count(), 1);
        assert!(RELEASE_ANNOUNCED.contains("string_agg(CASE"));
        assert!(VERIFY.contains("EXCEPT"));
        assert!(VERIFY.contains("l.objsubid = 1"), "keys only");
        assert!(
            UNLOCK_HELD_OF.contains("l.objsubid = 1"),
            "never a two-int lock"
        );
        assert_eq!(
            VERIFY.matches("pg_locks").count(),
            1,
            "one read of pg_locks"
        );
        assert!(UNLOCK_IF_HELD.contains("= $1"));
        assert_eq!(
            LOCK_KEY_OF.matches('(').count(),
            LOCK_KEY_OF.matches(')').count()
        );
        assert!(OWN_ADVISORY.contains("pg_backend_pid()"));
        assert_eq!(
            session_setup(&[("tcp_keepalives_idle", "10".into())]),
            "SELECT pg_backend_pid(), set_config('tcp_keepalives_idle', '10', false)"
        );
    }
}
