//! `shardlock status`: who holds which lock, and the live members of a
//! balancing group.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::json;
use shardlock::{
    DatabaseId, LockKey, LockSet, SingleTenant, SOLO_SENTINEL_SHARD, TENANT_LOCK_SHARD,
};

use crate::node::{BalanceArgs, DriverKind};

/// Options of `shardlock status`.
#[derive(Debug, Args)]
pub(crate) struct StatusArgs {
    /// Lock directory of the sqlite driver.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Server URL: `postgres://...` lists the advisory locks of its
    /// database; `mysql://...` / `mariadb://...` the server's `GET_LOCK`
    /// locks (from `performance_schema.metadata_locks` on MySQL 8,
    /// `information_schema.METADATA_LOCK_INFO` on MariaDB with that plugin,
    /// else `IS_USED_LOCK` over the names the nodes' distributors build);
    /// an ADO.NET string (`server=tcp:host,1433;...`) or `sqlserver://` /
    /// `mssql://` / `jdbc:sqlserver://` URL the application locks of its
    /// database (from `sys.dm_tran_locks`, or, without `VIEW SERVER STATE`,
    /// `APPLOCK_TEST` over the names the nodes' distributors build).
    #[arg(long, conflicts_with = "dir")]
    url: Option<String>,
    /// Which kind of server `--url` names, when its form does not say it.
    #[arg(long, value_enum)]
    driver: Option<DriverKind>,
    /// Database id used in lock names (to name Postgres locks).
    #[arg(long, default_value = "main")]
    database: String,
    /// Tenant databases (multi-tenanted nodes), to name their locks.
    #[arg(long, value_delimiter = ',')]
    tenants: Vec<String>,
    /// Schema part of lock names.
    #[arg(long, default_value = "app")]
    schema: String,
    /// Number of shards the nodes run, to name their locks.
    #[arg(long, default_value_t = 12)]
    shards: usize,
    #[command(flatten)]
    balance: BalanceArgs,
    /// Print JSON (`{"locks": [..], "members": [..]}`) instead of tables.
    #[arg(long)]
    json: bool,
}

/// One row of the status table, whatever the driver.
#[derive(Debug, Clone)]
pub(crate) struct Row {
    pub(crate) database: String,
    pub(crate) lock_id: i64,
    pub(crate) name: Option<String>,
    pub(crate) holder: String,
    pub(crate) client: String,
    pub(crate) pid: String,
    pub(crate) since: SystemTime,
}

pub(crate) async fn run(args: StatusArgs) -> Result<()> {
    let group = Group::new(&args)?;
    // Where the holders were read from, when the driver has a choice.
    let mut source: Option<Source> = None;
    let rows = match &args.dir {
        Some(dir) => {
            let dir = dir.clone();
            let holders = tokio::task::spawn_blocking(move || shardlock::sqlite::status(&dir))
                .await
                .context("status task")?
                .context("reading the lock directory")?;
            holders
                .into_iter()
                .map(|h| Row {
                    database: h.database,
                    lock_id: h.key_id,
                    name: Some(h.name),
                    holder: h.node,
                    client: "local".into(),
                    pid: h.pid.to_string(),
                    since: h.since,
                })
                .collect::<Vec<_>>()
        }
        None => match &args.url {
            Some(url)
                if args.driver == Some(DriverKind::Sqlserver)
                    || (args.driver.is_none() && is_sqlserver_url(url)) =>
            {
                let (rows, used) = mssql_rows(url, &args.database, &names(&args, &group)?).await?;
                source = Some(used);
                rows
            }
            Some(url)
                if args.driver == Some(DriverKind::Mysql)
                    || url.starts_with("mysql://")
                    || url.starts_with("mariadb://") =>
            {
                mysql_rows(url, &names(&args, &group)?).await?
            }
            Some(url) => postgres_rows(url, &names(&args, &group)?).await?,
            None => {
                bail!("say where the locks live: --dir <lock directory>, or --url postgres://..., mysql://... or a SQL Server connection string")
            }
        },
    };
    let members = members(&rows, &group);
    if args.json {
        let mut doc = json!({
            "locks": rows.iter().map(row_json).collect::<Vec<_>>(),
            "members": members.iter().map(|m| m.to_json(&group)).collect::<Vec<_>>(),
        });
        if let Some(source) = &source {
            doc["source"] = source.to_json();
        }
        println!("{doc}");
    } else {
        print_rows(&rows);
        if let Some(source) = &source {
            println!("{source}");
        }
        print_members(&members, &group, rows.is_empty());
    }
    Ok(())
}

/// The balancing group's member slots, rebuilt from its name.
struct Group {
    name: String,
    max_members: u32,
    /// Key id → slot index.
    slots: HashMap<i64, u32>,
    /// Slot index → key name.
    names: Vec<String>,
}

