//! `shardlock status` against real nodes: every tenant database's locks on
//! one PostgreSQL server, and `--watch` redrawing in a real terminal (tmux),
//! on a pipe and as JSON lines.
//!
//! Postgres: `SHARDLOCK_PG_URL`, else a throw-away container of
//! `SHARDLOCK_PG_IMAGE` (default `shardlock-test/postgres:15`, built by
//! `scripts/build-images.sh`), else a loud SKIPPED line (a failure when
//! `SHARDLOCK_REQUIRE` names postgres, as in CI). The terminal test needs
//! tmux (installed by `scripts/test.sh`); without it, a loud SKIPPED line
//! (a failure when `SHARDLOCK_REQUIRE` names tmux).

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

mod common;
use common::{server, shardlock, sql, wait_for, Kind, Node, Server, TempDir};

/// Tenant databases made for one test, dropped at the end.
struct Tenants<'a> {
    server: &'a Server,
    names: Vec<String>,
}

impl<'a> Tenants<'a> {
    fn create(server: &'a Server, n: usize) -> Self {
        // Unique per run: a shared server (a URL given) may run others.
        let names: Vec<String> = (1..=n)
            .map(|i| format!("sl_status_{}_t{i}", std::process::id()))
            .collect();
        let tenants = Self { server, names };
        let statements: Vec<String> = tenants
            .names
            .iter()
            .flat_map(|db| {
                [
                    format!("DROP DATABASE IF EXISTS {}", tenants.quoted(db)),
                    format!("CREATE DATABASE {}", tenants.quoted(db)),
                ]
            })
            .collect();
        sql(server.kind, &server.url, &statements).expect("create the tenant databases");
        tenants
    }

    fn quoted(&self, db: &str) -> String {
        match self.server.kind {
            Kind::Postgres => format!("\"{db}\""),
            Kind::Mysql => format!("`{db}`"),
        }
    }
}

impl Drop for Tenants<'_> {
    fn drop(&mut self) {
        let force = match self.server.kind {
            Kind::Postgres => " WITH (FORCE)",
            Kind::Mysql => "",
        };
        let statements: Vec<String> = self
            .names
            .iter()
            .map(|db| format!("DROP DATABASE IF EXISTS {}{force}", self.quoted(db)))
            .collect();
        let _ = sql(self.server.kind, &self.server.url, &statements);
    }
}

