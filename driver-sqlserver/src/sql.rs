//! The T-SQL text of every batch the driver sends, as pure functions.
//!
//! User data (lock resource names, timeouts) never enters the SQL text: it is
//! bound as parameters `@P1`, `@P2`, … (tiberius sends the batch through
//! `sp_executesql`). The only numbers formatted into the text are the row
//! indices and parameter numbers the builders generate themselves.
//!
//! # Passing many names in one batch
//!
//! A batch first fills a table variable `@k (i, name)` with the resource
//! names, `i` counting from 0 in the caller's order, then works through it.
//! Two ways to fill it, chosen per connection at connect time
//! ([`KeyList`]):
//!
//! - [`KeyList::Json`]: one `nvarchar(max)` parameter holding a JSON array of
//!   the names, read with `OPENJSON` (SQL Server 2016+, database
//!   compatibility level 130 or higher). Any number of names is **one round
//!   trip**.
//! - [`KeyList::Parameters`]: one parameter per name in `INSERT … VALUES`
//!   rows (at most 1000 rows per `VALUES`, SQL Server's limit). SQL Server
//!   accepts at most 2100 parameters per request, so a batch holds at most
//!   [`MAX_PARAMS_PER_BATCH`] names and `n` names take `ceil(n / 2000)` round
//!   trips. Used only where `OPENJSON` is unavailable (compatibility level
//!   below 130).
//!
//! Every batch ends in exactly one result set, ordered by `i`, so the caller
//! can check that it got one row per name, in order.

use std::fmt::Write as _;

use shardlock_core::LockKey;

/// `sp_getapplock`'s `@Resource` is `nvarchar(255)`: at most 255 UTF-16 code
/// units. Longer values are silently truncated by the server.
pub(crate) const MAX_RESOURCE_UTF16: usize = 255;

/// Names per batch in [`KeyList::Parameters`] mode, below SQL Server's limit
/// of 2100 parameters per request (leaving room for the others a batch binds).
pub(crate) const MAX_PARAMS_PER_BATCH: usize = 2000;

/// Rows per `INSERT … VALUES` (SQL Server allows at most 1000).
const MAX_ROWS_PER_VALUES: usize = 1000;

/// The value a release batch reports for a resource this session does not hold
/// (`sp_releaseapplock` is then not called, as it would raise error 1223).
/// Not one of `sp_releaseapplock`'s own codes (0 and -999).
pub(crate) const NOT_HELD: i32 = -1000;

/// How a batch receives its list of resource names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KeyList {
    /// One JSON array parameter read with `OPENJSON`: one round trip for any
    /// number of names.
    Json,
    /// One parameter per name, at most [`MAX_PARAMS_PER_BATCH`] per batch.
    Parameters,
}

impl KeyList {
    /// The mode for a database at `compatibility_level` (`None` when it could
    /// not be read): JSON from 130 (SQL Server 2016) on.
    pub(crate) fn for_compatibility_level(level: Option<i32>) -> Self {
        match level {
            Some(level) if level >= 130 => Self::Json,
            _ => Self::Parameters,
        }
    }
}

/// One parameter of a batch, bound in order as `@P1`, `@P2`, ….
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Param {
    /// An `nvarchar` value.
    Text(String),
    /// An `int` value.
    Int(i32),
}

/// A batch: SQL text, its parameters, and how many names it carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Batch {
    /// The T-SQL text.
    pub(crate) sql: String,
    /// The parameters, `@P1` first.
    pub(crate) params: Vec<Param>,
    /// How many resource names the batch carries (its expected row count for
    /// the per-name batches).
    pub(crate) names: usize,
}

/// The resource name of `key` for `sp_getapplock`: `shardlock:v1:<name>`,
/// at most 255 UTF-16 code units.
///
/// This is [`LockKey::bounded_resource_name`]`(255)`, which cuts by Unicode
/// characters. A name with characters outside the Basic Multilingual Plane
/// (emoji, some CJK) can fit 255 characters yet exceed 255 UTF-16 code units,
/// which the server would silently truncate, cutting off the distinguishing
/// hash suffix. Such names are cut again here, by UTF-16 code units, keeping
/// the same `~<16 hex digits of the id>` suffix. For names in the Basic
/// Multilingual Plane the result equals `bounded_resource_name(255)`.
pub(crate) fn resource_name(key: &LockKey) -> String {
    let bounded = key.bounded_resource_name(MAX_RESOURCE_UTF16).into_owned();
    if utf16_len(&bounded) <= MAX_RESOURCE_UTF16 {
        return bounded;
    }
    let suffix = format!("~{:016x}", key.id_u64());
    let budget = MAX_RESOURCE_UTF16 - suffix.len();
    let mut out = String::with_capacity(bounded.len());
    let mut used = 0;
    for c in key.resource_name().chars() {
        let width = c.len_utf16();
        if used + width > budget {
            break;
        }
        used += width;
        out.push(c);
    }
    out.push_str(&suffix);
    out
}