impl Group {
    fn new(args: &StatusArgs) -> Result<Self> {
        let name = args.balance.group(&args.database, &args.schema);
        let max_members = args.balance.max_members;
        if max_members == 0 || max_members > 4096 {
            bail!("--max-members must be between 1 and 4096");
        }
        let mut slots = HashMap::new();
        let mut names = Vec::new();
        for i in 0..max_members {
            let key = LockKey::new(format!("members:{name}:{i}"))
                .with_context(|| format!("invalid --group {name:?}"))?;
            slots.insert(key.id(), i);
            names.push(key.name().to_string());
        }
        Ok(Self {
            name,
            max_members,
            slots,
            names,
        })
    }
}

/// One session holding locks in a database, as the status sees it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct HolderId {
    holder: String,
    client: String,
    pid: String,
}

/// A holder's member slots and other locks in one database.
#[derive(Debug, Default)]
struct HolderMembers {
    slots: Vec<u32>,
    /// Locks other than member slots: its lock sets.
    sets: usize,
    /// Whether any of its locks has a known name (a shardlock lock).
    named: bool,
}

/// The live members of the group in one database.
struct DatabaseMembers {
    database: String,
    /// Holders of a member slot or of a named lock, by their first slot.
    holders: Vec<(HolderId, HolderMembers)>,
}

impl DatabaseMembers {
    fn live(&self) -> Vec<u32> {
        let mut live: Vec<u32> = self
            .holders
            .iter()
            .flat_map(|(_, m)| m.slots.iter().copied())
            .collect();
        live.sort_unstable();
        live
    }

    fn to_json(&self, group: &Group) -> serde_json::Value {
        let holder = |h: &HolderId| json!({"holder": h.holder, "client": h.client, "pid": h.pid});
        let mut slots: Vec<(u32, &HolderId)> = self
            .holders
            .iter()
            .flat_map(|(h, m)| m.slots.iter().map(move |s| (*s, h)))
            .collect();
        slots.sort();
        json!({
            "database": self.database,
            "group": group.name,
            "max_members": group.max_members,
            "live": slots.len(),
            "slots": slots
                .iter()
                .map(|(slot, h)| {
                    let mut v = holder(h);
                    v["slot"] = json!(slot);
                    v["name"] = json!(group.names.get(*slot as usize));
                    v
                })
                .collect::<Vec<_>>(),
            "holders": self
                .holders
                .iter()
                .map(|(h, m)| {
                    let mut v = holder(h);
                    v["slots"] = json!(m.slots);
                    v["sets"] = json!(m.sets);
                    v
                })
                .collect::<Vec<_>>(),
        })
    }
}

/// Per database: which member slots are held and by whom, and each
/// holder's other locks.
fn members(rows: &[Row], group: &Group) -> Vec<DatabaseMembers> {
    let mut by_db: BTreeMap<&str, BTreeMap<HolderId, HolderMembers>> = BTreeMap::new();
    for r in rows {
        let id = HolderId {
            holder: r.holder.clone(),
            client: r.client.clone(),
            pid: r.pid.clone(),
        };
        let m = by_db
            .entry(r.database.as_str())
            .or_default()
            .entry(id)
            .or_default();
        match group.slots.get(&r.lock_id) {
            Some(slot) => m.slots.push(*slot),
            // Another group's member slot is not a set.
            None if r.name.as_deref().is_some_and(|n| n.starts_with("members:")) => {}
            None => {
                m.sets += 1;
                m.named |= r.name.is_some();
            }
        }
    }
    by_db
        .into_iter()
        .map(|(database, holders)| {
            let mut holders: Vec<(HolderId, HolderMembers)> = holders
                .into_iter()
                .filter(|(_, m)| !m.slots.is_empty() || m.named)
                .map(|(h, mut m)| {
                    m.slots.sort_unstable();
                    (h, m)
                })
                .collect();
            holders.sort_by_key(|(h, m)| (m.slots.first().copied().unwrap_or(u32::MAX), h.clone()));
            DatabaseMembers {
                database: database.to_string(),
                holders,
            }
        })
        .collect()
}

fn print_members(members: &[DatabaseMembers], group: &Group, no_locks: bool) {
    if no_locks {
        println!(
            "\nbalancing group {}: no live members (no member slot held)",
            group.name
        );
        return;
    }
    for db in members {
        let live = db.live();
        println!();
        if live.is_empty() {
            println!(
                "balancing group {} in {}: no live members (none of the {} member slots held)",
                group.name, db.database, group.max_members
            );
        } else {
            println!(
                "balancing group {} in {}: {} live member slot{} ({} of {})",
                group.name,
                db.database,
                live.len(),
                if live.len() == 1 { "" } else { "s" },
                list(&live),
                group.max_members
            );
        }
        if db.holders.is_empty() {
            continue;
        }
        println!(
            "  {:<32} {:<14} {:>8}  {:<10} {:>6}",
            "holder", "client", "pid", "slots", "sets"
        );
        for (h, m) in &db.holders {
            let slots = if m.slots.is_empty() {
                "-".to_string()
            } else {
                list(&m.slots)
            };
            println!(
                "  {:<32} {:<14} {:>8}  {:<10} {:>6}",
                h.holder, h.client, h.pid, slots, m.sets
            );
        }
    }
}

