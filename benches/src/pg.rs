//! The PostgreSQL bench environment: which server, the bench databases,
//! server-side statement counts and connection counts.

use std::str::FromStr;
use std::time::{Duration, Instant};

use shardlock_postgres::sqlx::postgres::{PgConnectOptions, PgConnection};
use shardlock_postgres::sqlx::{self, Connection};
use shardlock_postgres::{DatabaseMapping, PgDriver, PgOptions};

/// Environment variable naming the server (`postgres://user:pw@host:port/db`);
/// `scripts/bench.sh` sets it to the container it starts.
pub const URL_ENV: &str = "SHARDLOCK_PG_URL";

/// A PostgreSQL server to benchmark against, and an admin connection to the
/// URL's own database for setup and side checks (never used by a measured
/// operation).
#[derive(Debug)]
pub struct PgEnv {
    base: PgConnectOptions,
    admin: PgConnection,
}

impl PgEnv {
    /// The server named by [`URL_ENV`]: `Ok(None)` when it is not set,
    /// `Err` with the reason when it is set but unusable. Waits up to
    /// `ready_within` for the server to accept a query.
    ///
    /// # Errors
    ///
    /// A malformed URL or a server that does not answer in time.
    pub async fn from_env(ready_within: Duration) -> Result<Option<Self>, String> {
        let url = match std::env::var(URL_ENV) {
            Ok(url) if !url.trim().is_empty() => url,
            _ => return Ok(None),
        };
        let base = PgConnectOptions::from_str(&url)
            .map_err(|e| format!("{URL_ENV} is not a usable URL: {e}"))?;
        let started = Instant::now();
        loop {
            let attempt = async {
                let mut conn = PgConnection::connect_with(&base).await?;
                sqlx::query_scalar::<_, i32>("select 1")
                    .fetch_one(&mut conn)
                    .await?;
                Ok::<_, sqlx::Error>(conn)
            };
            match tokio::time::timeout(Duration::from_secs(5), attempt).await {
                Ok(Ok(admin)) => return Ok(Some(Self { base, admin })),
                Ok(Err(e)) if started.elapsed() > ready_within => {
                    return Err(format!("server at {URL_ENV} does not answer: {e}"))
                }
                Err(_) if started.elapsed() > ready_within => {
                    return Err(format!("server at {URL_ENV} does not answer in time"))
                }
                _ => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }

    /// Connect options for database `name` on the same server.
    pub fn options_for(&self, name: &str) -> PgConnectOptions {
        self.base.clone().database(name)
    }

    /// A URL for database `name` on the same server, for child processes
    /// (`postgres://user:password@host:port/name`).
    pub fn url_for(&self, name: &str) -> String {
        let user = self.base.get_username();
        let host = self.base.get_host();
        let port = self.base.get_port();
        match std::env::var(URL_ENV).ok().and_then(|u| password_of(&u)) {
            Some(password) => format!("postgres://{user}:{password}@{host}:{port}/{name}"),
            None => format!("postgres://{user}@{host}:{port}/{name}"),
        }
    }

    /// A driver whose database ids are database names on this server.
    pub fn driver(&self) -> PgDriver {
        self.driver_with(|options| options)
    }

    /// [`driver`](Self::driver) with options changed by `change`.
    pub fn driver_with(&self, change: impl FnOnce(PgOptions) -> PgOptions) -> PgDriver {
        PgDriver::new(change(
            PgOptions::from_connect_options(self.base.clone())
                .database_mapping(DatabaseMapping::SameServer),
        ))
    }

    /// The admin connection (the URL's database).
    pub fn admin(&mut self) -> &mut PgConnection {
        &mut self.admin
    }

    /// Creates database `name` unless it exists.
    ///
    /// # Errors
    ///
    /// sqlx's error.
    pub async fn ensure_database(&mut self, name: &str) -> sqlx::Result<()> {
        let exists: bool =
            sqlx::query_scalar("select exists(select 1 from pg_database where datname = $1)")
                .bind(name)
                .fetch_one(&mut self.admin)
                .await?;
        if !exists {
            let quoted = name.replace('"', "\"\"");
            sqlx::raw_sql(&format!("create database \"{quoted}\""))
                .execute(&mut self.admin)
                .await?;
        }
        Ok(())
    }

    /// Rows of `pg_stat_activity` whose `application_name` is exactly
    /// `application_name`: the connections a node holds open.
    ///
    /// # Errors
    ///
    /// sqlx's error.
    pub async fn connections(&mut self, application_name: &str) -> sqlx::Result<i64> {
        sqlx::query_scalar("select count(*) from pg_stat_activity where application_name = $1")
            .bind(application_name)
            .fetch_one(&mut self.admin)
            .await
    }

    /// Connections of node `node` (as `shardlock:<node>` names it): the
    /// sessions (`application_name` exactly `shardlock:<node>`) and any
    /// other connection of the node (`shardlock:<node>:…`, e.g. a side
    /// connection cancelling a wait), as `(sessions, others)`.
    ///
    /// # Errors
    ///
    /// sqlx's error.
    pub async fn node_connections(&mut self, node: &str) -> sqlx::Result<(i64, i64)> {
        let name = format!("shardlock:{node}");
        sqlx::query_as(
            "select count(*) filter (where application_name = $1), \
                    count(*) filter (where left(application_name, length($1) + 1) = $1 || ':') \
             from pg_stat_activity",
        )
        .bind(name)
        .fetch_one(&mut self.admin)
        .await
    }

    /// The backend pids whose `application_name` is exactly
    /// `application_name`.
    ///
    /// # Errors
    ///
    /// sqlx's error.
    pub async fn backend_pids(&mut self, application_name: &str) -> sqlx::Result<Vec<i32>> {
        sqlx::query_scalar("select pid from pg_stat_activity where application_name = $1")
            .bind(application_name)
            .fetch_all(&mut self.admin)
            .await
    }

    /// `pg_terminate_backend(pid)` from the admin connection: ends that
    /// session as an operator would; answers whether it was running.
    ///
    /// # Errors
    ///
    /// sqlx's error.
    pub async fn terminate(&mut self, pid: i32) -> sqlx::Result<bool> {
        sqlx::query_scalar("select pg_terminate_backend($1)")
            .bind(pid)
            .fetch_one(&mut self.admin)
            .await
    }

    /// The server's `max_connections`.
    ///
    /// # Errors
    ///
    /// sqlx's error, or an unparsable setting.
    pub async fn max_connections(&mut self) -> Result<i64, String> {
        let text: String = sqlx::query_scalar("select current_setting('max_connections')")
            .fetch_one(&mut self.admin)
            .await
            .map_err(|e| e.to_string())?;
        text.trim()
            .parse()
            .map_err(|e| format!("max_connections {text:?}: {e}"))
    }

    /// Whether backend `pid` waits for an advisory lock (it is blocked in
    /// `pg_advisory_lock`).
    ///
    /// # Errors
    ///
    /// sqlx's error.
    pub async fn waits_for_advisory_lock(&mut self, pid: i32) -> sqlx::Result<bool> {
        sqlx::query_scalar(
            "select exists(select 1 from pg_locks \
             where locktype = 'advisory' and pid = $1 and not granted)",
        )
        .bind(pid)
        .fetch_one(&mut self.admin)
        .await
    }

    /// Polls until backend `pid` waits for an advisory lock, up to `limit`.
    ///
    /// # Errors
    ///
    /// sqlx's error, or a message when it never waits.
    pub async fn until_waiting(&mut self, pid: i32, limit: Duration) -> Result<(), String> {
        let started = Instant::now();
        loop {
            if self
                .waits_for_advisory_lock(pid)
                .await
                .map_err(|e| e.to_string())?
            {
                return Ok(());
            }
            if started.elapsed() > limit {
                return Err(format!("backend {pid} never waited for the lock"));
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// A server-side statement counter (`pg_stat_statements`).
    ///
    /// # Errors
    ///
    /// Why it cannot be had, e.g. the library is not in
    /// `shared_preload_libraries`.
    pub async fn statement_counter(&mut self) -> Result<StatementCounter, String> {
        sqlx::raw_sql("create extension if not exists pg_stat_statements")
            .execute(&mut self.admin)
            .await
            .map_err(|e| format!("create extension pg_stat_statements: {e}"))?;
        let mut counter = StatementCounter {
            conn: PgConnection::connect_with(&self.base)
                .await
                .map_err(|e| format!("side connection: {e}"))?,
        };
        counter.reset().await.map_err(|e| {
            format!(
                "pg_stat_statements is not usable ({e}); start the server with \
                 -c shared_preload_libraries=pg_stat_statements"
            )
        })?;
        Ok(counter)
    }
}

/// The password of a `postgres://` URL, still percent-encoded as written.
fn password_of(url: &str) -> Option<String> {
    let rest = url.split_once("://")?.1;
    let userinfo = rest.split_once('@')?.0;
    let (_, password) = userinfo.split_once(':')?;
    Some(password.to_string())
}

/// Counts the statements the server executed, per database, from
/// `pg_stat_statements`; its own queries run in another database (the
/// URL's), so they never count.
#[derive(Debug)]
pub struct StatementCounter {
    conn: PgConnection,
}

/// One statement text and how often the server executed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatementCalls {
    /// The normalised statement text (`$1` for constants).
    pub query: String,
    /// Executions since the last reset.
    pub calls: i64,
}

impl StatementCounter {
    /// `pg_stat_statements_reset()`: every count back to zero.
    ///
    /// # Errors
    ///
    /// sqlx's error.
    pub async fn reset(&mut self) -> sqlx::Result<()> {
        sqlx::raw_sql("select pg_stat_statements_reset()")
            .execute(&mut self.conn)
            .await
            .map(drop)
    }

    /// The statements executed in `database` since the last reset, most
    /// frequent first.
    ///
    /// # Errors
    ///
    /// sqlx's error.
    pub async fn calls(&mut self, database: &str) -> sqlx::Result<Vec<StatementCalls>> {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "select s.query, s.calls from pg_stat_statements s \
             join pg_database d on d.oid = s.dbid \
             where d.datname = $1 and s.calls > 0 order by s.calls desc, s.query",
        )
        .bind(database)
        .fetch_all(&mut self.conn)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(query, calls)| StatementCalls { query, calls })
            .collect())
    }

    /// Total executions in `database` since the last reset.
    ///
    /// # Errors
    ///
    /// sqlx's error.
    pub async fn total(&mut self, database: &str) -> sqlx::Result<i64> {
        Ok(self.calls(database).await?.iter().map(|s| s.calls).sum())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_taken_from_urls() {
        assert_eq!(
            password_of("postgres://u:p%40ss@h:1/db").as_deref(),
            Some("p%40ss")
        );
        assert_eq!(password_of("postgres://u@h/db"), None);
        assert_eq!(password_of("postgres://h/db"), None);
    }
}
