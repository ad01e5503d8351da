//! MySQL/MariaDB for the fault-injection run: the server (a container on
//! the host network, or `SHARDLOCK_MYSQL_URL`), its readiness, and the
//! server-side `KILL` of a node's sessions.

use std::time::Duration;

use shardlock::mysql::sqlx::mysql::MySqlConnection;
use shardlock::mysql::sqlx::{self, Connection, Executor};

use super::{block_on, start_server, wait_until, Server, ServerKind};

const URL_ENV: &str = "SHARDLOCK_MYSQL_URL";
const IMAGE_ENV: &str = "SHARDLOCK_MYSQL_IMAGE";
const DEFAULT_IMAGE: &str = "shardlock-test/mariadb:10.11";

/// Runs `work` on a fresh connection to `url`, within 10 s.
fn with_conn<T>(
    url: &str,
    work: impl AsyncFnOnce(&mut MySqlConnection) -> Result<T, String>,
) -> Result<T, String> {
    block_on(async {
        let run = async {
            let options = shardlock::mysql::MySqlOptions::parse(url).map_err(|e| e.to_string())?;
            let mut conn = MySqlConnection::connect_with(options.get_connect_options())
                .await
                .map_err(|e| format!("connect: {e}"))?;
            let out = work(&mut conn).await;
            let _ = conn.close().await;
            out
        };
        match tokio::time::timeout(Duration::from_secs(10), run).await {
            Ok(r) => r,
            Err(_) => Err("timed out after 10 s".to_string()),
        }
    })?
}

/// Whether the server answers `SELECT 1` within `bound`.
pub(super) fn ready(url: &str, bound: Duration) -> bool {
    wait_until(bound, || {
        with_conn(url, async |conn| {
            conn.execute("SELECT 1")
                .await
                .map(drop)
                .map_err(|e| e.to_string())
        })
        .is_ok()
    })
}

fn skip(why: &str) -> Option<Server> {
    eprintln!("SKIPPED: mysql (fault injection): {why}, set {URL_ENV} to run");
    if std::env::var("SHARDLOCK_REQUIRE").is_ok_and(|v| v.contains("mysql")) {
        panic!("mysql is required (SHARDLOCK_REQUIRE) but skipped: {why}");
    }
    None
}

/// The server: `SHARDLOCK_MYSQL_URL`, else a container of
/// `SHARDLOCK_MYSQL_IMAGE` on the host network, else a loud skip.
pub(super) fn server() -> Option<Server> {
    start_server(&ServerKind {
        name: "MySQL",
        url_env: URL_ENV,
        image_env: IMAGE_ENV,
        default_image: DEFAULT_IMAGE,
        default_port: 3306,
        // Root without a password and a database of its own (the image
        // follows the official image's variables; arguments starting with -
        // go to mariadbd and override its defaults).
        run_args: |image, port| {
            let port = format!("--port={port}");
            [
                "-e",
                "MARIADB_ALLOW_EMPTY_ROOT_PASSWORD=1",
                "-e",
                "MARIADB_DATABASE=chaos",
                image,
                "--bind-address=127.0.0.1",
                &port,
                "--max-connections=300",
            ]
            .map(String::from)
            .into()
        },
        url: |port| format!("mysql://root@127.0.0.1:{port}/chaos"),
        ready,
        skip,
    })
}

/// `(session, watcher)` connection ids of `node`'s sessions, from the
/// processlist: each watcher waits in a statement labelled
/// `/* shardlock:<node> session=<id> */`.
fn sessions_of(rows: &[(u64, String)], node: &str) -> Vec<(u64, u64)> {
    let label = format!("/* shardlock:{node} session=");
    rows.iter()
        .filter_map(|(watcher, info)| {
            let rest = info.strip_prefix(&label)?;
            let session = rest.split(' ').next()?.parse().ok()?;
            Some((session, *watcher))
        })
        .collect()
}

/// `KILL`s `node`'s session connections (and, with `all`, their watchers)
/// from a side connection; answers how many sessions it found.
pub(super) fn kill_sessions(url: &str, node: &str, all: bool) -> Result<usize, String> {
    with_conn(url, async |conn| {
        // ID is a signed BIGINT in MariaDB's processlist.
        let rows: Vec<(i64, String)> = sqlx::query_as(
            "SELECT ID, INFO FROM information_schema.PROCESSLIST \
             WHERE INFO LIKE '/* shardlock:%'",
        )
        .fetch_all(&mut *conn)
        .await
        .map_err(|e| format!("read the processlist: {e}"))?;
        let rows: Vec<(u64, String)> = rows
            .into_iter()
            .filter_map(|(id, info)| Some((u64::try_from(id).ok()?, info)))
            .collect();
        let sessions = sessions_of(&rows, node);
        for (session, watcher) in &sessions {
            let mut ids = vec![*session];
            if all {
                ids.push(*watcher);
            }
            for id in ids {
                // A connection that ended meanwhile is not an error here.
                if let Err(e) = conn.execute(format!("KILL {id}").as_str()).await {
                    if !e.to_string().contains("Unknown thread id") {
                        return Err(format!("KILL {id}: {e}"));
                    }
                }
            }
        }
        Ok(sessions.len())
    })
}

#[test]
fn sessions_are_found_by_their_watchers_label() {
    let rows = vec![
        (
            11,
            "/* shardlock:n1-1 session=10 */ SELECT GET_LOCK(_utf8mb4 X'00', 31536000)".into(),
        ),
        (
            21,
            "/* shardlock:n1-10 session=20 */ SELECT GET_LOCK(_utf8mb4 X'00', 31536000)".into(),
        ),
        (31, "SELECT 1".into()),
    ];
    assert_eq!(sessions_of(&rows, "n1-1"), vec![(10, 11)]);
    assert_eq!(sessions_of(&rows, "n1-10"), vec![(20, 21)]);
    assert!(sessions_of(&rows, "n2-1").is_empty());
}