/// `0,1,2`.
fn list(slots: &[u32]) -> String {
    slots
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// Lock id → name for every lock the nodes' distributors can build, and the
/// group's member slots.
fn names(args: &StatusArgs, group: &Group) -> Result<HashMap<i64, String>> {
    let shards = crate::node::shard_names(args.shards.min(100_000));
    let mut sets = SingleTenant::new(
        DatabaseId::new(&args.database),
        &args.schema,
        shards.clone(),
    )
    .sets()?;
    for tenant in &args.tenants {
        let key = LockKey::for_shard(tenant, &args.schema, TENANT_LOCK_SHARD)?;
        sets.push(LockSet::new(key, DatabaseId::new(tenant), shards.clone()));
    }
    let solo = LockKey::for_shard(&args.database, &args.schema, SOLO_SENTINEL_SHARD)?;
    let mut out: HashMap<i64, String> = sets
        .into_iter()
        .map(|s| (s.key.id(), s.key.name().to_string()))
        .collect();
    out.insert(solo.id(), solo.name().to_string());
    for (id, slot) in &group.slots {
        if let Some(name) = group.names.get(*slot as usize) {
            out.insert(*id, name.clone());
        }
    }
    Ok(out)
}

/// database, lock id, application name, client address, pid, session start.
type PgLockRow = (String, i64, String, Option<String>, i32, Option<f64>);

/// Advisory locks held in the URL's database, from `pg_locks` and
/// `pg_stat_activity`, one round trip.
async fn postgres_rows(url: &str, names: &HashMap<i64, String>) -> Result<Vec<Row>> {
    use shardlock::postgres::sqlx::{self, Connection as _};
    // sqlx's error prints the server's message and gives it again as its
    // source; `PgCause` says it once.
    let mut conn = sqlx::PgConnection::connect(url)
        .await
        .map_err(shardlock::postgres::PgCause::from)
        .with_context(|| format!("connecting to {}", redact(url)))?;
    let rows: Vec<PgLockRow> = sqlx::query_as(
        "SELECT a.datname::text,
                (l.classid::bigint << 32) | l.objid::bigint,
                coalesce(a.application_name, ''),
                host(a.client_addr),
                l.pid,
                extract(epoch FROM a.backend_start)::float8
           FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
          WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
            AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
          ORDER BY 2",
    )
    .fetch_all(&mut conn)
    .await
    .map_err(shardlock::postgres::PgCause::from)
    .context("reading pg_locks")?;
    let _ = conn.close().await;
    Ok(rows
        .into_iter()
        .map(|(database, id, app, client, pid, since)| Row {
            database,
            lock_id: id,
            name: names.get(&id).cloned(),
            holder: app,
            client: client.unwrap_or_else(|| "local socket".into()),
            pid: pid.to_string(),
            since: UNIX_EPOCH + std::time::Duration::from_secs_f64(since.unwrap_or(0.0).max(0.0)),
        })
        .collect())
}

/// `GET_LOCK` locks of shardlock keys on the URL's server: where the server
/// can list them (MySQL 8's `performance_schema.metadata_locks`, MariaDB's
/// `METADATA_LOCK_INFO` plugin) every one, else the names in `names` whose
/// `IS_USED_LOCK` answers a connection. Holders are named from the
/// sessions' watcher labels in the processlist.
async fn mysql_rows(url: &str, names: &HashMap<i64, String>) -> Result<Vec<Row>> {
    use shardlock::mysql::sqlx::{self, Connection as _, Row as _};
    use shardlock::mysql::{lock_name, MySqlCause, MySqlOptions};

    let options = MySqlOptions::parse(url).context("invalid --url")?;
    let mut conn = sqlx::MySqlConnection::connect_with(options.get_connect_options())
        .await
        .map_err(MySqlCause::from)
        .with_context(|| format!("connecting to {}", redact(url)))?;
    let version: String = sqlx::query_scalar("SELECT VERSION()")
        .fetch_one(&mut conn)
        .await
        .map_err(MySqlCause::from)
        .context("reading VERSION()")?;
    // Lock name -> (key id, key name) for the names the nodes would use.
    let mut known: HashMap<String, (i64, String)> = HashMap::new();
    for (id, name) in names {
        if let Ok(key) = LockKey::new(name.clone()) {
            known.insert(lock_name(&key), (*id, name.clone()));
        }
    }
    // (lock name, connection id) of every held shardlock lock.
    let listed: Option<Vec<(String, i64)>> = if version.to_ascii_lowercase().contains("mariadb") {
        sqlx::query_as::<_, (String, i64)>(
            "SELECT TABLE_SCHEMA, CAST(THREAD_ID AS SIGNED) FROM information_schema.METADATA_LOCK_INFO
              WHERE LOCK_TYPE = 'User lock' AND TABLE_SCHEMA LIKE 'shardlock:v1:%'",
        )
        .fetch_all(&mut conn)
        .await
        .ok()
    } else {
        sqlx::query_as::<_, (String, i64)>(
            "SELECT m.OBJECT_NAME, CAST(t.PROCESSLIST_ID AS SIGNED)
               FROM performance_schema.metadata_locks m
               JOIN performance_schema.threads t ON t.THREAD_ID = m.OWNER_THREAD_ID
              WHERE m.OBJECT_TYPE = 'USER LEVEL LOCK' AND m.LOCK_STATUS = 'GRANTED'
                AND m.OBJECT_NAME LIKE 'shardlock:v1:%'",
        )
        .fetch_all(&mut conn)
        .await
        .ok()
    };
    let held: Vec<(String, u64)> = match listed {
        Some(held) => held.into_iter().map(|(n, id)| (n, id as u64)).collect(),
        None => {
            let lock_names: Vec<&String> = known.keys().collect();
            let mut held = Vec::new();
            for chunk in lock_names.chunks(1000) {
                let columns: Vec<String> = chunk
                    .iter()
                    .map(|n| format!("IS_USED_LOCK({})", hex_literal(n)))
                    .collect();
                let sql = format!("SELECT {}", columns.join(", "));
                let row = sqlx::query(&sql)
                    .fetch_one(&mut conn)
                    .await
                    .map_err(MySqlCause::from)
                    .context("reading IS_USED_LOCK")?;
                for (i, name) in chunk.iter().enumerate() {
                    let owner: Option<i64> = row
                        .try_get::<Option<i64>, _>(i)
                        .map_err(MySqlCause::from)
                        .context("reading IS_USED_LOCK")?;
                    if let Some(owner) = owner {
                        held.push(((*name).clone(), owner as u64));
                    }
                }
            }
            held
        }
    };
    // Connection id -> (host, database, node label).
    let processes: Vec<(i64, String, Option<String>, Option<String>)> =
        sqlx::query_as("SELECT ID, HOST, DB, INFO FROM information_schema.PROCESSLIST")
            .fetch_all(&mut conn)
            .await
            .map_err(MySqlCause::from)
            .context("reading the processlist")?;
    let _ = conn.close().await;
    let mut nodes: HashMap<u64, String> = HashMap::new();
    let mut hosts: HashMap<u64, (String, String)> = HashMap::new();
    for (id, host, db, info) in processes {
        hosts.insert(id as u64, (host, db.unwrap_or_default()));
        if let Some(label) = info
            .as_deref()
            .and_then(|i| i.strip_prefix("/* shardlock:"))
        {
            let mut parts = label.split_whitespace();
            let node = parts.next().unwrap_or_default().to_string();
            let session = parts
                .next()
                .and_then(|p| p.strip_prefix("session="))
                .and_then(|p| p.parse::<u64>().ok());
            if let Some(session) = session {
                nodes.insert(session, format!("shardlock:{node}"));
            }
        }
    }
    let now = SystemTime::now();
    let mut rows: Vec<Row> = held
        .into_iter()
        .map(|(lock, owner)| {
            let (id, name) = match known.get(&lock) {
                Some((id, name)) => (*id, Some(name.clone())),
                None => (id_of_lock_name(&lock), Some(lock.clone())),
            };
            let (client, database) = hosts.get(&owner).cloned().unwrap_or_default();
            Row {
                database,
                lock_id: id,
                name,
                holder: nodes.get(&owner).cloned().unwrap_or_default(),
                client,
                pid: owner.to_string(),
                since: now,
            }
        })
        .collect();
    rows.sort_by_key(|r| r.lock_id);
    Ok(rows)
}

/// Whether `url` names a SQL Server: a `sqlserver://`, `mssql://` or
/// `jdbc:sqlserver:` URL, or an ADO.NET connection string (`key=value;`
/// pairs with a `Server` / `Data Source` / `Address`).
pub(crate) fn is_sqlserver_url(url: &str) -> bool {
    let lower = url.trim().to_ascii_lowercase();
    if lower.starts_with("sqlserver://")
        || lower.starts_with("mssql://")
        || lower.starts_with("jdbc:sqlserver:")
    {
        return true;
    }
    !lower.contains("://")
        && lower.split(';').any(|pair| {
            let key = pair.split('=').next().unwrap_or_default().trim();
            matches!(
                key,
                "server" | "data source" | "address" | "addr" | "network address"
            ) && pair.contains('=')
        })
}

/// Where `status` read the holders of SQL Server application locks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Source {
    /// `sys.dm_tran_locks`: every session-owned application lock with its
    /// session.
    TranLocks,
    /// `APPLOCK_TEST` over the names the distributors build: which are held,
    /// not by whom.
    ApplockTest {
        /// Why the view was not used.
        why: String,
        /// How many names were tested.
        names: usize,
    },
}