/// `status --json`: the locks of `holder`, as (database, name) sorted.
fn locks_of(doc: &Value, holder: &str) -> Vec<(String, Option<String>)> {
    let mut out: Vec<(String, Option<String>)> = doc["locks"]
        .as_array()
        .map(|locks| {
            locks
                .iter()
                .filter(|l| l["holder"] == holder)
                .map(|l| {
                    (
                        l["database"].as_str().unwrap_or("").to_string(),
                        l["name"].as_str().map(str::to_string),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

fn status_json(args: &[&str]) -> (Value, String) {
    let out = shardlock(&[&["status", "--json"], args].concat());
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let doc = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    (doc, text)
}

/// A multi-tenanted node holds one lock in each of three tenant databases
/// of the server; `status --url` naming another database lists all three
/// with their database, named, with `--tenants` and without, and
/// `--tenants` restricts the list.
#[test]
fn postgres_status_lists_every_tenant_database() {
    let Some(server) = server(Kind::Postgres) else {
        return;
    };
    status_lists_every_tenant_database(&server);
}

/// The same on MySQL/MariaDB, whose `GET_LOCK` names are server-wide: a
/// lock's database is its session's.
#[test]
fn mysql_status_lists_every_tenant_database() {
    let Some(server) = server(Kind::Mysql) else {
        return;
    };
    status_lists_every_tenant_database(&server);
}

fn status_lists_every_tenant_database(server: &Server) {
    let url = server.url.as_str();
    let tenants = Tenants::create(server, 3);
    let list = tenants.names.join(",");
    let node = Node::start(&[
        "--driver",
        server.kind.name(),
        "--url",
        url,
        "--distributor",
        "multi-tenanted",
        "--tenants",
        &list,
        "--node-id",
        "tenants-node",
    ]);
    let holder = "shardlock:tenants-node";
    let expected: Vec<(String, Option<String>)> = tenants
        .names
        .iter()
        .map(|db| (db.clone(), Some(format!("{db}:app:shardlock-tenant"))))
        .collect();

    let doc = wait_for(
        Duration::from_secs(30),
        "status --tenants never listed the node's lock in each tenant database",
        || {
            let (doc, text) = status_json(&["--url", url, "--tenants", &list]);
            let found = (locks_of(&doc, holder) == expected).then_some(doc);
            (found, text)
        },
    );
    assert_eq!(
        doc["locks"].as_array().map(Vec::len),
        Some(3),
        "only the tenant databases: {doc}"
    );
    let nodes = doc["nodes"].as_array().expect("nodes");
    assert_eq!(nodes.len(), 1, "{doc}");
    assert_eq!(nodes[0]["holder"], holder, "{doc}");
    assert_eq!(nodes[0]["sets"], 3, "{doc}");
    assert_eq!(nodes[0]["databases"], 3, "{doc}");

    // Without --tenants: every database of the server, the tenants' locks
    // named too (each database is tried as a tenant).
    let (all, text) = status_json(&["--url", url]);
    assert_eq!(locks_of(&all, holder), expected, "all databases:\n{text}");

    // --tenants restricts.
    let two = tenants.names[..2].join(",");
    let (some, text) = status_json(&["--url", url, "--tenants", &two]);
    assert_eq!(locks_of(&some, holder), expected[..2], "{text}");
    assert_eq!(some["locks"].as_array().map(Vec::len), Some(2), "{text}");

    // The table: the database column filled, the node's count.
    let table = shardlock(&["status", "--url", url, "--tenants", &list]);
    let table = String::from_utf8_lossy(&table.stdout);
    for db in &tenants.names {
        assert!(
            table
                .lines()
                .any(|l| l.starts_with(db.as_str()) && l.contains("shardlock-tenant")),
            "a row in {db}:\n{table}"
        );
    }
    assert!(
        table.lines().any(|l| node_line(l) == Some((holder, 3))),
        "node count line:\n{table}"
    );

    node.stop();
    let (after, text) = status_json(&["--url", url, "--tenants", &list]);
    assert_eq!(
        locks_of(&after, holder),
        [],
        "a stopped node leaves no lock: {text}"
    );
}

// ------------------------------------------------------------------ watch

/// A line of the per-node table: `  <holder> <sets> <member slots>
/// <databases>` (the members table has six columns).
fn node_line(line: &str) -> Option<(&str, usize)> {
    let cols: Vec<&str> = line.split_whitespace().collect();
    match cols.as_slice() {
        [holder, sets, slots, dbs]
            if line.starts_with("  ")
                && slots.parse::<usize>().is_ok()
                && dbs.parse::<usize>().is_ok() =>
        {
            Some((*holder, sets.parse().ok()?))
        }
        _ => None,
    }
}

/// The per-node counts on a screen, sorted.
fn node_counts(screen: &str) -> Vec<(String, usize)> {
    let mut out: Vec<(String, usize)> = screen
        .lines()
        .filter_map(node_line)
        .map(|(h, n)| (h.to_string(), n))
        .collect();
    out.sort();
    out
}

/// A line of the members table: `  <holder> <client> <pid> <slots> <sets>
/// <share>`, as (holder, share).
fn share_line(line: &str) -> Option<(String, usize)> {
    let cols: Vec<&str> = line.split_whitespace().collect();
    match cols.as_slice() {
        [holder, _client, _pid, _slots, sets, share]
            if line.starts_with("  ") && sets.parse::<usize>().is_ok() =>
        {
            Some((holder.to_string(), share.parse().ok()?))
        }
        _ => None,
    }
}

fn shares(screen: &str) -> Vec<(String, usize)> {
    let mut out: Vec<(String, usize)> = screen.lines().filter_map(share_line).collect();
    out.sort();
    out
}

/// tmux on a private socket, killed at the end.
struct Tmux {
    socket: String,
}

impl Tmux {
    /// `None` (after a loud SKIPPED line) when tmux is not installed.
    fn start(command: &str) -> Option<Self> {
        let socket = format!("shardlock-status-test-{}", std::process::id());
        let started = Command::new("tmux")
            .args(["-L", &socket, "-f", "/dev/null"])
            .args(["new-session", "-d", "-s", "watch", "-x", "200", "-y", "50"])
            .arg(command)
            .status();
        match started {
            Ok(s) if s.success() => Some(Self { socket }),
            Ok(s) => panic!("tmux new-session failed: {s}"),
            Err(e) => {
                let why = format!("tmux not installed ({e}; scripts/test.sh installs it)");
                eprintln!("SKIPPED: status --watch in a terminal: {why}, install tmux to run");
                if std::env::var("SHARDLOCK_REQUIRE").is_ok_and(|v| v.contains("tmux")) {
                    panic!("tmux is required (SHARDLOCK_REQUIRE) but skipped: {why}");
                }
                None
            }
        }
    }

    /// What the terminal shows now.
    fn screen(&self) -> String {
        let out = Command::new("tmux")
            .args(["-L", &self.socket, "capture-pane", "-p", "-t", "watch"])
            .output()
            .expect("tmux capture-pane");
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    fn keys(&self, keys: &str) {
        let status = Command::new("tmux")
            .args(["-L", &self.socket, "send-keys", "-t", "watch", keys])
            .status()
            .expect("tmux send-keys");
        assert!(status.success(), "tmux send-keys {keys}");
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["-L", &self.socket, "kill-server"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// A balanced SQLite node; returns once the lock directory exists (a
/// watch started before it would end at once on "not a lock directory").
fn sqlite_node(dir: &TempDir, id: &str) -> Node {
    let node = Node::start(&["--driver", "sqlite", "--dir", dir.path(), "--node-id", id]);
    wait_for(
        Duration::from_secs(20),
        "the node never made its lock directory",
        || {
            let out = shardlock(&["status", "--dir", dir.path()]);
            let text = String::from_utf8_lossy(&out.stderr).to_string();
            (out.status.success().then_some(()), text)
        },
    );
    node
}

/// `status --watch` in a real terminal (tmux): the screen shows one frame
/// (cleared and redrawn, not scrolled) with the holder table, the per-node
/// counts and the balanced members' shares; a second node joining changes
/// the counts on screen; ctrl-c ends it with exit status 0.
#[test]
fn watch_redraws_in_a_terminal_until_ctrl_c() {
    let dir = TempDir::new("status-watch-tty");
    let first = sqlite_node(&dir, "watch-a");
    let command = format!(
        "'{}' status --dir '{}' --watch --interval-ms 300; echo \"watch exited: $?\"; sleep 60",
        env!("CARGO_BIN_EXE_shardlock"),
        dir.path()
    );
    let Some(tmux) = Tmux::start(&command) else {
        return;
    };
    let screen = wait_for(
        Duration::from_secs(30),
        "the watch never showed watch-a with its 12 sets",
        || {
            let screen = tmux.screen();
            let found = (node_counts(&screen) == [("watch-a".to_string(), 12)]
                && shares(&screen) == [("watch-a".to_string(), 12)])
            .then(|| screen.clone());
            (found, screen)
        },
    );
    assert_eq!(
        screen.matches("shardlock status · ").count(),
        1,
        "one frame on screen (cleared, not scrolled):\n{screen}"
    );
    assert!(
        screen.contains(&format!("lock directory {}", dir.path())),
        "the header names the source:\n{screen}"
    );
    assert!(
        screen.contains("main:app:orders:00") && screen.contains("13 locks held"),
        "the holder table:\n{screen}"
    );
    assert!(!screen.contains("\n---\n"), "no separator on a terminal");

    // A second node joins: the redrawn screen shows 6 and 6.
    let second = sqlite_node(&dir, "watch-b");
    let screen = wait_for(
        Duration::from_secs(30),
        "the watch never showed watch-a and watch-b at 6 sets each",
        || {
            let screen = tmux.screen();
            let want = [("watch-a".to_string(), 6), ("watch-b".to_string(), 6)];
            let found =
                (node_counts(&screen) == want && shares(&screen) == want).then(|| screen.clone());
            (found, screen)
        },
    );
    assert_eq!(screen.matches("shardlock status · ").count(), 1, "{screen}");
    assert!(
        screen.contains("2 live member slots (0,1 of 64), 12 sets to share"),
        "{screen}"
    );

    tmux.keys("C-c");
    wait_for(
        Duration::from_secs(10),
        "ctrl-c did not end the watch with status 0",
        || {
            let screen = tmux.screen();
            (screen.contains("watch exited: 0").then_some(()), screen)
        },
    );
    first.stop();
    second.stop();
}

/// Reads a child's stdout lines on a thread.
fn lines_of(child: &mut Child) -> mpsc::Receiver<String> {
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

fn watch(dir: &Path, json: bool) -> Child {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_shardlock"));
    cmd.args(["status", "--dir"])
        .arg(dir)
        .args(["--watch", "--interval-ms", "200"]);
    if json {
        cmd.arg("--json");
    }
    cmd.stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start status --watch")
}

/// SIGINT (what ctrl-c sends) and the exit status.
fn interrupt(mut child: Child) -> std::process::ExitStatus {
    let sent = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .expect("kill -INT");
    assert!(sent.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("status --watch did not end on SIGINT");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Next line, or a failure after `limit`.
fn next_line(rx: &mpsc::Receiver<String>, limit: Duration, seen: &str) -> String {
    rx.recv_timeout(limit)
        .unwrap_or_else(|_| panic!("no output line within {limit:?}; so far:\n{seen}"))
}

/// On a pipe: no escape codes, a `---` line between refreshes, each
/// refresh a whole table; SIGINT ends it with status 0.
#[test]
fn watch_on_a_pipe_separates_refreshes_without_escape_codes() {
    let dir = TempDir::new("status-watch-pipe");
    let node = sqlite_node(&dir, "pipe-a");
    let mut child = watch(&dir.0, false);
    let rx = lines_of(&mut child);
    let mut seen = String::new();
    // Until two refreshes after the first showed the node's 12 sets.
    let mut full_frames = 0;
    let mut frame_ok = false;
    let deadline = Instant::now() + Duration::from_secs(30);
    while full_frames < 2 {
        assert!(Instant::now() < deadline, "no two full refreshes:\n{seen}");
        let line = next_line(&rx, Duration::from_secs(10), &seen);
        seen.push_str(&line);
        seen.push('\n');
        if line == "---" {
            if frame_ok {
                full_frames += 1;
            }
            frame_ok = false;
        }
        if node_line(&line) == Some(("pipe-a", 12)) {
            frame_ok = true;
        }
    }
    let status = interrupt(child);
    assert!(status.success(), "SIGINT ends the watch with 0: {status}");
    while let Ok(line) = rx.try_recv() {
        seen.push_str(&line);
        seen.push('\n');
    }
    assert!(!seen.contains('\x1b'), "no escape codes on a pipe:\n{seen}");
    assert!(
        seen.lines()
            .filter(|l| l.starts_with("shardlock status · "))
            .all(|l| l.contains("every 200 ms")),
        "{seen}"
    );
    node.stop();
}

/// `--json --watch`: one JSON document per line per refresh, no screen
/// control; the counts follow the nodes (one, then two).
#[test]
fn watch_json_prints_one_document_per_refresh() {
    let dir = TempDir::new("status-watch-json");
    let first = sqlite_node(&dir, "json-a");
    let mut child = watch(&dir.0, true);
    let rx = lines_of(&mut child);
    let mut seen = String::new();
    let mut docs = 0;
    let mut stamps: Vec<u64> = Vec::new();
    let mut read_until = |want: &[(&str, u64)], seen: &mut String| {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            assert!(Instant::now() < deadline, "never saw {want:?}:\n{seen}");
            let line = next_line(&rx, Duration::from_secs(10), seen);
            seen.push_str(&line);
            seen.push('\n');
            let doc: Value = serde_json::from_str(&line)
                .unwrap_or_else(|e| panic!("not one JSON document a line ({e}): {line}"));
            docs += 1;
            stamps.push(doc["at_unix_ms"].as_u64().expect("at_unix_ms"));
            let mut nodes: Vec<(String, u64)> = doc["nodes"]
                .as_array()
                .expect("nodes")
                .iter()
                .map(|n| {
                    (
                        n["holder"].as_str().unwrap_or("").to_string(),
                        n["sets"].as_u64().unwrap_or(0),
                    )
                })
                .collect();
            nodes.sort();
            let want: Vec<(String, u64)> = want.iter().map(|(h, n)| (h.to_string(), *n)).collect();
            if nodes == want {
                return doc;
            }
        }
    };
    let doc = read_until(&[("json-a", 12)], &mut seen);
    assert_eq!(doc["members"][0]["holders"][0]["share"], 12, "{doc}");
    let second = sqlite_node(&dir, "json-b");
    let doc = read_until(&[("json-a", 6), ("json-b", 6)], &mut seen);
    let shares: Vec<u64> = doc["members"][0]["holders"]
        .as_array()
        .expect("holders")
        .iter()
        .filter_map(|h| h["share"].as_u64())
        .collect();
    assert_eq!(shares, [6, 6], "{doc}");
    let status = interrupt(child);
    assert!(status.success(), "SIGINT ends the watch with 0: {status}");
    assert!(docs >= 2, "{seen}");
    assert!(
        stamps.windows(2).all(|w| w[0] <= w[1]),
        "refreshes in order: {stamps:?}"
    );
    assert!(!seen.contains('\x1b'), "no screen control in JSON:\n{seen}");
    first.stop();
    second.stop();
}
