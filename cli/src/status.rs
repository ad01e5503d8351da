//! `shardlock status`: who holds which lock, in every database of the
//! server (or the `--tenants` named), the locks per node, and the live
//! members of a balancing group with each node's share; once, or redrawn
//! every second with `--watch`.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

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
    /// Server URL: `postgres://...` lists the advisory locks of every
    /// database on the server (`pg_locks` is server-wide: no permission on
    /// the tenant databases is needed); `mysql://...` / `mariadb://...` the
    /// server's `GET_LOCK` locks (server-wide too; from
    /// `performance_schema.metadata_locks` on MySQL 8,
    /// `information_schema.METADATA_LOCK_INFO` on MariaDB with that plugin,
    /// else `IS_USED_LOCK` over the names the nodes' distributors build);
    /// an ADO.NET string (`server=tcp:host,1433;...`) or `sqlserver://` /
    /// `mssql://` / `jdbc:sqlserver://` URL the application locks of every
    /// database (from `sys.dm_tran_locks`, or, without `VIEW SERVER STATE`,
    /// `APPLOCK_TEST` over the names the nodes' distributors build, in the
    /// `--tenants` databases or else the connection string's).
    #[arg(long, conflicts_with = "dir")]
    url: Option<String>,
    /// Which kind of server `--url` names, when its form does not say it.
    #[arg(long, value_enum)]
    driver: Option<DriverKind>,
    /// Database id used in lock names (to name the locks of balanced,
    /// single-tenant and solo nodes).
    #[arg(long, default_value = "main")]
    database: String,
    /// Only these databases, comma separated (default: every database with
    /// a lock); also names the locks of multi-tenanted nodes run with the
    /// same `--tenants`.
    #[arg(long, value_delimiter = ',')]
    tenants: Vec<String>,
    /// Schema part of lock names.
    #[arg(long, default_value = "app")]
    schema: String,
    /// Number of shards the nodes run, to name their locks and to compute
    /// a balanced node's share (these sets over the live member slots).
    #[arg(long, default_value_t = 12)]
    shards: usize,
    #[command(flatten)]
    balance: BalanceArgs,
    /// Print JSON (`{"at_unix_ms", "locks": [..], "nodes": [..],
    /// "members": [..]}`) instead of tables; with `--watch`, one document
    /// per line per refresh.
    #[arg(long)]
    json: bool,
    /// Keep watching: redraw the holders, the locks per node and each
    /// balanced node's slots and share every `--interval-ms` (the screen is
    /// cleared when the output is a terminal, else refreshes are separated
    /// by a `---` line); ctrl-c ends it.
    #[arg(long)]
    watch: bool,
    /// Time between two refreshes of `--watch`, in milliseconds.
    #[arg(long, default_value_t = 1000, requires = "watch")]
    interval_ms: u64,
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

/// What one look at the locks found.
struct Snapshot {
    at: SystemTime,
    rows: Vec<Row>,
    /// Where the holders were read from, when the driver has a choice.
    source: Option<Source>,
    members: Vec<DatabaseMembers>,
    nodes: Vec<NodeCount>,
}

pub(crate) async fn run(args: StatusArgs) -> Result<()> {
    let group = Group::new(&args)?;
    if args.dir.is_none() && args.url.is_none() {
        bail!("say where the locks live: --dir <lock directory>, or --url postgres://..., mysql://... or a SQL Server connection string");
    }
    if args.watch {
        return watch(&args, &group).await;
    }
    let snapshot = snapshot(&args, &group).await?;
    let out = if args.json {
        format!("{}\n", snapshot.to_json(&group))
    } else {
        let mut out = String::new();
        render(&mut out, &snapshot, &group);
        out
    };
    // A closed pipe (`| head`) is not an error worth a message.
    let _ = emit(&out);
    Ok(())
}

/// Writes `text` to stdout at once; `Err` when stdout is gone.
fn emit(text: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(text.as_bytes())?;
    stdout.flush()
}