impl Source {
    fn to_json(&self) -> serde_json::Value {
        match self {
            Self::TranLocks => json!({"kind": "sys.dm_tran_locks"}),
            Self::ApplockTest { why, names } => {
                json!({"kind": "APPLOCK_TEST", "names_tested": names, "why": why})
            }
        }
    }
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::TranLocks => write!(
                f,
                "source: sys.dm_tran_locks (every session-owned application lock)"
            ),
            Self::ApplockTest { why, names } => write!(
                f,
                "source: APPLOCK_TEST over the {names} lock names the nodes' distributors build \
                 ({why}); it tells which are held, not by whom"
            ),
        }
    }
}

/// Whether `sys.dm_tran_locks` may be read, from what the server said:
/// whether the view exists (`None`: the check failed) and whether the
/// login may read it (`None`: unknown). `Err` says why not.
pub(crate) fn tran_locks_readable(
    view_exists: Option<bool>,
    may_view: Option<bool>,
) -> std::result::Result<(), String> {
    match (view_exists, may_view) {
        (Some(false), _) => Err("this server has no sys.dm_tran_locks".to_string()),
        (_, Some(false)) => Err(
            "the login lacks VIEW SERVER STATE (VIEW SERVER PERFORMANCE STATE on SQL Server 2022, \
             VIEW DATABASE STATE on Azure SQL Database), which sys.dm_tran_locks needs"
                .to_string(),
        ),
        _ => Ok(()),
    }
}

