//! The latency harness: every measure of `BENCHMARKS.md`, each taken side by
//! side with a raw baseline in the same run, rounds of shardlock and raw
//! interleaved so that the noise of a shared machine hits both alike.
//!
//! ```text
//! shardlock-bench [--quick] [--out FILE] [--only 1,2,...]
//! ```
//!
//! Writes the results table (Markdown) to `--out` (default
//! `target/bench/harness.md`) and progress to stderr. PostgreSQL rows need
//! `SHARDLOCK_PG_URL`, MySQL/MariaDB rows (measures 1-4) need
//! `SHARDLOCK_MYSQL_URL` (`scripts/bench.sh` starts a container of each and
//! sets them); without one its rows say "not measured" and why. The crash
//! measure needs the holder examples `shardlock-sqlite-holder`,
//! `shardlock-pg-holder` and `shardlock-mysql-holder` in `examples/` next
//! to this binary (`cargo build --release -p shardlock-sqlite -p
//! shardlock-postgres -p shardlock-mysql --examples`).
//!
//! Hidden sub-commands used as child processes by the crash measure:
//! `raw-pg-holder <key-id>`, `raw-mysql-holder <name>` and
//! `raw-sqlite-holder <file>`; `m11-sets-node <tenants> <sets> <window ms>
//! <poll ms>` runs measure 11's node (d) in a process of its own; and
//! `criterion-summary <target/criterion>` prints criterion's medians as a
//! Markdown table; `median-of <out.md> <run.md>...` merges several runs'
//! tables into one of medians (see `runs.rs`).

mod coordinated;
mod crash;
mod criterion_summary;
mod handoff;
mod holders;
mod loss;
mod metrics_cost;
mod micro;
mod peers;
mod rebalance;
mod runs;
mod tenants;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use shardlock_benches::{MySqlEnv, PgEnv, Report, ServerStatements, StatementCounter};

/// The database the measures lock in.
pub(crate) const BENCH_DB: &str = "shardlock_bench";
/// A second database for raw baselines that run while a coordinator is
/// being counted in [`BENCH_DB`].
pub(crate) const RAW_DB: &str = "shardlock_bench_raw";

/// Why there is no server, when `scripts/bench.sh` could not start one.
const SKIP_ENV: &str = "SHARDLOCK_BENCH_PG_SKIP";
/// Why there is no MySQL/MariaDB server, when `scripts/bench.sh` could not
/// start one.
const MYSQL_SKIP_ENV: &str = "SHARDLOCK_BENCH_MYSQL_SKIP";

/// Run-wide settings.
pub(crate) struct Config {
    pub(crate) quick: bool,
    only: Option<Vec<u32>>,
}

impl Config {
    /// `quick` in a `--quick` run, else `full`.
    pub(crate) fn pick<T>(&self, quick: T, full: T) -> T {
        if self.quick {
            quick
        } else {
            full
        }
    }

    fn wants(&self, measure: u32) -> bool {
        self.only.as_ref().is_none_or(|m| m.contains(&measure))
    }
}

/// What every measure gets.
pub(crate) struct Ctx {
    pub(crate) config: Config,
    /// The server, or why there is none.
    pub(crate) pg: Result<PgEnv, String>,
    /// The statement counter, or why there is none.
    pub(crate) counter: Result<StatementCounter, String>,
    /// The MySQL/MariaDB server, or why there is none.
    pub(crate) mysql: Result<MySqlEnv, String>,
    /// Its statement counter (global status), or why there is none.
    pub(crate) mysql_counter: Result<ServerStatements, String>,
    /// A fresh lock directory root for the SQLite driver.
    pub(crate) sqlite_root: PathBuf,
    pub(crate) report: Report,
}

impl Ctx {
    /// The server and the counter, or why the Postgres rows are not measured.
    pub(crate) fn pg(&mut self) -> Result<&mut PgEnv, String> {
        self.pg.as_mut().map_err(|why| why.clone())
    }

    /// The MySQL/MariaDB server, or why its rows are not measured.
    pub(crate) fn mysql(&mut self) -> Result<&mut MySqlEnv, String> {
        self.mysql.as_mut().map_err(|why| why.clone())
    }

    /// A fresh lock directory for one measure.
    pub(crate) fn sqlite_dir(&self, name: &str) -> PathBuf {
        self.sqlite_root.join(name)
    }
}

/// An error and its sources, one line.
pub(crate) fn err(e: impl std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// `open files: N of the soft limit M`, for errors that may be `EMFILE`.
pub(crate) fn open_files() -> String {
    let open = std::fs::read_dir("/proc/self/fd").map(|d| d.count()).ok();
    let limit = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3).map(str::to_string))
        });
    match (open, limit) {
        (Some(open), Some(limit)) => format!("{open} files open, soft limit {limit}"),
        _ => "open files unknown".to_string(),
    }
}