/// Length of `s` in UTF-16 code units, as SQL Server counts `nvarchar`.
pub(crate) fn utf16_len(s: &str) -> usize {
    s.chars().map(char::len_utf16).sum()
}

/// Options set once per connection, in a plain batch so they persist for the
/// session (a `SET` inside `sp_executesql` would revert when it returns),
/// followed by what the driver checks at connect. No user data: sent with
/// `simple_query`.
///
/// Columns: `spid` (int), `product_version` (nvarchar), `engine_edition`
/// (int), `version` (`@@VERSION`), `database_name`, `compatibility_level`
/// (int, NULL if the row is not visible).
pub(crate) const CONNECT_PROBE: &str = "SET NOCOUNT ON;
SET IMPLICIT_TRANSACTIONS OFF;
SET XACT_ABORT OFF;
SELECT CAST(@@SPID AS int) AS spid,
    CAST(SERVERPROPERTY('ProductVersion') AS nvarchar(128)) AS product_version,
    CAST(SERVERPROPERTY('EngineEdition') AS int) AS engine_edition,
    CAST(@@VERSION AS nvarchar(4000)) AS version,
    DB_NAME() AS database_name,
    (SELECT CAST(compatibility_level AS int) FROM sys.databases WHERE database_id = DB_ID())
        AS compatibility_level;";

/// Opens a session-fenced transaction on a lock session's connection, as a
/// plain batch (so the `SET` and the transaction outlive it).
///
/// `XACT_ABORT ON`: a run-time error in any statement terminates and rolls
/// back the whole transaction, instead of only the failing statement
/// (<https://learn.microsoft.com/sql/t-sql/statements/set-xact-abort-transact-sql>),
/// so a failed write can never be committed with the checkpoint. A
/// transaction already open (`@@TRANCOUNT > 0`) is refused rather than
/// nested: `COMMIT` of a nested transaction commits nothing.
pub(crate) const BEGIN_FENCED: &str = "IF @@TRANCOUNT > 0
    THROW 51000, N'shardlock: a transaction is already open on this session', 1;
SET XACT_ABORT ON;
BEGIN TRANSACTION;";

/// Commits the fenced transaction, only if it is the one open transaction
/// and still committable (`XACT_STATE() = 1`: an error under
/// `XACT_ABORT ON` has already rolled it back, and `COMMIT` would then
/// fail with 3902), then restores the session's `XACT_ABORT OFF`.
pub(crate) const COMMIT_FENCED: &str = "IF XACT_STATE() <> 1 OR @@TRANCOUNT <> 1
    THROW 51001, N'shardlock: no committable fenced transaction is open (an error rolled it back, or it was nested)', 1;
COMMIT TRANSACTION;
SET XACT_ABORT OFF;";

/// Rolls back whatever transaction is open (all nesting levels) and
/// restores the session's `XACT_ABORT OFF`. Harmless when none is open.
pub(crate) const ROLLBACK_FENCED: &str = "IF @@TRANCOUNT > 0 ROLLBACK TRANSACTION;
SET XACT_ABORT OFF;";

/// One round trip proving the connection is alive, for a session that holds
/// nothing. Column: `spid`.
pub(crate) const PING: &str = "SELECT CAST(@@SPID AS int) AS spid;";

/// One slice of a blocking acquire: `sp_getapplock` waiting server-side for at
/// most `timeout_ms` milliseconds (0: do not wait). Column: `r`, the return
/// code.
pub(crate) fn acquire_slice(resource: &str, timeout_ms: i32) -> Batch {
    Batch {
        sql: "SET NOCOUNT ON;
DECLARE @r int;
EXEC @r = sp_getapplock @Resource = @P1, @LockMode = N'Exclusive', @LockOwner = N'Session', @LockTimeout = @P2, @DbPrincipal = N'public';
SELECT @r AS r;"
            .to_string(),
        params: vec![Param::Text(resource.to_string()), Param::Int(timeout_ms)],
        names: 1,
    }
}