/// One session-owned application lock as `sys.dm_tran_locks` shows it.
#[derive(Debug, Clone)]
pub(crate) struct TranLock {
    pub(crate) spid: i32,
    /// The name part of `resource_description` (first 32 characters).
    pub(crate) shown: String,
    pub(crate) program: String,
    pub(crate) client: String,
    pub(crate) age_s: i64,
}

/// A lock name the distributors build: its id, key name and resource name.
#[derive(Debug, Clone)]
pub(crate) struct KnownLock {
    id: i64,
    name: String,
    resource: String,
}

/// The distributors' names grouped by what `sys.dm_tran_locks` shows of
/// them (the first 32 characters of the resource name).
pub(crate) fn known_by_shown(names: &HashMap<i64, String>) -> HashMap<String, Vec<KnownLock>> {
    let mut out: HashMap<String, Vec<KnownLock>> = HashMap::new();
    for (id, name) in names {
        if let Ok(key) = LockKey::new(name.clone()) {
            out.entry(shardlock::sqlserver::tran_locks_name(&key))
                .or_default()
                .push(KnownLock {
                    id: *id,
                    name: name.clone(),
                    resource: shardlock::sqlserver::resource_name(&key),
                });
        }
    }
    for v in out.values_mut() {
        v.sort_by(|a, b| a.name.cmp(&b.name));
    }
    out
}

/// The shown names several known names share (so the view alone cannot
/// tell which of them a row is).
pub(crate) fn ambiguous<'a>(
    locks: &[TranLock],
    known: &'a HashMap<String, Vec<KnownLock>>,
) -> Vec<&'a KnownLock> {
    let mut out = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for lock in locks {
        if let Some(candidates) = known.get(&lock.shown) {
            if candidates.len() > 1 && seen.insert(lock.shown.clone()) {
                out.extend(candidates.iter());
            }
        }
    }
    out
}

/// Names the rows of `sys.dm_tran_locks`: a shown name that only one known
/// name has is that name; one several share is resolved with `held` (the
/// resources `APPLOCK_TEST` found held) when a single session holds all
/// the locks showing it, else left unnamed; an unknown one is named from
/// its text when it was not cut (shorter than 32 characters).
pub(crate) fn name_tran_locks(
    locks: Vec<TranLock>,
    known: &HashMap<String, Vec<KnownLock>>,
    held: &std::collections::HashSet<String>,
    database: &str,
    now: SystemTime,
) -> Vec<Row> {
    let row = |lock: &TranLock, id: i64, name: Option<String>| Row {
        database: database.to_string(),
        lock_id: id,
        name,
        holder: lock.program.clone(),
        client: lock.client.clone(),
        pid: lock.spid.to_string(),
        since: now - std::time::Duration::from_secs(u64::try_from(lock.age_s).unwrap_or(0)),
    };
    let mut by_shown: BTreeMap<&str, Vec<&TranLock>> = BTreeMap::new();
    for lock in &locks {
        by_shown.entry(lock.shown.as_str()).or_default().push(lock);
    }
    let mut rows = Vec::new();
    for (shown, group) in by_shown {
        match known.get(shown).map(Vec::as_slice) {
            Some([only]) => {
                for lock in group {
                    rows.push(row(lock, only.id, Some(only.name.clone())));
                }
            }
            Some(candidates) => {
                let sessions: std::collections::HashSet<i32> =
                    group.iter().map(|l| l.spid).collect();
                let held: Vec<&KnownLock> = candidates
                    .iter()
                    .filter(|c| held.contains(&c.resource))
                    .collect();
                if sessions.len() == 1 && held.len() == group.len() {
                    for (lock, known) in group.into_iter().zip(held) {
                        rows.push(row(lock, known.id, Some(known.name.clone())));
                    }
                } else {
                    for lock in group {
                        rows.push(row(lock, 0, None));
                    }
                }
            }
            None => {
                let full = shown.chars().count() < shardlock::sqlserver::TRAN_LOCKS_NAME_CHARS;
                for lock in group {
                    let named = shown
                        .strip_prefix(shardlock::KEY_SCHEME)
                        .filter(|_| full)
                        .and_then(|n| LockKey::new(n).ok());
                    match named {
                        Some(key) => rows.push(row(lock, key.id(), Some(key.name().to_string()))),
                        None => rows.push(row(lock, 0, None)),
                    }
                }
            }
        }
    }
    rows.sort_by_key(|r| (r.lock_id, r.pid.clone()));
    rows
}