/// Reads the holders once, from the lock directory or the server.
async fn snapshot(args: &StatusArgs, group: &Group) -> Result<Snapshot> {
    let at = SystemTime::now();
    let mut source: Option<Source> = None;
    let mut rows = match (&args.dir, &args.url) {
        (Some(dir), _) => {
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
        (None, Some(url))
            if args.driver == Some(DriverKind::Sqlserver)
                || (args.driver.is_none() && is_sqlserver_url(url)) =>
        {
            let (rows, used) = mssql_rows(url, args, &names(args, group, &[])?).await?;
            source = Some(used);
            rows
        }
        (None, Some(url))
            if args.driver == Some(DriverKind::Mysql)
                || url.starts_with("mysql://")
                || url.starts_with("mariadb://") =>
        {
            mysql_rows(url, args, group).await?
        }
        (None, Some(url)) => postgres_rows(url, args, group).await?,
        (None, None) => bail!("say where the locks live: --dir <lock directory> or --url"),
    };
    if !args.tenants.is_empty() {
        rows.retain(|r| args.tenants.contains(&r.database));
    }
    // By database, then name (shards in order), so a redraw keeps its rows
    // in place.
    rows.sort_by(|a, b| {
        (&a.database, &a.name, a.lock_id, &a.pid).cmp(&(&b.database, &b.name, b.lock_id, &b.pid))
    });
    let members = members(&rows, group, args.shards);
    let nodes = node_counts(&rows, group);
    Ok(Snapshot {
        at,
        rows,
        source,
        members,
        nodes,
    })
}

impl Snapshot {
    fn to_json(&self, group: &Group) -> serde_json::Value {
        let mut doc = json!({
            "at_unix_ms": unix_ms(self.at),
            "locks": self.rows.iter().map(row_json).collect::<Vec<_>>(),
            "nodes": self.nodes.iter().map(NodeCount::to_json).collect::<Vec<_>>(),
            "members": self.members.iter().map(|m| m.to_json(group)).collect::<Vec<_>>(),
        });
        if let Some(source) = &self.source {
            doc["source"] = source.to_json();
        }
        doc
    }
}

/// The tables of one snapshot: holders, locks per node, the balancing
/// group's members with their shares, and the SQL Server source.
fn render(out: &mut String, snapshot: &Snapshot, group: &Group) {
    write_rows(out, &snapshot.rows, snapshot.at);
    if let Some(source) = &snapshot.source {
        let _ = writeln!(out, "{source}");
    }
    write_nodes(out, &snapshot.nodes);
    write_members(out, &snapshot.members, group);
}

/// `status --watch`: a snapshot every `--interval-ms` until ctrl-c (or
/// SIGTERM), drawn over the last one on a terminal, one after the other
/// (separated by `---`) otherwise, or one JSON document per line. A failed
/// first look ends it with the error (a wrong URL or folder); a later one
/// is shown and retried at the next refresh (a database restarting).
async fn watch(args: &StatusArgs, group: &Group) -> Result<()> {
    if args.interval_ms < 100 || args.interval_ms > 3_600_000 {
        bail!("--interval-ms must be between 100 and 3600000");
    }
    let terminal = !args.json && std::io::IsTerminal::is_terminal(&std::io::stdout());
    let from = source_label(args);
    let mut ticks = tokio::time::interval(Duration::from_millis(args.interval_ms));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let stop = stop_signal();
    tokio::pin!(stop);
    let mut first = true;
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = ticks.tick() => {}
        }
        let look = tokio::select! {
            _ = &mut stop => break,
            look = snapshot(args, group) => look,
        };
        let mut out = String::new();
        match look {
            Ok(snapshot) if args.json => {
                let _ = writeln!(out, "{}", snapshot.to_json(group));
            }
            Err(e) if args.json => {
                if first {
                    return Err(e);
                }
                let doc =
                    json!({"at_unix_ms": unix_ms(SystemTime::now()), "error": format!("{e:#}")});
                let _ = writeln!(out, "{doc}");
            }
            look => {
                if first {
                    if let Err(e) = look {
                        return Err(e);
                    }
                }
                // Clear the screen and home the cursor; on a pipe or file,
                // a separator instead of escape codes.
                out.push_str(if terminal {
                    "\x1b[2J\x1b[H"
                } else if first {
                    ""
                } else {
                    "---\n"
                });
                let at = look.as_ref().map_or_else(|_| SystemTime::now(), |s| s.at);
                let _ = writeln!(
                    out,
                    "shardlock status · {} · {from} · every {} ms, ctrl-c ends\n",
                    utc_time(at),
                    args.interval_ms
                );
                match look {
                    Ok(snapshot) => render(&mut out, &snapshot, group),
                    Err(e) => {
                        let _ = writeln!(out, "error: {e:#}\n(retrying at the next refresh)");
                    }
                }
            }
        }
        first = false;
        if emit(&out).is_err() {
            // The reader went away (`| head`): nothing left to do.
            break;
        }
    }
    Ok(())
}