/// Try-acquire of every name without waiting (`@LockTimeout = 0`). Columns:
/// `i`, `r` (the `sp_getapplock` return code), one row per name in order.
pub(crate) fn try_acquire(list: KeyList, resources: &[String]) -> Vec<Batch> {
    per_name(
        list,
        resources,
        "    EXEC @r = sp_getapplock @Resource = @name, @LockMode = N'Exclusive', @LockOwner = N'Session', @LockTimeout = 0, @DbPrincipal = N'public';\n",
    )
}

/// Release of every name this session holds. A name the server does not show
/// as held by this session is skipped (`sp_releaseapplock` would raise error
/// 1223) and answered [`NOT_HELD`]. Columns: `i`, `r` (0 released, -999
/// error, [`NOT_HELD`]), one row per name in order.
///
/// One release per name: a lock taken twice (which the session never does)
/// stays held once; a full release could free a colliding name's hold too.
pub(crate) fn release(list: KeyList, resources: &[String]) -> Vec<Batch> {
    per_name(
        list,
        resources,
        "    SET @r = -1000;\n    IF APPLOCK_MODE(N'public', @name, N'Session') <> N'NoLock'\n        EXEC @r = sp_releaseapplock @Resource = @name, @LockOwner = N'Session', @DbPrincipal = N'public';\n",
    )
}

/// The lock mode this session holds on every name, in one set-based query.
/// Columns: `spid`, `i`, `mode` (`Exclusive` while held, `NoLock` once lost).
pub(crate) fn verify(list: KeyList, resources: &[String]) -> Vec<Batch> {
    chunks(list, resources)
        .into_iter()
        .map(|mut batch| {
            batch.sql.push_str(
                "SELECT CAST(@@SPID AS int) AS spid, i, APPLOCK_MODE(N'public', name, N'Session') AS mode FROM @k ORDER BY i;",
            );
            batch
        })
        .collect()
}

/// A loop over `@k` running `body` per name with `@name` set, collecting `@r`.
fn per_name(list: KeyList, resources: &[String], body: &str) -> Vec<Batch> {
    chunks(list, resources)
        .into_iter()
        .map(|mut batch| {
            let sql = &mut batch.sql;
            sql.push_str(
                "DECLARE @out TABLE (i int NOT NULL PRIMARY KEY, r int NOT NULL);
DECLARE @i int = 0, @n int, @name nvarchar(255), @r int;
SELECT @n = COUNT(*) FROM @k;
WHILE @i < @n
BEGIN
    SELECT @name = name FROM @k WHERE i = @i;
",
            );
            sql.push_str(body);
            sql.push_str(
                "    INSERT INTO @out (i, r) VALUES (@i, @r);
    SET @i = @i + 1;
END;
SELECT i, r FROM @out ORDER BY i;",
            );
            batch
        })
        .collect()
}

/// The batches that declare and fill `@k`, one per chunk.
fn chunks(list: KeyList, resources: &[String]) -> Vec<Batch> {
    const HEAD: &str = "SET NOCOUNT ON;
DECLARE @k TABLE (i int NOT NULL PRIMARY KEY, name nvarchar(255) NOT NULL);
";
    match list {
        KeyList::Json => {
            let mut sql = HEAD.to_string();
            sql.push_str(
                "INSERT INTO @k (i, name) SELECT CAST([key] AS int), CAST([value] AS nvarchar(255)) FROM OPENJSON(@P1);\n",
            );
            vec![Batch {
                sql,
                params: vec![Param::Text(json_array(resources))],
                names: resources.len(),
            }]
        }
        KeyList::Parameters => {
            let mut out = Vec::new();
            // An empty list still gets one (empty) batch, like JSON mode.
            let groups: Vec<&[String]> = if resources.is_empty() {
                vec![&[]]
            } else {
                resources.chunks(MAX_PARAMS_PER_BATCH).collect()
            };
            for group in groups {
                let mut sql = HEAD.to_string();
                for (row_chunk, rows) in group.chunks(MAX_ROWS_PER_VALUES).enumerate() {
                    sql.push_str("INSERT INTO @k (i, name) VALUES ");
                    for (j, _) in rows.iter().enumerate() {
                        let i = row_chunk * MAX_ROWS_PER_VALUES + j;
                        if j > 0 {
                            sql.push_str(", ");
                        }
                        // `i` is a generated index, never user data.
                        let _ = write!(sql, "({i}, @P{})", i + 1);
                    }
                    sql.push_str(";\n");
                }
                let params = group.iter().cloned().map(Param::Text).collect();
                out.push(Batch {
                    sql,
                    params,
                    names: group.len(),
                });
            }
            out
        }
    }
}

