//! Child processes for the crash measure: the drivers' holder binaries and
//! this binary's raw holders.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};

use anyhow::{bail, Context as _, Result};
use shardlock_benches::{RawMySql, RawPg, RawSqlite, MYSQL_URL_ENV, URL_ENV};
use shardlock_postgres::sqlx::postgres::PgConnectOptions;

/// A child process that holds a key until it is killed.
pub(crate) struct HolderProcess {
    child: Child,
    /// Kept open: the Postgres holder releases and exits at end of input.
    _stdin: Option<ChildStdin>,
}

impl HolderProcess {
    /// Starts `command` and waits (on a blocking thread) for its first line
    /// to start with `ready`.
    pub(crate) async fn start(mut command: Command, ready: &'static str) -> Result<Self, String> {
        command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = command
            .spawn()
            .map_err(|e| format!("cannot start {command:?}: {e}"))?;
        let stdin = child.stdin.take();
        let Some(stdout) = child.stdout.take() else {
            let _ = child.kill();
            let _ = child.wait();
            return Err("no stdout pipe".into());
        };
        let line = tokio::task::spawn_blocking(move || {
            let mut line = String::new();
            BufReader::new(stdout).read_line(&mut line).map(|_| line)
        })
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r.map_err(|e| e.to_string()));
        match line {
            Ok(line) if line.starts_with(ready) => Ok(Self {
                child,
                _stdin: stdin,
            }),
            other => {
                let _ = child.kill();
                let status = child.wait();
                Err(format!(
                    "holder did not get ready: {other:?}, exit {status:?}"
                ))
            }
        }
    }

    /// SIGKILL (std's `kill` on Unix): no clean-up in the child.
    pub(crate) fn kill(&mut self) -> Result<(), String> {
        self.child.kill().map_err(|e| e.to_string())
    }

    /// Reaps the killed child.
    pub(crate) fn reap(mut self) {
        let _ = self.child.wait();
    }
}

/// A binary next to this one in the target directory.
pub(crate) fn sibling(name: &str, package: &str) -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let dir = exe.parent().ok_or("no target directory")?;
    // The drivers' holders are examples (test-only targets).
    let path = dir.join("examples").join(name);
    if path.is_file() {
        Ok(path)
    } else {
        Err(format!(
            "{name} not found in examples/ next to {} (cargo build --release -p {package} --examples)",
            exe.display()
        ))
    }
}

/// `raw-pg-holder <key-id>`: takes the key over a plain sqlx connection to
/// `SHARDLOCK_PG_URL`, prints `READY`, and holds it until killed.
pub(crate) fn raw_pg_holder(args: &[String]) -> Result<()> {
    let key: i64 = args
        .first()
        .context("usage: raw-pg-holder <key-id>")?
        .parse()
        .context("the key id is a 64-bit integer")?;
    let url = std::env::var(URL_ENV).with_context(|| format!("set {URL_ENV}"))?;
    let options: PgConnectOptions = url.parse().context("bad URL")?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let mut raw = RawPg::connect(&options).await?;
        if !raw.try_lock(key).await? {
            bail!("key {key} is held elsewhere");
        }
        let mut out = std::io::stdout().lock();
        writeln!(out, "READY")?;
        out.flush()?;
        drop(out);
        std::future::pending::<()>().await;
        drop(raw);
        Ok(())
    })
}

/// `raw-mysql-holder <name>`: `GET_LOCK(name, 0)` over a plain sqlx
/// connection to `SHARDLOCK_MYSQL_URL`, prints `READY`, and holds it until
/// killed.
pub(crate) fn raw_mysql_holder(args: &[String]) -> Result<()> {
    let name = args.first().context("usage: raw-mysql-holder <name>")?;
    let url = std::env::var(MYSQL_URL_ENV).with_context(|| format!("set {MYSQL_URL_ENV}"))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let mut raw = RawMySql::connect_url(&url)
            .await
            .map_err(|e| anyhow::anyhow!(e))?;
        if !raw.try_lock(name).await? {
            bail!("lock {name} is held elsewhere");
        }
        let mut out = std::io::stdout().lock();
        writeln!(out, "READY")?;
        out.flush()?;
        drop(out);
        std::future::pending::<()>().await;
        drop(raw);
        Ok(())
    })
}

/// `raw-sqlite-holder <file>`: `BEGIN IMMEDIATE` on the file, prints
/// `READY`, and holds it until killed.
pub(crate) fn raw_sqlite_holder(args: &[String]) -> Result<()> {
    let path = args.first().context("usage: raw-sqlite-holder <file>")?;
    let held = RawSqlite::try_lock(std::path::Path::new(path))?;
    if held.is_none() {
        bail!("{path} is locked elsewhere");
    }
    let mut out = std::io::stdout().lock();
    writeln!(out, "READY")?;
    out.flush()?;
    drop(out);
    loop {
        std::thread::park();
    }
}