/// Resolves on ctrl-c, or SIGTERM on Unix.
async fn stop_signal() {
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        r = tokio::signal::ctrl_c() => {
            if r.is_err() {
                // No handler could be installed: only SIGTERM (or the
                // default SIGINT action) ends the watch.
                std::future::pending::<()>().await;
            }
        }
        _ = term => {}
    }
}

/// Where the locks are read from, for the watch header (no password).
fn source_label(args: &StatusArgs) -> String {
    match (&args.dir, &args.url) {
        (Some(dir), _) => format!("lock directory {}", dir.display()),
        (None, Some(url)) => redact(url),
        (None, None) => String::new(),
    }
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
    /// The sets the group shares (`--shards`), for the shares.
    total: usize,
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

    /// A member's fair share of the group's sets, as the balanced nodes
    /// compute it from the live slots; `None` for a holder without a slot.
    fn share(&self, m: &HolderMembers) -> Option<usize> {
        (!m.slots.is_empty()).then(|| shardlock::fair_share(self.total, &self.live(), &m.slots))
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
            "total_sets": self.total,
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
                    v["share"] = json!(self.share(m));
                    v
                })
                .collect::<Vec<_>>(),
        })
    }
}

/// Whether a row is a balancing member slot (of this group or another),
/// not a lock set.
fn is_member_slot(r: &Row, group: &Group) -> bool {
    group.slots.contains_key(&r.lock_id)
        || r.name.as_deref().is_some_and(|n| n.starts_with("members:"))
}

/// Per database with a shardlock holder: which member slots are held and
/// by whom, and each holder's other locks; `total` is the number of sets
/// the group shares.
fn members(rows: &[Row], group: &Group, total: usize) -> Vec<DatabaseMembers> {
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
            None if is_member_slot(r, group) => {}
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
                total,
                holders,
            }
        })
        .filter(|db| !db.holders.is_empty())
        .collect()
}

/// The databases where the group has live members: their slots, each
/// member's sets and share.
fn write_members(out: &mut String, members: &[DatabaseMembers], group: &Group) {
    let live: Vec<&DatabaseMembers> = members.iter().filter(|db| !db.live().is_empty()).collect();
    if live.is_empty() {
        let _ = writeln!(
            out,
            "\nbalancing group {}: no live members (no member slot held)",
            group.name
        );
        return;
    }
    for db in live {
        let slots = db.live();
        let _ = writeln!(
            out,
            "\nbalancing group {} in {}: {} live member slot{} ({} of {}), {} sets to share",
            group.name,
            db.database,
            slots.len(),
            if slots.len() == 1 { "" } else { "s" },
            list(&slots),
            group.max_members,
            db.total
        );
        let _ = writeln!(
            out,
            "  {:<32} {:<14} {:>8}  {:<10} {:>6} {:>6}",
            "holder", "client", "pid", "slots", "sets", "share"
        );
        for (h, m) in &db.holders {
            let (slots, share) = match db.share(m) {
                Some(share) => (list(&m.slots), share.to_string()),
                None => ("-".to_string(), "-".to_string()),
            };
            let _ = writeln!(
                out,
                "  {:<32} {:<14} {:>8}  {:<10} {:>6} {:>6}",
                h.holder, h.client, h.pid, slots, m.sets, share
            );
        }
    }
}

/// One node's locks across the databases listed.
struct NodeCount {
    /// The holder as the database names it (`shardlock:<node>`, or the
    /// node id in a lock directory; `?` when the session gave no name).
    holder: String,
    /// Lock sets held (member slots not counted).
    sets: usize,
    /// Member slots held, in any group.
    slots: usize,
    /// Databases where it holds a lock.
    databases: usize,
}

impl NodeCount {
    fn to_json(&self) -> serde_json::Value {
        json!({
            "holder": self.holder,
            "sets": self.sets,
            "member_slots": self.slots,
            "databases": self.databases,
        })
    }
}