/// `names` as a JSON array of strings.
fn json_array(names: &[String]) -> String {
    // Serializing a slice of strings cannot fail; fall back to an empty array
    // rather than panic if it ever did (the row-count check then reports it).
    serde_json::to_string(names).unwrap_or_else(|_| "[]".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("shardlock:v1:k{i}")).collect()
    }

    fn texts(params: &[Param]) -> Vec<&str> {
        params
            .iter()
            .map(|p| match p {
                Param::Text(s) => s.as_str(),
                Param::Int(_) => panic!("unexpected int parameter"),
            })
            .collect()
    }

    #[test]
    fn compatibility_level_picks_the_key_list() {
        assert_eq!(KeyList::for_compatibility_level(Some(160)), KeyList::Json);
        assert_eq!(KeyList::for_compatibility_level(Some(130)), KeyList::Json);
        assert_eq!(
            KeyList::for_compatibility_level(Some(120)),
            KeyList::Parameters
        );
        assert_eq!(KeyList::for_compatibility_level(None), KeyList::Parameters);
    }

    #[test]
    fn try_acquire_json_is_one_batch_with_one_parameter() {
        let resources = names(3);
        let batches = try_acquire(KeyList::Json, &resources);
        assert_eq!(batches.len(), 1);
        let b = &batches[0];
        assert_eq!(
            b.params,
            vec![Param::Text(
                r#"["shardlock:v1:k0","shardlock:v1:k1","shardlock:v1:k2"]"#.into()
            )]
        );
        let expected = "SET NOCOUNT ON;
DECLARE @k TABLE (i int NOT NULL PRIMARY KEY, name nvarchar(255) NOT NULL);
INSERT INTO @k (i, name) SELECT CAST([key] AS int), CAST([value] AS nvarchar(255)) FROM OPENJSON(@P1);
DECLARE @out TABLE (i int NOT NULL PRIMARY KEY, r int NOT NULL);
DECLARE @i int = 0, @n int, @name nvarchar(255), @r int;
SELECT @n = COUNT(*) FROM @k;
WHILE @i < @n
BEGIN
    SELECT @name = name FROM @k WHERE i = @i;
    EXEC @r = sp_getapplock @Resource = @name, @LockMode = N'Exclusive', @LockOwner = N'Session', @LockTimeout = 0, @DbPrincipal = N'public';
    INSERT INTO @out (i, r) VALUES (@i, @r);
    SET @i = @i + 1;
END;
SELECT i, r FROM @out ORDER BY i;";
        assert_eq!(b.sql, expected);
    }

    #[test]
    fn try_acquire_parameters_binds_one_parameter_per_name() {
        let resources = names(3);
        let batches = try_acquire(KeyList::Parameters, &resources);
        assert_eq!(batches.len(), 1);
        let b = &batches[0];
        assert_eq!(
            texts(&b.params),
            resources.iter().map(String::as_str).collect::<Vec<_>>()
        );
        assert!(
            b.sql
                .contains("INSERT INTO @k (i, name) VALUES (0, @P1), (1, @P2), (2, @P3);\n"),
            "{}",
            b.sql
        );
        assert!(b.sql.contains("@LockTimeout = 0"));
        assert!(b.sql.ends_with("SELECT i, r FROM @out ORDER BY i;"));
    }

    #[test]
    fn user_data_never_enters_the_sql_text() {
        let hostile = vec![
            "shardlock:v1:'; DROP TABLE x; --".to_string(),
            "shardlock:v1:\"q\" \\ ]]\t\n".to_string(),
        ];
        for list in [KeyList::Json, KeyList::Parameters] {
            for batch in try_acquire(list, &hostile)
                .into_iter()
                .chain(release(list, &hostile))
                .chain(verify(list, &hostile))
            {
                assert!(!batch.sql.contains("DROP TABLE"), "{}", batch.sql);
                assert!(!batch.sql.contains("\"q\""), "{}", batch.sql);
            }
        }
        let slice = acquire_slice(&hostile[0], 1000);
        assert!(!slice.sql.contains("DROP TABLE"));
        assert_eq!(
            slice.params,
            vec![Param::Text(hostile[0].clone()), Param::Int(1000)]
        );
    }

    #[test]
    fn json_parameter_round_trips_hostile_names() {
        let hostile = vec![
            "a'b".to_string(),
            "tab\there\nnewline".to_string(),
            "\"quoted\" \\ back\\slash".to_string(),
            "日本語-🦀-\u{202e}rtl".to_string(),
            "\u{1}\u{1f}".to_string(),
        ];
        let batches = try_acquire(KeyList::Json, &hostile);
        let Param::Text(json) = &batches[0].params[0] else {
            panic!("text parameter")
        };
        // Control characters are escaped, so the JSON stays valid for OPENJSON.
        assert!(json.contains("\\t") && json.contains("\\n") && json.contains("\\u0001"));
        let back: Vec<String> = serde_json::from_str(json).expect("valid JSON");
        assert_eq!(back, hostile);
    }

    #[test]
    fn parameter_mode_chunks_at_2000_names() {
        for (n, expected) in [
            (1, vec![1]),
            (2000, vec![2000]),
            (2001, vec![2000, 1]),
            (4001, vec![2000, 2000, 1]),
        ] {
            let resources = names(n);
            let batches = try_acquire(KeyList::Parameters, &resources);
            let sizes: Vec<usize> = batches.iter().map(|b| b.params.len()).collect();
            assert_eq!(sizes, expected, "{n} names");
            // Every batch stays below SQL Server's 2100-parameter limit and
            // numbers its parameters from @P1 with indices from 0.
            for b in &batches {
                assert!(b.params.len() <= MAX_PARAMS_PER_BATCH);
                assert!(b.sql.contains("(0, @P1)"));
                let last = b.params.len();
                assert!(b.sql.contains(&format!("({}, @P{last})", last - 1)));
                assert!(!b.sql.contains(&format!("@P{}", last + 1)));
            }
            // Names keep their order across chunks.
            let all: Vec<&str> = batches.iter().flat_map(|b| texts(&b.params)).collect();
            assert_eq!(
                all,
                resources.iter().map(String::as_str).collect::<Vec<_>>()
            );
        }
    }

    #[test]
    fn parameter_mode_splits_values_at_1000_rows() {
        let batches = try_acquire(KeyList::Parameters, &names(2000));
        let sql = &batches[0].sql;
        assert_eq!(sql.matches("INSERT INTO @k (i, name) VALUES ").count(), 2);
        assert!(sql.contains("(999, @P1000);\nINSERT INTO @k (i, name) VALUES (1000, @P1001)"));
    }

    #[test]
    fn json_mode_is_one_round_trip_for_any_size() {
        let resources = names(10_000);
        let batches = try_acquire(KeyList::Json, &resources);
        assert_eq!(batches.len(), 1);
        assert_eq!(batches[0].params.len(), 1);
    }

    #[test]
    fn release_checks_the_hold_before_releasing() {
        let batches = release(KeyList::Json, &names(2));
        assert_eq!(batches.len(), 1);
        let sql = &batches[0].sql;
        assert!(sql.contains("SET @r = -1000;"), "{sql}");
        assert_eq!(NOT_HELD, -1000);
        assert!(sql.contains(
            "IF APPLOCK_MODE(N'public', @name, N'Session') <> N'NoLock'\n        EXEC @r = sp_releaseapplock @Resource = @name, @LockOwner = N'Session', @DbPrincipal = N'public';"
        ));
        assert!(!sql.contains("sp_getapplock"));
        assert!(sql.ends_with("SELECT i, r FROM @out ORDER BY i;"));
    }

    #[test]
    fn verify_is_one_set_based_query() {
        let batches = verify(KeyList::Json, &names(5));
        assert_eq!(batches.len(), 1);
        let sql = &batches[0].sql;
        assert!(sql.ends_with(
            "SELECT CAST(@@SPID AS int) AS spid, i, APPLOCK_MODE(N'public', name, N'Session') AS mode FROM @k ORDER BY i;"
        ));
        assert!(!sql.contains("WHILE"));
        assert!(!sql.contains("sp_getapplock") && !sql.contains("sp_releaseapplock"));
        let batches = verify(KeyList::Parameters, &names(2001));
        assert_eq!(batches.len(), 2);
    }

    #[test]
    fn acquire_slice_waits_server_side_with_bound_timeout() {
        let b = acquire_slice("shardlock:v1:x", 1000);
        assert_eq!(
            b.sql,
            "SET NOCOUNT ON;
DECLARE @r int;
EXEC @r = sp_getapplock @Resource = @P1, @LockMode = N'Exclusive', @LockOwner = N'Session', @LockTimeout = @P2, @DbPrincipal = N'public';
SELECT @r AS r;"
        );
        assert_eq!(
            b.params,
            vec![Param::Text("shardlock:v1:x".into()), Param::Int(1000)]
        );
    }

    #[test]
    fn empty_lists_still_make_a_valid_batch() {
        for list in [KeyList::Json, KeyList::Parameters] {
            let batches = try_acquire(list, &[]);
            assert_eq!(batches.len(), 1, "{list:?}");
            assert!(!batches[0].sql.contains("VALUES ;"), "{}", batches[0].sql);
        }
    }

    #[test]
    fn connect_probe_sets_session_options_and_reads_the_server() {
        for needle in [
            "SET IMPLICIT_TRANSACTIONS OFF;",
            "@@SPID",
            "SERVERPROPERTY('ProductVersion')",
            "SERVERPROPERTY('EngineEdition')",
            "@@VERSION",
            "compatibility_level",
        ] {
            assert!(CONNECT_PROBE.contains(needle), "{needle}");
        }
    }

    #[test]
    fn resource_names_use_the_documented_scheme() {
        let key = LockKey::new("main:public:orders:all").unwrap();
        assert_eq!(resource_name(&key), "shardlock:v1:main:public:orders:all");
        assert_eq!(resource_name(&key), key.bounded_resource_name(255));
    }

    #[test]
    fn resource_names_of_exactly_255_are_kept_whole() {
        // 13 characters of prefix + 242 = 255.
        let key = LockKey::new("x".repeat(242)).unwrap();
        let name = resource_name(&key);
        assert_eq!(utf16_len(&name), 255);
        assert_eq!(name, format!("shardlock:v1:{}", "x".repeat(242)));
        // One more character is cut with the id suffix.
        let key = LockKey::new("x".repeat(243)).unwrap();
        let name = resource_name(&key);
        assert_eq!(utf16_len(&name), 255);
        assert!(name.ends_with(&format!("~{:016x}", key.id_u64())), "{name}");
        assert_eq!(name, key.bounded_resource_name(255));
    }

    #[test]
    fn long_unicode_names_fit_255_utf16_units_and_keep_the_hash() {
        // BMP characters: one UTF-16 unit each, same as the core scheme.
        let key = LockKey::new("é".repeat(400)).unwrap();
        let name = resource_name(&key);
        assert_eq!(utf16_len(&name), 255);
        assert_eq!(name, key.bounded_resource_name(255));
        assert!(name.ends_with(&format!("~{:016x}", key.id_u64())));

        // Astral characters: two UTF-16 units each. The core cut (255
        // characters) would be 493 units; the driver cuts by units.
        let key = LockKey::new("🦀".repeat(250)).unwrap();
        let core_cut = key.bounded_resource_name(255);
        assert!(utf16_len(&core_cut) > 255);
        let name = resource_name(&key);
        assert!(utf16_len(&name) <= 255, "{}", utf16_len(&name));
        assert!(name.starts_with("shardlock:v1:🦀"));
        assert!(name.ends_with(&format!("~{:016x}", key.id_u64())));
        // A surrogate pair is never split.
        assert!(name.chars().all(|c| c != char::REPLACEMENT_CHARACTER));

        // Two long names that share a prefix stay distinct.
        let other = LockKey::new(format!("{}x", "🦀".repeat(249))).unwrap();
        assert_ne!(resource_name(&other), name);

        // A short astral name is kept whole.
        let key = LockKey::new("日本語-🦀").unwrap();
        assert_eq!(resource_name(&key), "shardlock:v1:日本語-🦀");
    }

    #[test]
    fn mixed_width_names_at_the_boundary() {
        // 13 prefix units + 120 crabs (240 units) = 253 units, + "ab" = 255.
        let key = LockKey::new(format!("{}ab", "🦀".repeat(120))).unwrap();
        assert_eq!(utf16_len(&key.resource_name()), 255);
        assert_eq!(resource_name(&key), key.resource_name());
        // One unit more: cut.
        let key = LockKey::new(format!("{}abc", "🦀".repeat(120))).unwrap();
        let name = resource_name(&key);
        assert!(utf16_len(&name) <= 255);
        assert!(name.ends_with(&format!("~{:016x}", key.id_u64())));
    }
}