/// Application locks of shardlock keys in the database of the SQL Server
/// connection string `url`: from `sys.dm_tran_locks` when the login may
/// read it, else `APPLOCK_TEST(N'public', name, N'Exclusive', N'Session')`
/// over the names in `names` (0: held by another session). Answers the
/// rows and which source was used.
async fn mssql_rows(
    url: &str,
    database: &str,
    names: &HashMap<i64, String>,
) -> Result<(Vec<Row>, Source)> {
    use shardlock::sqlserver::{DatabaseMapping, MssqlDriver, MssqlOptions};

    let options = MssqlOptions::parse(url)
        .context("invalid --url")?
        .database_mapping(DatabaseMapping::ConnectionString);
    let mut client = MssqlDriver::new(options)
        .connect_client(&DatabaseId::new(database), "shardlock:status")
        .await
        .context("connecting to SQL Server")?;
    // Whether the view exists and may be read; NULL when the server cannot
    // say (an unknown permission name on an older server).
    let probe = async {
        client
            .simple_query(
                "SELECT DB_NAME() AS db,
                    CAST(CASE WHEN OBJECT_ID(N'sys.dm_tran_locks') IS NULL THEN 0 ELSE 1 END AS int) AS has_view,
                    CAST(HAS_PERMS_BY_NAME(NULL, NULL, N'VIEW SERVER STATE') AS int) AS server_state,
                    CAST(HAS_PERMS_BY_NAME(DB_NAME(), N'DATABASE', N'VIEW DATABASE STATE') AS int) AS database_state",
            )
            .await?
            .into_row()
            .await
    }
    .await;
    let (db, view_exists, may_view) = match probe {
        Ok(Some(row)) => {
            let flag = |i: usize| row.try_get::<i32, _>(i).ok().flatten().map(|v| v == 1);
            let db = row
                .try_get::<&str, _>(0)
                .ok()
                .flatten()
                .unwrap_or(database)
                .to_string();
            let may = match (flag(2), flag(3)) {
                (Some(true), _) | (_, Some(true)) => Some(true),
                (Some(false), Some(false)) => Some(false),
                _ => None,
            };
            (db, flag(1), may)
        }
        _ => (database.to_string(), None, None),
    };
    let known = known_by_shown(names);
    let now = SystemTime::now();
    let mut why = tran_locks_readable(view_exists, may_view).err();
    if why.is_none() {
        let read = async {
            client
                .simple_query(
                    "SELECT CAST(l.request_session_id AS int) AS spid,
                            l.resource_description AS description,
                            s.program_name AS program,
                            c.client_net_address AS client,
                            CAST(DATEDIFF(SECOND, s.login_time, GETDATE()) AS bigint) AS age_s
                       FROM sys.dm_tran_locks AS l
                       LEFT JOIN sys.dm_exec_sessions AS s ON s.session_id = l.request_session_id
                       LEFT JOIN sys.dm_exec_connections AS c
                         ON c.session_id = l.request_session_id AND c.parent_connection_id IS NULL
                      WHERE l.resource_type = N'APPLICATION' AND l.request_owner_type = N'SESSION'
                        AND l.request_status = N'GRANTED' AND l.resource_database_id = DB_ID()",
                )
                .await?
                .into_first_result()
                .await
        }
        .await;
        match read {
            Ok(result) => {
                let locks: Vec<TranLock> = result
                    .iter()
                    .filter_map(|r| {
                        let description: &str = r.try_get(1).ok().flatten()?;
                        let shown = shardlock::sqlserver::applock_description_name(description)?;
                        if !shown.starts_with(shardlock::KEY_SCHEME) {
                            return None; // another application's lock
                        }
                        Some(TranLock {
                            spid: r.try_get::<i32, _>(0).ok().flatten()?,
                            shown: shown.to_string(),
                            program: r
                                .try_get::<&str, _>(2)
                                .ok()
                                .flatten()
                                .unwrap_or_default()
                                .to_string(),
                            client: r
                                .try_get::<&str, _>(3)
                                .ok()
                                .flatten()
                                .unwrap_or("?")
                                .to_string(),
                            age_s: r.try_get::<i64, _>(4).ok().flatten().unwrap_or(0),
                        })
                    })
                    .collect();
                // Shown names several known names share: ask which are held.
                let candidates: Vec<String> = ambiguous(&locks, &known)
                    .into_iter()
                    .map(|k| k.resource.clone())
                    .collect();
                let held = applock_test(&mut client, &candidates).await?;
                let _ = client.close().await;
                let rows = name_tran_locks(locks, &known, &held, &db, now);
                return Ok((rows, Source::TranLocks));
            }
            Err(e) => why = Some(format!("reading sys.dm_tran_locks failed: {e}")),
        }
    }
    // The fallback: which of the distributors' names are held, not by whom.
    let all: Vec<&KnownLock> = known.values().flatten().collect();
    let resources: Vec<String> = all.iter().map(|k| k.resource.clone()).collect();
    let held = applock_test(&mut client, &resources).await?;
    let _ = client.close().await;
    let mut rows: Vec<Row> = all
        .iter()
        .filter(|k| held.contains(&k.resource))
        .map(|k| Row {
            database: db.clone(),
            lock_id: k.id,
            name: Some(k.name.clone()),
            holder: "(unknown: APPLOCK_TEST)".to_string(),
            client: "?".to_string(),
            pid: "?".to_string(),
            since: now,
        })
        .collect();
    rows.sort_by_key(|r| r.lock_id);
    Ok((
        rows,
        Source::ApplockTest {
            why: why.unwrap_or_default(),
            names: resources.len(),
        },
    ))
}