/// The locks per node (sessions of one node in several databases counted
/// together, by the holder name), most sets first.
fn node_counts(rows: &[Row], group: &Group) -> Vec<NodeCount> {
    let mut by_holder: BTreeMap<&str, (usize, usize, std::collections::BTreeSet<&str>)> =
        BTreeMap::new();
    for r in rows {
        let holder = if r.holder.is_empty() { "?" } else { &r.holder };
        let entry = by_holder.entry(holder).or_default();
        if is_member_slot(r, group) {
            entry.1 += 1;
        } else {
            entry.0 += 1;
        }
        entry.2.insert(&r.database);
    }
    let mut nodes: Vec<NodeCount> = by_holder
        .into_iter()
        .map(|(holder, (sets, slots, dbs))| NodeCount {
            holder: holder.to_string(),
            sets,
            slots,
            databases: dbs.len(),
        })
        .collect();
    nodes.sort_by(|a, b| b.sets.cmp(&a.sets).then_with(|| a.holder.cmp(&b.holder)));
    nodes
}

fn write_nodes(out: &mut String, nodes: &[NodeCount]) {
    if nodes.is_empty() {
        return;
    }
    let _ = writeln!(
        out,
        "\n  {:<32} {:>6} {:>12} {:>10}",
        "node", "sets", "member slots", "databases"
    );
    for n in nodes {
        let _ = writeln!(
            out,
            "  {:<32} {:>6} {:>12} {:>10}",
            n.holder, n.sets, n.slots, n.databases
        );
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
/// group's member slots: the `--database` sets, and a multi-tenanted
/// node's lock in each of the `--tenants` and `more_tenants` (the key
/// names hold the database id, so each tenant has its own).
fn names(
    args: &StatusArgs,
    group: &Group,
    more_tenants: &[String],
) -> Result<HashMap<i64, String>> {
    let shards = crate::node::shard_names(args.shards.min(100_000));
    let mut sets = SingleTenant::new(
        DatabaseId::new(&args.database),
        &args.schema,
        shards.clone(),
    )
    .sets()?;
    for tenant in args.tenants.iter().chain(more_tenants) {
        let key = LockKey::for_shard(tenant, &args.schema, TENANT_LOCK_SHARD)?;
        sets.push(LockSet::new(key, DatabaseId::new(tenant), Vec::new()));
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

/// Advisory locks held in every database of the URL's server (`pg_locks`
/// is server-wide), or in the `--tenants` databases, from `pg_locks` and
/// `pg_stat_activity`, one round trip. Named from the distributors' names,
/// each database also taken as a tenant (a multi-tenanted node's lock).
async fn postgres_rows(url: &str, args: &StatusArgs, group: &Group) -> Result<Vec<Row>> {
    use shardlock::postgres::sqlx::{self, Connection as _};
    // sqlx's error prints the server's message and gives it again as its
    // source; `PgCause` says it once.
    let mut conn = sqlx::PgConnection::connect(url)
        .await
        .map_err(shardlock::postgres::PgCause::from)
        .with_context(|| format!("connecting to {}", redact(url)))?;
    let rows: Vec<PgLockRow> = sqlx::query_as(
        "SELECT d.datname::text,
                (l.classid::bigint << 32) | l.objid::bigint,
                coalesce(a.application_name, ''),
                host(a.client_addr),
                l.pid,
                extract(epoch FROM a.backend_start)::float8
           FROM pg_locks l
           JOIN pg_database d ON d.oid = l.database
           LEFT JOIN pg_stat_activity a ON a.pid = l.pid
          WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
            AND (cardinality($1::text[]) = 0 OR d.datname = ANY($1::text[]))
          ORDER BY 1, 2",
    )
    .bind(&args.tenants)
    .fetch_all(&mut conn)
    .await
    .map_err(shardlock::postgres::PgCause::from)
    .context("reading pg_locks")?;
    let _ = conn.close().await;
    let mut databases: Vec<String> = rows.iter().map(|r| r.0.clone()).collect();
    databases.dedup();
    let names = names(args, group, &databases)?;
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
/// sessions' watcher labels in the processlist. Named locks are
/// server-wide, so every database's are listed; a lock's database is its
/// session's (a multi-tenanted node connects to each tenant database), and
/// each database the login sees is taken as a tenant for the names.
async fn mysql_rows(url: &str, args: &StatusArgs, group: &Group) -> Result<Vec<Row>> {
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
    let schemas: Vec<String> = if args.tenants.is_empty() {
        sqlx::query_scalar("SELECT SCHEMA_NAME FROM information_schema.SCHEMATA")
            .fetch_all(&mut conn)
            .await
            .map_err(MySqlCause::from)
            .context("reading information_schema.SCHEMATA")?
    } else {
        Vec::new()
    };
    let names = names(args, group, &schemas)?;
    // Lock name -> (key id, key name) for the names the nodes would use.
    let mut known: HashMap<String, (i64, String)> = HashMap::new();
    for (id, name) in &names {
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
    /// The lock's database (`DB_NAME(resource_database_id)`); empty when
    /// unknown (then the connection's).
    pub(crate) database: String,
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
    let db_of = |lock: &TranLock| {
        if lock.database.is_empty() {
            database.to_string()
        } else {
            lock.database.clone()
        }
    };
    let row = |lock: &TranLock, id: i64, name: Option<String>| Row {
        database: db_of(lock),
        lock_id: id,
        name,
        holder: lock.program.clone(),
        client: lock.client.clone(),
        pid: lock.spid.to_string(),
        since: now - std::time::Duration::from_secs(u64::try_from(lock.age_s).unwrap_or(0)),
    };
    // Per database: the same name may be held in two databases.
    let mut by_shown: BTreeMap<(String, &str), Vec<&TranLock>> = BTreeMap::new();
    for lock in &locks {
        by_shown
            .entry((db_of(lock), lock.shown.as_str()))
            .or_default()
            .push(lock);
    }
    let mut rows = Vec::new();
    for ((lock_db, shown), group) in by_shown {
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
                // `held` answers for the connection's database only.
                if sessions.len() == 1 && held.len() == group.len() && lock_db == database {
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
    rows.sort_by(|a, b| (&a.database, a.lock_id, &a.pid).cmp(&(&b.database, b.lock_id, &b.pid)));
    rows
}

/// Application locks of shardlock keys on the SQL Server of the
/// connection string `url`: from `sys.dm_tran_locks` when the login may
/// read it (every database's, each row with its database), else
/// `APPLOCK_TEST(N'public', name, N'Exclusive', N'Session')` over the
/// names in `names` (0: held by another session), in each `--tenants`
/// database or, without `--tenants`, the connection string's (application
/// locks belong to a database: the test runs in it). Answers the rows and
/// which source was used.
async fn mssql_rows(
    url: &str,
    args: &StatusArgs,
    names: &HashMap<i64, String>,
) -> Result<(Vec<Row>, Source)> {
    use shardlock::sqlserver::{DatabaseMapping, MssqlDriver, MssqlOptions};

    let database = args.database.as_str();
    let options = MssqlOptions::parse(url).context("invalid --url")?;
    let mut client = MssqlDriver::new(
        options
            .clone()
            .database_mapping(DatabaseMapping::ConnectionString),
    )
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
                            CAST(DATEDIFF(SECOND, s.login_time, GETDATE()) AS bigint) AS age_s,
                            DB_NAME(l.resource_database_id) AS database_name
                       FROM sys.dm_tran_locks AS l
                       LEFT JOIN sys.dm_exec_sessions AS s ON s.session_id = l.request_session_id
                       LEFT JOIN sys.dm_exec_connections AS c
                         ON c.session_id = l.request_session_id AND c.parent_connection_id IS NULL
                      WHERE l.resource_type = N'APPLICATION' AND l.request_owner_type = N'SESSION'
                        AND l.request_status = N'GRANTED'",
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
                            database: r
                                .try_get::<&str, _>(5)
                                .ok()
                                .flatten()
                                .unwrap_or_default()
                                .to_string(),
                        })
                    })
                    .collect();
                // Shown names several known names share: ask which are held
                // (APPLOCK_TEST answers for this connection's database).
                let here: Vec<TranLock> = locks
                    .iter()
                    .filter(|l| l.database.is_empty() || l.database == db)
                    .cloned()
                    .collect();
                let candidates: Vec<String> = ambiguous(&here, &known)
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
    // The fallback: which of the distributors' names are held, not by whom,
    // in each tenant database (or the connection's).
    let all: Vec<&KnownLock> = known.values().flatten().collect();
    let resources: Vec<String> = all.iter().map(|k| k.resource.clone()).collect();
    let databases: Vec<String> = if args.tenants.is_empty() {
        vec![db.clone()]
    } else {
        args.tenants.clone()
    };
    let mut rows: Vec<Row> = Vec::new();
    let mut client = Some(client);
    for database in &databases {
        let held = if *database == db {
            match client.as_mut() {
                Some(c) => applock_test(c, &resources).await?,
                None => Default::default(),
            }
        } else {
            let mut other = MssqlDriver::new(
                options
                    .clone()
                    .database_mapping(DatabaseMapping::SameServer),
            )
            .connect_client(&DatabaseId::new(database), "shardlock:status")
            .await
            .with_context(|| format!("connecting to SQL Server database {database}"))?;
            let held = applock_test(&mut other, &resources).await?;
            let _ = other.close().await;
            held
        };
        rows.extend(
            all.iter()
                .filter(|k| held.contains(&k.resource))
                .map(|k| Row {
                    database: database.clone(),
                    lock_id: k.id,
                    name: Some(k.name.clone()),
                    holder: "(unknown: APPLOCK_TEST)".to_string(),
                    client: "?".to_string(),
                    pid: "?".to_string(),
                    since: now,
                }),
        );
    }
    if let Some(c) = client.take() {
        let _ = c.close().await;
    }
    rows.sort_by(|a, b| (&a.database, a.lock_id).cmp(&(&b.database, b.lock_id)));
    Ok((
        rows,
        Source::ApplockTest {
            why: why.unwrap_or_default(),
            names: resources.len() * databases.len(),
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

/// The URL or connection string without its password, for messages and
/// the watch header: a URL's `user:password@` and any `password=` / `pwd=`
/// pair (ADO.NET and JDBC strings) are masked.
fn redact(url: &str) -> String {
    let url = match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{user}:***{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_string(),
    };
    url.split(';')
        .map(|pair| match pair.split_once('=') {
            Some((key, _))
                if matches!(key.trim().to_ascii_lowercase().as_str(), "password" | "pwd") =>
            {
                format!("{key}=***")
            }
            _ => pair.to_string(),
        })
        .collect::<Vec<_>>()
        .join(";")
}

fn secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// `2026-05-09 07:29:26 UTC` (no time-zone database needed).
fn utc_time(t: SystemTime) -> String {
    let secs = secs(t);
    let (days, rest) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        rest / 3_600,
        rest % 3_600 / 60,
        rest % 60
    )
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

/// The holder table; `now` is when the holders were read.
fn write_rows(out: &mut String, rows: &[Row], now: SystemTime) {
    if rows.is_empty() {
        let _ = writeln!(out, "no locks held");
        return;
    }
    let _ = writeln!(
        out,
        "{:<12} {:>20}  {:<32} {:<28} {:<10} {:>8} {:>8}",
        "database", "lock id", "name", "holder", "client", "pid", "since"
    );
    for r in rows {
        let held = now
            .duration_since(r.since)
            .map(|d| format!("{}s ago", d.as_secs()))
            .unwrap_or_default();
        let _ = writeln!(
            out,
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
    let _ = writeln!(out, "{} locks held", rows.len());
    if rows.iter().any(|r| r.client != "local") {
        let _ = writeln!(out, "(the server does not record when a lock was taken: `since` is when the holder's session started; blank on MySQL, which does not say)");
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
            database: String::new(),
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

    #[test]
    fn the_same_name_in_two_databases_is_two_rows_each_with_its_database() {
        let name = "main:app:orders:00";
        let names: HashMap<i64, String> =
            [(LockKey::new(name).expect("valid").id(), name.to_string())].into();
        let known = known_by_shown(&names);
        let mut a = lock(51, &shown(name));
        a.database = "app1".to_string();
        let mut b = lock(52, &shown(name));
        b.database = "app2".to_string();
        let c = lock(53, &shown(name)); // database unknown: the connection's
        let rows = name_tran_locks(
            vec![b, a, c],
            &known,
            &HashSet::new(),
            "app0",
            SystemTime::now(),
        );
        let got: Vec<(String, String, Option<String>)> = rows
            .into_iter()
            .map(|r| (r.database, r.pid, r.name))
            .collect();
        assert_eq!(
            got,
            vec![
                ("app0".to_string(), "53".to_string(), Some(name.to_string())),
                ("app1".to_string(), "51".to_string(), Some(name.to_string())),
                ("app2".to_string(), "52".to_string(), Some(name.to_string())),
            ]
        );
    }

    #[test]
    fn passwords_are_masked() {
        assert_eq!(
            redact("postgres://app:secret@db:5432/app"),
            "postgres://app:***@db:5432/app"
        );
        assert_eq!(
            redact("server=tcp:db,1433;User Id=sa;Password=secret;Encrypt=true"),
            "server=tcp:db,1433;User Id=sa;Password=***;Encrypt=true"
        );
        assert_eq!(
            redact("jdbc:sqlserver://db:1433;user=sa;pwd=secret"),
            "jdbc:sqlserver://db:1433;user=sa;pwd=***"
        );
        assert!(!redact("mysql://root:hunter2@db/app").contains("hunter2"));
    }

    #[test]
    fn utc_time_is_the_civil_date() {
        assert_eq!(utc_time(UNIX_EPOCH), "1970-01-01 00:00:00 UTC");
        let t = UNIX_EPOCH + Duration::from_secs(951_827_696); // a leap day
        assert_eq!(utc_time(t), "2000-02-29 12:34:56 UTC");
        let t = UNIX_EPOCH + Duration::from_secs(1_798_761_599);
        assert_eq!(utc_time(t), "2026-12-31 23:59:59 UTC");
    }

    fn row(database: &str, holder: &str, pid: &str, name: &str) -> Row {
        Row {
            database: database.to_string(),
            lock_id: LockKey::new(name).expect("valid").id(),
            name: Some(name.to_string()),
            holder: holder.to_string(),
            client: "local".to_string(),
            pid: pid.to_string(),
            since: UNIX_EPOCH,
        }
    }

    fn test_group(name: &str) -> Group {
        let slots: Vec<String> = (0..4).map(|i| format!("members:{name}:{i}")).collect();
        Group {
            name: name.to_string(),
            max_members: 4,
            slots: slots
                .iter()
                .enumerate()
                .map(|(i, n)| (LockKey::new(n.as_str()).expect("valid").id(), i as u32))
                .collect(),
            names: slots,
        }
    }

    #[test]
    fn nodes_are_counted_across_databases_and_members_get_their_share() {
        let group = test_group("main:app");
        let mut rows = vec![
            // heavy: weight 2 (slots 0 and 2), light: slot 1; 10 sets.
            row("main", "heavy", "1", "members:main:app:0"),
            row("main", "light", "2", "members:main:app:1"),
            row("main", "heavy", "1", "members:main:app:2"),
        ];
        for i in 0..10 {
            let holder = if i < 6 {
                ("heavy", "1")
            } else {
                ("light", "2")
            };
            rows.push(row(
                "main",
                holder.0,
                holder.1,
                &format!("main:app:orders:{i:02}"),
            ));
        }
        // A multi-tenanted node: one lock in each of two tenant databases,
        // another session (pid) in each.
        rows.push(row("t1", "tenants", "7", "t1:app:shardlock-tenant"));
        rows.push(row("t2", "tenants", "8", "t2:app:shardlock-tenant"));
        // Another group's member slot is not a set.
        rows.push(row("t2", "tenants", "8", "members:other:0"));

        let nodes: Vec<(String, usize, usize, usize)> = node_counts(&rows, &group)
            .into_iter()
            .map(|n| (n.holder, n.sets, n.slots, n.databases))
            .collect();
        assert_eq!(
            nodes,
            vec![
                ("heavy".to_string(), 6, 2, 1),
                ("light".to_string(), 4, 1, 1),
                ("tenants".to_string(), 2, 1, 2),
            ]
        );

        let members = members(&rows, &group, 10);
        let dbs: Vec<&str> = members.iter().map(|m| m.database.as_str()).collect();
        assert_eq!(dbs, ["main", "t1", "t2"]);
        let main = &members[0];
        assert_eq!(main.live(), [0, 1, 2]);
        // 10 over 3 slots: 4/3/3 by slot rank; heavy has ranks 0 and 2.
        let shares: Vec<(&str, Option<usize>)> = main
            .holders
            .iter()
            .map(|(h, m)| (h.holder.as_str(), main.share(m)))
            .collect();
        assert_eq!(shares, [("heavy", Some(7)), ("light", Some(3))]);
        assert_eq!(members[1].share(&members[1].holders[0].1), None);

        let mut out = String::new();
        write_members(&mut out, &members, &group);
        assert!(
            out.contains("balancing group main:app in main: 3 live member slots (0,1,2 of 4), 10 sets to share"),
            "{out}"
        );
        assert!(!out.contains(" in t1"), "no members there: {out}");
        let json = members[0].to_json(&group);
        assert_eq!(json["holders"][0]["share"], 7, "{json}");
        assert_eq!(json["holders"][1]["share"], 3, "{json}");
    }
}
