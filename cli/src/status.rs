//! `shardlock status`: who holds which lock.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::json;
use shardlock::{
    DatabaseId, LockKey, LockSet, SingleTenant, SOLO_SENTINEL_SHARD, TENANT_LOCK_SHARD,
};

/// Options of `shardlock status`.
#[derive(Debug, Args)]
pub(crate) struct StatusArgs {
    /// Lock directory of the sqlite driver.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// PostgreSQL server URL: lists the advisory locks of its database.
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
    /// Print JSON (one array of objects) instead of a table.
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
            Some(url) => postgres_rows(url, &names(&args)?).await?,
            None => {
                bail!("say where the locks live: --dir <lock directory> or --url postgres://...")
            }
        },
    };
    print_rows(&rows, args.json);
    Ok(())
}

/// Lock id → name for every lock the nodes' distributors can build.
fn names(args: &StatusArgs) -> Result<HashMap<i64, String>> {
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

pub(crate) fn print_rows(rows: &[Row], as_json: bool) {
    if as_json {
        let items: Vec<_> = rows
            .iter()
            .map(|r| {
                json!({
                    "database": r.database,
                    "lock_id": r.lock_id,
                    "name": r.name,
                    "holder": r.holder,
                    "client": r.client,
                    "pid": r.pid,
                    "since_unix": secs(r.since),
                })
            })
            .collect();
        println!("{}", serde_json::Value::Array(items));
        return;
    }
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
