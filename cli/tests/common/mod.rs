//! What the CLI's integration tests share: running the `shardlock` binary,
//! node processes, temporary lock directories, and the real servers
//! (PostgreSQL, MySQL/MariaDB): `SHARDLOCK_PG_URL` / `SHARDLOCK_MYSQL_URL`,
//! else a throw-away container of `SHARDLOCK_PG_IMAGE` /
//! `SHARDLOCK_MYSQL_IMAGE` (default the local images built by
//! `scripts/build-images.sh`), else a loud SKIPPED line (a failure when
//! `SHARDLOCK_REQUIRE` names the database, as in CI).

#![allow(dead_code, unreachable_pub)]

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub fn shardlock(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_shardlock"))
        .args(args)
        .output()
        .expect("run shardlock")
}

/// A `shardlock node` process: stopped gracefully by [`Node::stop`], killed
/// if the test fails first.
pub struct Node(pub Child);

impl Node {
    pub fn start(args: &[&str]) -> Self {
        let child = Command::new(env!("CARGO_BIN_EXE_shardlock"))
            .arg("node")
            .args(args)
            .args(["--poll-ms", "200", "--stop-on-stdin-eof"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start node");
        Self(child)
    }

    /// Closes its stdin (a graceful stop) and checks it exits 0.
    pub fn stop(mut self) {
        drop(self.0.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.0.try_wait().expect("node wait") {
                assert!(status.success(), "graceful stop exits 0: {status}");
                return;
            }
            assert!(Instant::now() < deadline, "node did not stop within 20 s");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// A fresh lock directory, removed at the end.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("shardlock-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        Self(dir)
    }

    pub fn path(&self) -> &str {
        self.0.to_str().expect("utf-8 temp path")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Asks `check` every 200 ms until it answers `Some`; fails with `what`
/// and the last value seen after `limit` (a hang guard, not a timing
/// claim).
pub fn wait_for<T>(
    limit: Duration,
    what: &str,
    mut check: impl FnMut() -> (Option<T>, String),
) -> T {
    let deadline = Instant::now() + limit;
    loop {
        let (found, seen) = check();
        if let Some(found) = found {
            return found;
        }
        assert!(Instant::now() < deadline, "{what}; last seen:\n{seen}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

// ------------------------------------------------------ Postgres and MySQL

/// Which real server a test runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Postgres,
    Mysql,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Self::Postgres => "postgres",
            Self::Mysql => "mysql",
        }
    }

    pub fn url_env(self) -> &'static str {
        match self {
            Self::Postgres => "SHARDLOCK_PG_URL",
            Self::Mysql => "SHARDLOCK_MYSQL_URL",
        }
    }
}

pub struct Server {
    pub kind: Kind,
    pub url: String,
    pub container: Option<String>,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(id) = &self.container {
            let _ = Command::new("docker")
                .args(["rm", "-f", id])
                .stdout(Stdio::null())
                .status();
        }
    }
}

pub fn skip(kind: Kind, why: &str) -> Option<Server> {
    let name = kind.name();
    eprintln!(
        "SKIPPED: {name} (cli): {why}, set {} to run",
        kind.url_env()
    );
    if std::env::var("SHARDLOCK_REQUIRE").is_ok_and(|v| v.contains(name)) {
        panic!("{name} is required (SHARDLOCK_REQUIRE) but skipped: {why}");
    }
    None
}

pub fn docker(args: &[&str]) -> Result<String, String> {
    let out = Command::new("docker")
        .args(args)
        .output()
        .map_err(|e| format!("docker: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

/// The test server: the URL in `SHARDLOCK_PG_URL` / `SHARDLOCK_MYSQL_URL`,
/// else a throw-away container of the local image, ready once a query
/// answers.
pub fn server(kind: Kind) -> Option<Server> {
    if let Ok(url) = std::env::var(kind.url_env()) {
        if !url.trim().is_empty() {
            return Some(Server {
                kind,
                url,
                container: None,
            });
        }
    }
    let (image_env, default_image, port, env) = match kind {
        Kind::Postgres => (
            "SHARDLOCK_PG_IMAGE",
            "shardlock-test/postgres:15",
            "5432",
            "POSTGRES_PASSWORD=postgres",
        ),
        Kind::Mysql => (
            "SHARDLOCK_MYSQL_IMAGE",
            "shardlock-test/mariadb:10.11",
            "3306",
            "MARIADB_ALLOW_EMPTY_ROOT_PASSWORD=1",
        ),
    };
    let image = std::env::var(image_env).unwrap_or_else(|_| default_image.into());
    if let Err(e) = docker(&["image", "inspect", &image]) {
        return skip(kind, &format!("no Docker or no image {image} ({e})"));
    }
    let label = format!("shardlock.test={}-cli", kind.name());
    let publish = format!("127.0.0.1::{port}");
    let id = match docker(&[
        "run", "-d", "--label", &label, "-p", &publish, "-e", env, &image,
    ]) {
        Ok(id) => id,
        Err(e) => return skip(kind, &format!("cannot start {image}: {e}")),
    };
    let mut server = Server {
        kind,
        url: String::new(),
        container: Some(id.clone()),
    };
    let mapped = docker(&["port", &id, &format!("{port}/tcp")]).expect("mapped port");
    let mapped = mapped
        .lines()
        .next()
        .and_then(|l| l.rsplit(':').next())
        .expect("port")
        .to_string();
    server.url = match kind {
        Kind::Postgres => format!("postgres://postgres:postgres@127.0.0.1:{mapped}/postgres"),
        Kind::Mysql => format!("mysql://root@127.0.0.1:{mapped}/mysql"),
    };
    // Ready when a query answers (the images' entrypoints run a temporary
    // server first, so an early answer is retried until it stays up).
    wait_for(
        Duration::from_secs(120),
        &format!("{} container did not become ready", kind.name()),
        || match sql(kind, &server.url, &["SELECT 1".to_string()]) {
            Ok(()) => {
                std::thread::sleep(Duration::from_millis(500));
                let again = sql(kind, &server.url, &["SELECT 1".to_string()]);
                (again.ok(), "second query failed".to_string())
            }
            Err(e) => (None, e),
        },
    );
    Some(server)
}

/// Runs SQL statements (one each) on the server, outside a transaction
/// (`CREATE DATABASE` refuses one).
pub fn sql(kind: Kind, url: &str, statements: &[String]) -> Result<(), String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    runtime.block_on(async {
        match kind {
            Kind::Postgres => {
                use shardlock::postgres::sqlx::{self, Connection as _};
                let mut conn = sqlx::PgConnection::connect(url)
                    .await
                    .map_err(|e| e.to_string())?;
                for statement in statements {
                    sqlx::raw_sql(statement)
                        .execute(&mut conn)
                        .await
                        .map_err(|e| format!("{statement}: {e}"))?;
                }
                let _ = conn.close().await;
            }
            Kind::Mysql => {
                use shardlock::mysql::sqlx::{self, Connection as _};
                let mut conn = sqlx::MySqlConnection::connect(url)
                    .await
                    .map_err(|e| e.to_string())?;
                for statement in statements {
                    sqlx::raw_sql(statement)
                        .execute(&mut conn)
                        .await
                        .map_err(|e| format!("{statement}: {e}"))?;
                }
                let _ = conn.close().await;
            }
        }
        Ok(())
    })
}
