//! `shardlock status`: who holds which lock.

use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::json;

/// Options of `shardlock status`.
#[derive(Debug, Args)]
pub(crate) struct StatusArgs {
    /// Lock directory of the sqlite driver.
    #[arg(long)]
    dir: Option<PathBuf>,
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
        None => bail!("say where the locks live: --dir <lock directory>"),
    };
    print_rows(&rows, args.json);
    Ok(())
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
        "database", "lock id", "name", "holder", "client", "pid", "held"
    );
    for r in rows {
        let held = now
            .duration_since(r.since)
            .map(|d| format!("{}s", d.as_secs()))
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
}
