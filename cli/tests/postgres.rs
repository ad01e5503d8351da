//! The `shardlock` binary on real PostgreSQL: the process demo (one node
//! killed with SIGKILL, one stopped) and `status --url`.
//!
//! Server: see `common` (`SHARDLOCK_PG_URL`, else a container of the local
//! image, else a loud SKIPPED line).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{server, shardlock, sql, Kind};

/// The summary's phase lines' counts (`4/4/4`, ...); fails on a phase that
/// did not settle.
fn phase_counts(stdout: &str) -> Vec<String> {
    stdout
        .lines()
        .filter(|l| l.starts_with("  phase "))
        .map(|l| {
            assert!(
                l.contains(", settled "),
                "phase did not settle: {l}\n{stdout}"
            );
            let (_, rest) = l.split_once(": ").expect("phase line shape");
            rest.split(' ').next().expect("counts").to_string()
        })
        .collect()
}

/// `status --json`: the holders of the group's member slots in the first
/// database listed, as (holder, slots, sets).
fn member_holders(doc: &serde_json::Value) -> Vec<(String, Vec<u64>, u64)> {
    doc["members"][0]["holders"]
        .as_array()
        .map(|hs| {
            hs.iter()
                .map(|h| {
                    (
                        h["holder"].as_str().unwrap_or("").to_string(),
                        h["slots"]
                            .as_array()
                            .map(|s| s.iter().filter_map(|v| v.as_u64()).collect())
                            .unwrap_or_default(),
                        h["sets"].as_u64().unwrap_or(0),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn postgres_process_demo_and_status() {
    let Some(server) = server(Kind::Postgres) else {
        return;
    };
    let output = shardlock(&[
        "demo",
        "--driver",
        "postgres",
        "--url",
        &server.url,
        "--plain",
    ]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "demo failed: {stdout}\n{stderr}");
    assert!(
        stdout.lines().any(|l| l == "overlaps: 0"),
        "no `overlaps: 0` line:\n{stdout}"
    );
    assert_eq!(
        phase_counts(&stdout),
        ["4/4/4", "6/6", "12", "6/6"],
        "balanced phases:\n{stdout}"
    );
    let kill = stdout
        .lines()
        .find(|l| l.contains("kill -9 of") && l.contains("time from kill"))
        .unwrap_or_default();
    assert!(
        kill.contains("4 shards taken over"),
        "the killed node's 4 shards taken over:\n{stdout}"
    );
    for line in stdout.lines().filter(|l| l.starts_with("  phase ")) {
        eprintln!("postgres demo: {line}");
    }

    // A balanced node shows up in `status --url` with its lock names, its
    // member slot and its sets.
    let mut node = Command::new(env!("CARGO_BIN_EXE_shardlock"))
        .args([
            "node",
            "--driver",
            "postgres",
            "--url",
            &server.url,
            "--shards",
            "3",
        ])
        .args([
            "--schema",
            "statuscheck",
            "--node-id",
            "status-node",
            "--poll-ms",
            "200",
            "--stop-on-stdin-eof",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start node");
    let status_args = [
        "status",
        "--url",
        &server.url,
        "--schema",
        "statuscheck",
        "--shards",
        "3",
    ];
    // Hang guard only.
    let deadline = Instant::now() + Duration::from_secs(20);
    let doc = loop {
        let out = shardlock(&[&status_args[..], &["--json"]].concat());
        let doc: serde_json::Value =
            serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
        if member_holders(&doc) == [("shardlock:status-node".to_string(), vec![0], 3)] {
            break doc;
        }
        assert!(
            Instant::now() < deadline,
            "status never showed the node's member slot 0 and 3 sets:\n{doc}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(doc["members"][0]["group"], "main:statuscheck", "{doc}");
    assert_eq!(
        doc["members"][0]["slots"][0]["name"], "members:main:statuscheck:0",
        "{doc}"
    );
    assert!(
        doc["members"][0]["slots"][0]["pid"]
            .as_str()
            .is_some_and(|p| p.parse::<u32>().is_ok()),
        "the holder's backend pid: {doc}"
    );
    let table = shardlock(&status_args);
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.contains("main:statuscheck:orders:00"),
        "lock names rebuilt:\n{table}"
    );
    assert!(
        table.contains("members:main:statuscheck:0"),
        "member slot named:\n{table}"
    );
    assert!(
        table.contains("1 live member slot (0 of 64)"),
        "members shown:\n{table}"
    );
    let json = shardlock(&["status", "--url", &server.url, "--json"]);
    let all: serde_json::Value = serde_json::from_slice(&json.stdout).expect("status --json");
    assert!(all["locks"].is_array(), "{all}");
    drop(node.stdin.take());
    let status = node.wait().expect("node exit");
    assert!(status.success(), "graceful stop exits 0");
    let after = shardlock(&["status", "--url", &server.url]);
    assert!(
        !String::from_utf8_lossy(&after.stdout).contains("shardlock:status-node"),
        "a stopped node leaves no lock behind"
    );
}

/// `GET path` on `addr` (HTTP/1.0, so the server closes after the answer):
/// the status code and the body.
fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    use std::io::{Read as _, Write as _};
    let mut stream = std::net::TcpStream::connect(addr).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).ok()?;
    let (head, body) = answer.split_once("\r\n\r\n")?;
    let code = head.split(' ').nth(1)?.parse().ok()?;
    Some((code, body.to_string()))
}

/// The value of `name{...node="<node>"...}` (plus `extra` among the labels)
/// in a Prometheus text page.
fn sample(page: &str, name: &str, node: &str, extra: &str) -> Option<f64> {
    let node_label = format!("node=\"{node}\"");
    page.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .filter(|l| l.contains(&node_label) && l.contains(extra))
        .find_map(|l| l.rsplit(' ').next()?.parse().ok())
}

/// Polls `check` on fresh scrapes until it holds (hang guard only).
fn scrape_until(addr: &str, what: &str, check: impl Fn(u16, &str, &str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let health = http_get(addr, "/healthz");
        let page = http_get(addr, "/metrics");
        if let (Some((code, health)), Some((200, page))) = (&health, &page) {
            if check(*code, health, page) {
                return page.clone();
            }
        }
        assert!(
            Instant::now() < deadline,
            "never saw {what}; /healthz: {health:?}\n/metrics:\n{}",
            page.map(|p| p.1).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A free loopback port (bound, then released for the node to take).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// `shardlock node --metrics-addr`: a Prometheus scrape of a real node shows
/// every coordinator metric of the documented table, with values that follow
/// what the node did (acquisitions, a balancing handoff, a loss); `/healthz`
/// turns 503 "degraded" while its database refuses connections and 200
/// "healthy" once it takes them again.
#[test]
fn postgres_node_metrics_and_health() {
    let Some(server) = server(Kind::Postgres) else {
        return;
    };
    let admin = |statement: String| {
        if let Err(e) = sql(Kind::Postgres, &server.url, &[statement]) {
            panic!("{e}");
        }
    };
    admin("DROP DATABASE IF EXISTS metricsdb WITH (FORCE)".into());
    admin("CREATE DATABASE metricsdb".into());
    let url = match server.url.rsplit_once('/') {
        Some((base, _)) => format!("{base}/metricsdb"),
        None => panic!("no database in {}", server.url),
    };
    let addr = format!("127.0.0.1:{}", free_port());
    let node = |id: &str, metrics: Option<&str>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_shardlock"));
        cmd.args([
            "node", "--driver", "postgres", "--url", &url, "--shards", "4",
        ])
        .args(["--schema", "metrics", "--node-id", id, "--poll-ms", "300"])
        .arg("--stop-on-stdin-eof")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        if let Some(addr) = metrics {
            cmd.args(["--metrics-addr", addr]);
        }
        cmd.spawn().expect("start node")
    };
    let mut a = node("metrics-a", Some(&addr));

    // Alone: all 4 sets, one session, one member.
    let page = scrape_until(&addr, "node a healthy with 4 sets", |code, health, page| {
        code == 200
            && health.trim() == "healthy"
            && sample(page, "shardlock_sets_owned", "metrics-a", "") == Some(4.0)
    });
    for name in [
        "shardlock_sets_owned",
        "shardlock_sets_wanted",
        "shardlock_members_live",
        "shardlock_sessions_open",
        "shardlock_acquisitions_total",
        "shardlock_denials_total",
        "shardlock_agent_failures_total",
        "shardlock_agent_restarts_total",
        "shardlock_handoffs_total",
        "shardlock_cycle_seconds",
        "shardlock_verify_seconds",
        "shardlock_batch_size",
        "shardlock_takeover_ownerless_seconds",
    ] {
        assert!(
            page.lines()
                .any(|l| l.starts_with(name) && l.contains("node=\"metrics-a\"")),
            "{name} missing from the scrape:\n{page}"
        );
    }
    assert_eq!(
        sample(&page, "shardlock_acquisitions_total", "metrics-a", ""),
        Some(4.0)
    );
    assert_eq!(
        sample(&page, "shardlock_sessions_open", "metrics-a", ""),
        Some(1.0)
    );
    assert_eq!(
        sample(&page, "shardlock_members_live", "metrics-a", ""),
        Some(1.0)
    );
    assert_eq!(
        sample(&page, "shardlock_sets_wanted", "metrics-a", ""),
        Some(4.0)
    );
    assert!(
        page.contains("driver=\"postgres\""),
        "driver label:\n{page}"
    );

    // A second node joins: a hands 2 sets over (agents stopped, announced).
    let mut b = node("metrics-b", None);
    let page = scrape_until(&addr, "a handing 2 sets to b", |_, _, page| {
        sample(page, "shardlock_sets_owned", "metrics-a", "") == Some(2.0)
            && sample(page, "shardlock_handoffs_total", "metrics-a", "").is_some_and(|n| n >= 2.0)
    });
    assert_eq!(
        sample(&page, "shardlock_members_live", "metrics-a", ""),
        Some(2.0)
    );
    assert_eq!(
        sample(&page, "shardlock_sets_wanted", "metrics-a", ""),
        Some(2.0)
    );

    // The database refuses connections and a's backends are ended: a loss
    // seen through the loss signal, and a degraded node until it returns.
    admin("ALTER DATABASE metricsdb ALLOW_CONNECTIONS false".into());
    admin(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE application_name LIKE 'shardlock:metrics-a%'"
            .into(),
    );
    let page = scrape_until(&addr, "a degraded", |code, health, _| {
        code == 503 && health.starts_with("degraded: database main unreachable")
    });
    assert!(
        sample(
            &page,
            "shardlock_losses_total",
            "metrics-a",
            "cause=\"signal\""
        )
        .is_some_and(|n| n >= 1.0),
        "a loss by the loss signal:\n{page}"
    );
    admin("ALTER DATABASE metricsdb ALLOW_CONNECTIONS true".into());
    scrape_until(&addr, "a healthy again", |code, health, page| {
        code == 200
            && health.trim() == "healthy"
            && sample(page, "shardlock_sessions_open", "metrics-a", "") == Some(1.0)
    });
    assert_eq!(http_get(&addr, "/livez").map(|r| r.0), Some(200));
    assert_eq!(http_get(&addr, "/nothing").map(|r| r.0), Some(404));

    for child in [&mut a, &mut b] {
        drop(child.stdin.take());
        let status = child.wait().expect("node exit");
        assert!(status.success(), "graceful stop exits 0");
    }
}