pub(crate) fn progress(message: impl AsRef<str>) {
    eprintln!("[shardlock-bench] {}", message.as_ref());
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("raw-pg-holder") => return holders::raw_pg_holder(&args[1..]),
        Some("raw-sqlite-holder") => return holders::raw_sqlite_holder(&args[1..]),
        Some("raw-mysql-holder") => return holders::raw_mysql_holder(&args[1..]),
        Some(tenants::SETS_NODE) => return tenants::sets_node(&args[1..]),
        Some("median-of") => return runs::median_of(&args[1..]),
        Some("criterion-summary") => {
            let dir = args.get(1).context("usage: criterion-summary <dir>")?;
            print!("{}", criterion_summary::summary(std::path::Path::new(dir))?);
            return Ok(());
        }
        _ => {}
    }
    let mut quick = false;
    let mut out = PathBuf::from("target/bench/harness.md");
    let mut only = None;
    let mut it = args.into_iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--quick" => quick = true,
            "--out" => out = it.next().context("--out needs a file")?.into(),
            "--only" => {
                let list = it.next().context("--only needs a list such as 1,3")?;
                let measures = list
                    .split(',')
                    .map(|m| m.trim().parse::<u32>())
                    .collect::<Result<Vec<_>, _>>()
                    .context("--only takes measure numbers 1-11")?;
                only = Some(measures);
            }
            "-h" | "--help" => {
                println!("shardlock-bench [--quick] [--out FILE] [--only 1,2,...]");
                return Ok(());
            }
            other => bail!("unknown argument {other:?} (try --help)"),
        }
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start a Tokio runtime")?;
    let (preamble, report) = runtime.block_on(run(Config { quick, only }))?;
    if let Some(parent) = out.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    std::fs::write(&out, format!("{preamble}\n{}", report.to_markdown()))
        .with_context(|| format!("writing {}", out.display()))?;
    progress(format!("wrote {}", out.display()));
    Ok(())
}

async fn run(config: Config) -> Result<(String, Report)> {
    let pg = match PgEnv::from_env(Duration::from_secs(60)).await {
        Ok(Some(env)) => Ok(env),
        Ok(None) => Err(std::env::var(SKIP_ENV)
            .ok()
            .filter(|why| !why.trim().is_empty())
            .unwrap_or_else(|| {
                format!(
                    "no server: set {} (scripts/bench.sh starts one with Docker)",
                    shardlock_benches::URL_ENV
                )
            })),
        Err(why) => Err(why),
    };
    let mysql = match MySqlEnv::from_env(Duration::from_secs(90)).await {
        Ok(Some(env)) => Ok(env),
        Ok(None) => Err(std::env::var(MYSQL_SKIP_ENV)
            .ok()
            .filter(|why| !why.trim().is_empty())
            .unwrap_or_else(|| {
                format!(
                    "no server: set {} (scripts/bench.sh starts one with Docker)",
                    shardlock_benches::MYSQL_URL_ENV
                )
            })),
        Err(why) => Err(why),
    };
    let mysql_counter = match &mysql {
        Ok(env) => env.statement_counter().await,
        Err(why) => Err(why.clone()),
    };
    let mut ctx = Ctx {
        config,
        pg,
        counter: Err(String::new()),
        mysql,
        mysql_counter,
        sqlite_root: std::env::temp_dir().join(format!("shardlock-bench-{}", std::process::id())),
        report: Report::default(),
    };
    ctx.counter = match ctx.pg.as_mut() {
        Ok(env) => {
            for db in [BENCH_DB, RAW_DB] {
                env.ensure_database(db)
                    .await
                    .with_context(|| format!("creating database {db}"))?;
            }
            env.statement_counter().await
        }
        Err(why) => Err(why.clone()),
    };
    let server = match ctx.pg.as_mut() {
        Ok(env) => {
            let version: String = shardlock_postgres::sqlx::query_scalar("select version()")
                .fetch_one(env.admin())
                .await
                .context("select version()")?;
            format!("PostgreSQL: {version}")
        }
        Err(why) => format!("PostgreSQL: not measured: {why}"),
    };
    let mysql_server = match &ctx.mysql {
        Ok(env) => format!(
            "MySQL/MariaDB: {}; statement counts: {}.",
            env.version(),
            match &ctx.mysql_counter {
                Ok(_) => "the server's global `Com_select` and `Questions`, read from a \
                          separate connection (nothing else uses the server)"
                    .to_string(),
                Err(why) => format!("not available ({why})"),
            }
        ),
        Err(why) => format!("MySQL/MariaDB: not measured: {why}."),
    };
    let preamble = format!(
        "{server}; statement counts: {}.\n\n{mysql_server}\n",
        match &ctx.counter {
            Ok(_) => "pg_stat_statements".to_string(),
            Err(why) => format!("not available ({why})"),
        }
    );
    match (&ctx.pg, &ctx.counter) {
        (Ok(_), Ok(_)) => progress("postgres: server and pg_stat_statements ready"),
        (Ok(_), Err(why)) => progress(format!("postgres: no statement counts: {why}")),
        (Err(why), _) => progress(format!("postgres rows not measured: {why}")),
    }
    match (&ctx.mysql, &ctx.mysql_counter) {
        (Ok(env), Ok(_)) => progress(format!("mysql: {} ready", env.version())),
        (Ok(_), Err(why)) => progress(format!("mysql: no statement counts: {why}")),
        (Err(why), _) => progress(format!("mysql rows not measured: {why}")),
    }

    if ctx.config.wants(1) {
        micro::single_key(&mut ctx).await;
    }
    if ctx.config.wants(2) {
        micro::batches(&mut ctx).await;
    }
    if ctx.config.wants(3) {
        handoff::run(&mut ctx).await;
    }
    if ctx.config.wants(4) {
        crash::run(&mut ctx).await;
    }
    let (m5, m6) = (ctx.config.wants(5), ctx.config.wants(6));
    if m5 || m6 {
        coordinated::run(&mut ctx, m5, m6).await;
    }
    if ctx.config.wants(7) {
        loss::run(&mut ctx).await;
    }
    if ctx.config.wants(8) {
        rebalance::run(&mut ctx).await;
    }
    if ctx.config.wants(9) {
        peers::run(&mut ctx).await;
    }
    if ctx.config.wants(11) {
        tenants::run(&mut ctx).await;
    }
    // Last: it installs a process-wide metrics recorder.
    if ctx.config.wants(10) {
        metrics_cost::run(&mut ctx).await;
    }
    let _ = std::fs::remove_dir_all(&ctx.sqlite_root);
    Ok((preamble, ctx.report))
}
