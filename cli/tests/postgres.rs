//! The `shardlock` binary on real PostgreSQL: the process demo (one node
//! killed with SIGKILL, one stopped) and `status --url`.
//!
//! Server: `SHARDLOCK_PG_URL`, else a throw-away container of
//! `SHARDLOCK_PG_IMAGE` (default `shardlock-test/postgres:15`, built by
//! `scripts/build-images.sh`), else a loud SKIPPED line (a failure when
//! `SHARDLOCK_REQUIRE` names postgres, as in CI).

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

struct Server {
    url: String,
    container: Option<String>,
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

fn skip(why: &str) -> Option<Server> {
    eprintln!("SKIPPED: postgres (cli): {why}, set SHARDLOCK_PG_URL to run");
    if std::env::var("SHARDLOCK_REQUIRE").is_ok_and(|v| v.contains("postgres")) {
        panic!("postgres is required (SHARDLOCK_REQUIRE) but skipped: {why}");
    }
    None
}

fn docker(args: &[&str]) -> Result<String, String> {
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

fn server() -> Option<Server> {
    if let Ok(url) = std::env::var("SHARDLOCK_PG_URL") {
        if !url.trim().is_empty() {
            return Some(Server {
                url,
                container: None,
            });
        }
    }
    let image =
        std::env::var("SHARDLOCK_PG_IMAGE").unwrap_or_else(|_| "shardlock-test/postgres:15".into());
    if let Err(e) = docker(&["image", "inspect", &image]) {
        return skip(&format!("no Docker or no image {image} ({e})"));
    }
    let id = match docker(&[
        "run",
        "-d",
        "--label",
        "shardlock.test=postgres-cli",
        "-p",
        "127.0.0.1::5432",
        "-e",
        "POSTGRES_PASSWORD=postgres",
        &image,
    ]) {
        Ok(id) => id,
        Err(e) => return skip(&format!("cannot start {image}: {e}")),
    };
    let server = Server {
        url: String::new(),
        container: Some(id.clone()),
    };
    let port = docker(&["port", &id, "5432/tcp"]).expect("mapped port");
    let port = port
        .lines()
        .next()
        .and_then(|l| l.rsplit(':').next())
        .expect("port")
        .to_string();
    // Ready when the second "ready to accept connections" line is out (the
    // first one comes from the entrypoint's temporary init server).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let logs = Command::new("docker")
            .args(["logs", &id])
            .output()
            .expect("docker logs");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&logs.stdout),
            String::from_utf8_lossy(&logs.stderr)
        );
        if text.matches("ready to accept connections").count() >= 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "postgres container did not become ready:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let mut server = server;
    server.url = format!("postgres://postgres:postgres@127.0.0.1:{port}/postgres");
    Some(server)
}

fn shardlock(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_shardlock"))
        .args(args)
        .output()
        .expect("run shardlock")
}

#[test]
fn postgres_process_demo_and_status() {
    let Some(server) = server() else { return };
    let output = shardlock(&[
        "demo",
        "--driver",
        "postgres",
        "--url",
        &server.url,
        "--duration",
        "8",
        "--plain",
    ]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "demo failed: {stdout}\n{stderr}");
    assert!(
        stdout.lines().any(|l| l == "overlaps: 0"),
        "no `overlaps: 0` line:\n{stdout}"
    );
    let kill = stdout
        .lines()
        .find(|l| l.contains("kill -9 of"))
        .unwrap_or_default();
    assert!(
        kill.contains("shards taken over"),
        "no takeover after the kill:\n{stdout}"
    );
    eprintln!("postgres demo: {kill}");

    // A node holding locks shows up in `status --url` with names and holder.
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
    let deadline = Instant::now() + Duration::from_secs(20);
    let table = loop {
        let out = shardlock(&[
            "status",
            "--url",
            &server.url,
            "--schema",
            "statuscheck",
            "--shards",
            "3",
        ]);
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        if text.matches("shardlock:status-node").count() == 3 {
            break text;
        }
        assert!(
            Instant::now() < deadline,
            "status never showed the node's 3 locks:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        table.contains("main:statuscheck:orders:00"),
        "lock names rebuilt:\n{table}"
    );
    let json = shardlock(&["status", "--url", &server.url, "--json"]);
    assert!(String::from_utf8_lossy(&json.stdout)
        .trim_start()
        .starts_with('['));
    drop(node.stdin.take());
    let status = node.wait().expect("node exit");
    assert!(status.success(), "graceful stop exits 0");
    let after = shardlock(&["status", "--url", &server.url]);
    assert!(
        !String::from_utf8_lossy(&after.stdout).contains("shardlock:status-node"),
        "a stopped node leaves no lock behind"
    );
}