/// The resources among `resources` that another session holds:
/// `APPLOCK_TEST(N'public', name, N'Exclusive', N'Session') = 0` (this
/// session holds none), 1000 names per round trip, bound as parameters.
async fn applock_test(
    client: &mut shardlock::sqlserver::TdsClient,
    resources: &[String],
) -> Result<std::collections::HashSet<String>> {
    use shardlock::sqlserver::tiberius::ToSql;
    let mut held = std::collections::HashSet::new();
    for chunk in resources.chunks(1000) {
        // Only generated indices and parameter numbers enter the text.
        let values: Vec<String> = (0..chunk.len())
            .map(|i| format!("({i}, @P{})", i + 1))
            .collect();
        let sql = format!(
            "SELECT CAST(k.i AS int), CAST(APPLOCK_TEST(N'public', k.name, N'Exclusive', N'Session') AS int)
               FROM (VALUES {}) AS k(i, name)",
            values.join(", ")
        );
        let params: Vec<&dyn ToSql> = chunk.iter().map(|r| r as &dyn ToSql).collect();
        let rows = client
            .query(sql, &params)
            .await
            .context("reading APPLOCK_TEST")?
            .into_first_result()
            .await
            .context("reading APPLOCK_TEST")?;
        for row in rows {
            let i = row.try_get::<i32, _>(0).ok().flatten();
            let grantable = row.try_get::<i32, _>(1).ok().flatten();
            if let (Some(i), Some(0)) = (i, grantable) {
                if let Some(resource) = usize::try_from(i).ok().and_then(|i| chunk.get(i)) {
                    held.insert(resource.clone());
                }
            }
        }
    }
    Ok(held)
}

/// `_utf8mb4 X'<hex>'`: a MySQL string literal nothing can escape from.
fn hex_literal(text: &str) -> String {
    let hex: String = text.bytes().map(|b| format!("{b:02x}")).collect();
    format!("_utf8mb4 X'{hex}'")
}

/// The key id of a MySQL lock name: the `~<16 hex>` suffix of a hashed
/// name, else the id of the name after `shardlock:v1:`.
fn id_of_lock_name(lock: &str) -> i64 {
    if let Some((_, hex)) = lock.rsplit_once('~') {
        if hex.len() == 16 {
            if let Ok(id) = u64::from_str_radix(hex, 16) {
                return id as i64;
            }
        }
    }
    lock.strip_prefix(shardlock::KEY_SCHEME)
        .and_then(|name| LockKey::new(name).ok())
        .map_or(0, |key| key.id())
}

/// The URL without its password, for messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{user}:***{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_string(),
    }
}

fn secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn row_json(r: &Row) -> serde_json::Value {
    json!({
        "database": r.database,
        "lock_id": r.lock_id,
        "name": r.name,
        "holder": r.holder,
        "client": r.client,
        "pid": r.pid,
        "since_unix": secs(r.since),
    })
}

