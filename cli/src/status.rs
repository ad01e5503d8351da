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

use crate::node::BalanceArgs;

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
    /// else `IS_USED_LOCK` over the names the nodes' distributors build).
    #[arg(long, conflicts_with = "dir")]
    url: Option<String>,
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
            Some(url) if url.starts_with("mysql://") || url.starts_with("mariadb://") => {
                mysql_rows(url, &names(&args, &group)?).await?
            }
            Some(url) => postgres_rows(url, &names(&args, &group)?).await?,
            None => {
                bail!("say where the locks live: --dir <lock directory> or --url postgres://...")
            }
        },
    };
    let members = members(&rows, &group);
    if args.json {
        let doc = json!({
            "locks": rows.iter().map(row_json).collect::<Vec<_>>(),
            "members": members.iter().map(|m| m.to_json(&group)).collect::<Vec<_>>(),
        });
        println!("{doc}");
    } else {
        print_rows(&rows);
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
