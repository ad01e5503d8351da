//! The MySQL/MariaDB bench environment: which server, whether a connection
//! waits in `GET_LOCK` (the processlist), server-side statement counts, and
//! the raw `GET_LOCK` baseline.
//!
//! Statement counts are the server's global status counters (`Com_select`,
//! `Questions`) read from a separate connection before and after: exact on
//! a server nobody else uses, which is what `scripts/bench.sh` starts. (A
//! per-connection counter needs `performance_schema`, off by default in
//! MariaDB.)

use std::time::{Duration, Instant};

use shardlock_mysql::sqlx::mysql::MySqlConnection;
use shardlock_mysql::sqlx::{self, Connection, Executor, Row};
use shardlock_mysql::{MySqlDriver, MySqlOptions};

/// Environment variable naming the server
/// (`mysql://user:pw@host:port/db`); `scripts/bench.sh` sets it to the
/// container it starts.
pub const MYSQL_URL_ENV: &str = "SHARDLOCK_MYSQL_URL";

/// A MySQL or MariaDB server to benchmark against, and an admin connection
/// for side checks (never used by a measured operation).
#[derive(Debug)]
pub struct MySqlEnv {
    url: String,
    options: MySqlOptions,
    admin: MySqlConnection,
    version: String,
}

impl MySqlEnv {
    /// The server named by [`MYSQL_URL_ENV`]: `Ok(None)` when it is not
    /// set, `Err` with the reason when it is set but unusable. Waits up to
    /// `ready_within` for the server to accept a query.
    ///
    /// # Errors
    ///
    /// A malformed URL or a server that does not answer in time.
    pub async fn from_env(ready_within: Duration) -> Result<Option<Self>, String> {
        let url = match std::env::var(MYSQL_URL_ENV) {
            Ok(url) if !url.trim().is_empty() => url,
            _ => return Ok(None),
        };
        let options = MySqlOptions::parse(&url)
            .map_err(|e| format!("{MYSQL_URL_ENV} is not a usable URL: {e}"))?;
        let started = Instant::now();
        loop {
            let attempt = async {
                let mut conn = MySqlConnection::connect_with(options.get_connect_options()).await?;
                let version: String = sqlx::query_scalar("SELECT VERSION()")
                    .fetch_one(&mut conn)
                    .await?;
                Ok::<_, sqlx::Error>((conn, version))
            };
            match tokio::time::timeout(Duration::from_secs(5), attempt).await {
                Ok(Ok((admin, version))) => {
                    return Ok(Some(Self {
                        url,
                        options,
                        admin,
                        version,
                    }))
                }
                Ok(Err(e)) if started.elapsed() > ready_within => {
                    return Err(format!("server at {MYSQL_URL_ENV} does not answer: {e}"))
                }
                Err(_) if started.elapsed() > ready_within => {
                    return Err(format!("server at {MYSQL_URL_ENV} does not answer in time"))
                }
                _ => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }

    /// The server's URL, for child processes.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// `VERSION()`.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The driver options of the URL.
    pub fn options(&self) -> &MySqlOptions {
        &self.options
    }

    /// A driver connecting to the URL's database.
    pub fn driver(&self) -> MySqlDriver {
        MySqlDriver::new(self.options.clone())
    }

    /// A raw baseline connection.
    ///
    /// # Errors
    ///
    /// sqlx's connect error.
    pub async fn raw(&self) -> sqlx::Result<RawMySql> {
        RawMySql::connect(&self.options).await
    }

    /// Whether connection `id` waits in `GET_LOCK` (processlist state
    /// `User lock`).
    ///
    /// # Errors
    ///
    /// sqlx's error.
    pub async fn is_waiting(&mut self, id: u64) -> sqlx::Result<bool> {
        let n: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM information_schema.PROCESSLIST \
             WHERE ID = ? AND STATE = 'User lock'",
        )
        .bind(id)
        .fetch_one(&mut self.admin)
        .await?;
        Ok(n > 0)
    }

    /// Polls until connection `id` waits in `GET_LOCK`, up to `limit`.
    ///
    /// # Errors
    ///
    /// sqlx's error, or a message when it never waits.
    pub async fn until_waiting(&mut self, id: u64, limit: Duration) -> Result<(), String> {
        let started = Instant::now();
        loop {
            if self.is_waiting(id).await.map_err(|e| e.to_string())? {
                return Ok(());
            }
            if started.elapsed() > limit {
                return Err(format!("connection {id} never waited in GET_LOCK"));
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// A counter of the server's statements (global status, read from a
    /// connection of its own).
    ///
    /// # Errors
    ///
    /// Why it cannot be had.
    pub async fn statement_counter(&self) -> Result<ServerStatements, String> {
        let conn = MySqlConnection::connect_with(self.options.get_connect_options())
            .await
            .map_err(|e| format!("side connection: {e}"))?;
        let mut counter = ServerStatements {
            conn,
            overhead: StatusCounts::default(),
        };
        // Calibrate: what one reading adds to the counters itself.
        let a = counter.read().await.map_err(|e| e.to_string())?;
        let b = counter.read().await.map_err(|e| e.to_string())?;
        counter.overhead = b.minus(a);
        Ok(counter)
    }
}

/// Server-wide statement counters at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatusCounts {
    /// `Questions`: statements sent by clients (a multi-statement command
    /// counts each of its statements).
    pub questions: i64,
    /// `Com_select`: `SELECT` statements executed.
    pub selects: i64,
}

impl StatusCounts {
    fn minus(self, earlier: Self) -> Self {
        Self {
            questions: self.questions - earlier.questions,
            selects: self.selects - earlier.selects,
        }
    }
}

/// Reads the server's global statement counters from a connection of its
/// own; exact when nothing else talks to the server meanwhile.
#[derive(Debug)]
pub struct ServerStatements {
    conn: MySqlConnection,
    /// What one reading adds itself (its own `SHOW`).
    overhead: StatusCounts,
}

impl ServerStatements {
    /// The counters now (raw, including earlier readings).
    ///
    /// # Errors
    ///
    /// sqlx's error, or a counter that is not a number.
    pub async fn read(&mut self) -> sqlx::Result<StatusCounts> {
        let rows = self
            .conn
            .fetch_all(sqlx::raw_sql(
                "SHOW GLOBAL STATUS WHERE Variable_name IN ('Questions', 'Com_select')",
            ))
            .await?;
        let mut counts = StatusCounts::default();
        for row in rows {
            let name: String = row.try_get(0)?;
            let value: String = row.try_get(1)?;
            let value: i64 = value
                .trim()
                .parse()
                .map_err(|e| sqlx::Error::Decode(format!("{name} = {value:?}: {e}").into()))?;
            match name.to_ascii_lowercase().as_str() {
                "questions" => counts.questions = value,
                "com_select" => counts.selects = value,
                _ => {}
            }
        }
        Ok(counts)
    }

    /// What the server executed since `mark` (a [`read`](Self::read) or
    /// the previous lap), the readings' own statements taken out; `mark`
    /// moves to now.
    ///
    /// # Errors
    ///
    /// sqlx's error.
    pub async fn lap(&mut self, mark: &mut StatusCounts) -> sqlx::Result<StatusCounts> {
        let now = self.read().await?;
        let executed = now.minus(*mark).minus(self.overhead);
        *mark = now;
        Ok(executed)
    }
}

/// The raw MySQL baseline: one plain sqlx `MySqlConnection` sending the
/// `GET_LOCK` statements directly (prepared and cached by sqlx).
#[derive(Debug)]
pub struct RawMySql {
    conn: MySqlConnection,
}

impl RawMySql {
    /// `SELECT GET_LOCK(?, 0)`.
    pub const TRY_LOCK: &'static str = "SELECT GET_LOCK(?, 0)";
    /// `SELECT RELEASE_LOCK(?)`.
    pub const UNLOCK: &'static str = "SELECT RELEASE_LOCK(?)";
    /// A wait of a year: MariaDB answers `NULL` to a negative (infinite)
    /// timeout, so the raw side waits the way the driver does.
    pub const LOCK: &'static str = "SELECT GET_LOCK(?, 31536000)";
    /// The raw batch, one statement with one parameter (a JSON array of
    /// names), a row per name; MySQL's analogue of Postgres's `unnest`.
    pub const TRY_LOCK_MANY: &'static str = "SELECT GET_LOCK(t.n, 0) FROM \
         JSON_TABLE(?, '$[*]' COLUMNS (n VARCHAR(64) PATH '$')) AS t";
    /// `SELECT RELEASE_ALL_LOCKS()`.
    pub const UNLOCK_ALL: &'static str = "SELECT RELEASE_ALL_LOCKS()";

    /// Connects with `options`' connect options.
    ///
    /// # Errors
    ///
    /// sqlx's connect error.
    pub async fn connect(options: &MySqlOptions) -> sqlx::Result<Self> {
        Ok(Self {
            conn: MySqlConnection::connect_with(options.get_connect_options()).await?,
        })
    }

    /// Connects to a `mysql://` URL.
    ///
    /// # Errors
    ///
    /// A bad URL or sqlx's connect error.
    pub async fn connect_url(url: &str) -> Result<Self, String> {
        let options = MySqlOptions::parse(url).map_err(|e| e.to_string())?;
        Self::connect(&options).await.map_err(|e| e.to_string())
    }

    /// `GET_LOCK(name, 0)`: whether it was granted.
    ///
    /// # Errors
    ///
    /// sqlx's error.
    pub async fn try_lock(&mut self, name: &str) -> sqlx::Result<bool> {
        let got: Option<i64> = sqlx::query_scalar(Self::TRY_LOCK)
            .bind(name)
            .fetch_one(&mut self.conn)
            .await?;
        Ok(got == Some(1))
    }

    /// `RELEASE_LOCK(name)`: whether this connection held it.
    ///
    /// # Errors
    ///
    /// sqlx's error.
    pub async fn unlock(&mut self, name: &str) -> sqlx::Result<bool> {
        let released: Option<i64> = sqlx::query_scalar(Self::UNLOCK)
            .bind(name)
            .fetch_one(&mut self.conn)
            .await?;
        Ok(released == Some(1))
    }

    /// A blocking `GET_LOCK` ([`LOCK`](Self::LOCK)): whether granted.
    ///
    /// # Errors
    ///
    /// sqlx's error.
    pub async fn lock(&mut self, name: &str) -> sqlx::Result<bool> {
        let got: Option<i64> = sqlx::query_scalar(Self::LOCK)
            .bind(name)
            .fetch_one(&mut self.conn)
            .await?;
        Ok(got == Some(1))
    }

    /// The raw batch ([`TRY_LOCK_MANY`](Self::TRY_LOCK_MANY)) over a JSON
    /// array made by [`json_names`](Self::json_names): one round trip.
    ///
    /// # Errors
    ///
    /// sqlx's error.
    pub async fn try_lock_many(&mut self, json_names: &str) -> sqlx::Result<Vec<bool>> {
        let got: Vec<Option<i64>> = sqlx::query_scalar(Self::TRY_LOCK_MANY)
            .bind(json_names)
            .fetch_all(&mut self.conn)
            .await?;
        Ok(got.into_iter().map(|g| g == Some(1)).collect())
    }

    /// `names` as a JSON array of strings, for
    /// [`try_lock_many`](Self::try_lock_many).
    pub fn json_names(names: &[String]) -> String {
        let mut out = String::from("[");
        for (i, name) in names.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push('"');
            for c in name.chars() {
                match c {
                    '"' => out.push_str("\\\""),
                    '\\' => out.push_str("\\\\"),
                    c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
                    c => out.push(c),
                }
            }
            out.push('"');
        }
        out.push(']');
        out
    }

    /// `RELEASE_ALL_LOCKS()`.
    ///
    /// # Errors
    ///
    /// sqlx's error.
    pub async fn unlock_all(&mut self) -> sqlx::Result<()> {
        sqlx::query(Self::UNLOCK_ALL)
            .execute(&mut self.conn)
            .await
            .map(drop)
    }

    /// `CONNECTION_ID()`.
    ///
    /// # Errors
    ///
    /// sqlx's error.
    pub async fn connection_id(&mut self) -> sqlx::Result<u64> {
        sqlx::query_scalar("SELECT CONNECTION_ID()")
            .fetch_one(&mut self.conn)
            .await
    }

    /// Sends a statement text over the text protocol, as the driver does
    /// (for the diagnosis rows).
    ///
    /// # Errors
    ///
    /// sqlx's error.
    pub async fn text(&mut self, sql: &str) -> sqlx::Result<()> {
        self.conn.execute(sqlx::raw_sql(sql)).await.map(drop)
    }

    /// Frees everything and closes the connection gracefully.
    ///
    /// # Errors
    ///
    /// sqlx's error.
    pub async fn close(mut self) -> sqlx::Result<()> {
        self.unlock_all().await?;
        self.conn.close().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_names_escape_quotes_and_controls() {
        let names = vec!["a".to_string(), "b\"c\\d".to_string(), "e\nf".to_string()];
        assert_eq!(
            RawMySql::json_names(&names),
            r#"["a","b\"c\\d","e\u000af"]"#
        );
        assert_eq!(RawMySql::json_names(&[]), "[]");
    }

    #[test]
    fn status_differences_subtract_both_counters() {
        let a = StatusCounts {
            questions: 10,
            selects: 4,
        };
        let b = StatusCounts {
            questions: 15,
            selects: 6,
        };
        assert_eq!(
            b.minus(a),
            StatusCounts {
                questions: 5,
                selects: 2
            }
        );
    }
}