pub(crate) fn print_rows(rows: &[Row]) {
    if rows.is_empty() {
        println!("no locks held");
        return;
    }
    let now = SystemTime::now();
    println!(
        "{:<12} {:>20}  {:<32} {:<28} {:<10} {:>8} {:>8}",
        "database", "lock id", "name", "holder", "client", "pid", "since"
    );
    for r in rows {
        let held = now
            .duration_since(r.since)
            .map(|d| format!("{}s ago", d.as_secs()))
            .unwrap_or_default();
        println!(
            "{:<12} {:>20}  {:<32} {:<28} {:<10} {:>8} {:>8}",
            r.database,
            r.lock_id,
            r.name.as_deref().unwrap_or("?"),
            r.holder,
            r.client,
            r.pid,
            held
        );
    }
    println!("{} locks held", rows.len());
    if rows.iter().any(|r| r.client != "local") {
        println!("(PostgreSQL does not record when a lock was taken: `since` is when the holder's session started)");
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn sql_server_urls_are_recognised() {
        for url in [
            "server=tcp:db,1433;user id=sa;password=x",
            "Server=tcp:db.internal,1433;User Id=app;Password=secret;TrustServerCertificate=true",
            "Data Source=db;Initial Catalog=app;User ID=sa;Password=x",
            "sqlserver://sa:x@db:1433/app",
            "mssql://sa:x@db/app",
            "jdbc:sqlserver://db:1433;user=sa;password=x",
        ] {
            assert!(is_sqlserver_url(url), "{url}");
        }
        for url in [
            "postgres://u:p@h:5432/db",
            "mysql://u:p@h/db",
            "mariadb://u:p@h/db",
            "postgres://u:p@h/db?options=server%3Dx",
        ] {
            assert!(!is_sqlserver_url(url), "{url}");
        }
    }

    #[test]
    fn the_view_is_used_only_when_it_exists_and_may_be_read() {
        assert_eq!(tran_locks_readable(Some(true), Some(true)), Ok(()));
        // Unknown permission (an older server): try the view, fall back if
        // reading it fails.
        assert_eq!(tran_locks_readable(Some(true), None), Ok(()));
        assert_eq!(tran_locks_readable(None, None), Ok(()));
        let no_view = tran_locks_readable(Some(false), Some(true)).unwrap_err();
        assert!(no_view.contains("no sys.dm_tran_locks"), "{no_view}");
        let no_perm = tran_locks_readable(Some(true), Some(false)).unwrap_err();
        assert!(no_perm.contains("VIEW SERVER STATE"), "{no_perm}");
        let fallback = Source::ApplockTest {
            why: no_perm,
            names: 14,
        };
        assert!(fallback
            .to_string()
            .contains("APPLOCK_TEST over the 14 lock names"));
        assert_eq!(fallback.to_json()["kind"], "APPLOCK_TEST");
        assert_eq!(Source::TranLocks.to_json()["kind"], "sys.dm_tran_locks");
    }

    fn lock(spid: i32, shown: &str) -> TranLock {
        TranLock {
            spid,
            shown: shown.to_string(),
            program: format!("shardlock:node-{spid}"),
            client: "10.0.0.1".to_string(),
            age_s: 5,
        }
    }

    fn shown(name: &str) -> String {
        shardlock::sqlserver::tran_locks_name(&LockKey::new(name).expect("valid"))
    }

    #[test]
    fn tran_locks_rows_are_mapped_back_to_lock_names() {
        let short = "main:app:orders:00";
        let long_a = "main:app:a-long-set-name-number-1";
        let long_b = "main:app:a-long-set-name-number-2";
        let names: HashMap<i64, String> = [short, long_a, long_b]
            .iter()
            .map(|n| (LockKey::new(*n).expect("valid").id(), n.to_string()))
            .collect();
        let known = known_by_shown(&names);
        assert_eq!(shown(long_a), shown(long_b), "the view cuts both alike");
        let resource = |n: &str| shardlock::sqlserver::resource_name(&LockKey::new(n).unwrap());

        // A unique prefix is its name; the two alike are resolved by
        // APPLOCK_TEST when one session holds every lock showing them.
        let locks = vec![
            lock(51, &shown(short)),
            lock(52, &shown(long_a)),
            lock(52, &shown(long_a)),
        ];
        assert_eq!(ambiguous(&locks, &known).len(), 2);
        let held: HashSet<String> = [resource(long_a), resource(long_b)].into_iter().collect();
        let rows = name_tran_locks(locks, &known, &held, "app", SystemTime::now());
        let mut named: Vec<(String, Option<String>)> = rows
            .iter()
            .map(|r| (r.pid.clone(), r.name.clone()))
            .collect();
        named.sort();
        assert_eq!(
            named,
            vec![
                ("51".to_string(), Some(short.to_string())),
                ("52".to_string(), Some(long_a.to_string())),
                ("52".to_string(), Some(long_b.to_string())),
            ]
        );
        assert!(rows.iter().all(|r| r.holder.starts_with("shardlock:node-")));

        // Two sessions behind one cut name: which holds which is unknown.
        let locks = vec![lock(52, &shown(long_a)), lock(53, &shown(long_a))];
        let rows = name_tran_locks(locks, &known, &held, "app", SystemTime::now());
        assert!(rows.iter().all(|r| r.name.is_none() && r.lock_id == 0));

        // A name no distributor builds: named from the view when not cut.
        let other = "main:app:custom";
        let rows = name_tran_locks(
            vec![
                lock(60, &shown(other)),
                lock(61, &shown("main:app:another-long-custom-name")),
            ],
            &known,
            &HashSet::new(),
            "app",
            SystemTime::now(),
        );
        let by_pid: HashMap<String, Option<String>> =
            rows.into_iter().map(|r| (r.pid, r.name)).collect();
        assert_eq!(by_pid["60"], Some(other.to_string()));
        assert_eq!(by_pid["61"], None);
    }
}
